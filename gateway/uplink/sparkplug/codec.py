"""Sparkplug B topics and payloads, and the metrics a record becomes: pure functions, no I/O.

Payloads are built with the Sparkplug B protobuf schema (``sparkplug_b.proto``, compiled into
``sparkplug_b_pb2``) and the protobuf runtime.  A record maps onto one Sparkplug device (its
subject pseudonym) or the edge node itself (diagnostics about the gateway); its content becomes
:class:`Point` values under names that depend only on what the record says (metric, feature,
model, alarm kind), so the names are the same after a restart.  See ``docs/sparkplug.md``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from gateway.errors import AnonymizationError, EdgetwinError
from gateway.records import (
    AlarmRecord,
    DiagnosticRecord,
    EstimateRecord,
    FeaturesWindow,
    Record,
    condition_key,
    fault_origin,
)
from gateway.uplink.sparkplug import sparkplug_b_pb2

# The generated message classes carry no type hints (protobuf ships none).
pb: Any = sparkplug_b_pb2
Payload = Any

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"

# Sparkplug B data types (specification, section 6.4.16).
INT32 = 3
INT64 = 4
DOUBLE = 10
BOOLEAN = 11
STRING = 12

# Sparkplug quality codes (the "Quality" property, Int32): bad, good, stale.
BAD = 0
GOOD = 192
STALE = 500

# Ignition's alarm priorities (0 diagnostic .. 4 critical), which SCADA alarm pipelines bind to.
PRIORITY = {"low": 1, "medium": 2, "high": 3}

_RESERVED = frozenset("+/#")

Value = float | bool | str | None


class SparkplugError(EdgetwinError):
    """A Sparkplug id or payload that cannot be built."""


def check_id(kind: str, value: str) -> str:
    """A group, edge node or device id: non-empty UTF-8 without ``+ / #``; raises SparkplugError."""
    if not value or any(c in _RESERVED for c in value):
        raise SparkplugError(f"sparkplug {kind} {value!r}: must be non-empty without '+', '/' or '#'")
    return value


def topic(group: str, message_type: str, node: str, device: str | None = None) -> str:
    """``spBv1.0/<group>/<type>/<node>[/<device>]``."""
    base = f"{NAMESPACE}/{group}/{message_type}/{node}"
    return base if device is None else f"{base}/{device}"


def state_topic(host_id: str) -> str:
    """The topic a primary host application publishes its STATE on."""
    return f"{NAMESPACE}/STATE/{host_id}"


@dataclass(frozen=True, slots=True)
class Point:
    """One metric value a record yields: name, type, unit and quality travel with it."""

    name: str
    datatype: int
    value: Value
    unit: str | None = None
    quality: int = GOOD
    low: float | None = None  # engineering range, where it is known
    high: float | None = None
    status: str | None = None  # the OPC UA status token of a faulted source (``bad_nodeidunknown``)


def _stream_points(rec: FeaturesWindow) -> list[Point]:
    out: list[Point] = []
    for s in rec.streams:
        # Every window says how many samples it left out (0 when none): a mean over a window that
        # left most of them out, or a gap of implausible values, is not taken for a clean one.
        left_out = [
            Point(f"{s.metric}/left_out/flagged", INT64, s.flagged, None, GOOD, 0.0),
            Point(f"{s.metric}/left_out/implausible", INT64, s.implausible, None, GOOD, 0.0),
        ]
        if s.gap:
            out += left_out
            out.append(Point(f"{s.metric}/missing", DOUBLE, 1.0, "1", GOOD, 0.0, 1.0))
            continue
        low, high = (0.0, 100.0) if s.unit == "%" else (None, None)
        for feature, value in sorted(s.features.items()):
            name = f"{s.metric}/{feature}"
            if math.isfinite(value):
                # Spreads and counts are not bounded by the signal's own range.
                bounded = feature in {"mean", "min", "max", "median", "last"}
                out.append(
                    Point(
                        name,
                        DOUBLE,
                        float(value),
                        s.unit,
                        GOOD,
                        low if bounded else None,
                        high if bounded else None,
                    )
                )
            else:
                out.append(Point(name, DOUBLE, None, s.unit, BAD))
        out += left_out
        out.append(Point(f"{s.metric}/missing", DOUBLE, float(s.missing), "1", GOOD, 0.0, 1.0))
    for model, score in sorted(rec.scores.items()):
        finite = math.isfinite(score)
        out.append(
            Point(f"Scores/{model}", DOUBLE, float(score) if finite else None, "1", GOOD if finite else BAD)
        )
    return out


