"""A scored window's short paths against the straightforward computation.

The window's features (one pass over all its streams, few numpy calls, results read out once per
step) and the numpy backend's window-at-a-time path (the last layer a dot product in Python floats)
exist to touch less code per window (compiled where the gateway was built with a C compiler, as
the tests' environment is); they must give what the textbook formulas give, on random
windows and on the edge cases a live gateway sees: gaps (empty streams), constant streams, a
single row, mixed counts, and model inputs at zero, at the clip and far out.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import numpy.typing as npt
import pytest
from model_support import MODELS, NEURAL, card_of

from gateway.compiled import compiled
from gateway.inference import backends
from gateway.inference.backends import DENSE_BATCH1_TOLERANCE, DenseBackend, open_backend
from gateway.inference.card import ModelCard
from gateway.pipeline.features import basic_features_streams

F8 = npt.NDArray[np.float64]
REL = 1e-12


def _textbook(t: F8, v: F8) -> dict[str, float]:
    """Mean, population std, min, max and least-squares slope, each by its own numpy call."""
    if v.size == 0:
        return {}
    out = {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(v.min()), "max": float(v.max())}
    tc = t - np.mean(t)
    den = float(np.sum(tc * tc))
    if v.size >= 2 and den > 0.0:
        out["slope"] = float(np.sum(tc * (v - np.mean(v))) / den)
    return out


def _window(rng: np.random.Generator) -> tuple[list[F8], list[F8]]:
    ts: list[F8] = []
    vs: list[F8] = []
    t0 = rng.uniform(1e4, 1e6)
    for _ in range(int(rng.integers(2, 10))):
        n = int(rng.choice([0, 0, 1, 2, 5, 20, 21, 30, 300]))  # gaps and single rows are common
        t = t0 + np.sort(rng.uniform(0.0, 30.0, n))
        level, sd = rng.uniform(-500.0, 500.0), 10.0 ** rng.uniform(-3, 2)
        kind = int(rng.integers(3))
        v = np.full(n, level) if kind == 0 else level + sd * rng.standard_normal(n)
        if kind == 2:
            v = v + 0.1 * sd * (t - t0)  # a ramp: a slope well away from zero
        ts.append(t)
        vs.append(v)
    return ts, vs


def test_window_features_match_the_textbook_formulas() -> None:
    rng = np.random.default_rng(20261204)
    kinds = {"gap": 0, "one row": 0, "constant": 0, "varying": 0}
    for _ in range(600):
        ts, vs = _window(rng)
        got = basic_features_streams(ts, vs)
        for t, v, g in zip(ts, vs, got, strict=True):
            want = _textbook(t, v)
            assert list(g) == list(want), (g, want)
            scale = float(np.abs(v).max()) if v.size else 1.0
            for key, value in want.items():
                tol = REL * (scale / max(float(np.ptp(t)), 1e-9) if key == "slope" else scale)
                assert math.isclose(g[key], value, rel_tol=1e-9, abs_tol=tol), (key, g, want)
            if v.size == 0:
                kinds["gap"] += 1
            elif v.size == 1:
                kinds["one row"] += 1
                assert g == {"mean": v[0], "std": 0.0, "min": v[0], "max": v[0]}
            elif v.min() == v.max():
                kinds["constant"] += 1
                assert g == {"mean": v[0], "std": 0.0, "min": v[0], "max": v[0], "slope": 0.0}
            else:
                kinds["varying"] += 1
    assert min(kinds.values()) > 100, kinds


def _forward(x: F8, layers: list[tuple[F8, F8, str]]) -> F8:
    """The layers in float64, the sigmoid as its textbook 1 / (1 + e^-y)."""
    y = x
    for w, b, act in layers:
        y = y @ w + b
        if act == "relu":
            y = np.maximum(y, 0.0)
        elif act == "sigmoid":
            y = 1.0 / (1.0 + np.exp(-y))
    return y.reshape(len(x))


def _opened(name: str) -> tuple[ModelCard, DenseBackend, list[tuple[F8, F8, str]], npt.NDArray[np.float32]]:
    """A model's card, its numpy backend, its fp32 layers in float64 and its recorded rows."""
    card = card_of(name)
    backend = open_backend(card, MODELS, backend="numpy")
    assert isinstance(backend, DenseBackend)
    with np.load(MODELS / card.dense_files["fp32"].path, allow_pickle=False) as npz:
        acts = [str(a) for a in npz["act"].reshape(-1)]
        layers = [
            (npz[f"w{i}"].astype(np.float64), npz[f"b{i}"].astype(np.float64), a) for i, a in enumerate(acts)
        ]
        return card, backend, layers, np.asarray(npz["ref_x"], np.float32)


