"""The ``[alarms]`` config section and the default limits a ward and a plant recognise.

Physiological defaults (UCUM units) follow common adult bedside-monitor settings with IEC
60601-1-8 priorities: a value that needs immediate action (SpO2 < 85 %, HR < 40 /min) is high,
one that needs a prompt response medium, fever low.  Process defaults are for the SKAB-type
pump the simulator and the shipped model describe, with the ISA-18.2 starting points for deadband
and delays by measurement type (pressure and flow 15 s; temperature 60 s, 1 %).  Every default
applies only to a stream in the unit it is written in; a stream in another unit gets none.

Overrides merge key by key onto the default of the same metric::

    [alarms.limits.MDC_PULS_OXIM_SAT_O2]
    low = 88                      # the rest (low_low 85, 10 s delay...) stays

    [alarms.subjects."ward3-bed7".MDC_ECG_HEART_RATE]
    high = 140                    # one patient's own limit

    [alarms.limits.Pressure]
    enabled = false               # no pressure limits at all
"""

from __future__ import annotations

import itertools
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.alarms.limits import LEVELS, LimitChecker, LimitRule
from gateway.contracts import AlarmPriority
from gateway.sample import SENSOR_LOST_S

__all__ = ["DEFAULT_LIMITS", "AlarmsSection", "LimitSpec", "limit_checker", "merged_limits"]

Priority = Literal["high", "medium", "low"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LimitSpec(_Section):
    """One ``[alarms.limits."<metric>"]`` table: up to four limits, their priorities and timings."""

    low_low: float | None = None
    low: float | None = None
    high: float | None = None
    high_high: float | None = None
    priority_low_low: Priority = "high"
    priority_low: Priority = "medium"
    priority_high: Priority = "medium"
    priority_high_high: Priority = "high"
    on_delay_s: float = Field(0.0, ge=0, le=3600)  # alarm condition delay
    off_delay_s: float = Field(0.0, ge=0, le=3600)
    deadband: float = Field(0.0, ge=0)  # in `unit`
    unit: str | None = None  # the unit the limits are in; None: whatever the stream's unit is
    enabled: bool = True

    def problem(self) -> str | None:
        """What is wrong with the limits' order, or None."""
        given = [(name, getattr(self, name)) for name, _, _ in LEVELS if getattr(self, name) is not None]
        for (a, x), (b, y) in itertools.pairwise(given):
            if not x < y:
                return f"{a} {x:g} is not below {b} {y:g}: order them low_low < low < high < high_high"
        if self.enabled and not given:
            return "no limit given: set at least one of low_low, low, high, high_high (or enabled = false)"
        return None

    def rule(self) -> LimitRule:
        """The checker's rule."""
        bounds = {name: float(v) for name, _, _ in LEVELS if (v := getattr(self, name)) is not None}
        return LimitRule(
            bounds,
            {name: AlarmPriority(getattr(self, f"priority_{name}")) for name in bounds},
            self.on_delay_s,
            self.off_delay_s,
            self.deadband,
            self.unit,
        )


def _vital(unit: str, **kw: float | str) -> LimitSpec:
    return LimitSpec.model_validate({"unit": unit, **kw})


_HR = _vital("/min", low_low=40, low=50, high=120, high_high=150, on_delay_s=10, deadband=5)

#: Defaults by metric name, or by the last segment of an industrial path.
DEFAULT_LIMITS: dict[str, LimitSpec] = {
    "MDC_PULS_OXIM_SAT_O2": _vital("%", low_low=85, low=90, on_delay_s=10, deadband=1),
    "MDC_ECG_HEART_RATE": _HR,
    "MDC_PULS_OXIM_PULS_RATE": _HR,
    "MDC_PULS_RATE_NON_INV": _HR,
    "MDC_RESP_RATE": _vital("/min", low_low=5, low=8, high=30, high_high=40, on_delay_s=15, deadband=2),
    "MDC_TEMP_BODY": _vital(
        "Cel",
        low=35.0,
        high=38.0,
        high_high=39.5,
        priority_high="low",
        priority_high_high="medium",
        on_delay_s=30,
        deadband=0.2,
    ),
    # A cuff measurement is one value minutes apart: no delay.
    "MDC_PRESS_BLD_NONINV_SYS": _vital("mm[Hg]", low_low=70, low=90, high=160, high_high=200, deadband=5),
    "MDC_PRESS_BLD_NONINV_DIA": _vital("mm[Hg]", low=50, high=100, high_high=120, deadband=5),
    "MDC_PRESS_BLD_NONINV_MEAN": _vital("mm[Hg]", low_low=55, low=65, high=110, deadband=5),
    # The pump (ISA-18.2 starting points: deadband 2 % pressure, 5 % flow, 1 % temperature).
    "Pressure": _vital("bar", low_low=0.6, low=0.9, high=2.5, on_delay_s=15, off_delay_s=15, deadband=0.02),
    "RateRMS": _vital("l/min", low_low=16, low=24, on_delay_s=15, off_delay_s=15, deadband=1.2),
    "Temperature": _vital("Cel", high=90, high_high=100, on_delay_s=60, off_delay_s=60, deadband=0.9),
    # Mains supply within +-10 % of 230 V (EN 50160).
    "Voltage": _vital("V", low=207, high=253, on_delay_s=15, off_delay_s=15, deadband=2.3),
}


class AlarmsSection(_Section):
    """The ``[alarms]`` section: limit alarms on single streams."""

    defaults: bool = True  # the built-in limits above
    limits: dict[str, LimitSpec] = Field(default_factory=dict)  # by metric name or last path segment
    subjects: dict[str, dict[str, LimitSpec]] = Field(default_factory=dict)  # per subject (patient/machine)

    @model_validator(mode="after")
    def _limits_in_order(self) -> Self:
        general, per_subject = merged_limits(self)
        for where, table in (("limits", general), *((f"subjects.{s!r}", t) for s, t in per_subject.items())):
            for metric, spec in table.items():
                problem = spec.problem()
                if problem:
                    raise ValueError(f"[alarms.{where}.{metric!r}]: {problem}")
        return self


def _merge(base: LimitSpec | None, override: LimitSpec) -> LimitSpec:
    if base is None:
        return override
    return base.model_copy(update=override.model_dump(exclude_unset=True))


def merged_limits(section: AlarmsSection) -> tuple[dict[str, LimitSpec], dict[str, dict[str, LimitSpec]]]:
    """The general limits (defaults with the config's overrides) and each subject's own."""
    general = dict(DEFAULT_LIMITS) if section.defaults else {}
    for metric, spec in section.limits.items():
        general[metric] = _merge(general.get(metric), spec)
    subjects = {
        subject: {metric: _merge(general.get(metric), spec) for metric, spec in table.items()}
        for subject, table in section.subjects.items()
    }
    return general, subjects


def limit_checker(section: AlarmsSection, lost_after_s: float = SENSOR_LOST_S) -> LimitChecker:
    """The checker for a config's ``[alarms]`` section (``lost_after_s``: the pipeline's ``sensor_lost_s``)."""
    general, subjects = merged_limits(section)

    def rules(table: dict[str, LimitSpec]) -> dict[str, LimitRule | None]:
        return {m: (s.rule() if s.enabled else None) for m, s in table.items()}

    return LimitChecker(rules(general), {s: rules(t) for s, t in subjects.items()}, lost_after_s=lost_after_s)
