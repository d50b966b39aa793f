"""Rhythm patterns from RR intervals: bigeminy, trigeminy, couplets, runs and pauses, as episodes.

A premature beat only 5-10 % early is lost in beat-to-beat scatter when judged alone, but a
bigeminy or trigeminy repeats it: the same short-long shape, cycle after cycle, with the same
coupling ratio.  :class:`RhythmDetector` looks for that repetition on the latest intervals:

* **bigeminy** on the last ``2 * CYCLES`` intervals: every short interval (all but
  ``SIGN_MISSES``) shorter than both of its neighbours by ``MARGIN``, coupling ratio (short / mean of short and pause) at most
  ``1 - MIN_PREMATURITY`` with a spread across cycles (SD) at most ``COUPLING_SD``, and the pauses
  alike (coefficient of variation at most ``PAUSE_CV``);
* **trigeminy** the same over ``3 * CYCLES`` intervals, period three: normal, short, pause; the
  coupling ratio is short / sinus interval (median of the normal intervals and of short + pause
  halved), the pause is at least that, and the normal intervals are alike too;
* **couplets and runs**: two or three premature beats in a row ended by a pause, from the
  fixed-prematurity rule of :class:`~gateway.inference.ectopic.EctopicDetector`, which also flags
  isolated premature beats;
* **pause**: an interval at least ``PAUSE_FACTOR`` x the sinus reference and at least
  ``PAUSE_MIN_MS``, not right after a premature beat (a compensatory pause is shorter).

Sinus arrhythmia and gradual rate changes are smooth: successive intervals do not alternate
short-long over many cycles unless breathing takes exactly two or three beats, which the coupling
and consistency tests reject unless the modulation is as deep as ectopy (see the card's limits).
Atrial fibrillation alternates by chance, but its coupling ratios and pauses are not consistent.

:class:`RhythmMonitor` turns the verdicts into one alarm per episode, named by its pattern
(bigeminy > trigeminy > run > couplet > pause > frequent isolated ectopy), carrying the burden
(premature beats among the beats since the oldest premature one of the last ``BURDEN_BEATS``) and, for bigeminy and trigeminy, the coupling
ratio; a different sustained pattern inside the episode (ranked higher, or once the named one is
no longer seen) re-raises it with ``episode=changed``;
``anomaly_cleared`` follows when the pattern has been absent for ``CLEAR_CYCLES`` cycles
(bigeminy, trigeminy) or ``BURDEN_BEATS // 2`` beats with the burden under ``CLEAR_BURDEN``
(the others).  Quality-flagged beats never reach the detector; inside an episode they make it
``anomaly_indeterminate``.  Every alarm's ``held_s`` counts from the episode's first premature beat
(for the cleared event: the episode's length).  Pure Python on at most a dozen intervals per update.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from statistics import fmean, median, pstdev

from gateway.contracts import Alarm, AlarmKind
from gateway.inference.ectopic import ALARM_BURDEN, BURDEN_BEATS, CLEAR_BURDEN, PREMATURITY, EctopicDetector
from gateway.sample import Sample, Stream, valid_sample

__all__ = [
    "CLEAR_CYCLES",
    "COUPLING_SD",
    "CYCLES",
    "HOLD_CYCLES",
    "HOLD_PREMATURITY",
    "IRREGULAR",
    "IRREGULAR_BEATS",
    "MARGIN",
    "MIN_PREMATURITY",
    "PAUSE_CV",
    "PAUSE_FACTOR",
    "PAUSE_MIN_MS",
    "RANK",
    "SIGN_MISSES",
    "RhythmDetector",
    "RhythmMonitor",
    "Verdict",
]

log = logging.getLogger(__name__)

CYCLES = 5  # cycles a bigeminy or trigeminy must repeat before it is named
SIGN_MISSES = 1  # cycles whose short interval may fail the margin test
MARGIN = 0.005  # a short interval is shorter than its neighbours by at least this fraction
MIN_PREMATURITY = 0.04  # coupling ratio at most 0.96
COUPLING_SD = 0.03  # spread of the coupling ratio across cycles
PAUSE_CV = 0.06  # spread of the pauses (and, in trigeminy, the normal intervals)
PAUSE_FACTOR = 1.8
PAUSE_MIN_MS = 1500.0
CLEAR_CYCLES = 10
HOLD_CYCLES = 3  # the holding test inside an episode: fewer cycles ...
HOLD_PREMATURITY = 0.02  # ... and less prematurity
IRREGULAR = 0.08  # median beat-to-beat change, as a fraction of the median interval ...
IRREGULAR_BEATS = 32  # ... over this many intervals
#: Naming order inside an episode: the most specific pattern names it.
RANK = {"bigeminy": 5, "trigeminy": 4, "run": 3, "couplet": 2, "pause": 1, "frequent": 0}
_SUSTAINED = ("bigeminy", "trigeminy")
_RR_MIN_MS = 200.0
_Detail = dict[str, float | str]
_RR_MAX_MS = 5000.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one interval revealed: premature beats (indices), patterns seen, coupling ratio."""

    premature: tuple[int, ...]
    patterns: tuple[str, ...]
    coupling: float = math.nan
    #: Bigeminy / trigeminy under the holding test (fewer cycles, less prematurity): an episode
    #: already named goes on while this holds, so a pattern near the threshold is one episode.
    held: tuple[str, ...] = ()


