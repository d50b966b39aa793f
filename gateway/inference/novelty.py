"""Per-machine novelty detection learned from normal operation only: (dynamic) PCA with T² and SPE.

No fault kind is learned.  Each machine (subject) is commissioned on its own first windows: the
inputs are standardised, optionally smoothed (EWMA over windows, and a second, slower EWMA beside
it for drifts over a longer horizon) and stacked with ``lags`` earlier
windows (dynamic PCA, for slow processes whose normal is a trajectory, not a point); a principal
subspace keeping ``var_keep`` of the variance is fitted.  A window is scored by

* Hotelling's T² inside the subspace (an unusual *combination* of normal directions), and
* SPE / Q, the squared residual off the subspace (a relation between inputs that normal never
  broke), and
* with ``cusum_k`` > 0, a two-sided CUSUM (Page's) of each residual column in its long-run
  spreads (its spread times the AR(1) variance inflation of its autocorrelation) with allowance
  ``cusum_k``: a relation broken a little but persistently - a slow drift - accumulates, where
  T² and SPE judge each window alone; the largest sum is the statistic.  Its clearing rule: each
  sum is held at most ``cusum_clear`` allowances above the alarm level, so once the residuals are
  back at their normal mean it falls below that level within about ``cusum_clear`` windows
  however long the fault lasted (without the cap, a sum grown over hours took hours to fall);
  the cap never acts below the alarm level, so a fault is first flagged exactly as early (one
  whose residuals come and go is flagged less of its time),

each divided by its own limit, the largest taken, and divided by a threshold.  Limits and threshold
are the ``1 - far`` quantiles of *out-of-fold* scores of the commissioning data (contiguous blocks
held out in turn), so the stated false-alarm rate is one the detector actually shows on normal
data it was not fitted on, not a distributional assumption; each is raised where needed so that no
fold holds two windows above it in a row (:func:`episode_limit`, 1.4.0): alarms are raised on runs
of flagged windows, and a quantile of a slow statistic (the CUSUM) alone let the commissioning's
own normal data raise one.  With ``episodes_per_window`` set (``false_episodes_per_day``, 0.5 by
default from 1.6.0; 0 turns it off) the threshold is instead where the tail of those scores extrapolates to that rate of false
episodes on new normal data (:func:`episode_rate_limit`), never below that limit: a commissioning
that raised none in a day does not bound the rate near one a day.  A score above 1 is anomalous.

Explanation: each input's share of the score, from the complete decomposition of T² and the
squared residuals of SPE, summed over its lags and blocks; when the CUSUM raised the score, from
the sums at its alarm level instead (in the inputs' standardised units, squared as SPE's residuals).
As a fusion's member (``explain_all``) a window it does not flag is explained only when the
fusion reads its contributions (a fused anomaly), from that window's own row, as it would have been
at once (:class:`gateway.inference.deferred.Deferred`); ``explained`` counts the windows explained.

Guarded adaptation: after commissioning, a window judged normal that follows ``adapt_guard``
normal windows in a row moves each input's mean a step ``adapt_rate`` towards it; anomalous or
unjudged windows freeze it, so a slowly developing fault is not learned as normal once it is
flagged.  It follows a drift of slope ``s`` with a lag of ``s / adapt_rate``: a normal drift slower
than the detector's sensitivity times the rate is followed, a faster fault is flagged and then no
longer learned.  (Before 1.2.0 only windows scoring below 0.5 adapted: a lag that pushed normal
windows above 0.5 stopped the adaptation for good, and with the slower EWMA block a slow normal
drift then ended up flagged.)  The spreads, the subspace, the CUSUM's scales and the limits stay
those of commissioning: the subspace and the residuals are relations between the inputs in their
commissioning spreads, and moving every mean by the same rule keeps a linear relation between the
inputs holding, where rescaling inputs one by one does not (see :meth:`NoveltyModel._adapt`).

A window one of whose input streams holds less than ``min_coverage`` of its expected samples
(after a start or an outage: :mod:`gateway.inference.partial`) is not judged (``partial``),
neither commissions nor adapts, and breaks the run of normal windows adaptation waits for.

After commissioning and after every restart, the first ``lags + 3 / ewma`` windows (the slower of
the two weights) only settle
the smoothing and the lags (indeterminate, "commissioning"): a smoothed input that starts from one
raw window is far noisier than those the subspace was fitted on.

State (the commissioning rows while collecting, the fitted detector after, with its adapted
means and the CUSUM's scales and limit) is kept per subject in one JSON file under
``<state_dir>/models/``, so a restart neither loses nor repeats commissioning (a state saved
while the spreads adapted too keeps the spreads it had reached, no longer moved; recommissioning
restores commissioning's).  The running EWMA and CUSUM sums are not kept: after a restart they
start again from the settling windows.

The means and spreads are in the units of the inputs' streams, kept with the state.  When an
input's unit changes (degC to degF after a PLC program change, a corrected ``unit`` in the config)
the subject is commissioned again from that window: the subspace ties the inputs together in
their commissioning spreads, and a mean in the old unit would make the new values a false
anomaly.  Nothing is converted: a new unit label does not say whether the values changed with it
(a PLC rescaled, or a wrong label corrected), and commissioning again is right either way.  Units
are compared as :func:`gateway.units.normalise` spells them (``°C`` and ``Cel`` are one unit).  The
change is logged once and the subject's status says ``commissioning (unit changed from X to Y:
<input>)`` until it is commissioned again.  A state stored before units were kept (version 1) is
loaded with its units unknown: kept, each input taking its stream's unit from the next window and
stored at once (so a change while the gateway is down is seen at the next start); under the default
false-episode rate such a state, written before the rate existed, commissions again instead.  An empty unit
(a driver that could not read it) is unknown, never a change; UCUM ``1`` (dimensionless) is a unit.
A machine recommissioned with an anomaly open says ``unit_changed`` (indeterminate) while it
commissions, and logs that its new statistics hold that condition.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gateway.compiled import compiled
from gateway.contracts import DEFAULT_MIN_COVERAGE, ModelResult, StreamFeatures, WindowRecord
from gateway.inference.deferred import Deferred
from gateway.inference.partial import PARTIAL, Coverage
from gateway.inference.statefile import state_file, store_json
from gateway.units import normalise

__all__ = [
    "FALSE_EPISODES_PER_DAY",
    "CusumSums",
    "NoveltyModel",
    "NoveltyUse",
    "PcaFit",
    "PcaSpec",
    "blocks",
    "build_novelty",
    "episode_limit",
    "episode_rate_limit",
    "fit_pca",
    "gap_rows",
    "min_rows",
    "named",
    "prepare",
    "score_row",
    "score_rows",
]

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

STATE_VERSION = 2  # 2: the inputs' units; 1 (no units) loads with its units unknown
# Expected false episodes per day the threshold is set at by default (NoveltyUse.false_episodes_per_day,
# 1.6.0): the rate the TEP and SKAB evaluations were pre-registered at, half the aim of one a day
# (BENCHMARKS.md, "the episode-rate threshold").  0 or None: episode_limit alone, 1.5.0's threshold.
FALSE_EPISODES_PER_DAY = 0.5
CUSUM_CLEAR = 10  # default clearing horizon of the residual CUSUM, windows (see PcaSpec.cusum_clear)
# The residual CUSUM by default (NoveltyUse.cusum_k unset): its allowance (the TEP protocol's
# choice; 1.5.0: 1.0, after 1.4.0's 0.5 held false alarms for hours on long normal operation),
# and the commissioning span from which it is on.  A shorter span holds too little of a
# machine's slow normal wander: on the simulated pump (BENCHMARKS.md, seeds 5, 1, 2, 6 h judged,
# tests/benchmarks/bench_novelty_span.py), at allowance 0.5 after 1, 2 and 4 h of commissioning it
# added false episodes or time in alarm to T² and SPE's in 2 of 3 seeds (2 h, seed 1: 6 episodes,
# 1.8 h, against none), after 6 h none; at 1.0 after 1-4 h in 1-2 of 3 (2 h, seed 1: 5, 1.2 h)
# and after 6 h none.  Over 16 seeds it still adds some after 6 h in 3, and after 12 h in 5: a
# longer span is not quieter there, so the 6 h stay.
CUSUM_AUTO_K = 1.0
CUSUM_AUTO_MIN_S = 21_600.0
_SAVE_EVERY = 20  # commissioning rows between saves of the partial state
#: A window's T² and SPE compiled (gateway/_window.c): (T², SPE), or None where numpy must run.
_pca_row: Callable[[F64, F64, F64, F64], tuple[float, float] | None] | None = compiled("pca_row")
#: How far the compiled T² and SPE may be from numpy's, relative: its products are summed in input
#: order where numpy's matmul sums them in BLAS's (tests/test_novelty_compiled.py).
NOVELTY_TOLERANCE = 1e-12


@dataclass(frozen=True, slots=True)
class PcaSpec:
    """Settings of the detector (chosen once by the recipe on tuning fault kinds)."""

    lags: int = 0
    ewma: float = 1.0  # weight of the newest window in the smoothed input (1 = no smoothing)
    var_keep: float = 0.9
    far: float = 0.01  # false-alarm rate the limits and threshold are set at
    folds: int = 5
    min_std_rel: float = 0.01
    min_std_abs: float = 1e-3
    # Weight of a second, slower EWMA block (1 = none): a slow drift (a valve stuck at its
    # operating point) stands out over a longer horizon than the first smoothing sees.
    ewma_slow: float = 1.0
    # Allowance of the residual CUSUM in long-run spreads (0 = no CUSUM, 1.2.0): a small relation
    # break that persists accumulates, where T² and SPE judge each window alone.
    cusum_k: float = 0.0
    # The CUSUM's clearing horizon in windows (1.3.0): its sums are held at most this many
    # allowances above its alarm level, so once the residuals are back at their normal mean they
    # fall below it within about this many windows, however long the fault lasted.
    cusum_clear: int = CUSUM_CLEAR
    # Expected false episodes per window the threshold is set at (0 = off: episode_limit alone;
    # :func:`episode_rate_limit`); NoveltyUse.false_episodes_per_day at the machine's hop.
    episodes_per_window: float = 0.0


@dataclass(slots=True)
class CusumSums:
    """The residual CUSUM's running sums of one machine (upward and downward, per residual column)."""

    up: F64
    down: F64

    @classmethod
    def zeros(cls, n: int) -> CusumSums:
        """Sums of a CUSUM that has seen nothing yet."""
        return cls(np.zeros(n), np.zeros(n))

    def step(self, u: F64, k: float, cap: float = math.inf) -> F64:
        """Take one row of scaled residuals; the larger sum per column after it (each at most ``cap``)."""
        self.up = np.clip(self.up + u - k, 0.0, cap)
        self.down = np.clip(self.down - u - k, 0.0, cap)
        return np.maximum(self.up, self.down)