_FAMILY = {
    "limit_cleared": "limit",
    "anomaly_cleared": "anomaly",
    "anomaly_indeterminate": "anomaly",
    "sensor_fault": "sensor",
    "sensor_lost": "sensor",
    "sensor_restored": "sensor",
    "device_restored": "device",
    "device_lost": "device",
}
# What a sensor alarm does to the quality of the affected stream's values.
SENSOR_QUALITY = {"sensor_lost": STALE, "sensor_fault": BAD, "device_lost": STALE}


def alarm_base(rec: AlarmRecord) -> str:
    """``Alarms/<family>/<what>``: the alarm metric whose raise and clear share the name."""
    family = _FAMILY.get(rec.alarm, rec.alarm)
    d = rec.detail
    if family == "device":
        what = rec.dev or "subject"
    elif family == "anomaly" and d.get("model"):
        return anomaly_base(str(d["model"]), rec.metric or None)
    elif rec.metric:
        what = rec.metric
    elif "node" in d:  # a configured node that never resolved (no stream): by its pseudonym
        what = f"node/{d['node']}"
    elif "estimate" in d:  # a limit on a subject's estimate
        what = f"estimate/{d['estimate']}"
    elif "item" in d:  # a node's fault an older gateway named by its place in its source's list only
        what = f"item/{d['item']}"
    else:
        what = "subject"
    return f"Alarms/{family}/{what}"


def anomaly_base(model: str, metric: str | None = None) -> str:
    """The alarm metric of a model's episodes on a subject as a whole, or on one of its streams (``metric``)."""
    # One metric per model (and stream), so one model's Value and Limit never stand beside
    # another's Active, on a subject or on one stream (a rhythm and an ectopy detector on one ECG).
    # A stream's under ``stream/``: no stream's metric is taken for the subject's Active or Value.
    base = f"Alarms/anomaly/model/{model}"
    return base if metric is None else f"{base}/stream/{metric}"


@dataclass(frozen=True, slots=True)
class Held:
    """One condition on under an alarm metric: what it is and the priority it holds at."""

    what: str  # "lost", a fault's origin ("quality", "rule", "driver"), else the raising kind
    priority: int  # PRIORITY number; 0: none stated
    definite: bool = True  # False: an episode known only as indeterminate


def _held_word(rec: AlarmRecord) -> str:
    if rec.alarm == "sensor_lost":
        return "lost"
    if rec.alarm == "sensor_fault":
        return fault_origin(rec.detail)
    return rec.alarm


def fold(rec: AlarmRecord, before: Mapping[str, Held]) -> dict[str, Held] | None:
    """The conditions on under ``rec``'s alarm metric once it is folded into ``before``; None: it names none.

    Conditions are told apart by :func:`gateway.records.condition_key` (a stream's loss and its
    faults of each origin, two streams of one metric on two devices, ...): the metric is on while
    any of them is.
    """
    found = condition_key(rec)
    if found is None:
        return None
    key, raises = found
    cid = json.dumps(key)
    out = dict(before)
    known = out.get(cid)
    if not raises:
        out.pop(cid, None)
    elif rec.alarm == "anomaly_indeterminate":
        if known is None:  # inside a known episode it changes nothing
            out[cid] = Held("anomaly", PRIORITY.get(rec.priority or "", 0), definite=False)
    else:
        stated = PRIORITY.get(rec.priority or "")
        out[cid] = Held(_held_word(rec), stated if stated is not None else known.priority if known else 0)
    return out


def held_points(base: str, held: Mapping[str, Held]) -> list[Point]:
    """What the host is told about an alarm metric: ``Active``, ``Priority`` (while on), ``Conditions`` (sensor)."""
    if any(h.definite for h in held.values()):
        out = [Point(f"{base}/Active", BOOLEAN, True)]
    elif held:  # an indeterminate episode: the condition can be neither confirmed nor cleared
        out = [Point(f"{base}/Active", BOOLEAN, None, quality=STALE)]
    else:
        out = [Point(f"{base}/Active", BOOLEAN, False)]
    if held:
        out.append(Point(f"{base}/Priority", INT32, max(h.priority for h in held.values())))
    if base.startswith("Alarms/sensor/"):
        # Which of a stream's conditions hold: its loss, its faults by origin ("" when none).
        out.append(Point(f"{base}/Conditions", STRING, ",".join(sorted({h.what for h in held.values()}))))
    return out


