"""Per-machine novelty detector (dynamic PCA, T² + SPE) on the Tennessee Eastman reference runs.

Run: ``python -m models.recipes.novelty_tep --data /work/shared/data`` (about half a minute).

Data: ``industrial/tep_braatz``: ``d00.dat`` (500 normal samples, 3 min apart, 52 variables,
stored transposed), ``d00_te.dat`` (960 normal samples, 48 h), ``dNN.dat`` (480 samples, fault NN
from sample 20) and ``dNN_te.dat`` (960 samples, fault NN from sample 160), NN = 01..21.

Protocol (nothing is fitted on a fault; no setting is chosen on a fault it is reported on):

1. **Fit on normal only**: every candidate is fitted on ``d00`` alone.  Its limits and threshold
   are the 99 % quantiles of out-of-fold scores of ``d00`` (5 contiguous folds), i.e. a stated
   1 % false-alarm rate on normal data the fit did not see.
2. **Choose settings on tuning faults**: lags, EWMA weight, the slower EWMA's weight, the
   residual CUSUM's allowance and kept variance are chosen on the
   *training* runs ``dNN.dat`` of the tuning faults ``TUNE`` (every third fault from 1) only, by the
   lowest mean missed-detection rate, among the settings that flag at most twice the stated rate
   of the tuning faults' test runs before their faults (normal operation of 7 other runs, 56 h)
   and raise at most one false episode per day there (the gateway's episode logic: 2 anomalous
   windows raise, 3 normal clear), and that, as the gateway runs them (guarded adaptation of the
   means), follow a slow normal drift on a generated machine (:func:`drift_then_slow_fault`, 4
   seeds: at most twice the stated rate of its normal windows flagged on average) while finding
   the slow fault after it within half its ramp and never learning it (1.4.0: what ships without
   settings is this choice, so it must hold where the gateway's defaults were kept for), and that
   hold on long normal operation (1.5.0): ``d00`` out of fold in 3 contiguous blocks of 8.3 h
   (each scored by a fit on the other two, the block's CUSUM from zero, the gateway's episode
   logic) raise at most one false episode per 24 h over the 25 h and hold no alarm longer than
   1 h (20 windows, an alarm still on at a block's end counted to that end); a point whose fit on
   two blocks has more columns than rows (:func:`fits_rows`) cannot show this and is not eligible.
   The tuning runs' 8 h before their faults are too short to show an offset that normal
   operation holds for hours, which keeps a residual CUSUM at its level (1.4.0 held two such
   false alarms on ``d00_te``, 2.85 h and 1.5 h+).
3. **Report on the held-out faults**: the test runs ``dNN_te.dat`` of the other 14 faults
   (including the hard 3, 9, 15 and 21), ``d00_te`` for the false-alarm rate and the false
   episodes (with the gateway's episode logic: 2 anomalous windows raise, 3 normal clear), and
   the held-out test runs before their faults for both again (14 more normal runs).

Baseline in the same run: static PCA (components keeping 90 % of the variance of ``d00``) with
the textbook limits at 99 % (F distribution for T², approximated; Jackson-Mudholkar for Q).  Because operating
points differ, a second table sets every statistic's threshold to exactly 1 % false alarms on
``d00_te`` (an oracle, the same for all) to compare detectors at equal false alarms.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.alarms.episodes import EpisodeTracker
from gateway.contracts import AlarmKind, ModelResult, StreamFeatures, WindowRecord
from gateway.inference.novelty import (
    CUSUM_AUTO_K,
    CUSUM_AUTO_MIN_S,
    FALSE_EPISODES_PER_DAY,
    CusumSums,
    NoveltyModel,
    NoveltyUse,
    PcaFit,
    PcaSpec,
    blocks,
    fit_pca,
    gap_rows,
    prepare,
    score_rows,
)
from gateway.sample import Stream, industrial_metric
from models.recipes.common import MODELS_DIR

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

NAME = "novelty"
VERSION = "1.6.0"
FAULTS = tuple(range(1, 22))
TUNE = (1, 4, 7, 10, 13, 16, 19)
HARD = (3, 9, 15, 21)
HELD = tuple(f for f in FAULTS if f not in TUNE)
FAULT_AT_TE = 160
FAULT_AT_TRAIN = 20
FAR = 0.01
GRID_LAGS = (0, 1, 2, 3)
GRID_EWMA = (1.0, 0.5, 0.2)
GRID_VAR = (0.8, 0.9, 0.95)
# A second, slower EWMA block (1.0 = none), for drifts too slow for the first (1.1.0).
GRID_SLOW = (1.0, 0.1, 0.05, 0.02)
# Allowance of the residual CUSUM in long-run spreads (0 = none; 1.2.0): 0.5 is Page's choice for
# a shift of one spread, 1.0 for two.
GRID_CUSUM = (0.0, 0.5, 1.0)
# The detectors shipped before, scored beside the new choice in the same run.
EARLIER = {
    "novelty_1_0": PcaSpec(lags=0, ewma=0.2, var_keep=0.95, far=FAR),
    "novelty_1_1": PcaSpec(lags=0, ewma=0.5, var_keep=0.95, far=FAR, ewma_slow=0.1),
}
# Windows whose scores under the chosen detector the card records (run, sample), for tests.
RECORDED = (("d00_te", 100), ("d00_te", 700), ("d21_te", 150), ("d21_te", 400), ("d21_te", 900))
# A grid point is eligible only if it flags at most this share of the tuning faults' test runs
# before their faults start (8 h of normal operation each, 7 runs other than d00): limits set on one
# normal run must hold on others (1.2.0; see choose()).
GUARD_FAR = 2 * FAR
# ... and raises at most this many false episodes per day there (56 h; the gateway's episode logic):
# the aim for held-apart normal data, held on the tuning side only (1.3.0).
GUARD_EPISODES_PER_DAY = 1.0
# ... and follows slow normal drift on a generated machine as the gateway adapts (1.4.0).
DRIFT_SEEDS = range(4)
DRIFT_ADAPT_RATE = 0.01
# ... and holds on long normal operation: d00 out of fold in this many contiguous blocks (8.3 h
# each), at most GUARD_EPISODES_PER_DAY false episodes per day over them and no alarm held longer
# than LONG_MAX_HELD windows (1 h) (1.5.0; see long_normal()).
LONG_BLOCKS = 3
LONG_MAX_HELD = 20
HOURS_TE = 48.0
HOURS_PER_SAMPLE = 0.05  # 3 min
# The chosen point ships with its threshold at the gateway's default false-episode rate (1.6.0):
# the grid is chosen at episode_limit as before (the rate was pre-registered on the card's chosen
# settings, BENCHMARKS.md), and the chosen point is evaluated and shipped at this rate.
EPISODES_PER_WINDOW = FALSE_EPISODES_PER_DAY * HOURS_PER_SAMPLE / 24.0


# Every key of the gateway's [models.novelty] table, what it does (the card's gateway_settings).
SETTINGS = {
    "subject_kind": "subject kind it commissions and scores (default industrial)",
    "subjects": "subjects it scores; empty: every subject of that kind",
    "inputs": "stream metric names (whole, or their last segments) that are inputs; empty: every numeric stream",
    "features": "window features of each input stream that are inputs (default the mean)",
    "spread_only": (
        "metric names (whole or last segments) whose level wanders with ambient or run time (a motor's "
        "temperature): of these only the non-level features (std) are inputs, never the mean"
    ),
    "window_s": (
        "length (s) of the window its features are taken over, cut beside the pipeline's on the same hop "
        "grid; unset: the pipeline's window_s (a change recommissions)"
    ),
    "commissioning_s": "span of complete windows each subject is commissioned on (default 1800 s)",
    "false_alarm_rate": "rate the out-of-fold limits and threshold are set at (default 0.01)",
    "lags": "earlier windows stacked beside each window (dynamic PCA)",
    "ewma": "weight of the newest window in the smoothed block beside the raw inputs (1: none)",
    "ewma_slow": "weight of a second, slower smoothed block (1: none)",
    "cusum_k": (
        "allowance of the residual CUSUM in long-run spreads; 0: off; unset: gateway_cusum_default "
        "(on from 6 h of commissioning)"
    ),
    "cusum_clear": (
        "clearing horizon of the residual CUSUM in windows (default 10): each sum is held at most this many "
        "allowances above its alarm level, so its alarm clears about this many windows after the residuals "
        "are back; applies to a commissioned machine at the next start"
    ),
    "var_keep": "share of the commissioning variance the principal subspace keeps",
    "false_episodes_per_day": (
        "expected false episodes per day of normal operation the threshold is set at, extrapolated from the "
        "tail of the commissioning's out-of-fold scores at the machine's hop (episode_rate_limit), never below "
        f"the limit that lets the commissioning raise none (default {FALSE_EPISODES_PER_DAY:g}, 1.6.0); 0: that limit "
        "alone, 1.5.0's threshold (a change recommissions)"
    ),
    "adapt_rate": "step of the guarded adaptation of the inputs' means on normal windows (0: none)",
    "latency_budget_us": "per-window compute budget on one core",
    "min_coverage": (
        "share of its expected samples each input stream must hold in a window for it to be judged, "
        "commissioned on or adapted to (default 0.8; below: indeterminate, partial); 0: every window"
    ),
}


def load(root: Path) -> dict[str, F64]:
    """Every run of the reference set, samples in rows."""
    base = root / "industrial" / "tep_braatz"
    runs: dict[str, F64] = {}
    for path in sorted(base.glob("d*.dat")):
        x = np.loadtxt(path)
        runs[path.stem] = x.T if x.shape[0] == 52 else x  # d00.dat is stored transposed
    if "d00" not in runs or "d00_te" not in runs:
        raise SystemExit(
            f"novelty_tep {base}: d00.dat / d00_te.dat missing: pass --data with the shared data"
        )
    return runs


def novelty_scores(fit: PcaFit, x: F64) -> F64:
    """Scores of a run, padded at the start where the lags are not yet filled (never anomalous)."""
    s = score_rows(fit, prepare(x, fit.mean, fit.std, fit.spec))[0]
    return np.concatenate([np.zeros(fit.spec.lags), s])


def mdr(flags: npt.NDArray[np.bool_], start: int) -> float:
    """Missed-detection rate: share of faulty samples not flagged."""
    return float(1.0 - flags[start:].mean())


def false_episodes(flags: npt.NDArray[np.bool_]) -> int:
    """Anomaly alarms the gateway's episode logic (raise after 2, clear after 3) raises on a run."""
    return len(alarm_spans(flags))


