"""The OPC UA driver: subscriptions on asyncua with verified recovery and per-node health.

Recovery is this driver's own job, inside ``run``: a PLC that restarts or is switched off for the
weekend must be picked up again within seconds, every monitored item verified, without the
gateway being restarted.  So ``run`` keeps an inner loop with its own capped, jittered backoff
(``reconnect_min_s`` .. ``reconnect_max_s``) around one *connection*: connect (security checked
against the PKI folder), resolve browse paths, check every node (is a variable, numeric data
type, engineering unit), create the subscription and its monitored items, then stream.  It calls
``started()`` the first time that succeeds, once.  Only authentication and configuration errors
leave ``run`` (the supervisor then applies its long backoff, or none): retrying those fast helps
nobody.  Why not let the supervisor restart ``run`` for every link loss: its backoff grows to
60 s and resets only after a minute of health, and per-node health would be forgotten each time.

Per-node health: a node that vanished, changed to a non-numeric data type or was refused by the
server is reported once (log + ``SENSOR_FAULT`` alarm with ``{"status": "bad_nodeidunknown"}``);
the others continue; the node is retried on every verification cycle and reported restored when
it comes back.  Outages leave no samples: the windower records them as gaps and raises
``SENSOR_LOST``; a ``opcua_link`` diagnostic gives the outage and recovery figures.

Nominal rates and held values: a node's stream runs at the sampling interval the server revised
the request to.  Without a deadband the server reports a node only when it changes, and every
publish response that ends a notification sequence confirms the nodes it does not mention
unchanged, so a node that holds still has its held value handed over at each sampling tick the
live subscription confirmed (never past the last response): a quiet tag is whole, not partial or
lost (``_Connection.hold``).

Every asyncua call is bounded by ``request_timeout_s`` of our own (``asyncio.timeout``), on top
of asyncua's request timeout, so a half-open socket can never hang the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import Subscription
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from drivers.opcua.config import NodeSpec, OpcUaConfig
from drivers.opcua.protocol import (
    NUMERIC_TYPES,
    Stamper,
    clean_name,
    endpoint_display,
    metric_name_for_path,
    parse_browse_path,
    quality_of,
    status_token,
    to_float,
)
from drivers.opcua.security import (
    CLOSE_DEADLINE_S,
    ConnectOptions,
    Unreachable,
    abandon,
    bounded,
    connect,
    quiet_asyncua,
)
from drivers.opcua.uahelp import UA_FALSE, UA_TRUE, node_id
from gateway.backoff import Backoff
from gateway.contracts import Alarm, AlarmKind, Diagnostic, Node, SampleSink, SourceInfo
from gateway.errors import ConfigError, TransientError
from gateway.liveness import Pulse
from gateway.sample import UNUSABLE_FLAGS, Quality, Sample, SampleBlock, Stream, industrial_metric

log = logging.getLogger(__name__)

_BOOLEAN = next(i for i, name in NUMERIC_TYPES.items() if name == "Boolean")  # ns=0;i=1

_T = TypeVar("_T")

OBJECTS_FOLDER = 85
HIERARCHICAL_REFERENCES = 33
HAS_PROPERTY = 46
#: Liveness: the stream loop beats at least every second and every server call declares its own
#: bound, so 5 s with neither is a driver stuck outside any known wait (see gateway.liveness).
PULSE_STALE_S = 5.0
#: What a connect may take besides its server calls: the gateway's RSA key is generated (in a
#: thread) on the first secure connect, ~1 s on a slow board, and certificates are parsed.
KEY_WORK_S = 30.0
_BAD = int(Quality.BAD_STATUS)
_NAN = math.nan
#: How often held values are handed over (see ``_Connection.hold``): a quiet tag's samples reach
#: the windower within this of their confirmation, well inside the pipeline's grace.
HOLD_TICK_S = 0.25
#: A held tick stays this much (plus one sampling interval) behind the last publish response: a
#: change sampled before it but stamped earlier (a PLC stamps at its scan, the server samples and
#: queues after) or delayed by the network must still be able to arrive before the tick is held.
HOLD_LAG_S = 0.25
#: A subscription with nothing to report sends a keep-alive at least this often, so that quiet
#: tags are confirmed (and held) about as fast as changing ones are delivered.
CONFIRM_EVERY_S = 1.0
#: A value the server holds that a node's monitored item did not deliver (``_Connection.verify``)
#: is judged by the first publish response this long after the read, plus the node's sampling
#: interval and two publishing intervals: a change still in flight has landed by then.
PROBE_MARGIN_S = 0.5
#: Held samples of one node at one tick handed over as one columnar block from this many on
#: (a block costs a few numpy calls; a short run is cheaper sample by sample).
HOLD_BLOCK_MIN = 8

# Per-node statuses that mean "check this node again now" rather than "the value is bad".
_NODE_GONE = frozenset(
    {
        StatusCodes.BadNodeIdUnknown,
        StatusCodes.BadNodeIdInvalid,
        StatusCodes.BadTypeMismatch,
        StatusCodes.BadAttributeIdInvalid,
    }
)


# A node addressed by NodeId that the server no longer knows was often recreated by a PLC program
# download under a new NodeId: say what would follow it.
_GONE_TOKENS = frozenset({"bad_nodeidunknown", "bad_nodeidinvalid"})
_RECREATED_HINT = (
    "; it is addressed by node_id: if the PLC recreated it under a new NodeId, "
    "address it by browse_path instead, which follows a recreated node"
)


def _numbered_namespaces(nodes: Iterable[NodeSpec]) -> set[int]:
    """The namespace indexes (above 0, the standard one) nodes are addressed by: ``ns=N;`` and ``N:name``."""
    out: set[int] = set()
    for spec in nodes:
        if spec.node_id is not None and spec.node_id.startswith("ns="):
            out.add(int(spec.node_id[3:].partition(";")[0]))
        if spec.browse_path is not None:
            out |= {seg.ns for seg in parse_browse_path(spec.browse_path) if seg.ns}
    return out


def requested_ms(spec: NodeSpec, cfg: OpcUaConfig) -> float:
    """The sampling interval asked for a node: its own, else the source's."""
    return spec.sampling_interval_ms if spec.sampling_interval_ms is not None else cfg.sampling_interval_ms


