"""The shipped pump model on the simulated pump with its card's defaults: no alarm while healthy.

The simulated pump's flow, supply voltage and pressure wander slowly (a few percent over minutes,
about as much as SKAB's), which a baseline frozen after commissioning read as a valve fault
(BENCHMARKS.md, "Why pump_skab's card threshold fires").  Since 1.1.0 the baseline of the ``mean``
inputs follows slow wander while the model says normal, within a few commissioning spreads.

Compressed time through the composed pipeline (windows, the model, episode logic, anonymizer,
outbox): commissioning (the card's 30 minutes) plus an hour judged takes a few seconds per seed.
The parts of :class:`gateway.inference.runner.Normaliser` that decide what is learnt are checked
on their own below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_alarm_campaign import PUMP, WALL0, run

from drivers.sim.protocol import Label
from gateway.contracts import StreamFeatures, WindowRecord
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel, Normaliser, Tracking
from gateway.sample import Stream, industrial_metric

CARD = load_card(default_models_dir() / f"pump_skab{CARD_SUFFIX}")
COMMISSIONING_S = float(CARD.normalisation.commissioning_s or 0.0)


def pump_alarms(tmp: Path, seed: int, seconds: float, events: list[Label]) -> list[dict[str, Any]]:
    """Decoded alarms of one simulated pump scored by ``pump_skab`` with its card's defaults."""
    return run(tmp, seconds, {PUMP: events}, seed, pump_model={"name": "pump_skab"}, subjects=(PUMP,))