def alarm_spans(flags: npt.NDArray[np.bool_]) -> list[int]:
    """Windows each anomaly alarm the gateway's episode logic raises on a run is held (to the run's end if not cleared)."""
    tracker = EpisodeTracker(clear_after=3, raise_after=2)
    spans: list[int] = []
    raised_at: int | None = None
    for i, f in enumerate(flags):
        e = tracker.update(("m", "novelty"), ModelResult(1.0 if f else 0.0, bool(f)))
        if e is not None and e.kind is AlarmKind.ANOMALY:
            raised_at = i
        elif e is not None and e.kind is AlarmKind.ANOMALY_CLEARED and raised_at is not None:
            spans.append(i - raised_at)
            raised_at = None
    if raised_at is not None:
        spans.append(len(flags) - raised_at)
    return spans


def classic_pca(x: F64, var_keep: float = 0.9, alpha: float = 0.01) -> dict[str, Any]:
    """Static PCA with textbook T² (F) and Q (Jackson-Mudholkar) limits."""
    mean, std = x.mean(0), x.std(0, ddof=1)
    z = (x - mean) / std
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    eig = s * s / (z.shape[0] - 1)
    k = int(np.searchsorted(np.cumsum(eig) / eig.sum(), var_keep) + 1)
    n = z.shape[0]
    ca = NormalDist().inv_cdf(1 - alpha)
    # F(k, n - k) quantile by Wilson-Hilferty's chi-square one (n - k is ~490 here: within 1 %).
    f_q = (1 - 2 / (9 * k) + ca * np.sqrt(2 / (9 * k))) ** 3
    t2_lim = k * (n - 1) * (n + 1) / (n * (n - k)) * f_q
    th = [float((eig[k:] ** i).sum()) for i in (1, 2, 3)]
    h0 = 1 - 2 * th[0] * th[2] / (3 * th[1] ** 2)
    q_lim = th[0] * (ca * np.sqrt(2 * th[1] * h0**2) / th[0] + 1 + th[1] * h0 * (h0 - 1) / th[0] ** 2) ** (
        1 / h0
    )
    return {"mean": mean, "std": std, "p": vt[:k].T, "eig": eig[:k], "t2": t2_lim, "q": q_lim, "k": k}


