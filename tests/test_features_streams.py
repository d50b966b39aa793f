"""The one-pass features of a window's streams against the per-stream function they replace.

``basic_features_streams`` sums in another order than ``basic_features_finite`` (segment reductions
instead of pairwise sums and BLAS dot products), so values may differ in the last bits: they must
stay within 1e-12, carry the same keys in the same order, and change no record on the wire and
no model verdict.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gateway.contracts import ModelResult, StreamFeatures, WindowRecord
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel
from gateway.pipeline.features import basic_features, basic_features_finite, basic_features_streams
from gateway.pipeline.windows import Windower
from gateway.records.codec import encode
from gateway.records.model import FeaturesWindow, StreamWindow
from gateway.sample import MDC, UNUSABLE_FLAGS, Quality, Sample, Stream, industrial_metric

F8 = npt.NDArray[np.float64]

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from bench_models import PUMP, VITALS  # noqa: E402 - the signals the benchmark scores too

REL = 1e-12


def _close(a: dict[str, float], b: dict[str, float], scale: float) -> bool:
    """Same keys in the same order, values within REL (absolute REL x scale near zero)."""
    return list(a) == list(b) and all(math.isclose(a[k], b[k], rel_tol=REL, abs_tol=REL * scale) for k in a)


def _scale(t: F8, v: F8) -> float:
    if v.size == 0:
        return 1.0
    span = float(t.max() - t.min()) if t.size > 1 else 1.0
    return max(float(np.abs(v).max()), 1e-300) / max(span, 1e-9) + float(np.abs(v).max())


def _random_window(rng: np.random.Generator) -> tuple[list[F8], list[F8]]:
    ts: list[F8] = []
    vs: list[F8] = []
    t0 = rng.uniform(1e3, 2e6)  # monotonic clocks are large: centring must keep the slope exact
    for _ in range(int(rng.integers(1, 12))):
        n = int(rng.choice([0, 1, 2, 3, 7, 8, 9, 16, 20, 30, 31, 256, 1000]))
        rate = float(rng.choice([0.5, 1.0, 25.0, 256.0]))
        t = t0 + np.sort(rng.uniform(0.0, n / rate, n))
        level, sd = rng.uniform(-1e4, 1e4), 10.0 ** rng.uniform(-6, 3)
        kind = rng.integers(4)
        if kind == 0:
            v = np.full(n, level)  # a constant: std and slope exactly 0
        elif kind == 1:
            v = level + sd * rng.standard_normal(n)
        elif kind == 2:
            v = level + sd * (t - t0) + 0.01 * sd * rng.standard_normal(n)  # a ramp
        else:
            v = np.round(level + sd * rng.standard_normal(n))  # integers, ties for min/max
        ts.append(t)
        vs.append(v)
    return ts, vs


def test_one_pass_matches_the_per_stream_function_on_random_windows() -> None:
    rng = np.random.default_rng(20261203)
    checked = 0
    for _ in range(1500):
        ts, vs = _random_window(rng)
        got = basic_features_streams(ts, vs)
        assert len(got) == len(vs)
        for t, v, g in zip(ts, vs, got, strict=True):
            ref = basic_features_finite(t, v)
            assert _close(g, ref, _scale(t, v)), (g, ref)
            if v.size and v.min() == v.max():
                assert g == ref  # constants are exact: mean clamped, std 0, slope 0
            assert g["min"] == ref["min"] if v.size else g == {}
            checked += 1
    assert checked > 5000


def test_one_pass_edge_cases() -> None:
    t = 1e6 + np.arange(5.0)
    same_t = np.full(4, 1e6)
    cases: list[tuple[F8, F8]] = [
        (np.empty(0), np.empty(0)),
        (t[:1], np.array([42.0])),  # one point: no slope
        (same_t, np.array([1.0, 2.0, 3.0, 4.0])),  # no time spread: no slope
        (t, np.full(5, 0.1)),  # 0.1 * 5 / 5 is not 0.1 in floating point; the mean must be
        (t, np.array([1e120, -1e120, 1e120, -1e120, 0.0])),  # huge: the per-stream path
        (t, 3.0 + 2.0 * (t - t[0])),
    ]
    got = basic_features_streams([c[0] for c in cases], [c[1] for c in cases])
    for (tt, vv), g in zip(cases, got, strict=True):
        assert _close(g, basic_features_finite(tt, vv), _scale(tt, vv))
    assert got[0] == {}
    assert "slope" not in got[1]
    assert "slope" not in got[2]
    assert got[3] == {"mean": 0.1, "std": 0.0, "min": 0.1, "max": 0.1, "slope": 0.0}
    assert got[5]["slope"] == pytest.approx(2.0, rel=1e-9)
    # One stream among empty ones is the per-stream function itself: bit for bit.
    one = basic_features_streams([np.empty(0), t], [np.empty(0), np.sin(t)])
    assert one == [{}, basic_features_finite(t, np.sin(t))]


# ---- through the windower: records on the wire and model verdicts ---------------------------

T0 = 5000.0
WALL = 1.7e9
Rows = dict[Stream, list[tuple[float, float, int]]]


def _run(
    streams: list[tuple[Stream, float, float, float]], seconds: float, window_s: float, seed: int
) -> tuple[list[WindowRecord], Rows]:
    """Windows of noisy signals with unusable and non-finite rows sprinkled in, and the rows fed."""
    w = Windower(window_s=window_s, hop_s=window_s, grace_s=0.5, lost_after_s=600.0, on_alarm=lambda a: None)
    rows: Rows = {s: [] for s, *_ in streams}
    rng = np.random.default_rng(seed)
    for s, rate, level, sd in streams:
        n = int(seconds * rate)
        times = T0 + np.arange(n) / rate + rng.uniform(0.0, 0.2 / rate, n)
        values = level + sd * rng.standard_normal(n)
        for i in range(n):
            q = int(Quality.ARTIFACT) if rng.random() < 0.02 else 0
            rows[s].append((float(times[i]), math.nan if rng.random() < 0.01 else float(values[i]), q))
    records: list[WindowRecord] = []
    due = T0 + window_s
    for t, s, v, q in sorted(((t, s, v, q) for s, rs in rows.items() for t, v, q in rs), key=lambda r: r[0]):
        if t >= due:  # close as the pipeline does, window by window
            records += w.close_due(t, WALL + t)
            due += window_s
        w.put(Sample(s, t, WALL + t, v, Quality(q)))
    end = T0 + seconds + 5.0
    return records + w.close_due(end, WALL + end), rows


def _per_stream(rec: WindowRecord, rows: Rows) -> list[dict[str, float]]:
    """The per-stream function on each stream's usable rows of the window (the path before)."""
    start, end = rec.end_mono - rec.length_s, rec.end_mono
    out = []
    for sf in rec.streams:
        got = [(t, v) for t, v, q in rows[sf.stream] if start <= t < end and not q & UNUSABLE_FLAGS]
        out.append(basic_features(np.array([r[0] for r in got]), np.array([r[1] for r in got])))
    return out


