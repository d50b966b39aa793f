"""Pure generators of the synthetic source: seeded vital-sign and pump signals with labelled events.

No I/O and no clock: a generator turns a span ``[t0, t1)`` of simulated seconds since start into
columnar values per stream (:class:`Chunk`) plus the ground-truth labels of the events that start
in that span.

Determinism and chunking. Every value of a periodic stream is a pure function of
``(seed, stream, absolute sample index)``: sample ``i`` of a stream at rate ``r`` is taken at
``i / r`` simulated seconds and belongs to the span ``[t0, t1)`` when
``ceil(t0 * r) <= i < ceil(t1 * r)``. Random numbers are drawn on a fixed grid of blocks, each
block from its own ``numpy.random.default_rng((seed, tag, kind, block))``; slow drifts are value
noise whose knots come from the same grid; random events are drawn per simulated hour. So a span
generated in one call or in any number of chunks, in any order, gives identical values.

RR intervals are the one sequential quantity (a beat follows the previous one). The generator keeps
the beat position as a cache, steps beats forward for later spans and replays them from the start
when asked for an earlier span, so RR output is a pure function of the span as well.
"""

from __future__ import annotations

import abc
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.sample import MDC, Metric, Quality, industrial_metric

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]

_BLOCK = 1024  # draws per RNG block; a block is the unit of the fixed grid
# Recent blocks kept per stream and kind of draw: spans move forward, so only the newest few are
# asked for again.  A cap per stream, not one for the whole cache: a cache of 256 blocks in all
# filled up over half an hour at 25 Hz (2 MiB a driver: the growth of a gateway's first hour).
_KEEP_PER_STREAM = 4
_HOUR = 3600.0
_HR_GRID_S = 0.25  # beat timing reads heart rate off this fixed grid
_NORMAL = 0
_UNIFORM = 1

HR = "MDC_ECG_HEART_RATE"
SPO2 = "MDC_PULS_OXIM_SAT_O2"
RR = "MDC_ECG_TIME_PD_RR_GL"
RESP = "MDC_RESP_RATE"
TEMP = "MDC_TEMP_BODY"

ACCEL1 = "Pump1/Accelerometer1RMS"
ACCEL2 = "Pump1/Accelerometer2RMS"
CURRENT = "Pump1/Current"
PRESSURE = "Pump1/Pressure"
MOTOR_TEMP = "Pump1/Temperature"
WATER_TEMP = "Pump1/Thermocouple"
VOLTAGE = "Pump1/Voltage"
FLOW = "Pump1/RateRMS"


@dataclass(frozen=True, slots=True)
class EventKind:
    """How a kind of event is drawn at random: its share among random events and its duration range."""

    weight: float
    min_s: float
    max_s: float


#: Event kinds of the patient profile.
PATIENT_EVENTS: Mapping[str, EventKind] = {
    "desaturation": EventKind(0.4, 60.0, 180.0),
    "bradycardia": EventKind(0.3, 30.0, 120.0),
    "sensor_off": EventKind(0.2, 10.0, 60.0),
    "disconnect": EventKind(0.1, 10.0, 60.0),
    # Never drawn at random (weight 0, so random draws are unchanged); configured explicitly.
    "bigeminy": EventKind(0.0, 60.0, 600.0),
}

#: Every other beat premature at this coupling ratio during a "bigeminy" event, then a fully
#: compensatory pause (a ventricular bigeminy only 10 % premature: see drivers/sim/rhythms.py).
BIGEMINY_COUPLING = 0.9

#: Event kinds of the pump profile.
PUMP_EVENTS: Mapping[str, EventKind] = {
    "bearing_wear": EventKind(0.3, 600.0, 1800.0),
    "valve_fault": EventKind(0.4, 60.0, 300.0),
    "sensor_off": EventKind(0.2, 10.0, 60.0),
    "disconnect": EventKind(0.1, 10.0, 60.0),
}

#: Event kinds of the engine profile (drivers/sim/engine.py; its wear is no event: it is its life).
ENGINE_EVENTS: Mapping[str, EventKind] = {
    "sensor_off": EventKind(0.6, 10.0, 60.0),
    "disconnect": EventKind(0.4, 10.0, 60.0),
}

