"""Heart-rate fusion: one Kalman filter over a chest strap's HR and an oximeter's pulse rate.

State: the heart rate (beats/min) as a random walk, ``q`` (bpm^2/s) of process noise.  Each source
is a measurement of the same state with its own noise variance; a sample flagged ``ARTIFACT`` or
``LOW_PERFUSION`` counts with its variance inflated, one with a fault flag or an implausible value
is ignored.  Agreement counts too: a measurement further than ``gate`` standard deviations of its
innovation from the estimate has its variance inflated by the square of the excess (a soft,
Huber-like gate), so a source drifting away from the others loses weight instead of dragging the
estimate.  A source noisier than configured is found out: its noise is tracked from the
innovations (``adapt``, an exponential average) and used when above the configured one, so the
stated uncertainty stays honest.  Between measurements the estimate is carried forward with growing variance, so a short
gap (``max_gap_s``) is bridged - the estimate is marked ``imputed`` - and a long one ends the
estimate until a source returns.  The estimate is ``trusted`` while a measurement taken at full
weight (no quality flag, inside the gate) is at most ``max_gap_s`` old.  Pure compute, no I/O,
no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.sample import FAULT_FLAGS, Quality

__all__ = ["DEFAULT_SOURCES", "HrEstimate", "HrFusion"]

#: Measurement noise (bpm^2) per source kind: an ECG strap resolves beats; an oximeter averages pulses.
DEFAULT_SOURCES: Mapping[str, float] = {"strap": 1.0, "oximeter": 9.0}
_INFLATE = int(Quality.ARTIFACT | Quality.LOW_PERFUSION | Quality.UNCERTAIN)


@dataclass(frozen=True, slots=True)
class HrEstimate:
    """Fused heart rate at ``t`` with its standard deviation; ``imputed`` when no source spoke."""

    t: float
    hr: float
    sd: float
    imputed: bool
    trusted: bool = True  # a full-weight measurement within ``max_gap_s``


class HrFusion:
    """Random-walk Kalman filter fusing HR sources; see the module docstring."""

    def __init__(
        self,
        *,
        q_per_s: float = 0.5,
        sources: Mapping[str, float] = DEFAULT_SOURCES,
        max_gap_s: float = 10.0,
        inflate: float = 25.0,
        lo: float = 20.0,
        hi: float = 300.0,
        gate: float = 3.0,
        adapt: float = 0.05,
    ) -> None:
        self.q = q_per_s
        self.r = dict(sources)
        self.max_gap_s = max_gap_s
        self.inflate = inflate
        self.lo, self.hi = lo, hi
        self.gate = gate
        self.adapt = adapt
        #: Per source: its noise as the innovations show it (never below the configured one).
        self.noise = dict(self.r)
        self.x = math.nan
        self.p = math.nan
        self.t = math.nan
        self.t_measured = math.nan
        self.t_trusted = math.nan
        #: Per source: (time of its last measurement used, the weight 1/r it was used with).
        self.used: dict[str, tuple[float, float]] = {}

    def _predict(self, t: float) -> None:
        if math.isfinite(self.t) and t > self.t:
            self.p += self.q * (t - self.t)
            self.t = t

    def update(self, source: str, t: float, hr: float, quality: int = 0) -> HrEstimate | None:
        """Fold in one measurement; returns the estimate after it (None while there is none)."""
        r = self.r.get(source)
        if r is None:
            raise ValueError(f"hr fusion: unknown source {source!r}: configure one of {sorted(self.r)}")
        if quality & int(FAULT_FLAGS) or not (math.isfinite(hr) and self.lo <= hr <= self.hi):
            return self.estimate(t)
        full = not quality & _INFLATE
        r = max(r, self.noise[source])
        if not full:
            r *= self.inflate
        if not math.isfinite(self.x) or t - self.t_measured > self.max_gap_s:
            self.x, self.p, self.t = hr, r, t  # (re)start from the first measurement
            self.t_trusted = math.nan
        else:
            t = max(t, self.t)
            self._predict(t)
            y2 = (hr - self.x) ** 2
            if full and self.adapt > 0:
                # Innovation minus prediction variance estimates the source's noise; a spike
                # counts at most as a gate-sized one, so artefacts cannot inflate it unbounded.
                sample = min(y2, 4.0 * self.gate**2 * (self.p + r)) - self.p
                self.noise[source] += self.adapt * (max(sample, 0.0) - self.noise[source])
            z = math.sqrt(y2 / (self.p + r))
            if z > self.gate:
                r *= (z / self.gate) ** 2  # disagrees with the estimate: less weight, not none
                full = False
            k = self.p / (self.p + r)
            self.x += k * (hr - self.x)
            self.p *= 1.0 - k
        self.t_measured = max(self.t_measured, t) if math.isfinite(self.t_measured) else t
        if full:
            self.t_trusted = t
        self.used[source] = (t, 1.0 / r)
        return HrEstimate(self.t, self.x, math.sqrt(self.p), False, self._trusted(t))

    def _trusted(self, t: float) -> bool:
        return math.isfinite(self.t_trusted) and t - self.t_trusted <= self.max_gap_s

    def weights(self, t: float) -> dict[str, float]:
        """The share of each source used within ``max_gap_s`` before ``t`` (summing to 1)."""
        recent = {s: w for s, (ts, w) in self.used.items() if t - ts <= self.max_gap_s}
        total = sum(recent.values())
        return {s: w / total for s, w in recent.items()} if total > 0 else {}

    def restore(self, hr: float, sd: float, age_s: float, now: float, *, trusted: bool = False) -> None:
        """Resume from a saved estimate ``age_s`` old (as after a restart); too old: start afresh."""
        if not (math.isfinite(hr) and math.isfinite(sd) and 0.0 <= age_s <= self.max_gap_s):
            return
        self.x, self.p = hr, sd * sd
        self.t = self.t_measured = now - age_s
        self.t_trusted = self.t if trusted else math.nan

    def estimate(self, t: float) -> HrEstimate | None:
        """The estimate at ``t`` without a new measurement: imputed within ``max_gap_s``, else None."""
        if not math.isfinite(self.x) or t - self.t_measured > self.max_gap_s:
            return None
        self._predict(t)
        return HrEstimate(t, self.x, math.sqrt(self.p), t > self.t_measured, self._trusted(t))