def _alarm_points(rec: AlarmRecord, held: Mapping[str, Held] | None) -> list[Point]:
    base = alarm_base(rec)
    if held is None:
        held = fold(rec, {})
    # A kind that names no condition this node knows: neither on nor off.
    unknown = [Point(f"{base}/Active", BOOLEAN, None, quality=STALE)]
    out = unknown if held is None else held_points(base, held)
    if rec.value is not None or rec.limit is not None:
        out.append(Point(f"{base}/Value", DOUBLE, rec.value, None, GOOD if rec.value is not None else BAD))
        out.append(Point(f"{base}/Limit", DOUBLE, rec.limit, None, GOOD if rec.limit is not None else BAD))
    return out


def _estimate_points(rec: EstimateRecord) -> list[Point]:
    base = f"Estimates/{rec.est}"
    quality = {"measured": GOOD, "bridged": GOOD, "untrusted": BAD, "lost": STALE}.get(rec.state, BAD)
    return [
        Point(base, DOUBLE, rec.value, rec.unit, quality if rec.value is not None else STALE),
        Point(f"{base}/sd", DOUBLE, rec.sd, rec.unit, GOOD if rec.sd is not None else STALE),
        Point(f"{base}/state", STRING, rec.state),
    ]


def _diag_points(rec: DiagnosticRecord) -> list[Point]:
    return [Point(f"Diagnostics/{rec.diag}", STRING, json.dumps(dict(rec.detail), sort_keys=True))]


def points(rec: Record, held: Mapping[str, Held] | None = None) -> tuple[str | None, list[Point]]:
    """The device (subject pseudonym; None: the edge node) and metric values of one record.

    ``held``: for an alarm, the conditions on under its metric with the alarm folded in
    (:func:`fold`); None: the alarm's own condition alone.
    """
    if isinstance(rec, FeaturesWindow):
        return rec.subject, _stream_points(rec)
    if isinstance(rec, AlarmRecord):
        return rec.subject, _alarm_points(rec, held)
    if isinstance(rec, EstimateRecord):
        return rec.subject, _estimate_points(rec)
    return rec.subject, _diag_points(rec)


@functools.cache
def _opcua_codes() -> dict[str, int]:
    """OPC UA status token -> numeric StatusCode, from asyncua's table (empty without the opcua extra)."""
    try:
        # Through the driver package, which imports asyncua without its server (drivers/opcua/lean.py).
        from drivers.opcua.protocol import status_numbers  # noqa: PLC0415
    except ImportError:
        return {}
    return status_numbers()


def opcua_status_code(token: str) -> int | None:
    """The numeric OPC UA StatusCode a driver's status token names, or None when unknown."""
    return _opcua_codes().get(token)


def timestamp_ms(rec: Record) -> int:
    """A record's time in milliseconds on its own clock (Unix time only with ``privacy.time = "exact"``)."""
    return max(0, round(rec.t * 1000)) if math.isfinite(rec.t) else 0


def _set_value(target: Any, datatype: int, value: Value) -> None:
    if value is None:
        target.is_null = True
    elif datatype == BOOLEAN:
        target.boolean_value = bool(value)
    elif datatype == STRING:
        target.string_value = str(value)
    elif datatype == INT32:
        target.int_value = int(value) & 0xFFFFFFFF  # two's complement in the unsigned field
    elif datatype == INT64:
        target.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    else:
        target.double_value = float(value)


def _property(props: Any, key: str, datatype: int, value: float | int | str) -> None:
    props.keys.append(key)
    pv = props.values.add()
    pv.type = datatype
    if datatype == STRING:
        pv.string_value = str(value)
    elif datatype == INT32:
        pv.int_value = int(value) & 0xFFFFFFFF
    elif datatype == INT64:
        pv.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    else:
        pv.double_value = float(value)


def add_metric(
    payload: Payload,
    point: Point,
    *,
    alias: int | None,
    ts_ms: int,
    birth: bool,
    historical: bool = False,
    quality: bool = False,
) -> None:
    """Append one metric: name, datatype and properties on births, alias only on data.

    Quality travels on births, on values that are not good, and (``quality``) when it changed.
    """
    m = payload.metrics.add()
    if birth or alias is None:
        m.name = point.name
        m.datatype = point.datatype
    if alias is not None:
        m.alias = alias
    m.timestamp = ts_ms
    if historical:
        m.is_historical = True
    _set_value(m, point.datatype, point.value)
    if birth or quality or point.quality != GOOD:
        if birth and point.unit:
            _property(m.properties, "engUnit", STRING, point.unit)
        if birth and point.low is not None:
            _property(m.properties, "engLow", DOUBLE, point.low)
        if birth and point.high is not None:
            _property(m.properties, "engHigh", DOUBLE, point.high)
        _property(m.properties, "Quality", INT32, point.quality)
        if point.status is not None:
            _property(m.properties, "opcuaStatus", STRING, point.status)
            code = opcua_status_code(point.status)
            if code is not None:
                # Int64 (long_value): UInt32 is read from int_value by the specification and from
                # long_value by Tahu's codecs; a StatusCode fits an Int64 either way.
                _property(m.properties, "opcuaStatusCode", INT64, code)