@dataclass(slots=True)
class PcaFit:
    """A fitted detector: standardisation, subspace, limits."""

    spec: PcaSpec
    mean: F64  # (d,) base inputs
    std: F64
    center: F64  # (d * (lags + 1),) mean of the stacked, standardised rows
    load: F64  # (D, k)
    eig: F64  # (k,)
    lim_t2: float
    lim_spe: float
    threshold: float
    # Residual CUSUM (spec.cusum_k > 0): each residual column's long-run spread, and the limit of
    # the largest sum.
    res_scale: F64 | None = None
    lim_cusum: float = 0.0

    @property
    def n_inputs(self) -> int:
        """Base inputs (before lags)."""
        return int(self.mean.shape[0])

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form."""
        s = self.spec
        return {
            "spec": [
                s.lags,
                s.ewma,
                s.var_keep,
                s.far,
                s.folds,
                s.min_std_rel,
                s.min_std_abs,
                s.ewma_slow,
                s.cusum_k,
                s.cusum_clear,
                s.episodes_per_window,
            ],
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "center": self.center.tolist(),
            "load": self.load.tolist(),
            "eig": self.eig.tolist(),
            "limits": [self.lim_t2, self.lim_spe, self.threshold, self.lim_cusum],
            "res_scale": None if self.res_scale is None else self.res_scale.tolist(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PcaFit:
        """Back from :meth:`to_json`; raises ValueError/KeyError/TypeError on a bad body."""
        # Seven entries: a state saved before the slow block existed (none); eight: before the
        # residual CUSUM (none); nine: before its clearing horizon (the default: a scoring rule,
        # nothing fitted depends on it); ten: before the episode-rate threshold (off).
        lags, ewma, var_keep, far, folds, rel, abs_, *rest = raw["spec"]
        slow = rest[0] if rest else 1.0
        cusum_k = rest[1] if len(rest) > 1 else 0.0
        clear = rest[2] if len(rest) > 2 else CUSUM_CLEAR
        per_window = rest[3] if len(rest) > 3 else 0.0
        spec = PcaSpec(
            int(lags),
            float(ewma),
            float(var_keep),
            float(far),
            int(folds),
            float(rel),
            float(abs_),
            float(slow),
            float(cusum_k),
            int(clear),
            float(per_window),
        )
        lim_t2, lim_spe, thr, *more = (float(v) for v in raw["limits"])
        scale = raw.get("res_scale")
        fit = cls(
            spec,
            np.asarray(raw["mean"], np.float64),
            np.asarray(raw["std"], np.float64),
            np.asarray(raw["center"], np.float64),
            np.asarray(raw["load"], np.float64).reshape(len(raw["center"]), -1),
            np.asarray(raw["eig"], np.float64),
            lim_t2,
            lim_spe,
            thr,
            None if scale is None else np.asarray(scale, np.float64),
            more[0] if more else 0.0,
        )
        d = fit.n_inputs
        cusum_ok = spec.cusum_k <= 0.0 or (
            spec.cusum_clear >= 1
            and fit.res_scale is not None
            and fit.res_scale.shape == fit.center.shape
            and bool((fit.res_scale > 0).all())
            and fit.lim_cusum > 0
        )
        ok = (
            fit.std.shape == (d,)
            and fit.center.shape == (d * blocks(spec),)
            and fit.load.shape[1] == fit.eig.shape[0]
            and bool((fit.std > 0).all() and (fit.eig > 0).all())
            and min(lim_t2, lim_spe, thr) > 0
            and cusum_ok
            and all(np.isfinite(a).all() for a in (fit.mean, fit.center, fit.load))
        )
        if not ok:
            raise ValueError("inconsistent shapes or non-positive limits")
        return fit


def _ewma(z: F64, alpha: float) -> F64:
    if alpha >= 1.0:
        return z
    out = np.empty_like(z)
    acc = z[0].copy()
    for i in range(z.shape[0]):
        acc += alpha * (z[i] - acc)
        out[i] = acc
    return out


def _stack(z: F64, lags: int) -> F64:
    """Rows ``[z_t, z_{t-1}, ..., z_{t-lags}]`` for every t with a full history."""
    if lags == 0:
        return z
    n = z.shape[0]
    return np.hstack([z[lags - j : n - j] for j in range(lags + 1)])


def _weights(spec: PcaSpec) -> list[float]:
    """EWMA weights of the smoothed blocks beside the raw rows, in row order."""
    return [a for a in (spec.ewma, spec.ewma_slow) if a < 1.0]


def blocks(spec: PcaSpec) -> int:
    """Copies of the inputs in a prepared row: (raw [+ smoothed] [+ slowly smoothed]) x (lags + 1)."""
    return (1 + len(_weights(spec))) * (spec.lags + 1)


def _scales(z: F64, spec: PcaSpec) -> F64:
    """The standardised rows, and beside them their EWMA (and slower EWMA) when smoothing is on.

    Both: smoothing finds slow drifts the raw rows hide in noise, but averages away fast
    oscillations (a sticking valve) that the raw rows show.
    """
    return np.hstack([z, *(_ewma(z, a) for a in _weights(spec))])


def prepare(x: F64, mean: F64, std: F64, spec: PcaSpec) -> F64:
    """Raw rows (time order) to the stacked, standardised (and smoothed) rows the subspace sees."""
    return _stack(_scales((x - mean) / std, spec), spec.lags)


def _subspace(z: F64, var_keep: float) -> tuple[F64, F64, F64]:
    center = z.mean(axis=0)
    zc = z - center
    # SVD of the data: eigenvalues of the covariance without forming it.
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    eig = s * s / max(z.shape[0] - 1, 1)
    total = float(eig.sum())
    if total <= 0.0:
        return center, vt[:1].T, np.ones(1)
    k = int(np.searchsorted(np.cumsum(eig) / total, var_keep) + 1)
    k = min(k, max(1, z.shape[1] - 1), int((eig > 1e-12 * total).sum()))
    return center, vt[:k].T, eig[:k]


def _stats(z: F64, center: F64, load: F64, eig: F64) -> tuple[F64, F64, F64]:
    """T², SPE and the residuals of rows ``z`` under a subspace."""
    zc = z - center
    t = zc @ load
    t2 = (t * t / eig).sum(axis=1)
    resid = zc - t @ load.T
    spe = (resid * resid).sum(axis=1)
    return t2, spe, resid


_AC_CAP = 0.99  # a residual wandering like a random walk is scaled as if its lag-1 correlation were this


def _long_run_scale(resid: F64, spec: PcaSpec) -> F64:
    """Each residual column's long-run spread: its spread times the AR(1) variance inflation.

    A persistent deviation of an autocorrelated residual is normal for as many rows as it stays
    correlated; measured in long-run spreads it accumulates in the CUSUM only as far as it is
    unusual for that column (the columns of smoothed blocks are strongly autocorrelated).
    """
    spread = np.maximum(resid.std(axis=0), spec.min_std_abs * 1e-3)
    u = (resid - resid.mean(axis=0)) / spread
    ac = (u[:-1] * u[1:]).mean(axis=0) / np.maximum((u * u).mean(axis=0), 1e-12)
    ac = np.clip(ac, 0.0, _AC_CAP)
    return np.asarray(spread * np.sqrt((1.0 + ac) / (1.0 - ac)), np.float64)


def _cusum_run(
    resid: F64, scale: F64, k: float, sums: CusumSums | None = None, cap: float = math.inf
) -> tuple[F64, CusumSums]:
    """Per row, each residual column's larger CUSUM after it; continues ``sums`` (updated) if given."""
    state = CusumSums.zeros(resid.shape[1]) if sums is None else sums
    u = resid / scale
    out = np.empty_like(u)
    for i in range(u.shape[0]):
        out[i] = state.step(u[i], k, cap)
    return out, state


