"""A step that closes many windows gives the event loop turns between them, and loses none if cancelled;
it keeps the alarm ledger, the estimators' state and the legend off the loop, one write after the other."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from durability import syncs

from gateway.alarms.ledger import FILE_NAME as LEDGER_FILE
from gateway.alarms.ledger import AlarmLedger
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane
from gateway.estimation.stage import SAVE_EVERY_S
from gateway.estimation.stage import STATE_FILE as ESTIMATORS_FILE
from gateway.legend import FILE_NAME as LEGEND_FILE
from gateway.legend import Legend
from gateway.outbox import AsyncOutbox, Outbox
from gateway.privatefile import all_written, writer_of
from gateway.runtime import Pipeline
from gateway.sample import MDC, Quality, Sample, Stream, industrial_metric

SUBJECTS = 24


def _fill(pipeline: Pipeline) -> None:
    # 12 s of 1 Hz data for each machine: at 110.6 s one window each ([100, 110)) is due, all at once.
    for m in range(SUBJECTS):
        stream = Stream(
            "plc", f"line-{m:02d}", f"plc-{m:02d}", industrial_metric(f"L{m}/P", "bar"), "industrial", 1.0
        )
        for t in range(12):
            pipeline.sink.put(Sample(stream, 100.0 + t, 1.7e9 + t, 5.0 + t * 0.1))


async def _pipeline(tmp: Path, outbox: AsyncOutbox) -> Pipeline:
    config = validate(
        {"gateway": {"state_dir": str(tmp)}, "pipeline": {"window_s": 10.0, "hop_s": 10.0, "grace_s": 0.5}},
        "<test>",
        {},
    )
    pipeline = Pipeline(config, Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative"), outbox)
    _fill(pipeline)
    return pipeline


@dataclass
class _Loop:
    turns: int = 0  # another task got during the block
    held_s: float = 0.0  # the longest it waited past its sleep's end


@contextlib.asynccontextmanager
async def _watch(sleep_s: float = 0.0) -> AsyncIterator[_Loop]:
    """How the event loop served another task, sleeping ``sleep_s`` at a time, during the block."""
    seen = _Loop()
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(sleep_s)
            seen.turns += 1
            seen.held_s = max(seen.held_s, time.perf_counter() - t - sleep_s)

    watcher = asyncio.create_task(watch(), name="test-watch")
    await asyncio.sleep(0)
    seen.turns, seen.held_s = 0, 0.0
    try:
        yield seen
    finally:
        stop.set()
        await watcher


def test_a_step_of_many_windows_lets_the_loop_run_between_them(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "o.db")) as outbox:
            pipeline = await _pipeline(tmp_path, outbox)
            async with _watch() as loop:
                closed = await pipeline.step(110.6, 1.7e9 + 10.6)
            return closed, loop.turns

    closed, turns = asyncio.run(main())
    assert closed >= SUBJECTS
    assert turns >= closed // 4 - 1, (closed, turns)


def test_a_cancelled_step_loses_no_window(tmp_path: Path) -> None:
    async def main(cancel_after_turns: int | None) -> tuple[int, int, int]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / f"o{cancel_after_turns}.db")) as outbox:
            pipeline = await _pipeline(tmp_path, outbox)
            task = asyncio.create_task(pipeline.step(110.6, 1.7e9 + 10.6))
            closed = -1
            if cancel_after_turns is not None:
                for _ in range(cancel_after_turns):
                    await asyncio.sleep(0)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                closed = await task
            after_cancel = pipeline.submitted[Lane.FEATURES]
            await pipeline.step(110.6, 1.7e9 + 10.6)  # the next step cuts what was not reached
            return closed, after_cancel, pipeline.submitted[Lane.FEATURES]

    closed, _, queued = asyncio.run(main(None))
    assert closed >= SUBJECTS
    assert queued == closed
    # Cancelled while cutting (first turn) and while sealing (a few turns on): every window once.
    for turns in (1, 5):
        cancelled, after_cancel, queued = asyncio.run(main(turns))
        assert cancelled == -1
        assert 0 < after_cancel <= closed, (turns, after_cancel)
        assert queued == closed, (turns, queued)


def _probe_off(tmp: Path, outbox: AsyncOutbox) -> tuple[Pipeline, Stream]:
    """A pipeline whose oximeter's probe came off: a sensor fault raised, the alarm ledger not yet kept."""
    config = validate(
        {"gateway": {"state_dir": str(tmp)}, "pipeline": {"sensor_restore_s": 0.0}}, "<test>", {}
    )
    pipeline = Pipeline(config, Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative"), outbox)
    stream = Stream("oxi", "bed-1", "AA:BB:CC:DD:EE:FF", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
    pipeline.sink.put(Sample(stream, time.monotonic(), time.time(), 97.0))
    pipeline.sink.put(Sample(stream, time.monotonic(), time.time(), math.nan, Quality.SENSOR_OFF))
    assert pipeline.submitted[Lane.ALARMS] == 1
    return pipeline, stream


def _kept(tmp: Path) -> list[str]:
    return sorted(e.kind.value for e in AlarmLedger(tmp / LEDGER_FILE, {}).entries())


def test_a_step_lets_the_loop_run_while_it_keeps_the_alarm_ledger(tmp_path: Path) -> None:
    # Its write is fsynced twice (file and directory): on the loop, every alarm waited for the disk.
    async def main() -> int:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "o.db")) as outbox:
            pipeline, _ = _probe_off(tmp_path, outbox)
            async with _watch() as loop:
                await pipeline.step()  # nothing to cut or seal: only the ledger to keep
            return loop.turns

    assert asyncio.run(main()) >= 1
    assert _kept(tmp_path) == ["sensor_fault"]  # and kept once the step returned


