"""Configuration of an OPC UA source: the driver's own keys of a ``[[sources]]`` table.

Imported by the driver registry, so it needs nothing beyond the core dependencies (no asyncua).
The common keys (``name``, ``driver``, ``subject``, ``kind``, ``enabled``) are validated by the core.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlparse

from pydantic import Field, model_validator

from gateway.config_base import ConfigModel, PathField, SecretFile

#: Where the PKI folder lives unless a source says otherwise (inside systemd's StateDirectory).
DEFAULT_PKI_DIR = Path("/var/lib/edgetwin/opcua/pki")

SecurityPolicyName = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
SecurityModeName = Literal["None", "Sign", "SignAndEncrypt"]
DeadbandName = Literal["none", "absolute", "percent"]

# NodeId forms: i=85, ns=2;s=Pump1.Current, nsu=urn:plc;i=7, ns=3;g=<guid>, ns=1;b=<base64>
_NODE_ID = re.compile(r"^(?:ns=\d{1,5};|nsu=[^;]+;)?[isgb]=.+$")
# One browse path segment: "Name" or "<namespace index>:Name"
_SEGMENT = re.compile(r"^(?:\d{1,5}:)?[^/:]+$")


def split_browse_path(path: str) -> list[str]:
    """Segments of a configured browse path, the leading ``Objects`` folder left out."""
    parts = [p for p in path.strip().strip("/").split("/") if p]
    if parts and parts[0] in ("Objects", "0:Objects"):
        parts = parts[1:]
    return parts


def _segment_name(seg: str) -> str:
    """A browse-path segment's name without its ``<ns>:`` prefix."""
    ns, sep, name = seg.partition(":")
    return name if sep and ns.isdigit() else seg


class NodeSpec(ConfigModel):
    """One monitored variable, by NodeId or by browse path (below the Objects folder)."""

    node_id: str | None = Field(default=None, min_length=3, max_length=512)
    browse_path: str | None = Field(default=None, min_length=1, max_length=1024)
    # The metric name; default: the browse path without namespace prefixes, or for a node_id the
    # node's BrowseName. Node ids and endpoints never become metric names (they identify the plant).
    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/ -]+$")
    unit: str | None = Field(default=None, max_length=32)  # overrides the server's EUInformation
    sampling_interval_ms: float | None = Field(default=None, ge=0, le=3_600_000)
    queue_size: int | None = Field(default=None, ge=1, le=10_000)
    deadband: DeadbandName | None = None
    deadband_value: float | None = Field(default=None, ge=0)
    # Nominal rate for the missing fraction; default 1000 / sampling_interval_ms without a deadband.
    rate_hz: float | None = Field(default=None, gt=0, le=1000)
    # How the values behave, which decides the features sent: "waveform" (an AC current, a
    # vibration: RMS, peak, crest factor, dominant frequency), "state" (on-change: last value and
    # changes) or "level" (mean, std, min, max, slope).
    shape: Literal["level", "waveform", "state"] = "level"

    @model_validator(mode="after")
    def _one_address(self) -> Self:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of node_id or browse_path")
        if self.node_id is not None and not _NODE_ID.match(self.node_id):
            raise ValueError(
                f"node_id {self.node_id!r} is not an OPC UA NodeId: write it as 'ns=2;s=Name', 'ns=2;i=7' "
                "or 'nsu=<namespace uri>;s=Name'"
            )
        if self.browse_path is not None:
            segments = split_browse_path(self.browse_path)
            bad = [s for s in segments if not _SEGMENT.match(s)]
            if not segments or bad:
                raise ValueError(
                    f"browse_path {self.browse_path!r}: write it as '2:Pump1/2:Motor/2:Current' "
                    "(segments 'name' or '<namespace index>:name' below Objects)"
                )
        return self

    @property
    def address(self) -> str:
        """The configured address, for logs."""
        return self.node_id or self.browse_path or ""


