"""What a write made durable: the files and folders ``os.fsync`` was called on, in order.

A power cut cannot be had in a test; what survives one can be read off the syncs: a file replaced
through a rename must have its new data synced before the rename and its folder after it.  A slow
disk is had by making each sync take longer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest


@contextlib.contextmanager
def syncs(monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> Iterator[list[Path]]:
    """The paths of the descriptors ``os.fsync`` is called on in the block, from any thread, in order; each sync ``delay_s`` slower."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        time.sleep(delay_s)
        real_fsync(fd)
        synced.append(path)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        yield synced


def synced_during(monkeypatch: pytest.MonkeyPatch, write: Callable[[], object]) -> list[Path]:
    """Run ``write``; the paths of the descriptors ``os.fsync`` was called on meanwhile, in order."""
    with syncs(monkeypatch) as synced:
        write()
    return synced


def landed(written: Future[None] | None) -> None:
    """Wait for a state file's write, asked of its worker thread, to be on disk (raise what it raised)."""
    assert written is not None, "nothing was asked to be written"
    written.result(timeout=30)
