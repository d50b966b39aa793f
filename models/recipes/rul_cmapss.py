"""Machine health index and remaining useful life on NASA C-MAPSS FD001, with an interval.

Run: ``python -m models.recipes.rul_cmapss --data /work/shared/data`` (a few seconds).

Data: ``industrial/cmapss_fd001`` - 100 training engines run to failure, 100 test engines cut
short with their true RUL.  Inputs: the 14 sensors that move in FD001 (2, 3, 4, 7, 8, 9, 11, 12,
13, 14, 15, 17, 20, 21), standardised on the training engines; per cycle the mean of the last 5
and the least-squares slope over the last ``WINDOW`` cycles of each (fewer at an engine's start),
plus their squares.  Target: RUL capped at ``CAP`` cycles (the usual piecewise-linear target of
the published baselines: an engine far from failure shows no wear).  Model: ridge regression
(closed form, numpy only), the penalty chosen by 5-fold cross-validation over training engines.
Health index: predicted RUL / ``CAP`` (1 healthy, 0 failed).  Interval: split-conformal - the
90 % quantile of the absolute error on held-out training engines (each engine's last cycle
sampled at random truncations, as the test set is), reported with its coverage on the test set.
Score: RMSE on the test set's last cycles against ``RUL_FD001.txt``, next to the published
baselines (Babu et al. 2016; Zheng et al. 2017; Li et al. 2018).

The graph ships three ways (:func:`serving_fields`): ONNX, ``.tflite`` (fp32 op for op, int8 by
LiteRT's quantizer calibrated on the training cycles; :mod:`models.recipes.tflite`) and the
ridge's constants for numpy (``.ridge.npz``), each checked against the ONNX estimates on every
test cycle; the card's backend is the leanest within 10 us a call of the fastest, measured through
the gateway's own loader.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.estimation.rul import RIDGE_ARRAYS, cycle_features, load_rul_model
from models.recipes.common import file_entry, graph_onnx, rounded, session, write_card, write_npz

F64 = npt.NDArray[np.float64]
SENSORS = (2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21)
WINDOW = 30
RECENT = 5
CAP = 125.0
#: C-MAPSS names of the sensors above (Saxena et al. 2008), the model's inputs as the card names them.
NAMES = ("T24", "T30", "T50", "P30", "Nf", "Nc", "Ps30", "phi", "NRf", "NRc", "BPR", "htBleed", "W31", "W32")
STEM = "rul_cmapss"
SEED = 4
LAMBDAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: Published FD001 test RMSE (cycles), same capped target.
BASELINES = {
    "MLP (Babu et al. 2016)": 37.56,
    "SVR (Babu et al. 2016)": 20.96,
    "RVR (Babu et al. 2016)": 23.80,
    "CNN (Babu et al. 2016)": 18.45,
    "LSTM (Zheng et al. 2017)": 16.14,
    "DCNN (Li et al. 2018)": 12.61,
}


def load(path: Path) -> dict[int, F64]:
    """Per engine: its rows (cycle, settings, sensors), in cycle order."""
    a = np.loadtxt(path)
    return {int(u): a[a[:, 0] == u][:, 1:] for u in np.unique(a[:, 0])}


def raw_features(rows: F64) -> F64:
    """The model's raw inputs at every cycle of one engine (what the gateway computes per cycle)."""
    x = rows[:, [s + 3 for s in SENSORS]]
    return np.vstack([cycle_features(x[max(0, k - WINDOW + 1) : k + 1], RECENT) for k in range(len(x))])


def design(raw: F64, mu: F64, sd: F64) -> F64:
    """Raw inputs standardised (the slope by the sensor's SD), with their squares and a constant."""
    z = (raw - np.concatenate([mu, np.zeros_like(mu)])) / np.concatenate([sd, sd])
    return np.hstack([z, z**2, np.ones((len(z), 1))])


