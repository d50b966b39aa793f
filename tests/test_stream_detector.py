"""The per-stream detector on by default, and the novelty detector, on the simulated pump in
compressed time (the pattern of tests/test_alarm_campaign.py: generators feed the composed pipeline
chunk by chunk on the simulated clock, so hours take seconds).

* A healthy pump no model covers raises no alarm from the default per-stream detector in the hour
  after its hour of commissioning.
* A valve fault (a kind the novelty settings were never tuned on) raises one novelty alarm naming
  its inputs and one per-stream alarm on a lone pressure tag; each clears once, and the fault's
  end is not a second change.
* With ``seasonality = "daily"`` a plant's shift pattern is its normal; without it, the same
  pattern is a change.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_alarm_campaign import T0, WALL0, alarm_records
from test_novelty import single_stream

from drivers import REGISTRY
from drivers.sim.protocol import STREAM_KIND, Label, make_generator
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import WindowModel
from gateway.errors import ConfigError
from gateway.inference.novelty import build_novelty
from gateway.inference.streams import StreamChange, StreamUse, build_stream_change
from gateway.outbox import AsyncOutbox, Outbox
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock, Stream

HOP_S = 10.0
PUMP, LINE = "pump-3", "line-pressure"
PRESSURE = "Pump1/Pressure"


def run(
    tmp: Path,
    seconds: float,
    models: dict[str, Any],
    events: list[Label],
    seed: int = 5,
    hop_s: float = HOP_S,
    lone_values: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Alarms (decoded, with ``_t`` in simulated seconds) of the pump and of its pressure tag alone.

    ``lone_values(t, values)``: what the tag alone reports instead of the pump's pressure.
    """
    config = validate(
        {
            "gateway": {"state_dir": str(tmp)},
            "pipeline": {"window_s": 2 * hop_s, "hop_s": hop_s, "grace_s": 0.0},
            "models": models,
        },
        "<streams>",
        REGISTRY,
    )
    core = config.core
    scored: list[WindowModel] = [*build_novelty(core.models.novelty, hop_s=hop_s, state_dir=tmp)]
    scored += build_stream_change(core.models.streams, hop_s=hop_s, state_dir=tmp, others=scored)
    gen = make_generator("pump", seed=seed, rate_hz=1.0, events=events)
    kind = STREAM_KIND["pump"]
    streams = {
        sig.metric.name: Stream("plc", PUMP, "DEV-P", sig.metric, kind, sig.rate_hz) for sig in gen.signals
    }
    lone = next(
        Stream("tag", LINE, "DEV-L", s.metric, kind, s.rate_hz)
        for s in gen.signals
        if s.metric.name == PRESSURE
    )

    async def main() -> list[dict[str, Any]]:
        anon = Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", start_wall=WALL0)
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, scored)
            t = 0.0
            while t < seconds:
                for name, series in gen.generate(t, t + hop_s).series.items():
                    if not len(series):
                        continue
                    for st in (streams[name], lone) if name == PRESSURE else (streams[name],):
                        value = series.value
                        if st is lone and lone_values is not None:
                            value = lone_values(series.t, value)
                        pipeline.sink.put_block(
                            SampleBlock(st, T0 + series.t, WALL0 + series.t, value, series.quality)
                        )
                t += hop_s
                await pipeline.step(now_mono=T0 + t, now_wall=WALL0 + t)
            return await alarm_records(outbox, pipeline)

    return asyncio.run(main())


