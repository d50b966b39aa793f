"""A value no body produces is left out of the published window, like a flagged one, and counted.

SpO2 read 30 % for 20 s (below the plausible 50 %: a sensor fault) between stretches of 97 %: the
windows the twin decodes hold the 97 % samples only (min and mean 97, their count) and say how many
they left out (flagged, implausible), and a detector that does not vet its inputs still finds the
window implausible.  Here a real pipeline, outbox and anonymizer cut the windows.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
from test_alarm_source_removed import BED7, SPO2, WALL, Site, config, spo2

from gateway.contracts import Lane, WindowRecord
from gateway.outbox import AsyncOutbox, Outbox
from gateway.pipeline.windows import Windower
from gateway.records import SCHEMA_MAJOR, FeaturesWindow, StreamWindow, decode, encode, stream_map
from gateway.records.render import stream_text
from gateway.records.thin import Thinner, carry
from gateway.runtime import Pipeline
from gateway.sample import Quality, Sample, SampleBlock

OFF = int(Quality.SENSOR_OFF)
WINDOWS = {"window_s": 30.0, "hop_s": 10.0, "grace_s": 0.0}


def spo2_windows(tmp: Path, parts: list[tuple[float, int, int]]) -> list[StreamWindow]:
    """Bed 7's SpO2 one sample a second from t = 1 s, as (value, seconds, flags); its windows as the twin reads them."""
    site = Site(tmp)

    async def main() -> list[FeaturesWindow]:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7, pipeline=WINDOWS), site.anon, outbox)
            t = 1.0
            for value, seconds, flags in parts:
                t = await spo2(pipeline, SPO2, value, seconds, t, flags)
            await outbox.flush()
            got = [decode(i.payload) for i in await outbox.lease(1000) if i.lane == Lane.FEATURES]
            return [r for r in got if isinstance(r, FeaturesWindow)]

    out = []
    last: dict[str, StreamWindow] = {}
    for sent in asyncio.run(main()):
        rec = carry(last, sent)
        last = {s.metric: s for s in rec.streams if s.features}
        out.append(next(s for s in rec.streams if s.metric == SPO2.metric.name))
    return out


def test_a_spo2_of_30_for_20_s_leaves_the_published_windows_min_and_mean_at_the_valid_97(
    tmp_path: Path,
) -> None:
    windows = spo2_windows(tmp_path, [(97.0, 10, 0), (30.0, 20, 0), (97.0, 30, 0)])
    assert len(windows) >= 5, windows
    for s in windows:
        if s.n:
            assert (s.features["min"], s.features["mean"]) == (97.0, 97.0), windows
    # Window by window (ends 10, 20 ... 60 s): the valid samples, the 30 % ones left out, missing.
    assert [(s.n, s.implausible, s.flagged) for s in windows] == [
        (9, 0, 0),
        (10, 9, 0),
        (10, 19, 0),
        (10, 20, 0),
        (19, 11, 0),
        (29, 1, 0),
    ], windows
    # [20 s, 50 s) held 30 % until 30 s: 19 samples of 97 %; the 11 left out count as missing.
    assert round(windows[4].missing, 4) == round(11 / 30, 4), windows[4]
    assert stream_text(windows[4]).endswith("(left out: 11 implausible)"), stream_text(windows[4])
    assert stream_map(windows[4])["implausible"] == 11
    assert "flagged" not in stream_map(windows[4])
    assert "implausible" not in stream_map(windows[0])


