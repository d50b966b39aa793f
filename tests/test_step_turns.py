"""A step that closes many windows gives the event loop turns between them, and loses none if cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox
from gateway.runtime import Pipeline
from gateway.sample import Sample, Stream, industrial_metric

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


def test_a_step_of_many_windows_lets_the_loop_run_between_them(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "o.db")) as outbox:
            pipeline = await _pipeline(tmp_path, outbox)
            turns = 0
            stop = asyncio.Event()

            async def count() -> None:
                nonlocal turns
                while not stop.is_set():
                    turns += 1
                    await asyncio.sleep(0)

            counter = asyncio.create_task(count())
            await asyncio.sleep(0)
            turns = 0
            closed = await pipeline.step(110.6, 1.7e9 + 10.6)
            stop.set()
            await counter
            return closed, turns

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
