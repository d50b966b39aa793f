"""A fusion member's windows are explained when their contributions are read, with the same result.

With ``explain_all`` (a model in a ``[[models.fusion]]``) every served window carries its
contributions, but those of windows the model does not flag are computed when first read: the
occlusion runs the model once per input and cost twice the rest of the window, while a fusion
reads them only for the windows it flags.  They must equal, to the bit, what the model gives a
window it flags, and may be read from another thread while the model scores.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np

from gateway.contracts import ModelResult, StreamFeatures, WindowRecord
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel
from gateway.pipeline.features import basic_features_streams
from gateway.sample import MDC, Stream

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from bench_models import VITALS  # the signals the benchmark scores too


def _batches(n: int) -> list[list[WindowRecord]]:
    streams = [Stream("mon", "bed-1", "SN-1", MDC[m], "medical", 1.0) for m, _, _ in VITALS]
    rng = np.random.default_rng(11)
    t = np.arange(30, dtype=np.float64)
    out: list[list[WindowRecord]] = []
    for k in range(n):
        raw = [lvl + sd * rng.standard_normal(30) for _, lvl, sd in VITALS]
        if k % 7 == 0:
            raw[0] = raw[0] + rng.uniform(10.0, 40.0)  # a heart rate off its normal: some flagged
        feats = basic_features_streams([t] * len(raw), raw)
        sfs = tuple(StreamFeatures(st, 30, 0.0, f) for st, f in zip(streams, feats, strict=True))
        out.append([WindowRecord("bed-1", "medical", k, 30.0 * k, 30.0 * k, 30.0, sfs)])
    return out


def _model(threshold: float | None = None) -> AnomalyModel:
    d = default_models_dir()
    return AnomalyModel(load_card(d / f"vitals_mimic{CARD_SUFFIX}"), d, backend="numpy", threshold=threshold)


def test_unflagged_windows_are_explained_as_flagged_ones_are() -> None:
    fused = _model()
    fused.explain_all = True
    every = _model(threshold=-1.0)  # flags every served window: explained at once, in the batch
    got: list[ModelResult] = []
    want: list[ModelResult] = []
    for batch in _batches(120):
        got += fused.score_batch(batch)
        want += every.score_batch(batch)
    assert any(r.anomaly for r in got)
    assert any(not r.anomaly and not r.reason for r in got)
    for g, w in zip(got, want, strict=True):
        assert g.score == w.score
        assert dict(g.contributions) == dict(w.contributions)
        assert dict(g.contributions)  # every served window is explained


def test_contributions_can_be_read_in_another_thread_while_the_model_scores() -> None:
    fused = _model()
    fused.explain_all = True
    batches = _batches(200)
    first = [r for b in batches[:100] for r in fused.score_batch(b)]
    read: list[dict[str, float]] = []

    def reader() -> None:
        read.extend(dict(r.contributions) for r in first)

    th = threading.Thread(target=reader, name="contributions-reader")
    th.start()
    for b in batches[100:]:
        fused.score_batch(b)
    th.join(timeout=60)
    assert not th.is_alive()
    every = _model(threshold=-1.0)
    want = [dict(r.contributions) for b in batches[:100] for r in every.score_batch(b)]
    assert read == want
