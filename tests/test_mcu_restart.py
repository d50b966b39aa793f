"""MCU node reboots seen from the data: with and without the boot HELLO, in quick succession, and
many times over (bounded memory), against the host-built simulated node on a real pseudo-terminal.

The simulated node reboots on SIGUSR1 and, on SIGUSR2, reboots with its boot HELLO lost on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from peers import RecordingSink, running_driver
from test_alarm_source_removed import Site, config

from drivers.mcu.config import McuConfig, SimNodeConfig
from drivers.mcu.driver import McuDriver, factory
from drivers.mcu.simnode import RunningSimNode, run_sim_node
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.inference.plausibility import PlausibilityChecker
from gateway.pipeline.windows import Windower
from gateway.sample import SampleBlock, Stream

pytestmark = pytest.mark.slow

INFO = SourceInfo("motor7-adc", "plant-A/motor-7", "industrial")


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        await asyncio.sleep(0.02)


class PipelineSink(RecordingSink):
    """Blocks go through a real windower and plausibility checker too, as in the runtime."""

    def __init__(self) -> None:
        super().__init__(samples=False)
        self.pipeline_alarms: list[Alarm] = []
        self.windower = Windower(
            window_s=1.0, hop_s=0.5, grace_s=0.2, lost_after_s=1.0, on_alarm=self.pipeline_alarms.append
        )
        self.plausibility = PlausibilityChecker()
        self.keep_blocks = True
        self.session_at: list[float] = []  # when each handshake completed (monotonic)

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        super().diagnostic(diagnostic)
        if diagnostic.kind == "mcu_node":
            self.session_at.append(time.monotonic())

    def put_block(self, block: SampleBlock) -> None:
        if self.keep_blocks:
            super().put_block(block)
        self.windower.put_block(block)
        self.pipeline_alarms.extend(self.plausibility.check_block(block))

    def sessions(self) -> int:
        return sum(1 for d in self.diagnostics if d.kind == "mcu_node")

    def first_after(self, t: float) -> float | None:
        """Arrival of the first block of a session begun after ``t`` (an old one's may still come)."""
        begun = next((at for at in self.session_at if at > t), None)
        if begun is None:
            return None
        return next((at for at, b in self.blocks if at >= begun and float(b.t_mono[0]) > t), None)


async def _ticker(sink: PipelineSink) -> None:
    while True:
        sink.windower.close_due(time.monotonic(), time.time())
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _streaming(
    tmp_path: Path, sink: PipelineSink, time_sync_s: float = 1.0
) -> AsyncIterator[tuple[RunningSimNode, McuDriver]]:
    """A simulated node and the driver reading it into ``sink``, windows closed on time."""
    node_cfg = SimNodeConfig(node_id="MOTOR-7731", seed=3, flash=tmp_path / "flash.bin")
    async with run_sim_node(node_cfg, "test node") as node:
        driver = factory(INFO, McuConfig(port=node.path, time_sync_s=time_sync_s))
        async with running_driver(driver, sink):
            ticker = asyncio.create_task(_ticker(sink), name="test:ticker")
            try:
                yield node, driver
            finally:
                ticker.cancel()


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGUSR1], ids=["hello-lost", "with-hello"])
def test_resets_in_quick_succession_are_picked_up_from_the_data(tmp_path: Path, sig: signal.Signals) -> None:
    resets = 3

    async def main() -> tuple[list[float], PipelineSink, McuDriver]:
        sink = PipelineSink()
        back: list[float] = []
        async with _streaming(tmp_path, sink) as (node, driver):
            await asyncio.sleep(1.5)
            streams = dict(driver.streams)
            for k in range(resets):
                before = sink.sessions()
                t_reset = time.monotonic()
                os.kill(node.process.pid, sig)
                while sink.first_after(t_reset) is None and time.monotonic() - t_reset < 5:
                    await asyncio.sleep(0.01)
                first = sink.first_after(t_reset)
                assert first is not None, f"reset {k}: no data within 5 s"
                back.append(first - t_reset)
                assert sink.sessions() == before + 1
                assert all(driver.streams[n] is s for n, s in streams.items())  # same objects
                await asyncio.sleep(0.7)  # resets in quick succession
            await asyncio.sleep(1.2)  # longer than lost_after_s: a lost stream would show
        return back, sink, driver

    back, sink, driver = asyncio.run(main())
    print(f"\nMCU reset ({sig.name}): data back {min(back):.2f}-{max(back):.2f} s after the node restarted")
    assert max(back) < 2.0, back
    assert driver.counters["node_restarts"] == resets
    # The data is continuous in gateway time: no window went empty, no alarm on any channel.
    assert not sink.pipeline_alarms, Counter(
        (a.kind, a.stream.key if a.stream else "") for a in sink.pipeline_alarms
    )
    for name in ("motor_current", "vibration"):
        t, _ = sink.series(name)
        assert (t[1:] > t[:-1]).all()  # never backwards, even across the resets