def classic_stats(m: dict[str, Any], x: F64) -> tuple[F64, F64]:
    """T² and Q of a run under a classic PCA."""
    z = (x - m["mean"]) / m["std"]
    t = z @ m["p"]
    r = z - t @ m["p"].T
    return (t * t / m["eig"]).sum(1), (r * r).sum(1)


SIGNALS = ("Flow", "Pressure", "Current", "Temperature")


def machine_rows(n: int, rng: np.random.Generator, *, fault_from: int | None = None) -> F64:
    """A generated machine: flow drives pressure and current (coupled); temperature wanders a little on its own."""
    flow = 30.0 + np.cumsum(rng.standard_normal(n)) * 0.05 + rng.standard_normal(n) * 0.5
    flow = 30.0 + (flow - flow.mean()) * 0.5 + rng.standard_normal(n) * 0.5
    pressure = 1.2 + 0.02 * (flow - 30.0) + rng.standard_normal(n) * 0.002
    current = 1.3 + 0.01 * (flow - 30.0) + rng.standard_normal(n) * 0.002
    temp = 60.0 + np.convolve(rng.standard_normal(n + 30), 0.9 ** np.arange(30), "valid")[:n] * 0.2
    x = np.column_stack([flow, pressure, current, temp])
    if fault_from is not None:
        # A partly blocked line: pressure up by 2.5 normal spreads, flow unchanged - every
        # value stays inside its normal range, only the relation between them breaks.
        x[fault_from:, 1] += 0.04
    return x


def drift_then_slow_fault(seed: int) -> F64:
    """Generated rows: commissioning, a slow normal drift, a slow relation fault.

    Commissioning (150), a slow normal drift of temperature (5 spreads over 3000 windows), 200
    steady windows, then a slow relation fault: pressure up 5 of its spreads over 300 windows.
    """
    x = machine_rows(150 + 3000 + 800, np.random.default_rng(seed))
    x[150:3150, 3] += np.linspace(0.0, 2.5, 3000)
    x[3150:, 3] += 2.5
    x[3350:, 1] += np.r_[np.linspace(0.0, 0.08, 300), np.full(300, 0.08)]
    return x


