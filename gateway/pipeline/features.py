"""Window features: pure, vectorised numpy functions of arrays, with known answers to test against.

Every function returns plain floats in a dict and never NaN or infinity: a feature that cannot
be computed (too few points, no time spread, non-finite input) is left out, so consumers test
for a key rather than for NaN.  Non-finite inputs are ignored, never interpolated.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from gateway.compiled import compiled
from gateway.errors import CorruptDataError

F8 = npt.NDArray[np.float64]
#: The compiled one-pass features (``gateway/_window.c``): a list, or None where the numpy pass decides.
_compiled: Callable[[Sequence[F8], Sequence[F8]], list[dict[str, float]] | None] | None = compiled("features")

__all__ = [
    "basic_features",
    "basic_features_batch",
    "basic_features_finite",
    "basic_features_streams",
    "hrv_features",
    "missing_fraction",
    "state_features",
    "waveform_features",
]

#: True where the one-pass features run compiled (``gateway/_window.c``, built at install).
COMPILED = _compiled is not None

#: Successive RR differences above this count towards pNN50 (milliseconds).
PNN_THRESHOLD_MS = 50.0


def _finite_dict(**values: float) -> dict[str, float]:
    return {k: v for k, v in values.items() if math.isfinite(v)}


def basic_features_finite(t: F8, v: F8) -> dict[str, float]:
    """:func:`basic_features` for inputs already known to be finite and of equal length."""
    n = v.size
    if n == 0:
        return {}
    vmin = float(v.min())
    vmax = float(v.max())
    # Rounding can put a sum/n mean a hair outside [min, max]; clamp so constants stay exact.
    mean = min(max(float(v.sum()) / n, vmin), vmax)
    if vmin == vmax:
        out = _finite_dict(mean=mean, std=0.0, min=vmin, max=vmax)
        vc = None
    else:
        vc = v - mean
        out = _finite_dict(mean=mean, std=math.sqrt(float(vc @ vc) / n), min=vmin, max=vmax)
    if n >= 2:
        # Least squares on centred time: t_mono is ~1e5-1e6 s, so centring keeps precision.
        tc = t - float(t.sum()) / n
        den = float(tc @ tc)
        if den > 0.0:
            slope = 0.0 if vc is None else float(tc @ vc) / den
            if math.isfinite(slope):
                out["slope"] = slope
    return out


#: Values at or beyond this magnitude take the per-stream path (their squares could overflow).
_HUGE = 1e100


#: Layouts kept: a steady source repeats its window's counts, a live one rarely does (its counts
#: jitter by a sample or two), and each layout holds arrays of the window's length (~150 kB for
#: 8 streams at 40/s over 30 s): 256 of them were 3 MB resident after five minutes of a soak
#: through every driver, and still growing.
LAYOUTS_KEPT = 16


@lru_cache(maxsize=LAYOUTS_KEPT)
def _layout(counts: tuple[int, ...]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], F8]:
    """Segment starts, each row's segment, and the counts of ``counts`` values then ``counts`` times.

    The starts go on with a third block, the values' starts again past both: the segments of the
    cross products, which :func:`_streams_pass` sums with the squares in one reduction.
    """
    c = np.array(counts + counts, np.intp)
    starts = np.zeros(c.size + len(counts), np.intp)
    np.cumsum(c[:-1], out=starts[1 : c.size])
    starts[c.size :] = starts[: len(counts)] + 2 * sum(counts)
    return starts, np.repeat(np.arange(c.size, dtype=np.intp), c), c.astype(np.float64)


class _Work(NamedTuple):
    """One layout's work-array views and segment indices (see :class:`_Scratch`)."""

    x: F8  # values then times
    xv: F8  # values
    xt: F8  # times
    y: F8  # squares of values and times, then values x times
    sq: F8
    cross: F8
    bounds: F8  # r: minima, maxima, value means, time means, then the sums of y
    vmin: F8
    vmax: F8
    mean: F8
    vmean: F8
    sums: F8
    starts: npt.NDArray[np.intp]  # values', times', cross products' segment starts
    vstarts: npt.NDArray[np.intp]
    vtstarts: npt.NDArray[np.intp]
    seg: npt.NDArray[np.intp]
    n: F8


