"""The twin's sequence checks, decoder and state view (pure: no broker)."""

from __future__ import annotations

import json

import pytest

from gateway.records import (
    AlarmRecord,
    FeaturesWindow,
    RecordError,
    SeqMeta,
    StreamWindow,
    encode,
    wrap,
)
from gateway.records.topics import azure_topic
from gateway.twin.decoder import decode_message, split_topic
from gateway.twin.sequence import IntervalSet, SequenceChecker
from gateway.twin.view import TwinView, describe

GW = "gwk3j2x7q9m4t8vb"
SUBJ = "s0s0s0s0s0s0s0s0"


def test_interval_set_merges_and_reports_holes() -> None:
    s = IntervalSet()
    for x in (5, 1, 3, 2, 9, 7):
        assert s.add(x)
    assert not s.add(3)
    assert s.holes() == [(4, 4), (6, 6), (8, 8)]
    assert (s.first, s.last, len(s)) == (1, 9, 6)
    s.add(4)
    s.add(6)
    s.add(8)
    assert s.holes() == []
    assert 8 in s
    assert 10 not in s


def test_gaps_fill_with_a_replay_and_duplicates_are_counted() -> None:
    c = SequenceChecker()
    events = [c.observe(GW, 7, seq, "features", False) for seq in (1, 2, 3)]
    assert events == [None, None, None]
    gap = c.observe(GW, 7, 10, "features", False)  # live data after an outage
    assert gap is not None
    assert gap.kind == "gap"
    assert gap.detail == "4-9 not received yet"
    assert c.gateways[GW].gaps == [(4, 9)]
    for seq in range(4, 10):  # the backlog, replayed behind
        assert c.observe(GW, 7, seq, "features", True) is None
    dup = c.observe(GW, 7, 9, "features", True)
    assert dup is not None
    assert dup.kind == "duplicate"
    state = c.gateways[GW]
    assert (state.gaps, state.missing, state.duplicates, state.reordered, state.historical) == (
        [],
        0,
        1,
        0,
        7,
    )


def test_reordering_is_judged_per_lane_and_class() -> None:
    c = SequenceChecker()
    c.observe(GW, 1, 5, "alarms", False)
    assert c.observe(GW, 1, 3, "features", False) is None  # another lane: fine
    ev = c.observe(GW, 1, 2, "features", False)
    assert ev is not None
    assert ev.kind == "reordered"
    assert c.gateways[GW].reordered == 1


def test_a_new_epoch_restarts_the_sequence_not_a_gap() -> None:
    c = SequenceChecker()
    for seq in range(100, 110):
        c.observe(GW, 1, seq, "features", False)
    ev = c.observe(GW, 2, 1, "features", False)
    assert ev is not None
    assert ev.kind == "new_epoch"
    state = c.gateways[GW]
    assert (state.epoch, state.epochs_before, state.gaps, state.received) == (2, 1, [], 1)
    assert "1 earlier epoch(s)" in c.report()[0]


def test_restarts_replays_and_reorderings_are_told_apart() -> None:
    c = SequenceChecker()
    for seq in range(1, 6):
        assert c.observe(GW, 7, seq, "features", False, run=3) is None
    # The gateway restarts: the same epoch, ids go on, a new run.
    ev = c.observe(GW, 7, 8, "features", False, run=4)
    assert ev is not None
    assert (ev.kind, ev.detail) == ("restart", "run 3 -> 4")
    # What the old run had queued replays behind the new run's live records: no restart, no loss.
    assert c.observe(GW, 7, 6, "features", True, run=3) is None
    assert c.observe(GW, 7, 7, "features", True, run=3) is None
    ev = c.observe(GW, 7, 10, "features", False, run=4)
    assert ev is not None
    assert ev.kind == "gap"
    ev = c.observe(GW, 7, 9, "features", False, run=4)
    assert ev is not None
    assert ev.kind == "reordered"
    state = c.gateways[GW]
    assert (state.restarts, state.historical, state.reordered, state.missing) == (1, 2, 1, 0)
    line = c.report()[0]
    assert "0 missing" in line
    assert "2 replayed" in line
    assert "1 reordered" in line
    assert "1 restart(s) (run 4)" in line


def test_report_names_the_gaps() -> None:
    c = SequenceChecker()
    for seq in (1, 2, 5, 9):
        c.observe(GW, 3, seq, "features", False)
    (line,) = c.report()
    assert "5 missing in 2 gap(s): 3-4, 6-8" in line


def _features(t: float, mean: float, run: int = 0) -> bytes:
    stream = StreamWindow("Pump1/Current", "A", "d" * 16, 5, features={"mean": mean})
    return encode(FeaturesWindow(SUBJ, "industrial", t, 10.0, (stream,), run=run))


def test_decoder_reads_topic_pack_and_sequence() -> None:
    msg = decode_message(
        f"edgetwin/v1/{GW}/features/{SUBJ}", wrap(_features(10.0, 1.5), SeqMeta(42, 9, True))
    )
    assert msg is not None
    assert (msg.gateway, msg.kind, msg.lane, msg.seq, msg.epoch, msg.historical) == (
        GW,
        "features",
        "features",
        42,
        9,
        True,
    )
    assert isinstance(msg.record, FeaturesWindow)
    assert msg.record.streams[0].features == {"mean": 1.5}
    assert decode_message("other/topic", b"") is None
    with pytest.raises(RecordError):
        decode_message(f"edgetwin/v1/{GW}/features/{SUBJ}", b"\x00garbage")


def test_decoder_takes_the_sequence_from_properties_when_the_pack_has_none() -> None:
    msg = decode_message(
        f"edgetwin/v1/{GW}/features/{SUBJ}", _features(1.0, 1.0), {"seq": "5", "ep": "3", "hist": "1"}
    )
    assert msg is not None
    assert (msg.seq, msg.epoch, msg.historical) == (5, 3, True)


def test_decoder_reads_azure_static_topics() -> None:
    topic = azure_topic(GW, {"topic": f"alarms/{SUBJ}", "seq": "8"})
    assert split_topic(topic) == (GW, f"alarms/{SUBJ}", {"seq": "8"})
    alarm = encode(AlarmRecord("sensor_lost", SUBJ, 3.0))
    msg = decode_message(topic, alarm)
    assert msg is not None
    assert (msg.kind, msg.seq) == ("alarms", 8)


def test_view_keeps_the_newest_window_even_when_older_ones_replay_later() -> None:
    view = TwinView()
    for t, mean, hist in ((20.0, 2.0, False), (10.0, 1.0, True)):
        msg = decode_message(
            f"edgetwin/v1/{GW}/features/{SUBJ}", wrap(_features(t, mean), SeqMeta(int(t), 1, hist))
        )
        assert msg is not None
        view.update(msg)
    status = decode_message(
        f"edgetwin/v1/{GW}/status", json.dumps({"state": "online", "dropped": {"features": 3}}).encode()
    )
    assert status is not None
    view.update(status)
    subject = view.gateways[GW].subjects[SUBJ]
    assert (subject.t, subject.windows, subject.streams["Pump1/Current"].features["mean"]) == (20.0, 2, 2.0)
    text = view.render()
    assert f"gateway {GW}: online, dropped at the gateway: features 3" in text
    assert "Current mean 2 A" in text  # the feature is named, integers print as integers
    assert view.snapshot()[GW]["subjects"][SUBJ]["windows"] == 2
    line = describe(status)
    assert "STATUS online" in line
    assert line.endswith("STATUS online, dropped at the gateway: features 3")
