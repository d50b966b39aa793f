"""The per-machine novelty detector on SKAB valve1, nested cross-validation by file.

Run: ``python -m models.recipes.novelty_skab --data /work/shared/data`` (about a minute).

Each file is its own machine: the detector is fitted on that file's first 400 rows only (SKAB's
anomaly-free commissioning span), on the gateway's window features (those of
:mod:`models.recipes.pump_skab`: mean and std per signal, std only for the two temperatures), and
scores rows 400.. with its own limits (1 % false alarms out of fold).  No label is used to fit.
Settings (window length, EWMA weight, variance kept) are chosen by F1 on the 12 training files of
each outer fold (4 folds of 4 files) and reported on the 4 held-out files, pooled; the anomaly-free
recording (8 pseudo-machines) gives the false-alarm rate and false episodes per hour.  SKAB here
holds only valve faults, so this measures generalisation across files, not across fault kinds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.inference.novelty import PcaSpec, fit_pca, prepare, score_rows
from models.recipes.common import MODELS_DIR, binary_scores
from models.recipes.novelty_tep import false_episodes
from models.recipes.pump_skab import FIT_ROWS, Experiment, load, window_features

log = logging.getLogger(__name__)

B = npt.NDArray[np.bool_]
GRID_W = (10, 20, 40)
GRID_EWMA = (1.0, 0.5, 0.2)
GRID_VAR = (0.8, 0.9, 0.95)
FOLDS = 4


def flags(e: Experiment, w: int, ewma: float, var: float) -> tuple[B, B]:
    """Flags and labels of rows FIT_ROWS.. of one file, the detector fitted on its rows before."""
    f = window_features(e.x, w)
    fit = fit_pca(f[w - 1 : FIT_ROWS], PcaSpec(ewma=ewma, var_keep=var, far=0.01))
    s = score_rows(fit, prepare(f[w - 1 :], fit.mean, fit.std, fit.spec))[0]
    return s[FIT_ROWS - (w - 1) :] > 1.0, e.y[FIT_ROWS:]


def pooled(files: list[Experiment], setting: tuple[int, float, float]) -> dict[str, float]:
    """F1, FAR, MAR pooled over files."""
    got = [flags(e, *setting) for e in files]
    return binary_scores(np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got]))


def main(argv: list[str] | None = None) -> int:
    """Nested cross-validation by file; writes models/novelty_skab.eval.json."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.novelty_skab", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    valve, normal = load(args.data)
    grid = list(itertools.product(GRID_W, GRID_EWMA, GRID_VAR))
    per_file: dict[int, dict[tuple[int, float, float], tuple[B, B]]] = {
        i: {g: flags(e, *g) for g in grid} for i, e in enumerate(valve)
    }
    held_flags: list[B] = []
    held_truth: list[B] = []
    folds: dict[str, Any] = {}
    for k in range(FOLDS):
        test = list(range(k * 4, k * 4 + 4))
        train = [i for i in range(16) if i not in test]

        def f1(g: tuple[int, float, float], files: list[int]) -> float:
            p = np.concatenate([per_file[i][g][0] for i in files])
            t = np.concatenate([per_file[i][g][1] for i in files])
            return binary_scores(p, t)["f1"]

        best = max(grid, key=lambda g: f1(g, train))
        folds[f"fold{k}"] = {
            "window": best[0],
            "ewma": best[1],
            "var_keep": best[2],
            "inner_f1": round(f1(best, train), 4),
        }
        held_flags += [per_file[i][best][0] for i in test]
        held_truth += [per_file[i][best][1] for i in test]
    nested = binary_scores(np.concatenate(held_flags), np.concatenate(held_truth))
    # The setting most folds chose, on the anomaly-free pseudo-machines.
    votes = [(f["window"], f["ewma"], f["var_keep"]) for f in folds.values()]
    common = max(set(votes), key=votes.count)
    free = [flags(e, *common)[0] for e in normal]
    hours = sum(len(fl) for fl in free) / 3600.0
    result = {
        "nested_by_file": {k: round(v, 4) for k, v in nested.items()},
        "folds": folds,
        "anomaly_free": {
            "setting": list(common),
            "far": round(float(np.mean(np.concatenate(free))), 4),
            "false_episodes_per_hour": round(sum(false_episodes(fl) for fl in free) / hours, 2),
            "hours": round(hours, 2),
        },
    }
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    (args.out / "novelty_skab.eval.json").write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
