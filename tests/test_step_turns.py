"""A step that closes many windows gives the event loop turns between them, and loses none if cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox
from gateway.runtime import Pipeline
from gateway.sample import Sample, Stream, industrial_metric

SUBJECTS = 24


def _fill(pipeline: Pipeline) -> None:
    # One window (10 s, hop 10 s) of 1 Hz data for each machine, all due at once.
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
            closed = await pipeline.step(200.0, 1.7e9 + 100)
            stop.set()
            await counter
            return closed, turns

    closed, turns = asyncio.run(main())
    assert closed >= SUBJECTS
    assert turns >= closed // 4 - 1, (closed, turns)


def test_a_cancelled_step_still_queues_every_window_it_closed(tmp_path: Path) -> None:
    async def main(cancel: bool) -> tuple[int, int, bool]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / f"o{cancel}.db")) as outbox:
            pipeline = await _pipeline(tmp_path, outbox)
            task = asyncio.create_task(pipeline.step(200.0, 1.7e9 + 100))
            await asyncio.sleep(0)  # the step runs to its first turn between windows
            queued_then = pipeline.submitted[Lane.FEATURES]
            if cancel:
                task.cancel()
            try:
                closed = await task
            except asyncio.CancelledError:
                closed = -1
            mid_step = 0 < queued_then < pipeline.submitted[Lane.FEATURES]
            return closed, pipeline.submitted[Lane.FEATURES], mid_step

    closed, queued, _ = asyncio.run(main(cancel=False))
    assert closed >= SUBJECTS
    assert queued == closed
    cancelled, queued, mid_step = asyncio.run(main(cancel=True))
    assert cancelled == -1
    assert mid_step  # cancelled with windows still to seal ...
    assert queued == closed  # ... and every one was queued all the same
