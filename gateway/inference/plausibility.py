"""Sensor fault or real event: physical ranges and rate-of-change limits per metric.

A value no body or machine can produce (SpO2 of 0 %, a temperature step of 3 Cel in a second, a
negative flow) says the sensor is at fault.  Such violations become ``SENSOR_FAULT`` alarms, raised
on state changes only, and windows holding them are not scored by the anomaly models: a probe
falling off must not page a nurse as a desaturation (alarm fatigue is the enemy at a bedside).
Nor does an implausible sample reach the judgements of the patient or process - the rhythm
detector, the estimators: :meth:`PlausibilityChecker.implausible` and
:meth:`~PlausibilityChecker.judge_block` tell the pipeline which samples to keep from them.  The
limit alarms are kept only from values out of range (:meth:`~PlausibilityChecker.out_of_range`):
a value in range that only changed faster than the rate rule allows may be real (a desaturation,
a tachycardia starting), and the limits' on-delays are what filter a brief artifact, so it
reaches them, while its sensor fault says the change is suspect.

Each rule is written in a unit and checked in the stream's own (a pressure rule in bar applies to
a stream in kPa, converted once per stream by :mod:`gateway.units`); a stream whose unit does not
convert gets no rule, and the log says so.  A rate is measured over at least ``RATE_SPAN_S``
against the last plausible value, and is a fault only when it persists (``RATE_DEBOUNCE``
samples over that span): a whole-percent SpO2 at 5 Hz or a noisy temperature does not trip it,
a probe that jumps and stays there does.  Each fault is logged once, in words.

State is kept per stream key, not per ``Stream`` object: a driver may rebuild a stream under the
same key with another rate or unit (an OPC UA server revising its sampling interval after a PLC
restart, a serial driver caching one stream per rate, a unit changed by the device), and a fault
raised on the old object is ended by the new one's first plausible value, as the windower carries
its own conditions over.  Each object is judged by the rule in its own unit; a new unit drops the
rate reference (a value in the old unit says nothing about a rate in the new one), so the first
value in it is never a rate fault, only a range one.

The device's own status flags (``Quality.SENSOR_OFF``, ``BAD_STATUS``) are handled by the windower,
which raises ``SENSOR_FAULT`` for them and keeps flagged samples out of the features.  A sample that
is no measurement (:func:`gateway.sample.valid_sample`: flagged unusable, or no value) is skipped
here: neither checked nor a reference, it neither extends nor breaks a rate run and ends no fault,
so a block gives the verdicts its samples give one by one, at the same samples.  This module adds
the checks a device cannot make about itself.  Pure logic, no I/O; not thread-safe (one checker
per thread).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.contracts import Alarm, AlarmKind, StreamFeatures, WindowRecord
from gateway.sample import Sample, SampleBlock, Stream, valid_rows, valid_sample
from gateway.units import converter

__all__ = ["DEFAULT_RULES", "PlausibilityChecker", "Rule", "Violation", "describe", "window_breaches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rule:
    """Plausible values ``[lo, hi]`` and the largest believable change per second (None: unlimited)."""

    lo: float
    hi: float
    max_rate_per_s: float | None = None
    unit: str | None = None  # the unit lo/hi/rate are in; None: whatever the stream's unit is

    def in_unit(self, unit: str) -> Rule | None:
        """The rule for a stream in ``unit`` (converted), or None when the units do not convert."""
        if self.unit is None or self.unit == unit:
            return self
        absolute = converter(self.unit, unit)
        delta = converter(self.unit, unit, delta=True)
        if absolute is None or delta is None:
            return None
        lo, hi = sorted((absolute(self.lo), absolute(self.hi)))
        rate = None if self.max_rate_per_s is None else abs(delta(self.max_rate_per_s))
        return Rule(lo, hi, rate, unit)


@dataclass(frozen=True, slots=True)
class Violation:
    """Why one value or window of one stream is implausible."""

    stream: Stream
    rule: str  # "range" or "rate"
    value: float  # the offending value, or the rate in units per second
    limit: float  # the bound it crossed


#: Ranges from physiology (a live adult) and from the SKAB pump's physics, by metric name, each in
#: its unit and converted to a stream's own (kPa, K, mA...); a key without "/" also matches any
#: industrial metric ending in "/<key>".  A stream whose unit does not convert gets no rule.
DEFAULT_RULES: Mapping[str, Rule] = {
    "MDC_ECG_HEART_RATE": Rule(20.0, 300.0, 25.0, "/min"),
    "MDC_PULS_OXIM_PULS_RATE": Rule(20.0, 300.0, 25.0, "/min"),
    "MDC_PULS_RATE_NON_INV": Rule(20.0, 300.0, 25.0, "/min"),
    "MDC_PULS_OXIM_SAT_O2": Rule(50.0, 100.0, 4.0, "%"),
    # Ectopic beats change RR abruptly: no rate limit.  A sinus pause of 3 s and more is the rhythm
    # detector's to judge (an implausible interval never reaches it), so the range reaches 6 s:
    # three of the longest intervals of a rhythm (30/min), as an RR stream's shortest loss time.
    "MDC_ECG_TIME_PD_RR_GL": Rule(200.0, 6000.0, None, "ms"),
    "MDC_RESP_RATE": Rule(2.0, 80.0, 10.0, "/min"),
    "MDC_TEMP_BODY": Rule(25.0, 44.0, 0.1, "Cel"),
    "MDC_PRESS_BLD_NONINV_SYS": Rule(40.0, 300.0, None, "mm[Hg]"),
    "MDC_PRESS_BLD_NONINV_DIA": Rule(15.0, 200.0, None, "mm[Hg]"),
    "MDC_PRESS_BLD_NONINV_MEAN": Rule(20.0, 250.0, None, "mm[Hg]"),
    "MDC_PULS_OXIM_PERF_REL": Rule(0.0, 100.0, None, "%"),
    # SKAB-type pump: vibration RMS in g, motor current A, pressure bar, temperatures Cel, volts, l/min.
    "Accelerometer1RMS": Rule(0.0, 10.0, None, "g"),
    "Accelerometer2RMS": Rule(0.0, 10.0, None, "g"),
    "Current": Rule(0.0, 50.0, None, "A"),
    "Pressure": Rule(-1.0, 16.0, None, "bar"),
    "Temperature": Rule(-20.0, 150.0, 2.0, "Cel"),
    "Thermocouple": Rule(-20.0, 150.0, 2.0, "Cel"),
    "Voltage": Rule(0.0, 500.0, None, "V"),
    "RateRMS": Rule(0.0, 1000.0, None, "l/min"),
}

#: A rate of change is measured over at least this span: a 1 % step of a 5 Hz SpO2 is not 5 %/s.
RATE_SPAN_S = 1.0
#: A rate fault needs this many consecutive valid samples over the limit, spanning RATE_SPAN_S: noise
#: spikes do not persist, a real jump (measured against the last plausible value) does.
RATE_DEBOUNCE = 2


class _State:
    __slots__ = ("faulted", "out_of_range", "rate_run", "rate_since", "stream", "t", "v")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream  # the object last seen under the key: its unit is the reference's
        self.t = math.nan  # the reference for the rate: a plausible sample >= RATE_SPAN_S old
        self.v = math.nan
        self.faulted = False
        self.rate_run = 0  # consecutive samples over the rate limit
        self.rate_since = math.nan  # when that run started
        self.out_of_range = False  # the last sample checked broke the range rule


class PlausibilityChecker:
    """Range and rate checks per stream; alarms on state changes, windows vetted for the models."""

    def __init__(self, rules: Mapping[str, Rule] = DEFAULT_RULES) -> None:
        self._rules = dict(rules)
        # Keyed by id(): hashing a Stream hashes all its fields, ~1 us per lookup on the hot path.
        self._by_id: dict[int, tuple[Stream, Rule | None]] = {}
        # By stream key: a stream rebuilt under its key (another rate or unit) is the same sensor.
        self._state: dict[str, _State] = {}

    def resume(self, stream: Stream) -> None:
        """A fault of ``stream`` a previous run left on: its first plausible value restores it, as usual."""
        self._state_of(stream).faulted = True

    def _state_of(self, stream: Stream) -> _State:
        """The state of ``stream``'s key, taken over by ``stream`` when a driver rebuilt it."""
        st = self._state.get(stream.key)
        if st is None:
            st = self._state[stream.key] = _State(stream)
        elif st.stream is not stream:
            if st.stream.metric.unit != stream.metric.unit:
                # The reference is in the old unit: no rate against it.  A fault stays on until a
                # value plausible in the new unit ends it.
                st.t = st.v = st.rate_since = math.nan
                st.rate_run = 0
            st.stream = stream
        return st

    def forget_source(self, source: str, device: str | None = None) -> None:
        """Drop the state of every stream of ``source`` (of ``device`` only, when given): its alarms were ended."""
        prefix = f"{source}/" if device is None else f"{source}/{device}/"
        self._state = {k: st for k, st in self._state.items() if not k.startswith(prefix)}
        self._by_id = {k: v for k, v in self._by_id.items() if not v[0].key.startswith(prefix)}

    def base_rule(self, name: str) -> Rule | None:
        """The rule of a metric name as written (exact name, else its last segment), unconverted."""
        rule = self._rules.get(name)
        if rule is None and "/" in name:
            rule = self._rules.get(name.rsplit("/", 1)[1])
        return rule

    def rule_for(self, stream: Stream) -> Rule | None:
        """The rule of a stream's metric: exact name, else the last path segment; None if unknown."""
        got = self._by_id.get(id(stream))
        if got is not None and got[0] is stream:
            return got[1]
        name = stream.metric.name
        rule = self.base_rule(name)
        if rule is not None:
            converted = rule.in_unit(stream.metric.unit)
            if converted is None:
                log.warning(
                    "plausibility: stream %s: unit %r does not convert from the rule's %r: no range or "
                    "rate check; set [models.plausibility.%r] with limits in its unit",
                    stream.key,
                    stream.metric.unit,
                    rule.unit,
                    name,
                )
            rule = converted
        self._by_id[id(stream)] = (stream, rule)  # holding the stream keeps its id from being reused
        return rule

    def violation(self, stream: Stream, t: float, v: float, t_prev: float, v_prev: float) -> Violation | None:
        """The first rule value ``v`` at ``t`` breaks, given the previous plausible value (pure)."""
        rule = self.rule_for(stream)
        if rule is None or not math.isfinite(v):
            return None
        if v < rule.lo:
            return Violation(stream, "range", v, rule.lo)
        if v > rule.hi:
            return Violation(stream, "range", v, rule.hi)
        if rule.max_rate_per_s is not None and math.isfinite(v_prev) and math.isfinite(t_prev):
            dt = max(t - t_prev, RATE_SPAN_S)
            rate = (v - v_prev) / dt
            if abs(rate) > rule.max_rate_per_s:
                return Violation(stream, "rate", rate, rule.max_rate_per_s)
        return None

    def check_sample(self, sample: Sample) -> Alarm | None:
        """Check one sample; an alarm only when the stream enters or leaves the faulted state."""
        if not valid_sample(sample):
            return None  # flagged by the device or no value: neither a fault nor a reference
        st = self._state_of(sample.stream)
        bad = self.violation(sample.stream, sample.t_mono, sample.value, st.t, st.v)
        return self._step(st, bad, sample.stream, sample.t_mono, sample.t_wall, sample.value)

    def implausible(self, stream: Stream) -> bool:
        """True when the last valid sample checked of ``stream`` was judged implausible.

        Faulted, or breaking a rate limit not yet persistent: a value a patient or process
        judgement (a limit, the rhythm detector, an estimator) must not see.
        """
        st = self._state.get(stream.key)
        return st is not None and (st.faulted or st.rate_run > 0)

    def out_of_range(self, stream: Stream) -> bool:
        """True when the last valid sample checked of ``stream`` broke its range rule (what the limits must not see)."""
        st = self._state.get(stream.key)
        return st is not None and st.out_of_range

    def check_block(self, block: SampleBlock) -> list[Alarm]:
        """Check a block of one stream in order; returns the state-change alarms it caused."""
        return self.judge_block(block)[0]

    def judge_block(
        self, block: SampleBlock
    ) -> tuple[list[Alarm], npt.NDArray[np.bool_] | None, npt.NDArray[np.bool_] | None]:
        """:meth:`check_block`; which samples were judged implausible, and which of them out of range (None: none)."""
        stream = block.stream
        rule = self.rule_for(stream)
        st = self._state.get(stream.key)
        # No rule, nothing to check - but a fault a previous run left on ends at the first valid
        # value, as check_sample ends it.
        if len(block) == 0 or (rule is None and (st is None or not st.faulted)):
            return [], None, None
        st = self._state_of(stream)
        v = block.value
        ok = valid_rows(block)  # an invalid sample is skipped, as check_sample skips it
        if (
            rule is not None
            and rule.max_rate_per_s is None
            and not st.faulted
            and not bool((ok & ((v < rule.lo) | (v > rule.hi))).any())
        ):
            last = np.flatnonzero(ok)
            if last.size:  # no rate rule: the reference only carries the newest valid value
                st.t, st.v = float(block.t_mono[last[-1]]), float(v[last[-1]])
            return [], None, None
        out: list[Alarm] = []
        bad = np.zeros(len(block), np.bool_)
        off = np.zeros(len(block), np.bool_)
        t_mono, t_wall, values = block.t_mono.tolist(), block.t_wall.tolist(), v.tolist()
        for i in np.flatnonzero(ok).tolist():
            t, x = t_mono[i], values[i]
            alarm = self._step(st, self.violation(stream, t, x, st.t, st.v), stream, t, t_wall[i], x)
            if alarm is not None:
                out.append(alarm)
            bad[i] = st.faulted or st.rate_run > 0
            off[i] = st.out_of_range
        return out, (bad if bad.any() else None), (off if off.any() else None)

    def _step(
        self, st: _State, bad: Violation | None, stream: Stream, t_mono: float, t_wall: float, v: float
    ) -> Alarm | None:
        st.out_of_range = bad is not None and bad.rule == "range"
        if bad is not None and bad.rule == "rate" and not st.faulted:
            if st.rate_run == 0:
                st.rate_since = t_mono
            st.rate_run += 1
            if st.rate_run < RATE_DEBOUNCE or t_mono - st.rate_since < RATE_SPAN_S:
                return None  # not yet a fault, and not a reference either
        elif bad is None:
            st.rate_run = 0
        if bad is None and math.isfinite(v) and not t_mono - st.t < RATE_SPAN_S:
            # Only plausible values become the reference for the rate, at most one per span.
            st.t, st.v = t_mono, v
        if bad is not None and not st.faulted:
            st.faulted = True
            log.warning("plausibility: stream %s: sensor fault: %s", stream.key, describe(bad))
            return Alarm(AlarmKind.SENSOR_FAULT, stream.subject, t_mono, t_wall, stream, _detail(bad))
        if bad is None and st.faulted and math.isfinite(v):
            st.faulted = False
            log.info("plausibility: stream %s: plausible again (%g %s)", stream.key, v, stream.metric.unit)
            return Alarm(
                AlarmKind.SENSOR_RESTORED,
                stream.subject,
                t_mono,
                t_wall,
                stream,
                {"after": "sensor_fault", "rule": "plausibility"},
            )
        return None

    def check_window(self, record: WindowRecord) -> list[Violation]:
        """Streams of a window whose min/max leave the range or whose slope beats the rate limit."""
        out: list[Violation] = []
        for sf in record.streams:
            bad = self.window_violation(sf)
            if bad is not None:
                out.append(bad)
        return out

    def window_violation(self, sf: StreamFeatures) -> Violation | None:
        """The first rule one stream's window features break, or None (pure)."""
        rule = self.rule_for(sf.stream)
        got = [] if rule is None else window_breaches((sf,), ((0, rule),))
        return got[0] if got else None


