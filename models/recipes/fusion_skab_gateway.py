"""The SKAB fusion through the gateway's own code path, nested by file.

Run: ``python -m models.recipes.fusion_skab_gateway --data /work/shared/data`` (a few minutes).

Each outer fold (files ``i % 4 == k`` held out) makes every choice on its 12 training files only,
exactly as :mod:`models.recipes.fusion_skab` does with the following baseline
(:func:`~models.recipes.fusion_skab.choose`: the pump window, weights and threshold, the novelty
setting, the weight ``a``, both scales and ``tau``).  The 4 held-out files are then replayed
through the gateway:

* each row of a file is one sample per signal at 1 Hz (row ``i`` at ``t = i + 0.5`` s) handed to
  the gateway's :class:`~gateway.pipeline.windows.Windower` (hop 1 s, grace 0, the pump's window
  as the pipeline window and the novelty detector's as a per-model length);
* the pump model is a :class:`~gateway.inference.runner.AnomalyModel` on onnxruntime, loaded from
  a card written for the fold (the shipped card with the fold's weights, window and threshold),
  commissioned on the whole windows among the file's first 400 (a file's first windows hold less
  than ``min_coverage`` of their span and are not judged: :func:`whole_windows`), its baseline
  following slow wander as served;
* the novelty detector is the gateway's :class:`~gateway.inference.novelty.NoveltyModel` with the
  fold's setting, commissioned on the whole windows among the first 400, its guarded adaptation on
  (the default);
* the fusion is :class:`~gateway.inference.fusion.FusionModel` through
  :func:`~gateway.inference.fusion.fuse_window`, as the pipeline calls it.

Window ``k`` (rows ``k - w .. k - 1``) gives the flag of row ``k - 1``; rows 400.. are scored
(binary F1 / FAR / MAR pooled over the held-out files, as the recipe); a window the fusion cannot
judge (commissioning, the detector's warm-up) counts as not flagged and is counted.  The episode
state per row (:class:`~gateway.alarms.episodes.EpisodeTracker`, raise after 2 / clear after 3, the
defaults) is reported too: what the alarms show.

Differences from the recipe's rows, by design of the gateway: a file's first windows are judged
from ``min_coverage`` (0.8) of their span (the recipe starts at row ``w - 1``), the windows before
are neither judged nor commissioned on; the detector's smoothing starts after commissioning and
its first windows are not judged; its inputs' means adapt slowly on clearly normal windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.alarms.episodes import EpisodeState, EpisodeTracker
from gateway.contracts import DEFAULT_MIN_COVERAGE, ModelResult, WindowModel
from gateway.inference.build import model_lengths
from gateway.inference.card import load_card
from gateway.inference.fusion import FusionCard, FusionModel, Member, fuse_window
from gateway.inference.novelty import FALSE_EPISODES_PER_DAY, NoveltyModel, NoveltyUse
from gateway.inference.runner import AnomalyModel
from gateway.pipeline.windows import Windower
from gateway.sample import SampleBlock, Stream, industrial_metric
from models.recipes.common import MODELS_DIR, binary_scores, file_entry, mlp_onnx
from models.recipes.fusion_skab import FOLDS, choose, novelty_scores
from models.recipes.pump_skab import DRIFTING, FEATURES, FIT_ROWS, SIGNALS, UNITS, Experiment, fit, load

log = logging.getLogger(__name__)

B = npt.NDArray[np.bool_]
WALL = 1.7e9
HOP_S = 1.0


def whole_windows(rows: int, w: int) -> int:
    """Windows among the first ``rows`` (1 Hz, hop 1 s) holding ``min_coverage`` of their ``w`` s."""
    partial = math.ceil(DEFAULT_MIN_COVERAGE * w - 1e-9) - 1  # windows holding 1.. samples below the share
    return rows - partial


def pump_member(
    fold: int, train: list[int], w: int, valve: list[Experiment], normal: list[Experiment], tmp: Path
) -> AnomalyModel:
    """The fold's pump model as the gateway serves it: the shipped card with the fold's weights."""
    coef, bias, thr = fit(train, valve, normal, w)
    path = tmp / f"pump_skab.fold{fold}.fp32.onnx"
    path.write_bytes(
        mlp_onnx(
            [(coef.reshape(-1, 1), np.array([bias]))], name="pump_skab", n_inputs=len(coef), sigmoid=True
        )
    )
    shipped = load_card(MODELS_DIR / "pump_skab.card.json")
    card = shipped.model_copy(
        update={
            "window_s": float(w),
            "threshold": thr,
            "files": {"fp32": shipped.files["fp32"].model_copy(update=file_entry(path))},
            "tflite_files": {},
            "backend": "onnxruntime",
            "default_precision": "fp32",
        }
    )
    return AnomalyModel(card, tmp, backend="onnxruntime", commissioning_windows=whole_windows(FIT_ROWS, w))


def novelty_member(
    setting: tuple[int, float, float], per_day: float | None = FALSE_EPISODES_PER_DAY
) -> NoveltyModel:
    """The gateway's novelty detector at one setting, commissioned on the whole windows of the first FIT_ROWS."""
    w, ewma, var = setting
    use = NoveltyUse(
        false_episodes_per_day=per_day,
        window_s=float(w),
        ewma=ewma,
        var_keep=var,
        features=list(FEATURES),
        spread_only=list(DRIFTING),
        commissioning_s=whole_windows(FIT_ROWS, w) * HOP_S,
    )
    return NoveltyModel(use, hop_s=HOP_S)


