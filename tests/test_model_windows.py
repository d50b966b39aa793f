"""Per-model windows: each model is scored on features of its own length, ending at the record's end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane, ModelResult, WindowRecord
from gateway.errors import ConfigError
from gateway.inference.build import ModelsSection, ModelUse, build_models, model_lengths
from gateway.inference.novelty import NoveltyModel, NoveltyUse
from gateway.outbox import AsyncOutbox, Outbox
from gateway.pipeline.windows import Windower
from gateway.records import as_map, decode
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock, Stream, industrial_metric

WALL = 1.7e9
PRESSURE = Stream(
    "plc", "pump-1", "PLC-1", industrial_metric("Pressure", "bar"), kind="industrial", rate_hz=10.0
)
LEVEL = Stream(
    "plc", "pump-1", "PLC-1", industrial_metric("Tank/Level", "m"), kind="industrial", rate_hz=10.0
)
FLOW = Stream(
    "plc", "pump-1", "PLC-1", industrial_metric("RateRMS", "l/min"), kind="industrial", rate_hz=10.0
)


def block(s: Stream, start: float, stop: float, rate: float = 10.0) -> SampleBlock:
    """Samples of ``s`` on [start, stop) whose value is their time (so a mean names its span)."""
    t = start + np.arange(round((stop - start) * rate)) / rate
    return SampleBlock(s, t, t + WALL, t.copy(), np.zeros(t.size, np.uint8))


CURRENT = Stream("plc", "pump-1", "PLC-1", industrial_metric("Current", "A"), kind="industrial", rate_hz=10.0)


def replay(w: Windower, spans: dict[Stream, list[tuple[float, float]]], until: float) -> list[WindowRecord]:
    """Feed each stream's spans a second at a time, closing windows as a running gateway does."""
    out: list[WindowRecord] = []
    for second in range(int(until)):
        for s, parts in spans.items():
            for a, b in parts:
                lo, hi = max(a, second), min(b, second + 1.0)
                if hi > lo:
                    w.put_block(block(s, lo, hi))
        out += w.close_due(second + 1.0, WALL + second + 1.0)
    return out


def windower(lengths: dict[str, list[float]]) -> Windower:
    return Windower(
        window_s=4.0, hop_s=1.0, grace_s=0.0, lost_after_s=60.0, on_alarm=lambda a: None, lengths=lengths
    )


def test_each_length_is_its_own_tail_of_one_window_end() -> None:
    w = windower({"industrial": [2.0, 8.0, 4.0]})
    records = replay(w, {PRESSURE: [(0.0, 30.0)]}, 30.0)
    assert len(records) > 20
    for rec in records[-15:]:  # long after the start: every length is full
        end = rec.end_mono
        assert set(rec.tails) == {2.0, 8.0}  # the pipeline's own length is not cut twice
        for length, streams in [(4.0, rec.streams), (2.0, rec.tails[2.0]), (8.0, rec.tails[8.0])]:
            (sf,) = streams
            assert sf.count == round(10 * length), (end, length)
            assert sf.missing == 0.0
            # Values are sample times: the mean is the middle of [end - length, end) on the 0.1 s grid.
            assert sf.features["mean"] == pytest.approx(end - length / 2 - 0.05)
        assert rec.over(2.0).length_s == 2.0
        assert rec.over(2.0).streams is rec.tails[2.0]
        assert rec.over(None) is rec
        assert rec.over(4.0) is rec


def test_a_gap_is_judged_per_length() -> None:
    w = windower({"industrial": [2.0, 8.0]})
    # Flow goes silent for 5 s, then comes back 2 s before the window of interest ends.
    records = replay(w, {FLOW: [(0.0, 13.0), (18.0, 30.0)], PRESSURE: [(0.0, 30.0)]}, 30.0)
    (rec,) = [r for r in records if r.end_mono == 20.0]
    flow = {
        length: next(sf for sf in rec.over(length).streams if sf.stream == FLOW) for length in (2.0, 4.0, 8.0)
    }
    assert flow[2.0].count == 20
    assert flow[2.0].missing == 0.0
    assert flow[4.0].count == 20
    assert flow[4.0].missing == pytest.approx(0.5)
    assert flow[8.0].count == 30
    assert flow[8.0].missing == pytest.approx(5 / 8)
    # And a gap only the short tail sees: the long windows still hold data.
    w2 = windower({"industrial": [2.0]})
    records = replay(w2, {FLOW: [(0.0, 17.5)], PRESSURE: [(0.0, 30.0)]}, 30.0)
    (late,) = [r for r in records if r.end_mono == 20.0]
    assert next(sf for sf in late.over(2.0).streams if sf.stream == FLOW).gap
    assert not next(sf for sf in late.streams if sf.stream == FLOW).gap


def test_rings_hold_the_longest_length() -> None:
    short = windower({})
    long = windower({"industrial": [60.0]})
    assert long.capacity_for(PRESSURE, 60.0) > short.capacity_for(PRESSURE)
    for k, rec in enumerate(replay(long, {PRESSURE: [(0.0, 200.0)]}, 200.0)):
        assert rec.tails[60.0][0].count == min(600, 10 * (k + 1))  # no row released too early


