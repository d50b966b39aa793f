"""The driver registry: one explicit line per driver, read only by the composition root.

Each entry names the driver's config model and a factory that imports ``driver.py`` only when a
source of that driver is built, so a driver whose optional extra is not installed costs nothing
until it is used.  The config model (``config.py``: it must need nothing beyond the core
dependencies) is imported when the registry is first asked for that driver: a gateway with one
kind of source does not hold the validators of the others (~1 MB of a one-source service).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, cast

from pydantic import BaseModel

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


class _Entry(NamedTuple):
    config_model: str  # class name in ``drivers/<name>/config.py``
    summary: str


class _Registry(Mapping[str, DriverSpec]):
    """The drivers by name; each one's spec (and its config module) is built on first use."""

    def __init__(self, entries: Mapping[str, _Entry]) -> None:
        self._entries = dict(entries)
        self._specs: dict[str, DriverSpec] = {}

    def __getitem__(self, name: str) -> DriverSpec:
        spec = self._specs.get(name)
        if spec is None:
            entry = self._entries[name]  # KeyError for a driver that is not registered
            module = importlib.import_module(f"drivers.{name}.config")
            model = cast("type[BaseModel]", getattr(module, entry.config_model))
            spec = DriverSpec(name, model, _LazyFactory(f"drivers.{name}.driver"), entry.summary)
            self._specs[name] = spec
        return spec

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"_Registry({sorted(self._entries)!r})"


REGISTRY: Mapping[str, DriverSpec] = _Registry(
    {
        "sim": _Entry("SimConfig", "synthetic patient and pump streams with labelled events"),
        "opcua": _Entry(
            "OpcUaConfig", "OPC UA subscriptions (PLCs) with verified recovery, security and per-node health"
        ),
        "mcu": _Entry(
            "McuConfig", "microcontroller sensor nodes over a framed serial link, signed firmware updates"
        ),
        "ble": _Entry(
            "BleConfig",
            "BLE health wearables (heart rate, pulse oximeter, thermometer, blood pressure) over BlueZ",
        ),
        "serial": _Entry("SerialConfig", "pulse oximeters on RS-232/USB serial: Nonin, Masimo, Contec"),
    }
)

#: Modules that add CLI subcommands (``edgetwin scan ...``, ``edgetwin sim ...``) through an
#: ``add_commands(groups)`` function; the CLI skips one whose optional dependencies are missing.
COMMAND_MODULES: tuple[str, ...] = (
    "drivers.opcua.commands",
    "drivers.mcu.commands",
    "drivers.ble.commands",
    "drivers.serial.commands",
)
