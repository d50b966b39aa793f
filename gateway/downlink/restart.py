"""Restarting the gateway process onto a new (or restored) config file.

The downlink asks for a restart, the supervisor stops in order (outbox flushed and closed, state
directory lock released), and ``edgetwin run`` then replaces its process image with a fresh one
on the same command line: the same PID, so systemd (Type=notify, MainPID) and a test holding the
process both keep following it, and nothing of the old run's state survives in memory.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

log = logging.getLogger(__name__)

_requested: list[str] = []


def request(why: str) -> None:
    """Ask ``edgetwin run`` to start again once the gateway has stopped."""
    _requested.append(why)


def requested() -> str | None:
    """Why a restart was asked for, or None."""
    return _requested[-1] if _requested else None


def exec_again() -> NoReturn:
    """Replace this process with ``python -m gateway.cli`` and the same arguments."""
    log.info("edgetwin restarting (%s)", requested())
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "gateway.cli", *sys.argv[1:]])  # noqa: S606 - our own command line, no shell
