"""Rhythm patterns from RR intervals: named episodes, their burden, their end; no alarm on sinus arrhythmia."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from data_support import DATA

from drivers import REGISTRY
from drivers.sim import rhythms
from drivers.sim.protocol import RR, Label, make_generator
from gateway import inference
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Alarm, AlarmKind, Lane
from gateway.inference import rhythm
from gateway.inference.rhythm import RhythmMonitor
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import as_map, decode
from gateway.runtime import Pipeline
from gateway.sample import MDC, Quality, Sample, SampleBlock, Stream
from models.recipes.rr_ectopic import scores
from models.recipes.rr_rhythm import classify, mitdb_100

RRS = Stream("strap", "bed1", "strap-1", MDC[RR])
T0, WALL0 = 1000.0, 1.7e9
CARD = Path(inference.__file__).resolve().parents[2] / "models" / "rr_rhythm.card.json"


def monitor(rr: npt.NDArray[np.float64], quality: list[Quality] | None = None) -> list[tuple[Alarm, int]]:
    mon = RhythmMonitor()
    t = np.cumsum(rr) / 1000.0
    out = []
    for i, (ti, x) in enumerate(zip(t, rr, strict=True)):
        q = quality[i] if quality else Quality.GOOD
        a = mon.update(Sample(RRS, float(ti), float(ti), float(x), q))
        if a is not None:
            out.append((a, i))
    return out


def episode(pattern: str, *, seed: int = 1, coupling: float = 0.9, origin: str = "V") -> rhythms.Rhythm:
    base = rhythms.sinus(500, seed, hr_bpm=68.0, rsa=0.03, scatter_ms=15.0)
    return rhythms.with_pattern(base, pattern, 200, 320, coupling=coupling, origin=origin)


@pytest.mark.parametrize(("pattern", "origin"), [("bigeminy", "V"), ("bigeminy", "S"), ("trigeminy", "V")])
def test_a_mildly_premature_pattern_is_one_named_episode_with_its_burden_then_cleared(
    pattern: str, origin: str
) -> None:
    r = episode(pattern, coupling=0.92, origin=origin)  # beats only 8 % premature
    got = monitor(r.rr)
    assert [(a.kind, a.detail["pattern"]) for a, _ in got] == [
        (AlarmKind.ANOMALY, pattern),
        (AlarmKind.ANOMALY_CLEARED, pattern),
    ]
    (raised, at), (cleared, end) = got
    k = 2 if pattern == "bigeminy" else 3
    assert at - 200 <= k * (rhythm.CYCLES + 2)  # within a few cycles of the start
    assert raised.detail["model"] == "rr_rhythm"
    assert float(raised.detail["burden"]) > 0.15
    if origin == "V":
        assert float(raised.detail["coupling"]) == pytest.approx(0.92, abs=0.03)
    assert 320 < end <= 320 + (rhythm.CLEAR_CYCLES + 2) * k  # cleared once the pattern is over
    assert float(cleared.detail["burden"]) < float(raised.detail["burden"]) + 0.5
    # held_s counts from the first premature beat: to the alarm, then the whole episode.
    t = np.cumsum(r.rr) / 1000.0
    first = int(np.flatnonzero(r.premature)[0])
    assert raised.held_s == pytest.approx(t[at] - t[first], abs=0.01)
    assert cleared.held_s == pytest.approx(t[end] - t[first], abs=0.01)


@pytest.mark.parametrize("pattern", ["couplet", "run", "pause"])
def test_single_events_are_named(pattern: str) -> None:
    base = rhythms.sinus(300, 4, hr_bpm=62.0, rsa=0.03, scatter_ms=15.0)
    r = rhythms.with_pattern(base, pattern, 150, 160, coupling=0.7)
    got = monitor(r.rr)
    assert [(a.kind, a.detail["pattern"]) for a, _ in got] == [
        (AlarmKind.ANOMALY, pattern),
        (AlarmKind.ANOMALY_CLEARED, pattern),
    ]
    assert 150 <= got[0][1] <= 155


def test_premature_beats_in_bigeminy_and_trigeminy_are_found_at_couplings_075_to_095() -> None:
    pred, truth = [], []
    for pattern in ("bigeminy", "trigeminy"):
        for c in (0.75, 0.85, 0.9, 0.95):
            for seed in range(2):
                r = episode(pattern, seed=10 + seed, coupling=c, origin="VS"[seed])
                pred.append(classify(r.rr))
                truth.append(r.premature)
    s = scores(np.concatenate(pred), np.concatenate(truth))
    assert s["f1"] >= 0.9, s
    assert s["precision"] >= 0.98, s


def test_sinus_arrhythmia_and_a_gradual_rate_change_raise_nothing() -> None:
    hours = 0.0
    for seed, (rsa, resp_hz) in enumerate([(0.08, 0.1), (0.05, 0.2), (0.03, 0.3)]):
        b = rhythms.sinus(4000, 50 + seed, hr_bpm=58.0, rsa=rsa, resp_hz=resp_hz, hr_end_bpm=85.0)
        assert not classify(b.rr).any()
        assert monitor(b.rr) == []
        hours += float(b.rr.sum()) / 3.6e6
    assert hours > 2.5


def test_atrial_fibrillation_is_not_called_bigeminy_or_trigeminy() -> None:
    for seed in (7, 302):  # 302 has a chance short-short-short-long at its start
        a = rhythms.atrial_fibrillation(3000, seed)
        assert monitor(a.rr) == []


def test_flagged_beats_never_reach_the_detector_and_make_the_episode_indeterminate() -> None:
    r = episode("bigeminy", coupling=0.8)
    flags = [Quality.GOOD] * len(r.rr)
    for i in range(260, 270):  # the strap slips during the episode
        flags[i] = Quality.SENSOR_OFF
    kinds = [(a.kind, a.detail.get("episode", a.detail.get("reason"))) for a, _ in monitor(r.rr, flags)]
    assert kinds == [
        (AlarmKind.ANOMALY, None),
        (AlarmKind.ANOMALY_INDETERMINATE, "sensor_quality"),
        (AlarmKind.ANOMALY, "resumed"),
        (AlarmKind.ANOMALY_CLEARED, None),
    ]
    # A loose strap alternating garbage, all flagged: nothing at all.
    noise = np.array([800.0] * 40 + [450.0, 1150.0] * 20 + [800.0] * 40)
    assert monitor(noise, [Quality.GOOD] * 40 + [Quality.SENSOR_OFF] * 40 + [Quality.GOOD] * 40) == []
    assert monitor(noise)  # the same intervals unflagged do alarm


def test_bigeminy_turning_into_trigeminy_re_raises_the_episode_with_the_new_name() -> None:
    base = rhythms.sinus(600, 3, hr_bpm=66.0, rsa=0.02, scatter_ms=12.0)
    r = rhythms.with_pattern(base, "bigeminy", 100, 200, coupling=0.8)
    r = rhythms.with_pattern(r, "trigeminy", 200, 320, coupling=0.8)
    got = [(a.kind, a.detail["pattern"], a.detail.get("episode")) for a, _ in monitor(r.rr)]
    assert got == [
        (AlarmKind.ANOMALY, "bigeminy", None),
        (AlarmKind.ANOMALY, "trigeminy", "changed"),
        (AlarmKind.ANOMALY_CLEARED, "trigeminy", None),
    ]


@pytest.mark.skipif(
    not (DATA / "physio" / "mitdb_100" / "100.atr").exists(),
    reason=f"MIT-BIH record 100 not found under {DATA} (set EDGETWIN_DATA to the shared data folder)",
)
def test_mit_bih_100_premature_beats_found_without_false_beats_or_alarms() -> None:
    s = mitdb_100(DATA)
    recorded = json.loads(CARD.read_text())["evaluation"]["mitdb_100"]
    assert (s["tp"], s["fp"], s["fn"]) == (
        recorded["tp"],
        recorded["fp"],
        recorded["fn"],
    )  # the card is current
    assert s["precision"] == 1.0
    assert s["recall"] >= 0.95
    assert s["false_beats_per_hour"] <= 1.0
    assert s["alarms"] == {}


def test_the_shipped_card_states_protocol_limits_and_its_parameters_are_the_running_ones() -> None:
    card = json.loads(CARD.read_text())
    assert card["runtime"] == "gateway.inference.rhythm.RhythmMonitor"
    assert card["protocol"]
    assert card["limits"]
    assert card["compute"]
    p = card["parameters"]
    assert p["cycles"] == rhythm.CYCLES
    assert p["min_prematurity"] == rhythm.MIN_PREMATURITY
    assert p["coupling_sd"] == rhythm.COUPLING_SD
    ev = card["evaluation"]
    assert ev["sinus_arrhythmia"]["false_beats_per_hour"] <= 1.0
    assert ev["sinus_arrhythmia"]["alarms"] == {}
    assert ev["synthetic"]["bigeminy_pooled"]["f1"] >= 0.9
    assert ev["synthetic"]["trigeminy_pooled"]["f1"] >= 0.9


def through_pipeline(
    tmp_path: Path, steps: list[list[SampleBlock]], hop_s: float = 10.0
) -> list[dict[str, Any]]:
    """The alarm records the composed pipeline sends for blocks fed hop by hop on a simulated clock."""
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 20.0, "hop_s": hop_s, "grace_s": 0.0},
        },
        "<rhythm>",
        REGISTRY,
    )

    async def main() -> list[dict[str, Any]]:
        anon = Anonymizer(Pseudonymizer(b"r" * 32), time_mode="relative", start_wall=WALL0)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, [])
            for n, blocks in enumerate(steps, start=1):
                for block in blocks:
                    pipeline.sink.put_block(block)
                await pipeline.step(now_mono=T0 + n * hop_s, now_wall=WALL0 + n * hop_s)
            await outbox.flush()
            out = []
            while batch := await outbox.lease(1000):
                out += [as_map(decode(i.payload)) for i in batch if i.lane == Lane.ALARMS]
                await outbox.ack([i.id for i in batch])
            return out

    return asyncio.run(main())


def rhythm_alarms(alarms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in alarms if "rr_rhythm" in json.dumps(a, default=str)]


def test_an_rr_stream_through_the_pipeline_raises_one_named_alarm_and_its_cleared_event(
    tmp_path: Path,
) -> None:
    r = episode("bigeminy", coupling=0.9)
    t = np.cumsum(r.rr) / 1000.0
    steps = []
    for n in range(int(t[-1] // 10.0) + 1):
        sel = (t >= n * 10.0) & (t < (n + 1) * 10.0)
        q = np.zeros(int(sel.sum()), np.uint8)
        steps.append([SampleBlock(RRS, T0 + t[sel], WALL0 + t[sel], r.rr[sel], q)] if sel.any() else [])
    alarms = rhythm_alarms(through_pipeline(tmp_path, steps))
    assert [a["alarm"] for a in alarms] == ["anomaly", "anomaly_cleared"], alarms
    assert all("bigeminy" in json.dumps(a, default=str) for a in alarms)


def test_the_sim_source_bigeminy_event_raises_one_bigeminy_alarm_and_its_cleared_event(
    tmp_path: Path,
) -> None:
    gen = make_generator("patient", seed=5, rate_hz=1.0, events=[Label("bigeminy", 300.0, 600.0)])
    streams = {
        sig.metric.name: Stream("sim-src", "bed-9", "DEV-bed-9", sig.metric, "medical", sig.rate_hz)
        for sig in gen.signals
    }
    steps = []
    for n in range(90):  # 900 s
        chunk = gen.generate(n * 10.0, (n + 1) * 10.0)
        steps.append(
            [
                SampleBlock(streams[name], T0 + s.t, WALL0 + s.t, s.value, s.quality)
                for name, s in chunk.series.items()
                if len(s)
            ]
        )
    alarms = through_pipeline(tmp_path, steps)
    ours = rhythm_alarms(alarms)
    assert [a["alarm"] for a in ours] == ["anomaly", "anomaly_cleared"], alarms
    assert all("bigeminy" in json.dumps(a, default=str) for a in ours)
    assert len(alarms) == 2, alarms  # and nothing else: the rest of the patient is healthy
