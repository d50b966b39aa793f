"""Ectopic beats from RR intervals alone, and an ectopy alarm that does not cry wolf.

:class:`EctopicDetector` classifies each beat from the RR series a chest strap sends (BLE Heart
Rate Measurement RR field).  Every parameter is fixed from physiology, not fitted to any record:

* **prematurity**: the interval ending the beat is at most ``1 - PREMATURITY`` (85 %) of the
  reference, where resting sinus rhythm changes by well under 15 % from beat to beat;
* **pause**: the next interval is at least ``PAUSE`` (1.15) times the premature one - the
  short-long signature of a premature beat followed by a (full or partial) compensatory pause;
* **reference**: median of the last ``REFERENCE_BEATS`` (7) sinus intervals.  A premature beat and
  its pause are kept out of it; their mean goes in instead, which is the sinus interval for a
  compensatory pause and slightly under it for a reset one, so the reference still tracks the rate
  through bigeminy, where half the intervals are short and half long.

A beat is decided one interval late (the pause is needed).  :class:`EctopyMonitor` turns beats
into alarms on state changes only: isolated premature beats are counted, not alarmed; frequent
ectopy (burden over ``ALARM_BURDEN`` of the last ``BURDEN_BEATS`` beats) or a couplet raises one
ANOMALY, re-armed when the burden falls under ``CLEAR_BURDEN``.  Bigeminy therefore raises one alarm
when it starts, not one every other beat.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

from gateway.contracts import Alarm, AlarmKind
from gateway.sample import Sample

__all__ = [
    "ALARM_BURDEN",
    "BURDEN_BEATS",
    "CLEAR_BURDEN",
    "PAUSE",
    "PREMATURITY",
    "REFERENCE_BEATS",
    "Beat",
    "EctopicDetector",
    "EctopyMonitor",
]

log = logging.getLogger(__name__)

PREMATURITY = 0.15
PAUSE = 1.15
REFERENCE_BEATS = 7
BURDEN_BEATS = 60
ALARM_BURDEN = 0.10
CLEAR_BURDEN = 0.05
_RR_MIN_MS = 200.0
_RR_MAX_MS = 3000.0


@dataclass(frozen=True, slots=True)
class Beat:
    """The verdict on one beat: index in the series, its RR (ms), premature or not."""

    index: int
    rr_ms: float
    ectopic: bool
    reference_ms: float


class EctopicDetector:
    """Streaming premature-beat classifier over RR intervals (ms); see the module docstring."""

    def __init__(self) -> None:
        self._ref: deque[float] = deque(maxlen=REFERENCE_BEATS)
        self._pending: tuple[int, float] | None = None  # the last interval, awaiting the next
        self._n = 0

    @property
    def reference_ms(self) -> float:
        """Current sinus reference interval (NaN until seven intervals were seen)."""
        if len(self._ref) < REFERENCE_BEATS:
            return math.nan
        s = sorted(self._ref)
        return s[len(s) // 2]

    def update(self, rr_ms: float) -> Beat | None:
        """Feed the next interval; returns the verdict on the previous beat once it can be made."""
        idx = self._n
        self._n += 1
        if not (math.isfinite(rr_ms) and _RR_MIN_MS <= rr_ms <= _RR_MAX_MS):
            self._pending = None  # a missed or impossible beat breaks the sequence
            return None
        prev = self._pending
        self._pending = (idx, rr_ms)
        if prev is None:
            return None
        pidx, prr = prev
        ref = self.reference_ms
        if math.isnan(ref):
            self._ref.append(prr)
            return Beat(pidx, prr, False, ref)
        ectopic = prr <= (1.0 - PREMATURITY) * ref and rr_ms >= PAUSE * prr
        if ectopic:
            self._ref.append((prr + rr_ms) / 2.0)
            # The pause is not a sinus interval: it is consumed here, not judged as the next beat.
            self._pending = None
        else:
            self._ref.append(prr)
        return Beat(pidx, prr, ectopic, ref)


class EctopyMonitor:
    """Per-stream detector plus an alarm on entering and leaving frequent ectopy."""

    def __init__(self, model: str = "rr_ectopic") -> None:
        self.model = model
        self._det: dict[str, EctopicDetector] = {}
        self._recent: dict[str, deque[bool]] = {}
        self._alarmed: dict[str, bool] = {}
        self.ectopic_beats = 0
        self.beats = 0

    def update(self, sample: Sample) -> Alarm | None:
        """Feed one RR sample; an ANOMALY alarm when frequent ectopy starts, a restore when it ends."""
        key = sample.stream.key
        det = self._det.get(key)
        if det is None:
            det = self._det[key] = EctopicDetector()
            self._recent[key] = deque(maxlen=BURDEN_BEATS)
            self._alarmed[key] = False
        beat = det.update(sample.value)
        if beat is None:
            return None
        recent = self._recent[key]
        couplet = beat.ectopic and bool(recent) and recent[-1]
        recent.append(beat.ectopic)
        self.beats += 1
        self.ectopic_beats += beat.ectopic
        burden = sum(recent) / len(recent)
        full = len(recent) >= BURDEN_BEATS // 2
        if not self._alarmed[key] and ((full and burden >= ALARM_BURDEN) or couplet):
            self._alarmed[key] = True
            name = sample.stream.metric.name
            return Alarm(
                AlarmKind.ANOMALY,
                sample.stream.subject,
                sample.t_mono,
                sample.t_wall,
                sample.stream,
                {"model": self.model, "rule": "couplet" if couplet else "burden", "burden": round(burden, 4)},
                {f"{name}.ectopic_burden": 1.0},
            )
        if self._alarmed[key] and full and burden < CLEAR_BURDEN:
            # The alarm contract has no "anomaly cleared" kind: re-arm quietly.
            self._alarmed[key] = False
            log.info("ectopy on %s: burden back to %.3f, alarm re-armed", key, burden)
        return None