#: The event kinds each profile accepts.
EVENTS_BY_PROFILE: Mapping[str, Mapping[str, EventKind]] = {
    "patient": PATIENT_EVENTS,
    "pump": PUMP_EVENTS,
    "engine": ENGINE_EVENTS,
}

#: The kind of stream (``Stream.kind``) each profile produces.
STREAM_KIND: Mapping[str, str] = {"patient": "medical", "pump": "industrial", "engine": "industrial"}

# Random event spans never reach past the next hour, so looking back one hour finds every event
# that can still be running.
assert max(k.max_s for p in EVENTS_BY_PROFILE.values() for k in p.values()) < _HOUR


@dataclass(frozen=True, slots=True)
class Label:
    """One ground-truth event: its kind and its span ``[start_s, end_s)`` in simulated seconds."""

    kind: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class Signal:
    """One stream a generator produces: its metric and nominal rate (None for a per-beat series)."""

    metric: Metric
    rate_hz: float | None


@dataclass(frozen=True, slots=True)
class Series:
    """Columnar values of one stream over a span; ``t`` is simulated seconds since start."""

    t: F64
    value: F64
    quality: U8

    def __len__(self) -> int:
        return len(self.t)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Everything generated for ``[t0, t1)``: values by metric name and the labels starting there."""

    t0: float
    t1: float
    series: Mapping[str, Series]
    labels: tuple[Label, ...]


def _tag(name: str) -> int:
    """A stream's RNG tag (crc32 because, unlike ``hash``, it is stable across processes)."""
    return zlib.crc32(name.encode())


def _smoothstep(x: F64) -> F64:
    return x * x * (3.0 - 2.0 * x)


class _Draws:
    """Random draws addressed by ``(name, absolute index)``, drawn per block of a fixed grid."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._cache: dict[tuple[int, int], dict[int, F64]] = {}

    def block(self, tag: int, kind: int, b: int) -> F64:
        """Block ``b`` of the draws for ``tag``: standard normal or uniform on [-1, 1]."""
        recent = self._cache.get((tag, kind))
        if recent is None:
            recent = self._cache[(tag, kind)] = {}
        arr = recent.get(b)
        if arr is None:
            rng = np.random.default_rng((self._seed, tag, kind, b))
            arr = rng.standard_normal(_BLOCK) if kind == _NORMAL else rng.uniform(-1.0, 1.0, _BLOCK)
            if len(recent) >= _KEEP_PER_STREAM:
                del recent[next(iter(recent))]
            recent[b] = arr
        return arr

    def cached_blocks(self) -> int:
        """Blocks held now (bounded by the streams, not by how long the simulator runs)."""
        return sum(len(recent) for recent in self._cache.values())

    def take(self, tag: int, kind: int, i0: int, i1: int) -> F64:
        """Draws ``i0 .. i1 - 1``."""
        if i1 <= i0:
            return np.empty(0, np.float64)
        b0, b1 = i0 // _BLOCK, (i1 - 1) // _BLOCK
        parts = [self.block(tag, kind, b) for b in range(b0, b1 + 1)]
        whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return whole[i0 - b0 * _BLOCK : i1 - b0 * _BLOCK]

    def normal(self, name: str, idx: npt.NDArray[np.int64]) -> F64:
        """Standard normal noise for consecutive sample indices ``idx``."""
        if len(idx) == 0:
            return np.empty(0, np.float64)
        return self.take(_tag(name), _NORMAL, int(idx[0]), int(idx[-1]) + 1)

    def drift(self, name: str, t: F64, spacing_s: float) -> F64:
        """Smooth value noise in [-1, 1]: random knots every ``spacing_s`` seconds, smoothstep between."""
        if len(t) == 0:
            return np.empty(0, np.float64)
        x = t / spacing_s
        k = np.floor(x).astype(np.int64)
        k0 = int(k.min())
        knots = self.take(_tag(name), _UNIFORM, k0, int(k.max()) + 2)
        a = knots[k - k0]
        b = knots[k - k0 + 1]
        return a + (b - a) * _smoothstep(x - k)


@dataclass(frozen=True, slots=True)
class _Event:
    """A label with the magnitudes that shape its signals (drawn once, from the seed)."""

    label: Label
    level: float  # SpO2 nadir, HR target, vibration gain or pressure drop fraction
    extra: float  # HR rise, motor temperature rise or flow drop fraction
    ramp_in: float
    ramp_out: float

    def covers(self, t: F64) -> Mask:
        """Which times fall inside the event's span."""
        return (t >= self.label.start_s) & (t < self.label.end_s)

    def envelope(self, t: F64) -> F64:
        """How far the event has taken the signals, 0..1, at each time."""
        s, e = self.label.start_s, self.label.end_s
        if self.label.kind == "bearing_wear":
            # Wear builds up over the whole span; the span ends with the bearing replaced.
            x = np.clip((t - s) / (e - s), 0.0, 1.0) ** 1.5
        else:
            up = np.clip((t - s) / self.ramp_in, 0.0, 1.0)
            down = np.clip((e - t) / self.ramp_out, 0.0, 1.0)
            x = _smoothstep(np.minimum(up, down))
        return np.where(self.covers(t), x, 0.0)


