"""Per-subject state files of the detectors learned on the gateway (commissioning, fitted state)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from gateway.privatefile import writer_of

__all__ = ["state_file", "store_json"]

log = logging.getLogger(__name__)


def state_file(state_dir: Path | None, model: str, subject: str) -> Path | None:
    """``<state_dir>/models/<model>-<hash of subject>.json``, or None without a state directory."""
    if state_dir is None:
        return None
    tag = hashlib.sha256(subject.encode()).hexdigest()[:16]
    return state_dir / "models" / f"{model}-{tag}.json"


def store_json(path: Path | None, body: dict[str, Any], model: str) -> None:
    """Replace ``path`` with ``body`` whole and synced (the file's one writer); wait for it; log, never raise."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Synced before the rename and the directory after it: a power cut leaves the last state
        # or this one, never an empty file that discards hours of commissioning.  Through the
        # file's one writer, so saves from two model threads never share its temporary file.
        # Called from the models' worker threads, never on the event loop: waiting here is safe.
        writer_of(path).submit(json.dumps(body).encode()).result()
    except OSError as exc:
        log.warning("models %s: cannot store state in %s: %s", model, path, exc.strerror)
