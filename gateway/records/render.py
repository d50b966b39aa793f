"""One way to show a record to a person, used by every view (the twin's, ``twin listen``, the demo's).

A view prints the feature it names (``RR mean 928 ms, RMSSD 27 ms``), never a bare number under a
metric's name; which features a stream shows follows its shape (a level its mean, an interval
series its mean and RMSSD, a waveform its RMS, peak and dominant frequency).  Integers print as
integers, units in their one display form (``°C``, not ``Cel``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from gateway.records.model import (
    AlarmRecord,
    DiagnosticRecord,
    EstimateRecord,
    FeaturesWindow,
    Record,
    Shape,
    StreamWindow,
)
from gateway.records.units import display_unit, metric_label

#: Display label of each feature, and the unit it is in ("=" the stream's unit).
FEATURES: Mapping[str, tuple[str, str]] = {
    "mean": ("mean", "="),
    "std": ("SD", "="),
    "min": ("min", "="),
    "max": ("max", "="),
    "slope": ("slope", "=/s"),
    "rmssd": ("RMSSD", "="),
    "sdnn": ("SDNN", "="),
    "pnn50": ("pNN50", "%"),
    "rms": ("RMS", "="),
    "peak": ("peak", "="),
    "crest": ("crest", ""),
    "fdom": ("f_dom", "Hz"),
    "last": ("last", "="),
    "changes": ("changes", ""),
}

#: The features a view shows for each shape, in order (those present in the record).
SHOWN: Mapping[Shape, tuple[str, ...]] = {
    "level": ("mean",),
    "interval": ("mean", "rmssd"),
    "waveform": ("rms", "peak", "fdom"),
    "state": ("last", "changes"),
}


def number(x: float | int | bool | str) -> str:
    """A value as a person reads it: integers without ".0", others to 4 significant digits."""
    if isinstance(x, bool | str):
        return str(x).lower() if isinstance(x, bool) else x
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    text = f"{x:.4g}"
    return text if "e" in text or abs(x) < 1000 else str(round(x))


def quantity(x: float | int, unit: str | None) -> str:
    """A value with its unit in display form (``37.2 °C``, ``97 %``, ``64 /min``)."""
    shown = display_unit(unit)
    return f"{number(x)} {shown}" if shown else number(x)


def shape_of(stream: StreamWindow) -> Shape:
    """The stream's shape as stated, or as its features tell for records that do not state it."""
    if stream.shape is not None:
        return stream.shape
    if "rmssd" in stream.features:
        return "interval"
    if "rms" in stream.features:
        return "waveform"
    return "level"


def feature(stream: StreamWindow, name: str) -> str:
    """One feature with its label and unit, e.g. ``RMSSD 27 ms``."""
    label, unit = FEATURES.get(name, (name, ""))
    if unit.startswith("="):
        unit = stream.unit + unit[1:]
    return f"{label} {quantity(stream.features[name], unit)}"


def stream_text(stream: StreamWindow) -> str:
    """A stream's label and the features its shape shows: ``RR mean 928 ms, RMSSD 27 ms``."""
    return _shown(stream) + left_out_text(stream)


def _shown(stream: StreamWindow) -> str:
    label = metric_label(stream.metric)
    if stream.gap:
        return f"{label} GAP"
    if stream.unchanged and not stream.features:
        return f"{label} unchanged"
    names = [n for n in SHOWN[shape_of(stream)] if n in stream.features]
    if not names:
        names = list(stream.features)[:2]
    if not names:
        return f"{label} ?"
    return f"{label} " + ", ".join(feature(stream, n) for n in names)


def left_out_text(stream: StreamWindow) -> str:
    """What the stream's window left out, e.g. `` (left out: 11 implausible)``; empty when nothing."""
    parts = [
        f"{n} {what}" for n, what in ((stream.implausible, "implausible"), (stream.flagged, "flagged")) if n
    ]
    return f" (left out: {', '.join(parts)})" if parts else ""


def detail_text(detail: Mapping[str, float | int | str | bool]) -> str:
    """Detail as ``key=value`` pairs, integers as integers."""
    return " ".join(f"{k}={number(v)}" for k, v in detail.items())


#: Detail an estimate's own text states: its 90 % interval, the cycles seen, inputs held (``rul``).
_ESTIMATE_SHOWN = frozenset({"lo90", "hi90", "cycles", "held"})
#: More sources than this are counted, not listed: a machine's fourteen sensors of equal share
#: would push the estimate itself out of a terminal line.
_SOURCES_LISTED = 4


def estimate_text(record: EstimateRecord) -> str:
    """The estimate ± its SD, its state and each source's share: ``HR=71.25±0.8/min measured [...]``.

    An estimate with a 90 % interval (``lo90``, ``hi90``) shows it, one counted in cycles the
    cycles seen and inputs held: ``RUL=87.3±19 cycles (90 %: 56.5-118) measured, cycle 45 [14 sources]``.
    """
    name = record.est.upper()
    d = record.detail
    if record.value is None:
        head = f"{name}=?"
    else:
        sd = number(float(f"{record.sd or 0.0:.2g}"))
        unit = display_unit(record.unit)
        head = f"{name}={number(record.value)}±{sd}{' ' if unit[:1].isalpha() else ''}{unit}"
        if "lo90" in d and "hi90" in d:
            head += f" (90 %: {number(d['lo90'])}-{number(d['hi90'])})"
    text = f"{head} {record.state}"
    if "cycles" in d:
        text += f", cycle {number(d['cycles'])}"
    if d.get("held"):
        text += f", {number(d['held'])} inputs held"
    if len(record.src) > _SOURCES_LISTED:
        return f"{text} [{len(record.src)} sources]"
    shares = " ".join(f"{s.metric.removeprefix('MDC_')} {s.w:.2f}" for s in record.src)
    return text + (f" [{shares}]" if shares else "")


def estimate_line(record: EstimateRecord) -> str:
    """:func:`estimate_text` and the rest of the estimate's detail (``model=rul_cmapss``)."""
    rest = detail_text({k: v for k, v in record.detail.items() if k not in _ESTIMATE_SHOWN})
    return estimate_text(record) + (f" {rest}" if rest else "")


def when(record: Record) -> str:
    """The record's time: ``run 3 t=1234.5`` (site time) or ``t=1760000000`` (Unix time)."""
    t = number(round(record.t, 1))
    return f"run {record.run} t={t}" if record.run else f"t={t}"


def describe(record: Record) -> str:
    """One line for one record, without topic or sequence (views add those)."""
    if isinstance(record, FeaturesWindow):
        return f"{when(record)} FEATURES " + "; ".join(stream_text(s) for s in record.streams)
    if isinstance(record, AlarmRecord):
        what = " ".join(x for x in (record.alarm, metric_label(record.metric) if record.metric else "") if x)
        detail = detail_text(record.detail)
        return f"{when(record)} ALARM {what}" + (f" {detail}" if detail else "")
    if isinstance(record, EstimateRecord):
        return f"{when(record)} ESTIMATE {estimate_line(record)}"
    assert isinstance(record, DiagnosticRecord)
    detail = detail_text(record.detail)
    return f"{when(record)} DIAG {record.diag}" + (f" {detail}" if detail else "")