def features(rows: F64, mu: F64, sd: F64) -> F64:
    """One feature row per cycle of one engine (see the module docstring)."""
    return design(raw_features(rows), mu, sd)


def ridge(x: F64, y: F64, lam: float) -> F64:
    """Ridge coefficients (the constant column is not penalised)."""
    pen = lam * np.eye(x.shape[1])
    pen[-1, -1] = 0.0
    return np.asarray(np.linalg.solve(x.T @ x + pen, x.T @ y), dtype=np.float64)


def rul_onnx(coef: F64, mu: F64, sd: F64) -> bytes:
    """The ridge as an ONNX graph on raw inputs: standardise, square, weigh, clip to [0, CAP]."""
    from onnx import helper, numpy_helper  # noqa: PLC0415 - training-only dependency

    k = 2 * len(SENSORS)
    inits = [
        numpy_helper.from_array(np.concatenate([mu, np.zeros_like(mu)]).astype(np.float32), "shift"),
        numpy_helper.from_array(np.concatenate([sd, sd]).astype(np.float32), "scale"),
        numpy_helper.from_array(coef[:-1].reshape(-1, 1).astype(np.float32), "W"),
        numpy_helper.from_array(coef[-1:].astype(np.float32), "B"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(CAP, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Sub", ["x", "shift"], ["xc"]),
        helper.make_node("Div", ["xc", "scale"], ["z"]),
        helper.make_node("Mul", ["z", "z"], ["z2"]),
        helper.make_node("Concat", ["z", "z2"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "W"], ["fw"]),
        helper.make_node("Add", ["fw", "B"], ["y"]),
        helper.make_node("Clip", ["y", "lo", "hi"], ["rul"]),
    ]
    return graph_onnx(nodes, inits, name=STEM, inp=("x", k), out="rul")


def export_ridge(onnx_path: Path, ref_x: F64, ref_y: F64) -> Path:
    """``rul_cmapss.fp32.ridge.npz``: the graph's own constants, and reference rows with their ONNX estimates."""
    import onnx  # noqa: PLC0415 - training-only dependency
    from onnx import numpy_helper  # noqa: PLC0415

    consts = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    arrays = {k: np.asarray(consts[k], np.float32) for k in RIDGE_ARRAYS[:6]}
    arrays["ref_x"], arrays["ref_y"] = np.asarray(ref_x, np.float32), np.asarray(ref_y, np.float64)
    return write_npz(onnx_path.with_name(f"{STEM}.fp32.ridge.npz"), arrays)


_RSS_PROBE = """
import sys, numpy as np
from pathlib import Path
from gateway.estimation.rul import load_rul_model
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
directory, name, kind, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
base = rss()
load_rul_model(directory, name, backend=kind).predict(np.zeros(n))
print(base, rss())
"""


def process_growth_mb(directory: Path, kind: str) -> float:
    """MB a fresh interpreter (numpy and the RUL module loaded) grows by loading the model on ``kind`` and estimating once."""
    from models.recipes.tflite import probe_growth_mb  # noqa: PLC0415 - training-only

    return probe_growth_mb(_RSS_PROBE, str(directory), STEM, kind, str(2 * len(SENSORS)))


def serving_fields(
    card: dict[str, Any], out: Path, calib: F64, rows: F64, last: F64, truth: F64
) -> dict[str, Any]:
    """Write the .tflite and numpy files; the card's file entries, backend and their evaluation.

    ``rows``: every cycle of the test engines (the check rows), ``last``: each test engine's last
    cycle, scored against ``truth``.  Each runtime is loaded through the gateway's own loader from a
    card listing every file, timed at one cycle a call (the runtimes taking turns) and its process
    growth measured in a fresh interpreter.
    """
    from models.recipes.dense import SAME_SPEED_US, choose_backend  # noqa: PLC0415 - training-only
    from models.recipes.tflite import alternated_us, export_tflite  # noqa: PLC0415

    onnx_path = out / card["files"]["fp32"]["path"]
    x, x_last = rows.astype(np.float32), last.astype(np.float32)
    (ref,) = session(onnx_path).run(["rul"], {"x": x})
    ref = np.asarray(ref, np.float64).reshape(-1)
    p32, p8 = export_tflite(onnx_path, calib.astype(np.float32), out, STEM)
    pick = np.linspace(0, len(x) - 1, 256).round().astype(int)
    ridge = export_ridge(onnx_path, x[pick], ref[pick])
    full = card | {
        "tflite_files": {"fp32": file_entry(p32), "int8": file_entry(p8)},
        "numpy_files": {"fp32": file_entry(ridge)},
    }
    write_card(full, out)

    def rmse(est: F64) -> float:
        return float(np.sqrt(np.mean((est - truth) ** 2)))

    onnx_rmse = rmse(load_rul_model(out, STEM, backend="onnxruntime").backend.run(x_last))
    checks: dict[str, Any] = {}
    for name, path in (("fp32", p32), ("int8", p8)):
        from models.recipes.tflite import tflite_scores  # noqa: PLC0415

        got = tflite_scores(path.read_bytes(), x)
        checks[name] = {
            "max_abs_diff_vs_onnx_fp32": float(np.abs(got - ref).max()),
            "test_rmse": rmse(tflite_scores(path.read_bytes(), x_last)),
        }
        checks[name]["test_rmse_minus_onnx_fp32"] = checks[name]["test_rmse"] - onnx_rmse
    checks["int8"]["test_rmse_minus_tflite_fp32"] = checks["int8"]["test_rmse"] - checks["fp32"]["test_rmse"]
    models = {k: load_rul_model(out, STEM, backend=k) for k in ("onnxruntime", "litert", "numpy")}
    got = models["numpy"].backend.run(x)
    numpy_check = {
        "max_abs_diff_vs_onnx_fp32": float(np.abs(got - ref).max()),
        "test_rmse": rmse(models["numpy"].backend.run(x_last)),
        "reference_rows": len(pick),
    }
    row = rows[len(rows) // 2]
    times = alternated_us({k: functools.partial(m.predict, row) for k, m in models.items()})
    figures = {
        k: {
            "per_call_us": times[k],
            "process_growth_mb": process_growth_mb(out, k),
        }
        for k in models
    }
    backend = choose_backend({k: {"batch1_us": f["per_call_us"], **f} for k, f in figures.items()})
    choice = f"{backend}: fp32, one cycle a call through the gateway's loader: " + ", ".join(
        f"{k} {f['per_call_us']:.2f} us / {f['process_growth_mb']:.1f} MB" for k, f in figures.items()
    )
    choice += f"; the leanest within {SAME_SPEED_US:g} us of the fastest"
    return {
        **{k: full[k] for k in ("tflite_files", "numpy_files")},
        "backend": backend,
        "litert": {
            "check_rows": len(x),
            **checks,
            "int8_served": False,
            "int8_why": (
                "not served: full-integer quantization gives the input row one scale, and the row holds "
                "recent means in the thousands beside slopes near 0.01"
            ),
        },
        "backends": {"numpy": numpy_check, "measured": figures, "choice": choice},
    }


def degradation(train: dict[int, F64]) -> dict[str, Any]:
    """Per sensor: early-life mean and spread, and the mean shift at failure; the shared shape.

    The simulator's ``engine`` profile (``drivers/sim/engine.py``) draws its engines from these:
    ``base + delta * (exp(g x) - 1) / (exp(g) - 1) + noise * N(0, 1)`` at life fraction ``x``.
    """
    cols = [s + 3 for s in SENSORS]
    early = np.vstack([r[:30][:, cols] for r in train.values()])
    base, noise = early.mean(axis=0), early.std(axis=0)
    delta = np.vstack([r[-5:][:, cols] for r in train.values()]).mean(axis=0) - base
    xs = np.concatenate([np.arange(len(r)) / (len(r) - 1) for r in train.values()])
    ys = np.concatenate([((r[:, cols] - base) / delta).mean(axis=1) for r in train.values()])
    grid = np.arange(1.0, 12.0, 0.25)
    err = [float(np.mean((ys - (np.exp(g * xs) - 1) / (np.exp(g) - 1)) ** 2)) for g in grid]
    lives = [len(r) for r in train.values()]
    return {
        "base": dict(zip(NAMES, base.tolist(), strict=True)),
        "noise": dict(zip(NAMES, noise.tolist(), strict=True)),
        "delta": dict(zip(NAMES, delta.tolist(), strict=True)),
        "shape_g": float(grid[int(np.argmin(err))]),
        "life_cycles": {"min": min(lives), "mean": float(np.mean(lives)), "max": max(lives)},
    }


def main(argv: list[str] | None = None) -> int:
    """Fit, choose the penalty, calibrate the interval, score on the test set; write the report."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.rul_cmapss", description=__doc__)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    root = args.data / "industrial" / "cmapss_fd001"
    train, test = load(root / "train_FD001.txt"), load(root / "test_FD001.txt")
    true_rul = np.loadtxt(root / "RUL_FD001.txt")
    allrows = np.vstack(list(train.values()))[:, [s + 3 for s in SENSORS]]
    mu, sd = allrows.mean(axis=0), allrows.std(axis=0) + 1e-12
    feats = {u: features(r, mu, sd) for u, r in train.items()}
    targets = {u: np.minimum(np.arange(len(r))[::-1].astype(float), CAP) for u, r in train.items()}
    units = np.array(sorted(train))
    rng = np.random.default_rng(SEED)
    folds = np.array_split(rng.permutation(units), 5)
    cv: dict[float, float] = {}
    held_err: dict[float, list[float]] = {}
    for lam in LAMBDAS:
        errs: list[float] = []
        for fold in folds:
            fit = [u for u in units if u not in fold]
            coef = ridge(np.vstack([feats[u] for u in fit]), np.concatenate([targets[u] for u in fit]), lam)
            for u in fold:
                # As the test set: each held-out engine cut at a few random points.
                for cut in rng.integers(WINDOW, len(feats[u]), 5):
                    guess = float(np.clip(feats[u][cut] @ coef, 0.0, CAP))
                    errs.append(guess - float(targets[u][cut]))
        cv[lam] = float(np.sqrt(np.mean(np.square(errs))))
        held_err[lam] = errs
    lam = min(cv, key=lambda k: cv[k])
    half_width = float(np.quantile(np.abs(held_err[lam]), 0.9))
    coef = ridge(np.vstack(list(feats.values())), np.concatenate(list(targets.values())), lam)
    pred = np.array([float(np.clip(features(test[u], mu, sd)[-1] @ coef, 0.0, CAP)) for u in sorted(test)])
    truth = np.minimum(true_rul, CAP)
    err = pred - truth
    result: dict[str, Any] = {
        "lambda": lam,
        "cv_rmse": cv,
        "test_rmse": float(np.sqrt(np.mean(err**2))),
        "test_mae": float(np.mean(np.abs(err))),
        "interval_90_halfwidth": half_width,
        "interval_coverage_test": float(np.mean(np.abs(err) <= half_width)),
        "baselines_rmse": BASELINES,
    }
    onnx_path = args.out / f"{STEM}.onnx"
    onnx_path.write_bytes(rul_onnx(coef, mu, sd))
    sess = session(onnx_path)
    raw_last = np.vstack([raw_features(test[u])[-1] for u in sorted(test)])
    (onnx_pred,) = sess.run(["rul"], {"x": raw_last.astype(np.float32)})
    onnx_err = np.asarray(onnx_pred, np.float64).reshape(-1) - truth
    result["onnx_test_rmse"] = float(np.sqrt(np.mean(onnx_err**2)))
    card = {
        "name": STEM,
        "version": "1",
        "task": "turbofan remaining useful life (cycles) from 14 per-cycle sensors, with a 90 % interval",
        "sensors": list(NAMES),
        "window": WINDOW,
        "recent": RECENT,
        "cap": CAP,
        "input_name": "x",
        "output_name": "rul",
        "interval_90": round(half_width, 3),
        "files": {"fp32": file_entry(onnx_path)},
        "training": {
            "recipe": "python -m models.recipes.rul_cmapss --data ../shared/data",
            "data": "NASA C-MAPSS FD001, 100 training engines run to failure",
            "model": f"ridge, lambda {lam:g} by 5-fold CV over engines; RUL capped at {CAP:g}",
            "inputs": "per sensor: mean of the last 5 cycles, least-squares slope over the last 30",
            "interval": "split-conformal 90 % quantile of |error| on held-out engines at random cuts",
            "degradation": rounded(degradation(train), 5),
        },
        "evaluation": rounded(
            {k: result[k] for k in ("test_rmse", "test_mae", "onnx_test_rmse", "interval_coverage_test")}
            | {"baselines_rmse": BASELINES}
        ),
    }
    calib = np.vstack([raw_features(r) for r in train.values()])
    check = np.vstack([raw_features(test[u]) for u in sorted(test)])
    served = serving_fields(card, args.out, calib, check, raw_last, truth)
    ev = card["evaluation"]
    ev["litert"], ev["backends"] = rounded(served.pop("litert"), 6), rounded(served.pop("backends"), 6)
    card |= served
    card["training"]["quantization_tflite"] = (
        "LiteRT post-training full-integer quantization (calibration wrapper) on every training cycle, "
        "per-tensor int8 weights and activations, int32 bias, float32 input/output"
    )
    write_card(card, args.out)
    lit, bk = ev["litert"], ev["backends"]
    lines = [
        "# rul_cmapss: remaining useful life on C-MAPSS FD001 (ridge on window features, numpy)",
        "",
        (
            f"Test RMSE {result['test_rmse']:.2f} cycles (MAE {result['test_mae']:.2f}), target capped at {CAP:g}; "
            f"ridge lambda {lam:g} by 5-fold CV over training engines.  90 % interval: ±{half_width:.1f} cycles "
            f"(split-conformal on held-out training engines), covering {100 * result['interval_coverage_test']:.0f} % "
            "of the test engines."
        ),
        "",
        (
            f"The shipped model (`{STEM}.onnx`, the gateway's `[[estimators.rul]]`) scores "
            f"RMSE {result['onnx_test_rmse']:.2f} on the same engines (float32)."
        ),
        "",
        (
            f"It ships as ONNX, as `.tflite` and as the ridge's constants for numpy, each checked against the ONNX "
            f"estimates on all {lit['check_rows']} test cycles: LiteRT fp32 max |diff| "
            f"{lit['fp32']['max_abs_diff_vs_onnx_fp32']:.2g} cycles (RMSE {lit['fp32']['test_rmse']:.2f}), numpy "
            f"{bk['numpy']['max_abs_diff_vs_onnx_fp32']:.2g} (RMSE {bk['numpy']['test_rmse']:.2f}); LiteRT int8 "
            f"RMSE {lit['int8']['test_rmse']:.2f} ({lit['int8']['test_rmse_minus_tflite_fp32']:+.2f} against fp32, "
            f"max |diff| {lit['int8']['max_abs_diff_vs_onnx_fp32']:.3g}): {lit['int8_why']}."
        ),
        "",
        f"Backend {card['backend']}: {bk['choice'].split(': ', 1)[1]}.",
        "",
        "| model | FD001 test RMSE |",
        "|---|---|",
        f"| edgetwin ridge (this recipe) | {result['test_rmse']:.2f} |",
        *(f"| {name} | {rmse:.2f} |" for name, rmse in BASELINES.items()),
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "rul_cmapss.eval.md").write_text(text, encoding="utf-8")
    (args.out / "rul_cmapss.eval.json").write_text(
        json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
