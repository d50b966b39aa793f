"""The driver registry: one explicit line per driver, read only by the composition root.

Each entry names the driver's config model (imported here: ``config.py`` must need nothing beyond
the core dependencies) and a factory that imports ``driver.py`` only when a source of that driver
is built, so a driver whose optional extra is not installed costs nothing until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any, cast

from drivers.ble.config import BleConfig
from drivers.mcu.config import McuConfig
from drivers.opcua.config import OpcUaConfig
from drivers.serial.config import SerialConfig
from drivers.sim.config import SimConfig
from gateway.contracts import Driver, DriverSpec, SourceInfo
from gateway.errors import ConfigError


class _LazyFactory:
    """Calls ``<module>.factory`` on first use, importing the module then."""

    __slots__ = ("module",)

    def __init__(self, module: str) -> None:
        self.module = module

    def __call__(self, info: SourceInfo, cfg: Any) -> Driver:
        """Import the driver module and build a driver with its ``factory``."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:
            raise ConfigError(
                f"source {info.name} {self.module}: cannot load the driver: {exc}: "
                "install the gateway's extra for this driver"
            ) from exc
        return cast("Driver", mod.factory(info, cfg))

    def __repr__(self) -> str:
        return f"_LazyFactory({self.module!r})"


REGISTRY: dict[str, DriverSpec] = {
    "sim": DriverSpec(
        "sim",
        SimConfig,
        _LazyFactory("drivers.sim.driver"),
        "synthetic patient and pump streams with labelled events",
    ),
    "opcua": DriverSpec(
        "opcua",
        OpcUaConfig,
        _LazyFactory("drivers.opcua.driver"),
        "OPC UA subscriptions (PLCs) with verified recovery, security and per-node health",
    ),
    "mcu": DriverSpec(
        "mcu",
        McuConfig,
        _LazyFactory("drivers.mcu.driver"),
        "microcontroller sensor nodes over a framed serial link, signed firmware updates",
    ),
    "ble": DriverSpec(
        "ble",
        BleConfig,
        _LazyFactory("drivers.ble.driver"),
        "BLE health wearables (heart rate, pulse oximeter, thermometer, blood pressure) over BlueZ",
    ),
    "serial": DriverSpec(
        "serial",
        SerialConfig,
        _LazyFactory("drivers.serial.driver"),
        "pulse oximeters on RS-232/USB serial: Nonin, Masimo, Contec",
    ),
}

#: Modules that add CLI subcommands (``edgetwin scan ...``, ``edgetwin sim ...``) through an
#: ``add_commands(groups)`` function; the CLI skips one whose optional dependencies are missing.
COMMAND_MODULES: tuple[str, ...] = (
    "drivers.opcua.commands",
    "drivers.mcu.commands",
    "drivers.ble.commands",
    "drivers.serial.commands",
)