def test_the_counts_travel_in_every_schema_and_a_change_of_them_is_sent(tmp_path: Path) -> None:
    s = StreamWindow(
        "MDC_PULS_OXIM_SAT_O2", "%", "d0", 10, 0.67, features={"mean": 97.0}, flagged=2, implausible=18
    )
    for sv in (2, 3, SCHEMA_MAJOR):
        back = decode(encode(FeaturesWindow("p", "medical", 30.0, 30.0, (s,), sv=sv)))
        assert isinstance(back, FeaturesWindow)
        assert (back.streams[0].flagged, back.streams[0].implausible) == (2, 18), (sv, back)
    thinner = Thinner(10.0)
    steady = replace(s, flagged=0, implausible=0)
    assert thinner.thin(FeaturesWindow("p", "medical", 30.0, 30.0, (steady,))) is not None
    assert thinner.thin(FeaturesWindow("p", "medical", 40.0, 30.0, (steady,))) is None  # unchanged
    sent = thinner.thin(FeaturesWindow("p", "medical", 50.0, 30.0, (s,)))
    assert sent is not None
    assert (sent.streams[0].unchanged, sent.streams[0].implausible) == (True, 18), sent


def cut(tmp: Path, samples: list[tuple[float, int]]) -> tuple[Pipeline, list[WindowRecord]]:
    """Samples of bed 7's SpO2 one a second from t = 1 s, one by one into a pipeline; the windows then due."""

    async def main() -> tuple[Pipeline, list[WindowRecord]]:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7, pipeline=WINDOWS), Site(tmp).anon, outbox)
            for k, (value, flags) in enumerate(samples):
                t = 1.0 + k
                pipeline.sink.put(Sample(SPO2, t, t + WALL, value, Quality(flags)))
            end = 1.0 + len(samples)
            return pipeline, pipeline.windower.close_due(end, end + WALL)

    return asyncio.run(main())


def test_the_window_counts_what_it_left_out_and_a_detector_still_finds_it_implausible(tmp_path: Path) -> None:
    # 1..5 s 97 %, 6..9 s probe off, 10..29 s 30 %: window [0, 30 s) keeps five samples.
    pipeline, records = cut(tmp_path, [(97.0, 0)] * 5 + [(97.0, OFF)] * 4 + [(30.0, 0)] * 20)
    window = next(r for r in records if r.end_mono == 30.0)
    (sf,) = window.streams
    assert (sf.count, sf.flagged, sf.implausible) == (5, 4, 20), sf
    assert sf.features["min"] == sf.features["max"] == 97.0, sf.features
    assert sf.implausible_span == (30.0, 30.0), sf
    bad = pipeline._plausibility.check_window(window)
    assert [(v.rule, v.value) for v in bad] == [("range", 30.0)], bad


def test_a_window_of_implausible_values_only_is_a_gap_a_detector_still_finds_implausible(
    tmp_path: Path,
) -> None:
    pipeline, records = cut(tmp_path, [(30.0, 0)] * 29)
    window = next(r for r in records if r.end_mono == 30.0)
    (sf,) = window.streams
    assert (sf.count, sf.flagged, sf.implausible, sf.gap) == (0, 0, 29, True), sf
    assert pipeline._plausibility.check_window(window), sf


def test_each_model_length_counts_what_its_own_tail_left_out() -> None:
    """Window 30 s with a 10 s tail: 30 % at 11..15 s is in the long window only, probe off at 25..27 s in both."""
    w = Windower(
        window_s=30.0,
        hop_s=10.0,
        grace_s=0.0,
        lost_after_s=60.0,
        on_alarm=lambda a: None,
        lengths={"medical": [10.0]},
    )
    values = np.full(29, 97.0)
    values[10:15] = 30.0  # t = 11..15 s
    quality = np.zeros(29, np.uint8)
    quality[24:27] = int(Quality.ARTIFACT)  # t = 25..27 s
    t = np.arange(1.0, 30.0)
    w.put_block(SampleBlock(SPO2, t, t + WALL, values, quality), values < 50.0)
    window = next(r for r in w.close_due(30.0, 30.0 + WALL) if r.end_mono == 30.0)
    (whole,) = window.streams
    (tail,) = window.over(10.0).streams
    assert (whole.count, whole.flagged, whole.implausible, whole.implausible_span) == (21, 3, 5, (30.0, 30.0))
    assert (tail.count, tail.flagged, tail.implausible, tail.implausible_span) == (7, 3, 0, None)
    assert whole.features["min"] == tail.features["min"] == 97.0