def _make_event(label: Label, u: F64) -> _Event:
    """Shape one event from four uniform draws in [0, 1)."""
    kind = label.kind
    duration = label.end_s - label.start_s
    if kind == "desaturation":
        level, extra = 80.0 + 6.0 * u[0], 5.0 + 7.0 * u[1]
        ramp_in, ramp_out = 20.0 + 20.0 * u[2], 15.0 + 20.0 * u[3]
    elif kind == "bradycardia":
        level, extra = 35.0 + 10.0 * u[0], 0.0
        ramp_in, ramp_out = 5.0 + 10.0 * u[2], 5.0 + 10.0 * u[3]
    elif kind == "bearing_wear":
        level, extra = 1.6 + 0.8 * u[0], 6.0 + 6.0 * u[1]
        ramp_in, ramp_out = duration, 0.0
    elif kind == "valve_fault":
        level, extra = 0.35 + 0.2 * u[0], 0.3 + 0.2 * u[1]
        ramp_in, ramp_out = 2.0 + 3.0 * u[2], 2.0 + 3.0 * u[3]
    else:
        level = extra = ramp_in = ramp_out = 0.0
    if kind != "bearing_wear" and ramp_in + ramp_out > 0.8 * duration:
        # A short event still reaches its full depth, briefly.
        scale = 0.8 * duration / (ramp_in + ramp_out)
        ramp_in, ramp_out = ramp_in * scale, ramp_out * scale
    return _Event(label, float(level), float(extra), float(ramp_in), float(ramp_out))


class _EventPlan:
    """The configured events plus seeded random ones, drawn per simulated hour on demand."""

    def __init__(
        self, seed: int, kinds: Mapping[str, EventKind], events: Sequence[Label], per_hour: float
    ) -> None:
        self._seed = seed
        self._names = tuple(kinds)
        weights = np.array([kinds[n].weight for n in self._names])
        self._cum = np.cumsum(weights / weights.sum())
        self._kinds = kinds
        self._per_hour = per_hour
        self._fixed = tuple(
            _make_event(lb, np.random.default_rng((seed, _tag("event"), i)).random(4))
            for i, lb in enumerate(events)
        )
        self._hours: dict[int, tuple[_Event, ...]] = {}

    def _random(self, hour: int) -> tuple[_Event, ...]:
        if self._per_hour <= 0 or hour < 0:
            return ()
        got = self._hours.get(hour)
        if got is None:
            rng = np.random.default_rng((self._seed, _tag("random-events"), hour))
            drawn = []
            for _ in range(int(rng.poisson(self._per_hour))):
                u = rng.random(7)
                start = round(hour * _HOUR + float(u[0]) * _HOUR, 3)
                name = self._names[
                    min(int(np.searchsorted(self._cum, u[1], side="right")), len(self._names) - 1)
                ]
                spec = self._kinds[name]
                duration = round(spec.min_s + float(u[2]) * (spec.max_s - spec.min_s), 3)
                drawn.append(_make_event(Label(name, start, start + duration), u[3:]))
            got = tuple(sorted(drawn, key=lambda ev: ev.label.start_s))
            if len(self._hours) >= 8:
                del self._hours[next(iter(self._hours))]
            self._hours[hour] = got
        return got

    def _candidates(self, t0: float, t1: float) -> list[_Event]:
        first, last = math.floor(t0 / _HOUR) - 1, math.floor(t1 / _HOUR)
        out = list(self._fixed)
        for h in range(first, last + 1):
            out.extend(self._random(h))
        return out

    def overlapping(self, t0: float, t1: float) -> list[_Event]:
        """Events whose span meets ``[t0, t1]``, by start time."""
        hit = [ev for ev in self._candidates(t0, t1) if ev.label.start_s <= t1 and ev.label.end_s > t0]
        return sorted(hit, key=lambda ev: (ev.label.start_s, ev.label.kind))

    def starting(self, t0: float, t1: float) -> tuple[Label, ...]:
        """Labels of the events that start in ``[t0, t1)``, by start time."""
        hit = [ev.label for ev in self._candidates(t0, t1) if t0 <= ev.label.start_s < t1]
        return tuple(sorted(hit, key=lambda lb: (lb.start_s, lb.kind)))


