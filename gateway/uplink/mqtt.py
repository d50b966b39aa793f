"""The MQTT uplink: lease from the outbox, publish at QoS 1 over TLS, acknowledge on PUBACK.

Delivery contract (``docs/records.md``):

* A record leaves the outbox only when the broker has acknowledged it (PUBACK); what is leased but
  not acknowledged when the connection drops is released and sent again (at least once).
* At most ``max_inflight`` records are leased and unacknowledged at a time.
* Live records go first.  At each connection, every record already queued is the *backlog*: it is
  replayed behind live data, paced by a token bucket (messages/s and bytes/s), and marked as
  historical.
* Each message carries its sequence number (the outbox row id) and the outbox epoch, in the pack
  and, with MQTT 5, as user properties, so the twin can tell loss from duplication.
* A retained status topic says "online" (with the drop counters) and, through the Will, "offline".

* A record no packet the broker takes can carry is not deleted as delivered: an alarm or a
  diagnostic goes without its optional detail (with a note), anything else to the outbox's
  dead-letter lane, counted (sizes: :mod:`gateway.uplink.packets`).

The pieces: :class:`~gateway.uplink.connection.Connection` is the transport, a reusable async
context manager for one connection; :meth:`MqttUplink.run` is the one reconnect loop around it
(capped, jittered backoff, cut short by :func:`gateway.uplink.transport.probe`); the rest of this
class is the delivery stage that leases, publishes and acknowledges on one connection.  The log
shows state changes only: connected, lost, reconnected, refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway import senml
from gateway.contracts import Lane
from gateway.errors import AuthError, ConfigError, EdgetwinError, TransientError
from gateway.outbox import AsyncOutbox, Leased
from gateway.uplink import certs, packets, transport
from gateway.uplink.config import MqttSection, is_loopback
from gateway.uplink.connection import Connection, Session
from gateway.uplink.pacing import Pacer
from gateway.uplink.profiles import PROFILES, azure_topic

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
_IDLE_POLL_S = 1.0  # wake at least this often: heartbeat, and records committed by another process
_CLEANUP_DEADLINE_S = 5.0
_MONITOR_EVERY_S = 10.0
_CERT_CHECK_EVERY_S = 6 * 3600.0
# While backing off, how often to check whether the step that failed would pass now: a broker
# listening again is used within about this long.  A TLS probe costs the broker a handshake.
_PROBE_EVERY_S = 1.0
_PROBE_TLS_EVERY_S = 2.0
_ACK_STALL_S = 15.0  # messages in flight and no PUBACK for this long (at most keepalive): link dead
_HEALTHY_SESSION_S = 10.0  # a connection that lasted this long resets the backoff
_PUBACK_AUTH = frozenset({0x87})  # not authorized (a broker policy forbids the topic)
# The broker will never take this record, however often it is sent: it goes to the dead-letter lane.
_PUBACK_NEVER = frozenset({0x99})  # payload format invalid


@dataclass(slots=True)
class UplinkCounters:
    """What the uplink did since it was created."""

    published: int = 0
    acked: int = 0
    republished: int = 0  # records leased again after an earlier attempt (duplicates are possible)
    historical: int = 0
    trimmed: int = 0  # alarms and diagnostics sent without their optional detail, to fit the broker
    dead_lettered: int = 0  # records no packet can carry: moved to the outbox's dead-letter lane
    connects: int = 0
    refused: int = 0  # PUBACKs with a failure reason code


class MqttUplink:
    """Delivers the outbox to an MQTT broker; see the module docstring for the contract."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        config: MqttSection,
        gateway_id: str,
        *,
        password: str | None = None,
    ) -> None:
        self._outbox = outbox
        self._cfg = config
        self._profile = PROFILES[config.profile]
        self.client_id = gateway_id
        self.topic_root = f"{config.topic_prefix}/{gateway_id}"
        self.status_topic = f"{self.topic_root}/status"
        self._password = password
        self._beat = time.monotonic()
        self._bounded_until = 0.0  # inside a wait bounded by its own timeout until then
        self.problem: str | None = "not connected yet"  # why the uplink is degraded; None when connected
        self.delivered = 0
        self.counters = UplinkCounters()
        self.connected = False
        self._session: Session | None = None
        self._replay = Pacer(
            _min(config.replay_msgs_per_s, self._profile.publishes_per_s),
            _min(config.replay_bytes_per_s, self._profile.bytes_per_s),
            now=time.monotonic(),
        )
        self._limit = Pacer(self._profile.publishes_per_s, self._profile.bytes_per_s, now=time.monotonic())
        self._epoch = 0
        self._dropped_seen: dict[str, int] | None = None
        self._oversize_seen = False  # logged at ERROR once per run of oversize records, then DEBUG
        self._next_cert_check = 0.0
        self._connection = Connection(
            config, self._profile, gateway_id, password=password, will=self._will, bounded=self._bounded
        )
        self._releasing: set[asyncio.Future[None]] = set()
        self.backlog_through = 0  # records up to this id are the backlog of the current connection

    @property
    def last_beat(self) -> float:
        """Monotonic time of the last sign of life; "now" while inside a wait bounded by a timeout."""
        now = time.monotonic()
        return now if now < self._bounded_until else self._beat

    @last_beat.setter
    def last_beat(self, value: float) -> None:
        self._beat = value

    @contextlib.contextmanager
    def _bounded(self, seconds: float) -> Iterator[None]:
        """Report alive while inside a wait that its own timeouts end within ``seconds``.

        A connection attempt against a broker that accepts TCP and never answers is slow but
        bounded; the heartbeat must not go stale for it.  A wait that overruns its bound (a bug)
        goes stale after the bound, as it should.
        """
        self._bounded_until = time.monotonic() + seconds
        try:
            yield
        finally:
            self._bounded_until = 0.0
            self._beat = time.monotonic()

    def describe(self) -> str:
        """``connected`` or ``degraded (why)``, for the STATUS line."""
        return "connected" if self.problem is None else f"degraded ({self.problem})"

    # --- checks before connecting -------------------------------------------------------------------

    def preflight(self) -> list[str]:
        """Check the configuration against the profile; return warnings, raise ConfigError on errors."""
        cfg, where = self._cfg, f"uplink mqtt {self._cfg.host}:{self._cfg.port}"
        warnings: list[str] = []
        problems = self._profile.problems(
            client_id=self.client_id, topic=self._topic("features/" + "x" * 16), payload_bytes=0
        )
        keepalive = self._profile.check_keepalive(cfg.keepalive_s)
        if keepalive:
            problems.append(keepalive)
        if cfg.protocol not in self._profile.protocols:
            problems.append(f"protocol MQTT {cfg.protocol} not offered")
        if problems:
            raise ConfigError(
                f"{where}: profile {self._profile.name}: {'; '.join(problems)}: "
                "change the settings named, or pick the profile of your broker"
            )
        if not cfg.tls:
            if is_loopback(cfg.host):
                warnings.append(f"{where}: plain TCP to a broker on this machine (tls = false)")
            else:
                warnings.append(
                    f"{where}: plain TCP to a remote broker (allow_insecure = true): records and "
                    "credentials cross the network in clear text: switch to TLS"
                )
        return warnings

    # --- topics and properties ----------------------------------------------------------------------

    def _topic(self, relative: str, props: dict[str, str] | None = None) -> str:
        if self._profile.static_topic:
            bag = {"topic": relative, **(props or {})}
            return azure_topic(self.client_id, bag)
        return f"{self.topic_root}/{relative}"

    def _properties_head(self) -> bytes:
        """The MQTT 5 properties every record of a session shares, already encoded."""
        return packets.record_head(SCHEMA_VERSION, self._epoch, self._cfg.message_expiry_s)

    def _properties(self, session: Session, seq: int, historical: bool) -> packets.Packed | None:
        # Encoded by hand: paho's Properties object costs more per message than the rest of the path.
        if self._cfg.protocol != "5":
            return None
        return packets.record_properties(session.props_head, seq, historical)

    def _status_payload(
        self, state: str, *, clean: bool = True, dropped: dict[str, int] | None = None
    ) -> bytes:
        body: dict[str, Any] = {"state": state, "sv": int(SCHEMA_VERSION), "ep": self._epoch}
        if state == "offline":
            body["clean"] = clean
        if dropped:
            body["dropped"] = dropped
        return json.dumps(body, separators=(",", ":")).encode()

    def _will(self) -> tuple[str, bytes]:
        return self._status_topic(), self._status_payload("offline", clean=False, dropped=self._dropped_seen)

    def _status_topic(self) -> str:
        return self._topic("status") if self._profile.static_topic else self.status_topic

    # --- running ------------------------------------------------------------------------------------------

    async def run(self, started: Callable[[], None]) -> None:
        """Connect, deliver, reconnect until cancelled; only a configuration the profile rejects is final.

        Everything met at run time - a refused or dropped connection, a port that does not speak
        TLS, certificate errors, missing or renewed certificate files, unknown CONNACK codes,
        redirects - is retried under a capped backoff, with a probe that cuts the wait short when
        the failed step would now pass; meanwhile :attr:`problem` says why the uplink is degraded.
        """
        where = transport.where(self._cfg)
        for warning in self.preflight():
            log.warning("%s", warning)
        self._next_cert_check = time.monotonic() + _CERT_CHECK_EVERY_S
        started()
        attempt, streak, down_since = 0, 0, time.monotonic()
        reported = ""
        while True:
            self.last_beat = time.monotonic()
            acked_before, up_since = self.counters.acked, 0.0
            try:
                # The one reconnect loop: each pass enters the connection again.
                async with self._connection as session:
                    self.counters.connects += 1
                    if attempt:
                        log.info(
                            "%s: connected again after %.1f s (%d attempt(s))",
                            where,
                            time.monotonic() - down_since,
                            attempt + 1,
                        )
                    streak, attempt, reported = streak + 1, 0, ""
                    self.problem = None
                    up_since = time.monotonic()
                    await self._serve(session)
            except transport.AttemptError as exc:
                attempt += 1
                self.problem = str(exc.cause)
                if str(exc.cause) != reported:
                    reported = str(exc.cause)
                    retrying = "" if "retrying" in reported else "retrying; "
                    log.warning("%s (%srecords stay in the outbox)", exc.cause, retrying)
                else:
                    log.debug("still cannot connect (attempt %d): %s", attempt, exc.cause)
                await self._wait_retry(self._backoff(attempt), exc.stage)
            except EdgetwinError as exc:
                down_since = time.monotonic()
                self.problem = str(exc)
                log.warning("%s: %s; records stay in the outbox, reconnecting", where, exc)
                # A session that delivered, or lasted, was healthy: retry soon.  One that the broker
                # ends at once (a refused publish) backs off like a refused connection.
                if self.counters.acked > acked_before or down_since - up_since >= _HEALTHY_SESSION_S:
                    streak = 0
                attempt = streak
                reported = str(exc)
                await self._wait_retry(self._backoff(attempt + 1), transport.Stage.MQTT)

    async def _wait_retry(self, delay: float, failed: transport.Stage) -> None:
        """Wait ``delay`` s before the next attempt, cut short when a probe says the failed step passes."""
        cfg = self._cfg
        now = time.monotonic()
        end = now + delay
        every = _PROBE_TLS_EVERY_S if failed is transport.Stage.TLS else _PROBE_EVERY_S
        next_probe = now + every
        while (left := end - now) > 0:
            self.last_beat = now
            if failed < transport.Stage.MQTT and now >= next_probe:
                with self._bounded(2 * cfg.connect_timeout_s + 3.0):
                    passes = await transport.probe(cfg, self._connection.tls, failed, cfg.connect_timeout_s)
                if passes:
                    log.debug("uplink mqtt: the %s step passes again: connecting now", failed.name.lower())
                    return
                now = time.monotonic()
                next_probe = now + every
                continue
            await asyncio.sleep(min(left, max(0.0, next_probe - now), _IDLE_POLL_S))
            now = time.monotonic()

    def _backoff(self, attempt: int) -> float:
        nominal = min(self._cfg.reconnect_max_s, self._cfg.reconnect_min_s * 2 ** min(attempt - 1, 30))
        return float(nominal / 2 + random.random() * nominal / 2)

    async def _serve(self, session: Session) -> None:
        """Deliver on one connection until it drops (TransientError) or the task is cancelled."""
        cfg = self._cfg
        self._session = session
        self.connected = True
        graceful = False

        def after_read() -> None:
            if session.live or session.backlog:
                self._pump(session)

        session.after_read = after_read
        try:
            self._epoch = self._outbox.outbox.epoch
            session.props_head = self._properties_head()
            self.backlog_through = await self._outbox.last_id()
            stats = await self._outbox.stats()
            self._dropped_seen = _dropped(stats.dropped)
            self._publish_status(session, "online", dropped=self._dropped_seen)
            queued = stats.queued
            tls_desc = session.tls_desc
            log.info(
                "uplink mqtt %s:%d: connected as %s (MQTT %s%s); %d record(s) queued to replay",
                cfg.host,
                cfg.port,
                self.client_id,
                cfg.protocol,
                f", {tls_desc}" if cfg.tls else ", no TLS",
                queued,
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._watch_commits(session), name="uplink-mqtt:commits")
                    tg.create_task(self._monitor(session), name="uplink-mqtt:monitor")
                    tg.create_task(self._acker(session), name="uplink-mqtt:acker")
                    await self._publish_loop(session)
            except BaseExceptionGroup as group:
                raise _first(group) from None
        except asyncio.CancelledError:
            graceful = session.connected
            raise
        finally:
            self.connected = False
            self._session = None
            cleanup = asyncio.create_task(self._end_session(session, graceful), name="uplink-mqtt:cleanup")
            await _finish_shielded(cleanup, _CLEANUP_DEADLINE_S)

    async def _watch_commits(self, session: Session) -> None:
        while True:
            if await self._outbox.wait_committed(_IDLE_POLL_S):
                session.more_live = True
                session.wake.set()

    async def _monitor(self, session: Session) -> None:
        """Republish the status when drop counters change; re-check our certificate now and then."""
        while True:
            await asyncio.sleep(_MONITOR_EVERY_S)
            stats = await self._outbox.stats()
            dropped = _dropped(stats.dropped)
            if dropped != self._dropped_seen:
                log.info("uplink mqtt: outbox drop counters now %s: told the twin", dropped)
                self._dropped_seen = dropped
                self._publish_status(session, "online", dropped=dropped)
            if time.monotonic() >= self._next_cert_check:
                self._next_cert_check = time.monotonic() + _CERT_CHECK_EVERY_S
                self._connection.check_certificate()

    def _publish_status(self, session: Session, state: str, **kw: Any) -> paho.MQTTMessageInfo:
        props = None
        if self._cfg.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ContentType = "application/json"
            props.UserProperty = [("sv", SCHEMA_VERSION)]
        info = session.client.publish(
            self._status_topic(),
            self._status_payload(state, **kw),
            qos=1,
            retain=session.retain,
            properties=props,
        )
        session.status_mid = info.mid
        return info

    async def _publish_loop(self, session: Session) -> None:
        cfg = self._cfg
        live, backlog = session.live, session.backlog
        session.replaying = self.backlog_through > 0
        replay_started = time.monotonic()
        while True:
            session.wake.clear()  # anything that happens from here on wakes the wait below
            self._raise_if_lost(session)
            self.last_beat = time.monotonic()
            self._check_stalled(session, self.last_beat)
            self._take_acks(session)
            # Leasing is a worker-thread hop and a transaction: only when something may be there
            # (records committed since the last look) and the local queue runs short.
            free = cfg.max_inflight - len(session.leased)
            if session.more_live and free > 0 and len(live) < cfg.batch:
                want = min(free, cfg.batch)
                session.more_live = False  # a commit during the lease sets it again
                got = await self._lease(session, want, after_id=self.backlog_through)
                live.extend(got)
                free -= len(got)
                if len(got) == want:
                    session.more_live = True
            if session.replaying and free > 0 and len(backlog) < cfg.batch // 2 + 1:
                got = await self._lease(session, min(free, cfg.batch), through_id=self.backlog_through)
                backlog.extend(got)
                if not got and not backlog:
                    session.replaying = False
                    if session.replayed:
                        log.info(
                            "uplink mqtt: backlog of %d record(s) replayed in %.1f s",
                            session.replayed,
                            time.monotonic() - replay_started,
                        )
            self._raise_if_lost(session)
            wait = self._pump(session)
            if session.wake.is_set():
                await asyncio.sleep(0)  # let paho's reader and the acker run before looking again
                continue
            try:
                async with asyncio.timeout(wait):
                    await session.wake.wait()
            except TimeoutError:
                session.more_live = True  # a poll now and then, whatever the commit signal said

    def _pump(self, session: Session) -> float:
        """Publish what room and pacing allow, live first; return how long pacing asks to wait.

        Called by the publish loop and straight from paho's read handler, so a PUBACK frees room
        and the next message goes out in the same loop turn, as in paho's own threaded loop.
        """
        if session.lost is not None or not session.connected:
            return _IDLE_POLL_S
        self._take_acks(session)
        live, backlog = session.live, session.backlog
        wait = _IDLE_POLL_S
        now = time.monotonic()
        room = session.send_limit - len(session.by_mid)
        published = 0
        limited = not self._limit.unlimited
        paced = limited or not self._replay.unlimited
        while live and room > 0:
            pause = self._limit.wait_for(len(live[0].payload), now) if limited else 0.0
            if pause > 0:
                wait = min(wait, pause)
                break
            self._publish(session, live.popleft(), historical=False, now=now)
            room -= 1
            published += 1
        while backlog and not live and room > 0:
            size = len(backlog[0].payload)
            pause = max(self._limit.wait_for(size, now), self._replay.wait_for(size, now)) if paced else 0.0
            if pause > 0:
                wait = min(wait, pause)
                break
            self._publish(session, backlog.popleft(), historical=True, now=now)
            room -= 1
            published += 1
            session.replayed += 1
        if published and session.client.want_write():
            session.client.loop_write()  # now, not one loop turn later: the socket is non-blocking
        short = self._cfg.batch // 2
        if (session.more_live and len(live) < short) or (session.replaying and len(backlog) < short):
            session.wake.set()  # running short: the publish loop leases more
        return wait

    async def _acker(self, session: Session) -> None:
        """Delete acknowledged records in batches while publishing goes on."""
        while True:
            await session.ack_wake.wait()
            session.ack_wake.clear()
            self._take_acks(session)
            if session.to_release:
                ids, session.to_release = session.to_release, []
                await self._outbox.release(ids)
            if session.to_dead_letter:
                moving, session.to_dead_letter = session.to_dead_letter, []
                for rid, why in moving:
                    await asyncio.to_thread(self._outbox.outbox.dead_letter, [rid], why)
                    session.leased.pop(rid, None)
                session.wake.set()
            if session.acked_ids:
                ids, session.acked_ids = session.acked_ids, []
                await self._ack(session, ids)
                session.wake.set()  # the window has room again

    def _check_stalled(self, session: Session, now: float) -> None:
        """End a connection that has had messages in flight and no PUBACK for too long.

        A cut link drops nothing and refuses nothing: TCP retransmits with a backoff that, after a
        minute's cut, waits half a minute more after the link is back, and MQTT's keep-alive
        notices only after one and a half periods.  A fresh connection, probed every second, is
        up within seconds instead; what was in flight is sent again (duplicates, counted).
        """
        stall = min(_ACK_STALL_S, float(self._cfg.keepalive_s))
        if session.by_mid and session.lost is None and now - session.last_ack > stall:
            session.lost = TransientError(
                f"no PUBACK for {stall:g} s with {len(session.by_mid)} message(s) in flight: "
                "the link looks dead: reconnecting"
            )

    def _raise_if_lost(self, session: Session) -> None:
        if session.lost is not None:
            raise session.lost

    def _publish(self, session: Session, item: Leased, *, historical: bool, now: float) -> None:
        payload = senml.wrap(item.payload, item.id, self._epoch, historical)
        props: dict[str, str] | None = None
        if self._profile.static_topic:
            props = {
                "seq": str(item.id),
                "ep": str(self._epoch),
                "sv": SCHEMA_VERSION,
                "$.ct": senml.CONTENT_TYPE,
            }
            if historical:
                props["hist"] = "1"
        topic = self._topic(item.topic, props)
        properties = self._properties(session, item.id, historical)
        over = self._over_limit(session, topic, len(payload), properties)
        if over > 0:
            smaller = packets.trimmed(item.payload, over)
            if smaller is not None:
                payload = senml.wrap(smaller, item.id, self._epoch, historical)
                if self._over_limit(session, topic, len(payload), properties) <= 0:
                    self._note_oversize(item, over, "sent without its optional detail, with a note saying so")
                    self.counters.trimmed += 1
                    over = 0
            if over > 0:
                self._dead_letter(session, item, over)
                return
        info = session.client.publish(topic, payload, qos=1, retain=False, properties=cast(Any, properties))
        if info.rc != paho.MQTT_ERR_SUCCESS:
            # Not sent: it stays leased in this session and is released when the session ends.
            session.lost = session.lost or TransientError(f"publish failed ({paho.error_string(info.rc)})")
            return
        if not session.by_mid:
            session.last_ack = now  # the wait for a PUBACK starts with the first message in flight
        session.by_mid[info.mid] = item.id
        size = len(payload)
        self._limit.take(size, now)
        if historical:
            self._replay.take(size, now)
            self.counters.historical += 1
        if item.attempts:
            self.counters.republished += 1
        self.counters.published += 1

    def _over_limit(
        self, session: Session, topic: str, payload_len: int, properties: packets.Packed | None
    ) -> int:
        """Bytes by which this PUBLISH exceeds the profile's payload or the broker's packet limit."""
        over = payload_len - self._profile.max_payload_bytes
        if session.max_packet is not None:
            size = packets.publish_size(topic, payload_len, properties, v5=self._cfg.protocol == "5")
            over = max(over, size - session.max_packet)
        return over

    def _note_oversize(self, item: Leased, over: int, what: str) -> None:
        if not self._oversize_seen:
            self._oversize_seen = True
            log.error(
                "uplink mqtt: record %d (%s) is %d bytes over what the broker takes: %s; "
                "shorten windows or lower the number of streams per subject",
                item.id,
                item.lane.name.lower(),
                over,
                what,
            )
        else:
            log.debug(
                "uplink mqtt: record %d (%s) is %d bytes over: %s",
                item.id,
                item.lane.name.lower(),
                over,
                what,
            )

    def _dead_letter(self, session: Session, item: Leased, over: int) -> None:
        """Hand a record no packet can carry to the dead-letter lane (kept, counted, reported)."""
        self._note_oversize(item, over, "moved to the outbox's dead-letter lane, kept there and counted")
        self.counters.dead_lettered += 1
        limit = f"maximum packet size {session.max_packet}" if session.max_packet else "payload limit"
        session.to_dead_letter.append((item.id, f"{over} bytes over the broker's {limit}"))
        session.ack_wake.set()

    def _take_acks(self, session: Session) -> None:
        """Move PUBACKs handed over by paho's thread into the list of ids to delete."""
        session.ack_scheduled = False
        acks = session.acks
        if acks:
            session.last_ack = time.monotonic()
        while acks:
            mid, code = acks.popleft()
            if mid == session.status_mid:
                session.status_acked.set()
                continue
            rid = session.by_mid.pop(mid, None)
            if rid is None:
                continue
            if code in _PUBACK_NEVER:
                self.counters.refused += 1
                self.counters.dead_lettered += 1
                name = ReasonCode(PacketTypes.PUBACK, identifier=code).getName()
                log.error(
                    "uplink mqtt: the broker refused record %d for good (%s): moved to the dead-letter lane",
                    rid,
                    name,
                )
                session.to_dead_letter.append((rid, f"refused by the broker: {name}"))
                continue
            if code >= 0x80:
                self.counters.refused += 1
                session.leased.pop(rid, None)
                session.to_release.append(rid)  # by the acker, off the loop: release waits on a lock
                name = ReasonCode(PacketTypes.PUBACK, identifier=code).getName()
                where = f"uplink mqtt {self._cfg.host}:{self._cfg.port}"
                if code in _PUBACK_AUTH:
                    session.lost = AuthError(
                        f"{where}: the broker refused a publish: {name}: allow this client to publish to "
                        f"{self.topic_root}/# in the broker's policy"
                    )
                elif session.lost is None:
                    session.lost = TransientError(f"the broker refused a publish ({name})")
                continue
            session.acked_ids.append(rid)
        if session.acked_ids or session.to_release or session.to_dead_letter:
            session.ack_wake.set()

    async def _ack(self, session: Session, ids: list[int]) -> None:
        await self._outbox.ack(ids)
        for rid in ids:
            session.leased.pop(rid, None)
        self.counters.acked += len(ids)
        self.delivered += len(ids)

    async def _lease(self, session: Session, n: int, **where: int) -> list[Leased]:
        """Lease; if cancelled meanwhile, whatever the worker thread still leases is released."""
        task = asyncio.create_task(self._outbox.lease(n, **where), name="uplink-mqtt:lease")
        try:
            got = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_orphans)
            raise
        for item in got:
            session.leased[item.id] = len(item.payload)
        return got

    def _release_orphans(self, task: asyncio.Task[list[Leased]]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        ids = [item.id for item in task.result()]
        if ids:
            # Off the loop (release waits on the outbox's lock); kept referenced until done.
            release = asyncio.ensure_future(self._outbox.release(ids))
            self._releasing.add(release)
            release.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[None]) -> None:
        self._releasing.discard(task)
        if (
            not task.cancelled()
            and isinstance(task.exception(), Exception)
            and not isinstance(task.exception(), RuntimeError)
        ):
            log.error("uplink mqtt: releasing leased records failed: %s", task.exception())

    async def _end_session(self, session: Session, graceful: bool) -> None:
        """Delete what was acknowledged, release the rest, say goodbye if the link is still up."""
        self._take_acks(session)
        try:
            if session.acked_ids:
                ids, session.acked_ids = session.acked_ids, []
                await self._ack(session, ids)
        finally:
            unacked = list(session.leased) + session.to_release
            session.leased.clear()
            session.to_release = []
            if unacked:
                with contextlib.suppress(RuntimeError):
                    await self._outbox.release(unacked)
                log.debug(
                    "uplink mqtt: %d unacknowledged record(s) released for the next connection", len(unacked)
                )
            if graceful:
                session.status_acked.clear()
                with contextlib.suppress(Exception):
                    self._publish_status(session, "offline", clean=True, dropped=self._dropped_seen)
                    async with asyncio.timeout(1.0):
                        while not session.status_acked.is_set():
                            await asyncio.sleep(0.01)
                            self._take_acks(session)

    async def drain(self, deadline: float) -> None:
        """Wait while connected until everything queued is acknowledged or the deadline passes."""
        while time.monotonic() < deadline:
            session = self._session
            if session is None or not session.connected:
                return  # nothing can leave now; the outbox keeps it
            if not session.leased and (await self._outbox.stats()).queued == 0:
                return
            await asyncio.sleep(0.05)


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _dropped(by_lane: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for lane, reasons in by_lane.items():
        total = sum(reasons.values())
        if total:
            out[Lane(lane).name.lower()] = int(total)
    return out


async def _finish_shielded(task: asyncio.Task[None], deadline_s: float) -> None:
    """Wait for a cleanup task up to a deadline, even when cancelled meanwhile; re-raise the cancel."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    cancelled = False
    while not task.done() and (left := end - loop.time()) > 0:
        try:
            await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:
            cancelled = True
    if not task.done():
        log.error("uplink mqtt: closing the connection took longer than %.0f s; abandoned", deadline_s)
        task.cancel()
    elif not task.cancelled() and task.exception() is not None:
        log.error("uplink mqtt: closing the connection failed: %s", task.exception())
    if cancelled:
        raise asyncio.CancelledError


def check_certificates(config: MqttSection, now: dt.datetime | None = None) -> list[str]:
    """Lines for ``edgetwin check``: each certificate of the uplink, its subject and expiry."""
    out: list[str] = []
    for label, path in (("client certificate", config.cert_file), ("CA bundle", config.ca_file)):
        if path is None:
            continue
        try:
            info = certs.cert_info(path)
        except EdgetwinError as exc:
            out.append(f"{label}: {exc}")
            continue
        found = certs.expiry_message(info, now)
        status = (
            found[1] if found else f"valid until {info.not_after:%Y-%m-%d} ({info.days_left(now):.0f} days)"
        )
        out.append(f"{label} {path} ({info.subject}): {status}")
    return out


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group (the one that ended the session)."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
