"""A fused rate (heart rate, SpO2, respiration) of one subject, fed sample by sample.

Wraps :class:`gateway.inference.kalman.HrFusion` (a random-walk Kalman filter whose sources are
weighted by quality flags, plausibility and agreement) with the routing a running gateway needs:
which streams feed it, RR intervals read as a rate, and when an estimate record is due.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from gateway.contracts import Estimate
from gateway.estimation.config import FusionSpec, default_noise
from gateway.inference.kalman import HrEstimate, HrFusion
from gateway.sample import Stream

__all__ = ["NOISE_MAX", "FusedRate"]

log = logging.getLogger(__name__)

#: A saved noise more than this many times the configured one is taken for damage, not learning.
NOISE_MAX = 1e4


class FusedRate:
    """One ``[[estimators.fusion]]`` estimator; see the module docstring."""

    def __init__(self, spec: FusionSpec, kind: str, emit: Callable[[Estimate], None]) -> None:
        self.spec = spec
        self.kind = kind
        self._emit = emit
        self._noise = {
            self._label(s.metric, s.source): s.noise or default_noise(s.metric) for s in spec.sources
        }
        self.filter = HrFusion(
            q_per_s=spec.q_per_s,
            sources=self._noise,
            max_gap_s=spec.max_gap_s,
            lo=spec.lo,
            hi=spec.hi,
            gate=spec.gate,
        )
        self._streams: dict[str, Stream] = {}
        self._next_emit = -math.inf
        self._last: HrEstimate | None = None
        self._last_state = ""
        self._wall_offset = 0.0  # wall - monotonic, from the latest sample

    @staticmethod
    def _label(metric: str, source: str | None) -> str:
        return metric if source is None else f"{metric}@{source}"

    @property
    def key(self) -> str:
        """Where this estimator's state is kept across restarts."""
        return f"fusion/{self.spec.subject}/{self.spec.name}"

    def route(self, stream: Stream) -> str | None:
        """The source label ``stream`` feeds, or None when it feeds nothing here."""
        if stream.subject != self.spec.subject:
            return None
        specific = self._label(stream.metric.name, stream.source)
        if specific in self._noise:
            return specific
        return stream.metric.name if stream.metric.name in self._noise else None

    def update(
        self, label: str, stream: Stream, t_mono: float, t_wall: float, value: float, quality: int
    ) -> None:
        """Fold one sample in; emits an estimate record when one is due."""
        self._streams[label] = stream
        self._wall_offset = t_wall - t_mono
        if stream.metric.rr:
            value = 60000.0 / value if value > 0 else math.nan  # an RR interval (ms) as a rate
        est = self.filter.update(label, t_mono, value, quality)
        if est is not None:
            self._last = est
        # Samples that are no measurement (faulted, implausible) after the estimate was lost say
        # nothing new: "lost" is reported once, as when every source is silent.
        if t_mono >= self._next_emit and not (est is None and self._last_state in ("", "lost")):
            self._send(est, t_mono)

    def tick(self, now_mono: float) -> None:
        """Without a sample: bridge, flag or end the estimate when a record is due."""
        if now_mono < self._next_emit:
            return
        est = self.filter.estimate(now_mono)
        if est is None and self._last_state in ("", "lost"):
            return  # nothing to say, and "lost" was said already
        self._send(est, now_mono)

    def _send(self, est: HrEstimate | None, t_mono: float) -> None:
        self._next_emit = t_mono + self.spec.every_s
        if est is None:
            state, value, sd = "lost", math.nan, math.nan
        else:
            fresh = t_mono - self.filter.t_measured <= self.spec.stale_s
            state = "untrusted" if not est.trusted else "measured" if fresh else "bridged"
            value, sd = est.hr, est.sd
        self._last_state = state
        weights = self.filter.weights(t_mono)
        sources = tuple(
            (self._streams[label], w) for label, w in sorted(weights.items()) if label in self._streams
        )
        self._emit(
            Estimate(
                self.spec.subject,
                self.kind,
                self.spec.name,
                self.spec.unit,
                t_mono,
                t_mono + self._wall_offset,
                value,
                sd,
                state,
                sources,
            )
        )

    def save(self, now_mono: float, now_wall: float) -> dict[str, Any] | None:
        """The state to keep across a restart: the estimate (when there is one) and the learnt noise.

        The noise each source has shown (its innovations' variance, never below the configured
        one) is a property of the device, not of the moment: it is kept whatever the estimate's age.
        """
        state: dict[str, Any] = {"noise": {k: v for k, v in self.filter.noise.items() if v > self._noise[k]}}
        est = self.filter.estimate(now_mono)
        if est is not None:
            state |= {
                "value": est.hr,
                "sd": est.sd,
                "t_wall": now_wall - (now_mono - self.filter.t_measured),
                "trusted": est.trusted,
            }
        return state if len(state) > 1 or state["noise"] else None

    def restore(self, state: dict[str, Any], now_mono: float, now_wall: float) -> None:
        """Resume from :meth:`save`'s state; the estimate only within the bridging horizon."""
        self._restore_noise(state.get("noise"))
        try:
            value, sd, t_wall = float(state["value"]), float(state["sd"]), float(state["t_wall"])
        except (KeyError, TypeError, ValueError):
            return
        self._wall_offset = now_wall - now_mono
        self.filter.restore(value, sd, now_wall - t_wall, now_mono, trusted=state.get("trusted") is True)

    def _restore_noise(self, saved: Any) -> None:
        if saved is None:
            return
        bad = not isinstance(saved, dict)
        for label, value in saved.items() if isinstance(saved, dict) else ():
            configured = self._noise.get(label)
            if configured is None:
                continue  # a source no longer configured
            if not isinstance(value, int | float) or not 0.0 < value <= NOISE_MAX * configured:
                bad = True
            elif value > configured:  # else the config now says more: it wins
                self.filter.noise[label] = float(value)
        if bad:
            # The subject is not logged: it may name a patient.
            log.warning(
                "estimation fusion %r: saved source noise unreadable or out of range: those sources "
                "relearn their noise from the configured one",
                self.spec.name,
            )
