"""Files in the state directory that name local identities: written whole, readable by the owner only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_private_json"]


def write_private_json(path: Path, body: Any) -> None:
    """Write ``body`` as JSON to ``path`` atomically (a temporary file of mode 0600, then a rename); OSError on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(body, f)
    tmp.replace(path)
