"""The commissioned baseline's step in bare ufuncs against the np.nan_to_num/np.clip formula it replaced."""

from __future__ import annotations

import math

import numpy as np

from gateway.inference.runner import Normaliser, Tracking


def _reference(
    level: np.ndarray, x: np.ndarray, weight: np.ndarray, k: float, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    step = np.nan_to_num((x - level) * weight)
    step *= k
    out: np.ndarray = np.clip(level + step, lo, hi)
    return out


def test_baseline_steps_match_the_nan_to_num_formula() -> None:
    track = Tracking(np.array([True, True, False, True]), 30.0, 300.0, 0.0, 3.0)
    rng = np.random.default_rng(3)
    norm = Normaliser.empty(4, 2)
    for t0 in (0.0, 1.0):
        norm.add(rng.normal(10.0, 1.0, 4), 1e-3, 1e-6, t=t0, track=track)
    assert norm.mean is not None
    assert norm.std is not None
    assert norm._lo is not None
    assert norm._hi is not None
    t = 2.0
    inputs = [
        rng.normal(10.0, 1.0, 4),
        np.array([math.nan, 11.0, 9.0, math.nan]),  # absent inputs do not move their level
        np.array([1e308, -1e308, 5.0, 10.0]) * 1.7,  # overflowing steps end at the bounds
        rng.normal(30.0, 1.0, 4),  # far off: capped
    ]
    for x in inputs:
        t += 10.0
        assert norm.level is not None
        before = norm.level.copy()
        assert norm.last_t is not None
        k = min(1.0, (t - norm.last_t) / 30.0)
        with np.errstate(over="ignore", invalid="ignore"):
            want = _reference(before, x, track.weight, k, norm._lo, norm._hi)
            norm.follow(x, False, t, track)
        assert np.array_equal(norm.level, want), (x, norm.level, want)
        assert norm.level[2] == before[2]  # an input that does not follow never moves
