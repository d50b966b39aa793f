"""The event-loop side of the outbox: group commit of submissions, blocking calls in threads, shutdown.

Nothing here waits on a commit from the event loop: ``submit`` and ``release`` return at once,
every call that touches SQLite runs in a worker thread, and the drop counters and health are
read without the store's lock.  The records waiting for the next group commit are bounded in
bytes; a full disk or failing writes degrade the outbox (alarms kept, lower lanes refused and
counted) rather than stop it, and the flusher's heartbeat goes on meanwhile so that a watchdog
does not restart a gateway that can do nothing better than wait for space.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

from gateway.backoff import Backoff
from gateway.cleanup import finish_shielded
from gateway.contracts import Lane
from gateway.errors import ConfigError, EdgetwinError
from gateway.outbox.records import DropReason, DropReport, Leased, MiB, OutboxStats, OutItem, record_size
from gateway.outbox.store import Outbox

_LOG = logging.getLogger("gateway.outbox")

DEFAULT_MAX_PENDING_BYTES = 32 * MiB
_SPACE_CHECK_EVERY_S = 1.0
_STATE_SAVE_EVERY_S = 1.0
_MAX_COMMIT_BYTES = 512 * 1024


class AsyncOutbox:
    """The event-loop side of the outbox: batches submissions and runs blocking calls in threads."""

    def __init__(
        self,
        outbox_factory: Callable[[], Outbox],
        *,
        flush_interval_s: float = 0.05,
        flush_batch: int = 512,
        close_timeout_s: float = 5.0,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        expire_interval_s: float = 60.0,
        open_retry_s: float = 60.0,
    ) -> None:
        self._factory = outbox_factory
        self._open_retry_s = open_retry_s
        self._interval = flush_interval_s
        self._expire_interval = expire_interval_s
        self._flush_batch = flush_batch
        self._close_timeout = close_timeout_s
        # In memory, not yet durable: bounded in bytes like any queue.  Alarms may use twice as
        # much (the spill kept while the disk refuses them), and are refused, counted, only then.
        self._max_pending_bytes = max_pending_bytes
        self._outbox: Outbox | None = None
        self._pending: list[OutItem] = []
        self._pending_bytes = 0
        self._inflight = 0
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._entered = False
        self._closing = False
        self._stopping = False
        self._last_beat = time.monotonic()
        self._failing: str | None = None
        self._refusing: set[tuple[Lane, DropReason]] = set()
        self._refused: dict[tuple[Lane, DropReason], int] = {}  # counted here, not yet in the store
        self._committed = asyncio.Event()
        self._alarm_taker: Callable[[list[Leased]], None] | None = None

    @property
    def last_beat(self) -> float:
        """``time.monotonic()`` of the flusher's last turn; it beats on while degraded."""
        return self._last_beat

    @property
    def pending(self) -> int:
        """Submitted records not yet committed."""
        return len(self._pending) + self._inflight

    @property
    def pending_bytes(self) -> int:
        """Bytes of the submitted records waiting for the next commit."""
        return self._pending_bytes

    @property
    def outbox(self) -> Outbox:
        """The synchronous outbox this owns (only inside ``async with``)."""
        if self._outbox is None or self._closing:
            raise RuntimeError("AsyncOutbox: used outside its 'async with' block")
        return self._outbox

    def health(self) -> str | None:
        """Why the outbox is degraded (disk full, writes failing), or None when it is not."""
        outbox = self._outbox
        degraded = None if outbox is None else outbox.degraded
        return degraded or self._failing

    def drop_counts(self) -> dict[str, dict[str, int]]:
        """Every drop so far by lane name and reason (persisted ones and those not yet written)."""
        outbox = self._outbox
        out = {lane: dict(reasons) for lane, reasons in (outbox.drop_counts() if outbox else {}).items()}
        for (lane, reason), n in self._refused.items():
            by_reason = out.setdefault(lane.name.lower(), {})
            by_reason[str(reason)] = by_reason.get(str(reason), 0) + n
        return out

    def report(self) -> DropReport:
        """Every loss so far, the degraded state and the last loss: one source for every report (never waits)."""
        outbox = self._outbox
        return DropReport(
            self.drop_counts(),
            self.health(),
            None if outbox is None else outbox.last_drop,
            0 if outbox is None else outbox.epoch,
            0 if outbox is None else len(outbox.losses),
        )

    def counters(self) -> dict[str, float | str]:
        """Drop counters and health as flat diagnostic counters (never waits).

        Keys and text values are plain tokens of at most 32 characters, the only form the
        anonymizer lets out: a counter it refused would hide the very loss it reports.
        """
        report = self.report()
        out: dict[str, float | str] = {
            f"drop_{lane}_{reason}": n
            for lane, reasons in report.drops.items()
            for reason, n in reasons.items()
        }
        out["outbox_pending_bytes"] = self._pending_bytes
        out["outbox_degraded"] = 0 if report.degraded is None else 1
        if report.degraded_token is not None:
            out["outbox_degraded_why"] = report.degraded_token
        outbox = self._outbox
        if outbox is not None:
            out["outbox_epoch"] = report.epoch
            losses = outbox.losses
            out["outbox_losses"] = report.recoveries
            if losses:
                last = losses[-1]
                out["outbox_last_loss_from_epoch"] = last.prev_epoch
                out["outbox_last_loss_up_to_id"] = last.last_id
                out["outbox_last_loss_count"] = sum(last.lost.values())
        if report.last is not None:
            out["outbox_last_drop_lane"] = report.last.lane
            out["outbox_last_drop_reason"] = report.last.reason
            out["outbox_last_drop_count"] = report.last.n
            # How long ago rather than when: a wall-clock time would pass the anonymizer's time rules by.
            out["outbox_last_drop_age_s"] = round(max(0.0, time.time() - report.last.t_wall), 1)
        return out

    def dropped_total(self) -> int:
        """All drops of every lane and reason."""
        return self.report().total

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("AsyncOutbox: already entered; it is not re-entrant")
        self._entered = True
        self._outbox = await self._open()
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
        if not await finish_shielded(shutdown, self._close_timeout, who="outbox: closing"):
            _LOG.error("outbox: %d record(s) not written when closing was abandoned are lost", self.pending)

    async def _open(self) -> Outbox:
        """Open the store; a failure that may clear by itself (I/O errors) is retried for a while."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._open_retry_s
        backoff = Backoff(0.5, 5.0)
        while True:
            try:
                return await asyncio.to_thread(self._factory)
            except ConfigError:
                raise
            except (EdgetwinError, OSError) as exc:
                delay = backoff.next()
                if loop.time() + delay > give_up:
                    raise
                if backoff.failures == 1:
                    _LOG.error("outbox: cannot open: %s: retrying for up to %.0f s", exc, self._open_retry_s)
                else:
                    _LOG.debug("outbox: still cannot open: %s", exc)
                await asyncio.sleep(delay)

    def submit(self, item: OutItem) -> bool:
        """Queue a record for the next group commit (no await: called by stages on the loop); False if refused (counted)."""
        if self._closing:
            raise RuntimeError("AsyncOutbox: submit() after close: the record would be lost")
        size = record_size(item)
        if item.lane is not Lane.ALARMS:
            outbox = self._outbox
            if outbox is not None and outbox.degraded is not None:
                self._refuse(item.lane, DropReason.DISK_FULL, 1)
                return False
            if self._pending_bytes + size > self._max_pending_bytes:
                self._refuse(item.lane, DropReason.QUEUE_FULL, 1)
                return False
        elif self._pending_bytes + size > 2 * self._max_pending_bytes:
            self._refuse(item.lane, DropReason.QUEUE_FULL, 1)
            return False
        self._pending.append(item)
        self._pending_bytes += size
        # An alarm is committed at once rather than at the next interval: it must not wait.
        if item.lane is Lane.ALARMS or len(self._pending) >= self._flush_batch:
            self._wake.set()
        return True

    def count_drop(self, lane: Lane, reason: DropReason, n: int = 1) -> None:
        """Count records dropped before reaching the outbox (e.g. ``OVERSIZE``); never waits.

        Counted at once in :meth:`drop_counts`, persisted with the next group commit.
        """
        if n > 0:
            key = (lane, reason)
            self._refused[key] = self._refused.get(key, 0) + n
            self._wake.set()

    def hand_alarms_to(self, taker: Callable[[list[Leased]], None] | None) -> None:
        """Lease each commit's alarms in the commit's own hold of the store's lock and hand them to ``taker`` (on the loop).

        So an alarm waits for no lease behind the next commit of other records.  Alarms are handed
        only when every older one is leased already (else a lease takes them, in order); what
        arrives when no taker is set any more is released.  One taker at a time (the uplink's
        connection); ``None`` stops the handing.
        """
        self._alarm_taker = taker

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
        """See :meth:`Outbox.release` (never waits for the store's lock)."""
        self.outbox.release(list(ids))

    async def dead_letter(self, ids: Iterable[int], reason: str) -> int:
        """See :meth:`Outbox.dead_letter`."""
        return await asyncio.to_thread(self.outbox.dead_letter, list(ids), reason)

    async def restamp(self) -> float:
        """See :meth:`Outbox.restamp` (records still waiting here are stamped when committed)."""
        return await asyncio.to_thread(self.outbox.restamp)

    async def expire(self, now_wall: float | None = None) -> int:
        """See :meth:`Outbox.expire`."""
        return await asyncio.to_thread(self.outbox.expire, now_wall)

    async def stats(self) -> OutboxStats:
        """See :meth:`Outbox.stats`."""
        return await asyncio.to_thread(self.outbox.stats)

    # --- internals -----------------------------------------------------------------------------------

    def _refuse(self, lane: Lane, reason: DropReason, n: int) -> None:
        key = (lane, reason)
        self._refused[key] = self._refused.get(key, 0) + n
        if key not in self._refusing:
            self._refusing.add(key)
            why = "the disk is full" if reason is DropReason.DISK_FULL else "the in-memory queue is full"
            log = _LOG.critical if lane is Lane.ALARMS else _LOG.warning
            log(
                "outbox: refusing %s records: %s (%d bytes waiting to be written): counted as %s drops",
                lane.name.lower(),
                why,
                self._pending_bytes,
                reason,
            )
        self._wake.set()  # the counters reach the store with the next flush

    def _accepting_again(self) -> None:
        outbox = self._outbox
        degraded = outbox is not None and outbox.degraded is not None
        for key in list(self._refusing):
            lane, reason = key
            full = reason is DropReason.DISK_FULL and degraded
            if full or self._pending_bytes > self._max_pending_bytes // 2:
                continue
            self._refusing.discard(key)
            _LOG.info("outbox: accepting %s records again", lane.name.lower())

    async def _run_flusher(self) -> None:
        loop = asyncio.get_running_loop()
        next_expiry = loop.time() + self._expire_interval
        next_space = next_state = loop.time()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
                self._wake.clear()
                # A sign of life, whatever the disk says: degraded is shown in the status, and a
                # watchdog restart would not bring space back, only lose what is in memory.
                self._last_beat = time.monotonic()
                if self._stopping:
                    break  # the final flush belongs to __aexit__
                outbox = self._outbox
                if outbox is None:
                    continue
                try:
                    if outbox.degraded is not None and loop.time() >= next_space:
                        next_space = loop.time() + _SPACE_CHECK_EVERY_S
                        await asyncio.to_thread(outbox.check_space)
                    await self._flush_pending()
                    if loop.time() >= next_expiry:
                        next_expiry = loop.time() + self._expire_interval
                        await asyncio.to_thread(outbox.expire)
                    if loop.time() >= next_state:
                        next_state = loop.time() + _STATE_SAVE_EVERY_S
                        await asyncio.to_thread(outbox.save_state)
                except EdgetwinError as exc:
                    # The batch is back in the pending list, alarms first; retried next turn.
                    if self._failing is None:
                        self._failing = f"cannot write: {exc}"
                        _LOG.error("outbox: cannot write %d pending record(s): %s", self.pending, exc)
                    else:
                        _LOG.debug("outbox: still cannot write: %s", exc)
                    continue
                if self._failing is not None:
                    self._failing = None
                    _LOG.info("outbox: writing again")
                self._accepting_again()
        except Exception:
            _LOG.exception("outbox: the flusher stopped: records are kept in memory until shutdown")
            raise

    async def _flush_pending(self) -> None:
        async with self._flush_lock:
            outbox = self._outbox
            if outbox is None:
                raise RuntimeError("AsyncOutbox: flush() before 'async with'")
            while self._pending or self._refused:
                if outbox.degraded is not None and any(it.lane is not Lane.ALARMS for it in self._pending):
                    # Submitted before the disk filled: only alarms go into the reserve.
                    for it in self._pending:
                        if it.lane is not Lane.ALARMS:
                            self._refuse(it.lane, DropReason.DISK_FULL, 1)
                            self._pending_bytes -= record_size(it)
                    self._pending = [it for it in self._pending if it.lane is Lane.ALARMS]
                # One transaction of at most _MAX_COMMIT_BYTES: the log (and what a checkpoint
                # needs in new space) stays well inside the disk-full reserve.
                taken = 0
                end = 0
                while end < len(self._pending) and (end == 0 or taken < _MAX_COMMIT_BYTES):
                    taken += record_size(self._pending[end])
                    end += 1
                batch, self._pending = self._pending[:end], self._pending[end:]
                await self._write(outbox, batch)
                self._last_beat = time.monotonic()  # a long backlog of commits is progress too

    async def _write(self, outbox: Outbox, batch: list[OutItem]) -> None:
        refused, self._refused = self._refused, {}
        self._inflight = len(batch)
        loop = asyncio.get_running_loop()
        hand = self._alarm_taker is not None and any(it.lane is Lane.ALARMS for it in batch)
        write = loop.run_in_executor(None, _write, outbox, batch, refused, hand)
        try:
            # Shielded: a cancelled caller must not lose track of a write already under way.
            await asyncio.shield(write)
        finally:
            self._inflight = 0
            if not write.done():
                write.add_done_callback(lambda w: self._written(w, batch))
            else:
                self._written(write, batch)

    def _written(self, write: asyncio.Future[list[Leased]], batch: list[OutItem]) -> None:
        if write.cancelled() or write.exception() is not None:
            # First in line again, alarms ahead of the rest: they are written first when space returns.
            alarms = [it for it in batch if it.lane is Lane.ALARMS]
            others = [it for it in batch if it.lane is not Lane.ALARMS]
            self._pending[:0] = alarms + others  # (the refused counts reached the store before the put)
            return
        self._pending_bytes -= sum(record_size(it) for it in batch)
        handed = write.result()
        if handed:
            taker, taken = self._alarm_taker, False
            if taker is not None:
                try:
                    taker(handed)
                    taken = True
                except Exception:  # noqa: BLE001 - whatever went wrong, the alarms go back to the queue
                    _LOG.exception("outbox: handing %d committed alarm(s) over failed: released", len(handed))
            if not taken and self._outbox is not None:
                self._outbox.release([r.id for r in handed])
        if len(batch) > len(handed):
            self._committed.set()  # the rest is for a lease

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


def _write(
    outbox: Outbox, batch: Sequence[OutItem], refused: Mapping[tuple[Lane, DropReason], int], hand: bool
) -> list[Leased]:
    """One group commit, with the drops counted in memory since the last one; its alarms leased if ``hand`` (worker thread)."""
    if refused:
        outbox.count_drops(refused)
    return outbox.put_many(batch, lease_alarms=hand)


__all__ = ["DEFAULT_MAX_PENDING_BYTES", "AsyncOutbox"]