def _geminy(
    x: list[float], k: int, cycles: int = CYCLES, prematurity: float = MIN_PREMATURITY
) -> tuple[float, list[int]] | None:
    """Coupling ratio and short-interval positions if ``x`` ends in ``cycles`` cycles of period ``k``."""
    n = len(x)
    for p in range(k):
        # Short intervals at s, each with both neighbours inside the window; the pause is s + 1.
        shorts = [s for s in range(p, n - 1, k) if s >= 1][-cycles:]
        if len(shorts) < cycles:
            continue
        # Beat-to-beat scatter may hide one of the 2 x cycles contrasts when the beat is barely
        # premature; the coupling and consistency tests below still hold over all cycles.
        misses = SIGN_MISSES if cycles >= CYCLES else 0  # none in the shorter holding test
        if sum(x[s] > (1.0 - MARGIN) * min(x[s - 1], x[s + 1]) for s in shorts) > misses:
            continue
        short = [x[s] for s in shorts]
        pauses = [x[s + 1] for s in shorts]
        if k == 2:
            ratios = [2.0 * a / (a + b) for a, b in zip(short, pauses, strict=True)]
        else:
            normal = [x[s - 1] for s in shorts]
            if pstdev(normal) > PAUSE_CV * fmean(normal):
                continue
            # Sinus interval: the normal ones, and short + pause halved (exact after a compensatory
            # pause, a little over it after a reset one).
            ref = median(normal + [(a + b) / 2.0 for a, b in zip(short, pauses, strict=True)])
            # The pause after the beat is at least a sinus interval (compensatory or reset), and
            # the short-long contrast is as large as in bigeminy's test.
            if median(pauses) < ref or median(pauses) - median(short) < 2.0 * prematurity * ref:
                continue
            ratios = [a / ref for a in short]
        c = median(ratios)
        if not 0.4 <= c <= 1.0 - prematurity:
            continue
        if pstdev(ratios) > COUPLING_SD or pstdev(pauses) > PAUSE_CV * fmean(pauses):
            continue
        return c, shorts
    return None


