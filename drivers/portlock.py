"""Serial ports held by one program at a time, and who holds one when we cannot have it.

Two programs reading one serial port each get part of the bytes: a gateway and a firmware push
on the same node both fail slowly and silently.  Every opener in this project takes an exclusive
``flock`` on the port's descriptor (as pyserial's ``exclusive=True`` does), which the kernel drops
when the descriptor closes, however the program ends.  ``TIOCEXCL`` is not used: it outlives our
descriptor while another one stays open (a pty's other side) and would lock the gateway's own
reconnect out.  When the lock is taken, the holder is named from ``/proc/locks`` (or, for a
program that holds the port without a lock, from the descriptors in ``/proc/*/fd``).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from gateway.errors import TransientError

_PROC = Path("/proc")


class PortInUseError(TransientError):
    """Another program holds the serial port."""


def holders(path: str | os.PathLike[str]) -> list[int]:
    """PIDs of other processes that hold ``path`` locked or open (best effort, never raises)."""
    try:
        st = Path(path).stat()
        real = str(Path(path).resolve())
    except OSError:
        return []
    me = os.getpid()
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: list[int] = []
    try:
        for line in (_PROC / "locks").read_text(encoding="ascii", errors="replace").splitlines():
            parts = line.split()
            # Fields: ordinal, FLOCK, ADVISORY, WRITE, pid, major:minor:inode, start, end.
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key and parts[4].isdigit():
                pid = int(parts[4])
                if pid != me and pid not in found:
                    found.append(pid)
    except OSError:
        pass
    if found:
        return found
    for proc in _PROC.iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                if str(fd.readlink()) == real:
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return found


def describe(pids: list[int]) -> str:
    """``PID 1234 (edgetwin run)`` for each holder, or ``another program`` when none is visible."""
    if not pids:
        return "another program"
    out = []
    for pid in pids:
        try:
            raw = (_PROC / str(pid) / "cmdline").read_bytes()
            cmd = " ".join(raw.decode(errors="replace").split("\0")).strip()[:80]
        except OSError:
            cmd = ""
        out.append(f"PID {pid} ({cmd})" if cmd else f"PID {pid}")
    return ", ".join(out)


def in_use_error(who: str, path: str | os.PathLike[str]) -> PortInUseError:
    """The error for a port another program holds, naming that program."""
    return PortInUseError(
        f"{who} port {path}: in use by {describe(holders(path))}: "
        "one program at a time: stop that program (or that source of the gateway) first"
    )


def lock_exclusive(fd: int, who: str, path: str | os.PathLike[str]) -> None:
    """Take the port's exclusive lock or raise :class:`PortInUseError` naming its holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise in_use_error(who, path) from exc
        raise
