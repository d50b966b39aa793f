"""The durable outbox: a priority queue of encoded records on SQLite (WAL) between pipeline and uplink.

Contract (ARCHITECTURE.md, core abstraction 5):

* ``put_many`` commits a whole batch in one transaction: durability costs one fsync per batch,
  not one per record (group commit, PERFORMANCE.md).
* ``lease(n)`` hands out up to ``n`` records, alarms first, then oldest first inside a lane.  A
  leased record is not handed out again until it is released.  Leases live in memory only: after
  a restart or a crash every un-acknowledged record is queued again (at-least-once; the uplink's
  sequence numbers let the twin drop duplicates).  How often a record was leased is persisted.
* ``ack`` deletes.  Nothing is deleted before it is acknowledged, except by a lane's stated full
  policy, and every such drop is counted (persisted) and logged as a state change.
* Record ids are never reused (AUTOINCREMENT), so they serve as the gateway's sequence numbers;
  a fresh database gets a new random :attr:`Outbox.epoch`, so a sequence that restarts after a
  corruption recovery is told apart from loss.  ``lease`` can be limited to an id range, which lets
  the uplink send live records first and replay an older backlog behind them.
* Full policy (:data:`DEFAULT_BUDGETS`): alarms are never dropped, even past the total budget;
  features drop their oldest records (a stale feature is worth less than a fresh one);
  diagnostics refuse the newest (the first diagnostics of an outage explain it best).
* A corrupt or unreadable database is renamed to ``<name>.corrupt-<UTC time>``, its ``-wal`` and
  ``-shm`` alongside so that ``sqlite3 <name>.corrupt-<UTC time>`` opens it with its log, logged at
  CRITICAL, and a fresh database is started: the gateway recovers without a human.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from gateway.cleanup import finish_shielded
from gateway.contracts import Lane
from gateway.errors import ConfigError, CorruptDataError, EdgetwinError, TransientError

_LOG = logging.getLogger(__name__)

_T = TypeVar("_T")

MiB = 1024 * 1024
_DAY_S = 86_400.0

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

_WAL_MAGICS = (0x377F0682, 0x377F0683)  # the two byte orders of SQLite's WAL header checksum
_WAL_VERSION = 3007000


class FullPolicy(enum.Enum):
    """What a lane does when it is over its byte or age budget."""

    NEVER_DROP = "never_drop"  # keep everything, even past the total budget (alarms)
    DROP_OLDEST = "drop_oldest"  # delete the oldest records that are not leased
    DROP_NEWEST = "drop_newest"  # refuse the newest incoming records


class DropReason(enum.StrEnum):
    """Why records left the outbox without an acknowledgement."""

    BUDGET = "budget"  # over the lane's byte budget or the outbox's total budget
    AGE = "age"  # older than the lane's age budget
    CORRUPT = "corrupt"  # in a database file that had to be set aside while running


@dataclass(frozen=True, slots=True)
class OutItem:
    """A record going into the outbox."""

    lane: Lane
    topic: str  # relative topic, already anonymized, e.g. "features/k3j2..."
    payload: bytes
    t_wall: float  # creation time (epoch s), used for the age budget


@dataclass(frozen=True, slots=True)
class Leased:
    """A record handed to the uplink; it stays in the outbox until acknowledged."""

    id: int
    lane: Lane
    topic: str
    payload: bytes
    t_wall: float
    attempts: int  # how many times it was leased before (0 on the first lease), persisted


@dataclass(frozen=True, slots=True)
class LaneBudget:
    """How much one lane may hold and what happens beyond that."""

    max_bytes: int | None  # None = unbounded for this lane
    max_age_s: float | None  # None = never ages out
    policy: FullPolicy


DEFAULT_BUDGETS: Mapping[Lane, LaneBudget] = {
    Lane.ALARMS: LaneBudget(None, None, FullPolicy.NEVER_DROP),
    Lane.FEATURES: LaneBudget(192 * MiB, 7 * _DAY_S, FullPolicy.DROP_OLDEST),
    Lane.DIAGNOSTICS: LaneBudget(16 * MiB, 2 * _DAY_S, FullPolicy.DROP_NEWEST),
}
DEFAULT_TOTAL_MAX_BYTES = 256 * MiB


@dataclass(frozen=True, slots=True)
class LaneStats:
    """The state of one lane."""

    queued: int  # un-acknowledged records, leased ones included
    queued_bytes: int  # payload plus topic bytes
    oldest_age_s: float | None  # age of the lane's head record, None when the lane is empty
    leased: int
    dropped: Mapping[str, int]  # by DropReason, since this database file was created


@dataclass(frozen=True)
class OutboxStats:
    """A snapshot of the outbox for health reports and tests."""

    lanes: Mapping[Lane, LaneStats]
    total_bytes: int
    recovered_from: tuple[Path, ...]  # files this process set aside as corrupt

    @property
    def queued(self) -> int:
        """Un-acknowledged records in all lanes."""
        return sum(s.queued for s in self.lanes.values())

    @property
    def dropped(self) -> Mapping[Lane, Mapping[str, int]]:
        """Dropped records per lane and reason."""
        return {lane: s.dropped for lane, s in self.lanes.items()}

    @property
    def dropped_total(self) -> int:
        """Dropped records of every lane and reason."""
        return sum(sum(s.dropped.values()) for s in self.lanes.values())


def record_size(item: OutItem) -> int:
    """The bytes a record counts against its budgets: payload plus UTF-8 topic."""
    return len(item.payload) + len(item.topic.encode())


# --- budget planning (pure: stored records come in as an iterator) -----------------------------


class _LanePlan:
    """What one batch does to one lane: the slice of incoming records kept, stored records dropped."""

    __slots__ = ("_stored", "_stored_factory", "deleted", "deleted_bytes", "end", "first", "policy", "sizes")

    def __init__(
        self, policy: FullPolicy, sizes: list[int], stored: Callable[[], Iterator[tuple[int, int]]]
    ) -> None:
        self.policy = policy
        self.sizes = sizes  # of the incoming records of this lane, in batch order
        self.first = 0  # incoming records [first, end) are kept
        self.end = len(sizes)
        self.deleted: list[int] = []  # ids of stored records to delete
        self.deleted_bytes = 0
        self._stored_factory = stored
        self._stored: Iterator[tuple[int, int]] | None = None

    @property
    def kept_bytes(self) -> int:
        """Bytes of the incoming records that will be inserted."""
        return sum(self.sizes[self.first : self.end])

    @property
    def dropped(self) -> int:
        """Records this batch drops in this lane: refused incoming plus deleted stored ones."""
        return len(self.sizes) - (self.end - self.first) + len(self.deleted)

    def drop(self, need: int) -> int:
        """Drop records by the lane's policy until ``need`` bytes are freed; return bytes freed."""
        freed = 0
        if self.policy is FullPolicy.DROP_NEWEST:
            while freed < need and self.end > self.first:
                self.end -= 1
                freed += self.sizes[self.end]
        elif self.policy is FullPolicy.DROP_OLDEST:
            # Stored records are older than anything in this batch, so they go first.
            if self._stored is None:
                self._stored = self._stored_factory()
            while freed < need:
                nxt = next(self._stored, None)
                if nxt is None:
                    break
                self.deleted.append(nxt[0])
                self.deleted_bytes += nxt[1]
                freed += nxt[1]
            while freed < need and self.first < self.end:
                freed += self.sizes[self.first]
                self.first += 1
        return freed


