"""A step that closes many windows gives the event loop turns between them, and loses none if cancelled;
it keeps the alarm ledger off the loop, one write after the other."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.alarms.ledger import FILE_NAME as LEDGER_FILE
from gateway.alarms.ledger import AlarmLedger
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox
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


@contextlib.asynccontextmanager
async def _turns() -> AsyncIterator[list[int]]:
    """How many turns another task got on the event loop during the block (in the list's one item)."""
    turns = [0]
    stop = asyncio.Event()

    async def count() -> None:
        while not stop.is_set():
            turns[0] += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count(), name="test-turns")
    await asyncio.sleep(0)
    turns[0] = 0
    try:
        yield turns
    finally:
        stop.set()
        await counter


def test_a_step_of_many_windows_lets_the_loop_run_between_them(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "o.db")) as outbox:
            pipeline = await _pipeline(tmp_path, outbox)
            async with _turns() as turns:
                closed = await pipeline.step(110.6, 1.7e9 + 10.6)
            return closed, turns[0]

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
            async with _turns() as turns:
                await pipeline.step()  # nothing to cut or seal: only the ledger to keep
            return turns[0]

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
