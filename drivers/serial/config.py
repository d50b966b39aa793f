"""Configuration of a serial pulse oximeter: the driver's own keys of a ``[[sources]]`` table.

Needs nothing beyond the core dependencies (the registry imports it even when pyserial is absent).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from gateway.config_base import ConfigModel, PathField

ProtocolName = Literal[
    "auto", "nonin2", "nonin7", "nonin8", "nonin13", "nonin_ascii", "masimo", "cms50", "cms50v46"
]


class SerialConfig(ConfigModel):
    """Keys of a ``driver = "serial"`` source."""

    # Prefer the stable /dev/serial/by-id/... link: ttyUSB numbers change with plug order.
    port: PathField
    protocol: ProtocolName = "auto"
    baudrate: int | None = Field(default=None, ge=300, le=4_000_000)  # overrides the protocol's speed
    # No valid frame for this long: stale-data alarm, then a retry. None: the protocol's default
    # (10 s; off for nonin13, whose monitor speaks only after a spot check); 0 turns it off.
    stale_after_s: float | None = Field(default=None, ge=0, le=3600)
    # Bytes arrive but never form a frame for this long: the line speed or format is wrong.
    detect_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # Probe time per line setting when protocol = "auto".
    probe_s: float = Field(default=4.0, gt=0, le=60)
    # The CMS50 firmware 4.6 streams only after a start command; nothing is ever written without this.
    allow_start_command: bool = False
    # The monitor's identity when it does not report a serial number itself (local only).
    device: str | None = Field(default=None, min_length=1, max_length=128)
    diagnostics_every_s: float = Field(default=60.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _start_command_allowed(self) -> Self:
        if self.protocol == "cms50v46" and not self.allow_start_command:
            raise ValueError(
                "protocol cms50v46 streams only after a start command is written to the device: "
                "set allow_start_command = true"
            )
        return self

    def metric_names(self) -> list[str]:
        """The streams every oximeter gives: SpO2, pulse rate, perfusion index."""
        return list(self.metric_units())

    def delivers(self) -> dict[str | None, frozenset[str] | None]:
        """The streams of the one monitor on the port, which names itself when it reports a serial number."""
        return {None: frozenset(self.metric_names())}

    def metric_units(self) -> dict[str, str]:
        """The UCUM unit of each stream."""
        return {"MDC_PULS_OXIM_SAT_O2": "%", "MDC_PULS_OXIM_PULS_RATE": "/min", "MDC_PULS_OXIM_PERF_REL": "%"}
