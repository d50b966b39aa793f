"""Metric names, IEEE 11073-10101 codes and UCUM units: what travels, and one display form of each.

On the wire a unit is a UCUM code (``Cel``, ``/min``, ``mm[Hg]``, ``[g]``); people read the
display form (``°C``, ``/min``, ``mmHg``, ``g``).  Both directions live here, so every view shows
a unit the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MdcTerm:
    """A medical metric: its MDC reference id, 32-bit code and UCUM unit; a short label for views."""

    name: str
    code: int
    unit: str
    label: str
    rr: bool = False  # an RR-interval series: gets HRV features
    res: int = 0  # resolution of its features on the wire: 10**res of the unit


#: IEEE 11073-10101 metrics with UCUM units (codes from STANDARDS.md section 1).
MDC_TERMS: Mapping[str, MdcTerm] = {
    m.name: m
    for m in (
        MdcTerm("MDC_PULS_OXIM_SAT_O2", 150456, "%", "SpO2", res=-1),
        MdcTerm("MDC_PULS_OXIM_PULS_RATE", 149530, "/min", "PR", res=-1),
        MdcTerm("MDC_PULS_RATE_NON_INV", 149546, "/min", "PR", res=-1),
        MdcTerm("MDC_ECG_HEART_RATE", 147842, "/min", "HR", res=-1),
        MdcTerm("MDC_ECG_TIME_PD_RR_GL", 147240, "ms", "RR", rr=True),
        MdcTerm("MDC_TEMP_BODY", 150364, "Cel", "Temp", res=-2),
        MdcTerm("MDC_PRESS_BLD_NONINV_SYS", 150021, "mm[Hg]", "NIBP sys"),
        MdcTerm("MDC_PRESS_BLD_NONINV_DIA", 150022, "mm[Hg]", "NIBP dia"),
        MdcTerm("MDC_PRESS_BLD_NONINV_MEAN", 150023, "mm[Hg]", "NIBP mean"),
        MdcTerm("MDC_PULS_OXIM_PERF_REL", 150448, "%", "PI", res=-2),
        MdcTerm("MDC_RESP_RATE", 151562, "/min", "Resp", res=-1),
    )
}

MDC_CODE: Mapping[str, int] = {m.name: m.code for m in MDC_TERMS.values()}
MDC_BY_CODE: Mapping[int, MdcTerm] = {m.code: m for m in MDC_TERMS.values()}

#: Resolution of features on the wire by UCUM unit, as a power of ten of the unit, for metrics
#: outside the MDC table (an MDC term states its own).  A unit not listed travels unscaled.
RESOLUTION: Mapping[str, int] = {
    "%": -1,
    "/min": -1,
    "ms": 0,
    "s": -3,
    "Cel": -2,
    "[degF]": -2,
    "K": -2,
    "mm[Hg]": 0,
    "bar": -3,
    "kPa": -2,
    "Pa": 0,
    "A": -3,
    "mA": 0,
    "V": -2,
    "kW": -3,
    "W": 0,
    "[g]": -3,
    "m/s2": -3,
    "mm/s": -2,
    "Hz": -2,
    "l/min": -2,
    "m3/h": -3,
    "mm": -2,
    "m": -3,
}


def resolution(metric: str, unit: str) -> int | None:
    """The decimal exponent of a metric's resolution on the wire (None: unscaled single precision)."""
    term = MDC_TERMS.get(metric)
    if term is not None and term.unit == unit:
        return term.res
    return RESOLUTION.get(unit)


#: Engineering spellings seen in device metadata and configs, and the UCUM code each means.
_TO_UCUM: Mapping[str, str] = {
    "°C": "Cel",
    "degC": "Cel",
    "°F": "[degF]",
    "degF": "[degF]",
    "mmHg": "mm[Hg]",
    "bpm": "/min",
    "rpm": "/min",
    "1/min": "/min",
    "g": "[g]",  # in sensor metadata "g" is standard gravity (vibration), never grams
    "L/min": "l/min",
    "lpm": "l/min",
    "percent": "%",
    "seconds": "s",
    "sec": "s",
}

#: UCUM codes whose display form differs from the code.
_DISPLAY: Mapping[str, str] = {
    "Cel": "°C",
    "[degF]": "°F",
    "mm[Hg]": "mmHg",
    "[g]": "g",
    "l/min": "L/min",
    "1": "",
    "{cycle}": "cycles",
}


def to_ucum(unit: str) -> str:
    """The UCUM code for a unit as devices and configs spell it (unchanged when already UCUM)."""
    return _TO_UCUM.get(unit.strip(), unit.strip())


def display_unit(unit: str | None) -> str:
    """The one display form of a UCUM unit, for every view."""
    if unit is None:
        return ""
    return _DISPLAY.get(unit, unit)


def metric_label(metric: str) -> str:
    """A short label for a metric: the MDC term's (``SpO2``), or the last part of a source path."""
    term = MDC_TERMS.get(metric)
    if term is not None:
        return term.label
    return metric.removeprefix("MDC_").rsplit("/", 1)[-1]
