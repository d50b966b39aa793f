"""Schema 3 on the wire: unchanged streams as markers, unchanged windows skipped, a heartbeat, and a
twin that shows every stream's values through them (pure: the gateway's thinner into the twin's view)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane, StreamFeatures, WindowRecord
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import FeaturesWindow, SeqMeta, StreamWindow, as_map, decode, encode, wrap
from gateway.records.codec import on_wire
from gateway.records.thin import HEARTBEAT_WINDOWS, Thinner, carry
from gateway.runtime import Pipeline
from gateway.sample import MDC, Stream
from gateway.twin.decoder import decode_message
from gateway.twin.sequence import SequenceChecker
from gateway.twin.view import TwinView

SUBJECT = "k3j2x7q9m4t8vbaa"
HOP = 10.0


def window(t: float, spo2: float, temp: float, gap: bool = False) -> FeaturesWindow:
    return FeaturesWindow(
        SUBJECT,
        "medical",
        t,
        30.0,
        (
            StreamWindow(
                "MDC_PULS_OXIM_SAT_O2",
                "%",
                "d" * 16,
                30,
                mdc=150456,
                shape="level",
                features={"mean": spo2, "min": spo2 - 1, "max": spo2 + 1},
            ),
            StreamWindow(
                "MDC_TEMP_BODY",
                "Cel",
                "e" * 16,
                0 if gap else 30,
                mdc=150364,
                shape="level",
                gap=gap,
                missing=1.0 if gap else 0.0,
                features={} if gap else {"mean": temp},
            ),
        ),
        run=1,
    )


def test_unchanged_windows_are_skipped_and_a_heartbeat_comes_every_n_windows() -> None:
    thinner = Thinner(HOP)
    # 97.01 and 97.04 are the same at SpO2's resolution (0.1 %); a heartbeat every N windows.
    sent = [thinner.thin(window(HOP * k, 97.01 + (k % 2) * 0.03, 37.0)) for k in range(3 * HEARTBEAT_WINDOWS)]
    times = [w.t for w in sent if w is not None]
    assert times == [HOP * k for k in range(0, 3 * HEARTBEAT_WINDOWS, HEARTBEAT_WINDOWS)]
    assert all(w is None or w.hb == HOP * HEARTBEAT_WINDOWS for w in sent)
    assert thinner.skipped == 3 * (HEARTBEAT_WINDOWS - 1)
    # Heartbeats carry every feature.
    assert all(not s.unchanged and s.features for w in sent if w is not None for s in w.streams)


def test_a_changed_stream_goes_whole_and_the_others_as_markers() -> None:
    thinner = Thinner(HOP)
    first = thinner.thin(window(0.0, 97.0, 37.0))
    assert first is not None
    second = thinner.thin(window(HOP, 92.0, 37.001))  # SpO2 falls; temperature within 0.01 Cel
    assert second is not None
    spo2, temp = second.streams
    assert (spo2.unchanged, spo2.features["mean"]) == (False, 92.0)
    assert (temp.unchanged, temp.features, temp.n) == (True, {}, 30)
    # The marker is a few bytes.
    assert len(encode(second)) < len(encode(first))


def test_a_gap_and_a_return_are_never_hidden() -> None:
    thinner = Thinner(HOP)
    assert thinner.thin(window(0.0, 97.0, 37.0)) is not None
    gap = thinner.thin(window(HOP, 97.0, 37.0, gap=True))
    assert gap is not None
    assert gap.streams[1].gap
    assert thinner.thin(window(2 * HOP, 97.0, 37.0, gap=True)) is None  # still a gap: unchanged
    back = thinner.thin(window(3 * HOP, 97.0, 37.0))
    assert back is not None
    assert back.streams[1].features == {"mean": 37.0}


def test_the_twin_shows_unchanged_streams_with_their_values_and_counts_no_loss() -> None:
    """Through the codec and the twin: every window's values are shown, to the stated resolution."""
    thinner = Thinner(HOP)
    view, checker = TwinView(), SequenceChecker()
    seq = 0
    levels = [97.0] * 8 + [91.0] * 3 + [97.0] * 9
    for k, level in enumerate(levels):
        w = window(HOP * k, level, 37.0 + 0.001 * k)
        out = thinner.thin(w)
        if out is not None:
            seq += 1
            msg = decode_message(f"edgetwin/v1/gw/features/{SUBJECT}", wrap(encode(out), SeqMeta(seq, 5)))
            assert msg is not None
            view.update(msg)
            assert msg.seq is not None
            assert msg.epoch is not None
            assert msg.lane is not None
            assert checker.observe("gw", msg.epoch, msg.seq, msg.lane, msg.historical, out.run) is None
        shown = view.gateways["gw"].subjects[SUBJECT].streams
        want = on_wire(w)
        for s in want.streams:
            assert shown[s.metric].features == pytest.approx(s.features, abs=0.011), (k, s.metric)
            assert not shown[s.metric].gap
    assert seq < len(levels) / 2
    assert checker.gateways["gw"].missing == 0
    assert "unchanged" not in view.render()  # values, not markers, on the screen


