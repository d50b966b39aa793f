"""An append-only, hash-chained audit log of what the downlink received, verified, applied or refused.

One JSON object a line; each names the hash of the line before (``prev``) and its own ``hash`` =
SHA-256 over ``prev`` and the canonical form of the entry without ``hash``.  Editing, removing or
reordering a line breaks the chain from there on; the head (the last hash) is in the reported
state, so a log cut short or rewritten from the start no longer matches what the twin has seen.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.downlink.errors import AuditTamperedError
from gateway.downlink.signing import canonical

GENESIS = "0" * 64


def _hash(prev: str, entry: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + canonical(entry)).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    """Where the chain stands: how many entries and the last hash."""

    count: int
    hash: str


def verify(path: Path) -> Head:
    """Walk the chain; AuditTamperedError naming the first line that does not verify."""
    prev, count = GENESIS, 0
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return Head(0, GENESIS)
    for number, line in enumerate(lines, 1):
        where = f"downlink audit log {path}: line {number}"
        try:
            entry = json.loads(line)
            stated = entry.pop("hash")
        except (ValueError, KeyError, AttributeError) as exc:
            raise AuditTamperedError(f"{where}: not an audit entry ({exc}): the log was altered") from exc
        if entry.get("prev") != prev:
            raise AuditTamperedError(
                f"{where}: does not follow the line before: lines were removed or reordered"
            )
        if entry.get("seq") != number:
            raise AuditTamperedError(
                f"{where}: sequence {entry.get('seq')!r}, expected {number}: the log was altered"
            )
        if _hash(prev, entry) != stated:
            raise AuditTamperedError(f"{where}: its hash does not match its content: the line was edited")
        prev, count = stated, number
    return Head(count, prev)


class AuditLog:
    """Appends entries, each written and flushed to disk before the step it records goes on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # The chain is verified on open: a log found broken is set aside, not appended to.
        try:
            self.head = verify(path)
        except AuditTamperedError:
            aside = path.with_name(f"{path.name}.broken-{int(dt.datetime.now(dt.UTC).timestamp())}")
            path.replace(aside)
            self.head = Head(0, GENESIS)
            self.append(
                "audit-log-set-aside", detail=f"the previous log did not verify: kept as {aside.name}"
            )

    def append(self, event: str, *, version: int | None = None, detail: str = "", **extra: Any) -> Head:
        """Record one event; returns the new head."""
        entry: dict[str, Any] = {
            "seq": self.head.count + 1,
            "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "event": event,
            "prev": self.head.hash,
        }
        if version is not None:
            entry["version"] = version
        if detail:
            entry["detail"] = detail
        entry.update(extra)
        digest = _hash(self.head.hash, entry)
        line = json.dumps({**entry, "hash": digest}, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.head = Head(entry["seq"], digest)
        return self.head
