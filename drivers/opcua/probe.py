"""``edgetwin check --online`` for an OPC UA source: endpoint, security policy, every browse path.

Opens a session as the driver would (same security, same trust store), then translates every
configured browse path in one request and reads every NodeId's class, without subscribing.
Each result is ``(level, message, fix)`` with level ``pass``, ``warn`` or ``fail``.
"""

from __future__ import annotations

import asyncio

from asyncua import ua
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.uaerrors import UaError

from drivers.opcua.config import OpcUaConfig
from drivers.opcua.protocol import endpoint_display, parse_browse_path, status_token
from drivers.opcua.security import ConnectOptions, Unreachable, abandon, bounded, connect, quiet_asyncua
from drivers.opcua.uahelp import UA_FALSE, UA_TRUE, node_id
from gateway.errors import AuthError, ConfigError

Finding = tuple[str, str, str]

OBJECTS_FOLDER = 85
HIERARCHICAL_REFERENCES = 33


def probe(name: str, cfg: OpcUaConfig) -> list[Finding]:
    """The findings for one OPC UA source (runs its own event loop; call from sync code)."""
    return asyncio.run(_probe(name, cfg))


async def _probe(name: str, cfg: OpcUaConfig) -> list[Finding]:
    quiet_asyncua()
    where = f"source {name}: {endpoint_display(cfg.endpoint)}"
    opts = ConnectOptions.from_config(f"opcua {name}", cfg)
    try:
        client = await connect(opts)
    except (ConfigError, AuthError) as exc:
        return [("fail", f"{where}: {_tail(str(exc))}", _fix(str(exc)))]
    except Unreachable as exc:
        return [
            (
                "fail",
                f"{where}: cannot open a session: {exc}",
                "check that the PLC's OPC UA server runs and the endpoint in the config",
            )
        ]
    out: list[Finding] = [
        ("pass", f"{where}: session open with {cfg.security_policy}/{cfg.security_mode}", "")
    ]
    try:
        ns_array = list(
            await bounded(
                "read namespaces",
                cfg.request_timeout_s,
                client.get_node(node_id(ObjectIds.Server_NamespaceArray)).read_value(),
            )
            or []
        )
        out += await _nodes(client, cfg, ns_array, where)
    except (UaError, OSError, Unreachable) as exc:
        out.append(("fail", f"{where}: the session broke while checking nodes: {exc}", "run check again"))
    finally:
        await abandon(client)
    return out


async def _nodes(client: object, cfg: OpcUaConfig, ns_array: list[str], where: str) -> list[Finding]:
    out: list[Finding] = []
    paths: list[tuple[str, ua.BrowsePath]] = []
    ids: list[tuple[str, ua.NodeId]] = []
    for spec in cfg.nodes:
        if spec.node_id is not None:
            try:
                ids.append((spec.node_id, ua.NodeId.from_string(spec.node_id)))
            except (ValueError, UaError):
                out.append(
                    ("fail", f"{where}: node_id {spec.node_id!r} is not a NodeId", "write it as ns=2;s=...")
                )
            continue
        assert spec.browse_path is not None
        elements = []
        for seg in parse_browse_path(spec.browse_path):
            index = seg.ns
            if index is None:
                uri = cfg.namespace_uri or ""
                if uri not in ns_array:
                    out.append(
                        (
                            "fail",
                            f"{where}: browse path {spec.browse_path!r}: the server has no namespace {uri!r}",
                            f"set namespace_uri to one of: {', '.join(ns_array[1:]) or 'none'}",
                        )
                    )
                    break
                index = ns_array.index(uri)
            elements.append(
                ua.RelativePathElement(
                    ReferenceTypeId=node_id(HIERARCHICAL_REFERENCES),
                    IsInverse=UA_FALSE,
                    IncludeSubtypes=UA_TRUE,
                    TargetName=ua.QualifiedName(seg.name, index),
                )
            )
        else:
            path = ua.BrowsePath(
                StartingNode=node_id(OBJECTS_FOLDER), RelativePath=ua.RelativePath(Elements=elements)
            )
            paths.append((spec.browse_path, path))
    uaclient = client.uaclient  # type: ignore[attr-defined]
    if paths:
        results = await bounded(
            "translate browse paths",
            cfg.request_timeout_s * 2,
            uaclient.translate_browsepaths_to_nodeids([p for _, p in paths]),
        )
        for (text, _), res in zip(paths, results, strict=True):
            if res.StatusCode.is_good() and res.Targets:
                out.append(("pass", f"{where}: browse path {text!r} found", ""))
            else:
                token = status_token(res.StatusCode.value) if not res.StatusCode.is_good() else "bad_nomatch"
                out.append(
                    (
                        "fail",
                        f"{where}: browse path {text!r} not found ({token})",
                        "list the server's nodes with 'edgetwin scan opcua ENDPOINT' and correct the path",
                    )
                )
    if ids:
        reads = [ua.ReadValueId(NodeId=nid, AttributeId=AttributeIds.NodeClass) for _, nid in ids]
        params = ua.ReadParameters(NodesToRead=reads, TimestampsToReturn=ua.TimestampsToReturn.Neither)
        values = await bounded("read node classes", cfg.request_timeout_s * 2, uaclient.read(params))
        for (text, _), dv in zip(ids, values, strict=True):
            if dv.StatusCode.is_good():
                out.append(("pass", f"{where}: node {text!r} found", ""))
            else:
                out.append(
                    (
                        "fail",
                        f"{where}: node {text!r} not found ({status_token(dv.StatusCode.value)})",
                        "list the server's nodes with 'edgetwin scan opcua ENDPOINT' and correct the NodeId",
                    )
                )
    return out


def _tail(text: str) -> str:
    # "<who> <where>: <what>: <why>: <fix>" -> "<what>: <why>"
    parts = text.split(": ")
    return ": ".join(parts[1:-1]) if len(parts) > 2 else text


def _fix(text: str) -> str:
    return text.rsplit(": ", 1)[-1]
