"""SenML-CBOR packs (RFC 8428 over RFC 8949, ``application/senml+cbor``) for typed records.

:func:`encode` turns a record into a pack, :func:`decode` gives the same record back; the outbox
stores these bytes, the anonymizer scans exactly them, and the uplink only prepends a sequence
record (:func:`wrap`).  The layout is documented, with a CDDL schema, in ``docs/records.md``:

* the first record is the header: base name ``<subject>/``, base time, the record type as its
  name ("win" with the window length as value, "alarm" or "diag" with the kind as string value),
  the schema version ``sv`` (``svm`` for a minor version above 0) and the gateway's run ``run``;
* a window's streams follow, each opened by a record that sets the base name
  ``<subject>/<metric>/`` and base unit and carries the sample count; each feature is then a
  record of a name and a value;
* alarms and diagnostics carry their detail as records named by the detail key, alarm
  contributions as records named ``c/<metric>.<feature>``.

Numbers other than times travel as IEEE single precision (half where exact) and are read back as
the shortest decimal that single precision holds (:func:`wire_number`), so 0.8 comes back as 0.8.
Times stay double precision.  A base time below 2**28 means "relative to now" to a generic SenML
reader; site-relative time is therefore marked with the must-understand field ``tm_``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import cbor2

from gateway.records.errors import CorruptRecordError, UnsupportedVersionError
from gateway.records.model import (
    CLOCKS,
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    SHAPES,
    AlarmRecord,
    Clock,
    DiagnosticRecord,
    EstimateRecord,
    EstimateSource,
    FeaturesWindow,
    Record,
    SeqMeta,
    Shape,
    StatusLoss,
    StatusRecord,
    StreamWindow,
)
from gateway.records.units import MDC_BY_CODE, MDC_CODE, MDC_TERMS, resolution

CONTENT_TYPE = "application/senml+cbor"

# RFC 8428 section 6, table 4: integer labels of the CBOR representation.
BVER, BN, BT, BU, BV, BS = -1, -2, -3, -4, -5, -6
N, U, V, VS, VB, S, T, UT, VD = 0, 1, 2, 3, 4, 5, 6, 7, 8

#: Base times below this are relative to "now" for a SenML reader (RFC 8428 section 4.5.3).
RELATIVE_TIME_LIMIT = 2**28
#: Extension labels this codec writes; the ones ending in "_" are must-understand (RFC 8428 4.4).
TIME_BASE = "tm_"
UNDERSTOOD = frozenset({TIME_BASE})

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:./_-]*$")
_NAME_BAD_CHAR = re.compile(r"[^A-Za-z0-9:./_-]")
_F32 = struct.Struct("<f")
_F32_MAX = 3.4028234663852886e38
_SHAPE_CODE = {s: i for i, s in enumerate(SHAPES)}
_HEAD_NAME = {FeaturesWindow: "win", AlarmRecord: "alarm", DiagnosticRecord: "diag", EstimateRecord: "est"}


# --- numbers -------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    """``x`` rounded to single precision (kept as it is when single precision cannot hold it)."""
    if not math.isfinite(x) or abs(x) > _F32_MAX:
        return x
    return float(_F32.unpack(_F32.pack(x))[0])


def _num(x: float | int) -> float | int:
    return x if isinstance(x, int) else _f32(float(x))


def _restore(x: Any) -> Any:
    """The shortest decimal single precision reads back as ``x``; other values unchanged."""
    if not isinstance(x, float) or not math.isfinite(x) or abs(x) > _F32_MAX:
        return x
    if _f32(x) != x:
        return x  # sent in double precision: already exact
    for digits in (6, 7, 8, 9):
        candidate = float(f"{x:.{digits}g}")
        if _f32(candidate) == x:
            return candidate
    return x


def wire_number(x: float) -> float:
    """What a reader gets back for a feature value ``x``: its single-precision shortest decimal."""
    return float(_restore(_f32(float(x))))


# --- names ---------------------------------------------------------------------------------------


def _name(prefix: str, key: str, rec: dict[Any, Any], field: str = "key") -> str:
    """``prefix + key`` as a valid SenML name; an unusable key is also kept verbatim in ``field``."""
    if _NAME_OK.match(key):
        return prefix + key
    rec[field] = key
    return prefix + (_NAME_BAD_CHAR.sub("_", key) or "_")


# --- encoding ------------------------------------------------------------------------------------


def _header(record: Record) -> dict[Any, Any]:
    head: dict[Any, Any] = {N: _HEAD_NAME[type(record)], "sv": record.sv}
    if SCHEMA_MINOR:
        head["svm"] = SCHEMA_MINOR
    if record.subject is not None:
        head[BN] = f"{record.subject}/"
    head[BT] = float(record.t)
    if record.clock != "unix":
        head[TIME_BASE] = record.clock
    if record.run:
        head["run"] = record.run
    return head


def _detail_records(detail: Mapping[str, Any], prefix: str = "") -> list[dict[Any, Any]]:
    out: list[dict[Any, Any]] = []
    for key, value in detail.items():
        rec: dict[Any, Any] = {}
        rec[N] = _name(prefix, key, rec)
        if isinstance(value, str):
            rec[VS] = value
        elif isinstance(value, bool):
            rec[VB] = value
        else:
            rec[V] = _num(value)
        out.append(rec)
    return out


#: Schema 3: each shape's features in the order a stream record's ``f`` array holds them.
FEATURE_ORDER: Mapping[Shape, tuple[str, ...]] = {
    "level": ("mean", "std", "min", "max", "slope"),
    "waveform": ("rms", "peak", "crest", "fdom", "mean", "std", "min", "max", "slope"),
    "interval": ("mean", "std", "min", "max", "slope", "rmssd", "sdnn", "pnn50"),
    "state": ("last", "changes"),
}
#: Features in the stream's unit (scaled by the stream's resolution); ``slope`` is sent as the
#: change over the window at that resolution.
IN_UNIT = frozenset({"mean", "std", "min", "max", "rms", "peak", "rmssd", "sdnn", "last"})
#: Features with a resolution of their own, whatever the stream's unit (decimal exponents).
FIXED_RES: Mapping[str, int] = {"crest": -3, "fdom": -2, "pnn50": -1, "changes": 0}
#: Beyond this many steps a feature travels in single precision instead.
_INT_LIMIT = 2**31


def _scale(name: str, res: int | None, win: float) -> float | None:
    """The step of one feature on the wire (None: sent unscaled)."""
    if name in FIXED_RES:
        return 10.0 ** FIXED_RES[name]
    if res is None:
        return None
    if name in IN_UNIT:
        return 10.0**res
    if name == "slope" and win > 0.0:
        return 10.0**res / win
    return None


def _unscale(q: int, name: str, res: int | None, win: float) -> float:
    r = FIXED_RES.get(name, res) or 0
    # Divide by 10**-r rather than multiply by 10**r: 3 / 10 is 0.3, 3 * 0.1 is not.
    x = float(q) * float(10**r) if r >= 0 else float(q) / float(10**-r)
    return x / win if name == "slope" else x


def _feature_item(name: str, value: float, res: int | None, win: float) -> tuple[float | int, float]:
    """(what the wire holds, what a reader gets back) for one feature value."""
    step = _scale(name, res, win)
    if step is not None and math.isfinite(value):
        q = value / step
        if abs(q) < _INT_LIMIT:
            iq = round(q)
            return iq, _unscale(iq, name, res, win)
    return _num(value), float(_restore(_num(value)))


def stream_res(stream: StreamWindow) -> int | None:
    """The stream's resolution on the wire: as stated, else its metric's (``units.resolution``)."""
    return stream.res if stream.res is not None else resolution(stream.metric, stream.unit)


def wire_stream(stream: StreamWindow, win: float) -> StreamWindow:
    """The stream as a reader gets it back: features at their resolution on the wire."""
    res = stream_res(stream)
    features = {k: _feature_item(k, v, res, win)[1] for k, v in stream.features.items()}
    if stream.unchanged:
        features = {}  # a marker carries no features: the reader has them from before
    if stream.unchanged or (stream.gap and not stream.features):
        res = None  # no features travel, nor their resolution
    return dataclasses.replace(
        stream, features=features, res=res, missing=float(_restore(_f32(float(stream.missing))))
    )


def on_wire(window: FeaturesWindow) -> FeaturesWindow:
    """The window as a reader decodes it (schema 3: features at their stated resolution)."""
    if window.sv < 3:
        return window
    return dataclasses.replace(window, streams=tuple(wire_stream(s, window.win) for s in window.streams))


def _stream_record(s: StreamWindow, win: float) -> dict[Any, Any]:
    rec: dict[Any, Any] = {}
    term = MDC_TERMS.get(s.metric)
    if term is not None:
        rec[N] = str(term.code)
    else:
        rec[N] = _name("", s.metric, rec, "metric")
        if s.metric.isdigit():
            rec["metric"] = s.metric  # would read as an MDC code
    if term is None or term.unit != s.unit:
        rec["mu"] = s.unit  # the value (2) is a count: the metric's unit is not SenML's "u"
    rec[V] = int(s.n)
    if s.missing:
        rec["miss"] = _f32(float(s.missing))
    if s.mdc != MDC_CODE.get(s.metric):
        rec["mdc"] = s.mdc  # None: a name from the table used without its code
    if s.gap:
        rec["gap"] = True
    _left_out(s, rec)
    if s.shape != "level":
        rec["sh"] = None if s.shape is None else _SHAPE_CODE[s.shape]
    if s.unchanged:
        rec["eq"] = True
        return rec
    if s.gap and not s.features:
        return rec
    res = stream_res(s)
    if res is not None:
        rec["r"] = res
    order = FEATURE_ORDER.get(s.shape or "level", ())
    names = list(s.features)
    if all(k in order for k in names):
        present = [k for k in order if k in s.features]
        names = list(order[: order.index(present[-1]) + 1]) if present else []
    else:
        rec["fn"] = names
    rec["f"] = [_feature_item(k, s.features[k], res, win)[0] if k in s.features else None for k in names]
    return rec


def _left_out(s: StreamWindow, rec: dict[Any, Any]) -> None:
    """The samples a stream's window left out, flagged (``flg``) and implausible (``imp``), when any."""
    if s.flagged:
        rec["flg"] = int(s.flagged)
    if s.implausible:
        rec["imp"] = int(s.implausible)


