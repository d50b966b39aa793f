"""Battery state of a pack-powered asset: state of charge by EKF, state of health by capacity.

Fed the pack's voltage, current and (optionally) temperature streams.  Each voltage sample steps
:class:`gateway.inference.battery.BatteryEkf` with the latest current over the time since the
previous step (per cell: the pack voltage divided by the cells in series), learning the series
resistance as it goes (``learn_r0``; it roughly triples as a cell ages).  Capacity is learnt
online from rest to rest: when the pack has rested (|I| below ``REST_A`` for ``REST_S``) its
voltage is an open-circuit voltage, so two rests bracketing a discharge give the SoC drop, and the
charge counted in between divided by it is the capacity; at each such rest the SoC is also
re-anchored to the one the OCV says.  SoH is that capacity over the rated
one.  Low SoC and low health raise process (or physiological, on a medical subject) alarms with
the configured priorities, cleared with a deadband.

A device that reports its own level (a BLE wearable's Battery Level, ``level``) and no pack
voltage and current gets its SoC from that level, with the reporting step's rounding as its
uncertainty (``level_step / sqrt(12)``), and the drain rate (least squares over the last
``level_window_s``, restarted when the level rises: a charge) with the hours left at that rate.
With a pack voltage and current as well, the EKF's SoC is the estimate and the reported level
rides along in its detail.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.contracts import Alarm, Estimate
from gateway.estimation.config import BatterySpec
from gateway.estimation.limits import LowLimits
from gateway.inference.battery import BatteryEkf, CellModel
from gateway.sample import FAULT_FLAGS, Stream

__all__ = ["BatteryState"]

REST_A = 0.05  # below this the pack rests
REST_S = 600.0  # ... for this long: its voltage is then an open-circuit voltage
MIN_DROP = 0.3  # SoC drop between rests needed for a capacity sample
DEADBAND = 2.0  # percentage points above a limit before its alarm clears
CAPACITY_GAIN = 0.5  # weight of a new capacity sample against the running estimate
REST_SOC_SD = 0.02  # SoC read from a rested pack's OCV
R0_SD = 0.02  # ohm: uncertainty of the series resistance when the filter starts
Q_R0 = 1e-12  # ohm^2/s: its random walk (models/recipes/battery_ekf.py)
MIN_DRAIN_SPAN_S = 600.0  # levels over less than this give no drain rate
LEVELS_KEPT = 256  # reported levels kept for the drain rate (a poll every 5 min: 21 h)


class BatteryState:
    """One ``[[estimators.battery]]`` estimator; see the module docstring."""

    def __init__(
        self,
        spec: BatterySpec,
        kind: str,
        emit: Callable[[Estimate], None],
        alarm: Callable[[Alarm], None],
    ) -> None:
        self.spec = spec
        self.kind = kind
        self._emit = emit
        self.cell = CellModel(tuple(spec.ocv), spec.r0, spec.r1, spec.tau_s)
        self.capacity_ah = spec.rated_ah
        self.capacity_samples = 0
        self.ekf: BatteryEkf | None = None
        self._current = math.nan
        self._temperature = math.nan
        self._t = math.nan
        self._streams: dict[str, Stream] = {}
        self._rest_since = math.nan
        self._rest_soc = math.nan  # SoC at the last rest
        self._ah_since_rest = 0.0
        self._next_emit = -math.inf
        self.limits = LowLimits(spec.subject, kind, alarm, DEADBAND)
        self._restored: dict[str, Any] | None = None
        self._r0 = spec.r0
        self.levels: deque[tuple[float, float]] = deque(maxlen=LEVELS_KEPT)  # (t_mono, %) since a charge

    @property
    def key(self) -> str:
        """Where this estimator's state is kept across restarts."""
        return f"battery/{self.spec.subject}"

    def route(self, stream: Stream) -> str | None:
        """The role of ``stream`` in the pack (voltage, current, temperature), or None."""
        if stream.subject != self.spec.subject:
            return None
        name = stream.metric.name
        for role in ("voltage", "current", "temperature", "level"):
            if getattr(self.spec, role) == name:
                return role
        return None

    def update(
        self, role: str, stream: Stream, t_mono: float, t_wall: float, value: float, quality: int
    ) -> None:
        """Fold one sample in; a voltage sample steps the filter."""
        if quality & int(FAULT_FLAGS) or not math.isfinite(value):
            return
        self._streams[role] = stream
        if role == "level":
            self._level(t_mono, t_wall, value)
        elif role == "current":
            self._current = value
        elif role == "temperature":
            self._temperature = value
        elif math.isfinite(self._current):
            self._step(t_mono, t_wall, value / self.spec.cells_in_series)

    def _step(self, t_mono: float, t_wall: float, v_cell: float) -> None:
        i = self._current
        if self.ekf is None:
            soc0 = self.cell.soc_from_rest(v_cell + self.spec.r0 * i)
            sd0 = 0.1
            if self._restored is not None:
                soc0, sd0 = float(self._restored["soc"]), float(self._restored["soc_sd"])
            self.ekf = BatteryEkf(
                self.cell,
                self.capacity_ah,
                soc0=soc0,
                soc0_sd=sd0,
                r_v=self.spec.r_v,
                r0=self._r0,
                r0_sd=R0_SD if self.spec.learn_r0 else 0.0,
                q_r0=Q_R0,
            )
            self._t = t_mono
        dt = max(t_mono - self._t, 0.0)
        self._t = t_mono
        self.ekf.step(dt, i, v_cell)
        self._ah_since_rest += i * dt / 3600.0
        self._learn_capacity(t_mono, v_cell, i)
        if t_mono >= self._next_emit:
            self._next_emit = t_mono + self.spec.every_s
            self._report(t_mono, t_wall)

    def _level(self, t_mono: float, t_wall: float, level: float) -> None:
        if not 0.0 <= level <= 100.0:
            return
        if self.levels and level > self.levels[-1][1]:
            self.levels.clear()  # charged: the drain starts again from here
        self.levels.append((t_mono, level))
        while self.levels[0][0] < t_mono - self.spec.level_window_s:
            self.levels.popleft()
        if self.spec.voltage is None and t_mono >= self._next_emit:
            self._next_emit = t_mono + self.spec.every_s
            self._report_level(t_mono, t_wall)

    def drain_pct_per_h(self) -> float | None:
        """The level's fall per hour since the last charge (least squares), or None while unknown."""
        if len(self.levels) < 3 or self.levels[-1][0] - self.levels[0][0] < MIN_DRAIN_SPAN_S:
            return None
        t = [p[0] for p in self.levels]
        y = [p[1] for p in self.levels]
        tm, ym = sum(t) / len(t), sum(y) / len(y)
        den = sum((ti - tm) ** 2 for ti in t)
        slope = sum((ti - tm) * (yi - ym) for ti, yi in zip(t, y, strict=True)) / den
        return -3600.0 * slope

    def _report_level(self, t_mono: float, t_wall: float) -> None:
        level = self.levels[-1][1]
        detail: dict[str, float | str] = {"reported": level}
        drain = self.drain_pct_per_h()
        if drain is not None:
            detail["drain_pct_h"] = round(drain, 3)
            if drain > 0:
                detail["hours_left"] = round(level / drain, 2)
        stream = self._streams.get("level")
        sources = ((stream, 1.0),) if stream is not None else ()
        self._emit_soc(t_mono, t_wall, level, self.spec.level_step / math.sqrt(12.0), sources, detail)
        self.limits.check("soc", level, self.spec.low_soc, self.spec.low_soc_priority, t_mono, t_wall)

    def _emit_soc(
        self,
        t_mono: float,
        t_wall: float,
        soc: float,
        sd: float,
        sources: tuple[tuple[Stream, float], ...],
        detail: dict[str, float | str],
    ) -> None:
        self._emit(
            Estimate(
                self.spec.subject, self.kind, "soc", "%", t_mono, t_wall, soc, sd, "measured", sources, detail
            )
        )

    def _learn_capacity(self, t_mono: float, v_cell: float, i: float) -> None:
        if abs(i) >= REST_A:
            self._rest_since = math.nan
            return
        if math.isnan(self._rest_since):
            self._rest_since = t_mono
        if t_mono - self._rest_since < REST_S:
            return
        soc = self.cell.soc_from_rest(v_cell)
        if math.isfinite(self._rest_soc) and self._rest_soc - soc >= MIN_DROP and self._ah_since_rest > 0:
            sample = self._ah_since_rest / (self._rest_soc - soc)
            # The rated capacity is only a prior: the first measured one replaces it.
            gain = CAPACITY_GAIN if self.capacity_samples else 1.0
            self.capacity_ah += gain * (sample - self.capacity_ah)
            self.capacity_samples += 1
        if self.ekf is not None:
            # A rested pack's voltage is its OCV: re-anchor the SoC there (with a narrow interval).
            self.ekf.capacity_ah = self.capacity_ah
            self.ekf.x[0] = soc
            self.ekf.p[0, 0] = min(float(self.ekf.p[0, 0]), REST_SOC_SD**2)
        self._rest_soc, self._ah_since_rest = soc, 0.0
        self._rest_since = t_mono  # the same rest counts once

    def _report(self, t_mono: float, t_wall: float) -> None:
        assert self.ekf is not None
        soc = 100.0 * min(max(self.ekf.soc, 0.0), 1.0)
        soh = 100.0 * self.capacity_ah / self.spec.rated_ah
        sources = tuple((s, 1.0) for s in self._streams.values())
        detail: dict[str, float | str] = {
            "capacity_ah": round(self.capacity_ah, 4),
            "r0_ohm": round(self.ekf.r0, 4),
        }
        if math.isfinite(self._temperature):
            detail["temperature"] = self._temperature
        if self.levels:
            detail["reported"] = self.levels[-1][1]
        state = "measured"
        self._emit_soc(t_mono, t_wall, soc, 100.0 * self.ekf.soc_sd, sources, detail)
        # Capacity from rest to rest: unlearnt, it is the rated one with a wide interval.
        soh_sd = 5.0 if self.capacity_samples else 20.0
        self._emit(
            Estimate(
                self.spec.subject, self.kind, "soh", "%", t_mono, t_wall, soh, soh_sd, state, sources, detail
            )
        )
        self.limits.check("soc", soc, self.spec.low_soc, self.spec.low_soc_priority, t_mono, t_wall)
        self.limits.check("soh", soh, self.spec.low_health, self.spec.low_health_priority, t_mono, t_wall)

    def save(self, now_mono: float, now_wall: float) -> dict[str, Any] | None:
        """The state to keep across a restart: SoC with its SD, the learnt capacity, the levels."""
        state: dict[str, Any] = {}
        if self.levels:
            # Wall-clock times: the monotonic clock starts afresh with the next boot.
            state["levels"] = [[now_wall - (now_mono - t), v] for t, v in self.levels]
        if self.ekf is not None:
            state |= {
                "soc": self.ekf.soc,
                "soc_sd": self.ekf.soc_sd,
                "capacity_ah": self.capacity_ah,
                "capacity_samples": self.capacity_samples,
                "r0": self.ekf.r0,
            }
        return state or None

    def restore(self, state: dict[str, Any], now_mono: float, now_wall: float) -> None:
        """Resume from :meth:`save`'s state (the SoC seeds the filter at its first sample)."""
        levels = state.get("levels")
        if isinstance(levels, list):
            for item in levels[-LEVELS_KEPT:]:
                try:
                    t_wall, level = float(item[0]), float(item[1])
                except (TypeError, ValueError, IndexError):
                    continue
                if math.isfinite(t_wall) and 0.0 <= level <= 100.0 and t_wall <= now_wall:
                    self.levels.append((now_mono - (now_wall - t_wall), level))
        try:
            capacity = float(state["capacity_ah"])
            self._restored = {"soc": float(state["soc"]), "soc_sd": float(state["soc_sd"])}
            samples = int(state["capacity_samples"])
        except (KeyError, TypeError, ValueError):
            return
        if math.isfinite(capacity) and capacity > 0:
            self.capacity_ah, self.capacity_samples = capacity, samples
        r0 = state.get("r0")
        if isinstance(r0, float) and math.isfinite(r0) and r0 > 0:
            self._r0 = r0
