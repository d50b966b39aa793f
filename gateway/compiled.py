"""The gateway's compiled window paths (``gateway/_window.c``, built at install, pyproject.toml), where built.

A window's features, input row, z-scores, baseline step, dense-layer score and novelty T² and SPE
each have a numpy path with the same results (scores within a stated tolerance); the compiled
one is one call that touches a small loop instead of a dozen numpy functions, which after a busy neighbour's time slice come back from memory at 4-8 us
each (BENCHMARKS.md).  An install without a C compiler, or a build of other sources, serves the
numpy paths.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["VERSION", "compiled"]

#: The build these sources expect (``WINDOW_VERSION`` in ``gateway/_window.c``).
VERSION = 5


def compiled(name: str) -> Any:
    """``gateway._window.<name>`` of a build of these sources, else None (the numpy paths serve)."""
    try:
        module = importlib.import_module("gateway._window")
    except ImportError:
        return None
    if getattr(module, "VERSION", None) != VERSION:
        return None
    return getattr(module, name, None)
