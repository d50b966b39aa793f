"""Shielded, time-bounded cleanup: closing a resource never holds a stop or a reconnect hostage.

A cleanup (a final flush, a goodbye message, closing a socket) must finish even when the task
awaiting it is cancelled, yet must not wait forever on a peer that is gone.  ``finish_shielded``
gives it until a deadline, lets a cancellation through only afterwards, and cancels the cleanup
itself once the deadline has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

_LOG = logging.getLogger(__name__)

# How long a cleanup that overran its deadline is given to react to its cancellation.
CANCEL_GRACE_S = 1.0


async def finish_shielded(task: asyncio.Future[Any], deadline_s: float, *, who: str) -> bool:
    """Wait for ``task`` up to ``deadline_s`` even if cancelled meanwhile; True if it finished.

    On time-out the task is cancelled (and given :data:`CANCEL_GRACE_S` to end) and an ERROR is
    logged; a failure of the task is logged too.  A cancellation received while waiting is
    re-raised once the wait is over.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    cancelled = False
    while not task.done() and (left := end - loop.time()) > 0:
        try:
            await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:
            cancelled = True  # finish the cleanup first, then let the cancellation through
    finished = task.done()
    if not finished:
        _LOG.error("%s: cleanup did not finish within %.1f s: abandoned", who, deadline_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    elif not task.cancelled() and task.exception() is not None:
        _LOG.error("%s: cleanup failed: %s", who, task.exception())
    if cancelled:
        raise asyncio.CancelledError
    return finished


def cancel_requested() -> bool:
    """True when the running task has a cancellation request that no ``CancelledError`` answered.

    Python 3.11's ``TaskGroup`` raises a child's error instead of the parent's ``CancelledError``
    when both happen in the same moment (CPython gh-116720): a broker closing the connection as the
    gateway stops.  A loop that retries on that error must ask this before retrying, or it runs on
    after its stop.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def run_shielded(cleanup: Coroutine[Any, Any, Any], deadline_s: float, *, who: str) -> bool:
    """Run ``cleanup`` as its own task and :func:`finish_shielded` it."""
    return await finish_shielded(asyncio.create_task(cleanup, name=f"cleanup:{who}"), deadline_s, who=who)


__all__ = ["CANCEL_GRACE_S", "cancel_requested", "finish_shielded", "run_shielded"]