def replay(
    e: Experiment, subject: str, models: list[WindowModel], fusions: list[FusionModel], window_s: float
) -> list[dict[str, ModelResult]]:
    """Every window's verdicts (by model name, the fusion's among them), window k -> row k - 1."""
    windower = Windower(
        window_s=window_s, hop_s=HOP_S, grace_s=0.0, lost_after_s=60.0, on_alarm=lambda _: None,
        lengths=model_lengths(models),
    )  # fmt: skip
    streams = [
        Stream("skab", subject, "rig", industrial_metric(s, UNITS[s]), kind="industrial", rate_hz=1.0)
        for s in SIGNALS
    ]
    out: list[dict[str, ModelResult]] = []
    q = np.zeros(1, np.uint8)
    for i, row in enumerate(e.x):
        t = np.array([i + 0.5])
        for s, v in zip(streams, row, strict=True):
            windower.put_block(SampleBlock(s, t, t + WALL, np.array([v]), q))
        for rec in windower.close_due(i + 1.0, WALL + i + 1.0):
            verdicts: dict[str, ModelResult] = {}
            for m in models:
                view = rec.over(getattr(m, "window_s", None))
                if m.applies_to(view):
                    verdicts[m.name] = m.score_batch([view])[0]
            fuse_window(fusions, rec, verdicts)
            out.append(verdicts)
    return out


def episode_flags(verdicts: list[ModelResult]) -> B:
    """Per window: inside an anomaly episode (raise after 2, clear after 3: the gateway's defaults)."""
    tracker = EpisodeTracker(clear_after=3, raise_after=2)
    flags = np.zeros(len(verdicts), bool)
    for j, r in enumerate(verdicts):
        tracker.update(("m", "fusion"), r)
        flags[j] = tracker.state(("m", "fusion")) is not EpisodeState.IDLE
    return flags


def held_out(
    k: int,
    choice: dict[str, Any],
    valve: list[Experiment],
    normal: list[Experiment],
    tmp: Path,
    per_day: float | None = FALSE_EPISODES_PER_DAY,
) -> tuple[dict[str, list[B]], int]:
    """Flags of rows FIT_ROWS.. of fold ``k``'s held-out files through the gateway, and unjudged rows.

    ``choice``: what the training files chose (``pump_window_s``, ``novelty_setting``,
    ``weight_pump``, ``scale_pump``, ``scale_pca``, ``tau``), as recorded per fold.
    """
    test = [i for i in range(16) if i % FOLDS == k]
    train = [i for i in range(16) if i % FOLDS != k]
    w = int(choice["pump_window_s"])
    a = float(choice["weight_pump"])
    pump = pump_member(k, train, w, valve, normal, tmp)
    card = FusionCard(
        name="fusion_skab",
        version=f"fold{k}",
        subject_kind="industrial",
        members=(
            # log-odds over the fold's own pump threshold, as the recipe's u_pump
            Member(model="pump_skab", transform="log_odds", threshold=pump.threshold, weight=a, scale=choice["scale_pump"]),
            Member(model="novelty", transform="log", weight=1.0 - a, scale=choice["scale_pca"]),
        ),
        tau=choice["tau"],
    )  # fmt: skip
    fusion = FusionModel(card)
    setting = tuple(choice["novelty_setting"])
    flags: dict[str, list[B]] = {"fusion": [], "fusion_episodes": [], "pump": [], "novelty": []}
    unjudged = 0
    for i in test:
        novelty = novelty_member((int(setting[0]), float(setting[1]), float(setting[2])), per_day)
        rows = replay(valve[i], f"valve1-{i}", [pump, novelty], [fusion], float(w))
        # window k -> row k - 1: rows FIT_ROWS.. are windows FIT_ROWS + 1..
        held = rows[FIT_ROWS:]
        fused = [v["fusion_skab"] for v in held]
        unjudged += sum(1 for r in fused if r.verdict == "indeterminate")
        flags["fusion"].append(np.array([r.anomaly for r in fused]))
        flags["fusion_episodes"].append(episode_flags([v["fusion_skab"] for v in rows])[FIT_ROWS:])
        flags["pump"].append(np.array([v["pump_skab"].anomaly for v in held]))
        flags["novelty"].append(np.array([v["novelty"].anomaly for v in held]))
    return flags, unjudged


