"""The SKAB fusion evaluation (``models/recipes/fusion_skab.py``): the recorded choices keep the
protocol, and one held-out fold is reproduced from the shared data (where it exists)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_support import DATA

from models.recipes.common import MODELS_DIR, binary_scores
from models.recipes.fusion_skab import EPS, FOLDS, MAX_FAR, WEIGHTS, pump_scores
from models.recipes.novelty_skab import pca_scores
from models.recipes.pump_skab import FIT_ROWS, load, window_features

EVAL = MODELS_DIR / "fusion_skab.eval.json"
SKAB = DATA / "industrial" / "skab" / "data" / "valve1"


@pytest.mark.parametrize("variant", ["frozen", "following_baseline", "following_same_window"])
def test_the_recorded_choices_keep_the_protocol(variant: str) -> None:
    ev = json.loads(EVAL.read_text(encoding="utf-8"))
    if variant != "frozen":
        ev = ev[variant]
    assert len(ev["folds"]) == FOLDS
    for fold in ev["folds"]:
        assert fold["pump"]["weight_pump"] == 1.0
        assert fold["pca"]["weight_pump"] == 0.0
        for cand in ("pump", "pca", "fusion"):
            assert fold[cand]["weight_pump"] in WEIGHTS
            # Chosen on the training files within the false-alarm bound.
            assert fold[cand]["inner"]["far"] <= MAX_FAR
        # The fusion's family holds both parts alone (a = 1, a = 0): on the training files it is
        # at least as good as either.
        inner = {c: fold[c]["inner"]["f1"] for c in ("pump", "pca", "fusion")}
        assert inner["fusion"] >= max(inner["pump"], inner["pca"])
    held = ev["nested_by_file"]
    # The pooled held-out figures are the folds' held-out flags pooled: never better than the
    # best fold nor worse than the worst.
    for cand in ("pump", "pca", "fusion"):
        f1s = [fold[cand]["held_out"]["f1"] for fold in ev["folds"]]
        assert min(f1s) - 1e-9 <= held[cand]["f1"] <= max(f1s) + 1e-9


@pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB valve1 not found under {DATA} (set EDGETWIN_DATA)")
def test_the_first_held_out_fold_is_reproduced_from_the_shared_data() -> None:
    ev = json.loads(EVAL.read_text(encoding="utf-8"))
    rec = ev["folds"][0]
    valve, normal = load(SKAB.parent.parent.parent.parent)
    test = [i for i in range(16) if i % FOLDS == 0]
    train = [i for i in range(16) if i % FOLDS != 0]
    c = rec["fusion"]
    w_pump = rec["pump_window_s"]
    w, ewma, var = c["novelty_setting"]
    up = pump_scores(train, test, valve, normal, w_pump)
    flags, truth = [], []
    for i in test:
        f = window_features(valve[i].x, w)
        u_pca = np.log(np.maximum(pca_scores(f, w, ewma, var)[FIT_ROWS - (w - 1) :], EPS))
        a = c["weight_pump"]
        flags.append(a * up[i] / c["scale_pump"] + (1 - a) * u_pca / c["scale_pca"] > c["tau"])
        truth.append(valve[i].y[FIT_ROWS:])
    got = binary_scores(np.concatenate(flags), np.concatenate(truth))
    for m in ("f1", "far", "mar"):
        assert got[m] == pytest.approx(c["held_out"][m], abs=2e-4)


@pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB valve1 not found under {DATA} (set EDGETWIN_DATA)")
def test_one_held_out_fold_is_reproduced_through_the_gateway(tmp_path: Path) -> None:
    """Fold 1's recorded choices, its held-out files replayed through windower, models and fusion."""
    from models.recipes.fusion_skab_gateway import held_out  # noqa: PLC0415 - needs the training extra

    ev = json.loads(EVAL.read_text(encoding="utf-8"))["gateway_path"]
    rec = ev["folds"][1]
    valve, normal = load(SKAB.parent.parent.parent.parent)
    flags, _ = held_out(1, rec, valve, normal, tmp_path)
    truth = np.concatenate([valve[i].y[FIT_ROWS:] for i in range(16) if i % FOLDS == 1])
    for name in ("fusion", "fusion_episodes", "pump", "novelty"):
        got = binary_scores(np.concatenate(flags[name]), truth)
        for m in ("f1", "far", "mar"):
            assert got[m] == pytest.approx(rec["held_out"][name][m], abs=2e-4), (name, m)
    # The fused verdict beats either member alone on this fold's held-out files or ties the best.
    assert rec["held_out"]["fusion"]["f1"] >= min(
        rec["held_out"]["pump"]["f1"], rec["held_out"]["novelty"]["f1"]
    )
