"""Pure OPC UA mappings: StatusCode -> quality, values, timestamps, browse paths, names, snippets.

No I/O and no clock of its own: every function here takes what it needs as arguments, so it is
tested with plain numbers.  The status code *names* come from asyncua's generated table (data,
not behaviour).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from asyncua.ua.status_codes import StatusCodes, get_name_and_doc

from drivers.opcua.config import split_browse_path
from gateway.sample import Quality

GOOD = 0
_SEVERITY_MASK = 0xC0000000
_BAD_BIT = 0x80000000
_UNCERTAIN_BIT = 0x40000000
_CODE_MASK = 0xFFFF0000  # the low 16 bits carry info type and limit bits, not the condition

# Specific conditions that say more than their severity (OPC UA Part 4, 7.39 / Part 8, 6.3.2).
_EXTRA_FLAGS: dict[int, Quality] = {
    0x40900000: Quality.IMPUTED,  # UncertainLastUsableValue: the updater stopped; the value is old
    0x40910000: Quality.IMPUTED,  # UncertainSubstituteValue: overwritten by an operator
    0x40920000: Quality.IMPUTED,  # UncertainInitialValue: never measured yet
    0x00960000: Quality.IMPUTED,  # GoodLocalOverride: forced at the device, not measured
}

#: Built-in DataType NodeIds (namespace 0) that carry a number (Boolean counts as 0/1).
NUMERIC_TYPES: dict[int, str] = {
    1: "Boolean",
    2: "SByte",
    3: "Byte",
    4: "Int16",
    5: "UInt16",
    6: "Int32",
    7: "UInt32",
    8: "Int64",
    9: "UInt64",
    10: "Float",
    11: "Double",
    26: "Number",
    27: "Integer",
    28: "UInteger",
    290: "Duration",
}
#: Names of the other common built-in DataTypes, for scan output.
OTHER_TYPES: dict[int, str] = {
    12: "String",
    13: "DateTime",
    14: "Guid",
    15: "ByteString",
    17: "NodeId",
    19: "StatusCode",
    20: "QualifiedName",
    21: "LocalizedText",
    22: "Structure",
    24: "BaseDataType",
    29: "Enumeration",
    294: "UtcTime",
    887: "EUInformation",
    884: "Range",
}


def quality_of(status: int) -> Quality:
    """Quality flags for a StatusCode: Bad -> BAD_STATUS, Uncertain -> UNCERTAIN, plus IMPUTED."""
    if status == GOOD:
        return Quality.GOOD
    flags = Quality.GOOD
    if status & _BAD_BIT:
        flags = Quality.BAD_STATUS
    elif status & _UNCERTAIN_BIT:
        flags = Quality.UNCERTAIN
    return flags | _EXTRA_FLAGS.get(status & _CODE_MASK, Quality.GOOD)


def is_bad(status: int) -> bool:
    """True when the StatusCode's severity is Bad."""
    return bool(status & _BAD_BIT)


def status_name(status: int) -> str:
    """The StatusCode's symbolic name (e.g. ``BadNodeIdUnknown``)."""
    return get_name_and_doc(status & _CODE_MASK)[0]


def status_token(status: int) -> str:
    """A short lowercase token for records: ``bad_nodeidunknown``, ``uncertain_lastusablevalue``."""
    name = status_name(status)
    for prefix in ("Bad", "Uncertain", "Good"):
        if name.startswith(prefix):
            rest = name[len(prefix) :].lower()
            token = f"{prefix.lower()}_{rest}" if rest else prefix.lower()
            return token[:32]
    return f"status_{status:08x}"


def status_numbers() -> dict[str, int]:
    """Every OPC UA StatusCode by its :func:`status_token` (asyncua's generated table)."""
    codes = (v for k, v in vars(StatusCodes).items() if isinstance(v, int) and not k.startswith("_"))
    return {status_token(code): code for code in codes}


def type_name(type_id: int | None) -> str:
    """A readable name for a namespace-0 DataType id (or ``ns?`` for vendor types)."""
    if type_id is None:
        return "?"
    return NUMERIC_TYPES.get(type_id) or OTHER_TYPES.get(type_id) or f"i={type_id}"


