"""Window features on arrays with hand-computed answers; no NaN ever comes out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.errors import CorruptDataError
from gateway.pipeline import features
from gateway.pipeline.features import (
    basic_features,
    basic_features_batch,
    basic_features_streams,
    hrv_features,
    missing_fraction,
)


def test_basic_features_of_a_line() -> None:
    t = 1_000_000.0 + np.arange(5, dtype=np.float64) * 0.5  # a real monotonic clock is large
    v = 3.0 + 2.0 * (t - t[0])  # 3, 4, 5, 6, 7
    f = basic_features(t, v)
    assert f["mean"] == 5.0
    assert f["min"] == 3.0
    assert f["max"] == 7.0
    assert f["std"] == pytest.approx(math.sqrt(2.0))  # population std of 3..7
    assert f["slope"] == pytest.approx(2.0, rel=1e-9)


def test_basic_features_of_constants_are_exact() -> None:
    t = np.arange(7) / 3.0
    v = np.full(7, 0.1)  # 0.1 * 7 / 7 is not 0.1 in floating point; the mean must still be
    f = basic_features(t, v)
    assert f == {"mean": 0.1, "std": 0.0, "min": 0.1, "max": 0.1, "slope": 0.0}


def test_basic_features_single_point_has_no_slope() -> None:
    f = basic_features(np.array([5.0]), np.array([42.0]))
    assert f == {"mean": 42.0, "std": 0.0, "min": 42.0, "max": 42.0}


def test_basic_features_zero_time_spread_has_no_slope() -> None:
    f = basic_features(np.array([5.0, 5.0, 5.0]), np.array([1.0, 2.0, 3.0]))
    assert "slope" not in f
    assert f["mean"] == 2.0


def test_basic_features_empty_is_empty() -> None:
    assert basic_features(np.empty(0), np.empty(0)) == {}


def test_basic_features_ignore_non_finite_rows() -> None:
    t = np.array([0.0, 1.0, 2.0, math.nan, 4.0, 5.0])
    v = np.array([1.0, math.nan, 3.0, 100.0, math.inf, 5.0])
    f = basic_features(t, v)  # usable rows: (0, 1), (2, 3), (5, 5)
    assert f["mean"] == 3.0
    assert f["min"] == 1.0
    assert f["max"] == 5.0
    assert f["slope"] == pytest.approx(np.polyfit([0.0, 2.0, 5.0], [1.0, 3.0, 5.0], 1)[0])
    assert basic_features(np.arange(3.0), np.full(3, math.nan)) == {}


def test_basic_features_reject_mismatched_shapes() -> None:
    with pytest.raises(CorruptDataError, match="differ"):
        basic_features(np.arange(3.0), np.arange(4.0))


def test_slope_matches_polyfit_on_noisy_data() -> None:
    rng = np.random.default_rng(7)
    t = np.sort(rng.uniform(500.0, 510.0, 256))
    v = rng.normal(0.0, 1.0, 256) + 0.3 * t
    f = basic_features(t, v)
    assert f["slope"] == pytest.approx(np.polyfit(t, v, 1)[0], rel=1e-9)
    assert f["std"] == pytest.approx(np.std(v), rel=1e-12)
    assert f["mean"] == pytest.approx(np.mean(v), rel=1e-12)


def test_hrv_hand_computed() -> None:
    rr = np.array([800.0, 810.0, 790.0, 850.0, 845.0])
    f = hrv_features(rr)
    # successive differences 10, -20, 60, -5: squares sum 4125 over 4
    assert f["rmssd"] == pytest.approx(math.sqrt(4125.0 / 4.0))
    # mean 819; deviations -19, -9, -29, 31, 26: squares sum 2920 over n-1 = 4
    assert f["sdnn"] == pytest.approx(math.sqrt(730.0))
    assert f["pnn50"] == 25.0  # only |60| > 50


def test_hrv_threshold_is_strictly_greater_than_50ms() -> None:
    f = hrv_features(np.array([800.0, 850.0, 800.0, 850.1]))
    assert f["pnn50"] == pytest.approx(100.0 / 3.0)


def test_hrv_needs_two_intervals() -> None:
    assert hrv_features(np.array([800.0])) == {}
    assert hrv_features(np.empty(0)) == {}
    f = hrv_features(np.array([800.0, 900.0]))
    assert f == {"rmssd": 100.0, "sdnn": pytest.approx(math.sqrt(5000.0)), "pnn50": 100.0}


def test_hrv_ignores_non_finite_intervals() -> None:
    f = hrv_features(np.array([800.0, math.nan, 820.0, math.inf]))
    assert f == {"rmssd": 20.0, "sdnn": pytest.approx(math.sqrt(200.0)), "pnn50": 0.0}
    assert hrv_features(np.array([math.nan, 800.0])) == {}


def test_hrv_rejects_2d() -> None:
    with pytest.raises(CorruptDataError):
        hrv_features(np.zeros((2, 2)))


@pytest.mark.parametrize(
    ("usable", "expected", "fraction"),
    [
        (256, 256.0, 0.0),
        (128, 256.0, 0.5),
        (300, 256.0, 0.0),  # more than expected (rate drift) clips at 0
        (0, 256.0, 1.0),
        (0, None, 1.0),  # event series: nothing at all is fully missing
        (3, None, 0.0),
        (0, 0.0, 1.0),
        (5, 0.0, 0.0),
        (1, 4.0, 0.75),
    ],
)
def test_missing_fraction(usable: int, expected: float | None, fraction: float) -> None:
    assert missing_fraction(usable, expected) == fraction


# Magnitudes stay below 1e100 so sums of squares cannot overflow; NaN and infinities are mixed in.
finite_or_not = st.one_of(
    st.floats(min_value=-1e100, max_value=1e100),
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


@settings(max_examples=300, deadline=None)
@given(
    v=hnp.arrays(np.float64, st.integers(0, 40), elements=finite_or_not),
    data=st.data(),
)
def test_no_feature_is_ever_nan_or_infinite(v: np.ndarray, data: st.DataObject) -> None:
    t = data.draw(hnp.arrays(np.float64, v.shape, elements=finite_or_not))
    out = {**basic_features(t, v), **hrv_features(v)}
    assert all(math.isfinite(x) for x in out.values()), out


@settings(max_examples=200, deadline=None)
@given(
    windows=st.lists(
        st.lists(
            st.tuples(st.floats(-1e3, 1e3), st.one_of(st.floats(-1e3, 1e3), st.just(math.nan))),
            max_size=12,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_batch_equals_one_by_one(windows: list[list[tuple[float, float]]]) -> None:
    width = max(len(w) for w in windows) + 2
    t2 = np.full((len(windows), width), 12345.0)  # padding must not leak into any row
    v2 = np.full((len(windows), width), -999.0)
    for i, w in enumerate(windows):
        for j, (t, v) in enumerate(w):
            t2[i, j] = t
            v2[i, j] = v
    counts = [len(w) for w in windows]
    got = basic_features_batch(t2, v2, counts)
    for i, w in enumerate(windows):
        want = basic_features(np.array([p[0] for p in w]), np.array([p[1] for p in w]))
        assert got[i].keys() == want.keys()
        for key, value in want.items():
            assert got[i][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, w)


def test_batch_rejects_bad_shapes() -> None:
    with pytest.raises(CorruptDataError):
        basic_features_batch(np.zeros((2, 3)), np.zeros((2, 3)), [1, 2, 3])


def test_windows_of_jittering_counts_keep_a_bounded_number_of_layouts() -> None:
    # Live streams' windows differ by a sample or two: each count tuple is a new layout, and the
    # cache of them must stay bounded (it held up to 256 window-sized arrays).
    rng = np.random.default_rng(4)
    features._layout.cache_clear()
    for k in range(200):
        counts = rng.integers(1190, 1210, 8)
        ts = [np.arange(n, dtype=np.float64) for n in counts]
        got = basic_features_streams(ts, [t * 0.5 + k for t in ts])
        assert got[0]["mean"] == pytest.approx((counts[0] - 1) * 0.25 + k)
    assert features._layout.cache_info().currsize <= features.LAYOUTS_KEPT