class RhythmDetector:
    """Streaming rhythm-pattern detector over RR intervals (ms); see the module docstring."""

    def __init__(self) -> None:
        self._beat = EctopicDetector()
        self._x: deque[float] = deque(maxlen=3 * (CYCLES + 1))
        self._i: deque[int] = deque(maxlen=3 * (CYCLES + 1))
        self._long: deque[float] = deque(maxlen=IRREGULAR_BEATS)
        self._n = 0
        # Last interval index at which each pattern was seen, for the holding test.
        self._seen: dict[str, int] = {}

    @property
    def reference_ms(self) -> float:
        """The sinus reference interval of the single-beat rule (NaN while it warms up)."""
        return self._beat.reference_ms

    def interrupt(self) -> None:
        """A beat that cannot be used: the sequence breaks, nothing is judged across it."""
        self._beat.interrupt()
        self._n += 1
        self._x.clear()
        self._i.clear()
        self._seen.clear()

    def irregular(self) -> bool:
        """Irregularly irregular RR (atrial fibrillation): typical beat-to-beat change over ``IRREGULAR``.

        Until ``IRREGULAR_BEATS // 2`` intervals were seen it cannot be told, and counts as irregular:
        single premature beats are judged only once the rhythm is known to be regular.
        """
        x = self._long
        if len(x) < IRREGULAR_BEATS // 2:
            return True
        return median(abs(b - a) for a, b in pairwise(x)) > IRREGULAR * median(x)

    def feed(self, rr_ms: float) -> Verdict:
        """Feed the next interval; the premature beats and patterns it reveals."""
        idx = self._n
        self._n += 1
        ref = self._beat.reference_ms
        if not (math.isfinite(rr_ms) and _RR_MIN_MS <= rr_ms <= _RR_MAX_MS):
            self._beat.interrupt()
            self._x.clear()
            self._i.clear()
            self._seen.clear()
            return Verdict((), ())
        patterns: list[str] = []
        premature: set[int] = set()
        prev = self._x[-1] if self._x else math.nan
        if (
            math.isfinite(ref)
            and rr_ms >= max(PAUSE_FACTOR * ref, PAUSE_MIN_MS)
            and not prev <= (1.0 - PREMATURITY) * ref
        ):
            patterns.append("pause")
        beats = self._beat.feed(rr_ms)
        self._x.append(rr_ms)
        self._i.append(idx)
        self._long.append(rr_ms)
        run = [b.index for b in beats if b.ectopic]
        # In an irregularly irregular rhythm a short-long pair is chance, not a premature beat.
        if run and not self.irregular():
            premature.update(run)
            if len(run) == 2:
                patterns.append("couplet")
            elif len(run) >= 3:
                patterns.append("run")
        coupling = math.nan
        x = list(self._x)
        held: list[str] = []
        for k, name in ((2, "bigeminy"), (3, "trigeminy")):
            hit = None
            window = x[-k * (CYCLES + 1) :]
            if len(window) == k * (CYCLES + 1):
                hit = _geminy(window, k)
            if hit is not None:
                if not patterns or patterns[-1] not in _SUSTAINED:
                    patterns.append(name)
                self._seen[name] = idx
            elif idx - self._seen.get(name, -(10**9)) <= CLEAR_CYCLES * k:
                # Seen lately: the holding test (fewer cycles, less prematurity) keeps it going.
                window = x[-k * (HOLD_CYCLES + 1) :]
                if len(window) == k * (HOLD_CYCLES + 1):
                    hit = _geminy(window, k, HOLD_CYCLES, HOLD_PREMATURITY)
                if hit is not None:
                    held.append(name)
                    self._seen[name] = idx
            if hit is not None:
                c, shorts = hit
                coupling = c if math.isnan(coupling) else coupling
                base = len(x) - len(window)
                premature.update(self._i[base + s] for s in shorts)
        return Verdict(tuple(sorted(premature)), tuple(patterns), coupling, tuple(held))


class _State:
    """One stream's episode."""

    def __init__(self) -> None:
        self.det = RhythmDetector()
        self.premature: set[int] = set()  # indices of premature beats in the burden window
        self.n = 0
        self.pattern = ""  # "" while idle
        self.unsure = False
        self.quiet = 0  # intervals without evidence of the episode's pattern
        self.times: deque[float] = deque(maxlen=BURDEN_BEATS + 1)  # t_mono of the latest beats
        self.onset = math.nan  # t_mono of the episode's first premature beat (or its alarm)

    def first_premature_t(self, now: float) -> float:
        """Time of the oldest premature beat still in the window, else ``now``."""
        pos = min(self.premature) - (self.n - len(self.times)) if self.premature else -1
        return self.times[pos] if 0 <= pos < len(self.times) else now