def _stream_objects() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Stream)


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reconnect_many(tmp_path: Path, n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        sink = PipelineSink()
        sink.keep_blocks = False  # the test's own record must not be what grows
        async with _streaming(tmp_path, sink, time_sync_s=5.0) as (node, driver):
            out: dict[str, float] = {}
            for k in range(n + 1):
                if k == min(20, n // 2):  # past the first allocations
                    sink.diagnostics.clear()
                    gc.collect()
                    out.update(
                        streams_before=_stream_objects(),
                        windower_before=len(sink.windower._by_id),
                        plausibility_before=len(sink.plausibility._by_id),
                        rss_before=_rss_kib(),
                        objects_before=len(gc.get_objects()),
                    )
                    base = k
                want = sink.sessions() + 1
                os.kill(node.process.pid, signal.SIGUSR1 if k % 2 else signal.SIGUSR2)
                t0 = time.monotonic()
                while sink.sessions() < want:
                    assert time.monotonic() - t0 < 5, f"reconnect {k}: no new session"
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)  # a few batches through the pipeline
                sink.diagnostics = [d for d in sink.diagnostics if d.kind == "mcu_node"][-1:]
            gc.collect()
            out.update(
                reconnects=float(n - base),
                streams_after=_stream_objects(),
                windower_after=len(sink.windower._by_id),
                plausibility_after=len(sink.plausibility._by_id),
                rss_after=_rss_kib(),
                objects_after=len(gc.get_objects()),
                node_restarts=driver.counters["node_restarts"],
            )
            return out

    return asyncio.run(main())


def _check_bounded(out: dict[str, float]) -> None:
    print(
        f"\nMCU {out['reconnects']:.0f} reconnects: Stream objects {out['streams_before']:.0f} -> "
        f"{out['streams_after']:.0f}; windower ids {out['windower_before']:.0f} -> {out['windower_after']:.0f}; "
        f"plausibility ids {out['plausibility_before']:.0f} -> {out['plausibility_after']:.0f}; "
        f"gc objects {out['objects_before']:.0f} -> {out['objects_after']:.0f}; "
        f"RSS {out['rss_before']:.0f} -> {out['rss_after']:.0f} KiB"
    )
    assert out["streams_after"] <= out["streams_before"]
    assert out["windower_after"] == out["windower_before"]
    assert out["plausibility_after"] == out["plausibility_before"]
    # Allocator noise, not per-reconnect growth: a few hundred objects at most.
    assert out["objects_after"] - out["objects_before"] < 500


def test_reconnects_keep_the_pipeline_caches_bounded(tmp_path: Path) -> None:
    _check_bounded(_reconnect_many(tmp_path, 30))


@pytest.mark.campaign
def test_a_thousand_reconnects_keep_memory_bounded(tmp_path: Path) -> None:
    out = _reconnect_many(tmp_path, 1000)
    _check_bounded(out)
    assert out["rss_after"] - out["rss_before"] < 2048  # KiB; it grew ~1.2 MB per 1,000 before


def test_a_node_rebooted_while_the_gateway_was_paused_is_back_within_2_s(tmp_path: Path) -> None:
    async def main() -> tuple[float, PipelineSink, McuDriver]:
        sink = PipelineSink()
        async with _streaming(tmp_path, sink) as (node, driver):
            await asyncio.sleep(1.5)
            # The whole gateway stalls (the event loop blocked, as by a slow disk or a
            # stopped process); the node reboots meanwhile, its boot HELLO lost on the wire.
            time.sleep(1.0)
            os.kill(node.process.pid, signal.SIGUSR2)
            time.sleep(1.5)
            resumed = time.monotonic()
            while sink.first_after(resumed) is None:
                assert time.monotonic() - resumed < 5, "no data after the pause"
                await asyncio.sleep(0.01)
            back = (sink.first_after(resumed) or 0.0) - resumed
            await asyncio.sleep(3.0)  # past the windower's restore delay
        return back, sink, driver

    back, sink, driver = asyncio.run(main())
    print(f"\nMCU node rebooted during a 2.5 s gateway stall: data back {back:.2f} s after the stall")
    assert back < 2.0
    assert driver.counters["node_restarts"] == 1
    # The stall is a gap: at most one lost and one restored per stream, never a flapping series.
    per_stream = Counter((a.stream.key if a.stream else "", a.kind) for a in sink.pipeline_alarms)
    assert all(n == 1 for n in per_stream.values()), per_stream


# -- a failed self-test and its ending ------------------------------------------------------------------


def damage_firmware(flash: Path) -> None:
    """Flip one byte of the running image in the node's flash: its self-test fails at the next boot.

    Called again, it flips the byte back: the image the node was verified with, a repair.
    """
    data = bytearray(flash.read_bytes())
    at = data.find(b"SIMG")  # the image's header (the factory image: the only one written)
    assert at >= 0, "no image in the node's flash"
    data[at + 64] ^= 0xFF
    flash.write_bytes(bytes(data))


SELFTEST_FAULT = ("sensor_fault", {"cause": "selftest_failed"})
SELFTEST_ENDED = ("sensor_restored", {"after": "sensor_fault", "cause": "selftest_failed"})


def test_a_failed_self_test_ends_when_the_node_reports_healthy_again(tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"

    async def main() -> tuple[RecordingSink, McuDriver]:
        sink = RecordingSink(samples=False)
        async with run_sim_node(SimNodeConfig(flash=flash), "test node") as node:
            # A node whose self-test failed answers but sends no samples: not judged silent here.
            driver = factory(INFO, McuConfig(port=node.path, silence_s=60.0))
            async with running_driver(driver, sink):
                await until(lambda: driver.selftest_failed is False, "the first HELLO")
                damage_firmware(flash)
                os.kill(node.process.pid, signal.SIGUSR1)  # a reboot: the self-test fails
                await until(lambda: driver.selftest_failed is True, "the failed self-test")
                await asyncio.sleep(0.5)  # its ERROR report follows the HELLO: the same fault
                damage_firmware(flash)  # repaired
                os.kill(node.process.pid, signal.SIGUSR1)
                await until(lambda: driver.selftest_failed is False, "the healthy HELLO")
        return sink, driver

    sink, driver = asyncio.run(main())
    # The first HELLO ends a failed self-test a previous run may have left on (the pipeline sends
    # that ending only when one is on); the HELLO and the ERROR of the failed boot are one fault.
    assert [(a.kind.value, dict(a.detail)) for a in sink.alarms] == [
        SELFTEST_ENDED,
        SELFTEST_FAULT,
        SELFTEST_ENDED,
    ]
    first = next(iter(driver.streams.values()))
    assert all(a.stream is first for a in sink.alarms)  # the node's first channel, raise and ending


def test_a_self_test_failed_before_a_restart_ends_when_the_repaired_node_is_back(tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"
    source = {
        "name": INFO.name, "driver": "mcu", "subject": INFO.subject, "kind": "industrial",
        "simulate": {"node_id": "MOTOR-7731", "flash": str(flash)},
    }  # fmt: skip
    cfg = config(tmp_path, source)
    site = Site(tmp_path)

    def gateway_run(failed: bool) -> list[dict[str, Any]]:
        return site.restart(cfg, McuDriver, lambda d: d.selftest_failed is failed, "the node's HELLO")

    assert gateway_run(False) == []  # healthy, nothing on: nothing sent
    damage_firmware(flash)
    first = gateway_run(True)
    assert [(a["alarm"], a["detail"]) for a in first] == [SELFTEST_FAULT]
    assert first[0]["metric"] is not None  # on the node's first channel
    assert gateway_run(True) == []  # still failing after a restart: the same condition
    assert len(site.subject(INFO.subject).active) == 1
    damage_firmware(flash)  # repaired while the gateway was down
    after = gateway_run(False)
    assert [(a["alarm"], a["detail"]) for a in after] == [SELFTEST_ENDED]
    assert site.subject(INFO.subject).active == {}
