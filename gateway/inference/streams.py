"""A detector for every stream no model covers: robust level and spread, CUSUM for steps and drifts.

Each numeric stream of a subject that no other model scores is commissioned on its own first
windows: its level is the median of the window means and its spread 1.4826 x their median absolute
deviation (floored, so a constant tag does not make every change infinite).  After that each
window is judged by

* the level: ``|z| > z_limit`` (a jump far outside anything commissioning saw), and
* a two-sided CUSUM of ``z`` with allowance ``k`` and decision interval ``h`` (Page's), which
  accumulates small persistent shifts - a step, or a drift - that no single window shows.

Overlapping windows share samples, so the CUSUM steps only once per window length (every
``round(window / hop)`` windows): its increments are then nearly independent, as Page's run-length
figures assume.  The score is the larger of ``|z| / z_limit`` and ``S / h`` over the subject's
streams (above 1: anomalous); the contributions name the streams.  Alarms go through the same
episode logic as every model, with ``model = "stream_change"``.

A change is one episode, its end is not a second one: once a stream is flagged it stays flagged
until the mean of its last ``settle_steps`` CUSUM steps is back within the allowance of its
baseline; then both sums restart from zero.  Without that, the sums decaying from their cap after a
fault ends (or the return itself, seen as a step the other way) would flap around ``h`` and raise
again.  A change that persists stays flagged: there is no adaptation, after a lasting change the
operator recommissions the subject (deletes its state file), the detector never learns a change as
normal.

``seasonality = "daily"``: the level is learnt per hour of the site's day (``day_offset_h`` from
UTC) from at least a day of commissioning, so a plant's shift pattern is its normal, not a change;
the spread is then that of the values around their hour's level.

On by default for industrial subjects no model covers (``[models.streams] enabled = false`` turns
it off); its defaults (six hours of commissioning) raise no alarm on the simulated healthy pump
in the hour after (tests/test_stream_detector.py; one hour of commissioning is too short for its
slowly wandering water temperature).  A slowly wandering stream's deviations persist for many CUSUM
steps, so the sums take them in units of the long-run spread (the lag-1 autocorrelation of the
commissioning values, AR(1) variance inflation).

A stream holding less than ``min_coverage`` of its window's expected samples (after a start or an
outage: :mod:`gateway.inference.partial`) is skipped for that window like an absent one: neither
learned from nor stepped; while it is flagged the window is indeterminate (``partial``), not a
sign that the subject is normal again.

A stream's baseline is in its unit (the OPC UA tag's EngineeringUnits, a configured unit, a
driver's UCUM code).  When a stream's unit changes (degC to degF after a PLC program change, a
corrected ``unit`` in the config) that stream is commissioned again from its next window: its
values are not judged against a baseline in another unit (a false change) nor learned into it.
The baseline is not converted: a new unit label does not say whether the values changed with it
(a PLC rescaled, or a wrong label corrected) and commissioning again is right either way.  Units
are compared as :func:`gateway.units.normalise` spells them (``°C`` and ``Cel`` are one unit).
The change is logged once, and until that stream is commissioned again (across restarts too) the
subject's status says ``commissioning (unit changed from X to Y: <stream>)``.  A stream flagged
when its unit changes keeps its change open: until commissioned again the subject's windows are
indeterminate (``unit_changed``), neither cleared by its other streams nor judged; commissioned
on the values of the open change, it is judged against them (logged) and may settle there.
An empty unit (a driver that could not read it, as the OPC UA driver when a tag's EngineeringUnits
read is not good) is unknown, never a change: a known unit is kept, an unknown one taken from the
next window that has one (UCUM ``1``, dimensionless, is a unit like any other).

Commissioning values, fitted levels and each stream's unit persist per subject under
``<state_dir>/models/``.  A state stored before units were kept (version 2) is loaded with its
baselines' units unknown: kept, each taking its stream's unit from the next window and stored
at once, so a change of unit while the gateway is down is seen at the next start.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.contracts import DEFAULT_MIN_COVERAGE, ModelResult, WindowModel, WindowRecord
from gateway.inference.partial import PARTIAL, Coverage
from gateway.inference.statefile import state_file, store_json
from gateway.units import normalise

__all__ = ["StreamChange", "StreamUse", "build_stream_change"]

log = logging.getLogger(__name__)

NAME = "stream_change"
_SAVE_EVERY = 20
STATE_VERSION = 3  # 3: each stream's unit; 2 (no units) loads with its units unknown
DAY_S = 86_400.0
_MIN_PER_HOUR = 3  # commissioning values an hour of the day needs for its own level


class StreamUse(BaseModel):
    """The ``[models.streams]`` table: the per-stream detector (on unless ``enabled = false``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    enabled: bool = True
    subject_kind: str = "industrial"
    subjects: list[str] = Field(default_factory=list)  # empty: every subject of that kind
    feature: str = "mean"
    # Six hours: the span must hold several periods of the slowest normal wandering (a water
    # temperature following the ambient over tens of minutes), else that wandering is a change.
    commissioning_s: float = Field(21_600.0, gt=0, le=30 * 86_400)
    seasonality: Literal["none", "daily"] = "none"
    day_offset_h: float = Field(0.0, ge=-14.0, le=14.0)  # the site's local day against UTC
    z_limit: float = Field(8.0, gt=0)
    # CUSUM allowance and decision interval in robust spreads: k = 0.5 finds a 1-spread shift;
    # with h = 10 Page's in-control run length is several thousand independent steps.
    cusum_k: float = Field(0.5, gt=0)
    cusum_h: float = Field(10.0, gt=0)
    # CUSUM steps whose mean must be back within k of the baseline before a flagged stream is
    # normal again (and its sums restart).
    settle_steps: int = Field(8, ge=1, le=1000)
    min_spread_rel: float = Field(0.002, ge=0)
    min_spread_abs: float = Field(1e-6, gt=0)
    # Share of its expected samples a stream must hold in a window to be judged or learned from
    # (after a start or an outage it holds less); 0: every window.
    min_coverage: float = Field(DEFAULT_MIN_COVERAGE, ge=0, le=1)

    @model_validator(mode="after")
    def _a_day_for_daily(self) -> StreamUse:
        if self.seasonality == "daily" and self.commissioning_s < DAY_S:
            raise ValueError(
                f"seasonality = 'daily' needs commissioning_s >= {DAY_S:.0f} (a whole day of history), "
                f"got {self.commissioning_s:g}: raise commissioning_s or set seasonality = 'none'"
            )
        return self


def _doubles(values: Sequence[float] = ()) -> array[float]:
    return array("d", values)


def _hours(values: Sequence[int] = ()) -> array[int]:
    return array("B", values)


@dataclass(slots=True)
class _Stream:
    # Packed: six hours of commissioning at one value a hop is thousands of values per stream, 8
    # bytes each here against 40 in a list of floats (its slot and the float), which grew the heap for six hours.
    values: array[float] = field(default_factory=_doubles)
    hours: array[int] = field(default_factory=_hours)  # hour of the day of each value (daily only)
    level: float | None = None
    levels: list[float] = field(default_factory=list)  # per hour of the day (daily only)
    spread: float = 1.0
    # The CUSUM's spread over the window's: sqrt((1 + r) / (1 - r)), r its lag-1 correlation.
    memory: float = 1.0
    # Added to the allowance k: twice the standard error of the level (per hour: a day gives each
    # hour's level few values), so the error of the baseline itself does not build up as a change.
    slack: float = 0.0
    up: float = 0.0
    down: float = 0.0
    active: bool = False  # flagged, until back at its baseline
    recent: list[float] = field(default_factory=list)  # CUSUM-step deviations while flagged
    # The unit of its values and baseline; None: unknown (stored before units were kept), taken
    # from the stream's next window.
    unit: str | None = None
    why: str = ""  # why it commissions again: "X to Y" after a change of unit


class StreamChange:
    """A :class:`gateway.contracts.WindowModel` watching each uncovered stream on its own."""

    def __init__(
        self,
        use: StreamUse,
        *,
        hop_s: float,
        state_dir: Path | None = None,
        covered: Callable[[WindowRecord], bool] = lambda _r: False,
    ) -> None:
        self.name = NAME
        self.use = use
        self._hop_s = hop_s
        self._need = max(30, math.ceil(use.commissioning_s / hop_s))
        # The partial commissioning is rewritten whole: at most ~50 times, however short the hop.
        self._save_every = max(_SAVE_EVERY, self._need // 50)
        self._state_dir = state_dir
        self._covered = covered
        self._subjects = frozenset(use.subjects)
        self._state: dict[str, dict[str, _Stream]] = {}
        self._learned: dict[str, int] = {}  # windows each subject has commissioned on
        self.coverage = Coverage(NAME, use.min_coverage)

    @property
    def commissioning_windows(self) -> int:
        """Windows each stream needs before it is judged."""
        return self._need

    def subject_states(self, known: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
        """Per subject scored so far: ``commissioning`` (and why, after a change of unit) or ``active``."""
        del known  # only subjects the scoring thread has seen: reading a state file here would race
        out: dict[str, str] = {}
        # Copies: the scoring thread adds subjects and streams meanwhile.
        for subject, streams in list(self._state.items()):
            changed = [f"{st.why}: {key}" for key, st in list(streams.items()) if st.why]
            if changed:
                out[subject] = f"commissioning (unit changed from {'; '.join(changed)})"
            elif not streams or any(st.level is None for st in list(streams.values())):
                out[subject] = "commissioning"
            else:
                out[subject] = "active"
        return out

    def applies_to(self, record: WindowRecord) -> bool:
        """Subjects of the configured kind that no other model scores."""
        if record.kind != self.use.subject_kind or (self._subjects and record.subject not in self._subjects):
            return False
        return not self._covered(record)

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        """Commission or judge each window's streams; see the module docstring."""
        return [self._one(r) for r in records]

    def _hour(self, record: WindowRecord) -> int:
        t = record.end_wall - 0.5 * record.length_s + 3600.0 * self.use.day_offset_h
        return int((t % DAY_S) // 3600.0)

    def _one(self, record: WindowRecord) -> ModelResult:
        u = self.use
        streams = self._state.get(record.subject)
        if streams is None:
            streams = self._state[record.subject] = self._load(record.subject)
        stride = max(1, round(record.length_s / self._hop_s))
        step = record.index % stride == 0
        hour = self._hour(record) if u.seasonality == "daily" else 0
        scores: dict[str, float] = {}
        flagged: list[str] = []
        learning = fitted = recommission = adopted = pending = False
        # A stream holding part of its window is skipped like an absent one: not learned from,
        # no CUSUM step; while it is flagged the window cannot say the subject is normal.
        cover = self.coverage
        short = cover.short_stream(record.subject, record.streams, count=False)
        held = gapped = False
        for sf in record.streams:
            value = sf.features.get(u.feature)
            key = sf.stream.metric.name
            # "" (a driver that could not read the unit) is unknown, never a change; UCUM "1"
            # (dimensionless) is a unit like any other.
            unit = normalise(sf.stream.metric.unit or "")
            st = streams.get(key)
            # Before the gap and partial checks: a window a stream only starts to fill in its new
            # unit (after a restart, a reconnect) already says its baseline is in another.
            if st is not None and unit and st.unit != unit:
                if not st.unit:
                    # Unknown (stored before units were kept, or unread): the baseline is taken to
                    # be in this one, stored so that a change while the gateway is down is seen.
                    st.unit = unit
                    adopted = adopted or st.level is not None
                else:
                    st = streams[key] = self._unit_changed(record.subject, key, st, unit)
                    recommission = True
            if value is None or not math.isfinite(value):
                # A flagged stream in a gap says nothing either: its change is not over.
                gapped = gapped or (st is not None and st.active)
                continue
            if short and sf.partial(cover.min_coverage):
                held = held or (st is not None and st.active)
                continue
            if st is None:
                st = streams[key] = _Stream(unit=unit or None)
            if st.level is None:
                learning = True
                # Flagged when its unit changed: the change is not over, nor judged, until it is
                # commissioned again.
                pending = pending or st.active
                st.values.append(value)
                if u.seasonality == "daily":
                    st.hours.append(hour)
                if len(st.values) >= self._need:
                    self._fit(st, stride)
                    fitted = True
                    st.why = ""
                    log.info("models %s: subject %s stream %s commissioned", NAME, record.subject, key)
                    if st.active:
                        log.warning(
                            "models %s: subject %s stream %s: commissioned again while its change was "
                            "open: its new baseline holds that condition, so the change may end against it",
                            NAME,
                            record.subject,
                            key,
                        )
                continue
            z = (value - (st.levels[hour] if st.levels else st.level)) / st.spread
            if step:
                # Capped at 1.5 h so the sums of a long change do not grow without bound.
                cap = 1.5 * u.cusum_h
                zc = z / st.memory
                k = u.cusum_k + st.slack
                st.up = min(cap, max(0.0, st.up + zc - k))
                st.down = min(cap, max(0.0, st.down - zc - k))
                if st.active:
                    # In the CUSUM's units, so a stream that wanders normally can settle too.
                    st.recent = [*st.recent[-(u.settle_steps - 1) :], zc] if u.settle_steps > 1 else [zc]
                    if len(st.recent) == u.settle_steps and abs(sum(st.recent)) <= k * u.settle_steps:
                        # Back at the pre-change baseline: the return is the change's end, not a
                        # second change, so the sums restart from zero.
                        st.active, st.up, st.down, st.recent = False, 0.0, 0.0, []
                        log.info(
                            "models %s: subject %s stream %s back at its baseline", NAME, record.subject, key
                        )
            score = max(abs(z) / u.z_limit, max(st.up, st.down) / u.cusum_h)
            scores[key] = score
            if score > 1.0 and not st.active:
                st.active, st.recent = True, []
            if st.active:
                flagged.append(key)
        n = self._learned.get(record.subject, 0) + learning
        self._learned[record.subject] = n
        # Stored at once after a change of unit: a restart must not bring the old baseline back.
        if recommission or adopted or (learning and (fitted or n % self._save_every == 0)):
            self._save(record.subject, streams)
        if (short and not scores and not learning) or (held and not flagged):
            cover.partial_windows += 1
            return PARTIAL
        if pending and not flagged:
            # Its other streams normal say nothing of the one whose change is open.
            return ModelResult(math.nan, False, reason="unit_changed")
        if not scores or (gapped and not flagged):
            return ModelResult(math.nan, False, reason="commissioning" if learning and not gapped else "gap")
        score = max(scores.values())
        if not flagged:
            return ModelResult(score, False)
        weight = {k: max(scores[k], 1.0) for k in flagged}
        total = sum(weight.values())
        contributions = {k: round(v / total, 4) for k, v in sorted(weight.items(), key=lambda kv: -kv[1])}
        return ModelResult(score, True, dict(list(contributions.items())[:5]))

    def _unit_changed(self, subject: str, key: str, was: _Stream, new: str) -> _Stream:
        """A fresh stream in ``new`` in place of ``was`` (its change, if open, kept); logged and shown in the status."""
        old = was.unit or ""
        log.warning(
            "models %s: subject %s stream %s: unit changed from %s to %s: its baseline is in the old unit, "
            "so it is commissioned again from this window (about %.0f s) and not judged until then",
            NAME,
            subject,
            key,
            old,
            new,
            self._need * self._hop_s,
        )
        return _Stream(unit=new, why=f"{old} to {new}", active=was.active)

    def _fit(self, st: _Stream, stride: int) -> None:
        u = self.use
        st.level = _median(st.values)
        if u.seasonality == "daily":
            by_hour: dict[int, list[float]] = {}
            for h, v in zip(st.hours, st.values, strict=True):
                by_hour.setdefault(h, []).append(v)
            st.levels = [
                _median(by_hour[h]) if len(by_hour.get(h, ())) >= _MIN_PER_HOUR else st.level
                for h in range(24)
            ]
            resid = [v - st.levels[h] for h, v in zip(st.hours, st.values, strict=True)]
            counts = [len(v) for v in by_hour.values() if len(v) >= _MIN_PER_HOUR]
            n_level = min(counts) if counts else len(st.values)
        else:
            resid = [v - st.level for v in st.values]
            n_level = len(st.values)
        mad = _median([abs(r - _median(resid)) for r in resid])
        st.spread = max(1.4826 * mad, u.min_spread_rel * abs(st.level), u.min_spread_abs)
        # A process that wanders slowly (a temperature following the ambient) keeps its deviations
        # for many CUSUM steps: Page's figures assume independent steps, so the sums take the
        # deviations in units of their long-run spread (AR(1) variance inflation), measured on the
        # commissioning values one CUSUM step apart.
        x = resid[::stride]
        m = sum(x) / len(x)
        var = sum((a - m) ** 2 for a in x)
        r = sum((a - m) * (b - m) for a, b in itertools.pairwise(x)) / var if var > 0 else 0.0
        r = min(max(r, 0.0), 0.98)
        st.memory = math.sqrt((1.0 + r) / (1.0 - r))
        # A median's standard error is 1.2533 sd / sqrt(n); in CUSUM units (long-run spreads)
        # the autocorrelation cancels out.
        st.slack = 2.0 * 1.2533 / math.sqrt(n_level)
        st.values, st.hours = _doubles(), _hours()

    # ---- persistence ---------------------------------------------------------------------

    def _path(self, subject: str) -> Path | None:
        return state_file(self._state_dir, NAME, subject)

    def _key(self, version: int = STATE_VERSION) -> list[object]:
        return [version, self._need, self.use.seasonality, self.use.day_offset_h]

    def _load(self, subject: str) -> dict[str, _Stream]:
        path = self._path(subject)
        if path is None or not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("key") == self._key(2):
                # Stored before units were kept: each baseline is taken to be in its stream's unit
                # at the next window (a unit that changed while the gateway was down is not seen).
                log.info(
                    "models %s: subject %s: stored state has no units (version 2): baselines kept, "
                    "each in its stream's unit from the next window",
                    NAME,
                    subject,
                )
            elif raw.get("key") != self._key():
                log.info("models %s: stored state of other settings; commissioning again", NAME)
                return {}
            return {
                k: _Stream(
                    _doubles([float(x) for x in v["values"]]),
                    _hours([int(h) for h in v["hours"]]),
                    None if v["level"] is None else float(v["level"]),
                    [float(x) for x in v["levels"]],
                    float(v["spread"]),
                    float(v["memory"]),
                    float(v["slack"]),
                    unit=str(v["unit"]) if v.get("unit") else None,
                    why=str(v.get("why", "")),
                )
                for k, v in raw["streams"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("models %s: stored state %s unusable (%s); commissioning again", NAME, path, exc)
            return {}

    def _save(self, subject: str, streams: dict[str, _Stream]) -> None:
        path = self._path(subject)
        body = {
            "key": self._key(),
            "streams": {
                k: {
                    "values": s.values.tolist(),
                    "hours": s.hours.tolist(),
                    "level": s.level,
                    "levels": s.levels,
                    "spread": s.spread,
                    "memory": s.memory,
                    "slack": s.slack,
                    "unit": s.unit,
                    "why": s.why,
                }
                for k, s in streams.items()
            },
        }
        store_json(path, body, NAME)


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return 0.5 * (v[(n - 1) // 2] + v[n // 2])


def build_stream_change(
    use: StreamUse | None, *, hop_s: float, state_dir: Path | None, others: Sequence[WindowModel]
) -> list[StreamChange]:
    """The per-stream detector the ``[models.streams]`` table asks for, beside ``others``."""
    if use is None or not use.enabled:
        return []
    models = tuple(others)

    def covered(record: WindowRecord) -> bool:
        # Never where a trained (or commissioned) model applies: it knows the machine better.
        return any(m.applies_to(record) for m in models)

    return [StreamChange(use, hop_s=hop_s, state_dir=state_dir, covered=covered)]