class OpcUaConfig(ConfigModel):
    """Keys of a ``driver = "opcua"`` source."""

    endpoint: str = Field(min_length=10, max_length=512)  # opc.tcp://host:port[/path]
    # Unprefixed browse path segments and NodeIds without "ns=" use this namespace, resolved to its
    # index at every connect (indexes may change when a PLC program is reloaded).
    namespace_uri: str | None = Field(default=None, min_length=1, max_length=512)
    security_policy: SecurityPolicyName = "Basic256Sha256"
    security_mode: SecurityModeName = "SignAndEncrypt"
    # Policy None sends everything in clear: only to a server on this machine unless allowed here.
    allow_insecure: bool = False
    pki_dir: PathField = DEFAULT_PKI_DIR
    application_uri: str | None = Field(
        default=None, min_length=5, max_length=256
    )  # default urn:<host>:edgetwin
    username: str | None = Field(default=None, min_length=1, max_length=128)
    password_file: SecretFile | None = None
    publishing_interval_ms: float = Field(default=500.0, ge=10, le=60_000)
    sampling_interval_ms: float = Field(default=100.0, ge=0, le=3_600_000)
    queue_size: int = Field(default=10, ge=1, le=10_000)
    deadband: DeadbandName = "none"
    deadband_value: float = Field(default=0.0, ge=0)
    # Every asyncua call is bounded by this (connect: twice this).
    request_timeout_s: float = Field(default=5.0, gt=0, le=120)
    # A connection that delivered no publish response (data or keep-alive) for this long is dead.
    keepalive_timeout_s: float = Field(default=10.0, ge=1, le=600)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    # A refused connect to a PLC costs nothing; a short cap keeps pickup within ~3 s of it listening.
    reconnect_max_s: float = Field(default=2.0, gt=0, le=600)
    # How often every node is checked again (still there, same data type); bad nodes are retried then.
    verify_interval_s: float = Field(default=10.0, ge=1, le=3600)
    # Source/server timestamps further than this from the gateway clock are not used for t_wall.
    clock_tolerance_s: float = Field(default=300.0, gt=0, le=86_400)
    # How often the opcua_clock and opcua_hold diagnostics go out; each is one record a subject,
    # so more than one a second would only crowd the diagnostics lane.
    diagnostics_every_s: float = Field(default=60.0, ge=1, le=86_400)
    nodes: list[NodeSpec] = Field(min_length=1, max_length=20_000)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        url = urlparse(self.endpoint)
        if url.scheme != "opc.tcp" or not url.hostname:
            raise ValueError(f"endpoint {self.endpoint!r}: expected opc.tcp://host:port[/path]")
        try:
            url.port  # noqa: B018 - parsing the port is the check
        except ValueError as exc:
            raise ValueError(f"endpoint {self.endpoint!r}: bad port: {exc}") from exc
        if url.username or url.password:
            raise ValueError("endpoint: credentials in the URL are refused: use username and password_file")
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError(
                f"security_policy {self.security_policy!r} with security_mode {self.security_mode!r}: "
                "policy None goes with mode None, and a real policy with Sign or SignAndEncrypt"
            )
        if self.security_policy == "None" and not self.allow_insecure and not is_loopback(url.hostname):
            raise ValueError(
                f"security_policy 'None' to {url.hostname}: unencrypted and unauthenticated off this machine; "
                "use Basic256Sha256 with SignAndEncrypt, or set allow_insecure = true if the network is isolated"
            )
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: give both or neither")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s is larger than reconnect_max_s")
        for i, node in enumerate(self.nodes):
            unprefixed = node.browse_path is not None and any(
                ":" not in s for s in split_browse_path(node.browse_path)
            )
            if unprefixed and self.namespace_uri is None:
                raise ValueError(
                    f"nodes[{i}].browse_path {node.browse_path!r} has segments without a namespace index: "
                    "prefix them ('2:Pump1') or set namespace_uri"
                )
            if (node.deadband or self.deadband) == "percent" and (
                node.deadband_value or self.deadband_value
            ) > 100:
                raise ValueError(f"nodes[{i}]: a percent deadband is at most 100")
        return self

    def metric_names(self) -> list[str] | None:
        """The streams' metric names as the config gives them; None when some come from the server."""
        names: list[str] = []
        for node in self.nodes:
            if node.name is not None:
                names.append(node.name)
            elif node.browse_path is not None:
                names.append("/".join(_segment_name(seg) for seg in split_browse_path(node.browse_path)))
            else:
                return None  # a node_id without a name is named by its BrowseName at run time
        return names

    def delivers(self) -> dict[str | None, frozenset[str] | None]:
        """The nodes' streams, of the server at the endpoint (it names itself: its server URI)."""
        names = self.metric_names()
        return {None: None if names is None else frozenset(names)}

    def node_addresses(self) -> frozenset[str]:
        """The nodes' configured addresses: a node that never resolved is known by it (``Alarm.node``)."""
        return frozenset(node.address for node in self.nodes)

    def metric_units(self) -> dict[str, str]:
        """The units the config sets (``unit``); the others come from the server's EUInformation."""
        names = self.metric_names() or []
        return {name: node.unit for name, node in zip(names, self.nodes, strict=False) if node.unit}


def is_loopback(host: str) -> bool:
    """True for names and addresses of this machine's loopback interface."""
    if host in ("localhost", "ip6-localhost", "::1"):
        return True
    return host.startswith("127.") and all(p.isdigit() for p in host.split("."))