def test_a_marker_without_an_earlier_record_waits_for_the_heartbeat() -> None:
    marker = dataclasses.replace(
        window(0.0, 97.0, 37.0),
        streams=(
            StreamWindow("MDC_TEMP_BODY", "Cel", "e" * 16, 30, mdc=150364, shape="level", unchanged=True),
        ),
    )
    got = decode(encode(marker))
    assert isinstance(got, FeaturesWindow)
    filled = carry({}, got)
    assert filled.streams[0].unchanged
    assert filled.streams[0].features == {}


def test_a_steady_subject_is_current_and_a_silent_one_is_marked() -> None:
    thinner = Thinner(HOP)
    view = TwinView()
    first = thinner.thin(window(0.0, 97.0, 37.0))
    assert first is not None
    msg = decode_message(f"edgetwin/v1/gw/features/{SUBJECT}", wrap(encode(first), SeqMeta(1, 5)))
    assert msg is not None
    view.update(msg, received=1000.0)
    hb = HOP * HEARTBEAT_WINDOWS
    # Windows skipped as unchanged for up to a heartbeat: current, with its values.
    assert "SILENT" not in view.render(now=1000.0 + hb)
    assert "SpO2 mean 97 %" in view.render(now=1000.0 + hb)
    # Nothing for longer than the heartbeat and one window: lost or stopped, and shown so.
    assert f"SILENT {hb + 31:g} s (heartbeat {hb:g} s)" in view.render(now=1000.0 + hb + 31)


levels = st.sampled_from([97.0, 97.01, 97.04, 96.0, 92.5])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(levels, st.sampled_from([37.0, 37.004, 37.5]), st.booleans()), min_size=1, max_size=30)
)
def test_whatever_is_skipped_or_marked_the_twin_holds_every_windows_values(
    steps: list[tuple[float, float, bool]],
) -> None:
    thinner = Thinner(HOP)
    view = TwinView()
    for k, (spo2, temp, gap) in enumerate(steps):
        w = window(HOP * k, spo2, temp, gap)
        out = thinner.thin(w)
        if out is not None:
            msg = decode_message(f"edgetwin/v1/gw/features/{SUBJECT}", wrap(encode(out), SeqMeta(k + 1, 5)))
            assert msg is not None
            view.update(msg)
        shown = view.gateways["gw"].subjects[SUBJECT].streams
        for s in on_wire(w).streams:
            assert shown[s.metric].gap == s.gap, k
            assert shown[s.metric].features == s.features, k


def test_a_window_refused_after_thinning_is_not_referred_to_by_the_next(tmp_path: Path) -> None:
    """A window the outbox refused (queue full): the next one goes whole, not as markers."""
    spo2 = Stream("bed-src", "bed-1", "DEV-1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)

    pulse = Stream("bed-src", "bed-1", "DEV-1", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=1.0)

    def record(k: int) -> WindowRecord:
        steady = StreamFeatures(spo2, 10, 0.0, {"mean": 97.0, "min": 96.0, "max": 98.0})
        moving = StreamFeatures(pulse, 10, 0.0, {"mean": 60.0 + k, "min": 59.0 + k, "max": 61.0 + k})
        return WindowRecord("bed-1", "medical", k, 10.0 * k, 1.7e9 + 10.0 * k, 10.0, (steady, moving))

    def spo2_of(window: dict[str, Any]) -> dict[str, Any]:
        return next(s for s in window["streams"] if s["metric"] == "MDC_PULS_OXIM_SAT_O2")

    async def run(state: Path, max_pending: int) -> tuple[list[tuple[int, dict[str, Any]]], int]:
        """Windows 1 and 2 queued without a commit between them, then window 3."""
        config = validate(
            {"gateway": {"state_dir": str(state)}, "pipeline": {"window_s": 10.0, "hop_s": 10.0}},
            "<thin>",
            REGISTRY,
        )
        anon = Anonymizer(Pseudonymizer(b"t" * 32), time_mode="relative", start_wall=1.7e9)
        async with AsyncOutbox(
            lambda: Outbox(state / "ob.db"), flush_interval_s=3600.0, max_pending_bytes=max_pending
        ) as outbox:
            pipeline = Pipeline(config, anon, outbox, [])
            pipeline.window(record(1))
            pipeline.window(record(2))  # unchanged: goes as a marker
            await outbox.flush()
            pipeline.window(record(3))
            await outbox.flush()
            out = []
            while batch := await outbox.lease(100):
                out += [
                    (len(i.payload) + len(i.topic.encode()), as_map(decode(i.payload)))
                    for i in batch
                    if i.lane == Lane.FEATURES
                ]
                await outbox.ack([i.id for i in batch])
            return out, sum(outbox.drop_counts().get("features", {}).values())

    # With room: the whole first window, then markers.
    (tmp_path / "a").mkdir()
    roomy, dropped = asyncio.run(run(tmp_path / "a", 1 << 20))
    assert dropped == 0
    assert len(roomy) == 3
    assert spo2_of(roomy[1][1]).get("unchanged") is True
    whole = roomy[0][0]
    # Room for exactly one whole window: the marker window after it is refused (counted).
    (tmp_path / "b").mkdir()
    tight, dropped = asyncio.run(run(tmp_path / "b", whole))
    assert dropped == 1
    assert len(tight) == 2
    third = spo2_of(tight[-1][1])
    assert not third.get("unchanged"), tight[-1]
    assert third["features"], tight[-1]
