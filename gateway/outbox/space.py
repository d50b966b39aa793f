"""Full disk: a reserve of disk space held for when the disk fills, and the degraded state around it.

The outbox holds ``<name>.reserve`` (allocated, never written).  At the first ``SQLITE_FULL`` it
is given back to the filesystem: alarms, acknowledgements and checkpoints find room in it while
lower lanes are refused.  Once twice the reserve is free again, it is taken back and the outbox
accepts every lane.  Nothing here touches the database: the store empties its log and gives pages
back before asking whether space has returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

_LOG = logging.getLogger("gateway.outbox")

MiB = 1024 * 1024
DEFAULT_RESERVE_BYTES = 4 * MiB
_CHECK_EVERY_S = 1.0


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class DiskReserve:
    """The reserve file and whether the outbox is degraded for lack of space (a reason, or None)."""

    def __init__(self, db: Path, reserve_bytes: int) -> None:
        self._db = db
        self.path = Path(f"{db}.reserve")
        self.size = max(0, reserve_bytes)
        self.degraded: str | None = None
        self._logged = False
        self._checked_at = 0.0

    def take(self) -> bool:
        """Hold the reserve (allocate it if needed); True when held or none is wanted."""
        if not self.size:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.enter_degraded(self._no_room(exc))
            return False
        return True

    def _no_room(self, exc: OSError) -> str:
        """Why the reserve could not be taken: a full disk, or a filesystem too small ever to hold it."""
        try:
            st = os.statvfs(self._db.parent)
        except OSError:
            return f"the disk is full (no room for the {self.size}-byte reserve: {exc.strerror or exc})"
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if total < 2 * self.size:
            # Twice the reserve free is what ends the degraded state: it can never come here.
            return (
                f"the filesystem of {self._db.parent} holds {total} bytes in all, too few for the "
                f"{self.size}-byte reserve and twice that free to leave this state: give the state "
                "directory a larger filesystem"
            )
        return f"the disk is full ({free} bytes free, too few for the {self.size}-byte reserve)"

    def release(self, why: str) -> None:
        """Give the reserve back to the filesystem: the disk is full."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.enter_degraded(f"the disk is full ({why})")

    def enter_degraded(self, why: str) -> None:
        """Note the degraded state: loudly the first time in a process, as a WARNING after that."""
        if self.degraded is not None:
            return
        self.degraded = why
        if not self._logged:
            self._logged = True
            _LOG.critical(
                "outbox %s: %s: alarms are still written (into the reserve) and the backlog is still "
                "delivered; features and diagnostics are refused and counted until space returns: free "
                "space on %s",
                self._db,
                why,
                self._db.parent,
            )
        else:
            _LOG.warning("outbox %s: %s again: refusing features and diagnostics", self._db, why)

    def due(self) -> bool:
        """True at most once a second: time to look whether space has returned."""
        now = time.monotonic()
        if now - self._checked_at < _CHECK_EVERY_S:
            return False
        self._checked_at = now
        return True

    def try_recover(self) -> bool:
        """Take the reserve back if twice it is free again; True when no longer degraded."""
        try:
            free = free_bytes(self._db.parent)
        except OSError:
            return False
        if free < max(2 * self.size, MiB):
            return False
        why, self.degraded = self.degraded, None
        if not self.take():
            return False
        _LOG.info("outbox %s: space is back (was: %s): accepting every lane again", self._db, why)
        return True


__all__ = ["DEFAULT_RESERVE_BYTES", "DiskReserve", "free_bytes"]