class _Scratch(threading.local):
    """Per-thread work arrays of :func:`basic_features_streams`, reused window after window.

    A window's temporaries (its values and times concatenated, their centred products) are fresh
    memory otherwise: above the mmap threshold the gateway pins (``gateway.memory``), 128 KiB or
    8 streams x 1,000 samples, each is mapped, faulted in page by page and unmapped again in every
    window, which cost more than the arithmetic.  Held here they stay resident at the largest
    window's size, three arrays per thread that computes features (the windower's): the values and
    times, their products (half as long again: squares of both, then values times times), and the
    per-stream results (seven per stream), read out with one ``tolist`` per step.  The views of
    the last layout are kept too: a steady source repeats its counts, and a dozen slices cost
    about 1 us a window.
    """

    def __init__(self) -> None:
        self.a: F8 = np.empty(0)
        self.b: F8 = np.empty(0)
        self.r: F8 = np.empty(0)
        self.key: tuple[int, ...] = ()
        self.work: _Work | None = None

    def views(self, counts: tuple[int, ...]) -> _Work:
        """The work-array views for a window of ``counts`` (contents undefined), grown with room for jittering counts."""
        work = self.work
        if work is not None and counts == self.key:
            return work
        s, nv = len(counts), sum(counts)
        if self.a.size < 2 * nv:
            room = nv + nv // 8
            self.a, self.b = np.empty(2 * room), np.empty(3 * room)
        if self.r.size < 7 * s:
            self.r = np.empty(7 * s)
        x, y, r = self.a[: 2 * nv], self.b[: 3 * nv], self.r[: 7 * s]
        starts, seg, n = _layout(counts)
        work = _Work(
            x, x[:nv], x[nv:], y, y[: 2 * nv], y[2 * nv :],
            r[: 2 * s], r[:s], r[s : 2 * s], r[2 * s : 4 * s], r[2 * s : 3 * s], r[4 * s :],
            starts, starts[:s], starts[: 2 * s], seg, n,
        )  # fmt: skip
        self.key, self.work = counts, work
        return work


_SCRATCH = _Scratch()


def basic_features_streams(ts: Sequence[F8], vs: Sequence[F8]) -> list[dict[str, float]]:
    """:func:`basic_features_finite` of several streams' windows in one numpy pass.

    ``ts[i]`` and ``vs[i]`` are one stream's finite times and values of equal length.  A window's
    streams are computed together because a dozen numpy calls on small arrays cost about the same
    as on one: per stream they were most of a window's cost.  The results equal the per-stream
    function's within rounding (sums are taken in another order: relative differences ~1e-15).
    A single non-empty stream, or values beyond +-1e100, take the per-stream function itself.
    """
    counts = tuple(map(len, vs))
    if 0 not in counts:  # the usual window: every stream has samples
        return _streams_pass(ts, vs, counts) if len(counts) > 1 else [basic_features_finite(ts[0], vs[0])]
    out: list[dict[str, float]] = [{} for _ in vs]
    idx = [i for i, c in enumerate(counts) if c]
    if len(idx) == 1:  # one stream: the per-stream function is the cheaper pass
        out[idx[0]] = basic_features_finite(ts[idx[0]], vs[idx[0]])
    elif idx:
        got = _streams_pass([ts[i] for i in idx], [vs[i] for i in idx], tuple(counts[i] for i in idx))
        for i, f in zip(idx, got, strict=True):
            out[i] = f
    return out


def _streams_pass(ts: Sequence[F8], vs: Sequence[F8], counts: tuple[int, ...]) -> list[dict[str, float]]:
    """:func:`basic_features_streams` of two or more streams, none of them empty.

    Compiled where it was built: one call, identical to the bit to the numpy pass below (the same
    sums in numpy's order), which takes what it declines (arrays other than 1-D float64 in lists,
    values beyond +-1e100).  After a busy neighbour's time slice every distinct numpy call comes
    back from memory (4-8 us each, bench_models.py --evict): the compiled pass touches one small
    loop instead of a dozen calls (cold 53-58 -> 10-12 us for 8 x 20, warm 11 -> 2 us).
    """
    if _compiled is not None:
        got = _compiled(ts, vs)
        if got is not None:
            return got
    return _numpy_pass(ts, vs, counts)


