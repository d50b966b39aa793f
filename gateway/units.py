"""Unit conversion for rules written in one unit and applied to streams in another (pint).

Medical streams carry UCUM codes (``Cel``, ``/min``, ``mm[Hg]``), industrial ones the OPC UA
EUInformation display name or a configured unit (``°C``, ``bar``, ``kPa``, ``l/min``).  A rule
written as "-1..16 bar" applies to a stream in kPa as "-100..1600 kPa"; a stream whose unit is
unknown, or of another dimension, gets no converted rule at all (better no check than a wrong one).

pint (a maintained units library with the SI, UCUM-style and engineering units) is imported and
its registry built only when a unit actually differs from the rule's - about 0.8 s and 4 MB once
per process (BENCHMARKS.md) - so a gateway whose streams use the rules' own units never pays it.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["converter", "normalise"]

log = logging.getLogger(__name__)

#: UCUM codes and common display names pint spells differently.
_ALIASES = {
    "Cel": "degC",
    "°C": "degC",
    "℃": "degC",
    "[degF]": "degF",
    "°F": "degF",
    "mm[Hg]": "mmHg",
    "/min": "1/min",
    "{beats}/min": "1/min",
    "{breaths}/min": "1/min",
    "bpm": "1/min",
    "%": "percent",
    "l/min": "L/min",
    "L/min": "L/min",
    "m3/h": "m**3/h",
    "[psi]": "psi",
}
_IDENTITY: Callable[[float], float] = float
_registry: Any = None
_lock = threading.Lock()


def normalise(unit: str) -> str:
    """A unit string as pint reads it (aliases resolved, whitespace trimmed)."""
    u = unit.strip()
    return _ALIASES.get(u, u)


def _units() -> Any:
    global _registry  # noqa: PLW0603 - one registry per process, built on first need
    with _lock:
        if _registry is None:
            import pint  # noqa: PLC0415 - heavy: only when a conversion is needed

            _registry = pint.UnitRegistry(autoconvert_offset_to_baseunit=True)
        return _registry


@functools.lru_cache(maxsize=512)
def converter(from_unit: str, to_unit: str, *, delta: bool = False) -> Callable[[float], float] | None:
    """A function turning values in ``from_unit`` into ``to_unit``; None if that cannot be done.

    ``delta`` converts differences (a rate, a deadband): 1 Cel of change is 1 K, not 274.15 K.
    """
    a, b = normalise(from_unit), normalise(to_unit)
    if a == b:
        return _IDENTITY
    if not a or not b or re.search(r"[{}\[\]]", a + b):
        return None  # an empty or unparsed UCUM annotation: nothing to convert with
    ureg = _units()
    try:
        ua, ub = ureg.Unit(a), ureg.Unit(b)
        if delta:
            # A difference of temperatures converts by the scale alone.
            one = ureg.Quantity(1.0, ua).to(ub) if ua.is_compatible_with(ub) else None
            zero = ureg.Quantity(0.0, ua).to(ub) if one is not None else None
            if one is None or zero is None:
                return None
            scale = float(one.magnitude - zero.magnitude)
            return lambda x: x * scale
        if not ua.is_compatible_with(ub):
            return None
        ureg.Quantity(1.0, ua).to(ub)  # offset units must convert too
    except Exception:  # noqa: BLE001 - pint raises many kinds for a unit it does not know
        log.debug("units: no conversion from %r to %r", from_unit, to_unit)
        return None
    return lambda x: float(ureg.Quantity(x, ua).to(ub).magnitude)