def _left_out_counts(rec: Mapping[Any, Any], metric: str) -> dict[str, int]:
    """A stream record's ``flg`` and ``imp`` (0 when absent) as StreamWindow fields."""
    out = {}
    for key, name in (("flg", "flagged"), ("imp", "implausible")):
        count = rec.get(key, 0)
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise _corrupt(f"stream {metric!r}: {key} {count!r} is not a count of samples")
        out[name] = count
    return out


def _features_pack(w: FeaturesWindow) -> list[dict[Any, Any]]:
    if w.sv < 3:
        return _features_pack_v2(w)
    head = _header(w)
    head[U] = "s"
    head[V] = _num(w.win)
    head["kind"] = w.kind
    if w.hb is not None:
        head["hb"] = _num(w.hb)
    pack = [head]
    pack += _detail_records(w.scores, "score/")
    dev: str | None = None
    for s in w.streams:
        rec = _stream_record(s, w.win)
        if s.dev != dev:
            dev = rec["dev"] = s.dev
        pack.append(rec)
    return pack


def _features_pack_v2(w: FeaturesWindow) -> list[dict[Any, Any]]:
    """Schema 1 and 2: a stream record under its own base name, then one record per feature."""
    head = _header(w)
    head[U] = "s"
    head[V] = _num(w.win)
    head["kind"] = w.kind
    pack = [head]
    pack += _detail_records(w.scores, "score/")
    dev: str | None = None
    for s in w.streams:
        rec: dict[Any, Any] = {}
        rec[BN] = _name(f"{w.subject}/", s.metric, rec, "metric") + "/"
        rec[BU] = s.unit
        rec[N] = "n"
        rec[U] = "count"
        rec[V] = int(s.n)
        if s.dev != dev:
            dev = rec["dev"] = s.dev
        if s.missing:
            rec["miss"] = _f32(float(s.missing))
        implied = MDC_CODE.get(s.metric)
        if s.mdc != implied:
            rec["mdc"] = s.mdc  # None: a name from the table used without its code
        if s.gap:
            rec["gap"] = True
        _left_out(s, rec)
        if s.shape is not None:
            rec["sh"] = _SHAPE_CODE[s.shape]
        pack.append(rec)
        for fname, value in s.features.items():
            frec: dict[Any, Any] = {}
            frec[N] = _name("", fname, frec)
            frec[V] = _num(value)
            pack.append(frec)
    return pack