def cusum_cap(fit: PcaFit) -> float:
    """The most a residual CUSUM sum is held at: ``cusum_clear`` allowances above its alarm level.

    The clearing rule.  Unbounded, a sum grows for as long as a fault lasts and, once the
    residuals are back at their normal mean, falls by the allowance per window: the alarm of a
    fault that lasted hours would clear hours after it ended.  Held at this cap it falls below the
    alarm level within about ``cusum_clear`` windows.  Below the alarm level the cap never acts, so
    the first crossing - a fault's detection delay - is the same as without it, and a capped sum
    is never above the uncapped one: it flags a subset of the windows the uncapped CUSUM flags.
    """
    return fit.lim_cusum * fit.threshold + fit.spec.cusum_clear * fit.spec.cusum_k


EPISODE_RUN = 2  # flagged windows in a row no commissioning fold may hold (the episodes' default on-delay)


def episode_limit(folds: Sequence[F64], q: float, run: int = EPISODE_RUN) -> float:
    """A limit over out-of-fold scores: their ``q`` quantile, raised until no fold holds ``run`` windows above it in a row.

    The quantile alone states a share of flagged windows, but alarms are raised on ``run`` of them
    in a row.  For a statistic judged window by window (T², SPE) the top windows are scattered and
    the on-delay keeps them from raising anything; the residual CUSUM's top windows are one or two
    excursions that each stay above the quantile for several windows: at the quantile alone the
    commissioning's own normal data raise an episode (on TEP's d00, out of fold: one in 25 h, where
    T² and SPE raise none), so new normal data keep raising them at that rate.  Raised to the
    largest ``run``-window minimum, the limit lets the commissioning raise none, whatever the
    statistic's autocorrelation.
    """
    peak = 0.0
    for scores in folds:
        if scores.shape[0] >= run:
            peak = max(peak, float(_run_statistic(scores, run).max()))
    return max(float(np.quantile(np.concatenate(list(folds)), q)), peak, 1e-9)