def test_bad_lengths_are_refused() -> None:
    with pytest.raises(ConfigError, match="window_s"):
        windower({"industrial": [0.0]})


def test_a_carded_model_asks_for_its_cards_window() -> None:
    (model,) = build_models(ModelsSection(use=[ModelUse(name="pump_skab")]), hop_s=1.0)
    assert model.window_s == model.card.window_s == 20.0
    (other,) = build_models(ModelsSection(use=[ModelUse(name="pump_skab", window_s=40.0)]), hop_s=1.0)
    assert other.window_s == 40.0
    assert model_lengths([model, other]) == {"industrial": [20.0, 40.0]}


class Seeing:
    """A plug-in WindowModel on 2 s windows that notes what it is given (not our code)."""

    name = "seeing"
    window_s = 2.0
    subject_kind = "industrial"

    def __init__(self) -> None:
        self.seen: list[WindowRecord] = []

    def applies_to(self, record: WindowRecord) -> bool:
        return record.kind == "industrial"

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        self.seen.extend(records)
        return [ModelResult(float(r.streams[0].count), False) for r in records]


def test_the_pipeline_scores_a_model_on_its_own_tail(tmp_path: Path) -> None:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 8.0, "hop_s": 1.0, "grace_s": 0.0},
            "models": {"ectopy": False, "streams": {"enabled": False}},
            "alarms": {"defaults": False},
        },
        "<test>",
        REGISTRY,
    )
    model = Seeing()

    async def main() -> list[dict[str, Any]]:
        anon = Anonymizer(Pseudonymizer(b"w" * 32), time_mode="relative", start_wall=WALL)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, models=[model])
            # Flow: 4 s of data, 4 s silent, then data again: a gap in the 8 s window, none in the 2 s tail.
            pipeline.sink.put_block(block(FLOW, 100.0, 104.0))
            pipeline.sink.put_block(block(FLOW, 108.0, 112.0))
            pipeline.sink.put_block(block(LEVEL, 100.0, 112.0))
            await pipeline.step(now_mono=112.0, now_wall=WALL + 112.0)
            await outbox.flush()
            return [as_map(decode(i.payload)) for i in await outbox.lease(100) if i.lane == Lane.FEATURES]

    published = asyncio.run(main())
    seen = {r.end_mono: r for r in model.seen}
    rec = seen[110.0]
    assert rec.length_s == 2.0
    flow = next(sf for sf in rec.streams if sf.stream == FLOW)
    assert flow.count == 20
    assert flow.missing == 0.0
    assert flow.features["mean"] == pytest.approx(109.0 - 0.05)
    assert next(sf for sf in seen[106.0].streams if sf.stream == FLOW).gap  # inside the silence: a gap
    # What goes out is the pipeline's window, unchanged, with the model's score on it.
    last = published[-1]
    assert last["win"] == 8.0
    flow_out = next(s for s in last["streams"] if s["metric"] == "RateRMS")
    assert flow_out["n"] == 40
    assert flow_out["missing"] == 0.5
    assert last["scores"] == {"seeing": 20.0}  # the model's verdict on its own 2 s tail


def test_statistics_learnt_on_another_window_are_learnt_again(tmp_path: Path) -> None:
    """Commissioning statistics carry their window: a site that changes a model's window recommissions it."""
    from test_inference_runtime import commission, pump_model, pump_window  # noqa: PLC0415

    rng = np.random.default_rng(3)
    commission(pump_model(tmp_path), rng)
    (stored,) = (tmp_path / "models").glob("pump_skab*.json")
    assert json.loads(stored.read_text(encoding="utf-8"))["window_s"] == 20.0
    # Restarted on the same window: scored at once.
    (r,) = pump_model(tmp_path).score_batch([pump_window(99, rng)])
    assert r.reason == ""
    # Restarted on another window: its inputs are other features, commissioned again.
    (r,) = pump_model(tmp_path, window_s=40.0).score_batch([pump_window(99, rng)])
    assert r.reason == "commissioning"


def test_a_novelty_state_of_another_window_is_not_loaded(tmp_path: Path) -> None:
    from gateway.contracts import StreamFeatures  # noqa: PLC0415

    use = NoveltyUse(window_s=5.0, commissioning_s=60.0)
    model = NoveltyModel(use, hop_s=1.0, state_dir=tmp_path)
    rng = np.random.default_rng(4)
    for k in range(model.commissioning_windows):
        feats = tuple(
            StreamFeatures(s, 50, 0.0, {"mean": 20.0 + rng.standard_normal()}) for s in (CURRENT, FLOW)
        )
        model.score_batch([WindowRecord("pump-1", "industrial", k, float(k), WALL + k, 5.0, feats)])
    assert model.fit_of("pump-1") is not None
    assert NoveltyModel(use, hop_s=1.0, state_dir=tmp_path).fit_of("pump-1") is not None
    # Another window of its own: features over another length, commissioned again.
    other = use.model_copy(update={"window_s": 10.0})
    assert NoveltyModel(other, hop_s=1.0, state_dir=tmp_path).fit_of("pump-1") is None
