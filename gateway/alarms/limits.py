"""Limit alarms on single streams: IEC 60601-1-8 physiological limits, ISA-18.2 process limits.

A limit needs no model: any stream with a rule gets it.  A rule has up to four levels - LL, L, H,
HH (``low_low``, ``low``, ``high``, ``high_high``) - each with its priority (IEC 60601-1-8 high /
medium / low), and three timings that keep it from crying wolf:

* **on-delay** (IEC 60601-1-8 "alarm condition delay"): the value must stay beyond the limit this
  long before the alarm is raised (SpO2 < 90 % for 10 s);
* **deadband** (ISA-18.2): once raised, the value must come back inside the limit by this much
  before the condition counts as gone, so noise around the limit does not chatter;
* **off-delay** (ISA-18.2): ... and stay there this long before the alarm clears.

Per stream there is one alarm at a time: a SpO2 falling through 90 % and then 85 % raises a
medium-priority ``limit`` and then a high-priority one (an escalation), and one ``limit_cleared``
when it is back.  Every alarm carries its level, priority, limit, value and how long the
condition has held.

Only valid samples are judged.  A sample flagged unusable by its device (probe off, artifact,
bad status, imputed) and one the plausibility rules put out of range (the pipeline says which, as
``invalid``; a value that only broke a rate rule may be real and is judged) is no measurement of
the patient or process: it neither raises, escalates, steps down nor clears a limit alarm - the
technical alarm says what is wrong.  Nor is a silence longer than the stream's loss time
(``lost_after_s``, as the windower reckons it per stream), whose ``sensor_lost`` says so.  While
the data are invalid an alarm on stays on at its level (not indeterminate: the technical alarm
beside it tells that its value is not being measured), and every timer running is paused, not
restarted: an on-delay or an off-delay counts valid time only, so a stretch of invalid data (a
silence: from the last valid sample) neither completes it nor starts it over, and the first valid
sample after the stretch carries it on from where it stood.  A raise's ``held_s`` is the valid
time beyond the limit; a clearance's is the first raise's ``held_s`` plus the whole time since
that raise, the invalid stretches after it included (the alarm was on throughout).  Pure logic,
no I/O.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from gateway.contracts import Alarm, AlarmKind, AlarmPriority
from gateway.pipeline.windows import loss_time
from gateway.sample import SENSOR_LOST_S, Sample, SampleBlock, Stream, valid_rows, valid_sample
from gateway.units import converter

__all__ = ["LEVELS", "LimitChecker", "LimitRule"]

log = logging.getLogger(__name__)

#: The levels of a rule: (name, side: -1 low / +1 high, severity within its side).
LEVELS: tuple[tuple[str, int, int], ...] = (
    ("low_low", -1, 2),
    ("low", -1, 1),
    ("high", 1, 1),
    ("high_high", 1, 2),
)
_SIDE = {name: side for name, side, _ in LEVELS}
_SEVERITY = {name: sev for name, _, sev in LEVELS}
_WORDS = {
    "low_low": "below the low-low",
    "low": "below the low",
    "high": "above the high",
    "high_high": "above the high-high",
}


@dataclass(frozen=True, slots=True)
class LimitRule:
    """The limits of one stream, in ``unit`` (None: the stream's own unit), and their timings."""

    bounds: Mapping[str, float]  # level name -> limit
    priorities: Mapping[str, AlarmPriority]  # level name -> priority
    on_delay_s: float = 0.0
    off_delay_s: float = 0.0
    deadband: float = 0.0  # in the rule's unit
    unit: str | None = None
    # Values strictly inside (inner_lo, inner_hi) are within every limit: the hot path's test.
    inner_lo: float = field(init=False, default=-math.inf)
    inner_hi: float = field(init=False, default=math.inf)

    def __post_init__(self) -> None:
        lows = [b for n, b in self.bounds.items() if _SIDE[n] < 0]
        highs = [b for n, b in self.bounds.items() if _SIDE[n] > 0]
        object.__setattr__(self, "inner_lo", max(lows, default=-math.inf))
        object.__setattr__(self, "inner_hi", min(highs, default=math.inf))

    def in_unit(self, unit: str) -> LimitRule | None:
        """The rule for a stream in ``unit`` (converted), or None when the units do not convert."""
        if self.unit is None or self.unit == unit:
            return self
        absolute = converter(self.unit, unit)
        delta = converter(self.unit, unit, delta=True)
        if absolute is None or delta is None:
            return None
        bounds = {level: absolute(b) for level, b in self.bounds.items()}
        return replace(self, bounds=bounds, deadband=abs(delta(self.deadband)), unit=unit)

    def beyond(self, level: str, v: float, latched: bool) -> bool:
        """True when ``v`` is beyond ``level``'s limit (inside it by less than the deadband if latched)."""
        bound = self.bounds[level]
        band = self.deadband if latched else 0.0
        return v < bound + band if _SIDE[level] < 0 else v > bound - band


@dataclass(slots=True)
class _State:
    onset: dict[str, float] = field(default_factory=dict)  # level -> start of its current stretch
    active: str | None = None
    active_since: float = math.nan
    release_at: float | None = None  # when the active level's condition went away
    # The last usable sample checked and the rule it was checked by: what a clear on a rule change uses.
    stream: Stream | None = None
    rule: LimitRule | None = None
    t: float = math.nan
    t_wall: float = math.nan
    v: float = math.nan
    # Resumed after a restart: how long its condition, begun before the stop, has held at an instant
    # (monotonic, wall) (None: unknown).
    resumed_held: Callable[[float, float], float] | None = None
    # The first invalid sample since the last valid one: its timers are paused from then on.
    paused_at: float = math.nan


class LimitChecker:
    """Limit alarms per stream from a rule lookup; see the module docstring."""

    def __init__(
        self,
        rules: Mapping[str, LimitRule | None],
        subjects: Mapping[str, Mapping[str, LimitRule | None]] | None = None,
        *,
        lost_after_s: float = SENSOR_LOST_S,
    ) -> None:
        # A None rule is a disabled one: it hides a general rule of the same metric.
        self._rules = dict(rules)
        self._subjects = {s: dict(r) for s, r in (subjects or {}).items()}
        self._by_id: dict[int, tuple[Stream, LimitRule | None]] = {}
        self._state: dict[str, _State] = {}
        self._pending: set[str] = set()  # streams with a condition starting, held or clearing
        self._lost_after_s = lost_after_s  # a longer silence of a stream pauses its timers
        self.alarms = 0

    def take_rules(self, other: LimitChecker) -> list[Alarm]:
        """Check by ``other``'s rules from now on, keeping each stream's state (an alarm active stays so).

        A stream whose active level the new rule lacks (or whose rule is gone or disabled) could
        never clear under it: its alarm clears now, by the old rule, and is returned to be sent.
        Conditions starting on levels the new rule lacks are forgotten.
        """
        self._rules, self._subjects = dict(other._rules), {s: dict(r) for s, r in other._subjects.items()}
        self._by_id.clear()  # the cached rule of each stream: looked up again under the new rules
        out: list[Alarm] = []
        for key, st in self._state.items():
            if st.stream is None:
                continue
            new = self.rule_for(st.stream)
            levels = new.bounds if new is not None else {}
            for level in [lv for lv in st.onset if lv not in levels]:
                del st.onset[level]
            active = st.active
            if active is not None and active not in levels:
                st.active, st.release_at = None, None
                if st.rule is not None and active in st.rule.bounds:
                    out.append(
                        self._raise(
                            AlarmKind.LIMIT_CLEARED,
                            st.rule,
                            st.stream,
                            active,
                            st.t,
                            st.t_wall,
                            st.v,
                            st.t - st.active_since,
                        )
                    )
            if not st.onset and st.active is None:
                self._pending.discard(key)
        return out

    def resume(self, stream: Stream, level: str, held: Callable[[float, float], float] | None = None) -> bool:
        """Hold ``stream``'s alarm at ``level`` on, as a previous run left it; False if the rule lacks it.

        Its samples then judge it as if the gateway had never stopped: back inside the limit by the
        deadband for the off-delay clears it, still beyond it sends nothing, beyond only a milder
        limit steps down to it.  ``held`` (how long the condition, begun before the stop, has held
        at a monotonic instant and its wall time: :meth:`gateway.alarms.ledger.AlarmLedger.held_for`):
        the level and the milder ones of its side count as held since its onset, the downtime
        included, as the twin was told; unknown, they count from the first sample after the start.
        """
        rule = self.rule_for(stream)
        if rule is None or level not in rule.bounds:
            return False
        st = self._state.setdefault(stream.key, _State())
        st.active, st.release_at, st.resumed_held = level, None, held
        self._pending.add(stream.key)
        return True

    def forget_source(self, source: str, device: str | None = None) -> None:
        """Drop the state of every stream of ``source`` (of ``device`` only, when given): its alarms were ended."""
        prefix = f"{source}/" if device is None else f"{source}/{device}/"
        gone = {k for k in (*self._state, *self._pending) if k.startswith(prefix)}
        for key in gone:
            self._state.pop(key, None)
            self._pending.discard(key)
        self._by_id = {k: v for k, v in self._by_id.items() if not v[0].key.startswith(prefix)}

    def rule_for(self, stream: Stream) -> LimitRule | None:
        """The stream's rule: its subject's, else the general one; by metric name or last path segment."""
        got = self._by_id.get(id(stream))
        if got is not None and got[0] is stream:
            return got[1]
        rule = None
        for table in (self._subjects.get(stream.subject, {}), self._rules):
            key = _key(table, stream.metric.name)
            if key is not None:
                rule = table[key]
                break
        if rule is not None:
            rule = rule.in_unit(stream.metric.unit)  # None: limits in a unit this one is not
        self._by_id[id(stream)] = (stream, rule)
        return rule

    def check_sample(self, sample: Sample, *, invalid: bool = False) -> Alarm | None:
        """Check one sample (``invalid``: judged implausible); an alarm when the stream's limit state changes."""
        rule = self.rule_for(sample.stream)
        if rule is None:
            return None
        if invalid or not valid_sample(sample):
            self._pause(sample.stream, sample.t_mono)
            return None
        v = sample.value
        if rule.inner_lo <= v <= rule.inner_hi and sample.stream.key not in self._pending:
            return None  # inside every limit with nothing pending: the common case, no state
        return self._step(rule, sample.stream, sample.t_mono, sample.t_wall, v)

    def check_block(self, block: SampleBlock, invalid: npt.NDArray[np.bool_] | None = None) -> list[Alarm]:
        """Check a block of one stream in order (``invalid``: which were judged implausible); the alarms it caused."""
        stream = block.stream
        rule = self.rule_for(stream)
        if rule is None or len(block) == 0:
            return []
        v = block.value
        if stream.key not in self._pending and not bool(((v < rule.inner_lo) | (v > rule.inner_hi)).any()):
            return []  # nothing pending and every value inside every limit
        usable = valid_rows(block, invalid)
        out: list[Alarm] = []
        for i, ok in enumerate(usable.tolist()):
            if not ok:
                self._pause(stream, float(block.t_mono[i]))
                continue
            alarm = self._step(rule, stream, float(block.t_mono[i]), float(block.t_wall[i]), float(v[i]))
            if alarm is not None:
                out.append(alarm)
        return out

    def _pause(self, stream: Stream, t: float) -> None:
        """An invalid sample at ``t``: the stream's timers stop counting until its next valid one."""
        if stream.key in self._pending:
            st = self._state.get(stream.key)
            if st is not None and math.isnan(st.paused_at):
                # After a silence (a probe put back sends flagged samples first): paused from the
                # last valid sample, as :meth:`_step` does, not from this one.
                st.paused_at = st.t if self._silent(stream, st, t) else t

    def _silent(self, stream: Stream, st: _State, t: float) -> bool:
        """Whether the stream sent nothing valid for longer than its loss time before ``t``."""
        # The cheap test first: the stream's loss time is never below the gateway-wide one.
        silent = t - st.t
        return silent > self._lost_after_s and silent > loss_time(stream, self._lost_after_s)

    def _step(self, rule: LimitRule, stream: Stream, t: float, t_wall: float, v: float) -> Alarm | None:
        st = self._state.get(stream.key)
        if st is None:
            st = self._state[stream.key] = _State()
        # A silence as long as a lost stream's is no measurement either (its sensor_lost alarm says
        # so): paused from the last valid sample, as a flagged stretch from its first.
        if math.isnan(st.paused_at) and self._silent(stream, st, t):
            st.paused_at = st.t
        if not math.isnan(st.paused_at):
            # Back to valid data: the invalid stretch counts neither for nor against a delay.
            gap = max(0.0, t - st.paused_at)
            st.paused_at = math.nan
            for level in st.onset:
                st.onset[level] += gap
            if st.release_at is not None:
                st.release_at += gap
        st.stream, st.rule, st.t, st.t_wall, st.v = stream, rule, t, t_wall, v
        active = st.active
        if active is not None and math.isnan(st.active_since):
            # Resumed after a restart: held since its onset before the stop where the ledger kept
            # it, else since its first sample here.  Beyond the active level is beyond every milder
            # one of its side, so they held as long: a value now between LL and L steps down to L
            # at once, as without the restart, instead of clearing and raising L again 10 s later.
            st.active_since = t
            if st.resumed_held is not None:
                st.active_since = t - st.resumed_held(t, t_wall)
                for level in rule.bounds:
                    if _SIDE[level] == _SIDE[active] and _SEVERITY[level] <= _SEVERITY[active]:
                        st.onset[level] = st.active_since
            st.resumed_held = None
        for level in rule.bounds:
            latched = (
                active is not None and _SIDE[level] == _SIDE[active] and _SEVERITY[level] <= _SEVERITY[active]
            )
            if rule.beyond(level, v, latched):
                st.onset.setdefault(level, t)
            else:
                st.onset.pop(level, None)
        if st.onset or active is not None:
            self._pending.add(stream.key)
        else:
            self._pending.discard(stream.key)
        held = [lv for lv, t0 in st.onset.items() if t - t0 >= rule.on_delay_s]
        target = max(held, key=lambda lv: _SEVERITY[lv], default=None)
        if active is None:
            if target is None:
                return None
            st.active, st.active_since, st.release_at = target, st.onset[target], None
            return self._raise(AlarmKind.LIMIT, rule, stream, target, t, t_wall, v, t - st.onset[target])
        if target is not None and _SEVERITY[target] > _SEVERITY[active]:
            st.active, st.release_at = target, None  # escalation: a second, higher-priority alarm
            return self._raise(AlarmKind.LIMIT, rule, stream, target, t, t_wall, v, t - st.onset[target])
        if active in st.onset:
            st.release_at = None
            return None
        if st.release_at is None:
            st.release_at = t
        if t - st.release_at < rule.off_delay_s:
            return None
        st.release_at = None
        if target is not None:
            st.active = target  # de-escalation: still beyond the milder limit
            return self._raise(AlarmKind.LIMIT, rule, stream, target, t, t_wall, v, t - st.onset[target])
        st.active = None
        return self._raise(AlarmKind.LIMIT_CLEARED, rule, stream, active, t, t_wall, v, t - st.active_since)

    def _raise(
        self,
        kind: AlarmKind,
        rule: LimitRule,
        stream: Stream,
        level: str,
        t: float,
        t_wall: float,
        v: float,
        held_s: float,
    ) -> Alarm:
        bound = rule.bounds[level]
        unit = stream.metric.unit
        priority = rule.priorities[level]
        self.alarms += 1
        if kind is AlarmKind.LIMIT:
            log.warning(
                "limit: stream %s: %g %s %s limit %g %s for %.1f s (%s priority)",
                stream.key,
                v,
                unit,
                _WORDS[level],
                bound,
                unit,
                held_s,
                priority.value,
            )
        else:
            log.info(
                "limit: stream %s: back within the %s limit %g %s after %.1f s",
                stream.key,
                level,
                bound,
                unit,
                held_s,
            )
        return Alarm(
            kind,
            stream.subject,
            t,
            t_wall,
            stream,
            {"level": level},
            priority=priority if kind is AlarmKind.LIMIT else None,
            limit=bound,
            value=v,
            held_s=round(held_s, 3),
        )


def _key(table: Mapping[str, object], name: str) -> str | None:
    """The key of ``table`` that names a metric: the whole name, else its last path segment."""
    if name in table:
        return name
    if "/" in name and (last := name.rsplit("/", 1)[1]) in table:
        return last
    return None
