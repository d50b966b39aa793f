"""The shared shielded cleanup: finishes under cancellation, bounded by its deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.cleanup import finish_shielded


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
