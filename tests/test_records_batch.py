"""Several windows of one subject in one message (schema 4): each record reads back as it would
alone, with its own sequence id; older records are never joined; the documented vector holds."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_records import features, streams_v3, wire

from gateway.records import (
    CorruptRecordError,
    FeaturesWindow,
    Joiner,
    SeqMeta,
    StreamWindow,
    UnsupportedVersionError,
    as_map,
    codec,
    decode_batch,
    decode_pack,
    encode,
    join,
    wrap,
)
from gateway.records.codec import on_wire
from gateway.twin.decoder import decode_message, decode_messages
from gateway.twin.view import SubjectState, silent

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def subject_windows(draw: st.DrawFn) -> list[FeaturesWindow]:
    """Consecutive windows of one subject: mostly the same streams with new features, sometimes not."""
    base = draw(st.lists(streams_v3, min_size=1, max_size=4))
    subject = draw(st.text(max_size=16))
    kind = draw(st.sampled_from(["medical", "industrial"]))
    win = draw(st.floats(1.0, 120.0).map(codec.wire_number))
    t = draw(st.floats(0.0, 1e9, allow_nan=False))
    hb = draw(st.one_of(st.none(), st.just(60.0)))
    run = draw(st.integers(0, 2**20))
    out = []
    for i in range(draw(st.integers(1, 7))):
        streams = []
        for b in base:
            how = draw(st.sampled_from(["new", "new", "marker", "gap", "other", "res"]))
            if how == "new":
                features = draw(st.dictionaries(st.sampled_from(["mean", "std", "max"]), wire))
                s = dataclasses.replace(b, features=features)
            elif how == "marker":
                s = dataclasses.replace(b, unchanged=True, features={})
            elif how == "gap":
                s = dataclasses.replace(b, gap=True, n=0, missing=1.0, features={}, unchanged=False)
            elif how == "other":
                s = draw(streams_v3)
            else:
                s = dataclasses.replace(b, res=draw(st.one_of(st.none(), st.integers(-4, 2))))
            streams.append(s)
        if draw(st.booleans()):
            streams.reverse()
        out.append(
            FeaturesWindow(
                subject,
                kind,
                t + 10.0 * i,
                win,
                tuple(streams[: draw(st.integers(0, len(streams)))]),
                draw(st.dictionaries(st.sampled_from(["vitals", "pump"]), wire, max_size=1)),
                run=run + draw(st.integers(0, 1)),  # a restart may fall inside a message
                hb=hb if draw(st.integers(0, 5)) else None if hb else 60.0,
            )
        )
    return out


@given(
    subject_windows(),
    st.lists(st.integers(1, 2**20), min_size=7, max_size=7),
    st.integers(1, 2**40),
    st.integers(0, 2**63),
    st.booleans(),
    st.integers(256, 4096),
)
def test_joined_windows_read_back_as_each_would_alone(
    windows: list[FeaturesWindow], steps: list[int], first: int, epoch: int, hist: bool, limit: int
) -> None:
    ids = [first + sum(steps[:i]) for i in range(len(windows))]
    packs = [(encode(w), i) for w, i in zip(windows, ids, strict=False)]
    messages = join(packs, epoch, historical=hist, batch_s=60.0, limit=limit)
    got = [record for message in messages for record in decode_batch(message)]
    assert got == [(SeqMeta(i, epoch, hist, 60.0), on_wire(w)) for w, i in zip(windows, ids, strict=False)]
    alone = sum(len(wrap(p, SeqMeta(i, epoch, hist, 60.0))) for p, i in packs)
    assert sum(len(m) for m in messages) <= alone  # joining never costs bytes
    for message in messages:
        if len(decode_batch(message)) > 1:
            assert len(message) <= limit


def _window(t: float, mean: float, *, marker: bool = False) -> FeaturesWindow:
    spo2 = StreamWindow(
        "MDC_PULS_OXIM_SAT_O2",
        "%",
        "d0d0d0d0d0d0d0d0",
        30,
        mdc=150456,
        features={} if marker else {"mean": mean, "std": 0.6, "min": 96.0, "max": 99.0, "slope": -0.02},
        shape="level",
        unchanged=marker,
    )
    current = StreamWindow(
        "Pump/Motor/Current",
        "A",
        "e1e1e1e1e1e1e1e1",
        30,
        features={"rms": 0.919, "peak": 1.3, "crest": 1.415, "mean": 0.0},
        shape="waveform",
    )
    temp = StreamWindow("MDC_TEMP_BODY", "Cel", "e1e1e1e1e1e1e1e1", 0, missing=1.0, mdc=150364, gap=True)
    return FeaturesWindow("k3j2x7q9m4t8vbaa", "medical", t, 30.0, (spo2, current, temp), run=3, hb=60.0)


def test_a_later_window_leaves_out_what_the_one_before_said() -> None:
    windows = [_window(86430.5 + 10 * i, 97.5 + i / 10) for i in range(6)]
    (message,) = join([(encode(w), 1042 + 2 * i) for i, w in enumerate(windows)], 7, batch_s=60.0)
    recs = cbor2.loads(message)
    assert recs[0] == {0: "seq", 2: 1042, "ep": 7, "bs": 60.0, "ds": [2] * 5}
    heads = [r for r in recs if codec.BT in r]
    assert heads[1] == {codec.N: "win", codec.BT: 86440.5}  # only the name and the time
    later = recs[recs.index(heads[1]) + 1 :][:3]
    assert all(codec.N not in r for r in later)  # the streams are the ones at the same place
    assert "fd" in later[0]  # SpO2's features as steps from the window before
    alone = sum(len(wrap(encode(w), SeqMeta(1, 7))) for w in windows)
    assert len(message) < alone * 0.6


def test_records_of_older_schemas_and_other_types_go_alone() -> None:
    old = [dataclasses.replace(_window(10.0 * i, 97.0), sv=3) for i in range(3)]
    packs = [(encode(w), i + 1) for i, w in enumerate(old)]
    assert join(packs, 5) == [wrap(p, SeqMeta(i, 5)) for p, i in packs]
    joiner = Joiner(5, historical=False, batch_s=None, limit=4096)
    assert not joiner.add(encode(dataclasses.replace(features(), sv=3)), 1)
    assert not joiner.add(b"\x00garbage", 2)
    assert joiner.add(encode(_window(1.0, 97.0)), 3)
    assert not joiner.add(encode(_window(2.0, 97.0)), 3)  # ids only go up


def test_a_message_of_several_records_is_refused_by_single_record_readers_and_older_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (message,) = join([(encode(_window(10.0 * i, 97.0)), i + 1) for i in range(3)], 5)
    with pytest.raises(CorruptRecordError, match="3 records"):
        decode_pack(message)
    with pytest.raises(CorruptRecordError, match="3 records"):
        decode_message("edgetwin/v1/gw/features/k3j2x7q9m4t8vbaa", message)
    assert [m.seq for m in decode_messages("edgetwin/v1/gw/features/k3j2x7q9m4t8vbaa", message)] == [1, 2, 3]
    # A reader of schema 3 refuses the message as newer, instead of reading the second window as
    # scores of the first.
    monkeypatch.setattr(codec, "SCHEMA_MAJOR", 3)
    with pytest.raises(UnsupportedVersionError):
        decode_batch(message)


def test_a_malformed_joined_message_is_refused() -> None:
    (message,) = join([(encode(_window(10.0 * i, 97.0)), i + 1) for i in range(3)], 5)
    recs = cbor2.loads(message)
    recs[0]["ds"] = [1, 1, 1]  # four ids, three records
    with pytest.raises(CorruptRecordError, match="names 4 record"):
        decode_batch(cbor2.dumps(recs))
    recs[0]["ds"] = [1, 0]
    with pytest.raises(CorruptRecordError, match="positive"):
        decode_batch(cbor2.dumps(recs))
    lone = cbor2.loads(encode(_window(1.0, 97.0)))
    del lone[1][codec.N]  # a nameless stream with no window before it
    with pytest.raises(CorruptRecordError, match="no name"):
        decode_batch(cbor2.dumps(lone))


def test_the_twin_allows_for_the_hold_before_calling_a_subject_silent() -> None:
    state = SubjectState("s", hb=60.0, win=30.0, received=0.0)
    assert "SILENT" in silent(state, 100.0)
    state.batch_s = 60.0
    assert silent(state, 100.0) == ""
    assert "SILENT" in silent(state, 151.0)


def batch_vectors() -> list[tuple[str, str, str]]:
    """(name, hex, JSON) of every batch vector in docs/records.md."""
    text = (ROOT / "docs" / "records.md").read_text(encoding="utf-8")
    found = re.findall(
        r"#### Batch vector: (.+?)\n.*?```cbor-hex\n(.+?)```.*?```json\n(.+?)```", text, re.DOTALL
    )
    return [(name, "".join(h.split()), j) for name, h, j in found]


def test_the_reference_holds_a_batch_vector() -> None:
    assert batch_vectors()


@pytest.mark.parametrize(("name", "hexdata", "expected"), batch_vectors())
def test_batch_vectors_decode_to_their_documented_records(name: str, hexdata: str, expected: str) -> None:
    data = bytes.fromhex(hexdata)
    got = decode_batch(data)
    doc = json.loads(expected)
    plain = [
        {"seq": [m.seq, m.epoch, m.historical, m.batch_s], "record": as_map(r)}
        for m, r in got
        if m is not None
    ]
    assert plain == doc, name
    first = got[0][0]
    assert first is not None
    packs = [(encode(r), m.seq) for m, r in got if m is not None]
    assert join(packs, first.epoch, historical=first.historical, batch_s=first.batch_s) == [data], name
