"""What a write made durable: the files and folders ``os.fsync`` was called on, in order.

A power cut cannot be had in a test; what survives one can be read off the syncs: a file replaced
through a rename must have its new data synced before the rename and its folder after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def synced_during(monkeypatch: pytest.MonkeyPatch, write: Callable[[], object]) -> list[Path]:
    """Run ``write``; the paths of the descriptors ``os.fsync`` was called on meanwhile, in order."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        write()
    return synced
