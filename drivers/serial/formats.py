"""The wire formats the serial driver knows, by the name used in configs and on the command line."""

from __future__ import annotations

from collections.abc import Mapping

from drivers.serial.contec import Cms50Legacy, Cms50V46
from drivers.serial.masimo import MasimoAscii
from drivers.serial.nonin import DataFormat2, DataFormat7, DataFormat8, DataFormat13, NoninAscii
from drivers.serial.protocol import LineSettings, Parser

#: Parser class by protocol name.
PARSERS: Mapping[str, type[Parser]] = {
    cls.name: cls
    for cls in (
        DataFormat2,
        DataFormat7,
        DataFormat8,
        DataFormat13,
        NoninAscii,
        MasimoAscii,
        Cms50Legacy,
        Cms50V46,
    )
}

PROTOCOL_NAMES: tuple[str, ...] = tuple(PARSERS)


def make_parser(name: str) -> Parser:
    """A fresh parser for a protocol name (KeyError for an unknown one)."""
    return PARSERS[name]()


def settings_groups(names: tuple[str, ...] | None = None) -> dict[LineSettings, tuple[str, ...]]:
    """The protocols that share each line setting, in a stable order (slowest speed first)."""
    groups: dict[LineSettings, list[str]] = {}
    for name in names or PROTOCOL_NAMES:
        groups.setdefault(PARSERS[name].settings, []).append(name)
    return {s: tuple(groups[s]) for s in sorted(groups, key=lambda s: (s.baudrate, s.parity))}
