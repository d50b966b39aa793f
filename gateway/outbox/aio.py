"""The event-loop side of the outbox: group commit of submissions, blocking calls in threads, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

from gateway.cleanup import finish_shielded
from gateway.contracts import Lane
from gateway.errors import EdgetwinError
from gateway.outbox.records import Leased, OutboxStats, OutItem
from gateway.outbox.store import Outbox

_LOG = logging.getLogger("gateway.outbox")


class AsyncOutbox:
    """The event-loop side of the outbox: batches submissions and runs blocking calls in threads."""

    def __init__(
        self,
        outbox_factory: Callable[[], Outbox],
        *,
        flush_interval_s: float = 0.05,
        flush_batch: int = 512,
        close_timeout_s: float = 5.0,
        max_pending: int = 200_000,
        expire_interval_s: float = 60.0,
    ) -> None:
        self._factory = outbox_factory
        self._interval = flush_interval_s
        self._expire_interval = expire_interval_s
        self._flush_batch = flush_batch
        self._close_timeout = close_timeout_s
        self._max_pending = max_pending  # in memory, not yet durable: bounded like any queue
        self._outbox: Outbox | None = None
        self._pending: list[OutItem] = []
        self._inflight = 0
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._entered = False
        self._closing = False
        self._stopping = False
        self._last_beat = time.monotonic()
        self._failing = False
        self._refusing = False
        self._pending_dropped = 0
        self._committed = asyncio.Event()

    @property
    def pending_dropped(self) -> int:
        """Submissions refused because ``max_pending`` records were waiting to be written."""
        return self._pending_dropped

    @property
    def last_beat(self) -> float:
        """``time.monotonic()`` of the flusher's last completed turn; stalls while writes fail."""
        return self._last_beat

    @property
    def pending(self) -> int:
        """Submitted records not yet committed."""
        return len(self._pending) + self._inflight

    @property
    def outbox(self) -> Outbox:
        """The synchronous outbox this owns (only inside ``async with``)."""
        if self._outbox is None or self._closing:
            raise RuntimeError("AsyncOutbox: used outside its 'async with' block")
        return self._outbox

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("AsyncOutbox: already entered; it is not re-entrant")
        self._entered = True
        self._outbox = await asyncio.to_thread(self._factory)
        self._last_beat = time.monotonic()
        self._flusher = asyncio.create_task(
            self._run_flusher(), name=f"outbox-flusher:{self._outbox.path.name}"
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._outbox is None or self._closing:
            return
        self._closing = True
        shutdown = asyncio.create_task(self._shutdown(), name=f"outbox-shutdown:{self._outbox.path.name}")
        await self._await_shielded(shutdown)

    def submit(self, item: OutItem) -> None:
        """Queue a record for the next group commit (no await: called by stages on the loop)."""
        if self._closing:
            raise RuntimeError("AsyncOutbox: submit() after close: the record would be lost")
        if len(self._pending) >= self._max_pending and item.lane is not Lane.ALARMS:
            # Writes are failing or far behind; keep memory bounded, alarms excepted.
            self._pending_dropped += 1
            if not self._refusing:
                self._refusing = True
                _LOG.warning(
                    "outbox: %d records waiting to be written, refusing new %s records until it drains",
                    len(self._pending),
                    item.lane.name.lower(),
                )
            return
        self._pending.append(item)
        # An alarm is committed at once rather than at the next interval: it must not wait.
        if item.lane is Lane.ALARMS or len(self._pending) >= self._flush_batch:
            self._wake.set()

    async def flush(self) -> None:
        """Commit everything submitted so far."""
        await self._flush_pending()

    async def lease(self, n: int, *, after_id: int = 0, through_id: int | None = None) -> list[Leased]:
        """See :meth:`Outbox.lease`."""
        return await asyncio.to_thread(self.outbox.lease, n, after_id=after_id, through_id=through_id)

    async def last_id(self) -> int:
        """See :meth:`Outbox.last_id`."""
        return await asyncio.to_thread(self.outbox.last_id)

    async def wait_committed(self, within_s: float) -> bool:
        """Wait until records were committed since the last call, at most ``within_s``; True if so."""
        if not self._committed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await self._committed.wait()
        was = self._committed.is_set()
        self._committed.clear()
        return was

    async def ack(self, ids: Iterable[int]) -> None:
        """See :meth:`Outbox.ack`."""
        await asyncio.to_thread(self.outbox.ack, list(ids))

    async def release(self, ids: Iterable[int]) -> None:
        """See :meth:`Outbox.release`."""
        await asyncio.to_thread(self.outbox.release, list(ids))

    async def expire(self, now_wall: float | None = None) -> int:
        """See :meth:`Outbox.expire`."""
        return await asyncio.to_thread(self.outbox.expire, now_wall)

    async def stats(self) -> OutboxStats:
        """See :meth:`Outbox.stats`."""
        return await asyncio.to_thread(self.outbox.stats)

    # --- internals -----------------------------------------------------------------------------------

    async def _run_flusher(self) -> None:
        next_expiry = time.monotonic() + self._expire_interval
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    break  # the final flush belongs to __aexit__
                try:
                    await self._flush_pending()
                    if time.monotonic() >= next_expiry and self._outbox is not None:
                        next_expiry = time.monotonic() + self._expire_interval
                        await asyncio.to_thread(self._outbox.expire)
                except EdgetwinError as exc:
                    # The batch is back in the pending list; the beat stalls so the watchdog sees it.
                    if not self._failing:
                        self._failing = True
                        _LOG.warning("outbox: cannot write %d pending record(s): %s", self.pending, exc)
                    else:
                        _LOG.debug("outbox: still cannot write: %s", exc)
                    continue
                if self._failing:
                    self._failing = False
                    _LOG.info("outbox: writing again")
                self._last_beat = time.monotonic()
        except Exception:
            _LOG.exception("outbox: the flusher stopped: records are kept in memory until shutdown")
            raise

    async def _flush_pending(self) -> None:
        async with self._flush_lock:
            if not self._pending:
                return
            outbox = self._outbox
            if outbox is None:
                raise RuntimeError("AsyncOutbox: flush() before 'async with'")
            batch, self._pending = self._pending, []
            self._inflight = len(batch)
            loop = asyncio.get_running_loop()
            write = loop.run_in_executor(None, outbox.put_many, batch)
            try:
                # Shielded: a cancelled caller must not lose track of a write already under way.
                await asyncio.shield(write)
            finally:
                self._inflight = 0
                if not write.done():
                    write.add_done_callback(lambda w: self._requeue_if_failed(w, batch))
                else:
                    self._requeue_if_failed(write, batch)
            if self._refusing and len(self._pending) < self._max_pending:
                self._refusing = False
                _LOG.info(
                    "outbox: pending records drained; accepting again (%d refused in all)",
                    self._pending_dropped,
                )

    def _requeue_if_failed(self, write: asyncio.Future[None], batch: list[OutItem]) -> None:
        if write.cancelled() or write.exception() is not None:
            self._pending[:0] = batch  # first in line again, order kept
        else:
            self._committed.set()

    async def _shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        try:
            if self._flusher is not None:
                await asyncio.wait({self._flusher})
                if not self._flusher.cancelled():
                    self._flusher.exception()  # already logged by the flusher; the final flush still runs
            try:
                await self._flush_pending()
            except Exception as exc:  # noqa: BLE001 - whatever the cause, the outbox is still closed
                _LOG.error("outbox: final flush failed: %d record(s) not written: %s", self.pending, exc)
        finally:
            if self._outbox is not None:
                await asyncio.to_thread(self._outbox.close)

    async def _await_shielded(self, cleanup: asyncio.Task[None]) -> None:
        """Wait for ``cleanup`` up to the close deadline, even if this task is cancelled meanwhile."""
        if not await finish_shielded(cleanup, self._close_timeout, who="outbox: closing"):
            _LOG.error("outbox: %d record(s) not written when closing was abandoned are lost", self.pending)