def evaluate(
    valve: list[Experiment],
    normal: list[Experiment],
    tmp: Path,
    per_day: float | None = FALSE_EPISODES_PER_DAY,
) -> dict[str, Any]:
    """Nested by file: choices on the training files (recipe), held-out files through the gateway.

    ``per_day``: the novelty detector's threshold at that many false episodes per day, in the
    recipe's choices and the gateway alike (``false_episodes_per_day``).
    """
    truth = [e.y[FIT_ROWS:] for e in valve]
    nov = novelty_scores(valve, per_day=per_day)
    pooled: dict[str, list[B]] = {"fusion": [], "fusion_episodes": [], "pump": [], "novelty": []}
    pooled_truth: list[B] = []
    folds: list[dict[str, Any]] = []
    unjudged = 0
    for k in range(FOLDS):
        test = [i for i in range(16) if i % FOLDS == k]
        train = [i for i in range(16) if i % FOLDS != k]
        w, s_pump, best = choose(train, valve, normal, nov, truth, follow=True)
        tau, (setting, a, s_pca), inner = best["fusion"]
        record: dict[str, Any] = {
            "fold": k, "pump_window_s": w, "novelty_setting": list(setting), "weight_pump": a, "tau": tau,
            "scale_pump": s_pump, "scale_pca": s_pca, "inner": {m: round(v, 4) for m, v in inner.items()},
        }  # fmt: skip
        flags, n = held_out(k, record, valve, normal, tmp, per_day)
        unjudged += n
        y = np.concatenate([truth[i] for i in test])
        record["held_out"] = {
            name: _rounded(binary_scores(np.concatenate(f), y)) for name, f in flags.items()
        }
        for name, f in flags.items():
            pooled[name] += f
        pooled_truth += [truth[i] for i in test]
        folds.append(record)
        log.info("fold %d: %s", k, record)
    y = np.concatenate(pooled_truth)
    result = {name: _rounded(binary_scores(np.concatenate(f), y)) for name, f in pooled.items()}
    return {
        "nested_by_file": result,
        "held_out_rows": int(y.size),
        "fusion_unjudged_rows": unjudged,
        "folds": folds,
        "protocol": __doc__.split("Each outer fold")[1].split("Differences")[0].strip() if __doc__ else "",
    }


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {m: round(v, 4) for m, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    """Writes the ``gateway_path`` section of models/fusion_skab.eval.json."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.fusion_skab_gateway", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    ap.add_argument(
        "--false-episodes-per-day",
        type=float,
        default=FALSE_EPISODES_PER_DAY,
        help="the novelty detector's threshold at this false-episode rate (default: the gateway's, %(default)s; 0: off)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gateway").setLevel(logging.WARNING)
    valve, normal = load(args.data)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate(valve, normal, Path(tmp), args.false_episodes_per_day)
    result["seconds"] = round(time.monotonic() - t0, 1)
    path = args.out / "fusion_skab.eval.json"
    ev = json.loads(path.read_text("utf-8")) if path.exists() else {}
    ev["gateway_path"] = result
    path.write_text(json.dumps(ev, indent=1) + "\n", "utf-8")
    log.info("gateway path, pooled held-out: %s", result["nested_by_file"])
    return 0 if math.isfinite(result["nested_by_file"]["fusion"]["f1"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