class RhythmMonitor:
    """Per-stream rhythm-pattern episodes: one alarm named by its pattern, then cleared."""

    def __init__(self, model: str = "rr_rhythm") -> None:
        self.model = model
        self._state: dict[str, _State] = {}
        self.beats = 0
        self.premature_beats = 0

    def resume(self, stream: Stream, pattern: str) -> None:
        """An episode named ``pattern`` a previous run left on: the beats after the start judge it as usual.

        Its pattern still seen (the detector needs ``CYCLES`` cycles, fewer than it takes to clear)
        sends nothing; absent for the clearing span, it clears.  Its ``held_s`` is not known here:
        the pipeline gives it from the alarm ledger, which keeps the onset.
        """
        if pattern not in RANK:
            return
        st = self._state.get(stream.key)
        if st is None:
            st = self._state[stream.key] = _State()
        st.pattern, st.unsure, st.quiet = pattern, False, 0

    def forget_source(self, source: str, device: str | None = None) -> None:
        """Drop the episodes of every stream of ``source`` (of ``device`` only, when given): they were ended."""
        prefix = f"{source}/" if device is None else f"{source}/{device}/"
        self._state = {k: st for k, st in self._state.items() if not k.startswith(prefix)}

    def update(self, sample: Sample, *, implausible: bool = False) -> Alarm | None:
        """Feed one RR sample; an alarm when a pattern episode starts, changes, turns unsure or ends.

        ``implausible``: the plausibility rules called its value no interval a heart produces (a
        missed or doubled beat detection): like a beat its device flagged, it breaks the sequence.
        """
        st = self._state.get(sample.stream.key)
        if st is None:
            st = self._state[sample.stream.key] = _State()
        st.times.append(sample.t_mono)
        flagged = not valid_sample(sample)  # flagged unusable by its device, or no value
        if flagged or implausible:
            st.det.interrupt()
            st.n += 1
            if st.pattern and not st.unsure:
                st.unsure = True
                st.quiet = 0
                reason = "sensor_quality" if flagged else "implausible_input"
                why: _Detail = {"pattern": st.pattern, "reason": reason}
                return self._alarm(AlarmKind.ANOMALY_INDETERMINATE, sample, why, held=st.onset)
            return None
        v = st.det.feed(sample.value)
        idx = st.n
        st.n += 1
        self.beats += 1
        fresh = set(v.premature) - st.premature
        self.premature_beats += len(fresh)
        st.premature |= fresh
        if st.premature and min(st.premature) <= idx - BURDEN_BEATS:
            st.premature = {i for i in st.premature if i > idx - BURDEN_BEATS}
        seen = min(st.n, BURDEN_BEATS)
        burden = len(st.premature) / seen
        found = list(v.patterns)
        if seen >= BURDEN_BEATS // 2 and burden >= ALARM_BURDEN:
            found.append("frequent")
        # The burden an alarm carries: premature beats among the beats since the oldest premature
        # beat still in the window, so a pattern found after five cycles reports its own share,
        # not five beats diluted over a minute of sinus rhythm before it.
        span = idx - min(st.premature) + 1 if st.premature else seen
        share = len(st.premature) / span
        detail: dict[str, float | str] = {"burden": round(share, 4)}
        if not st.pattern:
            if not found:
                return None
            return self._raise(st, max(found, key=RANK.__getitem__), sample, detail, v.coupling, "")
        top = max(found, key=RANK.__getitem__) if found else ""
        current = st.pattern in found or st.pattern in v.held
        if top in _SUSTAINED and top != st.pattern and not (current and RANK[top] < RANK[st.pattern]):
            return self._raise(st, top, sample, detail, v.coupling, "changed")
        if st.unsure and found:
            return self._raise(st, st.pattern, sample, detail, v.coupling, "resumed")
        evidence = current if st.pattern in _SUSTAINED else bool(found) or burden >= CLEAR_BURDEN
        st.quiet = 0 if evidence else st.quiet + 1
        done = (
            st.quiet >= CLEAR_CYCLES * (2 if st.pattern == "bigeminy" else 3)
            if st.pattern in _SUSTAINED
            else st.quiet >= BURDEN_BEATS // 2
        )
        if not done:
            return None
        ended = st.pattern
        st.pattern, st.unsure, st.quiet = "", False, 0
        st.premature.clear()  # the ended episode's beats must not raise the next one
        log.info("rhythm on %s: %s ended (burden %.3f), episode cleared", sample.stream.key, ended, share)
        return self._alarm(AlarmKind.ANOMALY_CLEARED, sample, {"pattern": ended, **detail}, held=st.onset)

    def _raise(
        self,
        st: _State,
        pattern: str,
        sample: Sample,
        detail: dict[str, float | str],
        coupling: float,
        episode: str,
    ) -> Alarm:
        if not episode:
            st.onset = st.first_premature_t(sample.t_mono)
        st.pattern, st.unsure, st.quiet = pattern, False, 0
        out: dict[str, float | str] = {"pattern": pattern, **detail}
        if pattern in _SUSTAINED and math.isfinite(coupling):
            out["coupling"] = round(coupling, 3)
        if episode:
            out["episode"] = episode
        why = {f"{sample.stream.metric.name}.{pattern}": 1.0}
        return self._alarm(AlarmKind.ANOMALY, sample, out, why, held=st.onset)

    def _alarm(
        self,
        kind: AlarmKind,
        sample: Sample,
        detail: _Detail,
        why: dict[str, float] | None = None,
        *,
        held: float = math.nan,
    ) -> Alarm:
        """The alarm, with ``held_s`` since the episode's first premature beat at ``held``."""
        s, full = sample, {"model": self.model, **detail}
        held_s = round(s.t_mono - held, 3) if math.isfinite(held) else None
        return Alarm(kind, s.stream.subject, s.t_mono, s.t_wall, s.stream, full, why or {}, held_s=held_s)