def window_records(x: F64, subject: str = "pump-1", start: int = 0) -> list[WindowRecord]:
    """One window record per row of a generated machine (its 4 signals' means)."""
    streams = [
        Stream("plc", subject, "SN-1", industrial_metric(f"Pump1/{s}", "1"), "industrial", 1.0)
        for s in SIGNALS
    ]
    out = []
    for i, row in enumerate(x):
        sfs = tuple(
            StreamFeatures(st, 10, 0.0, {"mean": float(v), "std": 0.1})
            for st, v in zip(streams, row, strict=True)
        )
        k = start + i
        out.append(WindowRecord(subject, "industrial", k, float(k), 1e9 + k, 1.0, sfs))
    return out


def follows_drift(settings: dict[str, Any]) -> tuple[float, bool]:
    """How the gateway's detector at ``settings`` does through :func:`drift_then_slow_fault`.

    The mean share of the normal windows it flags, and whether in every seed the slow fault is
    found within half its ramp and still flagged at the end (not learned).
    """
    shares = []
    fault_kept = True
    for seed in DRIFT_SEEDS:
        use = NoveltyUse.model_validate(
            {"commissioning_s": 150.0, "adapt_rate": DRIFT_ADAPT_RATE, **settings}
        )
        model = NoveltyModel(use, hop_s=1.0)
        flags = np.array([r.anomaly for r in model.score_batch(window_records(drift_then_slow_fault(seed)))])
        shares.append(float(flags[150:3350].mean()))
        fault_kept = fault_kept and bool(flags[3350:3500].any()) and float(flags[-200:].mean()) > 0.95
    return float(np.mean(shares)), fault_kept


def fits_rows(spec: PcaSpec, n: int, d: int) -> bool:
    """True if each out-of-fold fit on ``n`` normal rows has more rows than a prepared row has columns.

    A covariance of more columns than rows is singular: its limits, set out of fold, do not hold
    on new normal data.  (Added in 1.1.0, after the first grid with the slower EWMA chose lags 3
    with 624 columns on 500 rows and showed 8.6 % false alarms on d00_te: see BENCHMARKS.md.)
    """
    rows = n - n // spec.folds - 2 * gap_rows(spec) - spec.lags
    return blocks(spec) * d < rows


def before_faults(flags: list[npt.NDArray[np.bool_]]) -> tuple[float, float]:
    """Share of flagged samples and false episodes per day over runs of normal operation."""
    hours = sum(len(f) for f in flags) * HOURS_PER_SAMPLE
    return float(np.mean(np.concatenate(flags))), sum(false_episodes(f) for f in flags) * 24.0 / hours


def normal_before_faults(fit: PcaFit, runs: dict[str, F64], faults: tuple[int, ...]) -> tuple[float, float]:
    """:func:`before_faults` of the test runs of ``faults`` before their faults start (normal operation)."""
    return before_faults(
        [novelty_scores(fit, runs[f"d{f:02d}_te"][:FAULT_AT_TE])[fit.spec.lags :] > 1.0 for f in faults]
    )


def long_normal(spec: PcaSpec, normal: F64) -> dict[str, Any] | None:
    """False episodes per day and the longest alarm held (windows) on ``normal`` out of fold in long blocks.

    ``normal`` is cut into ``LONG_BLOCKS`` contiguous blocks; each is scored, from a cold start, by
    a fit on the other blocks (joined in time order; the rows next to the block, which share its
    lags or smoothing, left out).  None if such a fit has more columns than rows.
    """
    n, d = normal.shape
    bounds = np.linspace(0, n, LONG_BLOCKS + 1).astype(int)
    gap = gap_rows(spec)
    if not fits_rows(spec, n - (bounds[1] - bounds[0]) - 2 * gap, d):
        return None
    spans: list[int] = []
    flagged: list[npt.NDArray[np.bool_]] = []
    for lo, hi in itertools.pairwise(bounds):
        keep = np.r_[0 : max(lo - gap, 0), min(hi + gap, n) : n]
        flags = novelty_scores(fit_pca(normal[keep], spec), normal[lo:hi])[spec.lags :] > 1.0
        flagged.append(flags)
        spans += alarm_spans(flags)
    hours = sum(len(f) for f in flagged) * HOURS_PER_SAMPLE
    return {
        "long_false_episodes_per_day": round(len(spans) * 24.0 / hours, 2),
        "long_max_held_windows": max(spans, default=0),
        "long_far": round(float(np.mean(np.concatenate(flagged))), 4),
    }


