"""Configuration of a microcontroller node source: the driver's own keys of a ``[[sources]]`` table.

The common keys (``name``, ``driver``, ``subject``, ``kind``, ``enabled``) are validated by the
core and are not part of this model.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from gateway.config_base import ConfigModel, PathField

#: Line speeds a UART bridge offers; ptys ignore the setting.
BAUD_RATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600, 1000000, 2000000)


class SimNodeConfig(ConfigModel):
    """A simulated node the driver builds from ``firmware_bridge/firmware`` and runs on a pty."""

    node_id: str = Field("SIM-0001", min_length=1, max_length=32, pattern=r"^[\x21-\x7e]+$")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    flash: PathField | None = None  # keeps installed firmware across runs; default: a temporary file
    drift_ppm: float = Field(0.0, ge=-1000, le=1000)  # the node crystal's error
    pubkey_file: PathField | None = None  # Ed25519 key the node checks images against
    trial_timeout_s: float = Field(10.0, gt=0, le=600)  # a new image must be committed within this
    # Fault injection on the node's transmitter, for demonstrations and tests; 0 in production.
    drop_prob: float = Field(0.0, ge=0, le=0.5)
    corrupt_prob: float = Field(0.0, ge=0, le=0.5)
    garbage_prob: float = Field(0.0, ge=0, le=0.5)


class McuConfig(ConfigModel):
    """Keys of a ``driver = "mcu"`` source."""

    port: PathField | None = None  # /dev/ttyACM0, /dev/serial/by-id/..., a pty link
    baud: int = 115200
    simulate: SimNodeConfig | None = None
    # Channel name -> metric name; an MDC name (e.g. MDC_TEMP_BODY) makes a medical metric.
    # Unmapped channels become industrial metrics named after the channel.
    metrics: dict[str, str] = Field(default_factory=dict)
    time_sync_s: float = Field(10.0, ge=0.05, le=3600)
    request_timeout_s: float = Field(0.5, ge=0.01, le=30)
    retries: int = Field(3, ge=0, le=10)
    silence_s: float = Field(5.0, ge=0.5, le=600)  # no frame for this long: the link is down
    report_s: float = Field(60.0, ge=1, le=3600)  # link counters as a diagnostic this often

    @model_validator(mode="after")
    def _one_port(self) -> Self:
        if (self.port is None) == (self.simulate is None):
            raise ValueError(
                "set exactly one of port (a serial device) and simulate (a simulated node), "
                'e.g. port = "/dev/ttyACM0"'
            )
        if self.baud not in BAUD_RATES:
            raise ValueError(f"baud {self.baud} is not one of {', '.join(map(str, BAUD_RATES))}")
        for channel, metric in self.metrics.items():
            if not channel or not metric or len(metric) > 128:
                raise ValueError(f"metrics: {channel!r} = {metric!r}: both names must be 1 to 128 characters")
        return self