@pytest.mark.parametrize("name", NEURAL)
def test_window_at_a_time_scores_match_the_layers_and_the_verdicts(name: str) -> None:
    card, backend, layers, recorded = _opened(name)
    n = card.n_inputs
    clip = card.normalisation.clip
    rng = np.random.default_rng(3)
    edges = [np.zeros(n), np.full(n, clip), np.full(n, -clip), *(np.eye(n) * clip)]
    rows = np.vstack([recorded, np.clip(rng.standard_normal((300, n)) * 6, -clip, clip), *edges]).astype(
        np.float32
    )
    one = np.array([backend.run(rows[i : i + 1])[0] for i in range(len(rows))])
    want = _forward(rows.astype(np.float64), layers)
    # The textbook sigmoid and numpy's tanh form differ by a few ulps of 1: an absolute bound.
    np.testing.assert_allclose(one, want, rtol=0.0, atol=1e-12)
    np.testing.assert_allclose(one, backend.run(rows), rtol=0.0, atol=DENSE_BATCH1_TOLERANCE)
    assert ((one > card.threshold) == (want > card.threshold)).all()
    assert ((one > card.threshold) == (backend.run(rows) > card.threshold)).all()


@pytest.mark.parametrize("name", NEURAL)
def test_compiled_window_score_equals_the_python_path(name: str) -> None:
    # The compiled row (gateway/_window.c) sums every layer in input order: a model
    # whose only layer is the last gives the Python path's score to the bit, hidden layers within
    # the tolerance of BLAS's order; rows the compiled call declines (float16) take the Python path.
    assert backends.COMPILED, "gateway/_window.c is not built here: bash .ci/setup test"
    card = card_of(name)
    backend = open_backend(card, MODELS, backend="numpy")
    assert isinstance(backend, DenseBackend)
    n = card.n_inputs
    clip = card.normalisation.clip
    rng = np.random.default_rng(11)
    rows = np.vstack(
        [np.clip(rng.standard_normal((400, n)) * 4, -clip, clip), np.zeros(n), np.full(n, -clip)]
    ).astype(np.float32)
    compiled = np.array([backend.run(rows[i : i + 1])[0] for i in range(len(rows))])
    python = np.array([backend.run_numpy(rows[i : i + 1])[0] for i in range(len(rows))])
    single_layer = len(np.load(MODELS / card.dense_files["fp32"].path)["act"].reshape(-1)) == 1
    if single_layer:
        assert compiled.tolist() == python.tolist()
    np.testing.assert_allclose(compiled, python, rtol=0.0, atol=DENSE_BATCH1_TOLERANCE)
    assert ((compiled > card.threshold) == (python > card.threshold)).all()
    half = rows[:1].astype(np.float16)
    assert backend.run(half)[0] == backend.run_numpy(half)[0]  # type: ignore[arg-type]