def choose(runs: dict[str, F64]) -> tuple[PcaSpec, list[dict[str, Any]]]:
    """The grid point with the lowest mean missed-detection rate on the tuning faults' training runs.

    Among the points whose false-alarm rate on the tuning faults' test runs before their faults is
    at most ``GUARD_FAR`` and whose false episodes there are at most ``GUARD_EPISODES_PER_DAY``:
    the out-of-fold limits of ``d00`` say how a detector does on more of the same run, not on
    another run of the plant, whose slow states sit elsewhere; a detector sensitive enough to flag
    every other run scores perfectly on the tuning faults (1.2.0's first grid chose such a point,
    see BENCHMARKS.md).  The episode bound is the aim of one false episode per machine-day, held on
    tuning data only (1.3.0: 1.2.0's choice raised 1.5 per day on ``d00_te``).  And among those,
    only points that follow slow normal drift on a generated machine as the gateway adapts
    (:func:`follows_drift`, 1.4.0): the choice is what ships without settings, and 1.3.0's choice
    was kept out of the defaults for failing that case.  And among those, only points that hold on
    long normal operation (:func:`long_normal`, 1.5.0): 1.4.0's choice kept every bound above and
    held a false alarm for 2.85 h on ``d00_te``.
    """
    grid: list[dict[str, Any]] = []
    n, d = runs["d00"].shape
    for lags, ewma, var, slow, k in itertools.product(GRID_LAGS, GRID_EWMA, GRID_VAR, GRID_SLOW, GRID_CUSUM):
        spec = PcaSpec(lags=lags, ewma=ewma, var_keep=var, far=FAR, ewma_slow=slow, cusum_k=k)
        if not fits_rows(spec, n, d):
            continue
        fit = fit_pca(runs["d00"], spec)
        m = [mdr(novelty_scores(fit, runs[f"d{f:02d}"]) > 1.0, FAULT_AT_TRAIN) for f in TUNE]
        far, episodes = normal_before_faults(fit, runs, TUNE)
        grid.append(
            {
                "lags": lags,
                "ewma": ewma,
                "ewma_slow": slow,
                "var_keep": var,
                "cusum_k": k,
                "tune_mdr": round(float(np.mean(m)), 4),
                "tune_far_before_faults": round(far, 4),
                "tune_false_episodes_per_day": round(episodes, 2),
            }
        )
    for g in filter(tuning_bounds, grid):
        # Only where the tuning bounds hold (a second each): the drift case is the gateway's own path.
        # At episode_limit, as the grid's other figures (false_episodes_per_day 0: the option off).
        settings = {k: g[k] for k in ("lags", "ewma", "ewma_slow", "cusum_k", "var_keep")}
        share, kept = follows_drift(settings | {"false_episodes_per_day": 0.0})
        g["drift_far"] = round(share, 4)
        g["drift_fault_kept"] = kept
        g.update(long_normal(spec_of(g), runs["d00"]) or {"long_false_episodes_per_day": None})
    if not any(map(eligible, grid)):
        raise SystemExit(
            f"novelty_tep: no grid point keeps every bound ({sum(map(tuning_bounds, grid))} keep the tuning "
            f"bounds, {sum(map(long_holds, grid))} the long-normal-operation ones): nothing to choose"
        )
    # Ties go to the simpler detector: fewer lags, less smoothing, no CUSUM.
    best = min(
        filter(eligible, grid),
        key=lambda g: (g["tune_mdr"], g["lags"], -g["ewma"], -g["ewma_slow"], g["cusum_k"]),
    )
    return spec_of(best), grid


def spec_of(g: dict[str, Any]) -> PcaSpec:
    """The detector settings of a grid entry."""
    return PcaSpec(
        lags=g["lags"],
        ewma=g["ewma"],
        var_keep=g["var_keep"],
        far=FAR,
        ewma_slow=g["ewma_slow"],
        cusum_k=g["cusum_k"],
    )


def evaluate(runs: dict[str, F64], spec: PcaSpec) -> dict[str, Any]:
    """Per-fault missed-detection rates of the chosen detector and the classic PCA, both tables."""
    normal = runs["d00"]
    fit = fit_pca(normal, spec)
    static = fit_pca(normal, PcaSpec(var_keep=0.9, far=FAR))
    earlier = {name: fit_pca(normal, s) for name, s in EARLIER.items()}
    # 1.0.0's settings with the chosen CUSUM: what a site turns on for slow drifts (cusum_k).
    earlier["novelty_1_0_cusum"] = fit_pca(
        normal, dataclasses.replace(EARLIER["novelty_1_0"], cusum_k=spec.cusum_k or 1.0)
    )
    classic = classic_pca(normal)
    te0 = runs["d00_te"]

    def candidates(x: F64) -> dict[str, F64]:
        t2, q = classic_stats(classic, x)
        return {
            "pca_t2": t2,
            "pca_q": q,
            "pca_static_t2q": novelty_scores(static, x),
            **{name: novelty_scores(f, x) for name, f in earlier.items()},
            "novelty": novelty_scores(fit, x),
        }

    scored = {f: candidates(runs[f"d{f:02d}_te"]) for f in FAULTS}
    own_limit = dict.fromkeys(scored[1], 1.0) | {"pca_t2": classic["t2"], "pca_q": classic["q"]}
    normal_scores = candidates(te0)
    # Equal false alarms: each statistic's 99 % quantile on d00_te (after its fault-free warm-up).
    equal = {k: float(np.quantile(v[spec.lags :], 1 - FAR)) for k, v in normal_scores.items()}
    table: dict[str, Any] = {"own_limits": {}, "equal_far": {}}
    for mode, limits in (("own_limits", own_limit), ("equal_far", equal)):
        rows: dict[str, Any] = {}
        for k, v in normal_scores.items():
            flags = v > limits[k]
            # The 8 fault-free hours before each held-out test run's fault: 14 more normal runs.
            far, episodes = before_faults([scored[f][k][spec.lags : FAULT_AT_TE] > limits[k] for f in HELD])
            rows[k] = {
                "far_d00_te": round(float(flags[spec.lags :].mean()), 4),
                "false_episodes_per_day": round(false_episodes(flags) * 24.0 / HOURS_TE, 2),
                "far_before_faults": round(far, 4),
                "false_episodes_per_day_before_faults": round(episodes, 2),
            }
        for f in FAULTS:
            for k, v in scored[f].items():
                rows[k][f"fault_{f:02d}"] = round(mdr(v > limits[k], FAULT_AT_TE), 4)
        table[mode] = rows
    # Compute per window: one prepared row scored, as the gateway does.
    row = prepare(te0[:10], fit.mean, fit.std, spec)[-1:]
    sums = CusumSums.zeros(row.shape[1])
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        score_rows(fit, row, sums)
    us = (time.perf_counter() - t0) * 1e6 / reps
    table["score_us_per_window_52_inputs"] = round(us, 1)
    table["components"] = int(fit.eig.shape[0])
    table["recorded_scores"] = [
        [run, i, round(float(novelty_scores(fit, runs[run])[i]), 6)] for run, i in RECORDED
    ]
    return table