#: Alarm semantics in the alarm header: record field -> extension label (docs/records.md).
_ALARM_TEXT = (("alarm_class", "cls"), ("priority", "pri"))
_ALARM_NUMBERS = (("limit", "lim"), ("value", "val"), ("held_s", "held"))


def _alarm_pack(a: AlarmRecord) -> list[dict[Any, Any]]:
    head = _header(a)
    head[VS] = a.alarm
    if a.dev is not None:
        head["dev"] = a.dev
    if a.metric is not None:
        head["metric"] = a.metric
    for name, label in _ALARM_TEXT:
        if getattr(a, name) is not None:
            head[label] = getattr(a, name)
    for name, label in _ALARM_NUMBERS:
        if getattr(a, name) is not None:
            head[label] = _num(getattr(a, name))
    return [head, *_detail_records(a.detail), *_detail_records(a.contrib, "c/")]


def _diag_pack(d: DiagnosticRecord) -> list[dict[Any, Any]]:
    head = _header(d)
    head[VS] = d.diag
    return [head, *_detail_records(d.detail)]


def _estimate_pack(e: EstimateRecord) -> list[dict[Any, Any]]:
    head = _header(e)
    head[VS] = e.est
    head["kind"] = e.kind
    head["st"] = e.state
    value: dict[Any, Any] = {N: e.est, U: e.unit}
    if e.value is not None and e.sd is not None:
        value[V] = _num(e.value)
        value["sd"] = _num(e.sd)
    else:
        value[VS] = ""  # no estimate ("lost"): a SenML record still needs a value
    pack = [head, value]
    for src in e.src:
        rec: dict[Any, Any] = {}
        rec[N] = _name("src/", src.metric, rec, "metric")
        rec[V] = _num(src.w)
        rec["dev"] = src.dev
        pack.append(rec)
    return pack + _detail_records(e.detail, "d/")


