"""Every device driver declares a pulse: a stuck driver is restarted, a slow or recovering one is not.

Each driver runs as a source unit under the real supervisor, as the runtime adds it (its
``pulse``, the device backoff), against its real peer: a socat pty or the pty oximeter, the
simulated C node, the PLC simulator process, the emulated BLE radio.  What each test shows:

* a device that goes quiet without closing is told by the driver's own bound (stale data,
  node silence, missing publish responses, a mute BLE link) and comes back when it sends again,
  and the supervisor never judges the unit stalled meanwhile: a reconnect loop that is trying,
  a firmware push holding the port, a server that stopped answering are bounded waits;
* a device that is quietly slow (a frame every 7 s, longer than any pulse bound) is never
  restarted;
* a driver that really is stuck outside any bound is cancelled and restarted by the supervisor:
  the open of a wedged USB-serial adapter that never returns.  A pty cannot wedge in the kernel,
  so only that call of the serial library is made to hang; everything else is real.

The default run keeps the stuck open, the firmware push and the mute BLE link (about 20 s);
``-m campaign`` adds the quiet devices and the mute PLC, which take real seconds of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import serial_asyncio_fast
from peers import RecordingSink, free_port
from test_ble_radio import driver as ble_driver
from test_ble_radio import testbed, wearables
from test_opcua_driver import Recorder, make_driver, until
from test_serial_driver import socat_pair

from drivers.ble.testbed.harness import Testbed, WearableProcess
from drivers.mcu.config import McuConfig, SimNodeConfig
from drivers.mcu.driver import McuDriver
from drivers.mcu.driver import factory as mcu_factory
from drivers.mcu.handover import port_from_gateway
from drivers.mcu.simnode import run_sim_node
from drivers.opcua.plcsim import PlcSimProcess
from drivers.serial import nonin
from drivers.serial.config import SerialConfig
from drivers.serial.driver import factory as serial_factory
from gateway.contracts import SampleSink, SourceInfo
from gateway.notify import Notifier
from gateway.supervisor import DEVICE_BACKOFF, Group, Supervisor, Unit

pytestmark = pytest.mark.slow

__all__ = ["socat_pair", "testbed", "wearables"]  # fixtures shared with the driver tests

UNIT = "source:dut"


async def _no_drain(deadline: float) -> None:
    return None


@contextlib.asynccontextmanager
async def supervised(driver: Any, sink: SampleSink) -> AsyncIterator[Unit]:
    """``driver`` as a source unit under a real supervisor, added as the runtime adds it."""
    assert driver.pulse is not None  # the point of these tests

    async def run_source(started: Callable[[], None]) -> None:
        await driver.run(sink, started=started)

    sup = Supervisor(Notifier(None), start_timeout_s=30.0)
    unit = Unit(UNIT, Group.SOURCES, run_source, pulse=driver.pulse, backoff=DEVICE_BACKOFF)
    sup.add(unit)
    task = asyncio.create_task(sup.run(_no_drain, 1.0), name="test:supervisor")
    try:
        yield unit
    finally:
        sup.request_stop()
        await asyncio.wait_for(task, 30)


def stalls(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The supervisor's stall verdicts on the unit under test."""
    return [r.getMessage() for r in caplog.records if f"unit {UNIT} stalled" in r.getMessage()]


