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

A beat is decided one interval late (the pause is needed); a run of up to ``MAX_RUN`` premature
beats is decided when its pause comes, so a true couplet is two ectopic beats.
:class:`EctopyMonitor` turns beats into an episode: isolated premature beats are counted, not
alarmed; frequent ectopy (burden over ``ALARM_BURDEN`` of the last ``BURDEN_BEATS`` beats) or a
couplet raises one ANOMALY, and ANOMALY_CLEARED follows once the burden stays under
``CLEAR_BURDEN``.  Bigeminy therefore raises one alarm when it starts, not one every other beat.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

from gateway.contracts import Alarm, AlarmKind
from gateway.sample import Sample, valid_sample

__all__ = [
    "ALARM_BURDEN",
    "BURDEN_BEATS",
    "CLEAR_BURDEN",
    "MAX_RUN",
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
#: Longest run of premature beats held for its pause (a triplet; longer is a rhythm, not ectopy).
MAX_RUN = 3
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
        # Intervals not judged yet: the last one, or a run of premature ones awaiting their pause.
        self._pending: list[tuple[int, float]] = []
        self._n = 0

    @property
    def reference_ms(self) -> float:
        """Current sinus reference interval (NaN until seven intervals were seen)."""
        if len(self._ref) < REFERENCE_BEATS:
            return math.nan
        s = sorted(self._ref)
        return s[len(s) // 2]

    def update(self, rr_ms: float) -> Beat | None:
        """Feed the next interval; the newest verdict it makes (see :meth:`feed` for all of them)."""
        beats = self.feed(rr_ms)
        return beats[-1] if beats else None

    def interrupt(self) -> None:
        """A beat that cannot be used (sensor off, no contact): the sequence breaks, nothing is judged."""
        self._n += 1
        self._pending = []

    def feed(self, rr_ms: float) -> list[Beat]:
        """Feed the next interval; the verdicts it makes (none, one, or a run of premature beats).

        A beat is judged once the interval after it is known.  A premature interval followed by
        another premature one is held: a couplet (or triplet) is ectopic when the run ends in a
        pause, and all of it is judged then.  The pause that ends a run closes a beat of sinus
        timing, so it is reported as a normal beat, never skipped.
        """
        idx = self._n
        self._n += 1
        if not (math.isfinite(rr_ms) and _RR_MIN_MS <= rr_ms <= _RR_MAX_MS):
            self._pending = []  # a missed or impossible beat breaks the sequence
            return []
        ref = self.reference_ms
        pending = self._pending
        if not pending:
            self._pending = [(idx, rr_ms)]
            return []
        if math.isnan(ref):
            (pidx, prr), *_ = pending
            self._ref.append(prr)
            self._pending = [(idx, rr_ms)]
            return [Beat(pidx, prr, False, ref)]
        short = (1.0 - PREMATURITY) * ref
        last_rr = pending[-1][1]
        if last_rr <= short and rr_ms <= short and len(pending) < MAX_RUN:
            pending.append((idx, rr_ms))  # a run of premature beats: wait for its end
            return []
        if last_rr <= short and rr_ms >= PAUSE * last_rr:
            # Premature beat(s) ended by a pause: every beat of the run is ectopic; the pause
            # closes a beat of sinus timing.
            out = [Beat(i, r, True, ref) for i, r in pending]
            self._ref.append((last_rr + rr_ms) / 2.0)
            out.append(Beat(idx, rr_ms, False, ref))
            self._pending = []
            return out
        # No pause: the held beats were a change of rate, not ectopy.
        out = [Beat(i, r, False, ref) for i, r in pending]
        for _, r in pending:
            self._ref.append(r)
        self._pending = [(idx, rr_ms)]
        return out


class EctopyMonitor:
    """Per-stream detector plus an alarm episode: frequent ectopy or a couplet, then cleared.

    Beats whose samples carry an unusable quality flag (no skin contact, artifact) never reach the
    detector; inside an episode they make it indeterminate (``anomaly_indeterminate``), and the
    episode is cleared (``anomaly_cleared``) only after ``BURDEN_BEATS // 2`` judged beats with the
    burden under ``CLEAR_BURDEN`` and no couplet.
    """

    def __init__(self, model: str = "rr_ectopic") -> None:
        self.model = model
        self._det: dict[str, EctopicDetector] = {}
        self._recent: dict[str, deque[bool]] = {}
        self._alarmed: dict[str, bool] = {}
        self._since: dict[str, int] = {}  # judged beats since the last trigger, while alarmed
        self._unsure: dict[str, bool] = {}
        self.ectopic_beats = 0
        self.beats = 0

    def update(self, sample: Sample) -> Alarm | None:
        """Feed one RR sample; an alarm when an ectopy episode starts, turns unsure or ends."""
        key = sample.stream.key
        det = self._det.get(key)
        if det is None:
            det = self._det[key] = EctopicDetector()
            self._recent[key] = deque(maxlen=BURDEN_BEATS)
            self._alarmed[key] = False
            self._since[key] = 0
            self._unsure[key] = False
        if not valid_sample(sample):  # flagged unusable by its device, or no value
            det.interrupt()
            if self._alarmed[key] and not self._unsure[key]:
                self._unsure[key] = True
                self._since[key] = 0
                return self._alarm(AlarmKind.ANOMALY_INDETERMINATE, sample, {"reason": "sensor_quality"})
            return None
        out: Alarm | None = None
        for beat in det.feed(sample.value):
            alarm = self._beat(key, beat, sample)
            out = alarm or out
        return out

    def _beat(self, key: str, beat: Beat, sample: Sample) -> Alarm | None:
        recent = self._recent[key]
        couplet = beat.ectopic and bool(recent) and recent[-1]
        recent.append(beat.ectopic)
        self.beats += 1
        self.ectopic_beats += beat.ectopic
        burden = sum(recent) / len(recent)
        full = len(recent) >= BURDEN_BEATS // 2
        trigger = (full and burden >= ALARM_BURDEN) or couplet
        if trigger:
            self._since[key] = 0
            if not self._alarmed[key] or self._unsure[key]:
                resumed = self._alarmed[key]
                self._alarmed[key], self._unsure[key] = True, False
                detail: dict[str, float | str] = {
                    "rule": "couplet" if couplet else "burden",
                    "burden": round(burden, 4),
                }
                if resumed:
                    detail["episode"] = "resumed"
                return self._alarm(
                    AlarmKind.ANOMALY, sample, detail, {f"{sample.stream.metric.name}.ectopic_burden": 1.0}
                )
            return None
        if not self._alarmed[key]:
            return None
        self._since[key] += 1
        if self._since[key] >= BURDEN_BEATS // 2 and burden < CLEAR_BURDEN:
            self._alarmed[key], self._unsure[key] = False, False
            log.info("ectopy on %s: burden back to %.3f, episode cleared", key, burden)
            return self._alarm(AlarmKind.ANOMALY_CLEARED, sample, {"burden": round(burden, 4)})
        return None

    def _alarm(
        self,
        kind: AlarmKind,
        sample: Sample,
        detail: dict[str, float | str],
        contributions: dict[str, float] | None = None,
    ) -> Alarm:
        return Alarm(
            kind,
            sample.stream.subject,
            sample.t_mono,
            sample.t_wall,
            sample.stream,
            {"model": self.model, **detail},
            contributions or {},
        )