def encode(record: Record) -> bytes:
    """Encode a record as a SenML-CBOR pack."""
    if isinstance(record, FeaturesWindow):
        pack = _features_pack(record)
    elif isinstance(record, AlarmRecord):
        pack = _alarm_pack(record)
    elif isinstance(record, DiagnosticRecord):
        pack = _diag_pack(record)
    elif isinstance(record, EstimateRecord):
        pack = _estimate_pack(record)
    else:
        raise TypeError(f"records codec: cannot encode a {type(record).__name__}: expected a record class")
    return bytes(cbor2.dumps(pack, canonical=True))


# --- decoding ------------------------------------------------------------------------------------


def _corrupt(why: str) -> CorruptRecordError:
    return CorruptRecordError(f"records decoder: {why}: the record cannot be read; it is skipped")


def _value(rec: Mapping[Any, Any]) -> Any:
    for label in (V, VS, VB):
        if label in rec:
            return _restore(rec[label]) if label == V else rec[label]
    raise _corrupt(f"record {rec.get(N)!r} has no value")


def _key(rec: Mapping[Any, Any], prefix: str = "") -> str:
    if "key" in rec:
        return str(rec["key"])
    return str(rec.get(N, ""))[len(prefix) :]


def _check_labels(records: Sequence[Any]) -> None:
    for rec in records:
        if not isinstance(rec, dict):
            raise _corrupt(f"a record is a CBOR {type(rec).__name__}, expected a map")
        for label in rec:
            if isinstance(label, str) and label.endswith("_") and label not in UNDERSTOOD:
                raise _corrupt(f"must-understand field {label!r} is not known to this reader")


def _common(head: Mapping[Any, Any]) -> dict[str, Any]:
    sv = head.get("sv", 1)
    if not isinstance(sv, int) or sv < 1:
        raise _corrupt(f"schema version {sv!r} is not a positive integer")
    if sv > SCHEMA_MAJOR:
        raise UnsupportedVersionError(
            f"records decoder: schema version {sv} is newer than this reader's {SCHEMA_MAJOR}: "
            "the record is skipped; update the reader"
        )
    tm = head.get(TIME_BASE)
    if tm is None:
        clock: Clock = "unix"
    elif tm in CLOCKS:
        clock = cast(Clock, tm)
    else:
        raise _corrupt(f"time base {tm!r} is not one of {', '.join(CLOCKS)}")
    run = head.get("run", 0)
    if not isinstance(run, int) or run < 0:
        raise _corrupt(f"run {run!r} is not a non-negative integer")
    bn = head.get(BN)
    return {
        "sv": sv,
        "subject": bn.removesuffix("/") if isinstance(bn, str) else None,
        "t": float(head.get(BT, 0.0)),
        "run": run,
        "clock": clock,
    }


def _decode_features(
    head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]], prev: Record | None = None
) -> FeaturesWindow:
    common = _common(head)
    if common["sv"] < 3:
        return _decode_features_v2(head, rest, common)
    win = float(_restore(head[V]))
    scores: dict[str, float] = {}
    streams: list[StreamWindow] = []
    dev: Any = None
    for rec in rest:
        if not ("f" in rec or "fd" in rec or "eq" in rec or "gap" in rec):
            scores[_key(rec, "score/")] = _value(rec)
            continue
        same: StreamWindow | None = None
        if N not in rec:
            # Schema 4, a later window of a message: the stream at the same place in the window
            # before it, whose name, unit, codes, shape, device and resolution it keeps.
            same = _stream_before(prev, len(streams))
            metric, unit, mdc, shape = same.metric, same.unit, same.mdc, same.shape
            dev = rec.get("dev", same.dev)
            res = rec.get("r", same.res if "f" in rec or "fd" in rec else None)
        else:
            name = str(rec[N])
            term = MDC_BY_CODE.get(int(name)) if name.isdigit() and "metric" not in rec else None
            metric = str(rec["metric"]) if "metric" in rec else term.name if term is not None else name
            unit = str(rec["mu"]) if "mu" in rec else term.unit if term is not None else ""
            mdc = rec.get("mdc", MDC_CODE.get(metric))
            dev = rec.get("dev", dev)
            sh = rec.get("sh", 0)
            shape = SHAPES[sh] if isinstance(sh, int) and 0 <= sh < len(SHAPES) else None
            res = rec.get("r")
        if res is not None and not (isinstance(res, int) and -30 <= res <= 30):
            raise _corrupt(f"stream {metric!r}: resolution {res!r} is not an integer exponent in -30..30")
        features: dict[str, float] = {}
        if "f" in rec or "fd" in rec:
            order = FEATURE_ORDER.get(shape or "level", ())
            names = [str(k) for k in rec["fn"]] if "fn" in rec else order
            values = rec["f"] if "f" in rec else rec["fd"]
            if not isinstance(values, list) or len(values) > len(names):
                raise _corrupt(f"stream {metric!r}: {values!r} holds more features than it names")
            for k, q in zip(names, values, strict=False):
                if q is None:
                    continue
                if isinstance(q, int):
                    count = q + _step_base(same, k, prev) if "fd" in rec else q
                    features[k] = _unscale(count, k, res, win)
                else:
                    features[k] = float(_restore(q))
        streams.append(
            StreamWindow(
                metric=metric,
                unit=unit,
                dev=str(dev),
                n=int(rec.get(V, 0)),
                missing=float(_restore(float(rec.get("miss", 0.0)))),
                mdc=mdc,
                gap=bool(rec.get("gap", False)),
                features=features,
                shape=shape,
                res=res,
                unchanged=bool(rec.get("eq", False)),
                **_left_out_counts(rec, metric),
            )
        )
    hb = head.get("hb")
    return FeaturesWindow(
        subject=common["subject"] or "",
        kind=str(head["kind"]),
        t=common["t"],
        win=win,
        streams=tuple(streams),
        scores=scores,
        run=common["run"],
        clock=common["clock"],
        sv=common["sv"],
        hb=None if hb is None else float(_restore(hb)),
    )


