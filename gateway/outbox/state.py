"""The state file: what must outlive the outbox's database - its epoch, the id floor, the drop counters.

Written in place after every change (no fsync: a killed process leaves exact numbers behind) and
made durable at most a second later; two checksummed slots so that a torn write leaves the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.contracts import Lane
from gateway.errors import TransientError
from gateway.outbox.records import DropReason, LastDrop, LossEvent

_LOG = logging.getLogger("gateway.outbox")

_SYNC_EVERY_S = 1.0  # counters and queue sizes are durable at most this late


_STATE_MAGIC = b"ETOS"
_STATE_SLOT = 4096
_STATE_HEAD = struct.Struct(">4sQII")  # magic, generation, crc32 of the body, body length


class StateFile:
    """A small file that outlives the database: its epoch, the id floor, the drop counters.

    Two fixed slots written in turn, each with a generation number and a checksum: a write torn
    by a power cut leaves the other slot intact.  The file is allocated once at its full size and
    then only overwritten in place, so saving needs no new disk blocks and works on a full disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._generation = 0

    def load(self) -> dict[str, Any] | None:
        """The newest intact state, or None when there is none (no file, both slots damaged)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        best: tuple[int, dict[str, Any]] | None = None
        for slot in range(2):
            chunk = data[slot * _STATE_SLOT : (slot + 1) * _STATE_SLOT]
            if len(chunk) < _STATE_HEAD.size:
                continue
            magic, generation, crc, length = _STATE_HEAD.unpack_from(chunk)
            body = chunk[_STATE_HEAD.size : _STATE_HEAD.size + length]
            if magic != _STATE_MAGIC or len(body) != length or zlib.crc32(body) != crc:
                continue
            try:
                state = json.loads(body)
            except ValueError:
                continue
            if isinstance(state, dict) and (best is None or generation > best[0]):
                best = (generation, state)
        if best is None:
            return None
        self._generation = best[0]
        return best[1]

    def save(self, state: Mapping[str, Any], *, sync: bool = True) -> None:
        """Write ``state`` into the older slot, durably with ``sync`` (OSError when the disk refuses)."""
        body = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        if _STATE_HEAD.size + len(body) > _STATE_SLOT:
            raise ValueError(f"outbox state of {len(body)} bytes does not fit a {_STATE_SLOT}-byte slot")
        generation = self._generation + 1
        slot = generation % 2
        record = _STATE_HEAD.pack(_STATE_MAGIC, generation, zlib.crc32(body), len(body)) + body
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 2 * _STATE_SLOT:
                # Allocated once at its full size: later saves overwrite blocks it already has.
                os.posix_fallocate(fd, 0, 2 * _STATE_SLOT)
            os.pwrite(fd, record.ljust(_STATE_SLOT, b"\0"), slot * _STATE_SLOT)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._generation = generation

    def sync(self) -> None:
        """Make what was written durable."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StateKeeper:
    """Saves the store's state (from ``data``) when it is dirty; fsyncs at most a second later."""

    def __init__(self, db: Path, data: Callable[[], dict[str, Any]]) -> None:
        self._db = db
        self._file = StateFile(Path(f"{db}.state"))
        self._data = data
        self.dirty = False
        self._unsynced = False
        self._synced_at = 0.0
        self._failing = False

    @property
    def path(self) -> Path:
        """Where the state file lives."""
        return self._file.path

    def load(self) -> dict[str, Any] | None:
        """The newest intact state, or None."""
        return self._file.load()

    def save(self, *, sync: bool, required: bool = False) -> None:
        """Write the state file if it changed; fsync it when ``sync`` or a second after the last fsync.

        Written after every change - one small write, no fsync - so a killed process leaves exact
        numbers behind; made durable against a power cut at most a second later.
        """
        now = time.monotonic()
        due = sync or now - self._synced_at >= _SYNC_EVERY_S
        if not self.dirty and not (due and self._unsynced) and not required:
            return
        try:
            if self.dirty or required:
                self._file.save(self._data(), sync=due)
            elif due:
                self._file.sync()
        except OSError as exc:
            if not self._failing:
                self._failing = True
                _LOG.warning(
                    "outbox %s: cannot write the state file %s: %s: counters are kept in the database only",
                    self._db,
                    self._file.path,
                    exc.strerror or exc,
                )
            if required:
                raise TransientError(
                    f"outbox {self._db}: cannot reserve record ids in {self._file.path}: "
                    f"{exc.strerror or exc}: retried later; check the disk"
                ) from exc
            return
        if self._failing:
            self._failing = False
            _LOG.info("outbox %s: state file written again", self._db)
        self.dirty = False
        self._unsynced = not due
        if due:
            self._synced_at = now


@dataclass(frozen=True, slots=True)
class KnownState:
    """What the state file said at open."""

    epoch: int = 0
    floor: int = 0
    last_id: int = 0
    queued: Mapping[Lane, int] = field(default_factory=dict)
    dropped: Mapping[tuple[Lane, DropReason], int] = field(default_factory=dict)
    losses: tuple[LossEvent, ...] = ()
    last_drop: LastDrop | None = None


def parse_state(state: Mapping[str, Any] | None) -> KnownState:
    """Read the state file's data, keeping what makes sense of it."""
    if state is None:
        return KnownState()

    def number(key: str) -> int:
        value = state.get(key)
        return value if isinstance(value, int) and value > 0 else 0

    queued: dict[Lane, int] = {}
    raw_queued = state.get("queued")
    if isinstance(raw_queued, Mapping):
        for name, n in raw_queued.items():
            with contextlib.suppress(KeyError, ValueError, TypeError):
                queued[Lane[str(name).upper()]] = max(0, int(n))
    dropped: dict[tuple[Lane, DropReason], int] = {}
    raw_dropped = state.get("dropped")
    if isinstance(raw_dropped, Mapping):
        for key, n in raw_dropped.items():
            with contextlib.suppress(KeyError, ValueError, TypeError):
                lane_name, reason = str(key).split(".", 1)
                dropped[(Lane[lane_name.upper()], DropReason(reason))] = max(0, int(n))
    losses: list[LossEvent] = []
    raw_losses = state.get("losses")
    if isinstance(raw_losses, list):
        for entry in raw_losses:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                losses.append(LossEvent.from_dict(entry))
    last_drop = None
    raw_last = state.get("last_drop")
    if isinstance(raw_last, Mapping):
        with contextlib.suppress(KeyError, ValueError, TypeError):
            last_drop = LastDrop.from_dict(raw_last)
    return KnownState(
        number("epoch"), number("floor"), number("last_id"), queued, dropped, tuple(losses), last_drop
    )
