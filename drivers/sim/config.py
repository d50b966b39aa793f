"""Configuration of the synthetic source: the driver's own keys of a ``[[sources]]`` table.

The common keys (``name``, ``driver``, ``subject``, ``kind``, ``enabled``) are validated by the
core and are not part of this model.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from drivers.sim.protocol import EVENTS_BY_PROFILE, Label, make_generator
from gateway.config_base import ConfigModel

EventKindName = Literal[
    "desaturation", "bradycardia", "bearing_wear", "valve_fault", "sensor_off", "disconnect", "bigeminy"
]


class _Strict(ConfigModel):
    pass


class SimEvent(_Strict):
    """One injected event: its kind and when, in seconds since the source started."""

    kind: EventKindName
    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)

    def label(self) -> Label:
        """The ground-truth label of this event."""
        return Label(self.kind, self.at_s, self.at_s + self.duration_s)


class StallSpec(_Strict):
    """Fault injection: block the whole event loop once, to test watchdog supervision."""

    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0, le=600)


class HangSpec(_Strict):
    """Fault injection: stop once without blocking the loop (no data, no beat), to test stall restarts."""

    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0, le=3600)


class SimConfig(_Strict):
    """Keys of a ``driver = "sim"`` source."""

    profile: Literal["patient", "pump", "engine"]
    seed: int = Field(default=0, ge=0)
    device: str = Field(min_length=1, max_length=128)  # simulated MAC or serial: identifying, local only
    rate_hz: float = Field(default=1.0, gt=0, le=1000)
    events: list[SimEvent] = Field(default_factory=list)
    random_events_per_hour: float = Field(default=0.0, ge=0, le=60)
    stall_loop: StallSpec | None = None
    hang: HangSpec | None = None

    @model_validator(mode="after")
    def _events_fit_profile(self) -> Self:
        allowed = EVENTS_BY_PROFILE[self.profile]
        for i, ev in enumerate(self.events):
            if ev.kind not in allowed:
                other = next(p for p, kinds in EVENTS_BY_PROFILE.items() if ev.kind in kinds)
                raise ValueError(
                    f"events[{i}].kind {ev.kind!r} belongs to the {other} profile, not {self.profile}: "
                    f"use one of {', '.join(allowed)}"
                )
        return self

    def metric_names(self) -> list[str]:
        """The streams of the profile."""
        return list(self.metric_units())

    def delivers(self) -> dict[str | None, frozenset[str] | None]:
        """The streams of the profile, by the device they come from (the configured one)."""
        return {self.device: frozenset(self.metric_names())}

    def metric_units(self) -> dict[str, str]:
        """The unit of each stream of the profile."""
        gen = make_generator(self.profile, seed=self.seed, rate_hz=self.rate_hz)
        return {sig.metric.name: sig.metric.unit for sig in gen.signals}