def tuning_bounds(g: dict[str, Any]) -> bool:
    """True if a grid point keeps both bounds on the tuning faults' normal runs (see :func:`choose`)."""
    return bool(
        g["tune_far_before_faults"] <= GUARD_FAR
        and g["tune_false_episodes_per_day"] <= GUARD_EPISODES_PER_DAY
    )


def eligible(g: dict[str, Any]) -> bool:
    """True if a grid point keeps the tuning bounds and follows the generated drift (see :func:`choose`)."""
    return bool(
        tuning_bounds(g)
        and g.get("drift_far", 1.0) <= GUARD_FAR
        and g.get("drift_fault_kept", False)
        and long_holds(g)
    )


def long_holds(g: dict[str, Any]) -> bool:
    """True if a grid point keeps the long-normal-operation bounds on ``d00`` (see :func:`long_normal`)."""
    episodes = g.get("long_false_episodes_per_day")
    return bool(
        episodes is not None
        and episodes <= GUARD_EPISODES_PER_DAY
        and g["long_max_held_windows"] <= LONG_MAX_HELD
    )


def verdict(episodes_per_day: float) -> str:
    """Whether a false-episode rate meets the aim of one per machine-day, said plainly."""
    return "within the aim of one per day" if episodes_per_day <= 1.0 else "ABOVE the aim of one per day"