def wire_integer(stream: StreamWindow, name: str, win: float) -> int | None:
    """The integer a feature of a decoded stream travels as (None: sent unscaled, or absent)."""
    value = stream.features.get(name)
    if value is None:
        return None
    q = _feature_item(name, value, stream.res, win)[0]
    return q if isinstance(q, int) else None


def _step_base(same: StreamWindow | None, name: str, prev: Record | None) -> int:
    """Schema 4 ``fd``: the integer a feature's step is added to (the same stream's, window before)."""
    base = (
        None if same is None or not isinstance(prev, FeaturesWindow) else wire_integer(same, name, prev.win)
    )
    if base is None:
        raise _corrupt(f"feature {name!r} is sent as a step from a window before it that has no value for it")
    return base


def _stream_before(prev: Record | None, index: int) -> StreamWindow:
    """The stream a schema-4 stream record without a name continues (same place, window before)."""
    if not isinstance(prev, FeaturesWindow) or index >= len(prev.streams):
        raise _corrupt(f"stream {index} has no name and no stream at its place in a window before it")
    return prev.streams[index]


def _decode_features_v2(
    head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]], common: Mapping[str, Any]
) -> FeaturesWindow:
    subject = common["subject"] or ""
    scores: dict[str, float] = {}
    streams: list[StreamWindow] = []
    current: dict[str, Any] | None = None
    dev: Any = None

    def close() -> None:
        if current is not None:
            streams.append(StreamWindow(**current))

    for rec in rest:
        if BN in rec:
            close()
            bn = str(rec[BN])
            metric = str(rec["metric"]) if "metric" in rec else bn[len(subject) + 1 : -1]
            dev = rec.get("dev", dev)
            sh = rec.get("sh")
            shape: Shape | None = SHAPES[sh] if isinstance(sh, int) and 0 <= sh < len(SHAPES) else None
            current = {
                "metric": metric,
                "unit": str(rec.get(BU, "")),
                "dev": str(dev),
                "n": int(rec.get(V, 0)),
                "missing": float(_restore(float(rec.get("miss", 0.0)))),
                "mdc": rec.get("mdc", MDC_CODE.get(metric)),
                "gap": bool(rec.get("gap", False)),
                "features": {},
                "shape": shape,
                **_left_out_counts(rec, metric),
            }
        elif current is None:
            scores[_key(rec, "score/")] = _value(rec)
        else:
            current["features"][_key(rec)] = _value(rec)
    close()
    return FeaturesWindow(
        subject=subject,
        kind=str(head["kind"]),
        t=common["t"],
        win=float(_restore(head[V])),
        streams=tuple(streams),
        scores=scores,
        run=common["run"],
        clock=common["clock"],
        sv=common["sv"],
    )


def _decode_alarm(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]]) -> AlarmRecord:
    common = _common(head)
    detail: dict[str, Any] = {}
    contrib: dict[str, float] = {}
    for rec in rest:
        if str(rec.get(N, "")).startswith("c/"):
            contrib[_key(rec, "c/")] = _value(rec)
        else:
            detail[_key(rec)] = _value(rec)
    dev, metric = head.get("dev"), head.get("metric")
    semantics: dict[str, Any] = {name: str(head[label]) for name, label in _ALARM_TEXT if label in head}
    semantics |= {name: float(_restore(head[label])) for name, label in _ALARM_NUMBERS if label in head}
    return AlarmRecord(
        alarm=str(head[VS]),
        subject=common["subject"] or "",
        t=common["t"],
        dev=None if dev is None else str(dev),
        metric=None if metric is None else str(metric),
        detail=detail,
        contrib=contrib,
        **semantics,
        run=common["run"],
        clock=common["clock"],
        sv=common["sv"],
    )