#: Flagged windows fewer than this many apart are one episode: the episode logic's default clearing.
EPISODE_CLEAR = 3
#: Share of the run statistic's windows above the level its tail is fitted from (episode_rate_limit).
TAIL_SHARE = 0.1


def _run_statistic(scores: F64, run: int) -> F64:
    """Per window, the least of ``run`` consecutive scores: above a limit where ``run`` flagged windows raise."""
    return np.asarray(np.lib.stride_tricks.sliding_window_view(scores, run).min(axis=1), np.float64)


def _cluster_peaks(x: F64, level: float, gap: int) -> F64:
    """The largest value of each cluster of ``x`` above ``level`` (clusters fewer than ``gap`` apart are one)."""
    above = np.flatnonzero(x > level)
    if above.size == 0:
        return np.empty(0)
    cut = np.flatnonzero(np.diff(above) > gap) + 1
    return np.array([float(x[c[0] : c[-1] + 1].max()) for c in np.split(above, cut)])


def episode_rate_limit(
    folds: Sequence[F64],
    per_window: float,
    run: int = EPISODE_RUN,
    tail: float = TAIL_SHARE,
    gap: int = EPISODE_CLEAR,
) -> float:
    """The level at which out-of-fold scores would raise ``per_window`` episodes per window, by their tail.

    :func:`episode_limit` lets the commissioning's own folds raise no episode; after a day of
    commissioning that says "none in a day", which does not bound the rate on new normal data near
    one a day.  Here the tail of the run statistic (the least of ``run`` windows in a row, the
    level ``run`` flagged windows exceed) is extrapolated, peaks over threshold: above ``u``, its
    ``1 - tail`` quantile pooled over folds, the episodes (clusters of windows above ``u``, fewer
    than ``gap`` apart merged as the episode logic merges them) come at a rate ``lam`` per window,
    and their peaks' excesses over ``u`` are fitted by an exponential of mean ``beta`` (its maximum
    likelihood fit), so episodes above ``L`` come at ``lam * exp(-(L - u) / beta)``, set equal to
    ``per_window``.  ``u`` if that rate is already below ``per_window`` at ``u`` (or nothing exceeds it).
    """
    stats = [_run_statistic(f, run) for f in folds if f.shape[0] >= run]
    if not stats:
        return 1e-9
    pooled = np.concatenate(stats)
    u = float(np.quantile(pooled, 1.0 - tail))
    if not math.isfinite(u):
        return 1e-9  # scores that are not all finite state no rate: episode_limit alone decides
    peaks = np.concatenate([_cluster_peaks(x, u, gap) for x in stats])
    lam = peaks.size / pooled.size
    if peaks.size == 0 or lam <= per_window:
        return max(u, 1e-9)
    beta = float((peaks - u).mean())
    return u + beta * math.log(lam / per_window)


def gap_rows(spec: PcaSpec) -> int:
    """Rows next to a held-out block that share its lags or most of its smoothing."""
    weights = _weights(spec)
    return spec.lags + (math.ceil(1.0 / min(weights)) if weights else 0)


def min_rows(spec: PcaSpec) -> int:
    """Fewest commissioning rows :func:`fit_pca` accepts: every fold's fit keeps at least 20 rows."""
    return spec.folds * (spec.lags + 5) + 2 * gap_rows(spec) + 20


