"""The Sparkplug B edge node: session state machine and store-and-forward on the uplink's connection.

Per connection (:class:`~gateway.uplink.connection.Connection`, the same transport, TLS and
staged timeouts as the SenML uplink):

1. CONNECT with clean start and an NDEATH Will (QoS 1, not retained) carrying the next bdSeq,
   written to the state directory (in a worker thread, awaited) before the CONNECT goes out.
2. Subscribe to NCMD (and DCMD) and, with a primary host configured, to its STATE; wait for
   STATE online before anything is published.
3. NBIRTH (seq 0, bdSeq, ``Node Control/Rebirth``, every node metric) then one DBIRTH per device.
4. Records leave the outbox as NDATA/DDATA: report by exception for live records, everything for
   the backlog, which is marked ``is_historical`` with the records' own timestamps.  Data is
   published at QoS 1 and a record is deleted from the outbox only on its PUBACK (the
   specification's QoS 0 would lose records on a cut link; see ``docs/sparkplug.md``).  Once
   born, a live alarm is handed over by the commit that makes it durable (no lease of its own).
5. A new metric or device, a rebirth command or a device back from the dead: a complete birth
   sequence again (same bdSeq).  A device whose every sensor is lost: DDEATH.  An alarm metric
   is on while any condition under it is (``codec.fold``): the conditions the host was told are
   on are kept with the catalog, and those the alarm ledger holds are taken at the start
   (:meth:`SparkplugNode.carry`), so every birth, after a restart too, says which are on.
6. Primary host offline, or the gateway stopping: NDEATH, then DISCONNECT; reconnect (bdSeq + 1).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway import backoff
from gateway.anonymize import Anonymizer
from gateway.cleanup import cancel_requested, run_shielded
from gateway.contracts import Lane
from gateway.errors import AnonymizationError, ConfigError, EdgetwinError, TransientError
from gateway.liveness import Heartbeat
from gateway.outbox import AsyncOutbox, Leased
from gateway.records import AlarmRecord, FeaturesWindow, Record, RecordError
from gateway.records import decode as decode_record
from gateway.uplink import transport
from gateway.uplink.config import MqttSection
from gateway.uplink.connection import Connection, Session
from gateway.uplink.pacing import Pacer
from gateway.uplink.profiles import PROFILES
from gateway.uplink.sparkplug import codec
from gateway.uplink.sparkplug.codec import Point
from gateway.uplink.sparkplug.config import SparkplugSection
from gateway.uplink.sparkplug.state import NODE, Catalog

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
_CLEANUP_DEADLINE_S = 5.0
_GOODBYE_WAIT_S = 1.0
_ACK_STALL_S = 15.0

# An alarm's metric (``Alarms/<family>/<what>``) and the conditions on under it; None: not an alarm.
_Holding = tuple[str, dict[str, codec.Held]] | None


class HostOfflineError(TransientError):
    """The primary host application said it is offline: this session ends."""


@dataclasses.dataclass(slots=True)
class NodeCounters:
    """What the edge node did since it was created."""

    connects: int = 0
    births: int = 0  # complete birth sequences (NBIRTH and its DBIRTHs)
    published: int = 0  # NDATA / DDATA messages
    historical: int = 0  # of which replayed from the backlog
    acked: int = 0  # records deleted from the outbox after their PUBACK
    unchanged: int = 0  # live records whose values were all already reported (report by exception)
    dead_lettered: int = 0
    ddeaths: int = 0
    rebirth_requests: int = 0
    messages: int = 0  # births, data and DDEATH published (NDEATH not counted: usually the broker's)


def _now_ms() -> int:
    return int(time.time() * 1000)


class SparkplugNode:
    """Delivers the outbox as a Sparkplug B edge node; see the module docstring for the contract."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        config: MqttSection,
        sparkplug: SparkplugSection,
        gateway_id: str,
        *,
        anonymizer: Anonymizer,
        state_dir: Path | None,
        password: str | None = None,
    ) -> None:
        self._outbox = outbox
        self._cfg = config
        self._sp = sparkplug
        self.group = codec.check_id("group_id", sparkplug.group_id)
        self.node_id = codec.check_id("edge_node_id", sparkplug.edge_node_id or gateway_id)
        # The fail-closed identity scan (raises AnonymizationError) over topics, names and payloads.
        self._anon = anonymizer
        self.catalog = Catalog.load(state_dir / "sparkplug.json" if state_dir is not None else None)
        # The Will is never retained (NDEATH); the rest of the profile (limits, pacing) applies.
        profile = dataclasses.replace(PROFILES[config.profile], retain=False)
        self._connection = Connection(
            config, profile, self.node_id, password=password, will=self._will, bounded=self._bounded
        )
        self._heart = Heartbeat(stale_after_s=30.0)
        self.pulse = self._heart.pulse
        self.problem: str | None = "not connected yet"
        self.connected = False
        self.counters = NodeCounters()
        self.delivered = 0
        self.bdseq = -1  # of the current connection
        self.seq = 0  # of the last message published
        self.backlog_through = 0
        self._session: Session | None = None
        # Alarms a commit leased and handed over (see _take_alarms), not yet in a round of _deliver.
        self._handed: list[Leased] = []
        self._last: dict[tuple[str, str], tuple[codec.Value, int]] = {}  # reported values
        self._held_unsaved = False  # conditions held changed since the catalog was last written
        self._replayed_alarms = False  # alarms replayed as history since the host was last told what is on
        # Sparkplug device -> its sensors' pseudonyms -> the stream metrics each delivers.
        self._devs: dict[str, dict[str, set[str]]] = collections.defaultdict(dict)
        self._lost: dict[str, set[str]] = collections.defaultdict(set)
        self._dead: set[str] = set()  # devices whose DDEATH was sent
        self._host_ts = -1  # timestamp of the newest STATE seen from the primary host
        self._replay = Pacer(config.replay_msgs_per_s, config.replay_bytes_per_s, now=time.monotonic())

    def carry(self, records: Iterable[AlarmRecord]) -> None:
        """Conditions on at the gateway's start (raises as its alarm ledger keeps them): on at the births.

        The gateway resumes a condition carried over a restart without raising it again; a node
        whose state does not hold it (a new or set-aside ``sparkplug.json``) learns it here.  Only
        adds: an ending still queued reaches the node in its turn.
        """
        for rec in records:
            holding = self._holding(rec)
            key = rec.subject if rec.subject is not None else NODE
            if holding is None or holding[1] == self.catalog.holding(key, holding[0]):
                continue
            _, pts = codec.points(rec, holding[1])
            try:
                codec.check_id("device_id", key)
                self._anon.check_texts([key, *(p.name for p in pts), *(p.unit or "" for p in pts)])
            except (codec.SparkplugError, AnonymizationError) as exc:
                log.warning("sparkplug: a condition on at the start cannot be announced: %s", exc)
                continue
            # Written before the first CONNECT, with the bdSeq (see run).
            self.catalog.learn(key, pts)
            self.catalog.hold(key, *holding)

    # --- liveness, as the supervisor reads it ---------------------------------------------------------

    @property
    def last_beat(self) -> float:
        """Monotonic time of the last sign of life; "now" while inside a wait bounded by a timeout."""
        return self._heart.last_beat

    def _set_beat(self, now: float) -> None:
        self._heart.beat(now)

    def _bounded(self, what: str, seconds: float) -> contextlib.AbstractContextManager[None]:
        return self._heart.bounded(what, seconds)

    def describe(self) -> str:
        """``connected`` or ``degraded (why)``, for the STATUS line."""
        return "connected" if self.problem is None else f"degraded ({self.problem})"

    # --- topics -------------------------------------------------------------------------------------------

    def topic(self, message_type: str, device: str | None = None) -> str:
        """The topic of a message type (and device) of this node."""
        return codec.topic(self.group, message_type, self.node_id, device)

    def _will(self) -> tuple[str, bytes]:
        # Called once per CONNECT, after run has put this connection's bdSeq on disk.
        return self.topic("NDEATH"), codec.ndeath(self.bdseq, _now_ms())

    # --- the reconnect loop ---------------------------------------------------------------------------------

    async def run(self, started: Callable[[], None]) -> None:
        """Connect, be born, deliver, reconnect until cancelled."""
        where = f"sparkplug {self.group}/{self.node_id} via {transport.where(self._cfg)}"
        try:
            self._anon.check(self.topic("NBIRTH").encode())
        except AnonymizationError as exc:
            raise ConfigError(
                f"uplink.sparkplug: group_id {self.group!r} or edge_node_id names a host, subject or device "
                f"({exc}): nothing is published: choose ids that name none (the default edge_node_id "
                "is the gateway's pseudonym)"
            ) from exc
        started()
        attempt, reported = 0, ""
        while True:
            self._set_beat(time.monotonic())
            try:
                # This connection's bdSeq is on disk before a socket is opened (a restart after a
                # power cut never reuses the one the broker holds in our Will), written off the loop.
                self.bdseq = await self.catalog.next_bdseq()
                async with self._connection as session:
                    self.counters.connects += 1
                    if attempt or reported:
                        log.info("%s: connected again", where)
                    attempt, reported = 0, ""
                    await self._serve(session)
            except transport.AttemptError as exc:
                if cancel_requested():  # a stop that met a failure in the same moment: the stop wins
                    raise asyncio.CancelledError from exc
                attempt += 1
                self.problem = str(exc.cause)
                if transport.reported_as(exc.cause) != reported:
                    reported = transport.reported_as(exc.cause)
                    log.warning("%s: %s (records stay in the outbox)", where, exc.cause)
                else:
                    log.debug("%s: still cannot connect (attempt %d): %s", where, attempt, exc.cause)
            except EdgetwinError as exc:
                if cancel_requested():
                    raise asyncio.CancelledError from exc
                attempt += 1
                self.problem = str(exc)
                if str(exc) != reported:
                    reported = str(exc)
                    log.warning("%s: %s; records stay in the outbox, reconnecting", where, exc)
                else:
                    log.debug("%s: %s (again)", where, exc)
            await self._sleep(backoff.delay(attempt, self._cfg.reconnect_min_s, self._cfg.reconnect_max_s))

    async def _sleep(self, delay: float) -> None:
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            self._set_beat(time.monotonic())
            await asyncio.sleep(min(left, 1.0))

    async def drain(self, deadline: float) -> None:
        """Wait while connected until everything queued is acknowledged or the deadline passes."""
        while time.monotonic() < deadline:
            if self._session is None or not self._session.connected:
                return
            if (await self._outbox.stats()).queued == 0:
                return
            await asyncio.sleep(0.05)

    # --- one session ------------------------------------------------------------------------------------------

    async def _serve(self, session: Session) -> None:
        self._session = session
        # Every record this session leased and has neither acknowledged nor released: paho message
        # id -> outbox id once published, -id -> id until then.  _end releases whatever is left.
        inflight: dict[int, int] = {}
        graceful = False
        messages: collections.deque[tuple[str, bytes]] = collections.deque()
        subscribed = asyncio.Event()
        loop = session.loop

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            messages.append((msg.topic, bytes(msg.payload)))
            loop.call_soon_threadsafe(session.wake.set)

        def on_subscribe(*_args: Any) -> None:
            loop.call_soon_threadsafe(subscribed.set)

        client = session.client
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        try:
            # Commands first: subscribed before the NBIRTH (and before waiting for the host).
            subs = [(self.topic("NCMD"), 1), (self.topic("DCMD", "+"), 1)]
            if self._sp.primary_host is not None:
                subs.append((codec.state_topic(self._sp.primary_host), 1))
            client.subscribe(subs)
            if client.want_write():
                client.loop_write()
            with self._bounded("waiting for SUBACK", self._cfg.connect_timeout_s + 1.0):
                async with asyncio.timeout(self._cfg.connect_timeout_s):
                    await subscribed.wait()
            if self._sp.primary_host is not None:
                await self._wait_host_online(session, messages)
            # Everything queued before the births is history by the time the host sees it.
            self.backlog_through = await self._outbox.last_id()
            # The first records are read before the births, so what they carry is announced in the
            # first birth sequence rather than in a rebirth moments later.
            held = await self._lease(self._cfg.batch, inflight)
            for leased in held:
                learnable = self._prepare(leased)
                if isinstance(learnable, tuple) and self.catalog.learn(learnable[0], learnable[1]):
                    await self.catalog.write()
            self._birth(session)
            # Connected, for the status: born, so the host sees what the node publishes.
            self.connected, self.problem = True, None
            log.info(
                "sparkplug %s/%s: born (bdSeq %d), %d device(s); records up to %d replay as historical",
                self.group,
                self.node_id,
                self.bdseq,
                len(self.catalog.devices) - (NODE in self.catalog.devices),
                self.backlog_through,
            )
            for leased in held:
                await self._send(session, leased, inflight)
            await self._save_held()
            # From here an alarm's commit leases it and hands it over: it waits for no lease behind
            # the next commit of other records.  Those committed before are taken by a lease.
            self._handed = []
            self._outbox.hand_alarms_to(lambda alarms: self._take_alarms(session, alarms, inflight))
            await self._deliver(session, messages, inflight)
        except HostOfflineError:
            graceful = session.connected
            raise
        except asyncio.CancelledError:
            graceful = session.connected
            raise
        except TimeoutError as exc:
            raise TransientError("no SUBACK in time: reconnecting") from exc
        finally:
            # Alarms committed from now on are leased by the next session; those handed over until
            # now are in inflight, released by _end.
            self._outbox.hand_alarms_to(None)
            self._handed = []
            self.connected = False
            self._session = None
            await run_shielded(self._end(session, inflight, graceful), _CLEANUP_DEADLINE_S, who="sparkplug")

    async def _wait_host_online(
        self, session: Session, messages: collections.deque[tuple[str, bytes]]
    ) -> None:
        host = self._sp.primary_host
        told = False
        while True:
            session.wake.clear()
            self._set_beat(time.monotonic())
            if cancel_requested():
                raise asyncio.CancelledError
            if session.lost is not None:
                raise session.lost
            while messages:
                if self._host_message(*messages.popleft()) is True:
                    if told:
                        log.info("sparkplug: primary host %s is online: publishing", host)
                    return
            if not told:
                told = True
                self.problem = f"waiting for primary host {host} to be online"
                log.warning(
                    "sparkplug: primary host %s is not online: waiting (records stay in the outbox)", host
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await session.wake.wait()

    def _host_message(self, topic: str, data: bytes) -> bool | None:
        """Handle a STATE message; True/False for online/offline, None when it is not a new STATE."""
        if self._sp.primary_host is None or topic != codec.state_topic(self._sp.primary_host):
            return None
        state = codec.host_state(data)
        if state is None:
            log.warning("sparkplug: a STATE message of the primary host is not JSON with 'online': ignored")
            return None
        online, ts = state
        if ts < self._host_ts:
            return None  # older than one already seen: the specification says to ignore it
        self._host_ts = ts
        return online

    def _publish(self, session: Session, topic: str, data: bytes, qos: int) -> int:
        info = session.client.publish(topic, data, qos=qos, retain=False)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            session.lost = session.lost or TransientError(f"publish failed ({paho.error_string(info.rc)})")
            raise session.lost
        if not topic.endswith(f"/NDEATH/{self.node_id}"):
            self.counters.messages += 1
        return info.mid

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _birth(self, session: Session) -> None:
        """A complete birth sequence: NBIRTH (seq 0) and one DBIRTH per live device."""
        now = _now_ms()
        forgotten = False
        for device in list(self.catalog.devices):
            if device == NODE:
                continue
            try:
                self._anon.check(device.encode())
                self._anon.check_texts(self.catalog.devices[device])
            except AnonymizationError as exc:
                # An identity registered after these names were learnt: forget them, fail closed.
                # The device id itself may be what leaks: it is not logged.
                log.error("sparkplug: a device's names no longer pass the identity scan (%s): forgotten", exc)
                del self.catalog.devices[device]
                self.catalog.held.pop(device, None)
                forgotten = True
        if forgotten:
            # Not awaited (the births go out now): lost in a crash, the next start forgets them again.
            self.catalog.submit()
        nbirth = codec.nbirth_head(self.bdseq, now)
        self._add_known(nbirth, NODE, now)
        data = nbirth.SerializeToString()
        self._anon.check_within(data, codec.field_spans)
        self.seq = 0
        self._publish(session, self.topic("NBIRTH"), data, 0)
        for device in self.catalog.devices:
            if device == NODE or device in self._dead:
                continue
            payload = codec.new_payload(now, self._next_seq())
            self._add_known(payload, device, now)
            data = payload.SerializeToString()
            self._anon.check_within(data, codec.field_spans)
            self._publish(session, self.topic("DBIRTH", device), data, 0)
        self.counters.births += 1
        session.client.loop_write()

    def _add_known(self, payload: codec.Payload, device: str, now: int) -> None:
        held = self._held_now(device)
        for name, entry in self.catalog.devices.get(device, {}).items():
            if name in held:
                # What is on now, the conditions carried over a restart included.
                value, quality = held[name]
                self._last[(device, name)] = (value, quality)
            else:
                value, quality = self._last.get((device, name), (None, codec.STALE))
            point = Point(name, entry.datatype, value, entry.unit, quality, entry.low, entry.high)
            codec.add_metric(payload, point, alias=entry.alias, ts_ms=now, birth=True)

    def _held_now(self, device: str) -> dict[str, tuple[codec.Value, int]]:
        """The values of ``device``'s alarm metrics as the conditions held say (name -> value, quality)."""
        out: dict[str, tuple[codec.Value, int]] = {}
        bases = self.catalog.held.get(device, {})
        for name in self.catalog.devices.get(device, {}):
            if not (name.startswith("Alarms/") and name.endswith("/Active")):
                continue
            base = name.removesuffix("/Active")
            if base in bases:  # else never reported: unknown (null) until it is
                out.update((p.name, (p.value, p.quality)) for p in codec.held_points(base, bases[base]))
        return out

    async def _deliver(
        self, session: Session, messages: collections.deque[tuple[str, bytes]], inflight: dict[int, int]
    ) -> None:
        cfg = self._cfg
        last_ack = time.monotonic()
        while True:
            session.wake.clear()
            now = time.monotonic()
            self._set_beat(now)
            if cancel_requested():  # a cancellation a suppressed timeout swallowed (Python 3.11)
                raise asyncio.CancelledError
            if session.lost is not None:
                raise session.lost
            while messages:
                self._command(session, *messages.popleft())
            done: list[int] = []
            while session.acks:
                mid, code = session.acks.popleft()
                if mid not in inflight:
                    continue
                last_ack = now
                if code >= 0x80:  # the record stays in inflight: _end releases it
                    raise TransientError(f"the broker refused a publish (reason 0x{code:02X})")
                done.append(mid)
            if done:
                await self._ack([inflight[mid] for mid in done])
                for mid in done:
                    del inflight[mid]
            if inflight and now - last_ack > min(_ACK_STALL_S, float(cfg.keepalive_s)):
                raise TransientError(f"no PUBACK for {_ACK_STALL_S:g} s: the link looks dead: reconnecting")
            room = cfg.max_inflight - len(inflight)
            if not inflight:
                last_ack = now
            items = await self._lease(min(room, cfg.batch), inflight) if room > 0 else []
            items = self._with_handed(items)
            for n, item in enumerate(items):
                pause = self._replay.wait_for(len(item.payload), time.monotonic())
                if item.id <= self.backlog_through and pause > 0:
                    rest = [i.id for i in items[n:]]
                    await self._outbox.release(rest)
                    for rid in rest:
                        del inflight[-rid]
                    await asyncio.sleep(pause)
                    break
                await self._send(session, item, inflight)
            if session.client.want_write():
                session.client.loop_write()
            await self._save_held()  # before their PUBACKs are taken: an unacknowledged record is re-sent
            if items:
                await asyncio.sleep(0)
                continue
            session.replaying = False
            if self._replayed_alarms:
                self._tell_held(session)
            if inflight:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_POLL_S):
                        await session.wake.wait()
            else:
                waiter = asyncio.ensure_future(self._outbox.wait_committed(IDLE_POLL_S))
                woken = asyncio.ensure_future(session.wake.wait())
                try:
                    await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                    if not waiter.done():
                        waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter

    def _command(self, session: Session, topic: str, data: bytes) -> None:
        online = self._host_message(topic, data)
        if online is False:
            raise HostOfflineError(f"primary host {self._sp.primary_host} went offline: ending this session")
        if topic != self.topic("NCMD"):
            return  # device commands: nothing on a gateway's device is writable
        try:
            rebirth = codec.rebirth_requested(data)
        except codec.SparkplugError as exc:
            log.warning("sparkplug: an NCMD could not be read (%s): ignored", exc)
            return
        if rebirth:
            self.counters.rebirth_requests += 1
            log.info("sparkplug: rebirth requested: sending the births again (bdSeq %d)", self.bdseq)
            self._birth(session)

    def _take_alarms(self, session: Session, alarms: list[Leased], inflight: dict[int, int]) -> None:
        """Alarms leased by their own commit: noted in ``inflight`` and sent in the next round of _deliver."""
        for item in alarms:
            inflight[-item.id] = item.id
        self._handed += alarms
        session.wake.set()

    def _with_handed(self, items: list[Leased]) -> list[Leased]:
        """A round's records with the handed-over alarms: every alarm first, in id order, then the rest."""
        if not self._handed:
            return items
        # A lease under way when an alarm was handed over may hold older alarms: sorting keeps the
        # order, and a paced backlog record releases whatever follows it, handed alarms included.
        alarms = sorted([*(i for i in items if i.lane is Lane.ALARMS), *self._handed], key=lambda i: i.id)
        self._handed = []
        return [*alarms, *(i for i in items if i.lane is not Lane.ALARMS)]

    async def _lease(self, n: int, inflight: dict[int, int]) -> list[Leased]:
        """Lease, each record noted in ``inflight`` as unsent; if cancelled meanwhile, released."""
        task = asyncio.ensure_future(self._outbox.lease(n))
        try:
            got = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_orphans)
            raise
        for item in got:
            inflight[-item.id] = item.id
        return got

    def _release_orphans(self, task: asyncio.Future[list[Leased]]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        ids = [item.id for item in task.result()]
        if ids:
            # AsyncOutbox.release only notes the ids (never waits): safe in a callback.
            with contextlib.suppress(RuntimeError):
                self._outbox.outbox.release(ids)

    async def _ack(self, ids: list[int]) -> None:
        await self._outbox.ack(ids)
        self.counters.acked += len(ids)
        self.delivered += len(ids)

    async def _dead_letter(self, item: Leased, why: str) -> None:
        self.counters.dead_lettered += 1
        if self.counters.dead_lettered == 1:
            log.error("sparkplug: record %d cannot be sent: %s: moved to the dead-letter lane", item.id, why)
        else:
            log.debug("sparkplug: record %d cannot be sent: %s", item.id, why)
        await self._outbox.dead_letter([item.id], why)

    def _prepare(self, item: Leased) -> tuple[str, list[Point], Record, _Holding] | str:
        """The device key, values, record and alarm conditions of an outbox item; why not, when it cannot be sent."""
        try:
            record = decode_record(item.payload)
            holding = self._holding(record)
            device, pts = codec.points(record, holding[1] if holding is not None else None)
            if device is not None:
                codec.check_id("device_id", device)
            # Names are scanned before they are learnt: a name that would leak is never announced.
            key = device if device is not None else NODE
            self._anon.check_texts([key, *(p.name for p in pts), *(p.unit or "" for p in pts)])
        except (RecordError, codec.SparkplugError, AnonymizationError) as exc:
            return str(exc)
        return key, pts, record, holding

    def _holding(self, record: Record) -> _Holding:
        """An alarm's metric and the conditions on under it once the alarm is folded in (not noted yet)."""
        if not isinstance(record, AlarmRecord):
            return None
        base = codec.alarm_base(record)
        key = record.subject if record.subject is not None else NODE
        on = codec.fold(record, self.catalog.holding(key, base))
        return None if on is None else (base, on)

    def _note_held(self, key: str, holding: _Holding) -> None:
        """The host was told (or already knew) what is on under an alarm metric: kept for births."""
        if holding is not None and self.catalog.hold(key, *holding):
            self._held_unsaved = True

    async def _save_held(self) -> None:
        """Write the conditions held, when they changed, off the loop (after the round's messages went out)."""
        if self._held_unsaved:
            await self.catalog.write()
            self._held_unsaved = False

    async def _send(self, session: Session, item: Leased, inflight: dict[int, int]) -> None:
        """One record as NDATA/DDATA (or nothing, when none of its values changed).

        ``item`` is in ``inflight`` as unsent (``-id``) until it is acknowledged, dead-lettered or
        published: whatever raises before that, the session's end releases it.
        """
        prepared = self._prepare(item)
        if isinstance(prepared, str):
            await self._dead_letter(item, prepared)
            inflight.pop(-item.id, None)
            return
        key, pts, record, holding = prepared
        device = None if key == NODE else key
        historical = item.id <= self.backlog_through
        session.replaying = historical  # the status shows a replay in progress
        ts = codec.timestamp_ms(record)
        pts += self._sensor_quality(key, record)
        self._track_devices(key, record)
        if self.catalog.learn(key, pts):
            # On disk before the birth announces the new aliases; written off the loop (fsync).
            await self.catalog.write()
            self._birth(session)
        elif key in self._dead and not self._device_down(key):
            self._dead.discard(key)
            self._birth(session)
        if not historical:
            pts = [p for p in pts if self._last.get((key, p.name)) != (p.value, p.quality)]
        if not pts:
            self.counters.unchanged += 1
            self._note_held(key, holding)
            # An ending the host cannot see (another condition keeps the metric on) still changes
            # what is held: on disk before the record leaves the outbox, or a crash would keep the
            # ended condition in every birth for good.
            await self._save_held()
            await self._ack([item.id])
            inflight.pop(-item.id, None)
            return
        payload = codec.new_payload(_now_ms(), (self.seq + 1) % 256)
        for p in pts:
            was = self._last.get((key, p.name))
            codec.add_metric(
                payload,
                p,
                alias=self.catalog.alias(key, p.name),
                ts_ms=ts,
                birth=False,
                historical=historical,
                quality=was is not None and was[1] != p.quality,  # say so when quality changes back to good
            )
        data = payload.SerializeToString()
        topic = self.topic("NDATA") if device is None else self.topic("DDATA", device)
        try:
            # Inside one field of the payload (a name, a text, a number), never across a tag.
            self._anon.check_within(data, codec.field_spans)
            self._anon.check(topic.encode())
        except AnonymizationError as exc:
            await self._dead_letter(item, str(exc))
            inflight.pop(-item.id, None)
            return
        self._next_seq()
        mid = self._publish(session, topic, data, 1)
        # A restart re-sends what was not acknowledged: folding it again changes nothing.
        self._note_held(key, holding)
        self._replayed_alarms |= historical and holding is not None
        del inflight[-item.id]
        inflight[mid] = item.id
        if historical:
            self._replay.take(len(data), time.monotonic())
        self.counters.published += 1
        self.counters.historical += historical
        if not historical:
            for p in pts:
                self._last[(key, p.name)] = (p.value, p.quality)
            if key not in self._dead and self._device_down(key):
                self._ddeath(session, key)

    def _sensor_quality(self, key: str, record: Any) -> list[Point]:
        """A sensor alarm as quality on the stream's values it affects (null, bad or stale)."""
        if not isinstance(record, AlarmRecord) or record.alarm not in codec.SENSOR_QUALITY:
            return []
        quality = codec.SENSOR_QUALITY[record.alarm]
        status = record.detail.get("status")  # the OPC UA status of a faulted node
        token = status if isinstance(status, str) and record.alarm == "sensor_fault" else None
        known = self.catalog.devices.get(key, {})
        # A lost device takes every stream it delivers with it; a sensor alarm names its stream.
        metrics = (
            self._devs.get(key, {}).get(record.dev or "", set()) if record.alarm == "device_lost" else set()
        )
        prefixes = tuple(f"{m}/" for m in metrics | ({record.metric} if record.metric else set()))
        out: list[Point] = []
        for name, entry in known.items():
            if name.startswith(("Alarms/", "Scores/", "Estimates/", "Diagnostics/")):
                continue
            if not prefixes or name.startswith(prefixes):
                out.append(
                    Point(name, entry.datatype, None, entry.unit, quality, entry.low, entry.high, token)
                )
        return out

    def _track_devices(self, key: str, record: Any) -> None:
        if isinstance(record, FeaturesWindow):
            for stream in record.streams:
                self._devs[key].setdefault(stream.dev, set()).add(stream.metric)
        elif isinstance(record, AlarmRecord) and record.dev:
            if record.alarm == "device_lost":
                self._lost[key].add(record.dev)
            elif record.alarm == "device_restored":
                self._lost[key].discard(record.dev)

    def _device_down(self, key: str) -> bool:
        return bool(self._devs.get(key)) and set(self._devs[key]) <= self._lost.get(key, set())

    def _tell_held(self, session: Session) -> None:
        """After a replayed backlog: the alarm metrics whose current value it changed, as current values.

        History is not a current value: a host holds what the births before the backlog said
        until it is told otherwise.  Not a record's message: nothing is acknowledged by it, and a
        connection lost before it arrives is followed by births that say the same.
        """
        self._replayed_alarms = False
        now = _now_ms()
        for key, bases in self.catalog.held.items():
            if key in self._dead:
                continue  # a dead device is told at its next birth
            known = self.catalog.devices.get(key, {})
            pts = [
                p
                for base, on in bases.items()
                for p in codec.held_points(base, on)
                if p.name in known and self._last.get((key, p.name)) != (p.value, p.quality)
            ]
            if not pts:
                continue
            payload = codec.new_payload(now, (self.seq + 1) % 256)
            for p in pts:
                was = self._last.get((key, p.name))
                alias = self.catalog.alias(key, p.name)
                quality = was is not None and was[1] != p.quality
                codec.add_metric(payload, p, alias=alias, ts_ms=now, birth=False, quality=quality)
            data = payload.SerializeToString()
            try:
                self._anon.check_within(data, codec.field_spans)
            except AnonymizationError as exc:  # fail closed: the next births say it instead
                log.error("sparkplug: the alarm values after a backlog are not sent: %s", exc)
                continue
            self._next_seq()
            topic = self.topic("NDATA") if key == NODE else self.topic("DDATA", key)
            self._publish(session, topic, data, 1)
            self.counters.published += 1
            self._last.update(((key, p.name), (p.value, p.quality)) for p in pts)
        session.client.loop_write()

    def _ddeath(self, session: Session, key: str) -> None:
        payload = codec.new_payload(_now_ms(), self._next_seq())
        data = payload.SerializeToString()
        self._publish(session, self.topic("DDEATH", key), data, 0)
        self._dead.add(key)
        self.counters.ddeaths += 1
        log.info("sparkplug: every sensor of a device is lost: DDEATH sent")

    async def _end(self, session: Session, inflight: dict[int, int], graceful: bool) -> None:
        """Acknowledge what was acked, release the rest; NDEATH before an intended disconnect."""
        done = []
        while session.acks:
            mid, code = session.acks.popleft()
            if mid in inflight and code < 0x80:
                done.append(mid)
        try:
            if done:
                # An alarm leaves the outbox only once what it changed of the conditions held is on disk.
                await self._save_held()
                await self._ack([inflight[mid] for mid in done])
                for mid in done:
                    del inflight[mid]
        finally:
            if inflight:
                with contextlib.suppress(RuntimeError):
                    await self._outbox.release(list(inflight.values()))
            inflight.clear()
            if graceful and session.connected and session.lost is None:
                with contextlib.suppress(Exception):
                    await self._goodbye(session)

    async def _goodbye(self, session: Session) -> None:
        """An intended disconnect: the NDEATH goes out before the connection ends."""
        client = session.client
        if self._cfg.protocol == "5":
            # MQTT 5: DISCONNECT with reason "with Will message": the broker publishes our NDEATH Will.
            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
            client.loop_write()
            return
        mid = self._publish(session, self.topic("NDEATH"), codec.ndeath(self.bdseq, _now_ms()), 1)
        client.loop_write()
        async with asyncio.timeout(_GOODBYE_WAIT_S):
            while not any(m == mid for m, _ in session.acks) and session.lost is None:
                session.wake.clear()
                await session.wake.wait()