def test_a_ledger_write_a_cancelled_step_left_running_is_not_overtaken(tmp_path: Path) -> None:
    async def main(cancel_after_turns: int) -> list[str]:
        state = tmp_path / str(cancel_after_turns)
        async with AsyncOutbox(lambda: Outbox(state / "o.db")) as outbox:
            pipeline, stream = _probe_off(state, outbox)
            task = asyncio.create_task(pipeline.step(), name="test-step")
            for _ in range(cancel_after_turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pipeline.sink.put(Sample(stream, time.monotonic(), time.time(), 97.0))  # restored at once
            assert pipeline.submitted[Lane.ALARMS] == 2
            await pipeline.step()
            assert not any(p.name.endswith(".tmp") for p in state.iterdir())
            return _kept(state)

    # Cancelled before the write, while it runs, and after it: the file holds the latest state.
    for turns in (0, 1, 2, 5):
        assert asyncio.run(main(turns)) == [], turns


def test_a_condition_raised_and_ended_between_two_steps_leaves_the_ledger_unwritten(tmp_path: Path) -> None:
    # A flapping probe changes the ledger twice per flap: the file needs no fsync when it ends as it was.
    async def main() -> tuple[int, int, list[str]]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "o.db")) as outbox:
            pipeline, stream = _probe_off(tmp_path, outbox)
            pipeline.sink.put(Sample(stream, time.monotonic(), time.time(), 97.0))  # restored at once
            await pipeline.step()
            kept = (tmp_path / LEDGER_FILE).stat().st_ino
            pipeline.sink.put(Sample(stream, time.monotonic(), time.time(), math.nan, Quality.SENSOR_OFF))
            pipeline.sink.put(Sample(stream, time.monotonic(), time.time(), 97.0))
            assert pipeline.submitted[Lane.ALARMS] == 4
            await pipeline.step()
            unchanged = (tmp_path / LEDGER_FILE).stat().st_ino
            pipeline.sink.put(Sample(stream, time.monotonic(), time.time(), math.nan, Quality.SENSOR_OFF))
            await pipeline.step()  # a condition on now: written
            return kept, unchanged, _kept(tmp_path)

    kept, unchanged, on = asyncio.run(main())
    assert unchanged == kept  # not replaced (each write renames a new file over it)
    assert on == ["sensor_fault"]


SLOW_SYNC_S = 0.3  # each fsync on a slow disk (an SD card at its worst took 166 ms, at load)


