"""Synthetic RR-interval rhythms with labelled beats: sinus rhythm and ectopy patterns.

Pure, seeded numpy functions; each returns the RR series (ms, whole milliseconds like a chest
strap) with a per-interval truth: whether the beat ending the interval is premature, and the name
of the pattern it belongs to ("" for none).  The physiology behind each piece:

* **sinus rhythm** (:func:`sinus`): a base rate that may drift (gradual rate changes), respiratory
  sinus arrhythmia (RR lengthens on expiration, shortens on inspiration: a smooth sinusoid at the
  breathing rate, 0.15-0.4 Hz, a few percent of the interval at rest, up to ~10 % in the young at
  slow breathing), a ~0.1 Hz Mayer-wave component and beat-to-beat scatter (RMSSD 20-50 ms).
* **premature beats** (:func:`with_pattern`): the interval ending an ectopic beat is the coupling
  interval, ``coupling`` x the sinus interval (0.5-0.95).  A ventricular beat ("V") does not reset
  the sinus node, so the pause after it is fully compensatory: short + pause = two sinus intervals.
  A supraventricular beat ("S") resets the sinus node: the pause is one sinus interval plus the
  sino-atrial conduction time (~8 % of it), so short + pause is less than two sinus intervals.
* **patterns**: bigeminy (every 2nd beat premature), trigeminy (every 3rd), a couplet (two
  premature beats in a row, then the pause), a run (three), a pause (a sinus pause or exit block:
  one interval of ~2-2.5 sinus intervals).
* **atrial fibrillation** (:func:`atrial_fibrillation`): irregularly irregular RR, independent
  from beat to beat, coefficient of variation 0.15-0.25: a negative for the pattern detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["PATTERNS", "Rhythm", "atrial_fibrillation", "sinus", "with_pattern"]

F64 = npt.NDArray[np.float64]

PATTERNS = ("bigeminy", "trigeminy", "couplet", "run", "pause")
#: Sino-atrial conduction time added to the pause after a supraventricular beat, as a fraction of
#: the sinus interval.
SA_CONDUCTION = 0.08


@dataclass(frozen=True, slots=True)
class Rhythm:
    """An RR series (ms) and its per-interval truth: premature beat, pattern name."""

    rr: F64
    premature: npt.NDArray[np.bool_]
    pattern: npt.NDArray[np.str_]


def sinus(
    n: int,
    seed: int,
    *,
    hr_bpm: float = 70.0,
    rsa: float = 0.04,
    resp_hz: float = 0.25,
    mayer: float = 0.02,
    scatter_ms: float = 15.0,
    hr_end_bpm: float | None = None,
) -> Rhythm:
    """``n`` sinus intervals: rate (drifting linearly to ``hr_end_bpm``), RSA, Mayer wave, scatter."""
    rng = np.random.default_rng(seed)
    end = hr_bpm if hr_end_bpm is None else hr_end_bpm
    rate = np.linspace(hr_bpm, end, n)
    phase_r, phase_m = rng.uniform(0.0, 2.0 * math.pi, 2)
    scatter = rng.standard_normal(n) * scatter_ms
    rr = np.empty(n)
    t = 0.0
    for i in range(n):
        base = 60000.0 / rate[i]
        mod = rsa * math.sin(2.0 * math.pi * resp_hz * t + phase_r)
        mod += mayer * math.sin(2.0 * math.pi * 0.1 * t + phase_m)
        rr[i] = base * (1.0 + mod) + scatter[i]
        t += rr[i] / 1000.0
    rr = np.round(np.clip(rr, 300.0, 2500.0)).astype(np.float64)
    return Rhythm(rr, np.zeros(n, bool), np.full(n, "", dtype="<U9"))


def with_pattern(
    base: Rhythm,
    pattern: str,
    start: int,
    stop: int,
    *,
    coupling: float = 0.85,
    origin: str = "V",
) -> Rhythm:
    """``base`` with ``pattern`` placed on intervals ``start``..``stop`` (see the module docstring)."""
    if pattern not in PATTERNS:
        raise ValueError(f"sim rhythms: unknown pattern {pattern!r}: expected one of {PATTERNS}")
    if origin not in ("V", "S"):
        raise ValueError(f"sim rhythms: unknown origin {origin!r}: expected 'V' or 'S'")
    rr = base.rr.astype(np.float64).copy()
    prem = base.premature.copy()
    name = base.pattern.copy()
    stop = min(stop, len(rr) - 4)

    def ectopic_run(i: int, count: int) -> None:
        sinus_rr = float(np.mean(rr[i : i + count + 1]))
        for j in range(count):
            rr[i + j] = coupling * sinus_rr
            prem[i + j] = True
            name[i + j] = pattern
        if origin == "V":  # fully compensatory: the run and its pause span count + 1 sinus cycles
            rr[i + count] = (count + 1) * sinus_rr - count * coupling * sinus_rr
        else:  # the sinus node is reset: one cycle plus the sino-atrial conduction time
            rr[i + count] = (1.0 + SA_CONDUCTION) * sinus_rr
        name[i + count] = pattern

    if pattern == "bigeminy":
        for i in range(start, stop, 2):
            ectopic_run(i, 1)
    elif pattern == "trigeminy":
        for i in range(start + 1, stop, 3):
            ectopic_run(i, 1)
    elif pattern == "couplet":
        ectopic_run(start, 2)
    elif pattern == "run":
        ectopic_run(start, 3)
    else:  # pause
        rr[start] = rr[start] * 2.2
        name[start] = pattern
    return Rhythm(np.round(rr), prem, name)


def atrial_fibrillation(n: int, seed: int, *, hr_bpm: float = 90.0, cv: float = 0.2) -> Rhythm:
    """``n`` intervals of atrial fibrillation: independent, log-normal RR with the given variation."""
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(math.log(1.0 + cv * cv))
    rr = 60000.0 / hr_bpm * np.exp(rng.standard_normal(n) * sigma - sigma * sigma / 2.0)
    rr = np.round(np.clip(rr, 300.0, 2500.0)).astype(np.float64)
    return Rhythm(rr, np.zeros(n, bool), np.full(n, "", dtype="<U9"))
