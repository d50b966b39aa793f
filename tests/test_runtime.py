"""The composed pipeline: samples in, sealed records in the real outbox, model scores and anomalies."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane, ModelResult, WindowRecord
from gateway.notify import Notifier
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.records import DiagnosticRecord, as_map, decode, encode
from gateway.runtime import LocalUplink, Pipeline, _stop_after_ready, run_gateway
from gateway.sample import MDC, Quality, SampleBlock, Stream
from gateway.supervisor import Group, Supervisor, Unit

SUBJECT = "MRN-777"
HR = Stream("strap", SUBJECT, "C0:FF:EE:00:11:22", MDC["MDC_ECG_HEART_RATE"], rate_hz=10.0)


class ThresholdModel:
    """A minimal WindowModel: flags a heart rate window whose mean exceeds a limit."""

    name = "hr_limit"

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.threads: set[str] = set()

    def applies_to(self, record: WindowRecord) -> bool:
        return record.kind == "medical"

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        self.threads.add(threading.current_thread().name)
        out = []
        for rec in records:
            mean = next(sf.features.get("mean", 0.0) for sf in rec.streams)
            out.append(
                ModelResult(
                    mean / self.limit,
                    mean > self.limit,
                    {"MDC_ECG_HEART_RATE.mean": 0.8, "MDC_ECG_HEART_RATE.std": 0.2},
                )
            )
        return out


def _block(t0: float, n: int, value: float) -> SampleBlock:
    t = t0 + np.arange(n) / 10.0
    return SampleBlock(HR, t, t + 1.7e9, np.full(n, value), np.zeros(n, np.uint8))


def test_pipeline_scores_windows_and_raises_explained_anomalies(tmp_path: Path) -> None:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 2.0, "hop_s": 1.0, "grace_s": 0.0},
        },
        "<test>",
        REGISTRY,
    )
    model = ThresholdModel(limit=100.0)

    async def main() -> list[tuple[Lane, dict[str, Any]]]:
        anon = Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", start_wall=1.7e9)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, models=[model])
            # A step of 22 /min is one a heart makes (the plausibility rules allow 25 /min/s): a
            # window holding an implausible value would not be judged by the model.
            pipeline.sink.put_block(_block(100.0, 20, 90.0))  # calm: 100.0 .. 101.9
            pipeline.sink.put_block(_block(102.0, 20, 112.0))  # tachycardia: 102.0 .. 103.9
            await pipeline.step(now_mono=104.0, now_wall=1.7e9 + 104.0)
            pipeline.sink.put_block(_block(104.0, 40, 90.0))  # calm again: 104.0 .. 107.9
            await pipeline.step(now_mono=108.0, now_wall=1.7e9 + 108.0)
            await outbox.flush()
            leased = await outbox.lease(100)
            return [(item.lane, as_map(decode(item.payload))) for item in leased]

    records = asyncio.run(main())
    assert model.threads
    assert "MainThread" not in model.threads  # scored off the event loop
    alarms = [r for lane, r in records if lane == Lane.ALARMS]
    features = [r for lane, r in records if lane == Lane.FEATURES]
    # One alarm for the episode (not one per overlapping window), then one when it clears.
    episode = [a for a in alarms if a["alarm"].startswith("anomaly")]
    assert [a["alarm"] for a in episode] == ["anomaly", "anomaly_cleared"]
    assert not [a for a in alarms if a["alarm"] == "sensor_fault"]  # the patient's, not the sensor's
    alarms = episode
    assert alarms[0]["contrib"] == {"MDC_ECG_HEART_RATE.mean": 0.8, "MDC_ECG_HEART_RATE.std": 0.2}
    assert alarms[0]["detail"]["model"] == "hr_limit"
    assert len(features) >= 2
    assert all("hr_limit" in f["scores"] for f in features)
    assert max(f["scores"]["hr_limit"] for f in features) >= 1.0
    assert SUBJECT not in repr(records)


def test_one_broken_source_does_not_stop_the_others(tmp_path: Path) -> None:
    sources = [
        # The sim refuses a pump on a medical source: a config error of this source alone.
        {"name": "bad", "driver": "sim", "subject": "bed-9", "profile": "pump", "device": "SN-0001"},
        {"name": "good", "driver": "sim", "subject": "bed-8", "profile": "patient", "device": "SN-0002"},
    ]
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 1.0, "hop_s": 0.5, "grace_s": 0.0},
            "sources": sources,
        },
        "<test>",
        REGISTRY,
    )
    out = io.StringIO()
    code = asyncio.run(
        run_gateway(config, REGISTRY, out=out, stop_after_s=3.0, install_signal_handlers=False)
    )
    assert code == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert any(rec["record"]["type"] == "features" for rec in lines)


def test_local_uplink_drops_an_undecodable_record_and_delivers_the_rest(tmp_path: Path) -> None:
    async def main() -> tuple[list[str], int, int]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            good = encode(DiagnosticRecord("x", 1.0))
            for payload in (good, b"\xff\x00garbage", good):
                outbox.submit(OutItem(Lane.DIAGNOSTICS, "diag/gateway", payload, 1.0))
            await outbox.flush()
            out = io.StringIO()
            uplink = LocalUplink(outbox, out)
            await uplink.drain(time.monotonic() + 5.0)
            left = (await outbox.stats()).queued
            return out.getvalue().splitlines(), uplink.corrupt, left

    lines, corrupt, left = asyncio.run(main())
    assert len(lines) == 2
    assert corrupt == 1
    assert left == 0


class SlowModel(ThresholdModel):
    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        time.sleep(0.5)
        return super().score_batch(records)


def test_windows_survive_a_cancelled_scoring_step(tmp_path: Path) -> None:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 2.0, "hop_s": 1.0, "grace_s": 0.0},
        },
        "<test>",
        REGISTRY,
    )

    async def main() -> int:
        anon = Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", start_wall=1.7e9)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, models=[SlowModel(limit=100.0)])
            pipeline.sink.put_block(_block(100.0, 40, 70.0))
            step = asyncio.create_task(
                pipeline.step(now_mono=104.0, now_wall=1.7e9 + 104.0), name="test:step"
            )
            await asyncio.sleep(0.1)
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step
            await outbox.flush()
            return len([i for i in await outbox.lease(100) if i.lane == Lane.FEATURES])

    assert asyncio.run(main()) >= 3  # cut by close_due, queued unscored rather than lost


def test_sensor_restore_hold_comes_from_the_pipeline_settings(tmp_path: Path) -> None:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 2.0, "hop_s": 1.0, "grace_s": 0.0, "sensor_restore_s": 1.0},
        },
        "<test>",
        REGISTRY,
    )
    off = int(Quality.SENSOR_OFF)

    def block(t0: float, n: int, quality: int) -> SampleBlock:
        t = t0 + np.arange(n) / 10.0
        return SampleBlock(HR, t, t + 1.7e9, np.full(n, 70.0), np.full(n, quality, np.uint8))

    async def main() -> tuple[float, list[str], list[str]]:
        anon = Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", start_wall=1.7e9)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, models=[])

            async def sensor_alarms() -> list[str]:
                await outbox.flush()
                items = [as_map(decode(i.payload)) for i in await outbox.lease(100) if i.lane == Lane.ALARMS]
                return [a["alarm"] for a in items if a["alarm"].startswith("sensor")]

            pipeline.sink.put_block(block(100.0, 5, off))  # faulty 100.0 .. 100.4
            pipeline.sink.put_block(block(100.5, 9, 0))  # good for 0.8 s: still held
            held = await sensor_alarms()
            pipeline.sink.put_block(block(101.4, 5, 0))  # 101.5 completes 1.0 s of good data
            return pipeline.windower.restore_after_s, held, await sensor_alarms()

    restore_s, held, after = asyncio.run(main())
    assert restore_s == 1.0
    assert held == ["sensor_fault"]
    assert after == ["sensor_restored"]


def test_a_run_duration_counts_from_ready_so_a_slow_start_does_not_eat_it() -> None:
    """``--duration``: the stop comes that long after READY, never before the units are up."""
    events: dict[str, float] = {}

    async def slow_start(started: Callable[[], None]) -> None:
        await asyncio.sleep(1.0)  # a slow open: longer than the whole duration below
        events["started"] = time.monotonic()
        started()
        await asyncio.Event().wait()

    async def nothing(_deadline: float) -> None:
        return None

    async def main() -> Supervisor:
        sup = Supervisor(Notifier(None), start_timeout_s=30.0)
        sup.add(Unit("source:slow", Group.SOURCES, slow_start))
        stopper = asyncio.create_task(_stop_after_ready(sup, 0.5, 30.0), name="test:stop-after")
        await sup.run(nothing, 1.0)
        events["stopped"] = time.monotonic()
        await stopper
        return sup

    sup = asyncio.run(main())
    assert sup.ready  # READY went out: the stop did not come during the start-up
    assert events["stopped"] - events["started"] >= 0.5  # the whole duration ran after it