def _decode_diag(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]]) -> DiagnosticRecord:
    common = _common(head)
    return DiagnosticRecord(
        diag=str(head[VS]),
        t=common["t"],
        subject=common["subject"],
        detail={_key(rec): _value(rec) for rec in rest},
        run=common["run"],
        clock=common["clock"],
        sv=common["sv"],
    )


def _decode_estimate(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]]) -> EstimateRecord:
    common = _common(head)
    if not rest:
        raise _corrupt("estimate pack has no value record")
    value = rest[0]
    src: list[EstimateSource] = []
    detail: dict[str, Any] = {}
    for rec in rest[1:]:
        name = str(rec.get(N, ""))
        if name.startswith("src/"):
            metric = str(rec["metric"]) if "metric" in rec else name[4:]
            src.append(EstimateSource(dev=str(rec["dev"]), metric=metric, w=float(_restore(rec[V]))))
        else:
            detail[_key(rec, "d/")] = _value(rec)
    measured = V in value
    return EstimateRecord(
        subject=common["subject"] or "",
        kind=str(head["kind"]),
        t=common["t"],
        est=str(head[VS]),
        unit=str(value[U]),
        state=str(head["st"]),
        value=float(_restore(value[V])) if measured else None,
        sd=float(_restore(value["sd"])) if measured else None,
        src=tuple(src),
        detail=detail,
        run=common["run"],
        clock=common["clock"],
        sv=common["sv"],
    )


_UNPACKERS: dict[str, Callable[..., Record]] = {
    "win": _decode_features,
    "alarm": _decode_alarm,
    "diag": _decode_diag,
    "est": _decode_estimate,
}

#: Schema 4: header labels a later record of a message leaves out when they are as in the header
#: before it (``bn`` as RFC 8428 says of every base field; the others by this schema).
INHERITED = (BN, "sv", "svm", "run", TIME_BASE, U, V, "kind", "hb")


def _is_meta(rec: Any) -> bool:
    return isinstance(rec, dict) and rec.get(N) == "seq" and BN not in rec and "ep" in rec


def _loads(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, EOFError, TypeError) as exc:
        raise _corrupt(f"{len(data)} bytes are not valid CBOR: {exc}") from exc


def _seq_metas(m: Mapping[Any, Any]) -> list[SeqMeta]:
    """The sequence record's ids: its own, then one per ``ds`` step (schema 4: records joined)."""
    try:
        seq, epoch, hist = int(m[V]), int(m["ep"]), bool(m.get("h", False))
        bs = m.get("bs")
        batch_s = None if bs is None else float(_restore(bs))
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(f"sequence record {m!r} is malformed") from exc
    steps = m.get("ds", [])
    if not isinstance(steps, list) or not all(isinstance(d, int) and d > 0 for d in steps):
        raise _corrupt(f"sequence record: ds {steps!r} is not a list of positive integers")
    metas = [SeqMeta(seq, epoch, hist, batch_s)]
    for step in steps:
        seq += step
        metas.append(SeqMeta(seq, epoch, hist, batch_s))
    return metas


def _unpack(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]], prev: Record | None) -> Record:
    unpack = _UNPACKERS.get(str(head.get(N)))
    if unpack is None:
        raise _corrupt(f"header name {head.get(N)!r}: expected one of {', '.join(_UNPACKERS)}")
    try:
        return unpack(head, rest, prev) if unpack is _decode_features else unpack(head, rest)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        if isinstance(exc, CorruptRecordError):
            raise
        raise _corrupt(f"{head.get(N)} pack is malformed: {exc}") from exc


def decode_batch(data: bytes) -> list[tuple[SeqMeta | None, Record]]:
    """Decode a message to its records with their sequence: one, or several of one topic (schema 4).

    Raises CorruptRecordError on bytes that are not records and UnsupportedVersionError on a
    record of a newer major schema version.
    """
    value = _loads(data)
    if isinstance(value, dict):
        return [(None, _legacy(value))]
    if not isinstance(value, list) or not value:
        size = len(value) if isinstance(value, list) else 0
        raise _corrupt(f"a CBOR {type(value).__name__} of length {size}, expected a non-empty array")
    _check_labels(value)
    metas: list[SeqMeta | None] = [None]
    if _is_meta(value[0]):
        metas = list(_seq_metas(value.pop(0)))
        if not value:
            raise _corrupt("a sequence record without a record")
    # Each record opens with its header, the only record with a base time; one record: as before.
    starts = [0] if len(metas) == 1 else [i for i, rec in enumerate(value) if BT in rec]
    if len(starts) != len(metas) or starts[0] != 0:
        raise _corrupt(f"the sequence record names {len(metas)} record(s), the message holds {len(starts)}")
    out: list[tuple[SeqMeta | None, Record]] = []
    head: dict[Any, Any] = {}
    prev: Record | None = None
    for meta, begin, end in zip(metas, starts, [*starts[1:], len(value)], strict=True):
        own = value[begin]
        head = {**{k: head[k] for k in INHERITED if k in head and k not in own}, **own}
        prev = _unpack(head, value[begin + 1 : end], prev)
        out.append((meta, prev))
    return out