def report(ev: dict[str, Any], spec: PcaSpec, grid: list[dict[str, Any]]) -> str:
    """The markdown tables of BENCHMARKS.md / the eval file."""
    names = ("pca_t2", "pca_q", "pca_static_t2q", *EARLIER, "novelty_1_0_cusum", "novelty")
    lines: list[str] = []
    for mode, title in (("own_limits", "each at its own limit"), ("equal_far", "all at 1 % FAR on d00_te")):
        rows = ev[mode]
        lines += [f"Missed-detection rate per fault, {title} (T = tuning fault, * = hard fault):", ""]
        lines.append("| fault | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for f in FAULTS:
            tag = " T" if f in TUNE else (" *" if f in HARD else "")
            lines.append(
                f"| {f}{tag} | " + " | ".join(f"{rows[n][f'fault_{f:02d}']:.3f}" for n in names) + " |"
            )
        lines.append(
            "| mean, held-out | "
            + " | ".join(f"{np.mean([rows[n][f'fault_{f:02d}'] for f in HELD]):.3f}" for n in names)
            + " |"
        )
        lines.append("| FAR d00_te | " + " | ".join(f"{rows[n]['far_d00_te']:.3f}" for n in names) + " |")
        for key, what, fmt in (
            ("false_episodes_per_day", "false episodes/day", ".1f"),
            ("far_before_faults", "FAR before the faults (14 held-out test runs)", ".3f"),
            ("false_episodes_per_day_before_faults", "false episodes/day before the faults", ".1f"),
        ):
            lines.append(f"| {what} | " + " | ".join(f"{rows[n][key]:{fmt}}" for n in names) + " |")
        lines.append("")
    lines.append(
        f"Chosen on tuning faults {', '.join(map(str, TUNE))}: lags {spec.lags}, EWMA {spec.ewma}, "
        f"slower EWMA {spec.ewma_slow}, residual CUSUM allowance {spec.cusum_k}, "
        f"variance kept {spec.var_keep}; threshold at {FALSE_EPISODES_PER_DAY:g} false episodes per day "
        f"(episode_rate_limit, never below episode_limit); {ev['components']} components; "
        f"{ev['score_us_per_window_52_inputs']} us per window (52 inputs)."
    )
    keys = ("lags", "ewma", "ewma_slow", "var_keep", "cusum_k")
    mine = next(g for g in grid if tuple(g[k] for k in keys) == tuple(getattr(spec, k) for k in keys))
    own = ev["own_limits"]["novelty"]
    lines += [
        "",
        (
            f"Why: the lowest mean miss rate on the tuning faults' training runs ({mine['tune_mdr']}) among the "
            f"{sum(map(eligible, grid))} of {len(grid)} grid points that, on the tuning faults' test runs before "
            f"their faults (56 h of normal operation), flag at most {GUARD_FAR:.0%} of the samples and raise at "
            f"most {GUARD_EPISODES_PER_DAY:g} false episode per day (this point: {mine['tune_far_before_faults']:.1%}, "
            f"{mine['tune_false_episodes_per_day']} per day; {sum(map(tuning_bounds, grid))} points keep these two), "
            f"and that follow the generated machine's slow normal drift with the gateway's adaptation, flagging "
            f"at most {GUARD_FAR:.0%} of its normal windows, and find and keep its slow fault (this point: "
            f"{mine['drift_far']:.1%}), and that on d00 out of fold in {LONG_BLOCKS} blocks of 8.3 h raise at most "
            f"{GUARD_EPISODES_PER_DAY:g} false episode per day and hold no alarm longer than {LONG_MAX_HELD} windows "
            f"(this point: {mine['long_false_episodes_per_day']} per day, longest {mine['long_max_held_windows']} "
            f"windows, {mine['long_far']:.1%} flagged; {sum(map(long_holds, grid))} points keep these two). "
            "No held-out run entered the choice; the gateway's defaults are this point."
        ),
        "",
        (
            f"False episodes on held-apart normal data at its own limit: {own['false_episodes_per_day']} per day on "
            f"d00_te ({verdict(own['false_episodes_per_day'])}); "
            f"{own['false_episodes_per_day_before_faults']} per day on the 14 held-out runs before their faults "
            f"({verdict(own['false_episodes_per_day_before_faults'])})."
        ),
    ]
    return "\n".join(lines) + "\n"


# What the card says of the detector's limits (written with every run; figures as of 1.6.0).
LIMITS = (
    "Settings transfer as counts of windows, not minutes: TEP samples are 3 min apart. "
    "Faults that leave the joint distribution of the measured variables unchanged (3, 9, 15 in TEP) are "
    "not separable from normal by any detector of normal data alone. The subspace and the CUSUM's scales "
    "are fixed at commissioning, and so are the spreads; only the inputs' means adapt, on windows judged "
    "normal after a run of them, following a drift with a lag of its slope over adapt_rate: a fault that "
    "develops slower than that is learned. Limits (1.4.0): each statistic's limit and the threshold are the "
    "99 % quantile of out-of-fold commissioning scores, raised where needed so that no held-out block holds "
    "two windows above them in a row (episode_limit): a slowly moving statistic's top 1 % are runs, and at "
    "the quantile alone the commissioning's own data raised episodes (the residual CUSUM on d00: one in "
    "25 h; the fusion's novelty member on the simulated pump: 8-11 in 30 min). The gateway's defaults are "
    "the chosen settings (1.4.0); the residual CUSUM is on at the chosen allowance when commissioning_s is "
    "at least 6 h (gateway_cusum_default), off below (on the simulated pump at allowance 0.5, 3 seeds: "
    "after 1, 2 or 4 h of commissioning it added false episodes or flagged time in 2 of 3 seeds, after 6 h "
    "none; re-measured at 1.0: after 1-4 h in 1-2 of 3, after 6 h none; over 16 seeds after 6 h in 3, "
    "after 12 h in 5, so a longer span is not quieter). "
    "Clearing rule (1.3.0): each CUSUM sum is held at most cusum_clear (10) allowances above its alarm "
    "level, so its alarm clears about 10 windows after the residuals are back; a fault whose residuals "
    "come and go is flagged less of its time. Long normal operation (1.5.0): the selection requires at "
    "most one false episode per day and no alarm held over 1 h on d00 out of fold in 8.3 h blocks; 1.4.0's "
    "allowance 0.5 held one 31 windows there, and on d00_te held false alarms for 2.85 h and 1.5 h+ (a "
    "residual sitting at about the allowance holds the sum at its level); at 1.0 the slow held-out faults "
    "are found less (fault 21 misses 0.25 of its samples against 0.10 at 0.5). Threshold at 0.5 false "
    "episodes per day (1.6.0, false_episodes_per_day): where the tail of the commissioning's out-of-fold "
    "scores extrapolates to that rate at the machine's hop, never below the limit above (on d00 1.0645 "
    "against 1.0456); the settings were chosen at the limit above and the rate applied to the choice, "
    "pre-registered on the tuning data (BENCHMARKS.md, 2026-12-05). It is an extrapolation from one "
    "commissioning's tail: on generated data it held 0.5 a day on average, single machines 0.08-1.75; at "
    "1-s windows the same rate per day is far out in the tail (SKAB's novelty member alone misses more "
    "faulty windows). False episodes on held-apart normal data, as shipped (through the gateway's own "
    "pipeline, adapting: gateway_path): 2 on d00_te (1.0 per day, at the aim of one; 1.15 % flagged, "
    "none held over 9 min), 2 in the held-out runs' 112 h before their faults, 1 in the tuning runs' "
    "56 h; frozen after commissioning: 1.0 per day on d00_te (2 in 48 h, 1.25 % flagged), 0.43 per "
    "day on the 14 held-out runs before their faults. The long-operation guard has 25 h of one run; a "
    "plant whose normal offsets last longer than d00's can still hold an alarm for hours."
)


# What a site saw on d00_te with 1.4.0 as shipped (gateway_path; diagnosis recorded in
# BENCHMARKS.md, "What a site sees on d00_te"), and what 1.5.0 changed: written under the figures.
SITE_VIEW = (
    "What a site saw on d00_te with 1.4.0 (as shipped: the defaults, commissioned on d00, adapting, "
    "through the gateway's pipeline; held-out data, seen before, nothing chosen on it): 97 of 960 "
    "windows flagged (10.1 %), 4 alarms. Two are T2's and short (raised at windows 257 and 827, each "
    "cleared 9 min later). Two are the residual CUSUM's and long, in the run's last five hours: raised "
    "at 866 on v26 (reactor feed, component D), held 2.85 h (55 of its 57 windows flagged), cleared at "
    "922; raised 21 min later at 929 on v27's smoothed column (component E), still on when the run ends "
    "1.5 h later. Each is held by a residual sitting at about the allowance 0.5, so the sum stays at "
    "its level until the residual falls back. With 1.5.0 (allowance 1.0, chosen with the long-operation "
    "guard; d00_te seen before for other points): 14 windows flagged (1.5 %), 3 alarms (257, 827, 913), "
    "each cleared 9 min after it was raised. Frozen scoring raises 257 and 913; the alarm at 827 is the "
    "means' adaptation, no defect (BENCHMARKS.md, 2026-12-04): the two differ on one window of 960, 826 "
    "(T2 at 1.010 of the alarm level adapting, 0.9998 frozen), because the means of v19 and v50 had "
    "followed the run's offset (+0.22 spreads) before a -3.5-spread excursion against it; on the normal "
    "operation the protocol may look at (d00 out of fold, the tuning runs before their faults joined, "
    "81 h) adapting, adapt_rate 0 and frozen raise the same alarms. With 1.6.0 (the same settings, the "
    "threshold at 0.5 false episodes per day, pre-registered on allowed data; d00_te read once after the "
    "decision): 11 windows flagged (1.15 %), 2 alarms (257, 913), each cleared 9 min after it was "
    "raised, 1.0 per day; the alarm at 827 (1.010 of 1.5.0's threshold) is below the raised one."
)


def main(argv: list[str] | None = None) -> int:
    """Choose, evaluate and write the detector card and report."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.novelty_tep", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    np.random.seed(0)  # nothing here draws; fixed for any future randomised candidate
    runs = load(args.data)
    spec, grid = choose(runs)
    spec = dataclasses.replace(spec, episodes_per_window=EPISODES_PER_WINDOW)
    log.info("chosen %s", spec)
    ev = evaluate(runs, spec)
    text = report(ev, spec, grid)
    sys.stdout.write(text)
    defaults = NoveltyUse()
    card = {
        "name": NAME,
        "version": VERSION,
        "kind": "per-machine novelty detector (dynamic PCA, T2 + SPE + residual CUSUM), fitted on each machine's commissioning",
        "protocol": __doc__.split("Protocol")[1].split("Baseline")[0].strip() if __doc__ else "",
        "data": "Tennessee Eastman reference runs (tep_braatz, BSD-3-Clause): d00 fit, d00_te FAR, dNN_te report",
        "chosen": {
            "lags": spec.lags,
            "ewma": spec.ewma,
            "ewma_slow": spec.ewma_slow,
            "cusum_k": spec.cusum_k,
            "var_keep": spec.var_keep,
            "false_alarm_rate": FAR,
            "false_episodes_per_day": FALSE_EPISODES_PER_DAY,
        },
        "gateway_defaults": {
            "lags": defaults.lags,
            "ewma": defaults.ewma,
            "ewma_slow": defaults.ewma_slow,
            "cusum_k": defaults.cusum_k,
            "var_keep": defaults.var_keep,
            "false_alarm_rate": defaults.false_alarm_rate,
            "false_episodes_per_day": defaults.false_episodes_per_day,
        },
        # cusum_k unset: the residual CUSUM at this allowance from this commissioning span, else off.
        "gateway_cusum_default": {"cusum_k": CUSUM_AUTO_K, "min_commissioning_s": CUSUM_AUTO_MIN_S},
        "gateway_settings": SETTINGS,
        "tuning_faults": list(TUNE),
        "grid": grid,
        "evaluation": ev,
        "limits": LIMITS,
    }
    path = args.out / f"{NAME}.detector.json"
    before = json.loads(path.read_text("utf-8")) if path.exists() else {}
    if "gateway_path" in before:
        # Written by models.recipes.novelty_tep_gateway from this card's settings: run it again
        # after a change of them (tests/test_novelty.py checks that they agree).
        card["gateway_path"] = before["gateway_path"]
    path.write_text(json.dumps(card, indent=1, sort_keys=True) + "\n", "utf-8")
    (args.out / f"{NAME}.eval.md").write_text(f"# {NAME} {VERSION} on TEP\n\n{text}\n{SITE_VIEW}\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
