"""The outbox store: one SQLite database (WAL) holding the queued records; see the package for the contract."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from gateway.contracts import Lane
from gateway.errors import ConfigError, CorruptDataError, TransientError
from gateway.outbox.budget import DROP_WHY, LanePlan
from gateway.outbox.errors import CorruptDatabaseError, Fault, classify, to_error
from gateway.outbox.records import (
    DEFAULT_BUDGETS,
    DEFAULT_TOTAL_MAX_BYTES,
    DropReason,
    FullPolicy,
    LaneBudget,
    LaneStats,
    LastDrop,
    Leased,
    LossEvent,
    MiB,
    OutboxStats,
    OutItem,
)
from gateway.outbox.recovery import (
    check_wal_header,
    keep_copy,
    new_epoch,
    salvage_counts,
    scan_wal,
    set_aside,
    shorten,
)
from gateway.outbox.space import DEFAULT_RESERVE_BYTES, DiskReserve, free_bytes
from gateway.outbox.state import KnownState, StateKeeper, parse_state

_LOG = logging.getLogger("gateway.outbox")

_T = TypeVar("_T")

SCHEMA_VERSION = 1
_SCHEMA = (
    (
        "CREATE TABLE records ("
        "id INTEGER PRIMARY KEY AUTOINCREMENT, lane INTEGER NOT NULL, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL, t_wall REAL NOT NULL, size INTEGER NOT NULL, "
        "attempts INTEGER NOT NULL DEFAULT 0)"
    ),
    "CREATE INDEX records_lane_id ON records (lane, id)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value)",
)
_RECORD_COLUMNS = ("id", "lane", "topic", "payload", "t_wall", "size", "attempts")  # attempts: unused since 2
# Records the uplink cannot send: kept for inspection, out of the queue.  Created when first used.
_DEAD_TABLE = (
    "CREATE TABLE IF NOT EXISTS dead_letter (id INTEGER PRIMARY KEY, lane INTEGER NOT NULL, topic TEXT NOT NULL, "
    "payload BLOB NOT NULL, t_wall REAL NOT NULL, size INTEGER NOT NULL, reason TEXT NOT NULL, t_dead REAL NOT NULL)"
)

_BUSY_TIMEOUT_S = 5.0
# A big batch can grow the log past one checkpoint; cap what stays on disk once it is reset.
_WAL_SIZE_LIMIT = 4 * MiB
_WAL_AUTOCHECKPOINT_PAGES = 256  # about 1 MiB of log at the default 4 KiB page
# Free pages are reused by the next inserts, so only give back what exceeds a small reserve,
# and only look after enough was acknowledged for it to matter.
_VACUUM_EVERY_BYTES = 1 * MiB
_VACUUM_KEEP_PAGES = 256
_DEGRADED_VACUUM_PAGES = 64
_SCAN_PAGE = 512  # rows fetched per query while looking for records to drop
# A gateway without a battery-backed clock stamps records near 1970 until NTP syncs: those are
# mis-stamped, not stale, so the age budget leaves them alone (the byte budget still bounds them).
_PLAUSIBLE_WALL_S = 1_577_836_800.0  # 2020-01-01T00:00:00Z
# Ids are reserved in the state file ahead of use, this many at a time: one small write per
# chunk, and after any loss the new epoch starts above every id ever handed out.
_ID_CHUNK = 100_000
_LOSSES_KEPT = 8
# Kept free on the outbox's filesystem: released when the disk fills, so alarms, acknowledgements
# and checkpoints still find room; re-taken once twice as much is free again.


class Outbox:
    """The durable queue. Synchronous and thread-safe: every call holds one lock."""

    def __init__(
        self,
        path: Path,
        *,
        budgets: Mapping[Lane, LaneBudget] = DEFAULT_BUDGETS,
        total_max_bytes: int | None = DEFAULT_TOTAL_MAX_BYTES,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._path = Path(path)
        self._wall = wall
        self._budgets = self._resolve_budgets(budgets)
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(
                f"outbox {self._path}: synchronous={synchronous!r}: expected FULL or NORMAL: "
                "use FULL where power cuts are possible"
            )
        if total_max_bytes is not None and total_max_bytes <= 0:
            raise ConfigError(
                f"outbox {self._path}: total budget {total_max_bytes} bytes: it must be positive: "
                "give a size in bytes or None for no total limit"
            )
        self._total_max = total_max_bytes
        self._synchronous = synchronous
        self._lock = threading.Lock()
        self._recovered: list[Path] = []
        self._count: dict[Lane, int] = dict.fromkeys(Lane, 0)
        self._bytes: dict[Lane, int] = dict.fromkeys(Lane, 0)
        self._leased: dict[int, tuple[Lane, int]] = {}  # id -> (lane, size)
        self._leased_count: dict[Lane, int] = dict.fromkeys(Lane, 0)
        self._dropped: dict[Lane, dict[DropReason, int]] = {lane: {} for lane in Lane}
        self._dropping: set[tuple[Lane, DropReason]] = set()
        self._over_total = False
        self._freed_since_vacuum = 0
        self._closed = False
        self._epoch = 0
        self._high_id = 0  # highest record id this process ever leased
        self._attempts: dict[
            int, int
        ] = {}  # id -> leases by this process (not persisted: leasing writes nothing)
        self._released: collections.deque[int] = collections.deque()  # handed back, applied under the lock
        self._state = StateKeeper(self._path, self._state_data)
        self._space = DiskReserve(self._path, reserve_bytes)
        self._seq = 0  # highest id assigned in this database
        self._floor = 0  # ids up to this are reserved in the state file
        self._losses: list[LossEvent] = []
        self._last_drop: LastDrop | None = None
        self._dead = 0
        self._dead_logged = False
        self._drop_view: Mapping[str, Mapping[str, int]] = {}
        self._prepare_directory()
        self._conn = self._open_or_recover()
        self._space.take()
        # The age budget's clock: the wall time at open carried on the monotonic clock, so a wall
        # clock step cannot age what waits; restamp() moves it, and this run's rows with it, onto
        # the wall clock when the time base reports a step, so a later run on the stepped clock
        # agrees with them.
        self._anchor = self._wall() - time.monotonic()
        self._run_floor = self._seq  # ids above it were stamped on this run's clock

    # --- public API ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """Where the database lives."""
        return self._path

    @property
    def epoch(self) -> int:
        """Random id of this database file, new whenever a fresh database is started."""
        return self._epoch

    def last_id(self) -> int:
        """The highest record id ever assigned in this database (0 when none was)."""
        with self._lock:
            self._require_open()
            return self._guarded("last_id", self._last_id)

    def put_many(self, items: Sequence[OutItem], *, lease_alarms: bool = False) -> list[Leased]:
        """Store a batch in one transaction, then apply the lane and total budgets.

        With ``lease_alarms``, the batch's alarms are also leased in the same hold of the lock and
        returned (none when an older alarm is still unleased: a lease hands those out in order).
        """
        if not items:
            return []
        with self._lock:
            self._require_open()
            before = self._seq
            self._guarded("put", lambda: self._put_many(items))
            if not lease_alarms:
                return []
            # The commit is done: what is leased here is durable.  Only when no older alarm waits
            # unleased, so that alarms still go out in order.
            self._apply_released()
            fresh = sum(1 for it in items if it.lane is Lane.ALARMS)
            if not fresh or self._count[Lane.ALARMS] - self._leased_count[Lane.ALARMS] != fresh:
                return []
            return self._lease_noted(fresh, before, None)

    def put(self, item: OutItem) -> None:
        """Store one record (one transaction: prefer ``put_many``)."""
        self.put_many((item,))

    def lease(self, n: int, *, after_id: int = 0, through_id: int | None = None) -> list[Leased]:
        """Hand out up to ``n`` records not leased now: alarms first, then oldest first.

        ``after_id`` / ``through_id`` limit the ids handed out to ``after_id < id <= through_id``.
        """
        if n <= 0 or (through_id is not None and through_id <= after_id):
            return []
        with self._lock:
            self._require_open()
            self._apply_released()
            return self._lease_noted(n, after_id, through_id)

    def ack(self, ids: Iterable[int]) -> None:
        """Delete delivered records. Only leased ids are deleted; any other id is ignored."""
        wanted = list(dict.fromkeys(ids))
        with self._lock:
            self._require_open()
            self._apply_released()
            self._guarded("ack", lambda: self._ack(wanted))

    def release(self, ids: Iterable[int]) -> None:
        """Return leased records to the queue, at the position they had.

        Never waits: the ids are noted and applied by the next call that holds the lock, so the
        event loop can call this while a commit's fsync runs in another thread.
        """
        self._released.extend(ids)

    def dead_letter(self, ids: Iterable[int], reason: str) -> int:
        """Move leased records the uplink cannot send to the dead-letter table; return how many.

        They leave the queue but stay on disk for inspection (:meth:`dead_letters`, or ``sqlite3
        <outbox> 'SELECT id, reason FROM dead_letter'``), counted as ``dead_letter`` drops of their
        lane and logged.
        """
        wanted = list(dict.fromkeys(ids))
        with self._lock:
            self._require_open()
            self._apply_released()
            return self._guarded("dead_letter", lambda: self._dead_letter(wanted, reason))

    def dead_letters(self) -> list[tuple[int, str, str]]:
        """(id, topic, reason) of each record in the dead-letter table, oldest first."""
        with self._lock:
            self._require_open()
            if not self._dead:
                return []
            rows = self._conn.execute("SELECT id, topic, reason FROM dead_letter ORDER BY id").fetchall()
            return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def count_drops(self, counts: Mapping[tuple[Lane, DropReason], int]) -> None:
        """Add drops that happened outside the database (refused in memory) to the counters."""
        with self._lock:
            self._require_open()
            self._add_counters(counts)

    @property
    def losses(self) -> tuple[LossEvent, ...]:
        """Recoveries that lost records, oldest first (the last few); never waits."""
        return tuple(self._losses)

    @property
    def last_drop(self) -> LastDrop | None:
        """The newest counted loss (persisted in the state file), or None; never waits."""
        return self._last_drop

    def drop_counts(self) -> Mapping[str, Mapping[str, int]]:
        """The drop counters by lane name and reason; never waits (safe on the event loop)."""
        return self._drop_view

    @property
    def degraded(self) -> str | None:
        """Why lower lanes are refused (a full disk), or None; never waits."""
        return self._space.degraded

    def check_space(self) -> bool:
        """While degraded, see whether space has returned and take the reserve again; True if so."""
        if self._space.degraded is None:
            return True
        with self._lock:
            self._require_open()
            return self._try_recover_space()

    def save_state(self) -> None:
        """Make the state file (counters, queue sizes, id floor) durable if a change is not yet."""
        with self._lock:
            if not self._closed:
                self._state.save(sync=True)

    def clock(self) -> float:
        """Now on the age budget's clock (Unix seconds): what a record queued now is stamped with."""
        return self._anchor + time.monotonic()

    def restamp(self) -> float:
        """The wall clock stepped: move the age clock onto it and this run's stamps with it; return the move."""
        with self._lock:
            self._require_open()
            # By how far this clock is off the wall clock now, not by the step the time base
            # reports: a step taken before this file was opened is in the anchor already, and a
            # second call (a retry) moves nothing.
            move = (self._wall() - time.monotonic()) - self._anchor
            self._guarded("restamp", lambda: self._restamp(move))
            self._anchor += move  # only once the rows moved: the clock and the stamps move as one
            return move

    def _restamp(self, move: float) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE records SET t_wall = t_wall + ? WHERE id > ?", (move, self._run_floor))

    def expire(self, now_wall: float | None = None) -> int:
        """Drop records older than their lane's age budget (by :meth:`clock`); return how many were dropped."""
        now = self.clock() if now_wall is None else now_wall
        with self._lock:
            self._require_open()
            return self._guarded("expire", lambda: self._expire(now))

    def stats(self) -> OutboxStats:
        """A snapshot of counts, bytes, ages, leases, drops and recoveries."""
        with self._lock:
            self._require_open()
            self._apply_released()
            return self._guarded("stats", self._stats)

    def close(self) -> None:
        """Close the database; later calls raise. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._state.save(sync=True)
            self._closed = True
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                _LOG.warning("outbox %s: closing the database failed: %s", self._path, exc)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- opening, checking, recovering ----------------------------------------------------------

    @staticmethod
    def _resolve_budgets(budgets: Mapping[Lane, LaneBudget]) -> dict[Lane, LaneBudget]:
        resolved = {lane: budgets.get(lane, DEFAULT_BUDGETS[lane]) for lane in Lane}
        if resolved[Lane.ALARMS].policy is not FullPolicy.NEVER_DROP:
            raise ConfigError(
                f"outbox budgets: alarms lane: policy {resolved[Lane.ALARMS].policy.name}: "
                "alarms are never dropped: use FullPolicy.NEVER_DROP for Lane.ALARMS"
            )
        for lane, budget in resolved.items():
            limited = budget.max_bytes is not None or budget.max_age_s is not None
            if budget.policy is FullPolicy.NEVER_DROP and limited:
                raise ConfigError(
                    f"outbox budgets: lane {lane.name.lower()}: a byte or age limit with NEVER_DROP: "
                    "a lane that never drops cannot enforce a limit: remove the limits or pick a drop policy"
                )
        return resolved

    def _prepare_directory(self) -> None:
        where = f"outbox {self._path}"
        if self._path.is_dir():
            raise ConfigError(
                f"{where}: cannot open the database: the path is a directory: configure a file path"
            )
        parent = self._path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot create the directory {parent}: {exc.strerror or exc}: "
                "create it, writable by the gateway's user, or configure another outbox path"
            ) from exc
        # SQLite creates the -wal and -shm files next to the database, so the directory itself must
        # be writable, not just the file.
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{where}: cannot write to the directory {parent}: permission denied: "
                "make it writable by the gateway's user or configure another outbox path"
            )

    def _open_or_recover(self) -> sqlite3.Connection:
        state = self._state.load()
        wal = Path(f"{self._path}-wal")
        lost_why: str | None = None
        bad_wal = check_wal_header(wal)
        if bad_wal is not None:
            self._set_aside(bad_wal, wal_only=True)
            lost_why = f"write-ahead log set aside ({bad_wal})"
        else:
            scan = scan_wal(wal)
            if scan is not None and scan.broken_at is not None and scan.committed_after:
                copy = keep_copy(wal)
                lost_why = (
                    f"write-ahead log damaged at frame {scan.broken_at}: {scan.committed_after} committed "
                    "transaction(s) behind it cannot be read"
                )
                _LOG.critical(
                    "outbox %s: %s: opening with the %d frame(s) before it; a copy of the log is kept as %s",
                    self._path,
                    lost_why,
                    scan.frames,
                    copy or "(no copy: no space)",
                )
        salvaged: dict[int, int] | None = None
        try:
            conn = self._open_db()
        except CorruptDatabaseError as exc:
            why = str(exc)
        except sqlite3.Error as exc:
            if classify(exc) is not Fault.CORRUPT:
                raise to_error(self._path, "open", exc) from exc
            why = f"{exc} ({getattr(exc, 'sqlite_errorname', 'no code')})"
        else:
            self._conn = conn
            self._settle_epoch(state, lost_why, salvaged)
            return conn
        base = self._set_aside(why, wal_only=False)
        salvaged = salvage_counts(base)
        lost_why = f"database set aside ({why})"
        try:
            conn = self._open_db()
        except (sqlite3.Error, CorruptDatabaseError) as exc:
            raise CorruptDataError(
                f"outbox {self._path}: cannot start a fresh database after setting the old one aside: {exc}: "
                "check the disk and the directory's permissions"
            ) from exc
        self._conn = conn
        self._settle_epoch(state, lost_why, salvaged)
        return conn

    def _settle_epoch(
        self, state: Mapping[str, Any] | None, lost_why: str | None, salvaged: Mapping[int, int] | None
    ) -> None:
        """Reconcile the database with the state file; start a new epoch if records may be lost."""
        self._seq = self._last_id()
        known = parse_state(state)
        counters = {(lane, reason): n for lane in Lane for reason, n in self._dropped[lane].items()}
        for key, n in known.dropped.items():
            counters[key] = max(counters.get(key, 0), n)
        self._losses = list(known.losses)
        self._last_drop = known.last_drop
        if lost_why is None and state is not None and known.epoch and known.epoch != self._epoch:
            lost_why = f"the database is not the one last used (epoch {self._epoch}, expected {known.epoch})"
        elif lost_why is None and known.last_id > self._seq:
            # The state file is written after each commit: a database behind it lost commits (a
            # copy put back, storage that dropped writes) and would hand the same ids out again.
            lost_why = (
                f"the database has ids up to {self._seq} but {known.last_id} were handed out "
                "(an older copy, or storage that lost writes)"
            )
        if lost_why is None:
            self._apply_counters(counters, note=False)  # what the files say: no new loss
            self._floor = max(known.floor, self._seq)
        else:
            self._start_new_epoch(known, lost_why, salvaged, counters)
        try:
            self._reserve_ids(0)
        except TransientError:
            # A state file that cannot be created on a full disk: the reserve makes room.
            self._release_reserve("no room for the state file")
            with contextlib.suppress(TransientError):
                self._reserve_ids(0)
        self._state.dirty = True
        self._state.save(sync=True)

    def _start_new_epoch(
        self,
        known: KnownState,
        why: str,
        salvaged: Mapping[int, int] | None,
        counters: dict[tuple[Lane, DropReason], int],
    ) -> None:
        lost: dict[Lane, int] = {}
        for lane in Lane:
            from_state = max(0, known.queued.get(lane, 0) - self._count[lane])
            from_file = 0 if salvaged is None else salvaged.get(int(lane), 0)
            if max(from_state, from_file):
                lost[lane] = max(from_state, from_file)
        for lane, n in lost.items():
            key = (lane, DropReason.CORRUPT)
            counters[key] = counters.get(key, 0) + n
        prev = known.epoch or self._epoch
        epoch = new_epoch()
        while epoch == prev:
            epoch = new_epoch()
        floor = max(known.floor, known.last_id, self._seq, self._high_id)
        survivors = sum(self._count.values())

        def write() -> None:
            with self._transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
                if survivors:
                    # What survived is numbered anew, densely, above the floor: the new epoch is
                    # one unbroken sequence, so a gap in it is still a loss at the twin.
                    conn.execute(
                        "CREATE TEMP TABLE renumber AS SELECT id AS old, ? + ROW_NUMBER() OVER (ORDER BY id) "
                        "AS new FROM records",
                        (floor,),
                    )
                    conn.execute("UPDATE records SET id = (SELECT new FROM renumber WHERE old = records.id)")
                    conn.execute("DROP TABLE temp.renumber")
                self._set_sequence(floor + survivors)
                self._persist_counters(counters)

        try:
            write()
        except sqlite3.Error as exc:
            if classify(exc) is not Fault.FULL:
                raise to_error(self._path, "start a new epoch", exc) from exc
            self._release_reserve("starting a new epoch")
            try:
                write()
            except sqlite3.Error as again:
                raise to_error(self._path, "start a new epoch", again) from again
        self._apply_counters(counters, note=False)
        if lost:
            self._last_drop = LastDrop(
                max(lost, key=lambda lane: lost[lane]).name.lower(),
                str(DropReason.CORRUPT),
                sum(lost.values()),
                time.time(),
                why,
            )
        event = LossEvent(
            prev, epoch, known.last_id, {lane.name.lower(): n for lane, n in lost.items()}, why, time.time()
        )
        self._losses = [*self._losses, event][-_LOSSES_KEPT:]
        self._epoch, self._seq, self._floor = epoch, floor + survivors, floor + survivors
        _LOG.critical(
            "outbox %s: %s: records may be lost, so the sequence goes on in a new epoch %d (was %d) from id %d "
            "(%d surviving record(s) numbered anew); %d record(s) counted as lost (%s); the twin is told "
            "through the drop counters",
            self._path,
            why,
            epoch,
            prev,
            floor + 1,
            survivors,
            sum(lost.values()),
            ", ".join(f"{lane.name.lower()} {n}" for lane, n in lost.items()) or "none known",
        )

    def _set_sequence(self, value: int) -> None:
        if (
            self._conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'records'", (value,)).rowcount
            == 0
        ):
            self._conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (value,))

    # --- the state file and the id floor ---------------------------------------------------------------

    def _reserve_ids(self, n: int) -> None:
        """Make sure ids up to ``seq + n`` are reserved in the state file before they are used."""
        if self._seq + n <= self._floor and self._floor > 0:
            return
        self._floor = self._seq + n + _ID_CHUNK
        self._state.save(sync=True, required=True)

    def _state_data(self) -> dict[str, Any]:
        return {
            "v": 1,
            "epoch": self._epoch,
            "floor": self._floor,
            "last_id": self._seq,
            "queued": {lane.name.lower(): self._count[lane] for lane in Lane},
            "dropped": {
                f"{lane.name.lower()}.{reason.value}": n
                for lane in Lane
                for reason, n in self._dropped[lane].items()
                if n
            },
            "losses": [event.as_dict() for event in self._losses],
            "last_drop": None if self._last_drop is None else self._last_drop.as_dict(),
        }

    # --- full disk -------------------------------------------------------------------------------------

    def _release_reserve(self, why: str) -> None:
        self._space.release(why)

    def _try_recover_space(self) -> bool:
        if not self._space.due():
            return False
        try:
            with contextlib.suppress(sqlite3.Error):
                # Empty the log into the file, then give pages freed by deliveries back to the
                # filesystem - only with some room to spare, since moving pages needs the log.
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                if free_bytes(self._path.parent) >= _DEGRADED_VACUUM_PAGES * 4 * 4096:
                    self._vacuum()
        except OSError:
            return False
        return self._space.try_recover()

    def _open_db(self) -> sqlite3.Connection:
        """Open the database; on a full disk give the reserve back, then try without shared memory."""
        try:
            return self._open_db_once(exclusive=False)
        except sqlite3.Error as exc:
            if classify(exc) not in (Fault.FULL, Fault.TRANSIENT):
                raise
            why = f"{exc} ({getattr(exc, 'sqlite_errorname', 'no code')}) while opening"
        self._release_reserve(why)
        try:
            return self._open_db_once(exclusive=False)
        except sqlite3.Error as exc:
            if classify(exc) not in (Fault.FULL, Fault.TRANSIENT):
                raise
        # The log's shared-memory index (-shm) needs a new file: without room for it, this process
        # alone opens the database, with the index in memory (sqlite3 on the side must wait).
        _LOG.warning("outbox %s: no room for the -shm file: opened for this process alone", self._path)
        return self._open_db_once(exclusive=True)

    def _open_db_once(self, *, exclusive: bool) -> sqlite3.Connection:
        """Open (or create) the database, check it and load the in-memory totals."""
        conn = sqlite3.connect(
            self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            if exclusive:
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._configure_and_check(conn)
            self._load_state(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure_and_check(self, conn: sqlite3.Connection) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            # Only takes effect on a new, empty database: it must precede the first table.  Never
            # set on an existing one: it writes, and opening must work on a full disk.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigError(
                f"outbox {self._path}: cannot switch to write-ahead logging (journal mode {mode}): "
                "the filesystem may not support shared memory maps: put the outbox on a local disk"
            )
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        # A checkpoint copies the log into the file, needing up to the log's size in new space:
        # a short log keeps that well inside the disk-full reserve.
        conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            found = "; ".join(str(row[0]) for row in check).replace("\n", "; ")
            raise CorruptDatabaseError(f"quick_check failed: {shorten(found)}")
        if not tables:
            self._create_schema(conn)
        else:
            self._verify_schema(conn, tables)

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            conn.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (new_epoch(),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _verify_schema(conn: sqlite3.Connection, tables: set[str]) -> None:
        if not {"records", "meta"} <= tables:
            raise CorruptDatabaseError(f"not an outbox database (tables: {', '.join(sorted(tables))})")
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(records)"))
        if columns != _RECORD_COLUMNS:
            raise CorruptDatabaseError(f"unexpected columns in records: {', '.join(columns)}")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            raise CorruptDatabaseError(
                f"schema version {None if row is None else row[0]!r}, this gateway reads {SCHEMA_VERSION}"
            )

    def _load_state(self, conn: sqlite3.Connection) -> None:
        count = dict.fromkeys(Lane, 0)
        size = dict.fromkeys(Lane, 0)
        for lane_value, n, total in conn.execute(
            "SELECT lane, COUNT(*), COALESCE(SUM(size), 0) FROM records GROUP BY lane"
        ):
            try:
                lane = Lane(lane_value)
            except ValueError as exc:
                # Records in an unknown lane would never be leased nor dropped.
                raise CorruptDatabaseError(f"{n} records in unknown lane {lane_value!r}") from exc
            count[lane], size[lane] = int(n), int(total)
        dropped: dict[Lane, dict[DropReason, int]] = {lane: {} for lane in Lane}
        for key, value in conn.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped.%'"):
            try:
                _, lane_name, reason = str(key).split(".", 2)
                dropped[Lane[lane_name.upper()]][DropReason(reason)] = int(value)
            except (KeyError, ValueError, TypeError):
                _LOG.warning("outbox %s: ignoring unknown counter %r in meta", self._path, key)
        self._count, self._bytes, self._dropped = count, size, dropped
        self._dead = 0
        if conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letter'"
        ).fetchone():
            self._dead = int(conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0])
        self._epoch = self._load_epoch(conn)
        self._leased.clear()
        self._leased_count = dict.fromkeys(Lane, 0)
        self._freed_since_vacuum = 0

    def _load_epoch(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is not None and isinstance(row[0], int) and row[0] > 0:
            return row[0]
        # A database created before epochs existed: its ids go on, so giving it one now is safe.
        epoch = new_epoch()
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    def _set_aside(self, why: str, *, wal_only: bool) -> Path:
        """Rename the damaged file(s) out of the way, loudly; return the name it was set aside as."""
        base = set_aside(self._path, why, wal_only=wal_only)
        self._recovered.append(base)
        return base

    def _recover_in_place(self, why: str) -> None:
        """Corruption found while running: set the file aside and continue on a fresh one."""
        # What this process knew about the old file carries over: its counters, and the records
        # still queued in it, now counted as lost.  Ids handed out from it may still be in an
        # uplink's hands: the fresh file's ids start above the floor, so a late ack can never
        # delete a different record under the same id.
        known = KnownState(
            epoch=self._epoch,
            floor=max(self._floor, self._high_id, max(self._leased, default=0)),
            last_id=self._seq,
            queued=dict(self._count),
            dropped={(lane, reason): n for lane in Lane for reason, n in self._dropped[lane].items()},
            losses=tuple(self._losses),
        )
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._closed = True  # until a fresh database is open
        self._set_aside(why, wal_only=False)
        try:
            self._conn = self._open_db()
        except (sqlite3.Error, CorruptDatabaseError) as exc:
            raise CorruptDataError(
                f"outbox {self._path}: cannot start a fresh database after setting the old one aside: {exc}: "
                "check the disk and restart the gateway"
            ) from exc
        self._closed = False
        self._seq = self._last_id()
        self._losses = list(known.losses)
        self._start_new_epoch(known, f"database set aside while running ({why})", None, dict(known.dropped))
        self._state.dirty = True
        self._state.save(sync=True)

    def _guarded(self, what: str, op: Callable[[], _T]) -> _T:
        """Run ``op``; on corruption set the file aside and run it once more on a fresh database."""
        try:
            return op()
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            self._rollback_quietly()
            raise  # a bug in the caller (a value SQLite cannot store), not a state of the database
        except sqlite3.Error as exc:
            self._rollback_quietly()
            fault = classify(exc)
            if fault is Fault.FULL:
                # Give the reserve back to the filesystem, empty the log into the file, and try
                # once more in that room - except a batch of records: the caller retries it with
                # alarms only, rather than let features fill the reserve.
                self._release_reserve(f"{exc} during {what}")
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                if what == "put":
                    raise to_error(self._path, what, exc) from exc
                try:
                    return op()
                except sqlite3.Error as again:
                    self._rollback_quietly()
                    raise to_error(self._path, what, again) from again
            if fault is not Fault.CORRUPT:
                raise to_error(self._path, what, exc) from exc
            why = f"{exc} ({getattr(exc, 'sqlite_errorname', 'no code')}) during {what}"
        self._recover_in_place(why)
        try:
            return op()
        except sqlite3.Error as exc:
            self._rollback_quietly()
            raise to_error(self._path, what, exc) from exc

    def _rollback_quietly(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"outbox {self._path}: used after close()")

    # --- operations (called with the lock held) ---------------------------------------------------

    def _lane_rows(self, lane: Lane) -> Iterator[tuple[int, float, int]]:
        """Stored (id, t_wall, size) of a lane, oldest first, read a page at a time."""
        last = 0
        while True:
            rows = self._conn.execute(
                "SELECT id, t_wall, size FROM records WHERE lane = ? AND id > ? ORDER BY id LIMIT ?",
                (int(lane), last, _SCAN_PAGE),
            ).fetchall()
            if not rows:
                return
            for rid, t_wall, size in rows:
                yield int(rid), float(t_wall), int(size)
            last = rows[-1][0]

    def _oldest_unleased(self, lane: Lane) -> Iterator[tuple[int, int]]:
        """Stored (id, size) of a lane, oldest first, skipping leased records."""
        return ((rid, size) for rid, _, size in self._lane_rows(lane) if rid not in self._leased)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once so that a busy database fails here, not midway."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self._rollback_quietly()
            raise

    def _put_many(self, items: Sequence[OutItem]) -> None:
        # The hot path of the gateway: one pass, no per-record function calls.
        sizes = [len(it.payload) + len(it.topic.encode()) for it in items]
        incoming: dict[Lane, list[int]] = {}
        for item, size in zip(items, sizes, strict=True):
            lane_sizes = incoming.get(item.lane)
            if lane_sizes is None:
                incoming[item.lane] = [size]
            else:
                lane_sizes.append(size)
        plans: dict[Lane, LanePlan] = {}

        def plan(lane: Lane) -> LanePlan:
            if lane not in plans:
                plans[lane] = LanePlan(
                    self._budgets[lane].policy, incoming.get(lane, []), lambda: self._oldest_unleased(lane)
                )
            return plans[lane]

        self._reserve_ids(len(items))
        with self._transaction() as conn:
            for lane, lane_sizes in incoming.items():
                budget = self._budgets[lane]
                if budget.max_bytes is not None and budget.policy is not FullPolicy.NEVER_DROP:
                    excess = self._bytes[lane] + sum(lane_sizes) - budget.max_bytes
                    if excess > 0:
                        plan(lane).drop(excess)
            if self._total_max is not None:
                freed = sum(p.deleted_bytes + sum(p.sizes) - p.kept_bytes for p in plans.values())
                excess = sum(self._bytes.values()) + sum(sizes) - freed - self._total_max
                # Lowest priority first; a NEVER_DROP lane (alarms) frees nothing.
                for lane in sorted(Lane, reverse=True):
                    if excess <= 0:
                        break
                    excess -= plan(lane).drop(excess)
            deleted = [(rid,) for p in plans.values() for rid in p.deleted]
            if deleted:
                conn.executemany("DELETE FROM records WHERE id = ?", deleted)
            rows: list[tuple[Lane, str, bytes, float, int]]
            stamp = self.clock()  # under the lock, so restamp() moves a row or stamps it afresh, never both
            if not any(p.dropped for p in plans.values()):
                rows = [
                    (it.lane, it.topic, it.payload, stamp if it.t_wall is None else it.t_wall, sz)
                    for it, sz in zip(items, sizes, strict=True)
                ]
            else:
                position: dict[Lane, int] = dict.fromkeys(incoming, 0)
                rows = []
                for item, size in zip(items, sizes, strict=True):
                    i = position[item.lane]
                    position[item.lane] = i + 1
                    p = plans.get(item.lane)
                    if p is None or p.first <= i < p.end:
                        rows.append(
                            (
                                item.lane,
                                item.topic,
                                item.payload,
                                stamp if item.t_wall is None else item.t_wall,
                                size,
                            )
                        )
            conn.executemany(
                "INSERT INTO records (lane, topic, payload, t_wall, size) VALUES (?, ?, ?, ?, ?)", rows
            )
            seq = self._last_id()
            counters = {
                (lane, DropReason.BUDGET): self._dropped[lane].get(DropReason.BUDGET, 0) + p.dropped
                for lane, p in plans.items()
                if p.dropped
            }
            self._persist_counters(counters)
        self._apply_counters(counters)
        self._seq = seq
        self._state.dirty = True
        for lane, lane_sizes in incoming.items():
            p = plans.get(lane)
            kept = lane_sizes if p is None else lane_sizes[p.first : p.end]
            self._count[lane] += len(kept)
            self._bytes[lane] += sum(kept)
        for lane, p in plans.items():
            self._count[lane] -= len(p.deleted)
            self._bytes[lane] -= p.deleted_bytes
        for lane in Lane:
            n = plans[lane].dropped if lane in plans else 0
            if lane in incoming or n:
                self._note_drops(lane, DropReason.BUDGET, n)
        self._note_total()
        self._state.save(sync=False)

    def _persist_counters(self, counters: Mapping[tuple[Lane, DropReason], int]) -> None:
        if counters:
            self._conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [
                    (f"dropped.{lane.name.lower()}.{reason.value}", n)
                    for (lane, reason), n in counters.items()
                ],
            )

    def _apply_counters(self, counters: Mapping[tuple[Lane, DropReason], int], *, note: bool = True) -> None:
        if note:
            # The newest loss is the counter that grew most in this change.
            grown = [
                (n - self._dropped[lane].get(reason, 0), lane, reason)
                for (lane, reason), n in counters.items()
            ]
            most = max(grown, default=None, key=lambda g: g[0])
            if most is not None and most[0] > 0:
                self._last_drop = LastDrop(most[1].name.lower(), str(most[2]), most[0], time.time())
        for (lane, reason), n in counters.items():
            self._dropped[lane][reason] = n
        if counters:
            self._state.dirty = True
            # Rebuilt, never changed in place: readers on the event loop take it without the lock.
            self._drop_view = {
                lane.name.lower(): {str(reason): n for reason, n in self._dropped[lane].items() if n}
                for lane in Lane
                if any(self._dropped[lane].values())
            }

    def _add_counters(self, counts: Mapping[tuple[Lane, DropReason], int]) -> None:
        """Count drops made outside a transaction; persisted now if the disk allows, else later."""
        totals = {
            (lane, reason): self._dropped[lane].get(reason, 0) + n
            for (lane, reason), n in counts.items()
            if n
        }
        if not totals:
            return
        self._apply_counters(totals)  # logged as a state change by whoever refused them
        try:
            with self._transaction():
                self._persist_counters(totals)
        except sqlite3.Error:
            self._rollback_quietly()  # a full disk: the state file (written in place) still gets them
        self._state.save(sync=False)

    def _apply_released(self) -> None:
        released = self._released
        while released:
            rid = released.popleft()
            entry = self._leased.pop(rid, None)
            if entry is not None:
                self._leased_count[entry[0]] -= 1

    def _dead_letter(self, ids: list[int], reason: str) -> int:
        mine = [rid for rid in ids if rid in self._leased]
        if not mine:
            return 0
        by_lane: dict[Lane, int] = {}
        for rid in mine:
            lane = self._leased[rid][0]
            by_lane[lane] = by_lane.get(lane, 0) + 1
        counters = {
            (lane, DropReason.DEAD_LETTER): self._dropped[lane].get(DropReason.DEAD_LETTER, 0) + n
            for lane, n in by_lane.items()
        }
        now = time.time()
        with self._transaction() as conn:
            conn.execute(_DEAD_TABLE)
            conn.executemany(
                "INSERT OR REPLACE INTO dead_letter (id, lane, topic, payload, t_wall, size, reason, t_dead) "
                "SELECT id, lane, topic, payload, t_wall, size, ?, ? FROM records WHERE id = ?",
                [(reason, now, rid) for rid in mine],
            )
            conn.executemany("DELETE FROM records WHERE id = ?", [(rid,) for rid in mine])
            self._persist_counters(counters)
            self._dead = int(conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0])
        self._apply_counters(counters)
        for rid in mine:
            lane, size = self._leased.pop(rid)
            self._attempts.pop(rid, None)
            self._leased_count[lane] -= 1
            self._count[lane] -= 1
            self._bytes[lane] -= size
        # The first of a process at WARNING, the rest at DEBUG: the counters say how many.
        log = _LOG.debug if self._dead_logged else _LOG.warning
        self._dead_logged = True
        log(
            "outbox %s: %d record(s) moved to the dead-letter table (%s): %s; kept for inspection, "
            "%d there in all",
            self._path,
            len(mine),
            ", ".join(f"{lane.name.lower()} {n}" for lane, n in by_lane.items()),
            reason,
            self._dead,
        )
        self._state.save(sync=False)
        return len(mine)

    def _last_id(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        return 0 if row is None else int(row[0])

    def _lease_noted(self, n: int, after_id: int, through_id: int | None) -> list[Leased]:
        """Lease (under the lock) and remember the highest id handed out."""
        leased = self._guarded("lease", lambda: self._lease(n, after_id, through_id))
        if leased:
            # Remembered outside the file: if it turns out corrupt, the fresh one's ids must
            # start above every id handed out from it (a late ack names one of those).
            self._high_id = max(self._high_id, *(r.id for r in leased))
        return leased

    def _lease(self, n: int, after_id: int = 0, through_id: int | None = None) -> list[Leased]:
        if all(self._count[lane] <= self._leased_count[lane] for lane in Lane):
            return []  # nothing to hand out: spare the uplink's polling a transaction
        upper = (1 << 63) - 1 if through_id is None else through_id
        picked: list[tuple[Leased, int]] = []
        # A read only: leasing writes nothing, so the backlog can be delivered on a full disk.
        conn = self._conn
        for lane in sorted(Lane):
            free = self._count[lane] - self._leased_count[lane]
            if free <= 0:
                continue
            want = min(n - len(picked), free)
            # Leased records are skipped here, so at most that many extra rows are read.
            rows = conn.execute(
                "SELECT id, topic, payload, t_wall, size FROM records "
                "WHERE lane = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (int(lane), after_id, upper, want + self._leased_count[lane]),
            ).fetchall()
            for rid, topic, payload, t_wall, size in rows:
                if rid in self._leased:
                    continue
                picked.append((Leased(rid, lane, topic, payload, t_wall, self._attempts.get(rid, 0)), size))
                if len(picked) == n:
                    break
            if len(picked) == n:
                break
        for record, size in picked:
            self._attempts[record.id] = record.attempts + 1
            self._leased[record.id] = (record.lane, size)
            self._leased_count[record.lane] += 1
        return [record for record, _ in picked]

    def _ack(self, ids: list[int]) -> None:
        mine = [rid for rid in ids if rid in self._leased]
        if not mine:
            return
        # A delete lost to a power cut only sends the record again (a duplicate the twin's
        # sequence check names), so it is not worth an fsync: under FULL every ack would queue
        # behind and ahead of the commits that do need one (alarms waiting to go out).  The next
        # FULL commit syncs these log frames with its own.
        relaxed = self._synchronous == "FULL"
        if relaxed:
            self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._transaction() as conn:
                conn.executemany("DELETE FROM records WHERE id = ?", [(rid,) for rid in mine])
        finally:
            if relaxed:
                self._conn.execute("PRAGMA synchronous=FULL")
        for rid in mine:
            lane, size = self._leased.pop(rid)
            self._attempts.pop(rid, None)
            self._leased_count[lane] -= 1
            self._count[lane] -= 1
            self._bytes[lane] -= size
            self._freed_since_vacuum += size
        self._state.dirty = True
        self._state.save(sync=False)
        self._note_total()
        if self._freed_since_vacuum >= _VACUUM_EVERY_BYTES:
            self._freed_since_vacuum = 0
            self._vacuum()

    def _vacuum(self) -> None:
        """Give free pages beyond a reserve back to the filesystem, so the file does not only grow."""
        free_pages = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
        if free_pages > 2 * _VACUUM_KEEP_PAGES:
            steps = free_pages - _VACUUM_KEEP_PAGES
            if self._space.degraded is not None:
                # Moving pages writes them to the log first: on a full disk, a few at a time, the
                # log emptied after each round, so giving space back never takes the last of it.
                steps = min(steps, _DEGRADED_VACUUM_PAGES)
            # This pragma frees one page per step, and execute() steps a statement without result
            # columns only once; executescript() steps it to the end.
            self._conn.executescript(f"PRAGMA incremental_vacuum({steps});")
            if self._space.degraded is not None:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _expire(self, now: float) -> int:
        victims: dict[Lane, list[tuple[int, int]]] = {}
        with self._transaction() as conn:
            for lane, budget in self._budgets.items():
                if (
                    budget.max_age_s is None
                    or budget.policy is FullPolicy.NEVER_DROP
                    or not self._count[lane]
                ):
                    continue
                found = self._aged(lane, now - budget.max_age_s)
                if found:
                    victims[lane] = found
            if victims:
                conn.executemany(
                    "DELETE FROM records WHERE id = ?",
                    [(rid,) for found in victims.values() for rid, _ in found],
                )
            counters = {
                (lane, DropReason.AGE): self._dropped[lane].get(DropReason.AGE, 0) + len(found)
                for lane, found in victims.items()
            }
            self._persist_counters(counters)
        self._apply_counters(counters)
        for lane, budget in self._budgets.items():
            found = victims.get(lane, [])
            self._count[lane] -= len(found)
            self._bytes[lane] -= sum(size for _, size in found)
            if budget.max_age_s is not None:
                self._note_drops(lane, DropReason.AGE, len(found))
        self._note_total()
        self._state.save(sync=False)
        return sum(len(found) for found in victims.values())

    def _aged(self, lane: Lane, cutoff: float) -> list[tuple[int, int]]:
        """Unleased records at the head of a lane created before ``cutoff``.

        The scan follows the lane's order and stops at the first record young enough, so it
        costs what it drops rather than the whole lane; a record stamped out of order waits for
        the ones queued before it.
        """
        found: list[tuple[int, int]] = []
        for rid, t_wall, size in self._lane_rows(lane):
            if t_wall >= cutoff:
                break
            if rid not in self._leased and t_wall >= _PLAUSIBLE_WALL_S:
                found.append((rid, size))
        return found

    def _stats(self) -> OutboxStats:
        now = self.clock()
        lanes: dict[Lane, LaneStats] = {}
        for lane in Lane:
            oldest: float | None = None
            if self._count[lane]:
                row = self._conn.execute(
                    "SELECT t_wall FROM records WHERE lane = ? ORDER BY id LIMIT 1", (int(lane),)
                ).fetchone()
                oldest = None if row is None else max(0.0, now - float(row[0]))
            lanes[lane] = LaneStats(
                queued=self._count[lane],
                queued_bytes=self._bytes[lane],
                oldest_age_s=oldest,
                leased=self._leased_count[lane],
                dropped={str(reason): n for reason, n in self._dropped[lane].items()},
            )
        return OutboxStats(
            lanes=lanes,
            total_bytes=sum(self._bytes.values()),
            recovered_from=tuple(self._recovered),
            epoch=self._epoch,
            losses=tuple(self._losses),
            degraded=self._space.degraded,
            dead_letters=self._dead,
        )

    # --- state-change logging ----------------------------------------------------------------------

    def _note_drops(self, lane: Lane, reason: DropReason, n: int) -> None:
        key = (lane, reason)
        total = self._dropped[lane].get(reason, 0)
        why = DROP_WHY[reason]
        if n and key not in self._dropping:
            self._dropping.add(key)
            _LOG.warning(
                "outbox %s: lane %s: dropping records %s (%s): %d now, %d in all",
                self._path,
                lane.name.lower(),
                why,
                self._budgets[lane].policy.name,
                n,
                total,
            )
        elif n:
            _LOG.debug("outbox %s: lane %s: dropped %d more %s", self._path, lane.name.lower(), n, why)
        elif key in self._dropping:
            self._dropping.discard(key)
            _LOG.info(
                "outbox %s: lane %s: no longer dropping records %s: %d dropped in all",
                self._path,
                lane.name.lower(),
                why,
                total,
            )

    def _note_total(self) -> None:
        if self._total_max is None:
            return
        total = sum(self._bytes.values())
        over = total > self._total_max
        if over and not self._over_total:
            _LOG.warning(
                "outbox %s: %d bytes queued, over the total budget of %d: what is left cannot be dropped "
                "(alarms are never dropped, leased records are in flight): the uplink must catch up",
                self._path,
                total,
                self._total_max,
            )
        elif self._over_total and not over:
            _LOG.info(
                "outbox %s: back within the total budget (%d of %d bytes)", self._path, total, self._total_max
            )
        self._over_total = over