def _same_bits(a: F8, b: F8) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_compiled_row_z_scores_and_baseline_step_equal_the_numpy_operations_to_the_bit() -> None:
    # gateway/_window.c: np.array of floats, (x - mean) / std and the baseline's in-place step,
    # each against the numpy it replaces, on rows with absent inputs, overflows and bounds hit.
    vector, zrow, follow = compiled("vector"), compiled("zrow"), compiled("follow")
    assert None not in (vector, zrow, follow), "gateway/_window.c is not built here: bash .ci/setup test"
    rng = np.random.default_rng(5)
    kinds = {"finite": 0, "absent": 0, "clamped": 0, "overflow": 0}
    for k in range(3000):
        n = int(rng.integers(1, 40))
        got = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 4, n)).tolist()
        x = vector(got)
        assert _same_bits(x, np.array(got, np.float64))
        mean, std = rng.standard_normal(n) * 50, 10.0 ** rng.uniform(-4, 2, n)
        if k % 7 == 0:
            x[int(rng.integers(n))] = np.nan  # an absent input
        far = int(rng.integers(n))
        if k % 11 == 0:
            x[far], std[far] = 1e308, 1e-300  # z overflows
        z, zmax, finite = zrow(x, mean, std)
        with np.errstate(over="ignore", invalid="ignore"):  # numpy warns where the row overflows
            want = (x - mean) / std
        assert _same_bits(z, want[np.newaxis])
        clean = np.where(np.isfinite(want), want, 0.0)
        assert zmax == float(np.abs(clean).max())
        assert finite == bool(np.isfinite(want).all())
        # The baseline's step: level += (x - level) * scaled, clamped to [lo, hi].
        level = mean + rng.standard_normal(n)
        if k % 11 == 0:
            level[far] = -1e308  # the step overflows
        scaled = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0.0, 1.0))
        lo, hi = level - rng.uniform(0, 3, n), level + rng.uniform(0, 3, n)
        with np.errstate(over="ignore", invalid="ignore"):
            step = (x - level) * scaled
        bounded = k % 2 == 0
        expect = np.clip(level + step, lo, hi) if bounded else level + step
        before = level.copy()
        moved = follow(x, level, scaled, lo if bounded else None, hi if bounded else None)
        if np.isfinite(step).all():
            assert moved is True
            assert _same_bits(level, expect)
            kinds["clamped" if bounded and not _same_bits(expect, before + step) else "finite"] += 1
        else:
            assert moved is False
            assert _same_bits(level, before)  # untouched: the numpy path decides
            kinds["overflow" if np.isnan(x).sum() == 0 else "absent"] += 1
    assert min(kinds.values()) > 30, kinds
    # Other layouts are declined, never misread.
    assert vector([1.0, None]) is None
    assert vector([1.0, 2]) is None
    assert zrow(np.zeros(3, np.float32), np.zeros(3), np.ones(3)) is None
    assert zrow(np.zeros(3), np.zeros(4), np.ones(3)) is None
    assert follow(np.zeros(3), np.zeros(3)[::-1], np.ones(3), None, None) is None


def test_arrays_the_buffer_protocol_gives_in_another_layout_are_declined() -> None:
    # gateway/_window.c reads arrays as buffers: only ndarrays, native float64 (float32 for rows),
    # aligned, contiguous where it needs it, writable where it writes; anything else is declined
    # (None), never read in the wrong element type, order or stride, nor written read-only.
    zrow, follow = compiled("zrow"), compiled("follow")
    features, dense_row = compiled("features"), compiled("dense_row")
    assert None not in (zrow, follow, features, dense_row), "not built here: bash .ci/setup test"
    x, ones = np.arange(3.0), np.ones(3)
    unaligned = np.zeros(8 * 3 + 1, np.uint8)[1:].view(np.float64)
    for odd in (
        x.astype(">f8"),
        x.astype(np.float32),
        x.astype(np.int64),
        unaligned,
        x.data,  # a buffer, not an ndarray
        x.tolist(),
    ):
        assert zrow(odd, x, ones) is None, odd
        assert features([odd], [odd]) is None, odd
    frozen = x.copy()
    frozen.flags.writeable = False
    assert follow(x, frozen, ones, None, None) is None
    assert (frozen == x).all()
    assert follow(x, x.copy(), ones, None, None) is True
    layers = ((np.ones((3, 1)), np.zeros(1), 0),)
    assert dense_row(x.astype(np.float32), layers).tolist() == [3.0]
    assert dense_row(x.astype(">f4"), layers) is None
    assert dense_row(np.ones((3, 2))[:, 0], layers) is None  # strided row
    assert dense_row(x, ((np.asfortranarray(np.ones((3, 2))), np.zeros(2), 0),)) is None
    t = np.arange(10.0)
    (got,) = features([t[::-2]], [2 * t[::-2]])  # strided, reversed columns are read as such
    assert got["slope"] == 2.0
    assert got["mean"] == 10.0


