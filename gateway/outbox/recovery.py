"""Corruption recovery: checking the write-ahead log, setting damaged files aside, new epochs."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sqlite3
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import CorruptDataError

_LOG = logging.getLogger("gateway.outbox")

_WAL_MAGICS = (0x377F0682, 0x377F0683)  # the two byte orders of SQLite's WAL header checksum
_WAL_VERSION = 3007000


def check_wal_header(wal: Path) -> str | None:
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


def new_epoch() -> int:
    """A random id for a new database: 1 .. 2**31 - 1 (0 never names an epoch)."""
    return secrets.randbelow(2**31 - 1) + 1


def shorten(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters for a log line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: Path, why: str, *, wal_only: bool) -> Path:
    """Rename the damaged file(s) out of the way, loudly; return the name it was set aside as."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    source = Path(f"{path}-wal") if wal_only else path
    base = source.with_name(f"{source.name}.corrupt-{stamp}")
    k = 0
    while any(Path(f"{base}{s}").exists() for s in ("", "-wal", "-shm")):
        k += 1
        base = source.with_name(f"{source.name}.corrupt-{stamp}-{k}")
    if wal_only:
        moves = [(source, base), (Path(f"{path}-shm"), Path(f"{base}-shm"))]
    else:
        # The main file moves first: should a later rename fail, no fresh database is created
        # next to a log that belongs to the old one.
        moves = [(Path(f"{path}{s}"), Path(f"{base}{s}")) for s in ("", "-wal", "-shm")]
    try:
        for src, dst in moves:
            if src.exists():
                src.rename(dst)
        fsync_directory(path.parent)
    except OSError as exc:
        raise CorruptDataError(
            f"outbox {path}: the database is unreadable ({why}) and cannot be set aside: "
            f"{exc.strerror or exc}: move {path} and its -wal/-shm files away by hand"
        ) from exc
    if wal_only:
        _LOG.critical(
            "outbox %s: write-ahead log unreadable: %s: set aside as %s and opened the database without "
            "it: records committed only to that log were not delivered; the file is kept for inspection",
            path,
            why,
            base,
        )
    else:
        _LOG.critical(
            "outbox %s: database unreadable: %s: set aside as %s and started an empty outbox: "
            "the set-aside file can be inspected with sqlite3; records in it were not delivered",
            path,
            why,
            base,
        )
    return base


# --- the write-ahead log's frames ----------------------------------------------------------------

_WAL_HEADER = 32
_FRAME_HEADER = 24


@dataclass(frozen=True, slots=True)
class WalScan:
    """What a walk over a write-ahead log's frames found."""

    frames: int  # frames SQLite will use: up to the last commit before the first bad frame
    broken_at: int | None  # index of the first frame that fails its checksum, None when none does
    committed_after: int  # commit frames of this log (its salts) found after the broken one


def _wal_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum (sqlite3 walChecksumBytes), continued from ``s0, s1``."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & mask
        s1 = (s1 + words[i + 1] + s0) & mask
    return s0, s1


def scan_wal(wal: Path) -> WalScan | None:
    """Walk a write-ahead log's frames as SQLite's recovery does; None when there is no usable log.

    SQLite stops at the first frame whose checksum fails and uses the log up to the last commit
    before it, silently: committed transactions behind a damaged frame are lost.  Frames written
    by an earlier generation of the log (other salts) are normal leftovers; a commit frame with
    this generation's salts *behind* a broken frame is the sign that committed data was lost.
    """
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _WAL_HEADER or check_wal_header(wal) is not None:
        return None
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:_WAL_HEADER])
    big = magic & 1 == 1
    s0, s1 = _wal_checksum(data[:24], 0, 0, big)
    if (s0, s1) != (c0, c1):
        return WalScan(frames=0, broken_at=0, committed_after=0)
    frame_size = _FRAME_HEADER + page_size
    n = (len(data) - _WAL_HEADER) // frame_size
    usable = 0
    broken: int | None = None
    after = 0
    for i in range(n):
        off = _WAL_HEADER + i * frame_size
        _page, commit, f1, f2, k0, k1 = struct.unpack(">6I", data[off : off + _FRAME_HEADER])
        ours = (f1, f2) == (salt1, salt2)
        if broken is None:
            if not ours:
                break  # an older generation's leftovers: the log ends here
            s0, s1 = _wal_checksum(data[off : off + 8], s0, s1, big)
            s0, s1 = _wal_checksum(data[off + _FRAME_HEADER : off + frame_size], s0, s1, big)
            if (s0, s1) != (k0, k1):
                broken = i
                continue
            if commit:
                usable = i + 1
        elif ours and commit:
            after += 1
    return WalScan(frames=usable, broken_at=broken, committed_after=after)


def salvage_counts(db: Path) -> dict[int, int] | None:
    """Records per lane value still readable in a set-aside database, or None when it cannot be read."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return None
    try:
        rows = conn.execute("SELECT lane, COUNT(*) FROM records GROUP BY lane").fetchall()
        return {int(lane): int(n) for lane, n in rows}
    except (sqlite3.Error, ValueError, TypeError):
        return None
    finally:
        conn.close()


def keep_copy(source: Path) -> Path | None:
    """Copy a damaged file aside for inspection (best effort: a full disk may refuse)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = source.with_name(f"{source.name}.corrupt-{stamp}")
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        _LOG.warning("outbox: cannot keep a copy of %s for inspection: %s", source, exc.strerror or exc)
        with contextlib.suppress(OSError):
            target.unlink()
        return None
    return target
