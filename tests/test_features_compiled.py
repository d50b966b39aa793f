"""The compiled one-pass features against the numpy pass, to the bit, and what they leave to it.

``gateway/_window.c`` takes every sum in the order ``np.add.reduceat`` takes it, so a
window's features (and so its encoded record and every model input) do not depend on which pass
served it.  Sizes cross numpy's pairwise-sum boundaries (8 terms, 128, the halving above), values
include -0.0, constants, one row, strided views of a ring, and equal times (no slope).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from gateway.compiled import compiled
from gateway.pipeline import features
from gateway.pipeline.features import basic_features_finite, basic_features_streams

F8 = npt.NDArray[np.float64]

SIZES = (1, 2, 3, 7, 8, 9, 15, 16, 17, 20, 30, 127, 128, 129, 136, 257, 1000, 1200, 4000, 9000)


def _bits(got: list[dict[str, float]]) -> list[list[tuple[str, float, float]]]:
    """Keys in order, values, and the sign of each (so -0.0 and 0.0 differ)."""
    return [[(k, v, math.copysign(1.0, v)) for k, v in f.items()] for f in got]


def _window(rng: np.random.Generator) -> tuple[list[F8], list[F8]]:
    ts: list[F8] = []
    vs: list[F8] = []
    t0 = rng.uniform(1e3, 2e6)
    for _ in range(int(rng.integers(2, 10))):
        n = int(rng.choice(SIZES))
        t = t0 + np.sort(rng.uniform(0.0, n / 25.0, n))
        level, sd = rng.uniform(-1e4, 1e4), 10.0 ** rng.uniform(-6, 3)
        kind = int(rng.integers(5))
        v = np.full(n, level) if kind == 0 else level + sd * rng.standard_normal(n)
        if kind == 1:
            v[int(rng.integers(n))] = -0.0
        elif kind == 2:
            t = np.full(n, t0)  # no time spread: no slope
        elif kind == 3:
            # A view with a stride, as a ring's interleaved columns could give.
            wide = np.repeat(v, 2)
            v = wide[::2]
        ts.append(t)
        vs.append(v)
    return ts, vs


@pytest.fixture(scope="module")
def built() -> None:
    assert features.COMPILED, (
        "the compiled features (gateway/_window.c) are not built in this environment: "
        "bash .ci/setup test (needs gcc and the Python headers)"
    )


@pytest.mark.usefixtures("built")
def test_compiled_pass_equals_the_numpy_pass_to_the_bit() -> None:
    rng = np.random.default_rng(20261205)
    for _ in range(1500):
        ts, vs = _window(rng)
        counts = tuple(map(len, vs))
        got = features._streams_pass(ts, vs, counts)
        want = features._numpy_pass(ts, vs, counts)
        assert _bits(got) == _bits(want), counts


@pytest.mark.usefixtures("built")
def test_compiled_pass_matches_the_formulas_on_a_known_window() -> None:
    t = 1e5 + np.arange(10.0)
    ramp, const = 3.0 + 0.5 * np.arange(10.0), np.full(10, 7.25)
    got = features._streams_pass([t, t], [ramp, const], (10, 10))
    assert got[0] == pytest.approx(
        {"mean": 5.25, "std": 0.5 * math.sqrt(8.25), "min": 3.0, "max": 7.5, "slope": 0.5}, rel=1e-15
    )
    assert got[1] == {"mean": 7.25, "std": 0.0, "min": 7.25, "max": 7.25, "slope": 0.0}


@pytest.mark.usefixtures("built")
def test_windows_the_compiled_pass_declines_take_the_numpy_pass() -> None:
    t = 1e5 + np.arange(20.0)
    v = np.sin(t)
    stream = compiled("features")
    assert stream is not None
    declined = {
        "tuples": ((t, t), (v, v)),
        "float32": ([t, t], [v, v.astype(np.float32)]),
        "beyond 1e100": ([t, t], [v, v * 1e101]),
        "unequal lengths": ([t, t[:-1]], [v, v]),
        "an empty stream": ([t, t[:0]], [v, v[:0]]),
        "a 2-D array": ([t, t], [v, v.reshape(4, 5)]),
    }
    for what, (ts, vs) in declined.items():
        assert stream(ts, vs) is None, what
    # Through the public function the declined windows still get their features.
    big = basic_features_streams([t, t], [v, v * 1e101])
    assert big == [basic_features_finite(t, v), basic_features_finite(t, v * 1e101)]
    as32 = basic_features_streams([t, t], [v, v.astype(np.float32)])
    assert as32 == features._numpy_pass([t, t], [v, v.astype(np.float32)], (20, 20))