def _numpy_pass(ts: Sequence[F8], vs: Sequence[F8], counts: tuple[int, ...]) -> list[dict[str, float]]:
    """:func:`_streams_pass` in numpy: few calls, and three ``tolist``, one per step."""
    s = len(counts)
    w = _SCRATCH.views(counts)
    x, xv, mean = w.x, w.xv, w.mean
    np.concatenate((*vs, *ts), out=x)
    np.minimum.reduceat(xv, w.vstarts, out=w.vmin)
    np.maximum.reduceat(xv, w.vstarts, out=w.vmax)
    bounds = w.bounds.tolist()
    los, his = bounds[:s], bounds[s:]
    if min(los) <= -_HUGE or max(his) >= _HUGE:
        # Sums and squares could overflow, and numpy would warn where the per-stream dot products
        # do not; within the bound no feature but the slope can be non-finite (times are clock seconds).
        return [basic_features_finite(t, v) for t, v in zip(ts, vs, strict=True)]
    np.add.reduceat(x, w.vtstarts, out=mean)
    mean /= w.n
    means = w.vmean.tolist()
    # Rounding can put a sum/n mean a hair outside [min, max]; clamp so constants stay exact.  Only
    # a (near) constant stream can be outside: the check on lists spares two numpy calls a window.
    if min(map(operator.sub, means, los)) < 0.0 or max(map(operator.sub, means, his)) > 0.0:
        np.maximum(w.vmean, w.vmin, out=w.vmean)
        np.minimum(w.vmean, w.vmax, out=w.vmean)
        means = w.vmean.tolist()
    # Centred values, then centred times (t_mono ~1e5-1e6 s: keeps precision); then in one array
    # the squares of both and the values times the times, each stream's segments summed in one
    # reduction: the operations (and sums) of ``x -= mean[seg]``, ``x * x`` and ``xv * x[nv:]``.
    x -= mean.take(w.seg, out=w.sq, mode="clip")  # every index is in range: no bounds pass
    np.multiply(x, x, out=w.sq)
    np.multiply(xv, w.xt, out=w.cross)
    np.add.reduceat(w.y, w.starts, out=w.sums)
    second = w.sums.tolist()
    out: list[dict[str, float]] = []
    for c, m, lo, hi, ss, den, num in zip(
        counts, means, los, his, second[:s], second[s : 2 * s], second[2 * s :], strict=True
    ):
        # Divisions in Python as in the per-stream function: no numpy warning state per window.
        if lo == hi:
            sd, slope = 0.0, 0.0
        else:
            sd, slope = math.sqrt(ss / c), (num / den if den > 0.0 else math.nan)
        # Finite values within +-_HUGE keep mean, std, min and max finite: only the slope can fail.
        f = {"mean": m, "std": sd, "min": lo, "max": hi}
        if c >= 2 and den > 0.0 and math.isfinite(slope):
            f["slope"] = slope
        out.append(f)
    return out


def basic_features(t: F8, v: F8) -> dict[str, float]:
    """Mean, population std, min, max and least-squares slope (units per second) of ``v`` over ``t``.

    Rows with a non-finite time or value are ignored.  ``slope`` is absent with fewer than two
    points or no time spread; everything is absent for an empty input.
    """
    t = np.asarray(t, np.float64)
    v = np.asarray(v, np.float64)
    if t.shape != v.shape or t.ndim != 1:
        raise CorruptDataError(
            f"features: basic_features: t {t.shape} and v {v.shape} differ or are not 1-D: "
            "pass one time and one value per sample"
        )
    ok = np.isfinite(v) & np.isfinite(t)
    if not ok.all():
        t = t[ok]
        v = v[ok]
    return basic_features_finite(t, v)


def hrv_features(rr_ms: F8) -> dict[str, float]:
    """RMSSD, SDNN (ddof=1) and pNN50 (%) of RR intervals in milliseconds, in arrival order.

    Non-finite intervals are ignored; successive differences are taken between the finite
    intervals that remain.  All three need at least two intervals.
    """
    rr = np.asarray(rr_ms, np.float64)
    if rr.ndim != 1:
        raise CorruptDataError(
            f"features: hrv_features: rr_ms has shape {rr.shape}: pass a 1-D array of intervals"
        )
    ok = np.isfinite(rr)
    if not ok.all():
        rr = rr[ok]
    n = rr.size
    if n < 2:
        return {}
    d = np.diff(rr)
    mean = float(rr.sum()) / n
    rc = rr - mean
    return _finite_dict(
        rmssd=math.sqrt(float(d @ d) / d.size),
        sdnn=math.sqrt(float(rc @ rc) / (n - 1)),
        pnn50=100.0 * int(np.count_nonzero(np.abs(d) > PNN_THRESHOLD_MS)) / d.size,
    )


#: Fewest samples a dominant frequency is estimated from.
FDOM_MIN_SAMPLES = 16