def test_a_build_of_other_sources_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # An older install's module (another WINDOW_VERSION) must not serve these paths.
    module = importlib.import_module("gateway._window")
    assert compiled("zrow") is module.zrow
    monkeypatch.setattr(module, "VERSION", module.VERSION + 1)
    assert compiled("zrow") is None


@pytest.mark.parametrize("name", NEURAL)
def test_compiled_occlusion_scores_the_probes_the_runner_would_build(name: str) -> None:
    # DenseBackend.occlusion scores each row's probes (input i at 0, then the row itself) without
    # building them: each score is the window-at-a-time score of that probe, to the bit, and the
    # textbook layers' within 1e-12; an input already at 0 loses exactly nothing.
    card, backend, layers, _ = _opened(name)
    n, clip = card.n_inputs, card.normalisation.clip
    rng = np.random.default_rng(8)
    z = rng.standard_normal((40, n)) * 5
    z[::4, 0] = 0.0
    got = backend.occlusion(z, clip)
    assert got is not None, "gateway/_window.c is not built here: bash .ci/setup test"
    assert got.shape == (40, n + 1)
    probe = np.repeat(np.clip(z, -clip, clip), n + 1, axis=0).reshape(40, n + 1, n)
    probe[:, np.arange(n), np.arange(n)] = 0.0
    rows = probe.reshape(40 * (n + 1), n).astype(np.float32)
    alone = np.array([backend.run(rows[i : i + 1])[0] for i in range(len(rows))]).reshape(40, n + 1)
    assert got.tolist() == alone.tolist()
    np.testing.assert_allclose(
        got.reshape(-1), _forward(rows.astype(np.float64), layers), rtol=0.0, atol=1e-12
    )
    np.testing.assert_allclose(got.reshape(-1), backend.run(rows), rtol=0.0, atol=DENSE_BATCH1_TOLERANCE)
    assert (got[::4, 0] == got[::4, n]).all()


@pytest.mark.parametrize("name", NEURAL)
def test_layers_exported_once_score_as_the_layers_do(name: str) -> None:
    # DenseBackend exports its layers once at load (dense_net) instead of at every window: the
    # held handle gives the same scores and occlusion scores to the bit as the layers passed per
    # call, keeps its arrays alive without them, and declines what the layers decline.
    dense_net, dense_row, occlusion = (
        compiled("dense_net"),
        compiled("dense_row"),
        compiled("dense_occlusion"),
    )
    assert None not in (dense_net, dense_row, occlusion), "not built here: bash .ci/setup test"
    card, backend, layers, _ = _opened(name)
    n, clip = card.n_inputs, card.normalisation.clip
    packed = tuple((w.copy(), b.copy(), backends.DENSE_ACTIVATIONS.index(a)) for w, b, a in layers)
    net = dense_net(packed)
    assert net is not None
    assert not isinstance(net, tuple)
    rng = np.random.default_rng(5)
    rows = np.clip(rng.standard_normal((200, n)) * 4, -clip, clip).astype(np.float32)
    by_layers = [dense_row(rows[i : i + 1], packed)[0] for i in range(len(rows))]
    by_net = [dense_row(rows[i : i + 1], net)[0] for i in range(len(rows))]
    assert by_net == by_layers
    assert occlusion(rows[:20].astype(np.float64), clip, net).tolist() == (
        occlusion(rows[:20].astype(np.float64), clip, packed).tolist()
    )
    assert backend.run(rows[:1]).tolist() == [by_net[0]]
    del packed  # the handle holds the weights: nothing else does now
    for w, _, _ in layers:
        w[...] = np.nan  # the originals, overwritten: the handle reads its own copies' buffers
    assert [dense_row(rows[i : i + 1], net)[0] for i in range(len(rows))] == by_layers
    assert dense_row(rows[:1, :-1], net) is None  # a row of another width
    assert dense_row(rows[:1], object()) is None
    wide = ((np.ones((n, 2)), np.zeros(2), 0),)  # two outputs at the end
    assert dense_net(wide) is None
    assert dense_net(((np.ones((n, 2))[:, :1], np.zeros(1), 0),)) is None  # strided weights
    assert dense_net(((np.ones((n, 1)), np.zeros(1), 0),)) is not None
