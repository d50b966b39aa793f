"""The novelty detector as a fusion member explains a window only when the fused result carries it.

With ``explain_all`` (the detector in a ``[[models.fusion]]``) a window it flags is explained when
scored, as alone; a window it does not flag is explained when the fusion reads its contributions
(a fused anomaly), never for a window whose fused verdict is normal.  What is read must equal, to
the bit, what the detector computed at once before: the T² and SPE decomposition of that window's
own row, though later windows moved the CUSUM's sums, the smoothing and the adapted means.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import numpy as np

from gateway.contracts import ModelResult, WindowRecord
from gateway.inference.fusion import FusionCard, FusionModel
from gateway.inference.novelty import NoveltyModel, NoveltyUse, contributions
from models.recipes.novelty_tep import machine_rows, window_records

USE = NoveltyUse(commissioning_s=150.0, cusum_k=1.0)  # the CUSUM's sums and adaptation move on
COMMISSION, NORMAL, FAULT = 150, 200, 100
#: A fusion of a scripted member and the detector: the member's high scores raise fused
#: anomalies on windows the detector alone finds normal.
CARD = FusionCard.model_validate(
    {
        "name": "duo",
        "version": "1.0.0",
        "subject_kind": "industrial",
        "members": [
            {"model": "alpha", "transform": "log_odds", "threshold": 0.5, "weight": 1.0, "scale": 1.0},
            {"model": "novelty", "transform": "log", "weight": 1.0, "scale": 1.0},
        ],
        "tau": 0.0,
    }
)


def _windows() -> list[WindowRecord]:
    x = machine_rows(COMMISSION + NORMAL + FAULT, np.random.default_rng(5), fault_from=COMMISSION + NORMAL)
    return window_records(x)


def _alpha(i: int) -> ModelResult:
    """The scripted member: high on every 25th normal window, neutral on the fault, low elsewhere."""
    score = 0.5 if i >= COMMISSION + NORMAL else 0.95 if i % 25 == 0 else 0.05
    return ModelResult(score, False, {"Pump1/Vibration.rms": 1.0})


@contextmanager
def _counting(calls: list[int]) -> Iterator[None]:
    """Count calls of the detector's decomposition in this thread (observed, not replaced)."""
    code = contributions.__code__

    def seen(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            calls[0] += 1

    sys.setprofile(seen)
    try:
        yield
    finally:
        sys.setprofile(None)


def _score(model: NoveltyModel, windows: Sequence[WindowRecord], batch: int) -> list[ModelResult]:
    out: list[ModelResult] = []
    for k in range(0, len(windows), batch):
        out += model.score_batch(windows[k : k + batch])
    return out


def test_a_window_leaving_with_a_normal_fused_verdict_is_never_explained() -> None:
    windows = _windows()
    model = NoveltyModel(USE, hop_s=1.0)
    model.explain_all = True
    scored = [0]
    with _counting(scored):
        results = _score(model, windows, batch=10)
    judged = [r for r in results if not r.reason]
    alone = sum(r.anomaly for r in judged)
    assert len(judged) > NORMAL
    assert 0 < alone < len(judged) // 2
    # Only the windows the detector flags alone were explained while scoring (every judged one before).
    assert scored[0] == alone
    assert model.explained == alone

    fusion = FusionModel(CARD)
    read = [0]
    with _counting(read):
        fused = [fusion.fuse({"alpha": _alpha(i), "novelty": r}) for i, r in enumerate(results)]
    carried = [i for i, f in enumerate(fused) if f.anomaly and not results[i].anomaly]
    normal = [i for i, f in enumerate(fused) if f.verdict == "normal"]
    assert carried
    assert normal
    # The fused anomalies the detector did not flag alone were explained when the fusion read them.
    assert read[0] == len(carried)
    assert model.explained == alone + len(carried)


def test_the_fused_anomaly_names_the_same_inputs_as_when_every_window_was_explained_at_once() -> None:
    windows = _windows()
    late = NoveltyModel(USE, hop_s=1.0)
    late.explain_all = True
    got = _score(late, windows, batch=10)  # read only after every window was scored
    at_once = NoveltyModel(USE, hop_s=1.0)
    at_once.explain_all = True
    want: list[ModelResult] = []
    for window in windows:
        r = at_once.score_batch([window])[0]
        want.append(ModelResult(r.score, r.anomaly, dict(r.contributions), r.fallback, r.reason))
    assert at_once.explained == sum(1 for r in want if not r.reason)
    fusion = FusionModel(CARD)
    carried = 0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g.score, g.anomaly, g.reason) == (w.score, w.anomaly, w.reason)
        fg = fusion.fuse({"alpha": _alpha(i), "novelty": g})
        fw = fusion.fuse({"alpha": _alpha(i), "novelty": w})
        assert (fg.score, fg.anomaly, fg.reason) == (fw.score, fw.anomaly, fw.reason)
        assert list(fg.contributions.items()) == list(fw.contributions.items())
        if fg.anomaly and not g.anomaly:
            carried += 1
            assert dict(g.contributions) == w.contributions
            # The detector's inputs are named beside the scripted member's.
            assert any(k.startswith("Pump1/") for k in fg.contributions)
            assert "Pump1/Vibration.rms" in fg.contributions
    assert carried > 0


def test_contributions_read_on_another_thread_while_the_detector_scores_are_those_computed_at_once() -> None:
    windows = _windows()
    split = COMMISSION + NORMAL // 2
    model = NoveltyModel(USE, hop_s=1.0)
    model.explain_all = True
    first = _score(model, windows[:split], batch=5)
    read: list[dict[str, float]] = []

    def reader() -> None:
        read.extend(dict(r.contributions) for r in first)

    th = threading.Thread(target=reader, name="contributions-reader")
    th.start()
    rest = _score(model, windows[split:], batch=5)
    th.join(timeout=60)
    assert not th.is_alive()
    at_once = NoveltyModel(USE, hop_s=1.0)
    at_once.explain_all = True
    want = [dict(at_once.score_batch([w])[0].contributions) for w in windows[:split]]
    assert read == want
    assert any(read)
    # Every judged window of the first part explained once (none twice), and the flagged ones of the rest.
    judged = sum(1 for r in first if not r.reason)
    assert model.explained == judged + sum(r.anomaly for r in rest)
