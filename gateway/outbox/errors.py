"""Classification of SQLite errors: the one place that looks at result codes and messages."""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from gateway.errors import ConfigError, CorruptDataError, EdgetwinError, TransientError


class Fault(enum.Enum):
    FULL = "full"  # the disk is full: degrade (alarms only) until space returns
    CORRUPT = "corrupt"  # set the file aside and start a fresh one
    CONFIG = "config"  # the path cannot work: retrying will not help
    TRANSIENT = "transient"  # busy, I/O error: may clear by itself


# SQLite primary result codes (the low byte of an extended code).
_FAULT_BY_CODE: Mapping[int, Fault] = {
    sqlite3.SQLITE_FULL: Fault.FULL,
    sqlite3.SQLITE_CORRUPT: Fault.CORRUPT,
    sqlite3.SQLITE_NOTADB: Fault.CORRUPT,
    sqlite3.SQLITE_CANTOPEN: Fault.CONFIG,
    sqlite3.SQLITE_READONLY: Fault.CONFIG,
    sqlite3.SQLITE_PERM: Fault.CONFIG,
    sqlite3.SQLITE_AUTH: Fault.CONFIG,
}
# Errors raised by the sqlite3 module itself carry no code; these messages are SQLite's own
# wording for corruption (sqlite3ErrStr), the only way to recognise it then.
_CORRUPT_MESSAGES = ("database disk image is malformed", "file is not a database")


def classify(exc: sqlite3.Error) -> Fault:
    """What a SQLite error means for the outbox."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _FAULT_BY_CODE:
        return _FAULT_BY_CODE[code & 0xFF]
    message = str(exc).lower()
    if any(m in message for m in _CORRUPT_MESSAGES):
        return Fault.CORRUPT
    return Fault.TRANSIENT


class CorruptDatabaseError(Exception):
    """A database SQLite can read but that fails our checks (quick_check, schema, values)."""


def to_error(path: Path, what: str, exc: sqlite3.Error) -> EdgetwinError:
    """The gateway error for a SQLite error met while doing ``what``."""
    where = f"outbox {path}"
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    fault = classify(exc)
    if fault is Fault.CORRUPT:
        return CorruptDataError(
            f"{where}: {what} failed: {exc} ({name}) again on a fresh database: check the disk (dmesg)"
        )
    if fault is Fault.CONFIG:
        return ConfigError(
            f"{where}: {what} failed: {exc} ({name}): make the file and its directory writable "
            "by the gateway's user or configure another outbox path"
        )
    return TransientError(
        f"{where}: {what} failed: {exc} ({name}): retried later; check free disk space if it persists"
    )
