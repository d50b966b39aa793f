"""Browse a server's address space: the tree below Objects with data types, units and values.

Used by ``edgetwin scan opcua``.  Level by level, one Browse request per level (continuation
points followed), then one Read for the variables' data types and values and one
TranslateBrowsePaths + Read for their engineering units.  Bounded in depth, node count and time.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds

from drivers.opcua.protocol import NUMERIC_TYPES, ScannedNode, ScannedVariable, type_name
from drivers.opcua.security import ConnectOptions, abandon, bounded, connect
from drivers.opcua.uahelp import UA_FALSE, UA_TRUE, node_id

OBJECTS_FOLDER = 85
HIERARCHICAL_REFERENCES = 33
HAS_PROPERTY = 46


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a scan found."""

    nodes: tuple[ScannedNode, ...]
    namespaces: tuple[str, ...]
    truncated: bool

    @property
    def variables(self) -> list[ScannedVariable]:
        """The variables found, in tree order."""
        return [n.variable for n in self.nodes if n.variable is not None]


def select(variables: Sequence[ScannedVariable], patterns: Sequence[str]) -> list[ScannedVariable]:
    """Variables whose browse path (with or without namespace prefixes) matches a glob pattern."""
    if not patterns:
        return list(variables)
    out = []
    for var in variables:
        plain = "/".join(seg.partition(":")[2] or seg for seg in var.browse_path.split("/"))
        if any(fnmatch.fnmatchcase(var.browse_path, p) or fnmatch.fnmatchcase(plain, p) for p in patterns):
            out.append(var)
    return out


async def _browse_level(
    client: Client, parents: list[ua.NodeId], timeout_s: float
) -> list[list[ua.ReferenceDescription]]:
    descriptions = [
        ua.BrowseDescription(
            NodeId=parent,
            BrowseDirection=ua.BrowseDirection.Forward,
            ReferenceTypeId=node_id(HIERARCHICAL_REFERENCES),
            IncludeSubtypes=UA_TRUE,
            NodeClassMask=ua.UInt32(int(ua.NodeClass.Object) | int(ua.NodeClass.Variable)),
            ResultMask=ua.UInt32(63),
        )
        for parent in parents
    ]
    params = ua.BrowseParameters(NodesToBrowse=descriptions, RequestedMaxReferencesPerNode=ua.UInt32(0))
    results = await bounded("browse", timeout_s, client.uaclient.browse(params))
    out: list[list[ua.ReferenceDescription]] = []
    for res in results:
        refs = list(res.References)
        point = res.ContinuationPoint
        while point:
            more = await bounded(
                "browse next",
                timeout_s,
                client.uaclient.browse_next(
                    ua.BrowseNextParameters(ReleaseContinuationPoints=UA_FALSE, ContinuationPoints=[point])
                ),
            )
            refs += more[0].References
            point = more[0].ContinuationPoint
        out.append(refs)
    return out


def _value_text(dv: ua.DataValue) -> str:
    if dv.StatusCode is not None and not dv.StatusCode.is_good():
        return dv.StatusCode.name
    value = dv.Value.Value if dv.Value is not None else None
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


async def scan(
    opts: ConnectOptions, *, max_depth: int = 8, max_nodes: int = 5000, include_server: bool = False
) -> ScanResult:
    """Connect and browse the tree below Objects; raises AuthError, ConfigError or Unreachable."""
    client = await connect(opts)
    try:
        return await _scan(client, opts.request_timeout_s, max_depth, max_nodes, include_server)
    finally:
        await abandon(client)


async def _scan(
    client: Client, timeout_s: float, max_depth: int, max_nodes: int, include_server: bool
) -> ScanResult:
    ns_node = client.get_node(node_id(2255))  # Server_NamespaceArray
    namespaces = tuple(await bounded("read namespaces", timeout_s, ns_node.read_value()))
    # (node id, browse path, depth) per level; the tree keeps parents before children.
    level: list[tuple[ua.NodeId, str, int]] = [(node_id(OBJECTS_FOLDER), "", -1)]
    children_of: dict[str, list[ScannedNode]] = {}
    seen: set[ua.NodeId] = {node_id(OBJECTS_FOLDER)}
    variables: list[tuple[str, ua.NodeId, int]] = []
    count = 0
    truncated = False
    while level and not truncated:
        refs_per_parent = await _browse_level(client, [n for n, _, _ in level], timeout_s * 2)
        next_level: list[tuple[ua.NodeId, str, int]] = []
        for (_, parent_path, depth), refs in zip(level, refs_per_parent, strict=True):
            kids: list[ScannedNode] = []
            for ref in refs:
                target = ua.NodeId(ref.NodeId.Identifier, ref.NodeId.NamespaceIndex)
                if ref.ReferenceTypeId == node_id(HAS_PROPERTY) or target in seen:
                    continue
                if depth < 0 and target.NamespaceIndex == 0 and not include_server:
                    continue  # the standard Server, Aliases and Locations objects: not the plant
                seen.add(target)
                name = f"{ref.BrowseName.NamespaceIndex}:{ref.BrowseName.Name}"
                path = f"{parent_path}/{name}" if parent_path else name
                kind = ref.NodeClass.name
                kids.append(ScannedNode(path, target.to_string(), kind, depth + 1))
                count += 1
                if ref.NodeClass == ua.NodeClass.Variable:
                    variables.append((path, target, depth + 1))
                if depth + 1 < max_depth:
                    next_level.append((target, path, depth + 1))
                if count >= max_nodes:
                    truncated = True
                    break
            children_of[parent_path] = kids
            if truncated:
                break
        level = next_level
    details = await _variable_details(client, variables, timeout_s)
    ordered: list[ScannedNode] = []

    def walk(path: str) -> None:
        for node in children_of.get(path, []):
            var = details.get(node.browse_path)
            ordered.append(
                ScannedNode(node.browse_path, node.node_id, node.node_class, node.depth, var) if var else node
            )
            walk(node.browse_path)

    walk("")
    return ScanResult(tuple(ordered), namespaces, truncated)