def waveform_features(v: F8, rate_hz: float | None) -> dict[str, float]:
    """RMS, peak (largest absolute value), crest factor and dominant frequency of a waveform.

    The mean of a 50 Hz current or a vibration is about 0 whatever the load: these are what a
    technician reads instead.  ``fdom`` (Hz) is the strongest spectral peak of the mean-removed,
    Hann-windowed signal (refined between bins), only when the rate is known and the window holds
    at least :data:`FDOM_MIN_SAMPLES` samples; it is meaningful below half the rate.
    """
    x = np.asarray(v, np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return {}
    rms = math.sqrt(float(x @ x) / n)
    peak = float(np.abs(x).max())
    out = _finite_dict(rms=rms, peak=peak)
    if rms > 0.0:
        out["crest"] = peak / rms
    if rate_hz and n >= FDOM_MIN_SAMPLES:
        spectrum = np.abs(np.fft.rfft((x - float(x.mean())) * np.hanning(n)))
        spectrum[0] = 0.0
        k = int(spectrum.argmax())
        if spectrum[k] > 0.0:
            shift = 0.0
            if 0 < k < spectrum.size - 1:
                # Parabolic interpolation of the log magnitude around the peak (Hann: ~0.01 bin).
                a, b, c = (math.log(max(float(spectrum[i]), 1e-300)) for i in (k - 1, k, k + 1))
                den = a - 2.0 * b + c
                shift = 0.5 * (a - c) / den if den != 0.0 else 0.0
            out["fdom"] = (k + shift) * rate_hz / n
    return out


def state_features(v: F8) -> dict[str, float]:
    """The last value of an on-change state series and how often it changed in the window."""
    x = np.asarray(v, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {}
    return {"last": float(x[-1]), "changes": float(np.count_nonzero(np.diff(x)))}


def missing_fraction(usable: int, expected: float | None) -> float:
    """Fraction of ``expected`` samples not usable, in [0, 1]; for event series (None) 0 or 1."""
    if expected is None or not expected > 0.0:
        return 0.0 if usable > 0 else 1.0
    return min(1.0, max(0.0, 1.0 - usable / expected))


def basic_features_batch(
    t2d: F8, v2d: F8, counts: npt.NDArray[np.integer] | list[int]
) -> list[dict[str, float]]:
    """:func:`basic_features` of many windows at once: row ``i`` uses its first ``counts[i]`` columns.

    Columns past a row's count are padding and may hold anything; non-finite rows are ignored as
    in :func:`basic_features`.  Costs about as much as one call for a whole batch of short windows.
    """
    t2 = np.asarray(t2d, np.float64)
    v2 = np.asarray(v2d, np.float64)
    c = np.asarray(counts, np.int64)
    if t2.shape != v2.shape or v2.ndim != 2 or c.shape != (v2.shape[0],):
        raise CorruptDataError(
            f"features: basic_features_batch: t2d {t2.shape}, v2d {v2.shape}, counts {c.shape} do not "
            "match: pass two (windows, width) arrays and one count per window"
        )
    valid = (np.arange(v2.shape[1]) < c[:, None]) & np.isfinite(v2) & np.isfinite(t2)
    n = valid.sum(axis=1)
    safe_n = np.maximum(n, 1)
    vz = np.where(valid, v2, 0.0)
    vmin = np.where(valid, v2, np.inf).min(axis=1)
    vmax = np.where(valid, v2, -np.inf).max(axis=1)
    mean = np.clip(vz.sum(axis=1) / safe_n, vmin, vmax)
    vc = np.where(valid, v2 - mean[:, None], 0.0)
    std = np.sqrt((vc * vc).sum(axis=1) / safe_n)
    std[vmin == vmax] = 0.0
    tz = np.where(valid, t2, 0.0)
    tc = np.where(valid, t2 - (tz.sum(axis=1) / safe_n)[:, None], 0.0)
    den = (tc * tc).sum(axis=1)
    num = (tc * vc).sum(axis=1)
    num[vmin == vmax] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = num / den
    out: list[dict[str, float]] = []
    for i in range(v2.shape[0]):
        if n[i] == 0:
            out.append({})
            continue
        row = _finite_dict(mean=float(mean[i]), std=float(std[i]), min=float(vmin[i]), max=float(vmax[i]))
        if n[i] >= 2 and den[i] > 0.0 and math.isfinite(float(slope[i])):
            row["slope"] = float(slope[i])
        out.append(row)
    return out
