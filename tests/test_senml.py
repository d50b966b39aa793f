"""SenML-CBOR packs: the anonymizer's maps round-trip, stay compact and read as standard SenML."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.encode import decode, encode
from gateway.errors import CorruptDataError
from gateway.senml import BN, BT, N, V, decode_pack, encode_record, resolved, wrap

SUBJECT = "k3j2x7q9m4t8vbaa"
DEV = "d0d0d0d0d0d0d0d0"


def features(**extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "v": 1,
        "type": "features",
        "subject": SUBJECT,
        "kind": "medical",
        "t": 30.25,
        "win": 10.0,
        "streams": [
            {
                "dev": DEV,
                "metric": "MDC_PULS_OXIM_SAT_O2",
                "unit": "%",
                "n": 10,
                "missing": 0.0,
                "mdc": 150456,
                "f": {"mean": 97.5, "std": 0.8, "min": 96.0, "max": 99.0, "slope": -0.02},
            },
            {
                "dev": DEV,
                "metric": "MDC_ECG_TIME_PD_RR_GL",
                "unit": "ms",
                "n": 12,
                "missing": 0.05,
                "mdc": 147240,
                "f": {"rmssd": 41.5, "sdnn": 50.25, "pnn50": 12.5},
            },
            {
                "dev": "e1e1e1e1e1e1e1e1",
                "metric": "Pump1/Motor Temp (C)",
                "unit": "Cel",
                "n": 0,
                "missing": 1.0,
                "gap": True,
            },
        ],
        **extra,
    }
    return rec


def test_a_window_round_trips_exactly() -> None:
    rec = features(scores={"pump_ae": 0.125})
    assert decode(encode(rec)) == rec


def test_alarm_and_diag_round_trip() -> None:
    alarm = {
        "v": 1,
        "type": "alarm",
        "alarm": "anomaly",
        "subject": SUBJECT,
        "t": 12.5,
        "dev": DEV,
        "metric": "MDC_PULS_OXIM_SAT_O2",
        "detail": {"model": "hr_limit", "score": 1.5, "fallback": 1},
        "contrib": {"MDC_ECG_HEART_RATE.mean": 0.8, "MDC_ECG_HEART_RATE.std": 0.2},
    }
    diag = {
        "v": 1,
        "type": "diag",
        "diag": "counters",
        "t": 60.0,
        "detail": {"windower_late": 3, "state": "ok"},
    }
    labelled = {
        "v": 1,
        "type": "diag",
        "diag": "sim_label",
        "t": 1.5,
        "subject": SUBJECT,
        "detail": {"event": "x"},
    }
    for rec in (alarm, diag, labelled):
        assert decode(encode(rec)) == rec


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30))
def test_any_feature_value_comes_back_to_single_precision(x: float) -> None:
    rec = features()
    rec["streams"][0]["f"] = {"mean": x}
    got = decode(encode(rec))["streams"][0]["f"]["mean"]
    assert got == pytest.approx(x, rel=1e-6, abs=1e-37)


def test_packs_are_senml_with_names_units_and_times() -> None:
    flat = resolved(encode(features()))
    by_name = {r["n"]: r for r in flat}
    assert by_name[f"{SUBJECT}/win"]["v"] == 10.0
    mean = by_name[f"{SUBJECT}/MDC_PULS_OXIM_SAT_O2/mean"]
    assert (mean["v"], mean["u"], mean["t"]) == (97.5, "%", 30.25)
    assert by_name[f"{SUBJECT}/MDC_PULS_OXIM_SAT_O2/n"]["u"] == "count"
    # A name SenML cannot hold is made safe, and kept verbatim in the record.
    assert f"{SUBJECT}/Pump1/Motor_Temp__C_/n" in by_name
    assert decode(encode(features()))["streams"][2]["metric"] == "Pump1/Motor Temp (C)"


def test_relative_time_is_marked_must_understand_and_absolute_time_is_not() -> None:
    rel = cbor2.loads(encode(features()))
    assert rel[0]["tm_"] == "start"
    absolute = cbor2.loads(encode(features(t=1_760_000_000.0)))
    assert "tm_" not in absolute[0]
    assert absolute[0][BT] == 1_760_000_000.0


def test_an_unknown_must_understand_field_is_refused() -> None:
    pack = cbor2.loads(encode(features()))
    pack[1]["zz_"] = 1
    with pytest.raises(CorruptDataError, match="must-understand field 'zz_'"):
        decode(cbor2.dumps(pack))


def test_a_feature_costs_a_few_bytes() -> None:
    base = len(encode(features()))
    more = features()
    more["streams"][0]["f"]["q25"] = 96.5
    assert len(encode(more)) - base <= 10  # map head, two labels, the name (4), a half float (3)
    assert base < 450  # three streams, one of them with a long unsafe name


def test_wrap_prepends_the_sequence_record() -> None:
    data = encode(features())
    wrapped = wrap(data, 123456, 987654321, True)
    meta, rec = decode_pack(wrapped)
    assert meta is not None
    assert (meta.seq, meta.epoch, meta.historical) == (123456, 987654321, True)
    assert rec == features()
    assert decode(wrapped) == features()
    assert cbor2.loads(wrapped)[0] == {N: "seq", V: 123456, "ep": 987654321, "h": True}
    assert len(wrapped) - len(data) <= 24  # seq and epoch as 32-bit integers, the flag, the labels


def test_wrap_handles_long_packs_and_legacy_maps() -> None:
    rec = features()
    rec["streams"] = rec["streams"] * 20  # more than 23 records: a longer array header
    data = encode(rec)
    meta, got = decode_pack(wrap(data, 1, 2, False))
    assert meta is not None
    assert not meta.historical
    assert len(got["streams"]) == 60
    legacy = cbor2.dumps(features(), canonical=True)  # what the outbox held before SenML
    assert decode(legacy) == features()
    assert decode_pack(wrap(legacy, 7, 8, False)) == decode_pack(wrap(encode(features()), 7, 8, False))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\x00",
        cbor2.dumps(5),
        cbor2.dumps([]),
        cbor2.dumps([{N: "nope", V: 1}]),
        cbor2.dumps([{N: "seq", V: 1, "ep": 2}]),
        cbor2.dumps([{BN: "x/", N: "win"}]),
    ],
)
def test_garbage_is_a_corrupt_data_error(data: bytes) -> None:
    with pytest.raises(CorruptDataError):
        decode(data)


def test_unknown_record_type_is_refused_at_encoding() -> None:
    with pytest.raises(ValueError, match="record type"):
        encode_record({"type": "poem"})


def test_non_finite_values_survive() -> None:
    rec = features()
    rec["streams"][0]["f"] = {"max": math.inf}
    assert decode(encode(rec))["streams"][0]["f"]["max"] == math.inf