async def _variable_details(
    client: Client, variables: list[tuple[str, ua.NodeId, int]], timeout_s: float
) -> dict[str, ScannedVariable]:
    if not variables:
        return {}
    reads = []
    for _, nid, _ in variables:
        reads.append(ua.ReadValueId(NodeId=nid, AttributeId=ua.UInt32(AttributeIds.DataType)))
        reads.append(ua.ReadValueId(NodeId=nid, AttributeId=ua.UInt32(AttributeIds.Value)))
    values = await bounded(
        "read variables", timeout_s * 2, client.uaclient.read(ua.ReadParameters(NodesToRead=reads))
    )
    paths = [
        ua.BrowsePath(
            StartingNode=nid,
            RelativePath=ua.RelativePath(
                Elements=[
                    ua.RelativePathElement(
                        ReferenceTypeId=node_id(HAS_PROPERTY),
                        IsInverse=UA_FALSE,
                        IncludeSubtypes=UA_TRUE,
                        TargetName=ua.QualifiedName("EngineeringUnits", ua.Int16(0)),
                    )
                ]
            ),
        )
        for _, nid, _ in variables
    ]
    found = await bounded(
        "find units", timeout_s * 2, client.uaclient.translate_browsepaths_to_nodeids(paths)
    )
    eu_nodes = [
        (i, res.Targets[0].TargetId)
        for i, res in enumerate(found)
        if res.StatusCode.is_good() and res.Targets
    ]
    units: dict[int, str] = {}
    if eu_nodes:
        eu_values = await bounded(
            "read units",
            timeout_s * 2,
            client.uaclient.read(
                ua.ReadParameters(
                    NodesToRead=[
                        ua.ReadValueId(NodeId=n, AttributeId=ua.UInt32(AttributeIds.Value))
                        for _, n in eu_nodes
                    ]
                )
            ),
        )
        for (i, _), dv in zip(eu_nodes, eu_values, strict=True):
            eu = dv.Value.Value if dv.Value is not None else None
            if isinstance(eu, ua.EUInformation) and eu.DisplayName.Text:
                units[i] = eu.DisplayName.Text
    out: dict[str, ScannedVariable] = {}
    for i, (path, nid, depth) in enumerate(variables):
        dt_value = values[2 * i].Value
        dt = dt_value.Value if dt_value is not None else None
        type_id = dt.Identifier if isinstance(dt, ua.NodeId) and dt.NamespaceIndex == 0 else None
        numeric = isinstance(type_id, int) and type_id in NUMERIC_TYPES
        type_text = type_name(type_id if isinstance(type_id, int) else None)
        if isinstance(dt, ua.NodeId) and dt.NamespaceIndex != 0:
            type_text = dt.to_string()
        out[path] = ScannedVariable(
            browse_path=path,
            node_id=nid.to_string(),
            data_type=type_text,
            numeric=numeric,
            unit=units.get(i),
            value=_value_text(values[2 * i + 1]),
            depth=depth,
        )
    return out


#: Other names PLCs give the quantities a model's inputs are named after (tag name, last segment).
INPUT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "RateRMS": ("Flow", "FlowRate", "VolumeFlow", "VolumeFlowRate"),
    "Thermocouple": ("FluidTemperature", "WaterTemperature", "MediumTemperature"),
    "Temperature": ("MotorTemperature", "WindingTemperature"),
    "Accelerometer1RMS": ("Accelerometer1", "Vibration1"),
    "Accelerometer2RMS": ("Accelerometer2", "Vibration2"),
    "Current": ("MotorCurrent",),
    "Voltage": ("MotorVoltage", "SupplyVoltage"),
    "Pressure": ("OutletPressure", "DischargePressure"),
}


def _plain(browse_path: str) -> str:
    return "/".join(seg.partition(":")[2] or seg for seg in browse_path.split("/"))


def model_inputs(
    input_metrics: Sequence[str], variables: Sequence[ScannedVariable]
) -> tuple[dict[str, str], list[str]]:
    """Which scanned variable carries each model input: by its name, else a known synonym.

    Returns (input -> the metric name the driver gives that variable, inputs left unmapped).
    Each variable serves one input; only numeric variables are considered.
    """
    numeric = [_plain(v.browse_path) for v in variables if v.numeric]
    used: set[str] = set()
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for metric in dict.fromkeys(input_metrics):
        hit = None
        for name in (metric, *INPUT_SYNONYMS.get(metric, ())):
            hit = next((p for p in numeric if p not in used and p.rsplit("/", 1)[-1] == name), None)
            if hit is not None:
                break
        if hit is None:
            missing.append(metric)
        else:
            used.add(hit)
            mapping[metric] = hit
    return mapping, missing


def model_use_snippet(model: str, input_metrics: Sequence[str], variables: Sequence[ScannedVariable]) -> str:
    """A ``[[models.use]]`` table mapping a model's inputs onto the scanned variables."""
    mapping, missing = model_inputs(input_metrics, variables)
    pairs = ", ".join(f'{metric} = "{name}"' for metric, name in mapping.items())
    lines = ["", "[[models.use]]", f'name = "{model}"', f"inputs = {{ {pairs} }}"]  # TOML: one line
    if missing:
        lines.append(
            f"# not found on this server: {', '.join(missing)}: add them to inputs by hand, "
            "or the model cannot score this machine (edgetwin check says so)"
        )
    return "\n".join(lines) + "\n"
