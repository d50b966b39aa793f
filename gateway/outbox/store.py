"""The outbox store: one SQLite database (WAL) holding the queued records; see the package for the contract."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from gateway.contracts import Lane
from gateway.errors import ConfigError, CorruptDataError
from gateway.outbox.budget import DROP_WHY, LanePlan
from gateway.outbox.errors import CorruptDatabaseError, Fault, classify, to_error
from gateway.outbox.records import (
    DEFAULT_BUDGETS,
    DEFAULT_TOTAL_MAX_BYTES,
    DropReason,
    FullPolicy,
    LaneBudget,
    LaneStats,
    Leased,
    MiB,
    OutboxStats,
    OutItem,
)
from gateway.outbox.recovery import check_wal_header, new_epoch, set_aside, shorten

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
_RECORD_COLUMNS = ("id", "lane", "topic", "payload", "t_wall", "size", "attempts")

_BUSY_TIMEOUT_S = 5.0
# A big batch can grow the log past one checkpoint; cap what stays on disk once it is reset.
_WAL_SIZE_LIMIT = 8 * MiB
# Free pages are reused by the next inserts, so only give back what exceeds a small reserve,
# and only look after enough was acknowledged for it to matter.
_VACUUM_EVERY_BYTES = 1 * MiB
_VACUUM_KEEP_PAGES = 256
_SCAN_PAGE = 512  # rows fetched per query while looking for records to drop
# A gateway without a battery-backed clock stamps records near 1970 until NTP syncs: those are
# mis-stamped, not stale, so the age budget leaves them alone (the byte budget still bounds them).
_PLAUSIBLE_WALL_S = 1_577_836_800.0  # 2020-01-01T00:00:00Z


class Outbox:
    """The durable queue. Synchronous and thread-safe: every call holds one lock."""

    def __init__(
        self,
        path: Path,
        *,
        budgets: Mapping[Lane, LaneBudget] = DEFAULT_BUDGETS,
        total_max_bytes: int | None = DEFAULT_TOTAL_MAX_BYTES,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self._path = Path(path)
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
        self._prepare_directory()
        self._conn = self._open_or_recover()

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

    def put_many(self, items: Sequence[OutItem]) -> None:
        """Store a batch in one transaction, then apply the lane and total budgets."""
        if not items:
            return
        with self._lock:
            self._require_open()
            self._guarded("put", lambda: self._put_many(items))

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
            leased = self._guarded("lease", lambda: self._lease(n, after_id, through_id))
            if leased:
                # Remembered outside the file: if it turns out corrupt, the fresh one's ids must
                # start above every id handed out from it (a late ack names one of those).
                self._high_id = max(self._high_id, *(r.id for r in leased))
            return leased

    def ack(self, ids: Iterable[int]) -> None:
        """Delete delivered records. Only leased ids are deleted; any other id is ignored."""
        wanted = list(dict.fromkeys(ids))
        with self._lock:
            self._require_open()
            self._guarded("ack", lambda: self._ack(wanted))

    def release(self, ids: Iterable[int]) -> None:
        """Return leased records to the queue, at the position they had."""
        with self._lock:
            self._require_open()
            for rid in ids:
                entry = self._leased.pop(rid, None)
                if entry is not None:
                    self._leased_count[entry[0]] -= 1

    def expire(self, now_wall: float | None = None) -> int:
        """Drop records older than their lane's age budget; return how many were dropped."""
        now = time.time() if now_wall is None else now_wall
        with self._lock:
            self._require_open()
            return self._guarded("expire", lambda: self._expire(now))

    def stats(self) -> OutboxStats:
        """A snapshot of counts, bytes, ages, leases, drops and recoveries."""
        with self._lock:
            self._require_open()
            return self._guarded("stats", self._stats)

    def close(self) -> None:
        """Close the database; later calls raise. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
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
        bad_wal = check_wal_header(Path(f"{self._path}-wal"))
        if bad_wal is not None:
            self._set_aside(bad_wal, wal_only=True)
        try:
            return self._open_db()
        except CorruptDatabaseError as exc:
            why = str(exc)
        except sqlite3.Error as exc:
            if classify(exc) is not Fault.CORRUPT:
                raise to_error(self._path, "open", exc) from exc
            why = f"{exc} ({getattr(exc, 'sqlite_errorname', 'no code')})"
        self._set_aside(why, wal_only=False)
        try:
            return self._open_db()
        except (sqlite3.Error, CorruptDatabaseError) as exc:
            raise CorruptDataError(
                f"outbox {self._path}: cannot start a fresh database after setting the old one aside: {exc}: "
                "check the disk and the directory's permissions"
            ) from exc

    def _open_db(self) -> sqlite3.Connection:
        """Open (or create) the database, check it and load the in-memory totals."""
        conn = sqlite3.connect(
            self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            self._configure_and_check(conn)
            self._load_state(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure_and_check(self, conn: sqlite3.Connection) -> None:
        # Only takes effect on a new, empty database: it must precede the first table.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigError(
                f"outbox {self._path}: cannot switch to write-ahead logging (journal mode {mode}): "
                "the filesystem may not support shared memory maps: put the outbox on a local disk"
            )
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            found = "; ".join(str(row[0]) for row in check).replace("\n", "; ")
            raise CorruptDatabaseError(f"quick_check failed: {shorten(found)}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
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
        carried = {lane: dict(reasons) for lane, reasons in self._dropped.items()}
        lost = dict(self._count)
        # Ids handed out from the old file may still be in an uplink's hands: the fresh file's ids
        # start above them, so a late ack can never delete a different record under the same id.
        floor = max(self._high_id, max(self._leased, default=0))
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
        # What this process knew about the old file carries over: its counters, and the records
        # that were still queued in it, now counted as dropped.
        for lane, n in lost.items():
            if n:
                carried[lane][DropReason.CORRUPT] = carried[lane].get(DropReason.CORRUPT, 0) + n
        self._closed = False
        counters = {(lane, reason): n for lane in Lane for reason, n in carried[lane].items()}
        with self._transaction():
            self._persist_counters(counters)
            if floor:
                self._conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (floor,))
        self._apply_counters(counters)

    def _guarded(self, what: str, op: Callable[[], _T]) -> _T:
        """Run ``op``; on corruption set the file aside and run it once more on a fresh database."""
        try:
            return op()
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            self._rollback_quietly()
            raise  # a bug in the caller (a value SQLite cannot store), not a state of the database
        except sqlite3.Error as exc:
            self._rollback_quietly()
            if classify(exc) is not Fault.CORRUPT:
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

    def _oldest_unleased(self, lane: Lane) -> Iterator[tuple[int, int]]:
        """Stored (id, size) of a lane, oldest first, skipping leased records."""
        last = 0
        while True:
            rows = self._conn.execute(
                "SELECT id, size FROM records WHERE lane = ? AND id > ? ORDER BY id LIMIT ?",
                (int(lane), last, _SCAN_PAGE),
            ).fetchall()
            if not rows:
                return
            for rid, size in rows:
                if rid not in self._leased:
                    yield int(rid), int(size)
            last = rows[-1][0]

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
            if not any(p.dropped for p in plans.values()):
                rows = [
                    (it.lane, it.topic, it.payload, it.t_wall, sz)
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
                        rows.append((item.lane, item.topic, item.payload, item.t_wall, size))
            conn.executemany(
                "INSERT INTO records (lane, topic, payload, t_wall, size) VALUES (?, ?, ?, ?, ?)", rows
            )
            counters = {
                (lane, DropReason.BUDGET): self._dropped[lane].get(DropReason.BUDGET, 0) + p.dropped
                for lane, p in plans.items()
                if p.dropped
            }
            self._persist_counters(counters)
        self._apply_counters(counters)
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

    def _persist_counters(self, counters: Mapping[tuple[Lane, DropReason], int]) -> None:
        if counters:
            self._conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [
                    (f"dropped.{lane.name.lower()}.{reason.value}", n)
                    for (lane, reason), n in counters.items()
                ],
            )

    def _apply_counters(self, counters: Mapping[tuple[Lane, DropReason], int]) -> None:
        for (lane, reason), n in counters.items():
            self._dropped[lane][reason] = n

    def _last_id(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        return 0 if row is None else int(row[0])

    def _lease(self, n: int, after_id: int = 0, through_id: int | None = None) -> list[Leased]:
        if all(self._count[lane] <= self._leased_count[lane] for lane in Lane):
            return []  # nothing to hand out: spare the uplink's polling a transaction
        upper = (1 << 63) - 1 if through_id is None else through_id
        picked: list[tuple[Leased, int]] = []
        with self._transaction() as conn:
            for lane in sorted(Lane):
                free = self._count[lane] - self._leased_count[lane]
                if free <= 0:
                    continue
                want = min(n - len(picked), free)
                # Leased records are skipped here, so at most that many extra rows are read.
                rows = conn.execute(
                    "SELECT id, topic, payload, t_wall, attempts, size FROM records "
                    "WHERE lane = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                    (int(lane), after_id, upper, want + self._leased_count[lane]),
                ).fetchall()
                for rid, topic, payload, t_wall, attempts, size in rows:
                    if rid in self._leased:
                        continue
                    picked.append((Leased(rid, lane, topic, payload, t_wall, attempts), size))
                    if len(picked) == n:
                        break
                if len(picked) == n:
                    break
            if picked:
                conn.executemany(
                    "UPDATE records SET attempts = attempts + 1 WHERE id = ?", [(r.id,) for r, _ in picked]
                )
        for record, size in picked:
            self._leased[record.id] = (record.lane, size)
            self._leased_count[record.lane] += 1
        return [record for record, _ in picked]

    def _ack(self, ids: list[int]) -> None:
        mine = [rid for rid in ids if rid in self._leased]
        if not mine:
            return
        with self._transaction() as conn:
            conn.executemany("DELETE FROM records WHERE id = ?", [(rid,) for rid in mine])
        for rid in mine:
            lane, size = self._leased.pop(rid)
            self._leased_count[lane] -= 1
            self._count[lane] -= 1
            self._bytes[lane] -= size
            self._freed_since_vacuum += size
        self._note_total()
        if self._freed_since_vacuum >= _VACUUM_EVERY_BYTES:
            self._freed_since_vacuum = 0
            self._vacuum()

    def _vacuum(self) -> None:
        """Give free pages beyond a reserve back to the filesystem, so the file does not only grow."""
        free_pages = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
        if free_pages > 2 * _VACUUM_KEEP_PAGES:
            # This pragma frees one page per step, and execute() steps a statement without result
            # columns only once; executescript() steps it to the end.
            self._conn.executescript(f"PRAGMA incremental_vacuum({free_pages - _VACUUM_KEEP_PAGES});")

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
        return sum(len(found) for found in victims.values())

    def _aged(self, lane: Lane, cutoff: float) -> list[tuple[int, int]]:
        """Unleased records at the head of a lane created before ``cutoff``.

        The scan follows the lane's order and stops at the first record young enough, so it
        costs what it drops rather than the whole lane; a record stamped out of order waits for
        the ones queued before it.
        """
        found: list[tuple[int, int]] = []
        last = 0
        while True:
            rows = self._conn.execute(
                "SELECT id, t_wall, size FROM records WHERE lane = ? AND id > ? ORDER BY id LIMIT ?",
                (int(lane), last, _SCAN_PAGE),
            ).fetchall()
            if not rows:
                return found
            for rid, t_wall, size in rows:
                if t_wall >= cutoff:
                    return found
                if rid not in self._leased and t_wall >= _PLAUSIBLE_WALL_S:
                    found.append((int(rid), int(size)))
            last = rows[-1][0]

    def _stats(self) -> OutboxStats:
        now = time.time()
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
            lanes=lanes, total_bytes=sum(self._bytes.values()), recovered_from=tuple(self._recovered)
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