def _with(rec: WindowRecord, features: list[dict[str, float]]) -> WindowRecord:
    sfs = tuple(
        StreamFeatures(sf.stream, sf.count, sf.missing, f)
        for sf, f in zip(rec.streams, features, strict=True)
    )
    return WindowRecord(rec.subject, rec.kind, rec.index, rec.end_mono, rec.end_wall, rec.length_s, sfs)


def _wire(rec: WindowRecord) -> bytes:
    m = rec.streams[0].stream.metric
    return encode(
        FeaturesWindow(
            rec.subject,
            rec.kind,
            rec.end_wall,
            rec.length_s,
            tuple(
                StreamWindow(sf.stream.metric.name, m.unit, "dev", sf.count, gap=sf.gap, features=sf.features)
                for sf in rec.streams
            ),
        )
    )


def _model(name: str) -> AnomalyModel:
    d = default_models_dir()
    return AnomalyModel(load_card(d / f"{name}{CARD_SUFFIX}"), d, commissioning_windows=10)


@pytest.mark.parametrize("name", ["pump_skab", "vitals_mimic"])
def test_windows_records_and_verdicts_unchanged(name: str) -> None:
    if name == "pump_skab":
        streams = [
            (
                Stream("plc", "pump-0", "SN-1", industrial_metric(f"Pump1/{m}", u), "industrial", 1.0),
                1.0,
                lvl,
                0.01 * lvl,
            )
            for m, u, lvl in PUMP
        ]
        window_s, seconds = 20.0, 1200.0
    else:
        streams = [
            (Stream("mon", "bed-0", "SN-2", MDC[m], "medical", 1.0), 1.0, lvl, sd) for m, lvl, sd in VITALS
        ]
        window_s, seconds = 30.0, 1800.0
    records, rows = _run(streams, seconds, window_s, seed=7)
    assert len(records) >= seconds / window_s - 1
    new_model, old_model = _model(name), _model(name)
    new_results: list[ModelResult] = []
    old_results: list[ModelResult] = []
    for rec in records:
        ref = _per_stream(rec, rows)
        for sf, f in zip(rec.streams, ref, strict=True):
            assert _close(dict(sf.features), f, 1e3), (sf.stream.key, sf.features, f)
        before = _with(rec, ref)
        assert _wire(rec) == _wire(before)
        new_results.extend(new_model.score_batch([rec]))
        old_results.extend(old_model.score_batch([before]))
    assert new_results == old_results
    verdicts = {r.verdict for r in new_results}
    assert "normal" in verdicts  # scored by the model, not only commissioning
