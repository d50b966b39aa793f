"""The shared shielded cleanup: finishes under cancellation, bounded by its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gateway.cleanup import cancel_requested, finish_shielded


def test_a_cancelled_waiter_lets_the_cleanup_finish_first() -> None:
    done: list[str] = []

    async def cleanup() -> None:
        await asyncio.sleep(0.2)
        done.append("cleaned")

    async def closer() -> None:
        await finish_shielded(asyncio.create_task(cleanup()), 5.0, who="test")
        done.append("after")  # never reached: the cancellation is re-raised

    async def main() -> None:
        task = asyncio.create_task(closer())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert done == ["cleaned"]


def test_a_hung_cleanup_is_abandoned_at_its_deadline(caplog: pytest.LogCaptureFixture) -> None:
    async def hung() -> None:
        await asyncio.Event().wait()

    async def main() -> tuple[bool, float, asyncio.Task[None]]:
        task = asyncio.create_task(hung())
        start = time.monotonic()
        finished = await finish_shielded(task, 0.3, who="test hang")
        return finished, time.monotonic() - start, task

    finished, took, task = asyncio.run(main())
    assert not finished
    assert task.cancelled()
    assert 0.3 <= took < 2.0
    assert "test hang: cleanup did not finish within 0.3 s" in caplog.text


def test_a_stop_that_a_task_group_swallowed_is_still_seen_by_cancel_requested() -> None:
    """The parent is cancelled in the moment a child fails: a retry loop must still stop."""
    seen: dict[str, object] = {}

    async def child() -> None:
        await asyncio.sleep(0)
        raise ValueError("connection lost")

    async def loop_body() -> None:
        for _ in range(3):  # a retry loop: one pass per "connection"
            try:
                async with asyncio.TaskGroup() as tg:
                    task = tg.create_task(child())
                    await asyncio.sleep(0)
                    # Both in one loop turn: the child fails, then our own stop arrives.
                    asyncio.get_running_loop().call_soon(tasks[0].cancel)
                    await task
            except BaseExceptionGroup as group:
                seen.setdefault("raised", type(group.exceptions[0]).__name__)
                seen.setdefault("requested", cancel_requested())
                if cancel_requested():
                    raise asyncio.CancelledError from None
            await asyncio.sleep(0.01)
        seen["ran_on"] = True

    async def main() -> None:
        tasks.append(asyncio.create_task(loop_body()))
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[0]

    tasks: list[asyncio.Task[None]] = []
    asyncio.run(main())
    assert tasks[0].cancelled()
    assert "ran_on" not in seen
    assert seen["requested"] is True


def test_cancel_requested_is_false_after_a_timeout_expired() -> None:
    async def main() -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1.0)
        return cancel_requested()

    assert asyncio.run(main()) is False
