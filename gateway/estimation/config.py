"""The ``[estimators]`` config section: which streams of which subject feed which estimator.

Fused rates (heart rate, SpO2, respiration rate) name their subject and sources; a source is a
metric, optionally narrowed to one ``[[sources]]`` entry by name (two oximeters on one bed) and
given its measurement noise (variance, in the unit squared)::

    [[estimators.fusion]]
    subject = "ward3-bed7"
    name = "hr"
    sources = [
      { metric = "MDC_ECG_HEART_RATE" },                     # noise from the defaults below
      { metric = "MDC_PULS_OXIM_PULS_RATE", noise = 9.0 },
      { metric = "MDC_ECG_TIME_PD_RR_GL" },                  # RR intervals, as 60000 / RR
    ]

Battery state for an asset reporting pack voltage, current and temperature::

    [[estimators.battery]]
    subject = "plant-a/motor-1"
    voltage = "Pack/Voltage"
    current = "Pack/Current"                 # A, positive when discharging
    rated_ah = 2.0
    low_soc = 20.0                           # % -> a low-SoC alarm
    low_health = 80.0                        # % of rated capacity -> a low-health alarm

or for a wearable reporting its own level (BLE Battery Level), with the drain rate and time left::

    [[estimators.battery]]
    subject = "ward3-bed7"
    level = "MDC_ATTR_VAL_BATT_CHARGE"
    level_step = 10.0                        # the strap reports in 10 % steps

Remaining useful life of a machine from its per-cycle sensors (``gateway.estimation.rul``; the
model's card names the sensors, each mapped to one metric of the subject, or all by a prefix)::

    [[estimators.rul]]
    subject = "plant-a/engine-2"
    model = "rul_cmapss"
    prefix = "Engine/"                       # sensor T24 is metric "Engine/T24", ...
    inputs = { T50 = "Engine/LPT_outlet" }   # ... except where mapped
    cycle_s = 60.0                           # one operating cycle
    low_rul = 30.0                           # cycles left -> a limit alarm
    backend = "card"                         # or "onnxruntime", "litert" ("tflite"), "numpy"
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.inference.build import BackendChoice

__all__ = [
    "BatterySpec",
    "EstimatorsSection",
    "FusionSource",
    "FusionSpec",
    "RulSpec",
    "default_noise",
]

Priority = Literal["high", "medium", "low"]

#: Default measurement noise (unit^2) by metric: an ECG resolves beats, an oximeter averages
#: pulses, beat-to-beat RR carries the heart's own variability.
DEFAULT_NOISE = {
    "MDC_ECG_HEART_RATE": 1.0,
    "MDC_PULS_OXIM_PULS_RATE": 9.0,
    "MDC_PULS_RATE_NON_INV": 9.0,
    "MDC_ECG_TIME_PD_RR_GL": 16.0,
    "MDC_PULS_OXIM_SAT_O2": 1.0,
    "MDC_RESP_RATE": 4.0,
}


def default_noise(metric: str) -> float:
    """The measurement noise assumed for a metric when the config gives none."""
    return DEFAULT_NOISE.get(metric, 4.0)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FusionSource(_Section):
    """One stream feeding a fused rate."""

    metric: str = Field(min_length=1)
    source: str | None = None  # a [[sources]] name, when the subject has several of this metric
    noise: float | None = Field(None, gt=0)  # variance in the unit squared


class FusionSpec(_Section):
    """One ``[[estimators.fusion]]`` table: a rate fused from several sources of one subject."""

    subject: str = Field(min_length=1)
    name: str = Field("hr", pattern=r"^[a-z][a-z0-9_]{0,31}$")
    unit: str = "/min"
    sources: list[FusionSource] = Field(min_length=1)
    q_per_s: float = Field(0.5, gt=0)  # process noise of the random walk, unit^2 per second
    max_gap_s: float = Field(10.0, gt=0, le=600)  # bridge a silence of every source this long
    gate: float = Field(3.0, gt=0)  # innovation SDs beyond which a source loses weight
    lo: float = 20.0  # plausible range; outside it a value is no measurement
    hi: float = 300.0
    every_s: float = Field(5.0, gt=0, le=3600)  # at most one estimate record per this
    stale_s: float = Field(3.0, gt=0, le=600)  # no source for longer: the estimate is "bridged"

    @model_validator(mode="after")
    def _sources_distinct(self) -> Self:
        seen: set[tuple[str, str | None]] = set()
        for s in self.sources:
            if (s.metric, s.source) in seen:
                raise ValueError(
                    f"[[estimators.fusion]] {self.name!r} of {self.subject!r}: source {s.metric!r}"
                    + (f" from {s.source!r}" if s.source else "")
                    + " is listed twice: list each once (add `source` to tell two devices apart)"
                )
            seen.add((s.metric, s.source))
        if not self.lo < self.hi:
            raise ValueError(
                f"[[estimators.fusion]] {self.name!r}: lo {self.lo:g} is not below hi {self.hi:g}"
            )
        return self


class BatterySpec(_Section):
    """One ``[[estimators.battery]]`` table: SoC by EKF and SoH from online capacity."""

    subject: str = Field(min_length=1)
    voltage: str | None = Field(None, min_length=1)  # metric names of the pack's streams
    current: str | None = Field(None, min_length=1)
    temperature: str | None = None
    # A level the device reports itself (BLE Battery Level 0x2A19, MDC_ATTR_VAL_BATT_CHARGE, %):
    # the SoC when there is no pack voltage and current, with the drain rate and time left.
    level: str | None = Field(None, min_length=1)
    level_step: float = Field(1.0, gt=0, le=50)  # % resolution of the reported level
    level_window_s: float = Field(6 * 3600.0, gt=0, le=30 * 86400)  # drain rate from this span
    rated_ah: float = Field(2.0, gt=0)
    cells_in_series: int = Field(1, ge=1, le=256)
    # Equivalent circuit per cell (defaults: models/battery_ekf.card.json, NASA 18650 cells).
    ocv: list[float] = [
        2.8451,
        15.72777,
        -124.55023,
        506.9465,
        -1134.27513,
        1414.29487,
        -919.70597,
        242.92522,
    ]
    r0: float = Field(0.07, gt=0)
    r1: float = Field(0.04, ge=0)
    tau_s: float = Field(30.0, gt=0)
    r_v: float = Field(0.003, gt=0)  # voltage measurement variance per cell, V^2
    learn_r0: bool = True  # learn the series resistance online (it grows as the cell ages)
    low_soc: float = Field(20.0, ge=0, le=100)
    low_soc_priority: Priority = "medium"
    low_health: float = Field(80.0, ge=0, le=100)
    low_health_priority: Priority = "low"
    every_s: float = Field(10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _roles_distinct(self) -> Self:
        roles = [m for m in (self.voltage, self.current, self.temperature, self.level) if m is not None]
        if len(set(roles)) != len(roles):
            raise ValueError(
                f"[[estimators.battery]] of {self.subject!r}: voltage, current, temperature and level "
                "name the same stream: give each its own metric"
            )
        if (self.voltage is None) != (self.current is None) or (self.voltage is None and self.level is None):
            raise ValueError(
                f"[[estimators.battery]] of {self.subject!r}: needs the pack's `voltage` and `current` "
                "metrics, or the `level` the device reports (e.g. MDC_ATTR_VAL_BATT_CHARGE), or all three"
            )
        return self


class RulSpec(_Section):
    """One ``[[estimators.rul]]`` table: remaining useful life of a machine, per operating cycle."""

    subject: str = Field(min_length=1)
    name: str = Field("rul", pattern=r"^[a-z][a-z0-9_]{0,31}$")
    model: str = Field("rul_cmapss", pattern=r"^[a-z][a-z0-9_]{0,31}$")  # a RUL model card's name
    prefix: str | None = Field(None, min_length=1)  # metric of sensor S: prefix + S, unless in inputs
    inputs: dict[str, str] = {}  # model sensor -> metric of the subject
    cycle_s: float = Field(gt=0, le=86_400)  # one operating cycle: samples in it are averaged
    grace_s: float = Field(5.0, ge=0, le=3600)  # wait this long after a cycle's end for its samples
    low_rul: float | None = Field(None, gt=0)  # cycles: below it (once trusted) a low-RUL alarm
    low_rul_priority: Priority = "medium"
    # The runtime that serves the model, as [[models.use]] backend: "card" (its recipe's measured
    # choice, onnxruntime where that cannot serve), or one by name, refused at load if it cannot.
    backend: BackendChoice = "card"

    @model_validator(mode="after")
    def _has_inputs(self) -> Self:
        if not self.inputs and self.prefix is None:
            raise ValueError(
                f"[[estimators.rul]] of {self.subject!r}: no inputs: map each of the model's sensors "
                "to a metric in `inputs`, or set `prefix` (sensor T24 -> metric prefix + 'T24')"
            )
        metrics = list(self.inputs.values())
        if any(not m for m in metrics) or len(set(metrics)) != len(metrics):
            raise ValueError(
                f"[[estimators.rul]] of {self.subject!r}: inputs: two sensors map to the same metric "
                "(or to an empty one): give each sensor its own metric"
            )
        return self


class EstimatorsSection(_Section):
    """``[estimators]``: state estimators per subject; none by default."""

    fusion: list[FusionSpec] = []
    battery: list[BatterySpec] = []
    rul: list[RulSpec] = []