class LinkLost(Exception):  # noqa: N818 - a signal inside the driver, never raised out of it
    """The connection or subscription is gone; the inner loop reconnects."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Item:
    """One configured node and everything known about it."""

    __slots__ = (
        "data_type",
        "early",
        "held",
        "held_reported",
        "hold_dt",
        "hold_from",
        "hold_gap",
        "hold_lag",
        "hold_span",
        "index",
        "last",
        "last_t_mono",
        "name",
        "node_id",
        "raised_on",
        "revised_ms",
        "spec",
        "state",
        "stream",
        "token",
        "unit",
    )

    def __init__(self, index: int, spec: NodeSpec) -> None:
        self.index = index
        self.spec = spec
        self.node_id: ua.NodeId | None = None
        self.data_type: ua.NodeId | None = None
        self.name: str | None = spec.name or (
            metric_name_for_path(spec.browse_path) if spec.browse_path else None
        )
        self.unit: str | None = None
        self.stream: Stream | None = None
        # The stream its bad status was raised on (None inside: a node never resolved), until ended.
        self.raised_on: tuple[Stream | None] | None = None
        self.state = "pending"  # pending | good | bad
        self.token = "pending"  # noqa: S105 - "good" or the status token of the problem
        self.last_t_mono = -math.inf  # newest t_mono handed over, delivered or held
        # The server's revised sampling interval (ms) in the last session; None before any.
        self.revised_ms: float | None = None
        # Seconds between held samples: the server reports this node by exception (no deadband,
        # not a Boolean), so its silence in a live subscription means "unchanged"; 0 = never held.
        self.hold_dt = 0.0
        self.hold_gap = math.inf  # a silence this long before a change was held (1.5 x hold_dt)
        self.hold_span = math.inf  # a silence this long is held at the next tick (2 x hold_dt)
        # How far before a publish response its held ticks stop (a sampling interval and
        # HOLD_LAG_S): a change in the next response is placed no earlier (``_Connection.restamp``).
        self.hold_lag = math.inf
        # The newest sample delivered by the current monitored item (what is held); None until
        # its first value, so nothing is held across a reconnect or a re-created monitored item.
        self.last: Sample | None = None
        # When the server confirmed the monitored item: nothing is held before it (a first value
        # stamped long ago says nothing about the time before the subscription existed).
        self.hold_from = math.inf
        # Values that arrived while the monitored item was being created (rate not known yet).
        self.early: list[tuple[float, float, float, int]] | None = None
        self.held = 0  # samples held since the start
        self.held_reported = 0  # ``held`` at the last opcua_hold diagnostic


class _Feed(Subscription):
    """A subscription whose publish responses go straight to the driver's hot path.

    asyncua's handler API starts one task per notification; its iterator API copies each into a
    bounded queue that drops silently when full.  Overriding ``publish_callback`` turns a whole
    publish response into samples in one synchronous pass instead.
    """

    on_publish: Callable[[ua.PublishResult], None]

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        """Hand the publish response to the connection."""
        self.last_publish_at = time.monotonic()
        self.on_publish(publish_result)


class OpcUaDriver:
    """Monitors OPC UA variables by subscription and keeps them monitored across any outage."""

    def __init__(self, info: SourceInfo, cfg: OpcUaConfig) -> None:
        self._info = info
        self._cfg = cfg
        self._endpoint = endpoint_display(cfg.endpoint)
        self.items = [_Item(i, spec) for i, spec in enumerate(cfg.nodes)]
        self._device: str | None = None
        self.connect_options = ConnectOptions.from_config(f"opcua {info.name}", cfg)
        self.link_up = False
        self.connects = 0
        self.outages: list[float] = []  # seconds from loss to verified data flow, per recovery
        self.samples = 0
        self.notifications = 0
        self._sink: SampleSink | None = None
        self.pulse = Pulse(stale_after_s=PULSE_STALE_S)
        # Nodes with no usable value and no fault of this run raised by their node yet (``first_data``).
        self.unproven: set[int] = {item.index for item in self.items}
        # The server's namespace array as last read, and the indexes the configuration names by number.
        self._namespaces: list[str] | None = None
        self._indexes = _numbered_namespaces(cfg.nodes)

    # ---- what tests and status lines read --------------------------------------------------

    @property
    def health(self) -> dict[str, str]:
        """Per-node health by configured address: ``good`` or the status token of the problem."""
        return {item.spec.address: item.token for item in self.items}

    @property
    def held(self) -> dict[str, int]:
        """Per node by configured address: samples of its unchanged value held since the start."""
        return {item.spec.address: item.held for item in self.items}

    @property
    def device(self) -> str | None:
        """The server's identity (application URI and endpoint) once connected."""
        return self._device

    # ---- the run loop ------------------------------------------------------------------------

    async def run(self, sink: SampleSink, *, started: Callable[[], None]) -> None:
        """Connect, verify, stream; reconnect on any loss until cancelled (see the module docstring)."""
        self._sink = sink
        backoff = Backoff(self._cfg.reconnect_min_s, self._cfg.reconnect_max_s)
        has_started = False
        down_since: float | None = None
        down_reason = ""
        while True:
            conn = _Connection(self, sink)
            try:
                await conn.open()
                self.connects += 1
                self.link_up = True
                if down_since is not None and self.connects > 1:
                    outage = time.monotonic() - down_since
                    self.outages.append(outage)
                    log.info(
                        "opcua %s %s: link restored after %.1f s; %d/%d nodes good",
                        self._info.name,
                        self._endpoint,
                        outage,
                        conn.good_count,
                        len(self.items),
                    )
                    self._diagnostic("opcua_link", {"state": "up", "outage_s": round(outage, 3)}, conn)
                else:
                    log.info(
                        "opcua %s %s: connected (%s); %d/%d nodes good",
                        self._info.name,
                        self._endpoint,
                        self._cfg.security_policy,
                        conn.good_count,
                        len(self.items),
                    )
                    self._diagnostic("opcua_link", {"state": "up"}, conn)
                down_since = None
                backoff.reset()
                if not has_started:
                    has_started = True
                    started()
                await conn.stream()
            except (LinkLost, Unreachable) as exc:
                reason = str(exc)
            except (OSError, TransientError, UaError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self.link_up = False
                with self.pulse.waiting("closing the session", CLOSE_DEADLINE_S):
                    await conn.close()
            if down_since is None:
                down_since = time.monotonic()
                down_reason = reason
                log.warning(
                    "opcua %s %s: %s (%s); reconnecting with backoff up to %g s",
                    self._info.name,
                    self._endpoint,
                    "link down" if self.connects else "cannot connect yet",
                    reason,
                    self._cfg.reconnect_max_s,
                )
                self._diagnostic("opcua_link", {"state": "down"}, None)
            elif reason != down_reason:
                down_reason = reason
                log.info("opcua %s %s: still down (%s)", self._info.name, self._endpoint, reason)
            else:
                log.debug("opcua %s %s: still down (%s)", self._info.name, self._endpoint, reason)
            delay = backoff.next()
            # A reconnect loop that is trying is alive: its pause is a wait with a known bound.
            with self.pulse.waiting("reconnect backoff", delay):
                await asyncio.sleep(delay)

    def _diagnostic(self, kind: str, detail: dict[str, float | str], conn: _Connection | None) -> None:
        if self._sink is None:
            return
        full = dict(detail)
        if conn is not None:
            full["nodes_good"] = conn.good_count
            full["nodes_bad"] = len(self.items) - conn.good_count
        self._sink.diagnostic(Diagnostic(kind, self._info.subject, time.time(), full))

    # ---- per-node health ---------------------------------------------------------------------

    def set_health(self, item: _Item, token: str) -> None:
        """Record a node's health; a change between good and bad is logged once and raised as an alarm."""
        if item.token == token:
            return
        state = "good" if token == "good" else "bad"  # noqa: S105 - a status token, not a secret
        was, was_token = item.state, item.token
        item.state = state
        item.token = token
        if state == was:
            # Still bad, for another reason (vanished -> its browse path finds nothing): no new alarm.
            log.info(
                "opcua %s: node %s still bad: %s (was %s)",
                self._info.name,
                item.spec.address,
                token,
                was_token,
            )
            return
        sink = self._sink
        now_mono, now_wall = time.monotonic(), time.time()
        if state == "bad":
            log.warning(
                "opcua %s %s: node %s (%s) is bad: %s; the other nodes continue, it is retried every %g s%s",
                self._info.name,
                self._endpoint,
                item.spec.address,
                item.name or "?",
                token,
                self._cfg.verify_interval_s,
                _RECREATED_HINT if item.spec.node_id is not None and token in _GONE_TOKENS else "",
            )
            detail: dict[str, float | str] = {"status": token}
            if item.stream is None:
                # Raised by its node, as a previous run's fault of it: that condition is this run's
                # now, ended here.  One raised on its stream is another condition: its first usable
                # value still ends a fault a previous run left on by its node (``first_data``).
                self.unproven.discard(item.index)
                detail["item"] = item.index
            if sink is not None:
                item.raised_on = (item.stream,)
                sink.alarm(
                    Alarm(
                        AlarmKind.SENSOR_FAULT,
                        self._info.subject,
                        now_mono,
                        now_wall,
                        item.stream,
                        detail,
                        node=self._node(item) if item.stream is None else None,
                    )
                )
        elif was == "bad":
            log.info("opcua %s %s: node %s is good again", self._info.name, self._endpoint, item.spec.address)
            # Ended on the stream it was raised on: a node that resolved only now has a stream its
            # raise did not name, and an ending on it would leave that raise on at the twin.
            (stream,) = item.raised_on or (item.stream,)
            item.raised_on = None
            if sink is not None:
                detail = {"after": AlarmKind.SENSOR_FAULT.value, "status": "good"}
                if stream is None:
                    detail["item"] = item.index
                sink.alarm(
                    Alarm(
                        AlarmKind.SENSOR_RESTORED,
                        self._info.subject,
                        now_mono,
                        now_wall,
                        stream,
                        detail,
                        node=self._node(item) if stream is None else None,
                    )
                )

    def first_data(self) -> None:
        """End, with a node's first usable value of the run, a fault a previous run raised on it unresolved.

        A node that never resolved before a stop left its fault raised with no stream, by its
        configured address (``Alarm.node``; the gateway keeps it on across the restart, whatever
        the node's place in the list now); the fresh driver does not know it.  So a node's first
        usable value of the run, with no fault of this run raised by its node (one on its stream is
        another condition), sends that ending as the driver would have sent it (no stream, the node, ``item``, ``status: good``): the gateway sends it only
        while such a fault is on, as for every ending of a driver's own fault.
        """
        sink = self._sink
        for index in list(self.unproven):
            item = self.items[index]
            last = item.last
            if last is None or last.quality & UNUSABLE_FLAGS:
                continue
            self.unproven.discard(index)
            if sink is not None:
                detail: dict[str, float | str] = {
                    "after": AlarmKind.SENSOR_FAULT.value,
                    "status": "good",
                    "item": index,
                }
                sink.alarm(
                    Alarm(
                        AlarmKind.SENSOR_RESTORED,
                        self._info.subject,
                        last.t_mono,
                        last.t_wall,
                        None,
                        detail,
                        node=self._node(item),
                    )
                )

    def _node(self, item: _Item) -> Node:
        """A node that never resolved, by its configured address: its place in the list may change."""
        return Node(self._info.name, item.spec.address)

    def stream_for(self, item: _Item, device: str) -> Stream:
        """The item's stream, created once and rebuilt only when its name, unit, rate or server changes.

        The nominal rate is ``rate_hz``, else the server's revised sampling interval (a revised 0,
        "the server's fastest", and a server that did not answer yet leave the requested one)
        for a node without a deadband that is not a Boolean; such a node is reported by
        exception, and its held value is sampled at that rate (``item.hold_dt``).
        """
        spec = item.spec
        name = item.name or f"node{item.index}"
        unit = spec.unit if spec.unit is not None else (item.unit or "")
        requested = requested_ms(spec, self._cfg)
        revised = item.revised_ms
        sampling = revised if revised is not None and revised > 0 else requested
        deadband = spec.deadband or self._cfg.deadband
        rate = spec.rate_hz
        # A Boolean reports on change only (the server sends no notification while it holds).
        dt = item.data_type
        on_change = dt is not None and dt.NamespaceIndex == 0 and dt.Identifier == _BOOLEAN
        by_exception = deadband == "none" and not on_change
        if rate is None and by_exception and sampling > 0:
            rate = min(1000.0, 1000.0 / sampling)
        item.hold_dt = 1.0 / rate if by_exception and rate else 0.0
        item.hold_gap = 1.5 * item.hold_dt if item.hold_dt else math.inf
        item.hold_span = 2.0 * item.hold_dt if item.hold_dt else math.inf
        item.hold_lag = item.hold_dt + HOLD_LAG_S if item.hold_dt else math.inf
        current = item.stream
        if (
            current is not None
            and current.metric.name == name
            and current.metric.unit == unit
            and current.device == device
            and current.rate_hz == rate
        ):
            return current
        if current is not None:
            log.info(
                "opcua %s: node %s now reports as %s [%s] at %s Hz (was %s [%s] at %s Hz)",
                self._info.name,
                spec.address,
                name,
                unit,
                rate,
                current.metric.name,
                current.metric.unit,
                current.rate_hz,
            )
        stream = Stream(
            source=self._info.name,
            subject=self._info.subject,
            device=device,
            metric=industrial_metric(name, unit, spec.shape),
            kind=self._info.kind,
            rate_hz=rate,
            on_change=on_change,
        )
        item.stream = stream
        return stream

    def see_namespaces(self, namespaces: list[str]) -> None:
        """Warn when a namespace index the configuration names holds another URI than before (a PLC restarted)."""
        before, self._namespaces = self._namespaces, namespaces
        if before is None:
            return
        for index in sorted(self._indexes):
            was = before[index] if index < len(before) else None
            now = namespaces[index] if index < len(namespaces) else None
            if was == now:
                continue
            # Namespace URIs are not named: a plant's may name the site (the log redactor knows
            # only the configured one).
            log.warning(
                "opcua %s %s: the server's namespace %d holds another URI than at the last connection "
                "(%s): the nodes addressed by namespace index %d name other nodes or none; address them "
                "by namespace URI instead (nsu=<uri>; in node_id, namespace_uri for browse paths), "
                "which follows a renumbering",
                self._info.name,
                self._endpoint,
                index,
                f"the URI it held is index {namespaces.index(was)} now"
                if was in namespaces
                else "the URI it held is gone",
                index,
            )

    def set_device(self, server_uri: str) -> str:
        """The server identity for Stream.device; a different server at the same endpoint is logged."""
        device = f"{server_uri} at {self._endpoint}"
        if self._device is not None and device != self._device:
            log.warning(
                "opcua %s %s: the server now identifies as %s (was %s): a different PLC; its streams start afresh",
                self._info.name,
                self._endpoint,
                server_uri,
                self._device,
            )
        self._device = device
        return device


class _Connection:
    """One connection: client, session, subscription; created and thrown away per attempt.

    Client handles and monitored item ids belong to one session, so they live here, keyed by the
    item's index, and die with the connection: a handle remembered from a previous session would
    name another node in this one.
    """

    def __init__(self, driver: OpcUaDriver, sink: SampleSink) -> None:
        self.d = driver
        self.cfg = driver._cfg
        self.sink = sink
        self.client: Client | None = None
        self.sub: _Feed | None = None
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.verify_now = False
        self.by_handle: dict[int, _Item] = {}  # client handle -> item, this session only
        self.handle_of: dict[int, int] = {}  # item index -> its client handle in this session
        self.monitored_id: dict[int, int] = {}  # item index -> its monitored item id in this session
        self.next_handle = 1
        self.ns_array: list[str] = []
        self.device = ""
        cfg = self.cfg
        max_age = (
            max(2 * cfg.publishing_interval_ms, cfg.queue_size * cfg.sampling_interval_ms) / 1000.0 + 1.0
        )
        self.stamper = Stamper(max_age)
        self.last_publish = time.monotonic()
        # When a publish response (data or keep-alive) last confirmed the subscription alive.
        self.confirmed = -math.inf
        self.src_lag: float | None = None
        self.srv_lag: float | None = None
        self.untrusted_ts = 0
        self.restamp_said = False
        self.restamped = 0  # changes stamped before their node was confirmed unchanged, since the last report
        self.held = 0  # samples held since the last report
        self.publishing_s = cfg.publishing_interval_ms / 1000.0  # as the server revised it
        # Nodes whose value on the server differs from what their monitored item delivered, by
        # item index: (the item, its newest delivered sample then, the value read, when read).
        self.probes: dict[int, tuple[_Item, Sample, float, float]] = {}
        self.stale: list[_Item] = []  # monitored items found deaf, created again at the next check
        self.next_clock_report = time.monotonic() + cfg.diagnostics_every_s

    @property
    def good_count(self) -> int:
        """Nodes verified and monitored in this session, with their values delivered."""
        return sum(
            1
            for item in self.d.items
            if item.state == "good" and self.by_handle.get(self.handle_of.get(item.index, 0)) is item
        )

    async def _call(self, what: str, aw: Awaitable[_T], factor: float = 1.0) -> _T:
        bound = self.cfg.request_timeout_s * factor
        with self.d.pulse.waiting(what, bound):
            return await bounded(what, bound, aw)

    # ---- opening -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check security, resolve and verify every node, subscribe."""
        cfg = self.cfg
        # connect() bounds each of its server calls (endpoints, certificates, connect at 2x).
        with self.d.pulse.waiting("connecting", cfg.request_timeout_s * 6 + CLOSE_DEADLINE_S + KEY_WORK_S):
            self.client = client = await connect(
                self.d.connect_options,
                watchdog_s=min(5.0, cfg.keepalive_timeout_s / 2),
                session_timeout_ms=max(60_000, int(cfg.keepalive_timeout_s * 3000)),
                on_lost=self._on_connection_lost,
            )
        ns_node = client.get_node(node_id(ObjectIds.Server_NamespaceArray))
        server_array = client.get_node(node_id(ObjectIds.Server_ServerArray))
        ns_array, servers = await self._call("read namespaces", client.read_values([ns_node, server_array]))
        self.ns_array = list(ns_array or [])
        self.d.see_namespaces(self.ns_array)
        server_uri = servers[0] if servers else "unknown-server"
        self.device = self.d.set_device(str(server_uri))
        await self._subscribe()
        await self._resolve(self.d.items)

    async def _subscribe(self) -> None:
        cfg = self.cfg
        assert self.client is not None
        keepalive_count = max(1, math.ceil(cfg.keepalive_timeout_s * 1000 / 3 / cfg.publishing_interval_ms))
        # Keep-alives confirm that the quiet nodes still hold their values: at least every
        # CONFIRM_EVERY_S (one small message); the lifetime stays what the timeout asks for.
        confirm_count = max(
            1,
            math.ceil(min(cfg.keepalive_timeout_s / 3, CONFIRM_EVERY_S) * 1000 / cfg.publishing_interval_ms),
        )
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=cfg.publishing_interval_ms,
            RequestedLifetimeCount=keepalive_count * 6,
            RequestedMaxKeepAliveCount=confirm_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        sub = _Feed(self.client.uaclient.session, params)
        sub.on_publish = self._on_publish
        self.sub = sub
        try:
            result = await self._call("create subscription", sub.init())
        except UaStatusCodeError as exc:
            raise LinkLost(f"create subscription: {status_token(exc.code)}") from exc
        self.last_publish = time.monotonic()
        self.publishing_s = result.RevisedPublishingInterval / 1000.0
        if result.RevisedPublishingInterval != cfg.publishing_interval_ms:
            log.info(
                "opcua %s %s: server revised the publishing interval to %g ms",
                self.d._info.name,
                self.d._endpoint,
                result.RevisedPublishingInterval,
            )

    # ---- resolving and verifying nodes ---------------------------------------------------------

    def _parse_node_id(self, text: str) -> ua.NodeId:
        if text.startswith("nsu="):
            uri, _, rest = text[4:].partition(";")
            if uri not in self.ns_array:
                raise LookupError(uri)
            text = f"ns={self.ns_array.index(uri)};{rest}"
        return ua.NodeId.from_string(text)

    def _namespace_index(self, ns: int | None) -> int:
        if ns is not None:
            return ns
        uri = self.cfg.namespace_uri or ""
        if uri not in self.ns_array:
            raise LookupError(uri)
        return self.ns_array.index(uri)

    async def _resolve(self, items: Sequence[_Item], gone: Mapping[int, str] | None = None) -> None:
        """Find, check and monitor ``items``: NodeIds, data types, units, monitored items.

        ``gone``: the status of each node (by index) whose NodeId vanished, reported if its browse
        path now finds nothing.
        """
        gone = gone or {}
        assert self.client is not None
        client = self.client
        found: list[_Item] = []
        by_path: list[tuple[_Item, ua.BrowsePath]] = []
        for item in items:
            spec = item.spec
            try:
                if spec.node_id is not None:
                    item.node_id = self._parse_node_id(spec.node_id)
                    found.append(item)
                    continue
                assert spec.browse_path is not None
                elements = [
                    ua.RelativePathElement(
                        ReferenceTypeId=node_id(HIERARCHICAL_REFERENCES),
                        IsInverse=UA_FALSE,
                        IncludeSubtypes=UA_TRUE,
                        TargetName=ua.QualifiedName(seg.name, self._namespace_index(seg.ns)),
                    )
                    for seg in parse_browse_path(spec.browse_path)
                ]
            except LookupError:
                self._bad(item, "bad_namespaceunknown")
                continue
            except (ValueError, UaError):
                self._bad(item, "bad_nodeidinvalid")
                continue
            path = ua.BrowsePath(
                StartingNode=node_id(OBJECTS_FOLDER), RelativePath=ua.RelativePath(Elements=elements)
            )
            by_path.append((item, path))
        if by_path:
            results = await self._call(
                "translate browse paths",
                client.uaclient.translate_browsepaths_to_nodeids([p for _, p in by_path]),
                factor=2.0,
            )
            for (item, _), res in zip(by_path, results, strict=True):
                if not res.StatusCode.is_good():
                    self._bad(item, gone.get(item.index) or status_token(res.StatusCode.value))
                elif not res.Targets:
                    self._bad(item, gone.get(item.index, "bad_nomatch"))
                else:
                    item.node_id = res.Targets[0].TargetId
                    found.append(item)
        checked = await self._check_attributes(found)
        await self._read_units(checked)
        await self._monitor(checked)

    async def _read(self, reads: list[ua.ReadValueId], what: str) -> list[ua.DataValue]:
        assert self.client is not None
        if not reads:
            return []
        params = ua.ReadParameters(NodesToRead=reads, TimestampsToReturn=ua.TimestampsToReturn.Neither)
        return await self._call(what, self.client.uaclient.read(params), factor=2.0)

    async def _check_attributes(self, items: Sequence[_Item]) -> list[_Item]:
        """NodeClass, DataType and (for names) BrowseName of each node, in one Read; the good ones."""
        attrs = (AttributeIds.NodeClass, AttributeIds.DataType, AttributeIds.BrowseName)
        reads = [ua.ReadValueId(NodeId=item.node_id, AttributeId=attr) for item in items for attr in attrs]
        values = await self._read(reads, "read node attributes")
        passed = []
        for n, item in enumerate(items):
            node_class, data_type, browse_name = values[3 * n : 3 * n + 3]
            if not node_class.StatusCode or not node_class.StatusCode.is_good():
                self._bad(
                    item, status_token(node_class.StatusCode.value if node_class.StatusCode else 0x80000000)
                )
                continue
            if node_class.Value is None or node_class.Value.Value != ua.NodeClass.Variable:
                self._bad(item, "bad_nodeclassinvalid")
                continue
            dt = data_type.Value.Value if data_type.Value is not None else None
            if not isinstance(dt, ua.NodeId) or (
                dt.NamespaceIndex == 0 and dt.Identifier not in NUMERIC_TYPES
            ):
                self._bad(item, "bad_typemismatch")
                continue
            item.data_type = dt
            if item.name is None:
                bn = browse_name.Value.Value if browse_name.Value is not None else None
                if isinstance(bn, ua.QualifiedName) and bn.Name:
                    item.name = clean_name(bn.Name)
            passed.append(item)
        return passed

    async def _read_units(self, items: Sequence[_Item]) -> None:
        """EUInformation of each node that has an EngineeringUnits property."""
        assert self.client is not None
        wanted = [item for item in items if item.spec.unit is None]
        if not wanted:
            return
        paths = [
            ua.BrowsePath(
                StartingNode=item.node_id,
                RelativePath=ua.RelativePath(
                    Elements=[
                        ua.RelativePathElement(
                            ReferenceTypeId=node_id(HAS_PROPERTY),
                            IsInverse=UA_FALSE,
                            IncludeSubtypes=UA_TRUE,
                            TargetName=ua.QualifiedName("EngineeringUnits", 0),
                        )
                    ]
                ),
            )
            for item in wanted
        ]
        results = await self._call(
            "find engineering units", self.client.uaclient.translate_browsepaths_to_nodeids(paths), factor=2.0
        )
        with_eu = [
            (item, res.Targets[0].TargetId)
            for item, res in zip(wanted, results, strict=True)
            if res.StatusCode.is_good() and res.Targets
        ]
        values = await self._read(
            [ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value) for _, node in with_eu],
            "read engineering units",
        )
        for (item, _), dv in zip(with_eu, values, strict=True):
            eu = dv.Value.Value if dv.Value is not None else None
            if isinstance(eu, ua.EUInformation) and eu.DisplayName.Text:
                item.unit = eu.DisplayName.Text

    def _filter(self, spec: NodeSpec) -> ua.DataChangeFilter | None:
        kind = spec.deadband or self.cfg.deadband
        if kind == "none":
            return None
        value = spec.deadband_value if spec.deadband_value is not None else self.cfg.deadband_value
        return ua.DataChangeFilter(
            Trigger=ua.DataChangeTrigger.StatusValue,
            DeadbandType=1 if kind == "absolute" else 2,
            DeadbandValue=value,
        )

    async def _monitor(self, items: Sequence[_Item]) -> None:
        """Create the monitored items of ``items``; their streams follow the server's revised intervals.

        Values that arrive before the server's answer (the first values may) are kept on the item
        and handed over on the stream built from the answer, so no stream is made twice.
        """
        if not items:
            return
        assert self.sub is not None
        assert self.client is not None
        cfg = self.cfg
        requests = []
        for item in items:
            spec = item.spec
            handle = self.next_handle
            self.next_handle += 1
            self.handle_of[item.index] = handle
            self.by_handle[handle] = item
            item.last = None  # a new monitored item: nothing to hold until its first value
            item.hold_from = math.inf
            item.early = []
            params = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=requested_ms(item.spec, cfg),
                QueueSize=spec.queue_size or cfg.queue_size,
                DiscardOldest=True,
            )
            flt = self._filter(spec)
            if flt is not None:
                params.Filter = flt
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(NodeId=item.node_id, AttributeId=AttributeIds.Value),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=params,
                )
            )
        # The service itself, not asyncua's Subscription wrapper: that one drops the revised
        # sampling intervals, and this driver dispatches notifications by its own handles.
        create = ua.CreateMonitoredItemsParameters(
            SubscriptionId=self.sub.subscription_id,
            ItemsToCreate=requests,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
        )
        try:
            results = await self._call(
                "create monitored items", self.client.uaclient.create_monitored_items(create), factor=2.0
            )
        except UaStatusCodeError as exc:
            raise LinkLost(f"create monitored items: {status_token(exc.code)}") from exc
        finally:
            early = [item.early or [] for item in items]
            for item in items:
                item.early = None
        created = time.monotonic()
        revised: dict[tuple[float, float], list[_Item]] = {}
        for item, res, first in zip(items, results, early, strict=True):
            if not res.StatusCode.is_good():
                self._bad(item, status_token(res.StatusCode.value))
                continue
            self.monitored_id[item.index] = res.MonitoredItemId
            got = float(res.RevisedSamplingInterval)
            asked = requested_ms(item.spec, cfg)
            if got not in (item.revised_ms, asked):
                revised.setdefault((asked, got), []).append(item)
            item.revised_ms = got
            item.hold_from = created
            stream = self.d.stream_for(item, self.device)
            for t_mono, t_wall, value, quality in first:
                sample = Sample(stream, t_mono, t_wall, value, Quality(quality))
                self.sink.put(sample)
                item.last = sample
            self.d.set_health(item, "good")
        for (asked, got), which in revised.items():
            log.info(
                "opcua %s %s: the server samples %d node(s) every %g ms, not the %g ms asked (%s%s): %s",
                self.d._info.name,
                self.d._endpoint,
                len(which),
                got,
                asked,
                which[0].spec.address,
                ", ..." if len(which) > 1 else "",
                f"their nominal rate is {which[0].stream.rate_hz if which[0].stream else None} Hz"
                if got > 0
                else "0 is its fastest: the interval asked stays their nominal rate",
            )

    def _forget(self, item: _Item) -> int | None:
        """Stop delivering ``item``'s values; its monitored item id in this session, if any."""
        handle = self.handle_of.pop(item.index, None)
        if handle is not None:
            self.by_handle.pop(handle, None)
        return self.monitored_id.pop(item.index, None)

    def _bad(self, item: _Item, token: str) -> None:
        self._forget(item)
        self.d.set_health(item, token)

    async def _unmonitor(self, items: Sequence[_Item]) -> None:
        ids = [mid for mid in (self._forget(item) for item in items) if mid is not None]
        if ids and self.sub is not None and self.client is not None:
            params = ua.DeleteMonitoredItemsParameters(
                SubscriptionId=self.sub.subscription_id, MonitoredItemIds=ids
            )
            # Best effort: a node that vanished may already have taken its monitored item along.
            with contextlib.suppress(UaError):
                await self._call(
                    "delete monitored items", self.client.uaclient.delete_monitored_items(params)
                )

    async def verify(self) -> None:
        """Check every good node still exists with the same data type and is heard; retry the bad ones."""
        good = [item for item in self.d.items if item.state == "good"]
        attrs = (AttributeIds.DataType, AttributeIds.Value)
        reads = [ua.ReadValueId(NodeId=item.node_id, AttributeId=attr) for item in good for attr in attrs]
        values = await self._read(reads, "verify nodes")
        read_at = time.monotonic()
        changed: list[_Item] = []
        gone: dict[int, str] = {}  # nodes by browse path whose NodeId is unknown now, by index: the status
        for n, item in enumerate(good):
            dv, now = values[2 * n], values[2 * n + 1]
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                token = status_token(dv.StatusCode.value)
                if item.spec.browse_path is not None and token in _GONE_TOKENS:
                    # Its path may lead to the node recreated under a new NodeId (a PLC program
                    # download): no fault unless it leads nowhere, then with this status.
                    gone[item.index] = token
                    changed.append(item)
                    continue
                await self._unmonitor([item])
                self._bad(item, token)
                continue
            dt = dv.Value.Value if dv.Value is not None else None
            if dt != item.data_type:
                log.info(
                    "opcua %s %s: node %s changed data type to %s; monitoring it again",
                    self.d._info.name,
                    self.d._endpoint,
                    item.spec.address,
                    dt,
                )
                changed.append(item)
            else:
                self._probe(item, now, read_at)
        stale, self.stale = self.stale, []
        retry = [item for item in self.d.items if item.state != "good" or item in changed or item in stale]
        # Changed nodes, and nodes found bad in a publish, may still hold a monitored item here.
        await self._unmonitor([item for item in retry if item.index in self.monitored_id])
        if retry:
            for item in retry:
                if item.spec.browse_path is not None:
                    item.node_id = None  # re-resolve: the path may lead elsewhere now
            await self._resolve(retry, gone)
        for item in retry:
            if item.index in gone and item.state == "good":
                log.info(
                    "opcua %s %s: node %s was recreated under another NodeId; its browse path follows it",
                    self.d._info.name,
                    self.d._endpoint,
                    item.spec.address,
                )

    def _probe(self, item: _Item, dv: ua.DataValue, read_at: float) -> None:
        """Note ``item`` when the server holds a value its monitored item has not delivered.

        A node deleted and created again under the same NodeId (a PLC program download) leaves
        the old monitored item deaf: the server may say nothing to it, and every publish response
        then confirms the old value unchanged, held as if the tag held still.  The value read
        settles it: delivered within a publish (``_judge_probes``), or the item is deaf.
        """
        last = item.last
        if (
            last is None
            or item.index in self.probes
            or self.by_handle.get(self.handle_of.get(item.index, 0)) is not item
        ):
            return
        if dv.StatusCode is not None and not dv.StatusCode.is_good():
            return  # a bad or uncertain value is no figure to compare
        value = to_float(dv.Value.Value if dv.Value is not None else None)
        tolerance = self._tolerance(item.spec)
        if value is None or tolerance is None:
            return
        if not last.quality & _BAD and abs(value - last.value) <= tolerance:
            return
        self.probes[item.index] = (item, last, value, read_at)

    def _tolerance(self, spec: NodeSpec) -> float | None:
        """How far a node's value may move unreported: its absolute deadband; None when unknown (percent)."""
        kind = spec.deadband or self.cfg.deadband
        if kind == "none":
            return 0.0
        if kind == "absolute":
            return spec.deadband_value if spec.deadband_value is not None else self.cfg.deadband_value
        return None

    def _judge_probes(self) -> None:
        """A probed node delivered since (alive), or a later publish response left it out: deaf."""
        for index, (item, last, value, read_at) in list(self.probes.items()):
            if item.last is not last or self.by_handle.get(self.handle_of.get(index, 0)) is not item:
                del self.probes[index]
                continue
            due = read_at + (item.revised_ms or 0.0) / 1000.0 + 2 * self.publishing_s + PROBE_MARGIN_S
            if self.confirmed <= due:
                continue
            del self.probes[index]
            log.warning(
                "opcua %s %s: node %s reads %g on the server, but its monitored item delivered %g last "
                "and the subscription confirms it unchanged: the node was replaced under the same NodeId "
                "(a PLC program download) without its monitored item being told; monitoring it again",
                self.d._info.name,
                self.d._endpoint,
                item.spec.address,
                value,
                last.value,
            )
            self.stale.append(item)
            self.verify_now = True

    # ---- streaming ---------------------------------------------------------------------------

    async def stream(self) -> None:
        """Wait for loss, hold quiet values, re-verify on schedule; raise LinkLost when the connection is gone."""
        cfg = self.cfg
        next_verify = time.monotonic() + cfg.verify_interval_s
        tick = min(HOLD_TICK_S, cfg.keepalive_timeout_s / 4)
        while True:
            # The loop that enforces the publish bound turns: the driver is alive (a server that
            # stops publishing is caught by keepalive_timeout_s below, not by the supervisor).
            self.d.pulse.beat()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self.lost.wait()
            self.hold()
            if self.probes:
                self._judge_probes()
            if self.d.unproven:  # empty once every node delivered a usable value in this run
                self.d.first_data()
            if self.lost.is_set():
                raise LinkLost(self.lost_reason)
            now = time.monotonic()
            if now - self.last_publish > cfg.keepalive_timeout_s:
                raise LinkLost(f"no publish response for {now - self.last_publish:.1f} s")
            if now >= next_verify or self.verify_now:
                self.verify_now = False
                next_verify = now + cfg.verify_interval_s
                await self.verify()
            if now >= self.next_clock_report:
                self.next_clock_report = now + cfg.diagnostics_every_s
                self._report_clock()

    def hold(self, *, final: bool = False) -> None:
        """Hand over the held value of every quiet report-by-exception node, up to the last confirmation.

        With no deadband the server reports a node only when its value (or status) changes, and
        a publish response - data or keep-alive - that ends a notification sequence (no
        ``MoreNotifications``) confirms that every node it does not mention is unchanged.  So each sampling tick a live subscription has confirmed is a sample of the
        held value, as a regular sampler would have taken it: the windows are whole, a held level
        weighs by its duration, and a tag that holds still is not lost.  Ticks are held only up
        to the last publish response less one sampling interval and ``HOLD_LAG_S`` (a change
        still in flight must be able to land after them); a change that lands first is preceded
        by the ticks its old value held (``_hold_before``, on the hot path).  When the connection
        ends (``final``) nothing can land any more: the ticks up to the last response itself and
        the value at that instant are held, so a quiet node falls silent with the changing ones
        (one outage of the PLC, not a lost tag first).  Nothing is held after it: the loss shows
        as gaps and ``SENSOR_LOST`` as for any stream.
        """
        confirmed = self.confirmed if final else self.confirmed - HOLD_LAG_S
        items: Iterable[_Item] = self.by_handle.values()
        if not final:
            # A node is due only when two ticks fit after its newest sample: one comparison per
            # node finds them (with thousands of changing nodes this scan is the whole cost).
            items = [item for item in items if item.last_t_mono + item.hold_span <= confirmed]
        if self.probes:
            # A value the server holds and the node did not deliver: its old one is not held on.
            items = [item for item in items if item.index not in self.probes]
        for item in items:
            dt = item.hold_dt
            last = item.last
            if not dt or last is None:
                continue
            # The first tick held is one after the newest sample, and not before the item existed.
            t0 = max(item.last_t_mono, item.hold_from - dt)
            n = math.floor((confirmed - t0) / dt) - (0 if final else 1)
            if n >= 1:
                self._hold_ticks(item, last, t0, n)
            if final and confirmed > item.last_t_mono:
                # The value as last confirmed, at that instant (off the tick grid, at most one
                # sample more): the node falls silent when the changing ones do, not a tick before.
                t = item.last_t_mono = confirmed
                self.sink.put(
                    Sample(last.stream, t, last.t_wall + (t - last.t_mono), last.value, last.quality)
                )
                item.held += 1
                self.held += 1

    def restamp(self, item: _Item, t_mono: float, floor: float) -> tuple[float, float]:
        """``t_mono``, ``t_wall`` of a change stamped at ``t_mono``, before ``floor``: what its node was held to.

        The publish response before this one confirmed the node unchanged up to ``floor`` (the
        held ticks end there), so a change stamped earlier is not that old: its stamp is off by
        a clock (a PLC-stamped node's clock set the connection's correction and a server-stamped
        one is judged by it, or the PLC's clock stepped back within ``clock_tolerance_s``).  It is
        placed at ``floor``, the earliest time it can have, its wall time following the node's
        last value as the held ticks do: it lands after them, within a publish of its arrival,
        and neither clock runs backwards.
        """
        last = item.last
        assert last is not None
        if not self.restamp_said:
            self.restamp_said = True
            log.info(
                "opcua %s %s: node %s has a change stamped %.2f s before the server confirmed it "
                "unchanged (a PLC clock behind the server's or stepped back): such changes are placed "
                "at that confirmation; opcua_clock counts them as restamped",
                self.d._info.name,
                self.d._endpoint,
                item.spec.address,
                floor - t_mono,
            )
        self.restamped += 1
        return floor, last.t_wall + (floor - last.t_mono)

    def _hold_before(self, item: _Item, t_mono: float) -> None:
        """The ticks a quiet node held its value for before a change at ``t_mono`` (this session)."""
        last = item.last
        if last is None:
            return
        dt = item.hold_dt
        t0 = max(item.last_t_mono, item.hold_from - dt)
        # Every tick up to half a tick before the change: a sampler would have read the old value.
        n = math.floor((t_mono - t0) / dt - 0.5)
        if n >= 1:
            self._hold_ticks(item, last, t0, n)

    def _hold_ticks(self, item: _Item, last: Sample, t0: float, n: int) -> None:
        """Hand over ``n`` samples of ``last``'s value, one sampling interval apart after ``t0``."""
        dt = item.hold_dt
        item.held += n
        self.held += n
        item.last_t_mono = t0 + n * dt
        wall0 = last.t_wall + (t0 - last.t_mono)
        if n < HOLD_BLOCK_MIN:
            put = self.sink.put
            for k in range(1, n + 1):
                put(Sample(last.stream, t0 + k * dt, wall0 + k * dt, last.value, last.quality))
            return
        ticks = np.arange(1, n + 1, dtype=np.float64) * dt
        self.sink.put_block(
            SampleBlock(
                last.stream,
                ticks + t0,
                ticks + wall0,
                np.full(n, last.value),
                np.full(n, int(last.quality), np.uint8),
            )
        )

    def _report_clock(self) -> None:
        detail: dict[str, float | str] = {
            "untrusted_timestamps": self.untrusted_ts,
            "restamped": self.restamped,
        }
        self.restamped = 0
        if self.src_lag is not None:
            detail["source_lag_s"] = round(self.src_lag, 3)
        if self.srv_lag is not None:
            detail["server_lag_s"] = round(self.srv_lag, 3)
        self.untrusted_ts = 0
        self.sink.diagnostic(Diagnostic("opcua_clock", self.d._info.subject, time.time(), detail))
        items = [item for item in self.by_handle.values() if item.hold_dt]
        if items:
            # What tells a quiet tag from a lost one: it is held (confirmed unchanged), not silent.
            quiet = sum(1 for item in items if item.held != item.held_reported)
            for item in items:
                item.held_reported = item.held
            held = {"held": self.held, "held_nodes": quiet, "by_exception": len(items)}
            self.held = 0
            self.sink.diagnostic(Diagnostic("opcua_hold", self.d._info.subject, time.time(), held))

    async def _on_connection_lost(self, exc: Exception) -> None:
        self._lose(f"connection lost: {exc.__class__.__name__}")

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    def _on_publish(self, result: ua.PublishResult) -> None:
        """The hot path: one publish response -> samples, synchronously."""
        confirmed = self.confirmed
        self.last_publish = now = time.monotonic()
        if not result.MoreNotifications:
            # Only the response that ends a notification sequence says the nodes it leaves out
            # are unchanged: before it, the server still holds changes, maybe of those nodes.
            self.confirmed = now
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        recv_mono = time.monotonic()
        recv_wall = time.time()
        stamper = self.stamper
        stamper.batch(recv_wall)
        by_handle = self.by_handle
        put = self.sink.put
        tol = self.cfg.clock_tolerance_s
        count = 0
        for notif in data:
            if type(notif) is not ua.DataChangeNotification:
                if isinstance(notif, ua.StatusChangeNotification):
                    # The subscription ends (asyncua also says so when the socket closes): it
                    # confirms nothing.
                    self.confirmed = confirmed
                    self._lose(f"subscription status {status_token(notif.Status.value)}")
                continue
            for mi in notif.MonitoredItems:
                item = by_handle.get(mi.ClientHandle)
                if item is None:
                    continue  # a monitored item being replaced; its last values are of no use
                dv = mi.Value
                code = dv.StatusCode
                status = code.value if code is not None else 0
                variant = dv.Value
                raw = variant.Value if variant is not None else None
                if status == 0 and type(raw) is float:
                    value: float = raw
                    quality = 0
                else:
                    quality = int(quality_of(status))
                    if quality & _BAD:
                        value = _NAN
                        if status & 0xFFFF0000 in _NODE_GONE:
                            self.verify_now = True
                    else:
                        number = to_float(raw)
                        if number is None:
                            # A value that is not a single number: the node changed under us.
                            self.verify_now = True
                            self.d.set_health(item, "bad_typemismatch")
                            by_handle.pop(mi.ClientHandle, None)  # its monitored item goes at the check
                            continue
                        value = number
                ts = None
                src = dv.SourceTimestamp
                if src is not None:
                    s = src.timestamp()
                    self.src_lag = recv_wall - s
                    if -tol <= recv_wall - s <= tol:
                        ts = s
                srv = dv.ServerTimestamp
                if srv is not None:
                    s = srv.timestamp()
                    self.srv_lag = recv_wall - s
                    if ts is None and -tol <= recv_wall - s <= tol:
                        ts = s
                if ts is None:
                    t_wall = recv_wall
                    t_mono = recv_mono
                    if src is not None or srv is not None:
                        self.untrusted_ts += 1
                else:
                    t_wall = ts
                    t_mono = recv_mono - stamper.age(ts, recv_wall)
                if t_mono < confirmed - item.hold_lag and item.last is not None:
                    t_mono, t_wall = self.restamp(item, t_mono, confirmed - item.hold_lag)
                last_t = item.last_t_mono
                if t_mono <= last_t:
                    # Not before the newest sample handed over: at its instant, and its wall time.
                    t_mono = last_t
                    if item.last is not None:
                        t_wall = item.last.t_wall + (last_t - item.last.t_mono)
                elif t_mono - last_t > item.hold_gap:
                    # A quiet node changed: its value held until now, before the change lands.
                    self._hold_before(item, t_mono)
                item.last_t_mono = t_mono
                count += 1
                early = item.early
                if early is not None:  # its monitored item is being created: no stream yet
                    early.append((t_mono, t_wall, value, quality))
                    continue
                stream = item.stream
                assert stream is not None
                sample = Sample(stream, t_mono, t_wall, value, Quality(quality) if quality else Quality.GOOD)
                put(sample)
                item.last = sample
        self.d.samples += count
        self.d.notifications += 1

    # ---- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Drop the session and socket, bounded and shielded: never holds a reconnect or a stop."""
        # The quiet nodes' values held up to the last publish response, and not a tick after it.
        self.hold(final=True)
        client = self.client
        if client is None:
            return
        self.client = None
        self.by_handle.clear()
        self.handle_of.clear()
        self.monitored_id.clear()
        await abandon(client)


def factory(info: SourceInfo, cfg: OpcUaConfig) -> OpcUaDriver:
    """Build an OPC UA driver (asyncua imported only now)."""
    if info.kind != "industrial":
        raise ConfigError(
            f'opcua source {info.name}: kind {info.kind!r}: OPC UA sources measure machines: set kind = "industrial"'
        )
    quiet_asyncua()
    return OpcUaDriver(info, cfg)


__all__ = ["LinkLost", "OpcUaDriver", "factory"]
