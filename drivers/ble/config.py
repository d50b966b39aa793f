"""Configuration of a BLE wearables source: the driver's own keys of a ``[[sources]]`` table.

The allowlist is the ``devices`` array: the gateway connects to these addresses only, and only
when the device offers its profile's service. Names are never used to pick a device.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import AfterValidator, Field, model_validator

from drivers.ble.protocol import BATTERY, PROFILES
from gateway.config_base import ConfigModel

#: A public or static-random BLE address, as BlueZ prints it.
ADDRESS_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"

ProfileName = Literal["hr", "plx", "thermo", "bp"]


class BleDevice(ConfigModel):
    """One allowlisted wearable."""

    address: Annotated[str, AfterValidator(str.upper)] = Field(pattern=ADDRESS_PATTERN)  # "A4:C1:38:12:34:56"
    profile: ProfileName
    # The bed or patient this wearable is on; the source's subject when absent.
    subject: str | None = Field(default=None, min_length=1, max_length=128)


class BleConfig(ConfigModel):
    """Keys of a ``driver = "ble"`` source."""

    adapter: str = Field(default="hci0", pattern=r"^hci[0-9]{1,2}$")
    devices: list[BleDevice] = Field(min_length=1, max_length=32)
    # Connection slots this source may hold on the adapter (BlueZ adapters manage 5-7 in all).
    slots: int = Field(default=5, ge=1, le=10)
    # One connection attempt (a single BlueZ Connect + service discovery) may take this long ...
    connect_timeout_s: float = Field(default=20.0, gt=0, le=120)
    # ... and one connection cycle makes at most this many attempts ...
    max_connect_attempts: int = Field(default=3, ge=1, le=10)
    # ... within this total, backoffs and stale-state recovery included.
    connect_budget_s: float = Field(default=60.0, gt=0, le=600)
    # Reconnect backoff after a failed cycle or a lost link: capped, jittered exponential.
    reconnect_min_s: float = Field(default=1.0, gt=0, le=60)
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600)
    # With more devices heard than slots: a device that has waited this long takes the slot of the
    # device that has held one longest (and at least this long), which waits in turn.
    slot_turn_s: float = Field(default=30.0, ge=1, le=3600)
    # A device not connected for this long (out of range, powered off) raises SENSOR_LOST.
    lost_after_s: float = Field(default=15.0, gt=0, le=3600)
    # Restart a scan that reported nothing for this long while a device is being looked for.
    scan_watchdog_s: float = Field(default=30.0, gt=0, le=3600)
    battery_poll_s: float = Field(default=300.0, gt=0, le=86400)
    low_battery_pct: int = Field(default=15, ge=1, le=99)
    # A device timestamp farther than this from the gateway clock is not trusted for t_wall.
    max_clock_skew_s: float = Field(default=120.0, ge=0, le=86400)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        seen: set[str] = set()
        for i, dev in enumerate(self.devices):
            if dev.address in seen:
                raise ValueError(f"devices[{i}].address is listed twice: list each wearable once")
            seen.add(dev.address)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s is below reconnect_min_s: make it at least as large")
        return self

    def subjects(self, default: str) -> list[str]:
        """The subjects the wearables are on (``default``, the source's, where a device names none)."""
        return sorted({d.subject or default for d in self.devices})

    def delivers(self) -> dict[str | None, frozenset[str] | None]:
        """Each allowlisted wearable's streams: its profile's characteristics and its battery level."""
        return {d.address: frozenset((*PROFILES[d.profile].metrics, BATTERY)) for d in self.devices}