def window_breaches(streams: Sequence[StreamFeatures], rules: Iterable[tuple[int, Rule]]) -> list[Violation]:
    """For each (position in ``streams``, rule): the first part of it the stream's window breaks (pure).

    Callers that vet every window look each stream's rule up once (:meth:`PlausibilityChecker.rule_for`)
    and call this once per window; a stream without a usable sample (a gap) breaks nothing, unless
    the windower left values out of it as implausible (``implausible_span``).
    """
    out: list[Violation] = []
    for pos, rule in rules:
        sf = streams[pos]
        span = sf.implausible_span
        if not sf.count and span is None:
            continue
        f = sf.features
        lo = f.get("min", math.inf)
        hi = f.get("max", -math.inf)
        if span is not None:  # values the windower left out as implausible still break the rule
            lo, hi = min(lo, span[0]), max(hi, span[1])
        if lo < rule.lo:
            out.append(Violation(sf.stream, "range", lo, rule.lo))
        elif hi > rule.hi:
            out.append(Violation(sf.stream, "range", hi, rule.hi))
        elif rule.max_rate_per_s is not None:
            slope = f.get("slope")
            if slope is not None and abs(slope) > rule.max_rate_per_s:
                out.append(Violation(sf.stream, "rate", slope, rule.max_rate_per_s))
    return out


def describe(bad: Violation) -> str:
    """A violation in words, e.g. "rate +2.3 Cel/s beyond +-2 Cel/s"."""
    unit = bad.stream.metric.unit
    if bad.rule == "rate":
        return f"rate {bad.value:+.3g} {unit}/s beyond +-{bad.limit:g} {unit}/s"
    side = "below" if bad.value < bad.limit else "above"
    return f"value {bad.value:g} {unit} {side} the plausible {bad.limit:g} {unit}"


def _detail(bad: Violation) -> dict[str, float | str]:
    """Alarm detail of a violation: numbers and plain tokens only (the anonymizer refuses text)."""
    return {"rule": bad.rule, "value": bad.value, "limit": bad.limit}