def of(alarms: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [a for a in alarms if a["alarm"].startswith("anomaly") and a["detail"].get("model") == model]


def test_the_default_per_stream_detector_raises_nothing_on_an_hour_of_a_healthy_pump(tmp_path: Path) -> None:
    # The detector's defaults: six hours of commissioning, then an hour judged (half-minute hops
    # keep the seven hours within a few seconds here).
    alarms = run(tmp_path, 7 * 3600.0, {}, [], hop_s=30.0)
    assert (tmp_path / "models").is_dir()  # it commissioned (and stored) the subjects
    assert of(alarms, "stream_change") == []


def test_a_valve_fault_is_one_novelty_alarm_and_one_per_stream_alarm_and_its_end_is_not_another(
    tmp_path: Path,
) -> None:
    fault = Label("valve_fault", 4000.0, 4200.0)
    # A site's shorter commissioning spans (the pump covered by novelty, the lone tag by the
    # per-stream detector).
    models = {
        "novelty": {"subjects": [PUMP], "commissioning_s": 1800.0},
        "streams": {"commissioning_s": 3600.0},
    }
    alarms = run(tmp_path, 6000.0, models, [fault])
    novelty = of(alarms, "novelty")
    assert [a["alarm"] for a in novelty] == ["anomaly", "anomaly_cleared"], novelty
    assert fault.start_s <= novelty[0]["_t"] <= fault.start_s + 60.0
    top = max(novelty[0]["contrib"], key=novelty[0]["contrib"].get)
    assert top.split(".")[0].rsplit("/", 1)[-1] in {"Pressure", "RateRMS", "Current"}, novelty[0]["contrib"]
    # The pump is covered by the novelty detector; its pressure tag alone is the per-stream one's.
    per_stream = of(alarms, "stream_change")
    assert [a["alarm"] for a in per_stream] == ["anomaly", "anomaly_cleared"], per_stream
    assert list(per_stream[0]["contrib"]) == [PRESSURE]
    assert fault.start_s <= per_stream[0]["_t"] <= fault.start_s + 60.0
    # Cleared after the fault ended and the pressure was back at its baseline, and then quiet.
    assert fault.end_s < per_stream[1]["_t"] < fault.end_s + 600.0


def test_a_lone_tag_reporting_impossible_values_is_a_sensor_fault_not_a_change(tmp_path: Path) -> None:
    """25 bar from a tag whose plausible range ends at 16 bar: the per-stream detector neither
    judges nor learns those windows; the plausibility rule's technical alarm says what is wrong."""

    def impossible(t: np.ndarray, value: np.ndarray) -> np.ndarray:
        return np.where((t >= 4000.0) & (t < 4200.0), 25.0, value)

    alarms = run(tmp_path, 5000.0, {"streams": {"commissioning_s": 3600.0}}, [], lone_values=impossible)
    assert of(alarms, "stream_change") == []
    faults = [(a["alarm"], a["metric"], round(a["_t"])) for a in alarms if a["alarm"].startswith("sensor_")]
    assert faults == [("sensor_fault", PRESSURE, 4000), ("sensor_restored", PRESSURE, 4200)], faults


def test_with_the_residual_cusum_and_hours_of_commissioning_it_adds_no_alarm_of_its_own_before_the_fault(
    tmp_path: Path,
) -> None:
    # The CUSUM needs a commissioning span holding several periods of the pump's slowest normal
    # wander (as the per-stream detector's six hours): after half an hour it flags that wander,
    # from six hours it is on by default (at allowance 1.0 since 1.5.0, 0.5 in 1.4.0), and after
    # six hours (here) it raises nothing on the healthy pump that T² and SPE alone do not (with
    # 1.3.0's defaults, EWMA 0.2, both flagged one T² excursion 50 minutes in; since 1.4.0's, EWMA
    # 0.5, both raise one 20 s before the fault starts, from the thermocouple, current and flow,
    # that runs into it).  Its clearing rule holds its sums at most ten allowances above its alarm
    # level: the alarm clears within a few minutes of the fault's end (at 1.0 260 s after it, at
    # 0.5 350 s, without the CUSUM 60 s; before the rule, about 20 minutes).
    commission = 21_600.0
    fault = Label("valve_fault", commission + 7200.0, commission + 7400.0)
    alarms = {}
    for cusum in (True, False):
        models = {
            "novelty": {"subjects": [PUMP], "commissioning_s": commission}
            | ({} if cusum else {"cusum_k": 0.0}),
            "streams": {"enabled": False},
        }
        alarms[cusum] = of(run(tmp_path / str(cusum), commission + 9000.0, models, [fault]), "novelty")
    spans = [(a["_t"], b["_t"]) for a, b in zip(alarms[False][::2], alarms[False][1::2], strict=True)]
    assert [a["alarm"] for a in alarms[True]] == ["anomaly", "anomaly_cleared"] * (len(alarms[True]) // 2)
    episodes = [(a["_t"], b["_t"]) for a, b in zip(alarms[True][::2], alarms[True][1::2], strict=True)]
    before = [(lo, hi) for lo, hi in episodes if lo < fault.start_s]
    assert len(before) <= 2, before  # two episodes at most before the fault ...
    # ... each one T² and SPE alone raise too (since 1.4.0's defaults, EWMA 0.5: one excursion of
    # the thermocouple, current and flow 20 s before the fault starts, which runs into it).
    assert all(any(lo <= t <= hi for lo, hi in spans) for t, _ in before), (before, spans)
    # The fault is flagged within a minute of its start, in one episode that clears after it.
    (found,) = [(lo, hi) for lo, hi in episodes if lo <= fault.start_s + 60.0 and hi > fault.end_s]
    assert found == episodes[-1], episodes
    assert fault.end_s < found[1] < fault.end_s + 600.0, found[1] - fault.end_s
    raised = alarms[True][-2]
    if raised["_t"] >= fault.start_s:
        top = max(raised["contrib"], key=raised["contrib"].get)
        assert top.split(".")[0].rsplit("/", 1)[-1] in {"Pressure", "RateRMS", "Current"}, raised["contrib"]


def shift_pattern(days: float, hop_s: float, seed: int) -> np.ndarray:
    """Window means of a tag with a day shift: 2.0 at night, 2.6 from 06:00 to 22:00 UTC, noise 0.02."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(days * 86_400 / hop_s)) * hop_s
    hour = (t % 86_400) // 3600
    return np.where((hour >= 6) & (hour < 22), 2.6, 2.0) + 0.02 * rng.standard_normal(len(t))


@pytest.mark.parametrize("seasonality", ["daily", "none"])
def test_a_daily_shift_pattern_is_normal_with_daily_seasonality_and_a_change_without(
    tmp_path: Path, seasonality: str
) -> None:
    hop = 60.0
    use = StreamUse(commissioning_s=86_400.0, seasonality=seasonality)  # type: ignore[arg-type]
    det = StreamChange(use, hop_s=hop, state_dir=tmp_path)
    values = shift_pattern(3.0, hop, seed=4)
    # single_stream's windows end at 1e9 + i seconds: give them this hop's wall times instead.
    records = [
        type(r)(r.subject, r.kind, i, i * hop, (i + 1) * hop, hop, r.streams)
        for i, r in enumerate(single_stream(values))
    ]
    res = det.score_batch(records)
    need = det.commissioning_windows
    assert all(r.reason == "commissioning" for r in res[:need])
    judged = res[need:]
    flagged = sum(r.anomaly for r in judged)
    if seasonality == "daily":
        assert flagged == 0
        # After a restart the hours' levels are back from the state file: another day is quiet,
        # and a real step on top of the pattern is still found within a few windows.
        det = StreamChange(use, hop_s=hop, state_dir=tmp_path)
        more = np.concatenate([shift_pattern(1.0, hop, seed=5), shift_pattern(0.2, hop, seed=6) + 0.3])
        tail = [
            type(r)(r.subject, r.kind, i, i * hop, (i + 1) * hop, hop, r.streams)
            for i, r in enumerate(single_stream(more), start=len(values))
        ]
        got = det.score_batch(tail)
        day = int(86_400 / hop)
        assert not any(r.anomaly for r in got[:day])
        assert all(r.reason != "commissioning" for r in got)
        assert next(i for i, r in enumerate(got[day:]) if r.anomaly) < 10
    else:
        assert flagged > len(judged) // 4  # day and night differ by 30 spreads


def test_daily_seasonality_needs_a_day_of_commissioning() -> None:
    with pytest.raises(ConfigError, match="commissioning_s"):
        validate({"models": {"streams": {"seasonality": "daily"}}}, "<t>", REGISTRY)


def test_the_per_stream_detector_can_be_switched_off(tmp_path: Path) -> None:
    config = validate({"models": {"streams": {"enabled": False}}}, "<t>", REGISTRY)
    assert build_stream_change(config.core.models.streams, hop_s=1.0, state_dir=tmp_path, others=[]) == []
    assert math.isfinite(StreamUse().z_limit)


@pytest.mark.campaign
@pytest.mark.parametrize("seed", range(1, 9))
def test_over_seeds_the_defaults_stay_quiet_and_a_valve_fault_is_one_episode_each(
    tmp_path: Path, seed: int
) -> None:
    assert of(run(tmp_path / "healthy", 7 * 3600.0, {}, [], seed=seed, hop_s=30.0), "stream_change") == []
    fault = Label("valve_fault", 22_000.0, 22_200.0)
    alarms = run(
        tmp_path / "fault",
        24_000.0,
        {"novelty": {"subjects": [PUMP], "commissioning_s": 21_600.0}},
        [fault],
        seed=seed,
        hop_s=30.0,
    )
    for model in ("novelty", "stream_change"):
        assert [a["alarm"] for a in of(alarms, model)] == ["anomaly", "anomaly_cleared"], (model, alarms)


def test_commissioning_keeps_its_values_packed_not_as_float_objects() -> None:
    # Six hours of commissioning at a 10 s hop is 2,160 values per stream, all held until the fit:
    # as a list of floats each cost 40 bytes of heap (its slot and the float object), which grew
    # the gateway's heap for six hours; packed doubles cost 8.
    import tracemalloc  # noqa: PLC0415 - only here

    det = StreamChange(StreamUse(), hop_s=HOP_S, state_dir=None)
    n = det.commissioning_windows - 1
    assert n > 2000
    values = 2.0 + 0.05 * np.random.default_rng(3).standard_normal(n)

    def feed(lo: int, hi: int) -> None:
        for i in range(lo, hi, 100):  # records made and dropped as a pipeline does
            det.score_batch(single_stream(values[i : min(i + 100, hi)], start=i))

    tracemalloc.start()
    try:
        feed(0, 1000)  # the detector's fixed state
        before = tracemalloc.get_traced_memory()[0]
        feed(1000, n)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / (n - 1000) < 16, f"{held / (n - 1000):.1f} bytes per commissioning value"
    # The values are still all there: the next window fits the stream and judges it.
    assert det.score_batch(single_stream(values[:2], start=n))[-1].reason != "commissioning"