def decode_pack(data: bytes) -> tuple[SeqMeta | None, Record]:
    """Decode a message of one record, with or without the uplink's sequence record.

    Raises CorruptRecordError on bytes that are not one record (several: use :func:`decode_batch`)
    and UnsupportedVersionError on a record of a newer major schema version.
    """
    records = decode_batch(data)
    if len(records) != 1:
        raise _corrupt(f"the message holds {len(records)} records, expected one")
    return records[0]


def _legacy(m: Mapping[Any, Any]) -> Record:
    """A record stored as a plain CBOR map by schema 1 before SenML (still in old outboxes)."""
    try:
        t = float(m.get("t", 0.0))
        clock: Clock = "start" if abs(t) < RELATIVE_TIME_LIMIT else "unix"
        kind = m.get("type")
        if kind == "features":
            streams = tuple(
                StreamWindow(
                    metric=str(s["metric"]),
                    unit=str(s["unit"]),
                    dev=str(s["dev"]),
                    n=int(s["n"]),
                    missing=float(s.get("missing", 0.0)),
                    mdc=s.get("mdc"),
                    gap=bool(s.get("gap", False)),
                    features=dict(s.get("f", {})),
                )
                for s in m["streams"]
            )
            return FeaturesWindow(
                str(m["subject"]),
                str(m["kind"]),
                t,
                float(m["win"]),
                streams,
                dict(m.get("scores", {})),
                clock=clock,
                sv=1,
            )
        if kind == "alarm":
            return AlarmRecord(
                str(m["alarm"]),
                str(m["subject"]),
                t,
                m.get("dev"),
                m.get("metric"),
                dict(m.get("detail", {})),
                dict(m.get("contrib", {})),
                clock=clock,
                sv=1,
            )
        if kind == "diag":
            return DiagnosticRecord(
                str(m["diag"]), t, m.get("subject"), dict(m.get("detail", {})), clock=clock, sv=1
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(f"stored map record is malformed: {exc}") from exc
    raise _corrupt(f"stored map record of type {m.get('type')!r}: expected features, alarm or diag")


def decode(data: bytes) -> Record:
    """Decode a pack to its record (a sequence record in front is dropped)."""
    return decode_pack(data)[1]


# --- the uplink's sequence record --------------------------------------------------------------------


def _array_head(n: int) -> bytes:
    if n < 24:
        return bytes((0x80 | n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


def _split_array(data: bytes) -> tuple[int, int]:
    """(number of items, header length) of a definite-length CBOR array; ValueError otherwise."""
    if not data:
        raise ValueError("empty")
    first = data[0]
    if first >> 5 != 4:
        raise ValueError(f"major type {first >> 5}, not an array")
    info = first & 0x1F
    if info < 24:
        return info, 1
    width = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
    if width is None or len(data) < 1 + width:
        raise ValueError("indefinite or truncated array header")
    return int.from_bytes(data[1 : 1 + width], "big"), 1 + width


def wrap(pack: bytes, meta: SeqMeta) -> bytes:
    """Prepend the sequence record to a stored pack without re-encoding it (a legacy map is converted)."""
    if pack and pack[0] >> 5 == 5:
        pack = encode(decode(pack))
    try:
        count, head_len = _split_array(pack)
    except ValueError as exc:
        raise _corrupt(f"stored record is not a SenML pack ({exc})") from exc
    return b"".join((_array_head(count + 1), seq_record(meta), memoryview(pack)[head_len:]))


# The plain sequence map's canonical CBOR around its two integers, written by hand: it goes in
# front of every record the uplink sends, and cbor2 took a third of the uplink's own time per
# record.  Canonical key order (shortest encoding first): 0 (n), 2 (v), "h", "ep"; checked against
# cbor2 in tests/test_records.py.
_SEQ_OPEN = {False: b"\xa3\x00\x63seq\x02", True: b"\xa4\x00\x63seq\x02"}
_SEQ_EPOCH = {False: b"\x62ep", True: b"\x61h\xf5\x62ep"}


def _uint(n: int) -> bytes:
    """CBOR's shortest encoding of an integer in [0, 2**64) (major type 0)."""
    if n < 24:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x18, n))
    if n < 0x10000:
        return b"\x19" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x1a" + n.to_bytes(4, "big")
    return b"\x1b" + n.to_bytes(8, "big")


def seq_record(meta: SeqMeta, steps: Sequence[int] = ()) -> bytes:
    """The sequence record (CBOR) for a record, or for several joined ones (``steps``: id deltas)."""
    seq, epoch, hist = meta.seq, meta.epoch, bool(meta.historical)
    if (
        meta.batch_s is None
        and not steps
        and type(seq) is int
        and type(epoch) is int
        and 0 <= seq < 2**64
        and 0 <= epoch < 2**64
    ):
        return _SEQ_OPEN[hist] + _uint(seq) + _SEQ_EPOCH[hist] + _uint(epoch)
    rec: dict[Any, Any] = {N: "seq", V: seq, "ep": epoch}
    if hist:
        rec["h"] = True
    if meta.batch_s is not None:
        rec["bs"] = _num(meta.batch_s)
    if steps:
        rec["ds"] = list(steps)
    return bytes(cbor2.dumps(rec, canonical=True))


def resolved(data: bytes) -> list[dict[str, Any]]:
    """The pack's records resolved (RFC 8428 section 4.6): full names, units and times, no base fields."""
    value = _loads(data)
    if not isinstance(value, list):
        raise _corrupt("not a SenML pack")
    _check_labels(value)
    bn, bt, bu = "", 0.0, None
    out: list[dict[str, Any]] = []
    for rec in value:
        bn = rec.get(BN, bn)
        bt = float(rec.get(BT, bt))
        bu = rec.get(BU, bu)
        entry: dict[str, Any] = {"n": bn + str(rec.get(N, "")), "t": bt + float(rec.get(T, 0.0))}
        unit = rec.get(U, bu)
        if unit is not None:
            entry["u"] = unit
        for label, key in ((V, "v"), (VS, "vs"), (VB, "vb")):
            if label in rec:
                entry[key] = _restore(rec[label]) if label == V else rec[label]
        out.append(entry)
    return out


# --- plain data (JSON) ---------------------------------------------------------------------------------


def as_map(record: Record) -> dict[str, Any]:
    """The record as plain data (JSON-ready) with its ``type``; the twin's ``--json`` form.

    Fields that are not set (None) are left out, as on the wire.
    """
    out: dict[str, Any] = {"type": record.TYPE}
    for f in dataclasses.fields(record):
        name, value = f.name, getattr(record, f.name)
        if value is None:
            continue
        if name == "alarm_class":
            name = "class"  # the word the alarm docs use; "class" cannot name a Python field
        if name == "streams":
            out[name] = [stream_map(s) for s in value]
        elif name == "src":
            out[name] = [{f.name: getattr(s, f.name) for f in dataclasses.fields(s)} for s in value]
        else:
            out[name] = _plain(value)
    return out


def stream_map(stream: StreamWindow) -> dict[str, Any]:
    """A window's stream as plain data (``res`` only when stated; ``unchanged``, ``flagged``, ``implausible`` only when set)."""
    out = {f.name: _plain(getattr(stream, f.name)) for f in dataclasses.fields(stream)}
    if stream.res is None:
        del out["res"]
    for name in ("unchanged", "flagged", "implausible"):
        if not out[name]:
            del out[name]
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


# --- the status document (JSON) ------------------------------------------------------------------------


def status_map(status: StatusRecord) -> dict[str, Any]:
    """The status document as plain data: fields that are not set are left out."""
    body: dict[str, Any] = {"state": status.state, "sv": status.sv, "ep": status.ep}
    if status.run is not None:
        body["run"] = status.run
    if status.clean is not None:
        body["clean"] = status.clean
    if status.dropped:
        body["dropped"] = dict(status.dropped)
    if status.drops:
        body["drops"] = {lane: dict(reasons) for lane, reasons in status.drops.items()}
    if status.degraded is not None:
        body["degraded"] = status.degraded
    if status.loss is not None:
        loss = status.loss
        body["loss"] = {"lane": loss.lane, "reason": loss.reason, "n": loss.n, "t": loss.t}
    return body


def encode_status(status: StatusRecord) -> bytes:
    """The retained status message's JSON payload."""
    return json.dumps(status_map(status), separators=(",", ":")).encode()


def decode_status(payload: bytes) -> StatusRecord:
    """Read a status payload; an empty one is a cleared retained status."""
    if not payload:
        return StatusRecord("cleared")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(f"status is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _corrupt(f"status is a JSON {type(body).__name__}, expected an object")
    try:
        dropped = body.get("dropped") or {}
        drops = body.get("drops") or {}
        run = body.get("run")
        clean = body.get("clean")
        degraded = body.get("degraded")
        loss = body.get("loss")
        return StatusRecord(
            state=str(body["state"]),
            ep=int(body.get("ep", 0)),
            sv=int(body.get("sv", 1)),
            run=None if run is None else int(run),
            clean=None if clean is None else bool(clean),
            dropped={str(k): int(v) for k, v in dropped.items()},
            drops={str(lane): {str(k): int(v) for k, v in r.items()} for lane, r in drops.items()},
            degraded=None if degraded is None else str(degraded),
            loss=None
            if loss is None
            else StatusLoss(str(loss["lane"]), str(loss["reason"]), int(loss["n"]), float(loss["t"])),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(f"status {body!r} is malformed: {exc}") from exc