def to_float(value: object) -> float | None:
    """A variant value as a float; NaN for no value; None when it is not a single number."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


# -- timestamps -----------------------------------------------------------------------------------


def pick_timestamp(
    source: float | None, server: float | None, now_wall: float, tolerance_s: float
) -> float | None:
    """The timestamp to use for ``t_wall``: source if sane, else server if sane, else None (gateway time)."""
    if source is not None and abs(source - now_wall) <= tolerance_s:
        return source
    if server is not None and abs(server - now_wall) <= tolerance_s:
        return server
    return None


class Stamper:
    """Monotonic receive times corrected by how long a value waited in the server's queue.

    Several values of one item can arrive in one publish response (queue size > 1). Stamping them
    all with the receive time would squash them together; their device timestamps tell how far
    apart they were, but the device clock is not the gateway's. The stamper tracks the smallest
    ``receive wall time - device time`` seen on this connection (clock offset plus the fastest
    delivery) and treats anything above it as queueing age, capped at ``max_age_s``.  The minimum
    creeps up by 1 ms per second, so it follows a device clock that runs slow.
    """

    __slots__ = ("_last_batch", "max_age_s", "offset")

    CREEP = 0.001  # s per s: follows a relative clock drift of up to 1000 ppm

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.offset = math.inf
        self._last_batch: float | None = None

    def batch(self, now_wall: float) -> None:
        """Start a publish response received at ``now_wall``."""
        if self._last_batch is not None and math.isfinite(self.offset):
            self.offset += self.CREEP * max(0.0, now_wall - self._last_batch)
        self._last_batch = now_wall

    def age(self, ts: float, now_wall: float) -> float:
        """Seconds the value stamped ``ts`` (device clock) waited before it reached us."""
        delay = now_wall - ts
        if delay < self.offset:
            self.offset = delay
            return 0.0
        waited = delay - self.offset
        return min(self.max_age_s, waited)


# -- addresses and names --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathSegment:
    """One browse path segment: namespace index (None: the source's namespace_uri) and name."""

    ns: int | None
    name: str


def parse_browse_path(path: str) -> tuple[PathSegment, ...]:
    """``"Objects/2:Pump1/2:Current"`` -> segments below the Objects folder."""
    out = []
    for seg in split_browse_path(path):
        ns_text, sep, name = seg.partition(":")
        if sep and ns_text.isdigit():
            out.append(PathSegment(int(ns_text), name))
        else:
            out.append(PathSegment(None, seg))
    return tuple(out)


def metric_name_for_path(path: str) -> str:
    """The metric name of a browse path: its names joined by '/', namespace prefixes dropped."""
    return "/".join(seg.name for seg in parse_browse_path(path))


_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/ -]+")


def clean_name(text: str) -> str:
    """A display or browse name made safe as a metric name."""
    return _UNSAFE.sub("_", text).strip() or "unnamed"


def endpoint_display(endpoint: str) -> str:
    """An endpoint URL without any credentials, for logs and Stream.device."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint
    return f"{scheme}://{rest.rpartition('@')[2]}"


# -- scan output ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScannedVariable:
    """A variable found by a scan: where it is, its type, unit and current value."""

    browse_path: str  # "2:Pump1/2:Motor/2:Current"
    node_id: str
    data_type: str
    numeric: bool
    unit: str | None
    value: str
    depth: int


@dataclass(frozen=True, slots=True)
class ScannedNode:
    """One line of the browsed tree."""

    browse_path: str
    node_id: str
    node_class: str  # "Object", "Variable", ...
    depth: int
    variable: ScannedVariable | None = None


def render_tree(nodes: Sequence[ScannedNode]) -> str:
    """The browsed address space as an indented tree with types, units and values."""
    lines = []
    for node in nodes:
        indent = "  " * node.depth
        leaf = node.browse_path.rpartition("/")[2]
        var = node.variable
        if var is None:
            lines.append(f"{indent}{leaf}  [{node.node_class}]  {node.node_id}")
        else:
            unit = f" {var.unit}" if var.unit else ""
            mark = "" if var.numeric else "  (not numeric: cannot be monitored)"
            lines.append(f"{indent}{leaf} = {var.value}{unit}  [{var.data_type}]  {node.node_id}{mark}")
    return "\n".join(lines)


def _toml_str(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def config_snippet(
    *,
    endpoint: str,
    name: str,
    subject: str,
    variables: Iterable[ScannedVariable],
    security_policy: str,
    security_mode: str,
    sampling_interval_ms: float = 100.0,
) -> str:
    """A ``[[sources]]`` table monitoring ``variables`` by browse path, ready to paste into a config."""
    lines = [
        "[[sources]]",
        f"name = {_toml_str(name)}",
        'driver = "opcua"',
        f"subject = {_toml_str(subject)}",
        'kind = "industrial"',
        f"endpoint = {_toml_str(endpoint)}",
        f"security_policy = {_toml_str(security_policy)}",
        f"security_mode = {_toml_str(security_mode)}",
        f"sampling_interval_ms = {sampling_interval_ms:g}",
        "nodes = [",
    ]
    count = 0
    for var in variables:
        if not var.numeric:
            continue
        unit = f"  # {var.data_type}, {var.unit}" if var.unit else f"  # {var.data_type}"
        lines.append(f"  {{ browse_path = {_toml_str(var.browse_path)} }},{unit}")
        count += 1
    lines.append("]")
    if count == 0:
        raise ValueError("config snippet: no numeric variable selected: nothing to monitor")
    return "\n".join(lines) + "\n"