def run(coro: Coroutine[Any, Any, None], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.supervisor")
    asyncio.run(coro)


# -- serial oximeter -------------------------------------------------------------------------------

SERIAL_INFO = SourceInfo("bed7-spo2", "ward3-bed7", "medical")
FRAME = nonin.encode_df8(72, 97, 0)  # Nonin #8: one frame a reading, framed by silence


class Monitor:
    """Writes a frame every ``period_s`` into the monitor's end while ``sending``."""

    def __init__(self, fd: int, period_s: float) -> None:
        self.fd = fd
        self.period_s = period_s
        self.sending = True
        self.sent: list[float] = []

    async def run(self) -> None:
        while True:
            if self.sending:
                with contextlib.suppress(BlockingIOError):  # nobody reading: the device talks on
                    os.write(self.fd, FRAME)
                self.sent.append(time.monotonic())
            await asyncio.sleep(self.period_s)


def spo2_arrivals(sink: RecordingSink) -> list[float]:
    return [s.t_mono for s in sink.samples if s.stream.metric.name == "MDC_PULS_OXIM_SAT_O2"]


@contextlib.asynccontextmanager
async def serial_source(
    pair: tuple[str, int], period_s: float, **cfg: Any
) -> AsyncIterator[tuple[Monitor, RecordingSink, Unit]]:
    """A monitor writing into the pty pair, read by the serial driver under the supervisor."""
    port, fd = pair
    drv = serial_factory(SERIAL_INFO, SerialConfig(port=Path(port), protocol="nonin8", **cfg))
    sink = RecordingSink(blocks=False)
    dev = Monitor(fd, period_s)
    writer = asyncio.create_task(dev.run(), name="test:monitor")
    try:
        async with supervised(drv, sink) as unit:
            yield dev, sink, unit
    finally:
        writer.cancel()


@pytest.mark.campaign
def test_serial_monitor_that_stops_mid_stream_is_told_by_its_bound_and_back_without_a_stall(
    socat_pair: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with serial_source(socat_pair, 0.2, stale_after_s=1.5) as (dev, sink, unit):
            await until(lambda: len(spo2_arrivals(sink)) >= 5, 10, "readings")
            dev.sending = False  # the port stays open: the monitor just stops talking
            await asyncio.sleep(7.0)  # past the pulse's 5 s: the driver's own bound must answer
            assert unit.failures >= 1  # stale data -> a transient error -> restarted
            t_back = time.monotonic()
            dev.sending = True
            took = await until(lambda: any(t > t_back for t in spo2_arrivals(sink)), 5, "data back")
            assert took < 2.0, took

    run(scenario(), caplog)
    assert not stalls(caplog)
    assert "stale data: no valid frame" in caplog.text


@pytest.mark.campaign
def test_serial_quietly_slow_monitor_is_not_restarted(
    socat_pair: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        # A frame every 6.5 s, longer than the pulse bound (5 s): only the driver knows it is fine
        # (and Nonin #8, framed by silence, needs a frame or two to find the frame boundaries).
        async with serial_source(socat_pair, 6.5, stale_after_s=20, detect_timeout_s=30) as (
            _dev,
            sink,
            unit,
        ):
            await until(lambda: len(spo2_arrivals(sink)) >= 2, 30, "two readings")
            assert unit.failures == 0

    run(scenario(), caplog)
    assert not stalls(caplog)


def test_serial_open_that_never_returns_is_cancelled_and_restarted(
    socat_pair: tuple[str, int], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = serial_asyncio_fast.connection_for_serial
    calls: list[float] = []

    async def wedged_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1:
            await asyncio.Event().wait()  # a USB-serial adapter wedged in the kernel
        return await real(*args, **kwargs)

    monkeypatch.setattr(serial_asyncio_fast, "connection_for_serial", wedged_once)

    async def scenario() -> None:
        async with serial_source(socat_pair, 0.2) as (_dev, sink, _unit):
            await until(lambda: len(spo2_arrivals(sink)) >= 3, 15, "readings after the restart")

    run(scenario(), caplog)
    assert len(calls) == 2
    found = stalls(caplog)
    assert len(found) == 1, found
    assert "no progress for" in found[0]


# -- microcontroller node --------------------------------------------------------------------------

MCU_INFO = SourceInfo("motor7", "pump-7", "industrial")


def block_arrivals(sink: RecordingSink) -> list[float]:
    return [at for at, _ in sink.blocks]


@contextlib.asynccontextmanager
async def streaming_mcu(tmp_path: Path, sink: RecordingSink) -> AsyncIterator[tuple[Any, McuDriver, Unit]]:
    """The simulated C node and its driver under the supervisor, entered once blocks flow."""
    node_cfg = SimNodeConfig(node_id="MOTOR-7731", seed=3, flash=tmp_path / "flash.bin")
    async with run_sim_node(node_cfg, "test node") as node:
        drv = mcu_factory(MCU_INFO, McuConfig(port=node.path, silence_s=1.0, time_sync_s=1.0))
        async with supervised(drv, sink) as unit:
            await until(lambda: len(sink.blocks) >= 3, 15, "sample blocks")
            yield node, drv, unit


@pytest.mark.campaign
def test_mcu_node_silent_without_closing_is_told_by_its_bound_and_back_without_a_stall(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RecordingSink(samples=False)

    async def scenario() -> None:
        async with streaming_mcu(tmp_path, sink) as (node, _drv, unit):
            os.kill(node.process.pid, signal.SIGSTOP)  # the pty stays open; nothing comes
            try:
                await asyncio.sleep(7.0)  # past the pulse's 5 s, while handshakes time out
                assert unit.failures >= 1
            finally:
                t_back = time.monotonic()
                os.kill(node.process.pid, signal.SIGCONT)
            took = await until(lambda: any(t > t_back for t in block_arrivals(sink)), 6, "data back")
            assert took < 3.0, took

    run(scenario(), caplog)
    assert not stalls(caplog)
    assert "node silent for 1 s" in caplog.text


def test_mcu_port_lent_to_a_firmware_push_longer_than_the_pulse_is_no_stall(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RecordingSink(samples=False)

    async def scenario() -> None:
        async with streaming_mcu(tmp_path, sink) as (node, drv, unit):
            async with port_from_gateway(node.path, "test push") as lent:
                assert lent
                await asyncio.sleep(6.5)  # a push of a large image: longer than the pulse bound
                assert drv.pulse.wait == "port lent to a firmware push"
            t_back = time.monotonic()
            await until(lambda: any(t > t_back for t in block_arrivals(sink)), 5, "data after the push")
            assert unit.failures == 0

    run(scenario(), caplog)
    assert not stalls(caplog)


# -- OPC UA ----------------------------------------------------------------------------------------


@pytest.mark.campaign
def test_opcua_server_that_stops_answering_keeps_the_unit_alive_and_data_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sim = PlcSimProcess(free_port())
    sim.start()
    try:
        drv = make_driver(sim.endpoint, request_timeout_s=1.0, keepalive_timeout_s=2.0)
        sink = Recorder()

        async def scenario() -> None:
            async with supervised(drv, sink) as unit:
                await until(lambda: len(sink.samples) >= 10, 15, "values")
                assert sim.proc is not None
                os.kill(sim.proc.pid, signal.SIGSTOP)  # the socket stays open; no answer, no publish
                try:
                    await until(lambda: not drv.link_up, 10, "the driver to see the link down")
                    await asyncio.sleep(6.0)  # reconnecting against a mute server, past the pulse
                finally:
                    t_back = time.monotonic()
                    os.kill(sim.proc.pid, signal.SIGCONT)
                await until(
                    lambda: any(s.t_mono > t_back for s in sink.samples), 15, "values after the server woke"
                )
                assert unit.failures == 0  # its own reconnect loop did it, alive all along

        run(scenario(), caplog)
    finally:
        sim.stop()
    assert not stalls(caplog)


# -- BLE -------------------------------------------------------------------------------------------

HR = "MDC_ECG_HEART_RATE"


def test_ble_wearable_that_goes_mute_while_connected_is_connected_again(
    testbed: Testbed, wearables: Callable[..., WearableProcess], caplog: pytest.LogCaptureFixture
) -> None:
    w = wearables("hr", rate=5)
    drv = ble_driver([{"address": w.address, "profile": "hr"}], lost_after_s=2.0)
    sink = RecordingSink(blocks=False)

    def arrivals() -> list[float]:
        return [s.t_mono for s in sink.of(w.address, HR)]

    async def scenario() -> None:
        async with supervised(drv, sink) as unit:
            await until(lambda: len(arrivals()) >= 3, 15, "heart rates")
            await asyncio.to_thread(w.command, "rate 0")  # connected, subscribed, and mute
            await until(lambda: drv.status()[w.address].connections >= 2, 8, "a fresh connection")
            t_back = time.monotonic()
            await asyncio.to_thread(w.command, "rate 5")
            await until(lambda: any(t > t_back for t in arrivals()), 8, "heart rates again")
            assert unit.failures == 0

    run(scenario(), caplog)
    assert not stalls(caplog)
    assert "connected but sent nothing" in caplog.text


@pytest.mark.campaign
def test_ble_quietly_slow_wearable_keeps_its_link(
    testbed: Testbed, wearables: Callable[..., WearableProcess], caplog: pytest.LogCaptureFixture
) -> None:
    w = wearables("hr", rate=0.5)  # a value every 2 s, lost_after_s 3 s
    drv = ble_driver([{"address": w.address, "profile": "hr"}], lost_after_s=3.0)
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with supervised(drv, sink) as unit:
            await until(lambda: len(sink.of(w.address, HR)) >= 4, 20, "four heart rates")
            assert unit.failures == 0
            assert drv.status()[w.address].connections == 1

    run(scenario(), caplog)
    assert not stalls(caplog)
    assert "connected but sent nothing" not in caplog.text
