"""The record contract: typed records round-trip through SenML-CBOR, the documented vectors decode,
packs read as standard SenML, and the records package and the twin stand alone."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.records import (
    SCHEMA_MAJOR,
    AlarmRecord,
    CorruptRecordError,
    DiagnosticRecord,
    EstimateRecord,
    EstimateSource,
    FeaturesWindow,
    SeqMeta,
    StatusLoss,
    StatusRecord,
    StreamWindow,
    UnsupportedVersionError,
    as_map,
    decode,
    decode_pack,
    decode_status,
    encode,
    encode_status,
    resolved,
    wire_number,
    wrap,
)
from gateway.records.codec import BN, BT, FEATURE_ORDER, N, V, _scale, on_wire
from gateway.records.model import CLOCKS, SHAPES
from gateway.records.render import describe
from gateway.records.units import MDC_CODE

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "k3j2x7q9m4t8vbaa"
DEV = "d0d0d0d0d0d0d0d0"


def features(t: float = 30.25, **extra: object) -> FeaturesWindow:
    streams = (
        StreamWindow(
            "MDC_PULS_OXIM_SAT_O2",
            "%",
            DEV,
            10,
            mdc=150456,
            features={"mean": 97.5, "std": 0.8, "min": 96.0, "max": 99.0, "slope": -0.02},
            shape="level",
        ),
        StreamWindow(
            "MDC_ECG_TIME_PD_RR_GL",
            "ms",
            DEV,
            12,
            missing=0.05,
            mdc=147240,
            features={"mean": 928.0, "rmssd": 27.0, "sdnn": 50.25, "pnn50": 12.5},
            shape="interval",
        ),
        StreamWindow("Pump1/Motor Temp (C)", "Cel", "e1e1e1e1e1e1e1e1", 0, missing=1.0, gap=True),
    )
    return FeaturesWindow(SUBJECT, "medical", t, 10.0, streams, run=3, **extra)  # type: ignore[arg-type]


# --- property tests: every record class round-trips --------------------------------------------------

names = st.text(min_size=1, max_size=24)
tokens = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
wire = st.floats(width=32, allow_nan=False).map(wire_number)
feature_values = st.floats(allow_nan=False, min_value=-1e9, max_value=1e9)
times = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
runs = st.integers(min_value=0, max_value=2**40)
clocks = st.sampled_from(CLOCKS)
versions = st.integers(min_value=1, max_value=SCHEMA_MAJOR)
details = st.dictionaries(
    tokens, st.one_of(wire, st.integers(-(2**63), 2**63), tokens, st.booleans()), max_size=5
)
streams = st.builds(
    StreamWindow,
    metric=names,
    unit=st.sampled_from(["%", "/min", "ms", "Cel", "A", "[g]", "mm[Hg]", "l/min"]),
    dev=st.text(min_size=1, max_size=16),
    n=st.integers(0, 2**31),
    missing=st.floats(0.0, 1.0).map(wire_number),
    mdc=st.one_of(st.none(), st.integers(0, 2**32)),
    gap=st.booleans(),
    features=st.dictionaries(names, wire, max_size=6),
    shape=st.one_of(st.none(), st.sampled_from(SHAPES)),
)
#: Schema 3 streams: features of the shape's names (scaled) or any names, a stated resolution, markers.
streams_v3 = st.builds(
    StreamWindow,
    metric=st.one_of(names, st.sampled_from(sorted(MDC_CODE))),
    unit=st.sampled_from(["%", "/min", "ms", "Cel", "A", "[g]", "mm[Hg]", "l/min", "furlong"]),
    dev=st.text(min_size=1, max_size=16),
    n=st.integers(0, 2**31),
    missing=st.floats(0.0, 1.0).map(wire_number),
    mdc=st.one_of(st.none(), st.integers(0, 2**32)),
    gap=st.booleans(),
    features=st.one_of(
        st.dictionaries(
            st.sampled_from(FEATURE_ORDER["interval"] + FEATURE_ORDER["waveform"]), feature_values
        ),
        st.dictionaries(names, feature_values, max_size=6),
    ),
    shape=st.one_of(st.none(), st.sampled_from(SHAPES)),
    res=st.one_of(st.none(), st.integers(-6, 3)),
    unchanged=st.booleans(),
)


def feature_windows(
    stream: st.SearchStrategy[StreamWindow], **fixed: st.SearchStrategy[Any]
) -> st.SearchStrategy[FeaturesWindow]:
    """Windows of any fields, with these streams (and, e.g., the schema version or heartbeat given)."""
    return st.builds(
        FeaturesWindow,
        subject=st.text(max_size=16),
        kind=st.sampled_from(["medical", "industrial"]),
        t=times,
        win=st.floats(0.001, 3600.0).map(wire_number),
        streams=st.lists(stream, max_size=6).map(tuple),
        scores=st.dictionaries(names, wire, max_size=3),
        run=runs,
        clock=clocks,
        **fixed,
    )


@given(feature_windows(streams, sv=st.integers(min_value=1, max_value=2)))
def test_a_features_window_of_schema_1_or_2_round_trips(rec: FeaturesWindow) -> None:
    assert decode(encode(rec)) == rec


@given(feature_windows(streams_v3, hb=st.one_of(st.none(), st.floats(1.0, 3600.0).map(wire_number))))
def test_a_features_window_round_trips_at_its_stated_resolution(rec: FeaturesWindow) -> None:
    got = decode(encode(rec))
    assert got == on_wire(rec)
    assert isinstance(got, FeaturesWindow)
    scaled = True
    for sent, back in zip(rec.streams, got.streams, strict=True):
        assert back.unchanged == sent.unchanged
        if sent.unchanged:
            assert back.features == {}
            continue
        assert back.features.keys() == sent.features.keys()
        for name, value in sent.features.items():
            step = _scale(name, back.res, rec.win)
            if step is not None and abs(value / step) < 2**30:
                tol = step / 2 * (1 + 1e-9)
            else:  # unscaled, or too many steps: single precision
                tol, scaled = abs(value) * 2**-23, False
            assert abs(back.features[name] - value) <= tol + 1e-30, name
    if scaled:
        assert decode(encode(got)) == got  # what a reader got travels again unchanged


@given(
    st.builds(
        AlarmRecord,
        alarm=tokens,
        subject=st.text(max_size=16),
        t=times,
        dev=st.one_of(st.none(), st.text(max_size=16)),
        metric=st.one_of(st.none(), names),
        detail=details,
        contrib=st.dictionaries(names, wire, max_size=4),
        alarm_class=st.one_of(st.none(), st.sampled_from(["technical", "physiological", "process"])),
        priority=st.one_of(st.none(), st.sampled_from(["high", "medium", "low"])),
        limit=st.one_of(st.none(), wire),
        value=st.one_of(st.none(), wire),
        held_s=st.one_of(st.none(), wire),
        run=runs,
        clock=clocks,
        sv=versions,
    )
)
def test_an_alarm_round_trips(rec: AlarmRecord) -> None:
    assert decode(encode(rec)) == rec


@given(
    st.builds(
        DiagnosticRecord,
        diag=tokens,
        t=times,
        subject=st.one_of(st.none(), st.text(max_size=16)),
        detail=details,
        run=runs,
        clock=clocks,
        sv=versions,
    ),
    st.builds(SeqMeta, seq=st.integers(1, 2**62), epoch=st.integers(0, 2**63), historical=st.booleans()),
)
def test_a_diagnostic_round_trips_with_its_sequence_record(rec: DiagnosticRecord, meta: SeqMeta) -> None:
    assert decode(encode(rec)) == rec
    assert decode_pack(wrap(encode(rec), meta)) == (meta, rec)


@st.composite
def estimates(draw: st.DrawFn) -> EstimateRecord:
    """An estimate: measured (a value and its SD) or lost (neither), with its sources and detail."""
    measured = draw(st.booleans())
    return EstimateRecord(
        subject=draw(st.text(max_size=16)),
        kind=draw(st.sampled_from(["medical", "industrial"])),
        t=draw(times),
        est=draw(tokens),
        unit=draw(st.sampled_from(["/min", "%", "1", "A.h"])),
        state=draw(st.sampled_from(["measured", "bridged", "untrusted"]) if measured else st.just("lost")),
        value=draw(wire) if measured else None,
        sd=draw(wire) if measured else None,
        src=tuple(
            draw(
                st.lists(
                    st.builds(EstimateSource, dev=st.text(max_size=16), metric=names, w=wire), max_size=4
                )
            )
        ),
        detail=draw(details),
        run=draw(runs),
        clock=draw(clocks),
        sv=draw(versions),
    )


@given(estimates())
def test_an_estimate_round_trips(rec: EstimateRecord) -> None:
    assert decode(encode(rec)) == rec
    plain = as_map(rec)
    assert plain["type"] == "estimate"
    assert [s["metric"] for s in plain["src"]] == [s.metric for s in rec.src]
    assert ("value" in plain) == (rec.value is not None)


def test_an_estimate_reads_as_value_plus_minus_sd_with_its_sources() -> None:
    src = (
        EstimateSource(DEV, "MDC_ECG_HEART_RATE", 0.9),
        EstimateSource(DEV, "MDC_PULS_OXIM_PULS_RATE", 0.1),
    )
    rec = EstimateRecord(SUBJECT, "medical", 12.0, "hr", "/min", "measured", 71.25, 0.8, src, run=2)
    assert describe(rec) == (
        "run 2 t=12 ESTIMATE HR=71.25±0.8/min measured [ECG_HEART_RATE 0.90 PULS_OXIM_PULS_RATE 0.10]"
    )
    lost = dataclasses.replace(rec, state="lost", value=None, sd=None, src=())
    assert describe(decode(encode(lost))) == "run 2 t=12 ESTIMATE HR=? lost"


def test_a_remaining_life_reads_with_its_90_percent_interval_cycles_and_inputs_held() -> None:
    src = tuple(EstimateSource(DEV, f"Engine/S{k}", 1 / 14) for k in range(14))
    detail: dict[str, float | int | str | bool] = {
        "lo90": 56.52, "hi90": 118.3, "cycles": 45, "held": 2, "model": "rul_cmapss",
    }  # fmt: skip
    rec = EstimateRecord(
        SUBJECT, "industrial", 450.0, "rul", "{cycle}", "bridged", 87.4, 18.77, src, detail, run=3
    )
    assert describe(decode(encode(rec))) == (
        "run 3 t=450 ESTIMATE RUL=87.4±19 cycles (90 %: 56.52-118.3) bridged, cycle 45, 2 inputs held "
        "[14 sources] model=rul_cmapss"
    )


@given(
    st.builds(
        StatusRecord,
        state=st.sampled_from(["online", "offline"]),
        ep=st.integers(0, 2**63),
        sv=versions,
        run=st.one_of(st.none(), runs),
        clean=st.one_of(st.none(), st.booleans()),
        dropped=st.dictionaries(st.sampled_from(["alarms", "features", "diag"]), st.integers(1, 2**40)),
        drops=st.dictionaries(
            st.sampled_from(["features", "diagnostics"]),
            st.dictionaries(st.sampled_from(["budget", "age", "corrupt"]), st.integers(1, 2**40), min_size=1),
        ),
        degraded=st.one_of(st.none(), st.sampled_from(["disk_full", "write_failing"])),
        loss=st.one_of(
            st.none(),
            st.builds(
                StatusLoss,
                lane=st.sampled_from(["alarms", "features"]),
                reason=st.sampled_from(["budget", "corrupt", "dead_letter"]),
                n=st.integers(1, 2**40),
                t=st.floats(0, 1e9, allow_nan=False),
            ),
        ),
    )
)
def test_a_status_round_trips(status: StatusRecord) -> None:
    assert decode_status(encode_status(status)) == status


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30))
def test_any_feature_value_comes_back_to_single_precision(x: float) -> None:
    stream = StreamWindow("m", "1", DEV, 1, features={"mean": x})
    got = decode(encode(FeaturesWindow(SUBJECT, "medical", 1.0, 1.0, (stream,))))
    assert isinstance(got, FeaturesWindow)
    assert got.streams[0].features["mean"] == pytest.approx(x, rel=1e-6, abs=1e-37)


# --- the reference: docs/records.md ------------------------------------------------------------------


def golden_vectors() -> list[tuple[str, str, str]]:
    """(name, hex, JSON) of every golden vector in docs/records.md."""
    text = (ROOT / "docs" / "records.md").read_text(encoding="utf-8")
    found = re.findall(r"#### Vector: (.+?)\n.*?```cbor-hex\n(.+?)```.*?```json\n(.+?)```", text, re.DOTALL)
    return [(name, "".join(h.split()), j) for name, h, j in found]


def test_the_reference_holds_golden_vectors() -> None:
    assert len(golden_vectors()) >= 4


@pytest.mark.parametrize(("name", "hexdata", "expected"), golden_vectors())
def test_golden_vectors_decode_to_their_documented_records(name: str, hexdata: str, expected: str) -> None:
    data = bytes.fromhex(hexdata)
    meta, rec = decode_pack(data)
    doc = json.loads(expected)
    got = {"seq": None if meta is None else [meta.seq, meta.epoch, meta.historical], "record": as_map(rec)}
    assert got == doc, name
    # The encoder writes exactly these bytes (canonical CBOR), so the vectors also pin the writer.
    assert (wrap(encode(rec), meta) if meta else encode(rec)) == data, name


def test_the_reference_states_a_cddl_schema_and_the_versioning_rule() -> None:
    text = (ROOT / "docs" / "records.md").read_text(encoding="utf-8")
    assert "```cddl" in text
    assert "## Versioning" in text


# --- SenML as other readers see it -----------------------------------------------------------------


def test_packs_are_senml_with_names_units_and_times() -> None:
    flat = resolved(encode(features()))
    by_name = {r["n"]: r for r in flat}
    assert by_name[f"{SUBJECT}/win"]["v"] == 10.0
    assert by_name[f"{SUBJECT}/win"]["u"] == "s"
    # A stream reads as its sample count under the MDC code; its features are one scaled array.
    count = by_name[f"{SUBJECT}/150456"]
    assert (count["v"], count["t"]) == (10, 30.25)
    # A name SenML cannot hold is made safe, and kept verbatim in the record.
    assert f"{SUBJECT}/Pump1/Motor_Temp__C_" in by_name
    got = decode(encode(features()))
    assert isinstance(got, FeaturesWindow)
    assert got.streams[2].metric == "Pump1/Motor Temp (C)"
    assert got.streams[0].features["mean"] == 97.5


def test_site_time_is_marked_must_understand_and_unix_time_is_not() -> None:
    site = cbor2.loads(encode(features()))
    assert (site[0]["tm_"], site[0]["run"]) == ("site", 3)
    absolute = cbor2.loads(encode(features(t=1_760_000_000.0, clock="unix")))
    assert "tm_" not in absolute[0]
    assert absolute[0][BT] == 1_760_000_000.0


def test_an_unknown_must_understand_field_is_refused_and_other_unknown_fields_ignored() -> None:
    pack = cbor2.loads(encode(features()))
    pack[1]["zz"] = 1  # a field a newer minor version added: ignored
    assert decode(cbor2.dumps(pack)) == on_wire(features())
    pack[1]["zz_"] = 1
    with pytest.raises(CorruptRecordError, match="must-understand field 'zz_'"):
        decode(cbor2.dumps(pack))


def test_a_newer_major_version_is_refused_as_such() -> None:
    pack = cbor2.loads(encode(features()))
    pack[0]["sv"] = SCHEMA_MAJOR + 1
    with pytest.raises(UnsupportedVersionError, match="newer than this reader"):
        decode(cbor2.dumps(pack))
    pack[0]["sv"] = SCHEMA_MAJOR
    pack[0]["svm"] = 99  # a newer minor version of the same major: read
    assert decode(cbor2.dumps(pack)) == on_wire(features())


def test_a_feature_costs_a_few_bytes() -> None:
    base = len(encode(features()))
    s0, s1, *rest = features().streams
    more = dataclasses.replace(
        features(), streams=(s0, dataclasses.replace(s1, features={**s1.features, "std": 41.0}), *rest)
    )
    assert len(encode(more)) - base <= 2  # a small scaled integer in place of a null
    odd = dataclasses.replace(
        features(), streams=(dataclasses.replace(s0, features={**s0.features, "q25": 96.5}), s1, *rest)
    )
    assert len(encode(odd)) - base <= 45  # a name outside the shape's set: the names travel too
    assert base < 300  # three streams, one of them with a long unsafe name


def test_wrap_prepends_the_sequence_record() -> None:
    data = encode(features())
    wrapped = wrap(data, SeqMeta(123456, 987654321, True))
    assert decode_pack(wrapped) == (SeqMeta(123456, 987654321, True), on_wire(features()))
    assert cbor2.loads(wrapped)[0] == {N: "seq", V: 123456, "ep": 987654321, "h": True}
    assert len(wrapped) - len(data) <= 24  # seq and epoch as 32-bit integers, the flag, the labels


def test_wrap_handles_long_packs_and_legacy_records() -> None:
    rec = features()
    long = FeaturesWindow(SUBJECT, "medical", 1.0, 10.0, rec.streams * 20, run=1)
    meta, got = decode_pack(wrap(encode(long), SeqMeta(1, 2)))
    assert meta == SeqMeta(1, 2, False)
    assert got == on_wire(long)
    # What the outbox held before SenML (schema 1, a plain map): still read, and sent as a pack.
    legacy = {
        "v": 1,
        "type": "alarm",
        "alarm": "sensor_lost",
        "subject": SUBJECT,
        "t": 12.5,
        "metric": "MDC_PULS_OXIM_SAT_O2",
        "dev": DEV,
    }
    want = AlarmRecord("sensor_lost", SUBJECT, 12.5, DEV, "MDC_PULS_OXIM_SAT_O2", clock="start", sv=1)
    assert decode(cbor2.dumps(legacy)) == want
    assert decode_pack(wrap(cbor2.dumps(legacy), SeqMeta(7, 8))) == (SeqMeta(7, 8), want)


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
        cbor2.dumps([{N: "diag", 3: "x", "sv": 2, "run": -1}]),
        cbor2.dumps([{N: "win", 2: 1.0, "kind": "medical", "sv": 3}, {N: "1", 2: 1, "r": 10**9, "f": [1]}]),
        cbor2.dumps(
            [{N: "win", 2: 1.0, "kind": "medical", "sv": 3}, {N: "1", 2: 1, "f": [1, "x"], "fn": ["a"]}]
        ),
        cbor2.dumps([{N: "win", 2: 1.0, "kind": "medical", "sv": 3}, {N: "1", 2: 1, "f": ["x"]}]),
        cbor2.dumps([{N: "diag", 3: "x", "sv": 2, "tm_": "boot"}]),
        cbor2.dumps({"type": "poem"}),
    ],
)
def test_garbage_is_a_corrupt_record_error(data: bytes) -> None:
    with pytest.raises(CorruptRecordError):
        decode(data)


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)


@given(
    st.dictionaries(
        st.sampled_from([N, V, "f", "fn", "r", "eq", "gap", "sh", "mu", "dev", "miss", "mdc", "metric"]),
        cbor_values,
    )
)
def test_any_schema_3_stream_record_decodes_or_is_refused_as_corrupt(rec: dict[object, object]) -> None:
    pack = [{N: "win", 2: 30.0, "kind": "medical", "sv": 3}, {**rec, "f": rec.get("f", [])}]
    try:
        got = decode(cbor2.dumps(pack))
    except CorruptRecordError:
        return
    assert isinstance(got, FeaturesWindow)


def test_a_non_record_is_refused_at_encoding() -> None:
    with pytest.raises(TypeError, match="cannot encode a dict"):
        encode({"type": "poem"})  # type: ignore[arg-type]


def test_non_finite_values_survive() -> None:
    stream = StreamWindow("m", "1", DEV, 1, features={"max": math.inf})
    got = decode(encode(FeaturesWindow(SUBJECT, "medical", 1.0, 1.0, (stream,))))
    assert isinstance(got, FeaturesWindow)
    assert got.streams[0].features["max"] == math.inf


# --- standing alone ------------------------------------------------------------------------------------


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    loaded: list[str] = json.loads(out.splitlines()[-1])
    return loaded


def test_the_twin_loads_no_gateway_module_outside_the_records_nor_pydantic_nor_numpy() -> None:
    loaded = _loaded_after(
        "import gateway.twin, gateway.twin.decoder, gateway.twin.sequence, gateway.twin.view, gateway.twin.listen"
    )
    assert "gateway.twin.listen" in loaded
    foreign = [
        m
        for m in loaded
        if m.split(".")[0] in {"pydantic", "pydantic_core", "numpy"}
        or (m.startswith("gateway.") and not m.startswith(("gateway.records", "gateway.twin")))
    ]
    assert foreign == []


def test_the_records_package_imports_nothing_else_of_the_gateway() -> None:
    loaded = _loaded_after("import gateway.records, gateway.records.render, gateway.records.topics")
    assert [m for m in loaded if m.startswith("gateway.") and not m.startswith("gateway.records")] == []


def test_the_uplink_config_does_not_import_the_whole_config() -> None:
    # gateway.config embeds the uplink's section; the uplink's section must not need gateway.config back.
    loaded = _loaded_after("import gateway.uplink.config")
    assert "gateway.config" not in loaded
    assert "gateway.config_base" in loaded


@pytest.mark.parametrize("historical", [False, True])
@pytest.mark.parametrize(
    "seq", [0, 1, 23, 24, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**64 - 1, 2**64, -1]
)
def test_wrap_writes_the_canonical_sequence_map_cbor2_writes(seq: int, historical: bool) -> None:
    """The hand-written sequence map is byte for byte cbor2's canonical one, at every integer width."""
    pack = encode(AlarmRecord("sensor_lost", SUBJECT, 12.5, DEV, "MDC_PULS_OXIM_SAT_O2", clock="start", sv=1))
    assert pack[0] >> 5 == 4  # an array
    assert pack[0] & 0x1F < 23  # short: its head is one byte
    for epoch in (0, 7, 300, 2**40, seq):
        rec: dict[Any, Any] = {N: "seq", V: seq, "ep": epoch}
        if historical:
            rec["h"] = True
        want = bytes((pack[0] + 1,)) + cbor2.dumps(rec, canonical=True) + pack[1:]
        assert wrap(pack, SeqMeta(seq, epoch, historical)) == want
