"""How an estimate record reads to a person: ``HR=72.1±1.2/min measured [ECG_HEART_RATE 0.91 ...]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["estimate_text"]


def estimate_text(rec: Mapping[str, Any]) -> str:
    """The estimate ± its standard deviation, its state and the share of each source."""
    name = str(rec.get("est", "?")).upper()
    unit = rec.get("unit", "")
    value = rec.get("value")
    head = f"{name}=?" if value is None else f"{name}={value:.4g}±{rec.get('sd', 0.0):.2g}{unit}"
    shares = " ".join(
        f"{str(s.get('metric', '?')).removeprefix('MDC_')} {s.get('w', 0.0):.2f}" for s in rec.get("src", [])
    )
    return f"{head} {rec.get('state', '?')}" + (f" [{shares}]" if shares else "")