def new_payload(ts_ms: int, seq: int | None) -> Payload:
    """A payload with its send time and, except on NDEATH, its sequence number."""
    payload = pb.Payload()
    payload.timestamp = ts_ms
    if seq is not None:
        payload.seq = seq
    return payload


def ndeath(bdseq: int, ts_ms: int) -> bytes:
    """The NDEATH payload: the bdSeq metric only, no sequence number."""
    payload = new_payload(ts_ms, None)
    m = payload.metrics.add()
    m.name = BDSEQ
    m.datatype = INT64
    m.timestamp = ts_ms
    m.long_value = bdseq
    data: bytes = payload.SerializeToString()
    return data


def nbirth_head(bdseq: int, ts_ms: int) -> Payload:
    """An NBIRTH with seq 0, bdSeq and ``Node Control/Rebirth`` (no aliases on those two)."""
    payload = new_payload(ts_ms, 0)
    m = payload.metrics.add()
    m.name, m.datatype, m.timestamp, m.long_value = BDSEQ, INT64, ts_ms, bdseq
    r = payload.metrics.add()
    r.name, r.datatype, r.timestamp, r.boolean_value = REBIRTH, BOOLEAN, ts_ms, False
    return payload


def decode(data: bytes) -> Payload:
    """Parse a Sparkplug B payload; raises SparkplugError when the bytes are not one."""
    payload = pb.Payload()
    try:
        payload.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError (and others on odd input)
        raise SparkplugError(f"sparkplug: not a Sparkplug B payload: {exc}") from exc
    return payload


def _varint(data: bytes, i: int, end: int) -> tuple[int, int]:
    """The varint starting at ``i`` and where it ends; raises AnonymizationError when it runs past ``end``."""
    value, shift = 0, 0
    while i < end:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
    raise AnonymizationError("anonymizer: a Sparkplug payload ends inside a varint: record dropped")


def _fields(data: bytes, i: int, end: int, message: Any, out: list[tuple[int, int]]) -> None:
    """Append the spans of the fields of ``message`` (a descriptor) encoded in ``data[i:end]``."""
    fields = message.fields_by_number
    while i < end:
        key, i = _varint(data, i, end)
        number, wire, start = key >> 3, key & 7, i
        if wire == 0:  # varint
            i = _varint(data, i, end)[1]
        elif wire in (1, 5):  # fixed 64 and 32 bits: double, float
            i += 8 if wire == 1 else 4
        elif wire == 2:  # length-delimited: a message of the schema, or text and bytes
            size, start = _varint(data, i, end)
            i = start + size
            field = fields.get(number)
            if i <= end and field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                _fields(data, start, i, field.message_type, out)
                continue
            # Strings, bytes and fields unknown to the schema: their content as one item.
        else:  # groups (3, 4) and reserved wire types: the Sparkplug schema has none
            raise AnonymizationError(
                f"anonymizer: a Sparkplug payload has a field of wire type {wire} (field {number}): "
                "it cannot be scanned field by field: record dropped"
            )
        if i > end:
            raise AnonymizationError("anonymizer: a Sparkplug payload ends inside a field: record dropped")
        out.append((start, i))


def field_spans(data: bytes) -> list[tuple[int, int]]:
    """Where each field's own bytes lie in an encoded Sparkplug payload, in order, at any depth (pure).

    Text and bytes: their content; numbers: their encoding.  Tags and lengths are in none: an
    identity scan confirms a hit inside one of these (``Anonymizer.check_within``).
    """
    out: list[tuple[int, int]] = []
    _fields(data, 0, len(data), pb.Payload.DESCRIPTOR, out)
    return out


def rebirth_requested(data: bytes) -> bool:
    """True when an NCMD payload asks for a rebirth (``Node Control/Rebirth`` = true)."""
    payload = decode(data)
    return any(
        m.name == REBIRTH and m.WhichOneof("value") == "boolean_value" and m.boolean_value
        for m in payload.metrics
    )


def host_state(data: bytes) -> tuple[bool, int] | None:
    """(online, timestamp) of a STATE message, or None when it is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("online"), bool):
        return None
    ts = doc.get("timestamp", 0)
    return doc["online"], int(ts) if isinstance(ts, int | float) and math.isfinite(ts) else 0