def anomalies(alarms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pump model's anomaly episodes (raised, not their clearing)."""
    return [a for a in alarms if a["alarm"] == "anomaly" and a["detail"].get("model") == "pump_skab"]


def test_card_commissions_long_enough_and_follows_slow_wander() -> None:
    norm = CARD.normalisation
    assert COMMISSIONING_S >= 1800.0
    assert norm.track_s is not None
    assert norm.track_flagged_s is not None
    assert norm.track_s < norm.track_flagged_s  # a flagged window barely moves the baseline


@pytest.mark.parametrize("seed", [0, 1, 4, 10])
def test_a_healthy_simulated_pump_raises_no_anomaly_in_the_hour_after_commissioning(
    tmp_path: Path, seed: int
) -> None:
    # Seeds 0, 1, 4 and 10 each raised 1-10 false episodes an hour with the frozen baseline.
    alarms = pump_alarms(tmp_path, seed, COMMISSIONING_S + 3600.0, [])
    assert anomalies(alarms) == []


@pytest.mark.campaign
@pytest.mark.parametrize("seed", range(16))
def test_sixteen_healthy_simulated_hours_raise_no_anomaly(tmp_path: Path, seed: int) -> None:
    # The 16 seeds of BENCHMARKS.md's simulated-pump table, through the whole pipeline.
    assert anomalies(pump_alarms(tmp_path, seed, COMMISSIONING_S + 3600.0, [])) == []


def test_valve_fault_and_bearing_wear_after_commissioning_are_found_and_nothing_else(tmp_path: Path) -> None:
    c = COMMISSIONING_S
    valve = Label("valve_fault", c + 600.0, c + 800.0)
    wear = Label("bearing_wear", c + 1500.0, c + 3300.0)
    found = anomalies(pump_alarms(tmp_path, 5, c + 3400.0, [valve, wear]))
    in_valve = [a for a in found if valve.start_s <= a["_t"] <= valve.end_s]
    in_wear = [a for a in found if wear.start_s <= a["_t"] <= wear.end_s]
    assert len(in_valve) == 1, found
    # Wear grows over 30 minutes: its first, weak minutes may come and go before it stays flagged.
    assert 1 <= len(in_wear) <= 2, found
    assert len(found) == len(in_valve) + len(in_wear), found  # nothing before, between or after
    assert all(a["contrib"] for a in found), found  # each names its contributing inputs


# ---- the baseline's rules ---------------------------------------------------------------


def _track(**kw: Any) -> Tracking:
    args: dict[str, Any] = {
        "inputs": np.array([True, False]),
        "normal_s": 30.0,
        "flagged_s": None,
        "guard_s": 30.0,
        "cap": 3.0,
    } | kw
    return Tracking(**args)


def _commissioned(track: Tracking) -> Normaliser:
    norm = Normaliser.empty(2, 40)
    rng = np.random.default_rng(1)
    for k in range(40):
        norm.add(np.array([10.0, 5.0]) + rng.normal(0.0, 0.1, 2), 0.0, 1e-6, t=10.0 * k, track=track)
    assert norm.mean is not None
    assert norm.level is not None
    return norm


def test_the_baseline_follows_a_normal_drift_of_mean_inputs_only() -> None:
    track = _track()
    norm = _commissioned(track)
    assert norm.std is not None
    assert norm.mean is not None
    start = norm.level.copy() if norm.level is not None else None
    target = norm.mean + np.array([2.0, 2.0]) * norm.std
    for k in range(40, 80):
        norm.follow(target, False, 10.0 * k, track)
    assert norm.level is not None
    assert start is not None
    assert abs(norm.level[0] - target[0]) < 0.01 * norm.std[0]  # followed within a few minutes
    assert norm.level[1] == start[1]  # a spread input keeps its commissioning level


def test_a_flagged_window_freezes_the_baseline_and_the_guard_waits_after_it() -> None:
    track = _track()
    norm = _commissioned(track)
    assert norm.level is not None
    before = norm.level.copy()
    t = 400.0
    for _ in range(30):
        t += 10.0
        norm.follow(before + 5.0, True, t, track)
    assert np.array_equal(norm.level, before)
    # Two normal windows after the episode: still inside the guard, nothing moves; the third does.
    for _ in range(2):
        t += 10.0
        norm.follow(before + 1.0, False, t, track)
    assert np.array_equal(norm.level, before)
    t += 10.0
    norm.follow(before + 1.0, False, t, track)
    assert norm.level[0] > before[0]


def test_the_baseline_never_leaves_its_cap_however_long_a_change_lasts() -> None:
    track = _track(flagged_s=300.0)
    norm = _commissioned(track)
    assert norm.mean is not None
    assert norm.std is not None
    for k in range(1000):
        norm.follow(norm.mean + 50.0 * norm.std, k % 2 == 0, 400.0 + 10.0 * k, track)
    assert norm.level is not None
    assert norm.level[0] == pytest.approx(norm.mean[0] + 3.0 * norm.std[0])


def plc_windows(seed: int) -> Callable[[int, float], WindowRecord]:
    """Window k of one PLC subject with every card input, its ``mean`` features at 10 + shift."""
    streams = [
        Stream("plc", "p", "S", industrial_metric(spec.metric, "u"), "industrial", 1.0)
        for spec in CARD.inputs
    ]
    uniq = list(dict.fromkeys(s.metric.name for s in streams))
    by_name = {s.metric.name: s for s in streams}
    rng = np.random.default_rng(seed)

    def window(k: int, shift: float) -> WindowRecord:
        sfs = tuple(
            StreamFeatures(
                by_name[m], 20, 0.0, {"mean": 10.0 + shift + 0.1 * rng.standard_normal(), "std": 1.0}
            )
            for m in uniq
        )
        return WindowRecord("p", "industrial", k, 10.0 * k, WALL0 + 10.0 * k, 20.0, sfs)

    return window


def test_the_followed_baseline_survives_a_restart(tmp_path: Path) -> None:
    window = plc_windows(seed=3)

    def model() -> AnomalyModel:
        return AnomalyModel(CARD, default_models_dir(), commissioning_windows=20, state_dir=tmp_path)

    first = model()
    for k in range(20 + 120):
        first.score_batch([window(k, 0.0 if k < 20 else 0.05 * min(k - 20, 4))])
    norm = first._norm["p"]
    level, mean = norm.level, norm.mean
    assert level is not None
    assert mean is not None
    follows = np.array([spec.feature == "mean" for spec in CARD.inputs])
    assert (np.abs(level - mean)[follows] > 0.1).all()  # the mean inputs' level moved with the shift
    again = model()
    again.score_batch([window(200, 0.2)])
    restored = again._norm["p"].level
    assert restored is not None
    assert np.allclose(restored, level, atol=0.05)
    # A damaged stored level costs only where the machine had wandered to: back to the mean.
    path = next(tmp_path.rglob("*.json"))
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(raw | {"level": ["x"] * len(raw["mean"])}))
    third = model()
    third.score_batch([window(201, 0.0)])
    reloaded = third._norm["p"].level
    assert reloaded is not None
    assert np.allclose(reloaded, mean)


def test_a_new_version_adopts_the_followed_baseline_and_scores_as_the_active_one() -> None:
    """A version in shadow (carried commissioning) judges against the level the active one follows."""
    window = plc_windows(seed=5)

    active = AnomalyModel(CARD, default_models_dir(), commissioning_windows=20)
    for k in range(20 + 120):
        active.score_batch([window(k, 0.0 if k < 20 else 0.05 * min(k - 20, 4))])
    candidate = active.sibling(CARD, default_models_dir(), tag="v2")
    assert candidate.adopt_commissioning(active) == 1
    mine, theirs = candidate._norm["p"], active._norm["p"]
    assert mine.level is not None
    assert theirs.level is not None
    assert np.allclose(mine.level, theirs.level)
    # The same next window gets the same score from both (the same card, the same baseline).
    w = window(200, 0.2)
    a, c = active.score_batch([w]), candidate.score_batch([w])
    assert np.isclose(a[0].score, c[0].score, rtol=1e-4), (a[0], c[0])
