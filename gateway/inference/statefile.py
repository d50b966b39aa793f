"""Per-subject state files of the detectors learned on the gateway (commissioning, fitted state)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["state_file", "store_json"]

log = logging.getLogger(__name__)


def state_file(state_dir: Path | None, model: str, subject: str) -> Path | None:
    """``<state_dir>/models/<model>-<hash of subject>.json``, or None without a state directory."""
    if state_dir is None:
        return None
    tag = hashlib.sha256(subject.encode()).hexdigest()[:16]
    return state_dir / "models" / f"{model}-{tag}.json"


def store_json(path: Path | None, body: dict[str, Any], model: str) -> None:
    """Write ``body`` to ``path`` atomically (temporary file, then rename); log, never raise, on failure."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        log.warning("models %s: cannot store state in %s: %s", model, path, exc.strerror)
