"""SenML-CBOR packs (RFC 8428, ``application/senml+cbor``) for the gateway's outgoing records.

The anonymizer builds plain maps (``type`` "features", "alarm" or "diag"); :func:`encode_record`
turns one into a SenML pack and :func:`decode_record` gives the same map back, so the outbox and
every consumer share one compact, standard representation.  The layout (``docs/records.md``):

* the first record is the header: base name ``<subject>/``, base time, the record type as its
  name ("win" with the window length as value, "alarm" or "diag" with the kind as string value)
  and the schema version in the extension field ``sv``;
* a window's streams follow, each opened by a record that sets the base name
  ``<subject>/<metric>/`` and base unit and carries the sample count; each feature is then a
  record of a name and a value, so it costs a few bytes;
* alarms and diagnostics carry their detail as records named by the detail key, alarm
  contributions as records named ``c/<metric>.<feature>``.

Numbers other than times travel as IEEE single precision (half where exact) and are read back as
the shortest decimal that single precision holds, so 0.8 comes back as 0.8; about seven
significant digits is beyond any sensor's resolution.  Times stay double precision.  A base time
below 2**28 means "relative to now" to a generic SenML reader; the gateway's relative time (since
its start) is therefore marked with the must-understand field ``tm_``, which such a reader must
refuse rather than misread.

The uplink prepends a sequence record (:func:`wrap`) at publish time - ``seq`` (the outbox row
id), ``ep`` (the outbox epoch) and ``h`` (historical, replayed after an outage) - without
re-encoding the stored pack.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from gateway.errors import CorruptDataError
from gateway.sample import MDC

CONTENT_TYPE = "application/senml+cbor"

# RFC 8428 section 6, table 4: integer labels of the CBOR representation.
BVER, BN, BT, BU, BV, BS = -1, -2, -3, -4, -5, -6
N, U, V, VS, VB, S, T, UT, VD = 0, 1, 2, 3, 4, 5, 6, 7, 8

#: Base times below this are relative to "now" for a SenML reader (RFC 8428 section 4.5.3).
RELATIVE_TIME_LIMIT = 2**28
#: Extension labels this codec writes; the ones ending in "_" are must-understand (RFC 8428 4.4).
TIME_BASE = "tm_"  # "start": times count from the gateway's start, not from the epoch
UNDERSTOOD = frozenset({TIME_BASE})

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:./_-]*$")
_NAME_BAD_CHAR = re.compile(r"[^A-Za-z0-9:./_-]")
_F32 = struct.Struct("<f")
_F32_MAX = 3.4028234663852886e38
_MDC_CODE = {name: m.mdc for name, m in MDC.items()}


@dataclass(frozen=True, slots=True)
class SeqMeta:
    """The sequence record the uplink puts in front of a pack."""

    seq: int  # the outbox row id: per gateway, persisted, never reused within an epoch
    epoch: int  # random id of the outbox database; a new one means the sequence restarted
    historical: bool  # replayed from the backlog after an outage


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


# --- names ---------------------------------------------------------------------------------------


def _name(prefix: str, key: str, rec: dict[Any, Any], field: str = "key") -> str:
    """``prefix + key`` as a valid SenML name; an unusable key is also kept verbatim in ``field``."""
    if _NAME_OK.match(key):
        return prefix + key
    rec[field] = key
    return prefix + (_NAME_BAD_CHAR.sub("_", key) or "_")


# --- encoding ------------------------------------------------------------------------------------


def _header(payload: Mapping[str, Any], name: str) -> dict[Any, Any]:
    head: dict[Any, Any] = {N: name, "sv": payload.get("v", 1)}
    subject = payload.get("subject")
    if subject is not None:
        head[BN] = f"{subject}/"
    t = float(payload.get("t", 0.0))
    head[BT] = t
    if abs(t) < RELATIVE_TIME_LIMIT:
        head[TIME_BASE] = "start"
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


def _features_pack(p: Mapping[str, Any]) -> list[dict[Any, Any]]:
    head = _header(p, "win")
    head[U] = "s"
    head[V] = _num(p["win"])
    head["kind"] = p["kind"]
    pack = [head]
    pack += _detail_records(p.get("scores", {}), "score/")
    subject = p["subject"]
    dev = None
    for s in p["streams"]:
        metric = s["metric"]
        rec: dict[Any, Any] = {}
        rec[BN] = _name(f"{subject}/", metric, rec, "metric") + "/"
        rec[BU] = s["unit"]
        rec[N] = "n"
        rec[U] = "count"
        rec[V] = int(s["n"])
        if s["dev"] != dev:
            dev = rec["dev"] = s["dev"]
        if s.get("missing"):
            rec["miss"] = _f32(float(s["missing"]))
        mdc = s.get("mdc")
        if mdc is not None and _MDC_CODE.get(metric) != mdc:
            rec["mdc"] = mdc
        elif mdc is None and metric in _MDC_CODE:
            rec["mdc"] = None  # a name from the table used without its code
        if s.get("gap"):
            rec["gap"] = True
        pack.append(rec)
        for fname, value in s.get("f", {}).items():
            frec: dict[Any, Any] = {}
            frec[N] = _name("", fname, frec)
            frec[V] = _num(value)
            pack.append(frec)
    return pack


#: Alarm semantics in the alarm header: record key -> SenML extension label (docs/records.md).
_ALARM_FIELDS = (
    ("class", "cls"),
    ("priority", "pri"),
    ("limit", "lim"),
    ("value", "val"),
    ("held_s", "held"),
)


def _alarm_pack(p: Mapping[str, Any]) -> list[dict[Any, Any]]:
    head = _header(p, "alarm")
    head[VS] = p["alarm"]
    if "dev" in p:
        head["dev"] = p["dev"]
    if "metric" in p:
        head["metric"] = p["metric"]
    for key, label in _ALARM_FIELDS:
        if key in p:
            head[label] = p[key] if isinstance(p[key], str) else _num(p[key])
    pack = [head]
    pack += _detail_records(p.get("detail", {}))
    pack += _detail_records(p.get("contrib", {}), "c/")
    return pack


def _diag_pack(p: Mapping[str, Any]) -> list[dict[Any, Any]]:
    head = _header(p, "diag")
    head[VS] = p["diag"]
    return [head, *_detail_records(p.get("detail", {}))]


# --- estimate records (docs/records.md "Estimate records") ---------------------------------------


def _estimate_pack(p: Mapping[str, Any]) -> list[dict[Any, Any]]:
    head = _header(p, "est")
    head[VS] = p["est"]
    head["kind"] = p["kind"]
    head["st"] = p["state"]
    value: dict[Any, Any] = {N: p["est"], U: p["unit"]}
    if "value" in p:
        value[V] = _num(p["value"])
        value["sd"] = _num(p["sd"])
    else:
        value[VS] = ""  # no estimate ("lost"): a record still needs a value
    pack = [head, value]
    for src in p.get("src", []):
        rec: dict[Any, Any] = {}
        rec[N] = _name("src/", src["metric"], rec, "metric")
        rec[V] = _num(src["w"])
        rec["dev"] = src["dev"]
        pack.append(rec)
    pack += _detail_records(p.get("detail", {}), "d/")
    return pack


def _decode_estimate(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]]) -> dict[str, Any]:
    base = _decode_header(head, "estimate")
    value = rest[0]
    out: dict[str, Any] = {
        "v": base["v"],
        "type": "estimate",
        "subject": base.get("subject"),
        "kind": head["kind"],
        "t": base["t"],
        "est": head[VS],
        "unit": value[U],
        "state": head["st"],
    }
    if V in value:
        out["value"] = _restore(value[V])
        out["sd"] = _restore(value["sd"])
    src: list[dict[str, Any]] = []
    detail: dict[str, Any] = {}
    for rec in rest[1:]:
        name = str(rec.get(N, ""))
        if name.startswith("src/"):
            metric = str(rec["metric"]) if "metric" in rec else name[4:]
            src.append({"dev": rec["dev"], "metric": metric, "w": _restore(rec[V])})
        else:
            detail[_key(rec, "d/")] = _value(rec)
    out["src"] = src
    if detail:
        out["detail"] = detail
    return out


_PACKERS = {"features": _features_pack, "alarm": _alarm_pack, "diag": _diag_pack, "estimate": _estimate_pack}


def encode_record(payload: Mapping[str, Any]) -> bytes:
    """Encode an anonymized record map (features, alarm or diag) as a SenML-CBOR pack."""
    packer = _PACKERS.get(str(payload.get("type")))
    if packer is None:
        raise ValueError(f"senml: record type {payload.get('type')!r}: expected one of {', '.join(_PACKERS)}")
    return bytes(cbor2.dumps(packer(payload), canonical=True))


# --- decoding ------------------------------------------------------------------------------------


def _corrupt(why: str) -> CorruptDataError:
    return CorruptDataError(f"senml decoder: {why}: the record cannot be read; it is skipped")


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


def _decode_header(head: Mapping[Any, Any], kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {"v": head.get("sv", 1), "type": kind}
    bn = head.get(BN)
    if isinstance(bn, str):
        out["subject"] = bn.removesuffix("/")
    out["t"] = float(head.get(BT, 0.0))
    return out


def _decode_features(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]]) -> dict[str, Any]:
    out = _decode_header(head, "features")
    subject = out.get("subject", "")
    out = {
        "v": out["v"],
        "type": "features",
        "subject": subject,
        "kind": head["kind"],
        "t": out["t"],
        "win": _restore(head[V]),
    }
    scores: dict[str, float] = {}
    streams: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    dev: Any = None
    for rec in rest:
        if BN in rec:
            bn = str(rec[BN])
            metric = str(rec["metric"]) if "metric" in rec else bn[len(subject) + 1 : -1]
            dev = rec.get("dev", dev)
            current = {
                "dev": dev,
                "metric": metric,
                "unit": rec.get(BU),
                "n": int(rec.get(V, 0)),
                "missing": _restore(float(rec.get("miss", 0.0))),
            }
            mdc = rec.get("mdc", _MDC_CODE.get(metric))
            if mdc is not None:
                current["mdc"] = mdc
            if rec.get("gap"):
                current["gap"] = True
            else:
                current["f"] = {}
            streams.append(current)
        elif current is None:
            scores[_key(rec, "score/")] = _value(rec)
        else:
            current.setdefault("f", {})[_key(rec)] = _value(rec)
    out["streams"] = streams
    if scores:
        out["scores"] = scores
    return out


def _decode_alarm(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]]) -> dict[str, Any]:
    out = _decode_header(head, "alarm")
    out = {
        "v": out["v"],
        "type": "alarm",
        "alarm": head.get(VS),
        "subject": out.get("subject"),
        "t": out["t"],
    }
    if "dev" in head:
        out["dev"] = head["dev"]
    if "metric" in head:
        out["metric"] = head["metric"]
    for key, label in _ALARM_FIELDS:
        if label in head:
            out[key] = _restore(head[label])
    detail: dict[str, Any] = {}
    contrib: dict[str, Any] = {}
    for rec in rest:
        name = str(rec.get(N, ""))
        if name.startswith("c/"):
            contrib[_key(rec, "c/")] = _value(rec)
        else:
            detail[_key(rec)] = _value(rec)
    if detail:
        out["detail"] = detail
    if contrib:
        out["contrib"] = contrib
    return out


def _decode_diag(head: Mapping[Any, Any], rest: Sequence[Mapping[Any, Any]]) -> dict[str, Any]:
    base = _decode_header(head, "diag")
    out: dict[str, Any] = {"v": base["v"], "type": "diag", "diag": head[VS], "t": base["t"]}
    if "subject" in base:
        out["subject"] = base["subject"]
    detail = {_key(rec): _value(rec) for rec in rest}
    if detail:
        out["detail"] = detail
    return out


_UNPACKERS = {"win": _decode_features, "alarm": _decode_alarm, "diag": _decode_diag, "est": _decode_estimate}


def _is_meta(rec: Any) -> bool:
    return isinstance(rec, dict) and rec.get(N) == "seq" and BN not in rec and "ep" in rec


def decode_pack(data: bytes) -> tuple[SeqMeta | None, dict[str, Any]]:
    """Decode a pack (with or without the uplink's sequence record) to (sequence, record map).

    A plain CBOR map (the outbox encoding before SenML) is accepted as the record itself.
    """
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, EOFError, TypeError) as exc:
        raise _corrupt(f"{len(data)} bytes are not valid CBOR: {exc}") from exc
    if isinstance(value, dict):
        return None, value
    if not isinstance(value, list) or not value:
        raise _corrupt(
            f"a CBOR {type(value).__name__} of length {len(value) if isinstance(value, list) else 0}, expected a non-empty array"
        )
    _check_labels(value)
    meta = None
    if _is_meta(value[0]):
        m = value.pop(0)
        try:
            meta = SeqMeta(int(m[V]), int(m["ep"]), bool(m.get("h", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(f"sequence record {m!r} is malformed") from exc
        if not value:
            raise _corrupt("a sequence record without a record")
    head = value[0]
    unpack = _UNPACKERS.get(str(head.get(N)))
    if unpack is None:
        raise _corrupt(f"header name {head.get(N)!r}: expected one of {', '.join(_UNPACKERS)}")
    try:
        return meta, unpack(head, value[1:])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _corrupt(f"{head.get(N)} pack is malformed: {exc}") from exc


def decode_record(data: bytes) -> dict[str, Any]:
    """Decode a pack to the record map the anonymizer built (the sequence record is dropped)."""
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


def wrap(pack: bytes, seq: int, epoch: int, historical: bool) -> bytes:
    """Prepend the sequence record to a stored pack (a legacy CBOR map is converted first)."""
    if pack and pack[0] >> 5 == 5:
        pack = encode_record(decode_record(pack))
    try:
        count, head_len = _split_array(pack)
    except ValueError as exc:
        raise _corrupt(f"stored record is not a SenML pack ({exc})") from exc
    meta: dict[Any, Any] = {N: "seq", V: seq, "ep": epoch}
    if historical:
        meta["h"] = True
    return _array_head(count + 1) + bytes(cbor2.dumps(meta, canonical=True)) + pack[head_len:]


def resolved(data: bytes) -> list[dict[str, Any]]:
    """The pack's records resolved (RFC 8428 section 4.6): full names, units and times, no base fields."""
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, EOFError, TypeError) as exc:
        raise _corrupt(f"{len(data)} bytes are not valid CBOR: {exc}") from exc
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