def _covered(events: Sequence[_Event], kind: str, t: F64) -> Mask:
    mask = np.zeros(len(t), np.bool_)
    for ev in events:
        if ev.label.kind == kind:
            mask |= ev.covers(t)
    return mask


def _indices(rate_hz: float, t0: float, t1: float) -> npt.NDArray[np.int64]:
    return np.arange(math.ceil(t0 * rate_hz), math.ceil(t1 * rate_hz), dtype=np.int64)


class Generator(abc.ABC):
    """A seeded source of one profile's streams; see the module docstring for determinism."""

    profile: str
    _fault_signals: frozenset[str]  # streams a sensor_off event blanks
    _fault_flag: Quality

    def __init__(
        self, *, seed: int, rate_hz: float, events: Sequence[Label] = (), random_events_per_hour: float = 0.0
    ) -> None:
        kinds = EVENTS_BY_PROFILE[self.profile]
        for lb in events:
            if lb.kind not in kinds or not 0.0 <= lb.start_s < lb.end_s:
                raise ValueError(
                    f"sim {self.profile} generator: event {lb}: kind or span not valid for this profile: "
                    "validate the config with SimConfig first"
                )
        if seed < 0 or not 0.0 < rate_hz <= 1000.0:
            raise ValueError(
                f"sim {self.profile} generator: seed {seed}, rate {rate_hz} Hz: out of range: "
                "need seed >= 0 and 0 < rate <= 1000"
            )
        self.seed = seed
        self.rate_hz = rate_hz
        self.kind = STREAM_KIND[self.profile]
        self._draws = _Draws(seed)
        self._plan = _EventPlan(seed, kinds, events, random_events_per_hour)
        self._base: list[float] = np.random.default_rng((seed, _tag(self.profile))).random(16).tolist()

    @property
    @abc.abstractmethod
    def signals(self) -> tuple[Signal, ...]:
        """The streams this generator produces, in a fixed order."""

    @abc.abstractmethod
    def _values(self, name: str, idx: npt.NDArray[np.int64], t: F64, events: Sequence[_Event]) -> F64:
        """True-plus-measurement values of periodic stream ``name`` at sample indices ``idx``."""

    def _event_series(self, name: str, t0: float, t1: float) -> tuple[F64, F64]:
        """Times and values of an event (per-beat) series in ``[t0, t1)``."""
        raise NotImplementedError(name)

    def labels(self, t0: float, t1: float) -> tuple[Label, ...]:
        """Ground-truth labels of the events starting in ``[t0, t1)``."""
        return self._plan.starting(t0, t1)

    def generate(self, t0: float, t1: float) -> Chunk:
        """Every stream's samples due in ``[t0, t1)`` simulated seconds, with the labels starting there."""
        if not (math.isfinite(t0) and math.isfinite(t1) and 0.0 <= t0 <= t1):
            raise ValueError(f"sim {self.profile} generator: bad span [{t0}, {t1}): need 0 <= t0 <= t1")
        events = self._plan.overlapping(t0, t1)
        out: dict[str, Series] = {}
        for sig in self.signals:
            name = sig.metric.name
            if sig.rate_hz is None:
                t, value = self._event_series(name, t0, t1)
                quality = np.zeros(len(t), np.uint8)
            else:
                idx = _indices(sig.rate_hz, t0, t1)
                t = idx / sig.rate_hz
                value = self._values(name, idx, t, events)
                quality = np.zeros(len(t), np.uint8)
                if name in self._fault_signals:
                    off = _covered(events, "sensor_off", t)
                    value = np.where(off, np.nan, value)
                    quality[off] = int(self._fault_flag)
            # A disconnected device sends nothing at all.
            keep = ~_covered(events, "disconnect", t)
            out[name] = Series(t[keep], value[keep], quality[keep])
        return Chunk(t0, t1, out, self._plan.starting(t0, t1))


