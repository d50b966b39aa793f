"""Corruption recovery: checking the write-ahead log, setting damaged files aside, new epochs."""

from __future__ import annotations

import logging
import os
import secrets
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
