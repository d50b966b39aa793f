"""The MCU driver against the host-built simulated node over a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from peers import RecordingSink

from drivers.mcu.config import McuConfig, SimNodeConfig
from drivers.mcu.driver import McuDriver, factory
from drivers.mcu.simnode import RunningSimNode, run_sim_node
from gateway.contracts import SourceInfo
from gateway.errors import TransientError

pytestmark = pytest.mark.slow

NODE_ID = "MOTOR-7731"
INFO = SourceInfo("motor7-adc", "plant-A/motor-7", "industrial")


async def _drive(
    node_cfg: SimNodeConfig,
    extra: tuple[str, ...],
    seconds: float,
    during: Callable[[RunningSimNode, McuDriver], Awaitable[None]] | None = None,
    **cfg: float,
) -> tuple[McuDriver, RecordingSink, BaseException | None]:
    """Run the driver against a simulated node for ``seconds`` after it started delivering."""
    sink = RecordingSink(samples=False)
    async with run_sim_node(node_cfg, "test node", extra) as node:
        driver = factory(INFO, McuConfig(port=node.path, **cfg))  # type: ignore[arg-type]
        started = asyncio.Event()
        task = asyncio.create_task(driver.run(sink, started=started.set), name="mcu-driver-under-test")
        try:
            await asyncio.wait_for(started.wait(), 10)
            if during is not None:
                await during(node, driver)
            done, _ = await asyncio.wait({task}, timeout=seconds)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransientError):
                await task
    return driver, sink, (task.exception() if done else None)


def _dominant_hz(t: np.ndarray, v: np.ndarray) -> float:
    n = min(len(v), 1024)
    rate = 1.0 / float(np.median(np.diff(t[:n])))
    spectrum = np.abs(np.fft.rfft((v[:n] - v[:n].mean()) * np.hanning(n)))
    return float(np.fft.rfftfreq(n, 1.0 / rate)[int(np.argmax(spectrum))])


def test_node_streams_motor_channels_with_synced_time_across_a_tick_wrap(tmp_path: Path) -> None:
    node_cfg = SimNodeConfig(node_id=NODE_ID, seed=5, drift_ppm=500.0, flash=tmp_path / "flash.bin")
    tick_start = 2**32 - 1_500_000  # the node's 1 MHz counter wraps 1.5 s after boot
    driver, sink, failure = asyncio.run(
        _drive(node_cfg, ("--tick-start", str(tick_start)), 3.5, time_sync_s=0.2, report_s=1.0)
    )
    assert failure is None
    streams = {b.stream for _, b in sink.blocks}
    by_name = {s.metric.name: s for s in streams}
    assert set(by_name) == {"motor_current", "winding_temp", "vibration"}
    assert {(n, s.metric.unit, s.rate_hz) for n, s in by_name.items()} == {
        ("motor_current", "A", 500.0),
        ("winding_temp", "Cel", 10.0),
        ("vibration", "g", 250.0),
    }
    for s in streams:
        assert (s.source, s.subject, s.device, s.kind) == (INFO.name, INFO.subject, NODE_ID, "industrial")
        assert NODE_ID not in s.metric.name
        assert s.metric.mdc is None

    t, current = sink.series("motor_current")
    assert len(t) > 1500
    assert float(np.sqrt(np.mean(current**2))) == pytest.approx(4.2, rel=0.1)
    assert _dominant_hz(t, current) == pytest.approx(50.0, abs=1.0)
    tv, vib = sink.series("vibration")
    assert _dominant_hz(tv, vib) == pytest.approx(24.6, abs=0.5)
    _, temp = sink.series("winding_temp")
    assert 38.0 < float(temp.mean()) < 48.0

    # Time: continuous through the wrap, one sample period apart, no loss, close to arrival.
    for name, rate in (("motor_current", 500.0), ("vibration", 250.0), ("winding_temp", 10.0)):
        ts, _ = sink.series(name)
        d = np.diff(ts)
        assert d.min() > 0
        assert float(np.median(d)) == pytest.approx(1.0 / rate, rel=2e-3)
        assert d.max() < 1.5 / rate, f"{name}: a jump of {d.max():.4f} s"
    for received, block in sink.blocks:
        assert block.t_mono[-1] <= received + 0.002
        assert block.t_mono[-1] >= received - 0.3
        np.testing.assert_allclose(block.t_wall - block.t_mono, time.time() - time.monotonic(), atol=0.05)
    snap = driver.snapshot()
    assert snap["drift_ppm"] == pytest.approx(500.0, abs=150.0)  # timing noise of a shared CI host
    assert snap["lost_frames"] == 0
    assert snap.get("lost_samples", 0) == 0
    assert snap["rtt_ms"] < 20

    kinds = [d.kind for d in sink.diagnostics]
    assert "mcu_node" in kinds
    assert "mcu_link" in kinds
    node_diag = next(diag for diag in sink.diagnostics if diag.kind == "mcu_node")
    assert (node_diag.detail["fw_major"], node_diag.detail["fw_minor"]) == (1.0, 0.0)
    for diag in sink.diagnostics:
        assert all(NODE_ID not in str(v) for v in diag.detail.values())


_FAULT = re.compile(r"^(drop|corrupt) seq=(\d+) type=(\d+)(?: channel=(\d+) n=(\d+) index=(\d+))?$")
CHANNEL_NAMES = ("motor_current", "winding_temp", "vibration")


def test_corrupted_and_dropped_frames_resync_and_match_the_nodes_fault_log(tmp_path: Path) -> None:
    log = tmp_path / "faults.log"
    node_cfg = SimNodeConfig(
        node_id=NODE_ID,
        seed=9,
        drop_prob=0.04,
        corrupt_prob=0.04,
        garbage_prob=0.04,
        flash=tmp_path / "flash.bin",
    )
    driver, sink, failure = asyncio.run(
        _drive(node_cfg, ("--fault-log", str(log)), 3.0, time_sync_s=0.25, report_s=1.0)
    )
    assert failure is None
    snap = driver.snapshot()
    first, last = int(snap["first_seq"]), int(snap["last_seq"])
    asm = driver.assembler
    assert asm is not None
    ranges = asm.ranges

    lost_frames = corrupted = 0
    lost_samples: dict[str, int] = dict.fromkeys(CHANNEL_NAMES, 0)
    for line in log.read_text().splitlines():
        m = _FAULT.match(line)
        assert m is not None, line
        seq = int(m.group(2))
        if not first < seq < last:
            continue  # before the driver listened, or after it stopped
        lost_frames += 1
        corrupted += m.group(1) == "corrupt"
        if m.group(4) is not None:
            name = CHANNEL_NAMES[int(m.group(4))]
            lo, hi = ranges[name]
            if lo < int(m.group(6)) < hi:
                lost_samples[name] += int(m.group(5))
    assert lost_frames >= 5, "too few faults to show anything; raise the probabilities"
    assert snap["lost_frames"] == lost_frames
    assert snap["lost_samples"] == sum(lost_samples.values())
    assert asm.missing == lost_samples
    for name in CHANNEL_NAMES:
        lo, hi = ranges[name]
        assert asm.delivered[name] + asm.missing[name] == hi - lo  # every sample accounted for
    # Corrupt frames (and line noise) were dropped and counted by reason, and streaming went on.
    assert snap["corrupt_frames"] >= corrupted
    assert snap.get("corrupt_crc", 0) + snap.get("corrupt_cobs", 0) > 0
    t, _ = sink.series("motor_current")
    assert t[-1] - t[0] > 2.5
    losses = [d for d in sink.diagnostics if d.kind == "mcu_loss"]
    assert losses
    reported = sum(float(d.detail["missing_samples"]) for d in losses)
    assert 0 < reported <= snap["lost_samples"]
    assert {d.detail["channel"] for d in losses} <= set(CHANNEL_NAMES)


def test_a_node_that_dies_fails_the_run_with_a_transient_error(tmp_path: Path) -> None:
    async def kill(node: RunningSimNode, _driver: McuDriver) -> None:
        node.process.kill()

    _, sink, failure = asyncio.run(
        _drive(SimNodeConfig(flash=tmp_path / "flash.bin"), (), 5.0, kill, silence_s=1.0)
    )
    assert isinstance(failure, TransientError)
    assert "link lost" in str(failure) or "silent" in str(failure)
    assert sink.blocks  # it had streamed before


def test_driver_runs_its_own_simulated_node(tmp_path: Path) -> None:
    async def scenario() -> tuple[McuDriver, RecordingSink]:
        cfg = McuConfig(simulate=SimNodeConfig(node_id="SIM-0042", flash=tmp_path / "flash.bin"))
        driver = factory(
            SourceInfo("bedside-probe", "ward3-bed12", "medical"),
            cfg.model_copy(update={"metrics": {"winding_temp": "MDC_TEMP_BODY"}}),
        )
        sink = RecordingSink(samples=False)
        started = asyncio.Event()
        task = asyncio.create_task(driver.run(sink, started=started.set), name="mcu-driver-sim")
        try:
            await asyncio.wait_for(started.wait(), 15)
            await asyncio.sleep(0.5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return driver, sink

    _driver, sink = asyncio.run(scenario())
    streams = {b.stream for _, b in sink.blocks}
    assert {s.device for s in streams} == {"SIM-0042"}
    assert {s.kind for s in streams} == {"medical"}
    temp = next(s for s in streams if s.metric.name == "MDC_TEMP_BODY")
    assert temp.metric.mdc == 150364
