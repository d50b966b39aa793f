"""One gateway per state directory: an advisory lock held for the life of the process.

Two gateways on one state directory would share one outbox, one site key and one MQTT client id:
the broker would hand the session back and forth between them and the twin could not tell their
records apart.  The lock is ``flock(2)`` on ``<state_dir>/edgetwin.lock``: the kernel releases it
when the process dies, however it dies, so a stale lock file never blocks a restart.  The file
holds the holder's PID so the second gateway can say which process is in the way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from gateway.errors import ConfigError

LOCK_NAME = "edgetwin.lock"


class StateDirBusyError(ConfigError):
    """Another process holds the state directory's lock."""

    def __init__(self, state_dir: Path, pid: int | None, command: str) -> None:
        self.state_dir = state_dir
        self.pid = pid
        who = f"PID {pid}" + (f" ({command})" if command else "") if pid else "another process"
        super().__init__(
            f"edgetwin run {state_dir}: the state directory is in use by {who}: "
            "one gateway per state directory (they would share one outbox and one MQTT client id): "
            "stop the running gateway first (systemctl stop edgetwin), or give this one its own "
            "gateway.state_dir"
        )


def _command_of(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:200]


def holder(state_dir: Path) -> int | None:
    """The PID of the gateway holding ``state_dir``, or None when no process holds it."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[Path]:
    """Hold the state directory's lock; raise :class:`StateDirBusyError` naming the holder."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"edgetwin run {state_dir}: cannot create the lock file: {exc.strerror}: "
            "make gateway.state_dir a directory the gateway's user can write"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            pid = int(text) if text.isdigit() else None
            raise StateDirBusyError(state_dir, pid, _command_of(pid) if pid else "") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        # Closing the descriptor releases the lock; the file stays (removing it would race a
        # starting gateway that has it open but not yet locked).
        os.close(fd)