# --- classification of SQLite errors (the one place that looks at codes and messages) -----------


_DROP_WHY: Mapping[DropReason, str] = {
    DropReason.BUDGET: "over a byte budget",
    DropReason.AGE: "older than the age budget",
    DropReason.CORRUPT: "in a corrupt file",
}


class _Fault(enum.Enum):
    CORRUPT = "corrupt"  # set the file aside and start a fresh one
    CONFIG = "config"  # the path cannot work: retrying will not help
    TRANSIENT = "transient"  # busy, I/O error, disk full: may clear by itself


# SQLite primary result codes (the low byte of an extended code).
_FAULT_BY_CODE: Mapping[int, _Fault] = {
    sqlite3.SQLITE_CORRUPT: _Fault.CORRUPT,
    sqlite3.SQLITE_NOTADB: _Fault.CORRUPT,
    sqlite3.SQLITE_CANTOPEN: _Fault.CONFIG,
    sqlite3.SQLITE_READONLY: _Fault.CONFIG,
    sqlite3.SQLITE_PERM: _Fault.CONFIG,
    sqlite3.SQLITE_AUTH: _Fault.CONFIG,
}
# Errors raised by the sqlite3 module itself carry no code; these messages are SQLite's own
# wording for corruption (sqlite3ErrStr), the only way to recognise it then.
_CORRUPT_MESSAGES = ("database disk image is malformed", "file is not a database")


def _classify(exc: sqlite3.Error) -> _Fault:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _FAULT_BY_CODE:
        return _FAULT_BY_CODE[code & 0xFF]
    message = str(exc).lower()
    if any(m in message for m in _CORRUPT_MESSAGES):
        return _Fault.CORRUPT
    return _Fault.TRANSIENT


class _CorruptDatabaseError(Exception):
    """A database SQLite can read but that fails our checks (quick_check, schema, values)."""


