"""The serial oximeter driver end to end over real pseudo-terminals (socat pairs and the pty simulator).

Nothing is mocked: socat makes a pty pair whose one end the test writes as the monitor would, the
driver opens the other end with pyserial; the simulator is a real pty written from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import RecordingSink, background, socat_ptys
from test_alarm_source_removed import Site, config

from drivers.serial import contec, masimo, nonin
from drivers.serial.config import SerialConfig
from drivers.serial.driver import BATTERY_GOOD_S, PI, PULSE, SPO2, SerialOximeter, factory
from drivers.serial.formats import PARSERS
from drivers.serial.port import DeviceAbsentError, DeviceLostError
from drivers.serial.protocol import Status
from drivers.serial.sim import Corruption, PtyOximeter, VitalsModel
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Alarm, AlarmKind, Lane, SourceInfo
from gateway.errors import ConfigError, TransientError
from gateway.notify import Notifier
from gateway.outbox import AsyncOutbox, Outbox
from gateway.pipeline.windows import Windower
from gateway.records import as_map, decode, encode
from gateway.runtime import Pipeline
from gateway.sample import Quality
from gateway.supervisor import Backoff, Group, Supervisor, Unit

pytestmark = pytest.mark.skipif(
    shutil.which("socat") is None, reason="socat is not installed (apt install socat)"
)

INFO = SourceInfo("bed7-spo2", "ward3-bed7", "medical")
TOKEN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def driver(port: str, **keys: Any) -> SerialOximeter:
    return factory(INFO, SerialConfig.model_validate({"port": port, **keys}))


@contextlib.asynccontextmanager
async def running(drv: SerialOximeter, sink: RecordingSink) -> AsyncIterator[asyncio.Task[None]]:
    started = asyncio.Event()
    task = asyncio.create_task(drv.run(sink, started=started.set), name="test:serial-driver")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A socat pty pair: the driver's end (a path) and the device's end (an open fd)."""
    a, b = tmp_path / "monitor", tmp_path / "device"
    with socat_ptys(a, b):
        fd = os.open(b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            yield str(a), fd
        finally:
            os.close(fd)


def device_bytes(protocol: str) -> bytes:
    """A few seconds of one monitor's output: SpO2 97, pulse 72 (PI 3.6 where it exists)."""
    if protocol in ("nonin2", "nonin7"):
        return nonin.encode_packet(2 if protocol == "nonin2" else 7, 72, 97, 0, list(range(25))) * 4
    if protocol == "nonin8":
        return nonin.encode_df8(72, 97, 0) * 4
    if protocol == "nonin13":
        return nonin.encode_df13(72, 97, 0, (2024, 1, 15, 10, 30, 0))
    if protocol == "nonin_ascii":
        return nonin.encode_ascii(72, 97) * 3
    if protocol == "masimo":
        return masimo.encode_line((2024, 1, 15, 10, 30, 0), 97, 72, 3.6, masimo.EXC_SET) * 4
    encode_frame = contec.encode_legacy if protocol == "cms50" else contec.encode_v46
    return b"".join(encode_frame(72, 97, 0, k % 100) for k in range(45))


async def send_until_read(fd: int, data: bytes, sink: RecordingSink, timeout: float = 15.0) -> None:
    """Send ``data`` again and again until the driver has read a reading from it.

    Opening a serial port flushes what waits in its input: bytes sent before the driver opened the
    port (later than usual on a loaded machine) are gone, as with a monitor that streams anyway.
    """
    deadline = time.monotonic() + timeout
    while not sink.values(SPO2.name):
        assert time.monotonic() < deadline, "the driver read nothing from the port"
        os.write(fd, data)
        await asyncio.sleep(0.2)


def read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize(
    "protocol", ["nonin2", "nonin7", "nonin8", "nonin13", "nonin_ascii", "masimo", "cms50", "cms50v46"]
)
def test_each_protocol_end_to_end_through_a_pty_pair(protocol: str, socat_pair: tuple[str, int]) -> None:
    port, fd = socat_pair

    async def main() -> RecordingSink:
        sink = RecordingSink(blocks=False)
        drv = driver(port, protocol=protocol, allow_start_command=protocol == "cms50v46")
        async with running(drv, sink):
            if protocol == "cms50v46":  # the start command also tells that the port is open
                got = b""
                deadline = time.monotonic() + 15
                while contec.START_COMMAND not in got and time.monotonic() < deadline:
                    got += read_available(fd)
                    await asyncio.sleep(0.02)
                assert contec.START_COMMAND in got, "the driver did not ask the device to start"
            await send_until_read(fd, device_bytes(protocol), sink)
            await until(lambda: len(sink.values(SPO2.name)) >= 1 and len(sink.values(PULSE.name)) >= 1)
        return sink

    sink = asyncio.run(main())
    assert set(sink.values(SPO2.name)) == {97.0}
    assert set(sink.values(PULSE.name)) == {72.0}
    assert all(s.quality == Quality.GOOD for s in sink.samples)
    assert {s.stream.subject for s in sink.samples} == {INFO.subject}
    assert {s.stream.rate_hz for s in sink.samples} == {PARSERS[protocol].reading_rate_hz}
    if protocol == "masimo":
        assert set(sink.values(PI.name)) == {3.6}
        assert {s.stream.device for s in sink.samples} == {"0000056661"}
    else:
        assert PI.name not in {s.stream.metric.name for s in sink.samples}
        assert {s.stream.device for s in sink.samples} == {port}


def test_sensor_off_and_missing_values_are_quality_flags_not_numbers(socat_pair: tuple[str, int]) -> None:
    port, fd = socat_pair
    off = nonin.encode_df8(math.nan, math.nan, int(Status.FINGER_OUT))

    async def main() -> RecordingSink:
        sink = RecordingSink(blocks=False)
        async with running(driver(port, protocol="nonin8"), sink):
            await send_until_read(fd, nonin.encode_df8(72, 97, 0) * 2, sink)
            os.write(fd, nonin.encode_df8(72, 97, 0) * 2 + off * 3)
            await until(lambda: any(math.isnan(v) for v in sink.values(SPO2.name)))
        return sink

    sink = asyncio.run(main())
    off_samples = [s for s in sink.samples if math.isnan(s.value)]
    assert off_samples
    assert all(s.quality & Quality.SENSOR_OFF for s in off_samples)
    assert all(v in (72.0, 97.0) for v in (s.value for s in sink.samples) if not math.isnan(v))
    # Windowed by the core, these become a sensor fault - not a patient event.
    alarms: list[Alarm] = []
    windower = Windower(window_s=10, hop_s=5, grace_s=1, lost_after_s=15, on_alarm=alarms.append)
    for s in sink.samples:
        windower.put(s)
    assert {a.kind for a in alarms} == {AlarmKind.SENSOR_FAULT}


MASIMO_LINE = masimo.encode_line((2024, 1, 15, 10, 30, 0), 97, 72, 3.6, masimo.EXC_SET)
LOW = nonin.encode_df8(72, 97, int(Status.LOW_BATTERY))
GOOD = nonin.encode_df8(72, 97, 0)


async def stream_frames(fd: int, frame: bytes, seconds: float) -> None:
    """The monitor sends ``frame`` five times a second for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        os.write(fd, frame)
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def streaming(fd: int, frame: bytes) -> AsyncIterator[None]:
    """The monitor sends ``frame`` five times a second while the block runs."""
    async with background(stream_frames(fd, frame, math.inf), "test:monitor"):
        yield


def alarms(sink: RecordingSink) -> list[tuple[AlarmKind, dict[str, float | str]]]:
    return [(a.kind, dict(a.detail)) for a in sink.alarms]


LOW_BATTERY = (AlarmKind.SENSOR_FAULT, {"cause": "low_battery"})
GOOD_AGAIN = (AlarmKind.SENSOR_RESTORED, {"after": "sensor_fault", "cause": "low_battery"})


def test_low_battery_is_a_device_alarm_that_ends_once_the_bit_stays_clear(
    socat_pair: tuple[str, int],
) -> None:
    port, fd = socat_pair
    drv = driver(port, protocol="nonin8")

    async def main() -> tuple[RecordingSink, float]:
        sink = RecordingSink(blocks=False)
        async with running(drv, sink):
            await send_until_read(fd, GOOD, sink)  # good, but not yet for BATTERY_GOOD_S
            os.write(fd, LOW)
            await until(lambda: drv.battery_low is True)
            await stream_frames(fd, GOOD, 2.0)  # clear for a moment (the load passed): still low
            await stream_frames(fd, LOW, 0.4)
            assert drv.battery_low is True
            clear_from = time.monotonic()
            async with streaming(fd, GOOD):
                await until(lambda: drv.battery_low is False, timeout=BATTERY_GOOD_S + 10)
        return sink, clear_from

    sink, clear_from = asyncio.run(main())
    assert alarms(sink) == [LOW_BATTERY, GOOD_AGAIN]
    assert sink.alarms[1].t_mono - clear_from >= BATTERY_GOOD_S
    assert all(a.stream is not None and a.stream.metric is SPO2 for a in sink.alarms)
    assert all(s.quality == Quality.GOOD for s in sink.samples)


@pytest.mark.parametrize(
    ("protocol", "frame"), [("nonin8", GOOD), ("masimo", MASIMO_LINE)], ids=["nonin8", "masimo"]
)
def test_a_runs_first_good_battery_ends_one_left_on_and_a_format_without_the_bit_says_nothing(
    protocol: str, frame: bytes, socat_pair: tuple[str, int]
) -> None:
    port, fd = socat_pair
    drv = driver(port, protocol=protocol)

    async def main() -> RecordingSink:
        sink = RecordingSink(blocks=False)
        async with running(drv, sink), streaming(fd, frame):
            await until(lambda: bool(sink.values(SPO2.name)))
            first = sink.samples[0].t_mono
            await until(lambda: sink.samples[-1].t_mono - first > BATTERY_GOOD_S + 0.5, BATTERY_GOOD_S + 10)
        return sink

    sink = asyncio.run(main())
    if PARSERS[protocol].reports_battery:
        # The driver ends a low battery a previous run may have left on; the pipeline sends that
        # ending only when one is on (the restart test below).
        assert alarms(sink) == [GOOD_AGAIN]
        assert drv.battery_low is False
    else:
        assert sink.alarms == []
        assert drv.battery_low is None


Start = Callable[..., list[dict[str, Any]]]


def gateway_on(port: str, fd: int, protocol: str, tmp_path: Path) -> tuple[Site, Start]:
    """A gateway reading the monitor on ``port``, and one start of it (a fresh driver, the same state).

    ``start(frame, done, what, sent=0)``: the monitor sends ``frame`` until ``done(driver)`` and the
    pipeline has queued ``sent`` alarms; the alarms the twin got.
    """
    source = {
        "name": INFO.name,
        "driver": "serial",
        "subject": INFO.subject,
        "port": port,
        "protocol": protocol,
    }
    cfg = config(tmp_path, source)
    site = Site(tmp_path)

    def start(
        frame: bytes, done: Callable[[SerialOximeter], bool], what: str, sent: int = 0
    ) -> list[dict[str, Any]]:
        async def main() -> list[dict[str, Any]]:
            async with streaming(fd, frame):
                return await site.start(cfg, SerialOximeter, done, what, sent=sent)

        return asyncio.run(main())

    return site, start


def test_a_low_battery_charged_while_the_gateway_was_down_ends_after_the_restart(
    socat_pair: tuple[str, int], tmp_path: Path
) -> None:
    site, start = gateway_on(*socat_pair, "nonin8", tmp_path)

    def gateway_run(frame: bytes, low: bool) -> list[dict[str, Any]]:
        return start(frame, lambda d: d.battery_low is low, "the battery judged")

    first = gateway_run(LOW, True)
    assert [(a["alarm"], a["detail"]) for a in first] == [("sensor_fault", {"cause": "low_battery"})]
    assert gateway_run(LOW, True) == []  # still low after a restart: the same condition
    assert len(site.subject(INFO.subject).active) == 1
    after = gateway_run(GOOD, False)  # charged while the gateway was down
    assert [(a["alarm"], a["detail"]) for a in after] == [
        ("sensor_restored", {"after": "sensor_fault", "cause": "low_battery"})
    ]
    assert site.subject(INFO.subject).active == {}
    assert gateway_run(GOOD, False) == []  # good again, nothing on: nothing sent


def masimo_lines(spo2: float, serial: str | None) -> bytes:
    """A Masimo line (ASCII 1) with ``spo2`` and the monitor's serial number (None: it sends none)."""
    return masimo.encode_line((2024, 1, 15, 10, 30, 0), spo2, 72, 3.6, masimo.EXC_SET, serial=serial)


def test_a_fault_raised_under_the_port_is_ended_by_the_monitor_naming_itself_after_a_restart(
    socat_pair: tuple[str, int], tmp_path: Path
) -> None:
    # Before the stop the monitor sent no serial number: its implausible SpO2 (40 %) was raised under
    # the port.  After the start it names itself (SN=) from its first line, reading 97 %: no
    # evidence of another monitor, so the fault is its own and its data end it, under the port's name.
    site, start = gateway_on(*socat_pair, "masimo", tmp_path)
    first = start(masimo_lines(40, None), lambda d: True, "the fault", sent=1)
    assert [(a["alarm"], a["detail"].get("rule")) for a in first] == [("sensor_fault", "range")]
    named = "0000012345"
    after = start(masimo_lines(97, named), lambda d: d.device == named, "the restore", sent=1)
    assert [(a["alarm"], a["detail"].get("ended")) for a in after] == [("sensor_restored", None)]
    assert after[0]["dev"] == first[0]["dev"]  # the condition the twin holds, by the name it was raised under
    assert site.subject(INFO.subject).active == {}


def test_a_monitor_naming_itself_while_running_keeps_the_lines_it_sent_under_its_port(
    socat_pair: tuple[str, int], tmp_path: Path
) -> None:
    # The monitor's first lines carry no serial number (88 %), then it names itself (97 %): the
    # windows cut afterwards hold both, as the monitor's stream; before, the port's lines were dropped.
    port, fd = socat_pair
    named = "0000012345"
    source = {
        "name": INFO.name,
        "driver": "serial",
        "subject": INFO.subject,
        "port": port,
        "protocol": "masimo",
    }
    cfg = config(tmp_path, source)
    pseudonym = Pseudonymizer(b"s" * 32)
    anon = Anonymizer(pseudonym, time_mode="relative", start_wall=time.time())
    drv = driver(port, protocol="masimo")

    async def main() -> list[dict[str, Any]]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(cfg, anon, outbox)
            await pipeline.end_vanished()
            task = asyncio.create_task(drv.run(pipeline.sink, started=lambda: None), name="test:driver")
            try:
                async with streaming(fd, masimo_lines(88, None)):
                    await asyncio.sleep(1.5)
                async with streaming(fd, masimo_lines(97, named)):
                    await until(lambda: drv.device == named)
                    await asyncio.sleep(1.5)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pipeline.step()  # cuts every window due, after the naming
            await outbox.flush()
            return [as_map(decode(i.payload)) for i in await outbox.lease(1000) if i.lane == Lane.FEATURES]

    spo2 = [s for w in asyncio.run(main()) for s in w["streams"] if s["metric"] == "MDC_PULS_OXIM_SAT_O2"]
    assert {s["dev"] for s in spo2} == {pseudonym("device", named)}  # one stream, the monitor's
    both = [s for s in spo2 if (s["features"].get("min"), s["features"].get("max")) == (88.0, 97.0)]
    assert both, spo2


def test_silent_device_raises_stale_data(socat_pair: tuple[str, int]) -> None:
    port, _fd = socat_pair
    sink = RecordingSink(blocks=False)
    drv = driver(port, protocol="nonin2", stale_after_s=0.4)

    async def main() -> None:
        await drv.run(sink, started=lambda: None)

    with pytest.raises(TransientError, match="stale data: no valid frame"):
        asyncio.run(main())
    assert [(a.kind, a.detail) for a in sink.alarms] == [(AlarmKind.SENSOR_LOST, {"cause": "stale"})]
    assert sink.diagnostics
    assert sink.diagnostics[-1].kind == "serial_link"
    assert sink.diagnostics[-1].detail["protocol"] == "nonin2"


def test_absent_port_alarms_once_and_is_retried(tmp_path: Path) -> None:
    sink = RecordingSink(blocks=False)
    drv = driver(str(tmp_path / "usb-Nonin_Medical-if00"), protocol="nonin2")

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(DeviceAbsentError, match="port not found"):
                await drv.run(sink, started=lambda: None)

    asyncio.run(main())
    assert len(sink.alarms) == 1
    assert sink.alarms[0].kind is AlarmKind.SENSOR_LOST
    assert sink.alarms[0].detail == {"cause": "absent"}
    assert isinstance(DeviceAbsentError("x"), TransientError)


def test_wrong_speed_is_reported_as_no_recognisable_frames(tmp_path: Path) -> None:
    sim = PtyOximeter("nonin2", link=tmp_path / "ox", corruption=Corruption(wrong_speed=19200))
    sink = RecordingSink(blocks=False)
    with sim:
        drv = driver(sim.path, protocol="nonin2", detect_timeout_s=1.5)

        async def main() -> None:
            await drv.run(sink, started=lambda: None)

        with pytest.raises(ConfigError) as info:
            asyncio.run(main())
    assert [(a.kind, dict(a.detail)) for a in sink.alarms] == [
        (AlarmKind.SENSOR_LOST, {"cause": "no_frames"})
    ]
    assert sink.samples == []
    text = str(info.value)
    assert f"no recognisable frames at 9600 8N1 on {sim.path}" in text
    assert "check the monitor's output format and speed" in text


def test_wrong_speed_with_auto_names_every_setting_tried(tmp_path: Path) -> None:
    sim = PtyOximeter("nonin2", link=tmp_path / "ox", corruption=Corruption(wrong_speed=2400))
    with sim:
        drv = driver(sim.path, protocol="auto", probe_s=0.7)
        with pytest.raises(ConfigError, match=r"no recognisable frames at 9600 8N1, 19200 8O1 on "):
            asyncio.run(drv.run(RecordingSink(blocks=False), started=lambda: None))


@pytest.mark.parametrize("protocol", ["nonin2", "masimo", "cms50", "cms50v46"])
def test_auto_detects_the_protocol(protocol: str, tmp_path: Path) -> None:
    with PtyOximeter(protocol, link=tmp_path / "ox") as sim:
        # A line a second needs two lines heard; 60 frames a second are recognised at once.
        probe_s = 2.5 if protocol == "masimo" else 1.0
        drv = driver(sim.path, protocol="auto", probe_s=probe_s, allow_start_command=protocol == "cms50v46")

        async def main() -> RecordingSink:
            sink = RecordingSink(blocks=False)
            async with running(drv, sink):
                await until(lambda: len(sink.values(SPO2.name)) >= 1, timeout=12)
            return sink

        sink = asyncio.run(main())
    assert sink.values(SPO2.name)
    assert drv.detected == protocol  # what auto found, kept for the next run


def test_auto_never_writes_without_consent(tmp_path: Path) -> None:
    with PtyOximeter("cms50v46", link=tmp_path / "ox") as sim:
        drv = driver(sim.path, protocol="auto", probe_s=0.5)
        with pytest.raises(TransientError, match="sent nothing while probed"):
            asyncio.run(drv.run(RecordingSink(blocks=False), started=lambda: None))
        assert sim.commands == []


def test_unplug_and_replug_under_the_same_path(tmp_path: Path) -> None:
    """Supervised: the device vanishes (pty closed, link removed), is retried, and comes back."""
    vitals = VitalsModel(3, desat_every_s=0, sensor_off_every_s=0)
    sim = PtyOximeter("nonin2", link=tmp_path / "usb-Nonin_OEM_III-if00", vitals=vitals).start()
    sink = RecordingSink(blocks=False)
    drv = driver(sim.path, protocol="nonin2")

    async def main() -> None:
        sup = Supervisor(Notifier(None), start_timeout_s=5, backoff=Backoff(base_s=0.1, cap_s=0.2))

        async def unit(started: Callable[[], None]) -> None:
            await drv.run(sink, started=started)

        sup.add(Unit("source:bed7-spo2", Group.SOURCES, unit))

        async def drain(_deadline: float) -> None:
            return None

        run = asyncio.create_task(sup.run(drain, 1.0), name="test:supervisor")
        try:
            # The first connection judges the battery good once it has been so BATTERY_GOOD_S.
            await until(lambda: drv.battery_low is False, timeout=BATTERY_GOOD_S + 10)
            sim.unplug()
            await until(lambda: any(a.kind is AlarmKind.SENSOR_LOST for a in sink.alarms))
            assert not Path(sim.path).exists()
            await asyncio.sleep(0.5)  # retried while absent: no second alarm
            before = len(sink.samples)
            sim.replug()
            await until(lambda: len(sink.samples) > before + 4)
            await until(lambda: any(a.kind is AlarmKind.SENSOR_RESTORED for a in sink.alarms))
        finally:
            sup.request_stop()
            await asyncio.wait_for(run, 10)

    try:
        asyncio.run(main())
    finally:
        sim.stop()
    kinds = [(a.kind, dict(a.detail)) for a in sink.alarms]
    assert kinds == [
        GOOD_AGAIN,  # the ending of a low battery a previous run may have left on (sent only then)
        (AlarmKind.SENSOR_LOST, {"cause": "unplugged"}),
        (AlarmKind.SENSOR_RESTORED, {"after": "sensor_lost", "cause": "unplugged"}),
    ]
    assert {s.stream.device for s in sink.samples} == {sim.path}
    assert len({id(s.stream) for s in sink.samples if s.stream.metric is SPO2}) == 1
    assert isinstance(DeviceLostError("x"), TransientError)


def test_identities_stay_on_the_gateway(socat_pair: tuple[str, int]) -> None:
    port, fd = socat_pair
    line = masimo.encode_line((2024, 1, 15, 10, 30, 0), 97, 72, 3.6, masimo.EXC_SET, serial="0000418273")

    async def main() -> RecordingSink:
        sink = RecordingSink(blocks=False)
        async with running(driver(port, protocol="masimo", stale_after_s=0.5), sink):
            await send_until_read(fd, line * 3, sink)
            await until(lambda: any(a.kind is AlarmKind.SENSOR_LOST for a in sink.alarms))
        return sink

    sink = asyncio.run(main())
    assert {s.stream.device for s in sink.samples} == {"0000418273"}
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative")
    for alarm in sink.alarms:
        assert alarm.stream is not None
        assert alarm.stream.device == "0000418273"
        assert all(isinstance(v, float | int) or TOKEN.match(v) for v in alarm.detail.values())
        sealed = anon.seal(functools.partial(anon.alarm, alarm), encode)
        assert sealed is not None
        assert b"0000418273" not in sealed[1]
        assert b"418273" not in sealed[1]
    for diag in sink.diagnostics:
        assert all(isinstance(v, float | int) or TOKEN.match(v) for v in diag.detail.values())
        sealed = anon.seal(functools.partial(anon.diagnostic, diag), encode)
        assert sealed is not None


def test_factory_and_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind 'industrial'"):
        factory(SourceInfo("x", "y", "industrial"), SerialConfig.model_validate({"port": "/dev/ttyUSB0"}))
    with pytest.raises(ValueError, match="allow_start_command"):
        SerialConfig.model_validate({"port": "/dev/ttyUSB0", "protocol": "cms50v46"})
    with pytest.raises(ValueError, match="extra"):
        SerialConfig.model_validate({"port": "/dev/ttyUSB0", "speed": 9600})
    cfg = SerialConfig.model_validate(
        {"port": "/dev/serial/by-id/usb-x", "protocol": "masimo", "device": "rad8-3"}
    )
    assert factory(INFO, cfg).device == "rad8-3"
    regular = tmp_path / "not-a-tty"
    regular.write_bytes(b"")
    with pytest.raises(ConfigError, match="not a serial port"):
        asyncio.run(
            driver(str(regular), protocol="nonin2").run(RecordingSink(blocks=False), started=lambda: None)
        )


def test_streams_remembered_across_runs_stay_bounded_whatever_serial_numbers_a_device_reports() -> None:
    drv = driver("/dev/ttyUSB0")
    first = drv.stream(SPO2)
    assert drv.stream(SPO2) is first  # one object per identity, reused
    for n in range(1000):
        drv._serial_number = f"SN{n:05d}"  # what a device reporting a new identity each time does
        drv.stream(SPO2)
    assert len(drv._streams) <= 64
    drv._serial_number = "SN00999"
    assert drv.stream(SPO2).device == "SN00999"