def fit_pca(x: F64, spec: PcaSpec) -> PcaFit:
    """Fit on normal rows ``x`` (time order, shape (n, d)); limits from out-of-fold scores."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    if n < min_rows(spec):
        raise ValueError(f"novelty: {n} normal rows: at least {min_rows(spec)} needed for {spec.folds} folds")
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), np.maximum(spec.min_std_rel * np.abs(mean), spec.min_std_abs))
    z = prepare(x, mean, std, spec)
    bounds = np.linspace(0, z.shape[0], spec.folds + 1).astype(int)
    oof_t2: list[F64] = []
    oof_spe: list[F64] = []
    oof_cus: list[F64] = []
    gap = gap_rows(spec)
    cusum = spec.cusum_k > 0.0
    for f in range(spec.folds):
        lo, hi = bounds[f], bounds[f + 1]
        # Rows next to the held-out block share lags/smoothing with it: leave them out of the fit.
        keep = np.r_[0 : max(lo - gap, 0), min(hi + gap, z.shape[0]) : z.shape[0]]
        c, p, e = _subspace(z[keep], spec.var_keep)
        t2, spe, resid = _stats(z[lo:hi], c, p, e)
        oof_t2.append(t2)
        oof_spe.append(spe)
        if cusum:
            # The held-out block's CUSUM starts from zero, its scale from the rows the fold fits;
            # uncapped (the cap, cusum_cap, only acts above the alarm level these set).
            scale = _long_run_scale(_stats(z[keep], c, p, e)[2], spec)
            oof_cus.append(_cusum_run(resid, scale, spec.cusum_k)[0].max(axis=1))
    q = 1.0 - spec.far
    lim_t2 = episode_limit(oof_t2, q)
    lim_spe = episode_limit(oof_spe, q)
    combined = [np.maximum(t2 / lim_t2, spe / lim_spe) for t2, spe in zip(oof_t2, oof_spe, strict=True)]
    lim_cus = 0.0
    if cusum:
        lim_cus = episode_limit(oof_cus, q)
        combined = [np.maximum(c, cus / lim_cus) for c, cus in zip(combined, oof_cus, strict=True)]
    threshold = episode_limit(combined, q)
    if spec.episodes_per_window > 0.0:
        # A stated episode rate on new normal data, never below what the commissioning showed.
        threshold = max(threshold, episode_rate_limit(combined, spec.episodes_per_window))
    center, load, eig = _subspace(z, spec.var_keep)
    scale_all = _long_run_scale(_stats(z, center, load, eig)[2], spec) if cusum else None
    return PcaFit(spec, mean, std, center, load, eig, lim_t2, lim_spe, threshold, scale_all, lim_cus)


def score_rows(fit: PcaFit, z: F64, sums: CusumSums | None = None) -> tuple[F64, F64, F64]:
    """Scores (anomalous above 1), T² and SPE of prepared rows.

    With the residual CUSUM on, the rows are one run in time order: its sums continue ``sums``
    (updated in place) or start from zero.
    """
    t2, spe, resid = _stats(z, fit.center, fit.load, fit.eig)
    ratio = np.maximum(t2 / fit.lim_t2, spe / fit.lim_spe)
    if fit.spec.cusum_k > 0.0 and fit.res_scale is not None:
        cus = _cusum_run(resid, fit.res_scale, fit.spec.cusum_k, sums, cusum_cap(fit))[0].max(axis=1)
        ratio = np.maximum(ratio, cus / fit.lim_cusum)
    return ratio / fit.threshold, t2, spe


def score_row(fit: PcaFit, z: F64, sums: CusumSums | None = None) -> float:
    """The score (anomalous above 1) of one prepared row ``(1, m)``: :func:`score_rows`' first.

    Without the residual CUSUM, T² and SPE are one compiled call where built (within
    NOVELTY_TOLERANCE of numpy's, relative): after a busy neighbour's time slice each of the
    dozen numpy calls it replaces comes back from memory (BENCHMARKS.md).
    """
    if _pca_row is not None and not (fit.spec.cusum_k > 0.0 and fit.res_scale is not None):
        got = _pca_row(z, fit.center, fit.load, fit.eig)
        if got is not None:
            a, b = got[0] / fit.lim_t2, got[1] / fit.lim_spe
            return (a if a > b or math.isnan(a) else b) / fit.threshold  # as np.maximum: a NaN wins
    return float(score_rows(fit, z, sums)[0][0])


def contributions(
    fit: PcaFit, z: F64, keys: Sequence[str], top: int = 5, sums: CusumSums | None = None
) -> dict[str, float]:
    """Each input's share of one prepared row's score (T², SPE residuals and CUSUM sums, over lags)."""
    zc = z - fit.center
    t = zc @ fit.load
    t2_part = np.maximum(zc * (fit.load @ (t / fit.eig)), 0.0) / fit.lim_t2
    resid = zc - t @ fit.load.T
    parts = t2_part + resid * resid / fit.lim_spe
    if sums is not None and fit.lim_cusum > 0.0 and fit.res_scale is not None:
        cus = np.maximum(sums.up, sums.down)
        pca = max(float(t2_part.sum()), float((resid * resid).sum()) / fit.lim_spe)
        # The CUSUM names the inputs only when it raised the score: its sums also hold the
        # ordinary wander of every column, which would blur an explanation T² or SPE gives.  For
        # the same reason only the columns at its alarm level (at least the largest) are counted:
        # weighted by their spreads, a wide column's ordinary wander far below the level
        # outweighed the narrow column that raised the alarm (TEP d00_te: an alarm held 2.85 h by
        # v26's sum named v04, v30, v18).  Its sums count each column in its own spreads; back in
        # the inputs' standardised units and squared, as SPE's residuals, a broken relation is put
        # on the input that moved most.
        largest = float(cus.max())
        if largest / fit.lim_cusum > pca:
            level = min(fit.lim_cusum * fit.threshold, largest)
            parts = np.where(cus >= level, cus * fit.res_scale, 0.0) ** 2
    per = parts.reshape(blocks(fit.spec), fit.n_inputs).sum(axis=0)
    total = float(per.sum())
    if not total > 0.0:
        return {}
    order = np.argsort(-per)[:top]
    return {keys[j]: round(float(per[j] / total), 4) for j in order if per[j] > 0.0}


# ---- the gateway model -------------------------------------------------------------------------


class NoveltyUse(BaseModel):
    """The ``[models.novelty]`` table: per-machine novelty detection (present = on)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    subject_kind: str = "industrial"
    subjects: list[str] = Field(default_factory=list)  # empty: every subject of that kind
    # Stream metric names (whole, or last segments) to use; empty: every numeric stream it has.
    inputs: list[str] = Field(default_factory=list)
    features: list[str] = Field(default_factory=lambda: ["mean"])
    # Metrics (whole names or last segments) whose level wanders with ambient or run time (a
    # motor's temperature): of these only the non-level features are inputs, never the mean.
    spread_only: list[str] = Field(default_factory=list)
    # The window (s) its features are taken over; None: the pipeline's window_s.
    window_s: float | None = Field(None, gt=0, le=3600)
    commissioning_s: float = Field(1800.0, gt=0, le=30 * 86_400)
    false_alarm_rate: float = Field(0.01, gt=0, lt=0.5)
    # Defaults: the settings models/recipes/novelty_tep.py chose on its tuning faults (1.4.0: the
    # card's choice, among points that also follow slow normal drift as the gateway adapts; 1.5.0:
    # and hold on long normal operation, which moved the CUSUM's allowance to 1.0).  The
    # residual CUSUM at the chosen allowance is on (CUSUM_AUTO_K) only when commissioning_s is at
    # least CUSUM_AUTO_MIN_S (six hours): after a shorter commissioning it flags the simulated
    # pump's slow wander.
    lags: int = Field(0, ge=0, le=10)
    ewma: float = Field(0.5, gt=0, le=1)
    ewma_slow: float = Field(1.0, gt=0, le=1)  # 1: no slow block
    # Residual CUSUM's allowance in long-run spreads; 0: none; unset: see residual_cusum().
    cusum_k: float | None = Field(None, ge=0, le=5)
    # The CUSUM's clearing horizon in windows (PcaSpec.cusum_clear): its alarm clears about this
    # many windows after the residuals are back.  A scoring rule, nothing fitted depends on it, so
    # a change applies to a commissioned machine at the next start.
    cusum_clear: int = Field(CUSUM_CLEAR, ge=1, le=10_000)
    var_keep: float = Field(0.95, gt=0, lt=1)
    # Expected false episodes per day of normal operation the threshold is set at, from the tail
    # of the commissioning's out-of-fold scores at this machine's hop (episode_rate_limit; never
    # below the limit that lets the commissioning raise none); 0 or None: that limit alone (1.5.0).
    # The stored fit's key holds it, so a machine commissioned under another value recommissions.
    false_episodes_per_day: float | None = Field(FALSE_EPISODES_PER_DAY, ge=0, le=1000)
    adapt_rate: float = Field(0.001, ge=0, lt=0.5)  # step of the inputs' means on normal windows; 0: none
    latency_budget_us: float = Field(2000.0, gt=0)
    # Share of its expected samples each input stream must hold in a window for it to be judged
    # (below: indeterminate "partial", neither commissioned on nor adapted to); 0: every window.
    min_coverage: float = Field(DEFAULT_MIN_COVERAGE, ge=0, le=1)

    def residual_cusum(self) -> tuple[float, str]:
        """The residual CUSUM's allowance (0: off) and why, for the log and ``edgetwin status``."""
        if self.cusum_k is not None:
            return self.cusum_k, "set in [models.novelty]"
        if self.commissioning_s >= CUSUM_AUTO_MIN_S:
            return CUSUM_AUTO_K, f"default: commissioning_s >= {CUSUM_AUTO_MIN_S:g} s"
        return 0.0, f"default: off below commissioning_s {CUSUM_AUTO_MIN_S:g} s"

    def wants(self, metric: str) -> bool:
        """True if a stream of this metric name is an input (``inputs``: whole names or last segments)."""
        return not self.inputs or named(metric, self.inputs)

    def features_of(self, metric: str) -> list[str]:
        """The features of a wanted stream that are inputs (no level of a ``spread_only`` metric)."""
        if self.spread_only and named(metric, self.spread_only):
            return [f for f in self.features if f != "mean"]
        return self.features


def named(metric: str, names: Sequence[str]) -> bool:
    """True if ``metric`` is one of ``names``, whole or by its last segments."""
    return any(metric == m or metric.endswith("/" + m) for m in names)


@dataclass(slots=True)
class _Subject:
    keys: tuple[str, ...]
    rows: list[list[float]] = field(default_factory=list)
    fit: PcaFit | None = None
    smooth: F64 | None = None  # EWMA state of the standardised input
    slow: F64 | None = None  # the slower EWMA's state
    sums: CusumSums | None = None  # the residual CUSUM's sums
    history: deque[F64] = field(default_factory=deque)
    normal_run: int = 0
    adapted: int = 0
    warm: int = 0  # windows scored since the detector (re)started for this subject
    # Each input stream's unit (metric name: unit as normalise spells it); an input not listed
    # (a state stored before units were kept) takes its stream's unit from the next window.
    units: dict[str, str] = field(default_factory=dict)
    why: str = ""  # why it commissions again: "X to Y: input" after a change of unit
    open: bool = False  # its last judged window anomalous (kept across a change of unit)


class NoveltyModel:
    """A :class:`gateway.contracts.WindowModel` commissioning and scoring each machine on its own."""

    def __init__(
        self,
        use: NoveltyUse,
        *,
        hop_s: float,
        state_dir: Path | None = None,
        name: str = "novelty",
        clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.name = name
        self.use = use
        self.window_s = use.window_s
        self.subject_kind = use.subject_kind
        # Explain every scored window (a fusion over this detector may flag one it does not).
        # A window it does not flag is explained when its contributions are first read: a fusion
        # reads them only for the windows it flags, and the decomposition cost a quarter of a
        # member's window, features included (BENCHMARKS.md).
        self.explain_all = False
        # Windows explained so far (flagged ones when scored, the others when read).
        self.explained = 0
        self._explained_lock = threading.Lock()  # a deferred explanation is read on another thread
        cusum_k, self._cusum_why = use.residual_cusum()
        self.spec = PcaSpec(
            use.lags,
            use.ewma,
            use.var_keep,
            use.false_alarm_rate,
            ewma_slow=use.ewma_slow,
            cusum_k=cusum_k,
            cusum_clear=use.cusum_clear,
            episodes_per_window=(use.false_episodes_per_day or 0.0) * hop_s / 86_400.0,
        )
        self._need = max(min_rows(self.spec), math.ceil(use.commissioning_s / hop_s))
        self._state_dir = state_dir
        self._subjects = frozenset(use.subjects)
        self._clock = clock
        self._subj: dict[str, _Subject] = {}
        self._recommissioned: list[str] = []  # subjects commissioned before the rate threshold (_before_rate)
        self.latencies_us: deque[float] = deque(maxlen=4096)
        self.adapt_guard = use.lags + 5
        self.coverage = Coverage(name, use.min_coverage)
        slowest = min(use.ewma, use.ewma_slow)
        self._warmup = use.lags + (0 if slowest >= 1.0 else math.ceil(3.0 / slowest))

    @property
    def commissioning_windows(self) -> int:
        """Complete windows a subject needs before it is scored."""
        return self._need

    # ---- loop side ---------------------------------------------------------------------

    def applies_to(self, record: WindowRecord) -> bool:
        """Windows of the configured subject kind (and subjects) with at least one input stream."""
        if record.kind != self.use.subject_kind or (self._subjects and record.subject not in self._subjects):
            return False
        return any(self._wanted(sf.stream.metric.name) for sf in record.streams)

    def _wanted(self, metric: str) -> bool:
        return self.use.wants(metric)

    def subject_states(self, known: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
        """Per subject: ``commissioning`` or ``active``, with the statistics it is judged by."""
        out: dict[str, str] = {}
        subjects = {
            s
            for s, kind in known
            if kind == self.subject_kind and (not self._subjects or s in self._subjects)
        }
        # Only what the worker has loaded: reading a state file here would race with it.
        for subject in sorted(subjects | set(self._subj)):
            subj = self._subj.get(subject)
            fit = None if subj is None else subj.fit
            if subj is None:
                out[subject] = "not scored yet"
            elif fit is None:
                out[subject] = (
                    f"commissioning (unit changed from {subj.why})" if subj.why else "commissioning"
                )
            elif fit.spec.cusum_k > 0.0:
                out[subject] = f"active (T2, SPE, residual CUSUM {fit.spec.cusum_k:g}: {self._cusum_why})"
            elif self.spec.cusum_k > 0.0:
                out[subject] = "active (T2, SPE; residual CUSUM once recommissioned)"
            else:
                out[subject] = f"active (T2, SPE; residual CUSUM off: {self._cusum_why})"
        return out

    def fit_of(self, subject: str) -> PcaFit | None:
        """The subject's fitted detector, None while it commissions."""
        s = self._subj.get(subject) or self._load(subject)
        return None if s is None else s.fit

    # ---- worker-thread side ------------------------------------------------------------

    def _keys(self, record: WindowRecord) -> tuple[str, ...]:
        return tuple(
            sorted(
                f"{sf.stream.metric.name}.{feat}"
                for sf in record.streams
                if self._wanted(sf.stream.metric.name)
                for feat in self.use.features_of(sf.stream.metric.name)
            )
        )

    @staticmethod
    def _values(record: WindowRecord) -> dict[str, float]:
        return {
            f"{sf.stream.metric.name}.{feat}": v for sf in record.streams for feat, v in sf.features.items()
        }

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        """Commission or score each window in time order; see the module docstring."""
        t0 = self._clock()
        out = [self._one(r) for r in records]
        if records:
            self.latencies_us.append((self._clock() - t0) * 1e6 / len(records))
        return out

    def _one(self, record: WindowRecord) -> ModelResult:
        nan = math.nan
        subj = self._subj.get(record.subject) or self._load(record.subject)
        if subj is None:
            subj = _Subject(self._keys(record))
            log.info(
                "models %s: subject %s: commissioning on %d inputs", self.name, record.subject, len(subj.keys)
            )
        wanted = [sf for sf in record.streams if self._wanted(sf.stream.metric.name)]
        subj = self._check_units(record, subj, wanted)
        self._subj[record.subject] = subj
        if self.coverage.short_stream(record.subject, wanted):
            # Features over part of the span: not commissioned on, not judged, and no adaptation
            # follows until a run of whole normal windows (as after a gap).
            subj.normal_run = 0
            return PARTIAL
        values = self._values(record)
        x = np.array([values.get(k, nan) for k in subj.keys])
        present = int(np.isfinite(x).sum())
        if subj.fit is None:
            if present == len(subj.keys):
                subj.rows.append(x.tolist())
                if len(subj.rows) >= self._need:
                    self._commission(record.subject, subj)
                elif len(subj.rows) % _SAVE_EVERY == 0:
                    self._save(record.subject, subj)
            # Recommissioned with an anomaly open: that anomaly is not judged until it is commissioned.
            return ModelResult(nan, False, reason="unit_changed" if subj.open else "commissioning")
        fit = subj.fit
        if 2 * present < len(subj.keys):
            subj.normal_run = 0
            gap = any(sf.gap for sf in wanted)
            return ModelResult(nan, False, reason="gap" if gap else "missing_inputs")
        z = (x - fit.mean) / fit.std
        z[~np.isfinite(z)] = 0.0  # an absent input sits at its normal value
        if subj.smooth is None or subj.slow is None:
            subj.smooth, subj.slow = z, z
        else:
            subj.smooth = subj.smooth + fit.spec.ewma * (z - subj.smooth)
            subj.slow = subj.slow + fit.spec.ewma_slow * (z - subj.slow)
        parts = [z]
        if fit.spec.ewma < 1.0:
            parts.append(subj.smooth)
        if fit.spec.ewma_slow < 1.0:
            parts.append(subj.slow)
        subj.history.appendleft(np.concatenate(parts))
        while len(subj.history) > fit.spec.lags + 1:
            subj.history.pop()
        subj.warm += 1
        if subj.warm <= self._warmup:
            # The smoothed input starts at one raw window, far noisier than the smoothed rows
            # the subspace was fitted on: not judged until the smoothing (and lags) settle.
            return ModelResult(nan, False, reason="commissioning")
        row = np.concatenate(list(subj.history))[None, :]
        if fit.spec.cusum_k > 0.0 and subj.sums is None:
            subj.sums = CusumSums.zeros(row.shape[1])
        score = score_row(fit, row, subj.sums)
        anomalous = score > 1.0
        subj.open = anomalous
        if anomalous:
            subj.normal_run = 0
            return ModelResult(score, True, self._explain(fit, row[0], subj.keys, subj.sums))
        subj.normal_run += 1
        if self.use.adapt_rate > 0 and subj.normal_run > self.adapt_guard:
            self._adapt(record.subject, subj, x)
        if not self.explain_all:
            return ModelResult(score, False)
        # What the explanation reads stays as it is now: the row is this window's own, and the
        # fit's subspace and limits are never changed in place (adaptation rebinds the means).
        return ModelResult(score, False, Deferred(functools.partial(self._explain, fit, row[0], subj.keys)))

    def _check_units(
        self, record: WindowRecord, subj: _Subject, wanted: Sequence[StreamFeatures]
    ) -> _Subject:
        """``subj``, or a subject commissioning afresh when an input's unit is not the one it learned in."""
        changed: dict[str, str] = {}
        units = dict(subj.units)
        for sf in wanted:
            # "" (a driver that could not read the unit) is unknown, never a change; UCUM "1"
            # (dimensionless) is a unit like any other.
            metric, unit = sf.stream.metric.name, normalise(sf.stream.metric.unit or "")
            known = units.get(metric)
            if unit and known and known != unit:
                changed[metric] = f"{known} to {unit}: {metric}"
            if unit:
                units[metric] = unit
        if not changed:
            if units != subj.units:
                # Unknown until now (first seen, stored without, or unread): taken, and stored with a
                # fitted subject so that a change while the gateway is down is seen.
                subj.units = units
                if subj.fit is not None:
                    self._save(record.subject, subj)
            return subj
        why = "; ".join(changed.values())
        log.warning(
            "models %s: subject %s: unit changed from %s: its statistics are in the old unit, so it is "
            "commissioned again from this window (%d windows) and not judged until then",
            self.name,
            record.subject,
            why,
            self._need,
        )
        self.recommission(record.subject)
        fresh = _Subject(self._keys(record), units=units, why=why, open=subj.open)
        # Stored at once: a restart must not bring the statistics in the old unit back.
        self._save(record.subject, fresh)
        return fresh

    def _explain(
        self, fit: PcaFit, row: F64, keys: tuple[str, ...], sums: CusumSums | None = None
    ) -> dict[str, float]:
        """One window's contributions, counted in ``explained``."""
        with self._explained_lock:
            self.explained += 1
        return contributions(fit, row, keys, sums=sums)

    def _adapt(self, subject: str, subj: _Subject, x: F64) -> None:
        """Move each input's mean a small step towards a clearly normal window."""
        fit = subj.fit
        assert fit is not None
        # Only the means (the spreads used to adapt too).  Every mean takes the same step, so a
        # linear relation the inputs keep (x_a = b x_b + c) holds between the means and the
        # residuals stay centred.  A spread adapted input by input rescales each input on its
        # own while the subspace, the residual scales and the limits keep the commissioning
        # spreads: an input rescaled by s0/s turns each of its ordinary excursions z into a
        # residual (s0/s - 1) z on the inputs tied to it, slow and persistent as the excursion,
        # which the residual CUSUM accumulates.  And measured around a mean that follows the
        # input, the spread loses the input's wander slower than the adaptation, shrinking it
        # by as much as that wander held (TEP d00_te and tests/test_novelty.py, BENCHMARKS.md).
        r = self.use.adapt_rate
        fit.mean = fit.mean + r * np.where(np.isfinite(x), x - fit.mean, 0.0)
        subj.adapted += 1
        if subj.adapted % 100 == 0:
            self._save(subject, subj)

    def _commission(self, subject: str, subj: _Subject) -> None:
        try:
            subj.fit = fit_pca(np.asarray(subj.rows, np.float64), self.spec)
        except (ValueError, np.linalg.LinAlgError) as exc:
            log.warning(
                "models %s: subject %s: commissioning failed: %s: collecting again", self.name, subject, exc
            )
            subj.rows.clear()
            return
        log.info(
            "models %s: subject %s commissioned on %d windows (%d inputs, %d components; residual CUSUM %s: %s; "
            "threshold %.4g%s)",
            self.name,
            subject,
            len(subj.rows),
            len(subj.keys),
            subj.fit.eig.shape[0],
            f"{self.spec.cusum_k:g}" if self.spec.cusum_k > 0.0 else "off",
            self._cusum_why,
            subj.fit.threshold,
            f" at {self.use.false_episodes_per_day:g} false episodes/day"
            if self.use.false_episodes_per_day
            else "",
        )
        if subj.open:
            log.warning(
                "models %s: subject %s: commissioned again while an anomaly was open: its new baseline "
                "holds that condition, so the anomaly may end against it",
                self.name,
                subject,
            )
        subj.rows = []
        subj.why = ""
        self._save(subject, subj)

    def recommission(self, subject: str) -> None:
        """Forget a subject (after maintenance): it commissions again from its next windows."""
        self._subj.pop(subject, None)
        path = self._path(subject)
        if path is not None:
            path.unlink(missing_ok=True)

    # ---- persistence ---------------------------------------------------------------------

    def _path(self, subject: str) -> Path | None:
        return state_file(self._state_dir, self.name, subject)

    def _load(self, subject: str) -> _Subject | None:
        path = self._path(subject)
        if path is None or not path.exists():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            key = raw["spec"]
            if raw["version"] not in (1, STATE_VERSION) or key not in (
                list(self._spec_key()),
                list(self._spec_key(cusum=False)),
            ):
                if raw["version"] in (1, STATE_VERSION) and key in (
                    list(self._spec_key(rate=False)),
                    list(self._spec_key(cusum=False, rate=False)),
                ):
                    self._before_rate(subject)
                else:
                    log.info(
                        "models %s: stored state of another version or settings; commissioning again",
                        self.name,
                    )
                return None
            subj = _Subject(
                tuple(raw["keys"]),
                [list(map(float, r)) for r in raw["rows"]],
                # Version 1 kept no units: each input's is taken from its next window.
                units={str(m): str(u) for m, u in dict(raw.get("units", {})).items()},
                why=str(raw.get("why", "")),
            )
            subj.fit = None if raw["fit"] is None else PcaFit.from_json(raw["fit"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("models %s: stored state %s unusable (%s); commissioning again", self.name, path, exc)
            return None
        if raw["version"] == 1:
            log.info(
                "models %s: subject %s: stored state has no units (version 1): kept, each input in its "
                "stream's unit from the next window",
                self.name,
                subject,
            )
        if subj.fit is not None and subj.fit.n_inputs != len(subj.keys):
            log.warning(
                "models %s: stored state %s: inputs and fit differ; commissioning again", self.name, path
            )
            return None
        if subj.fit is not None and subj.fit.spec.cusum_clear != self.spec.cusum_clear:
            # The clearing horizon is a scoring rule: the configured one applies to a stored fit.
            subj.fit.spec = dataclasses.replace(subj.fit.spec, cusum_clear=self.spec.cusum_clear)
        if subj.fit is not None and subj.fit.spec.cusum_k != self.spec.cusum_k:
            # Commissioned before the residual CUSUM (its rows are gone): T² and SPE go on
            # from the stored fit rather than leaving the machine unwatched while it commissions again.
            log.info(
                "models %s: subject %s commissioned without the residual CUSUM: scored without it "
                "until recommissioned",
                self.name,
                subject,
            )
        self._subj[subject] = subj
        return subj

    def _before_rate(self, subject: str) -> None:
        # A machine commissioned with the threshold at episode_limit alone (1.5.0's, the default
        # before 1.6.0) is commissioned again at the configured rate: said once, not per machine.
        self._recommissioned.append(subject)
        if len(self._recommissioned) == 1:
            log.warning(
                "models %s: subject %s (and any other machine commissioned before the threshold was set at "
                "%g false episodes/day, false_episodes_per_day) is commissioned again from its next windows, "
                "unscored until then (its old fit is overwritten at the first save, within 20 windows); to keep "
                "the old fits set false_episodes_per_day = 0 in [models.novelty] before upgrading",
                self.name,
                subject,
                self.use.false_episodes_per_day,
            )

    def _spec_key(self, *, cusum: bool = True, rate: bool = True) -> tuple[float, ...]:
        s = self.spec if cusum else dataclasses.replace(self.spec, cusum_k=0.0)
        s = s if rate else dataclasses.replace(s, episodes_per_window=0.0)
        key: tuple[float, ...] = (s.lags, s.ewma, s.var_keep, s.far, self._need)
        if self.window_s is not None:
            # Features over another length are not what it was fitted on; without a window of its
            # own (the pipeline's) the key stays the one states were stored under before.
            key = (*key, s.ewma_slow, self.window_s)
        elif s.ewma_slow < 1.0 or s.cusum_k > 0.0:
            # Without the slow block and the CUSUM the key is 1.0.0's (with the slow block alone,
            # 1.1.0's), so states commissioned before them still load.
            key = (*key, s.ewma_slow)
        key = key if s.cusum_k <= 0.0 else (*key, s.cusum_k)
        # A threshold at a stated episode rate is another fit; without it the key is 1.5.0's.
        return key if s.episodes_per_window <= 0.0 else (*key, s.episodes_per_window)

    def _save(self, subject: str, subj: _Subject) -> None:
        path = self._path(subject)
        body = {
            "version": STATE_VERSION,
            "spec": list(self._spec_key()),
            "keys": list(subj.keys),
            "rows": subj.rows,
            "fit": None if subj.fit is None else subj.fit.to_json(),
            "units": subj.units,
            "why": subj.why,
        }
        store_json(path, body, self.name)


def build_novelty(use: NoveltyUse | None, *, hop_s: float, state_dir: Path | None) -> list[NoveltyModel]:
    """The novelty model the ``[models.novelty]`` table asks for (none without it)."""
    return [] if use is None else [NoveltyModel(use, hop_s=hop_s, state_dir=state_dir)]