def _check_wal_header(wal: Path) -> str | None:
    """Why a ``-wal`` file is not a SQLite write-ahead log, or None when it is one (or empty)."""
    try:
        with wal.open("rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        return None
    if not head:
        return None
    if len(head) < 8:
        return f"the write-ahead log is {len(head)} bytes long, shorter than its header"
    magic, version = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")
    if magic not in _WAL_MAGICS or version != _WAL_VERSION:
        return f"the write-ahead log header is not SQLite's (magic {magic:#010x}, version {version})"
    return None


def _new_epoch() -> int:
    """A random id for a new database: 1 .. 2**31 - 1 (0 never names an epoch)."""
    return secrets.randbelow(2**31 - 1) + 1


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        bad_wal = _check_wal_header(Path(f"{self._path}-wal"))
        if bad_wal is not None:
            self._set_aside(bad_wal, wal_only=True)
        try:
            return self._open_db()
        except _CorruptDatabaseError as exc:
            why = str(exc)
        except sqlite3.Error as exc:
            if _classify(exc) is not _Fault.CORRUPT:
                raise self._error("open", exc) from exc
            why = f"{exc} ({getattr(exc, 'sqlite_errorname', 'no code')})"
        self._set_aside(why, wal_only=False)
        try:
            return self._open_db()
        except (sqlite3.Error, _CorruptDatabaseError) as exc:
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
            raise _CorruptDatabaseError(f"quick_check failed: {_shorten(found)}")
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
            conn.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (_new_epoch(),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _verify_schema(conn: sqlite3.Connection, tables: set[str]) -> None:
        if not {"records", "meta"} <= tables:
            raise _CorruptDatabaseError(f"not an outbox database (tables: {', '.join(sorted(tables))})")
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(records)"))
        if columns != _RECORD_COLUMNS:
            raise _CorruptDatabaseError(f"unexpected columns in records: {', '.join(columns)}")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            raise _CorruptDatabaseError(
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
                raise _CorruptDatabaseError(f"{n} records in unknown lane {lane_value!r}") from exc
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
        epoch = _new_epoch()
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    def _set_aside(self, why: str, *, wal_only: bool) -> Path:
        """Rename the damaged file(s) out of the way, loudly; return the name it was set aside as."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        source = Path(f"{self._path}-wal") if wal_only else self._path
        base = source.with_name(f"{source.name}.corrupt-{stamp}")
        k = 0
        while any(Path(f"{base}{s}").exists() for s in ("", "-wal", "-shm")):
            k += 1
            base = source.with_name(f"{source.name}.corrupt-{stamp}-{k}")
        if wal_only:
            moves = [(source, base), (Path(f"{self._path}-shm"), Path(f"{base}-shm"))]
        else:
            # The main file moves first: should a later rename fail, no fresh database is created
            # next to a log that belongs to the old one.
            moves = [(Path(f"{self._path}{s}"), Path(f"{base}{s}")) for s in ("", "-wal", "-shm")]
        try:
            for src, dst in moves:
                if src.exists():
                    src.rename(dst)
            _fsync_directory(self._path.parent)
        except OSError as exc:
            raise CorruptDataError(
                f"outbox {self._path}: the database is unreadable ({why}) and cannot be set aside: "
                f"{exc.strerror or exc}: move {self._path} and its -wal/-shm files away by hand"
            ) from exc
        if wal_only:
            _LOG.critical(
                "outbox %s: write-ahead log unreadable: %s: set aside as %s and opened the database without "
                "it: records committed only to that log were not delivered; the file is kept for inspection",
                self._path,
                why,
                base,
            )
        else:
            _LOG.critical(
                "outbox %s: database unreadable: %s: set aside as %s and started an empty outbox: "
                "the set-aside file can be inspected with sqlite3; records in it were not delivered",
                self._path,
                why,
                base,
            )
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
        except (sqlite3.Error, _CorruptDatabaseError) as exc:
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
            if _classify(exc) is not _Fault.CORRUPT:
                raise self._error(what, exc) from exc
            why = f"{exc} ({getattr(exc, 'sqlite_errorname', 'no code')}) during {what}"
        self._recover_in_place(why)
        try:
            return op()
        except sqlite3.Error as exc:
            self._rollback_quietly()
            raise self._error(what, exc) from exc

    def _rollback_quietly(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _error(self, what: str, exc: sqlite3.Error) -> EdgetwinError:
        where = f"outbox {self._path}"
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        fault = _classify(exc)
        if fault is _Fault.CORRUPT:
            return CorruptDataError(
                f"{where}: {what} failed: {exc} ({name}) again on a fresh database: check the disk (dmesg)"
            )
        if fault is _Fault.CONFIG:
            return ConfigError(
                f"{where}: {what} failed: {exc} ({name}): make the file and its directory writable "
                "by the gateway's user or configure another outbox path"
            )
        return TransientError(
            f"{where}: {what} failed: {exc} ({name}): retried later; check free disk space if it persists"
        )

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
        plans: dict[Lane, _LanePlan] = {}

        def plan(lane: Lane) -> _LanePlan:
            if lane not in plans:
                plans[lane] = _LanePlan(
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
        why = _DROP_WHY[reason]
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


__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_TOTAL_MAX_BYTES",
    "AsyncOutbox",
    "DropReason",
    "FullPolicy",
    "LaneBudget",
    "LaneStats",
    "Leased",
    "OutItem",
    "Outbox",
    "OutboxStats",
    "record_size",
]