class PatientGenerator(Generator):
    """A resting adult on a bedside monitor: ECG heart rate and RR, SpO2, respiration, temperature."""

    profile = "patient"
    _fault_signals = frozenset({HR, SPO2})
    _fault_flag = Quality.SENSOR_OFF

    def __init__(
        self, *, seed: int, rate_hz: float, events: Sequence[Label] = (), random_events_per_hour: float = 0.0
    ) -> None:
        super().__init__(
            seed=seed, rate_hz=rate_hz, events=events, random_events_per_hour=random_events_per_hour
        )
        u = self._base
        self._hr0 = 64.0 + 14.0 * u[0]
        self._spo2_0 = 96.5 + 1.5 * u[1]
        self._resp0 = 13.0 + 4.0 * u[2]
        self._temp0 = 36.75 + 0.25 * u[3]
        # HRV: respiratory sinus arrhythmia, a ~0.1 Hz (Mayer wave) component and beat-to-beat
        # scatter, sized so RMSSD lands in the 20-50 ms of a healthy adult at rest.
        self._rsa_ms = 12.0 + 12.0 * u[4]
        self._rsa_phase = 2.0 * math.pi * u[5]
        self._lf_ms = 10.0 + 10.0 * u[6]
        self._lf_phase = 2.0 * math.pi * u[7]
        self._rr_sd_ms = 12.0 + 10.0 * u[8]
        self._first_beat = 0.1 + 0.8 * u[9]
        self._signals = (
            Signal(MDC[HR], rate_hz),
            Signal(MDC[SPO2], rate_hz),
            Signal(MDC[RR], None),
            Signal(MDC[RESP], rate_hz / 4.0),
            Signal(MDC[TEMP], 0.1),
        )
        self._gap_kinds = ("sensor_off", "disconnect")
        self._beat_reset()

    @property
    def signals(self) -> tuple[Signal, ...]:
        """HR, SpO2, RR intervals, respiration rate, body temperature."""
        return self._signals

    def _hr_true(self, t: F64, events: Sequence[_Event]) -> F64:
        hr = (
            self._hr0
            + 5.0 * self._draws.drift("hr/fast", t, 90.0)
            + 3.0 * self._draws.drift("hr/slow", t, 600.0)
        )
        for ev in events:
            if ev.label.kind == "desaturation":
                hr = hr + ev.extra * ev.envelope(t)
            elif ev.label.kind == "bradycardia":
                hr = hr + (ev.level - hr) * ev.envelope(t)
        return hr

    def _values(self, name: str, idx: npt.NDArray[np.int64], t: F64, events: Sequence[_Event]) -> F64:
        noise = self._draws.normal(name, idx)
        if name == HR:
            # Monitors report whole beats per minute.
            return np.round(self._hr_true(t, events) + 0.7 * noise)
        if name == SPO2:
            spo2 = self._spo2_0 + 0.8 * self._draws.drift("spo2", t, 120.0)
            for ev in events:
                if ev.label.kind == "desaturation":
                    spo2 = spo2 + (ev.level - spo2) * ev.envelope(t)
            # Oximeters report whole percent.
            return np.clip(np.round(spo2 + 0.35 * noise), 0.0, 100.0)
        if name == RESP:
            resp = self._resp0 + 2.0 * self._draws.drift("resp", t, 180.0)
            for ev in events:
                if ev.label.kind == "desaturation":
                    resp = resp + 3.0 * ev.envelope(t)
            return np.round(resp + 0.6 * noise)
        if name == TEMP:
            temp = self._temp0 + 0.12 * self._draws.drift("temp", t, 900.0) + 0.02 * noise
            return np.round(temp, 1)
        raise ValueError(f"sim patient generator: no stream {name!r}")

    def _beat_reset(self) -> None:
        self._beat_n = 0
        self._beat_t = self._first_beat
        self._beat_prev = -1.0
        self._beat_rr = math.nan
        self._beat_pos = 0.0
        self._beat_debt = 0.0  # what a premature beat took from the sinus interval, paid back next

    def _event_series(self, name: str, t0: float, t1: float) -> tuple[F64, F64]:
        if name != RR:
            raise ValueError(f"sim patient generator: no event series {name!r}")
        if t0 < self._beat_pos:
            self._beat_reset()
        self._beat_pos = t1
        if self._beat_t >= t1:
            return np.empty(0, np.float64), np.empty(0, np.float64)
        # Heart rate on a fixed absolute grid, so beat timing does not depend on chunk edges.
        g0 = math.floor(self._beat_t / _HR_GRID_S)
        g1 = math.floor(t1 / _HR_GRID_S) + 2
        grid_t = np.arange(g0, g1 + 1, dtype=np.float64) * _HR_GRID_S
        hr_grid: list[float] = self._hr_true(
            grid_t, self._plan.overlapping(float(grid_t[0]), float(grid_t[-1]))
        ).tolist()
        gaps = [
            (ev.label.start_s, ev.label.end_s)
            for ev in self._plan.overlapping(max(self._beat_prev, 0.0), t1)
            if ev.label.kind in self._gap_kinds
        ]
        bigeminy = [
            (ev.label.start_s, ev.label.end_s)
            for ev in self._plan.overlapping(max(self._beat_prev, 0.0), t1)
            if ev.label.kind == "bigeminy"
        ]
        tag = _tag("rr/scatter")
        w_rsa = 2.0 * math.pi * self._resp0 / 60.0
        w_lf = 2.0 * math.pi * 0.1
        times: list[float] = []
        values: list[float] = []
        while self._beat_t < t1:
            t = self._beat_t
            # An interval is known only when both of its beats were seen.
            if (
                t >= t0
                and self._beat_n > 0
                and not any(s <= t < e or s <= self._beat_prev < e for s, e in gaps)
            ):
                times.append(t)
                values.append(self._beat_rr)
            x = t / _HR_GRID_S
            k = math.floor(x)
            f = x - k
            hr = hr_grid[k - g0] * (1.0 - f) + hr_grid[k - g0 + 1] * f
            scatter = float(self._draws.block(tag, _NORMAL, self._beat_n // _BLOCK)[self._beat_n % _BLOCK])
            rr = (
                60000.0 / hr
                + self._rsa_ms * math.sin(w_rsa * t + self._rsa_phase)
                + self._lf_ms * math.sin(w_lf * t + self._lf_phase)
                + self._rr_sd_ms * scatter
            )
            if self._beat_debt:
                rr, self._beat_debt = rr + self._beat_debt, 0.0
            elif self._beat_n % 2 == 0 and any(s <= t < e for s, e in bigeminy):
                rr, self._beat_debt = BIGEMINY_COUPLING * rr, (1.0 - BIGEMINY_COUPLING) * rr
            rr = float(round(min(max(rr, 300.0), 2000.0)))  # whole milliseconds, like a chest strap
            self._beat_prev = t
            self._beat_t = t + rr / 1000.0
            self._beat_rr = rr
            self._beat_n += 1
        return np.array(times, np.float64), np.array(values, np.float64)


#: Pump signals: (metric, nominal level, spread of a unit's own level around nominal). Levels of a
#: small 230 V centrifugal pump in a water loop.
_PUMP_SIGNALS: tuple[tuple[Metric, float, float], ...] = (
    (industrial_metric(ACCEL1, "g"), 0.030, 0.10),
    (industrial_metric(ACCEL2, "g"), 0.045, 0.10),
    (industrial_metric(CURRENT, "A"), 1.30, 0.05),
    (industrial_metric(PRESSURE, "bar"), 1.20, 0.05),
    (industrial_metric(MOTOR_TEMP, "Cel"), 72.0, 0.04),
    (industrial_metric(WATER_TEMP, "Cel"), 27.0, 0.04),
    (industrial_metric(VOLTAGE, "V"), 231.0, 0.01),
    (industrial_metric(FLOW, "l/min"), 32.0, 0.05),
)


@dataclass(frozen=True, slots=True)
class _PumpEffects:
    wear: F64  # extra vibration, as a fraction of normal
    heat: F64  # extra motor temperature, Cel
    valve: F64  # valve fault envelope, 0..1
    pressure_drop: F64  # fraction of pressure lost
    flow_drop: F64  # fraction of flow lost


class PumpGenerator(Generator):
    """A water pump testbed with eight signals (the SKAB set): vibration, electrical, hydraulic, thermal."""

    profile = "pump"
    # sensor_off models the vibration sensor module losing its cable.
    _fault_signals = frozenset({ACCEL1, ACCEL2})
    _fault_flag = Quality.BAD_STATUS

    def __init__(
        self, *, seed: int, rate_hz: float, events: Sequence[Label] = (), random_events_per_hour: float = 0.0
    ) -> None:
        super().__init__(
            seed=seed, rate_hz=rate_hz, events=events, random_events_per_hour=random_events_per_hour
        )
        # Each pump sits a little off nominal.
        self._level = {
            m.name: level * (1.0 + spread * (2.0 * self._base[i] - 1.0))
            for i, (m, level, spread) in enumerate(_PUMP_SIGNALS)
        }
        self._signals = tuple(Signal(m, rate_hz) for m, _, _ in _PUMP_SIGNALS)

    @property
    def signals(self) -> tuple[Signal, ...]:
        """The eight pump signals."""
        return self._signals

    def _effects(self, t: F64, events: Sequence[_Event]) -> _PumpEffects:
        zero = np.zeros(len(t), np.float64)
        wear, heat, valve, p_drop, f_drop = zero, zero, zero, zero, zero
        for ev in events:
            if ev.label.kind == "bearing_wear":
                env = ev.envelope(t)
                wear = wear + (ev.level - 1.0) * env
                heat = heat + ev.extra * env
            elif ev.label.kind == "valve_fault":
                env = ev.envelope(t)
                valve = np.maximum(valve, env)
                p_drop = p_drop + ev.level * env
                f_drop = f_drop + ev.extra * env
        return _PumpEffects(wear, heat, valve, np.minimum(p_drop, 0.9), np.minimum(f_drop, 0.9))

    def _values(self, name: str, idx: npt.NDArray[np.int64], t: F64, events: Sequence[_Event]) -> F64:
        noise = self._draws.normal(name, idx)
        drift = self._draws.drift(name + "/drift", t, 300.0)
        level = self._level[name]
        fx = self._effects(t, events)
        if name in (ACCEL1, ACCEL2):
            # Worn bearings vibrate more and less steadily; a throttled valve adds some cavitation.
            mean = level * (1.0 + 0.05 * drift) * (1.0 + fx.wear + 0.15 * fx.valve)
            return np.abs(mean + level * 0.04 * (1.0 + 2.0 * fx.wear) * noise)
        if name == CURRENT:
            # A throttled centrifugal pump moves less water and draws less current; friction adds some.
            return level * (1.0 + 0.02 * drift) * (1.0 - 0.12 * fx.valve + 0.06 * fx.wear) + 0.03 * noise
        if name == PRESSURE:
            return level * (1.0 + 0.03 * drift) * (1.0 - fx.pressure_drop) + 0.01 * noise
        if name == MOTOR_TEMP:
            return level + 1.5 * self._draws.drift(name + "/slow", t, 900.0) + fx.heat + 0.08 * noise
        if name == WATER_TEMP:
            return level + 0.5 * self._draws.drift(name + "/slow", t, 1200.0) + 0.05 * noise
        if name == VOLTAGE:
            return level + 2.5 * drift + 0.8 * noise
        if name == FLOW:
            return level * (1.0 + 0.03 * drift) * (1.0 - fx.flow_drop) + 0.3 * noise
        raise ValueError(f"sim pump generator: no stream {name!r}")


def make_generator(
    profile: str,
    *,
    seed: int,
    rate_hz: float,
    events: Sequence[Label] = (),
    random_events_per_hour: float = 0.0,
) -> Generator:
    """The generator of ``profile`` ("patient", "pump" or "engine")."""
    cls: type[Generator]
    if profile == "patient":
        cls = PatientGenerator
    elif profile == "pump":
        cls = PumpGenerator
    elif profile == "engine":
        from drivers.sim.engine import EngineGenerator  # noqa: PLC0415 - it builds on this module

        cls = EngineGenerator
    else:
        raise ValueError(f"sim generator: unknown profile {profile!r}: use 'patient', 'pump' or 'engine'")
    return cls(seed=seed, rate_hz=rate_hz, events=events, random_events_per_hour=random_events_per_hour)