def test_periodic_state_saves_on_a_slow_disk_do_not_hold_the_loop_and_the_last_state_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The estimators' state was written with its two fsyncs on the loop every SAVE_EVERY_S, and the
    # legend at every new identity: every alarm waited for the disk meanwhile.
    strap = Stream("strap", "bed-8", "C0:FF:EE:00:42:42", MDC["MDC_ECG_HEART_RATE"], rate_hz=1.0)
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "estimators": {
                "fusion": [{"subject": "bed-8", "name": "hr", "sources": [{"metric": "MDC_ECG_HEART_RATE"}]}]
            },
        },
        "<test>",
        {},
    )
    saves = 4

    async def main() -> tuple[float, float, float]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "o.db")) as outbox:
            anon = Anonymizer(
                Pseudonymizer(b"k" * 32), time_mode="relative", legend=Legend(tmp_path / LEGEND_FILE)
            )
            pipeline = Pipeline(config, anon, outbox)
            t0 = time.monotonic()
            with syncs(monkeypatch, SLOW_SYNC_S) as synced:
                async with _watch(0.005) as loop:
                    for k in range(1, saves + 1):  # each step saves: the first write still runs at the next
                        now = t0 + k * (SAVE_EVERY_S + 1.0)
                        pipeline.sink.put(Sample(strap, now - 0.5, 1.7e9 + now - t0, 70.0 + k))
                        await pipeline.step(now, 1.7e9 + now - t0)
                    for k in range(1, saves + 1):  # new devices at once (a ward's wearables at the start)
                        anon.legend.note("device", f"SN-{k}", "strap")
                    stop_wall = time.time()
                    await pipeline.save_estimators()  # as at the stop: returns once it is on disk
                    state = json.loads((tmp_path / ESTIMATORS_FILE).read_text(encoding="utf-8"))
                    await all_written()
            kept = [p.name for p in synced]
            assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
            # Each state asked for is written, or replaced by a newer one before its write began.
            assert 1 <= kept.count(f".{ESTIMATORS_FILE}.tmp") <= saves + 1, kept
            # The strap's own identities at its first record, then the four in one go: at most the
            # first of them written on its own, the others in one write after it.
            assert 1 <= kept.count(f".{LEGEND_FILE}.tmp") <= 3, kept
            return loop.held_s, stop_wall, float(state["t_wall"])

    held, stop_wall, saved_wall = asyncio.run(main())
    assert held < SLOW_SYNC_S, held  # the loop ran on while every write waited ≥ 2 syncs
    assert saved_wall >= stop_wall  # the stop's state, not one of the periodic ones behind it
    legend = json.loads((tmp_path / LEGEND_FILE).read_text(encoding="utf-8"))
    assert {row[1] for row in legend} >= {f"SN-{k}" for k in range(1, saves + 1)}


def test_a_files_writes_keep_their_order_from_threads_and_cancelled_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    writer = writer_of(path)
    assert writer_of(tmp_path / "." / "state.json") is writer  # one writer per file

    async def main() -> list[bytes]:
        seen: list[bytes] = []
        with syncs(monkeypatch, SLOW_SYNC_S):
            first = asyncio.create_task(writer.write(b"1"), name="test-write-1")
            await asyncio.sleep(SLOW_SYNC_S / 2)  # the first write is in its file's fsync
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            # Asked for from another thread, then from the loop: neither overtakes the one under way.
            threading.Thread(target=lambda: writer.submit(b"2"), name="test-writer").start()
            await asyncio.sleep(0.01)
            seen.append(path.read_bytes() if path.exists() else b"")
            await writer.write(b"3")
            seen.append(path.read_bytes())
        return seen

    during, after = asyncio.run(main())
    assert during == b""  # nothing renamed over it while the first write synced
    assert after == b"3"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_state_file_that_cannot_be_written_is_told_once_and_its_recovery_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state directory should be")
    legend = Legend(blocked / LEGEND_FILE)
    caplog.clear()  # its reading failed too
    with caplog.at_level(logging.INFO, logger="gateway.legend"):
        for device in ("SN-1", "SN-2"):
            legend.note("device", device)
            assert writer_of(blocked / LEGEND_FILE).wait(30)
        failed = [r.getMessage() for r in caplog.records]
        blocked.unlink()
        legend.note("device", "SN-3")
        assert writer_of(blocked / LEGEND_FILE).wait(30)
    told = [r.getMessage() for r in caplog.records]
    assert len(failed) == 1, failed
    assert failed[0].startswith(f"legend {blocked / LEGEND_FILE}: cannot write: ")
    assert failed[0].endswith(": the legend misses new identities")
    assert told[1:] == [f"legend {blocked / LEGEND_FILE}: written again"]
    assert [row[1] for row in json.loads((blocked / LEGEND_FILE).read_text())] == ["SN-1", "SN-2", "SN-3"]
