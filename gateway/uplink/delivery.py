"""The delivery stage: on one connection, lease from the outbox, publish at QoS 1, delete on PUBACK.

Live records go first, alarms ahead of them, each handed over already leased by the commit that
made it durable (no lease of its own to wait behind the next commit); the backlog (what was
queued when the connection came up) is replayed behind them, paced.  PUBACKs are taken in batches and acknowledged to the outbox off the event
loop.  A record no packet the broker takes can carry is trimmed (alarms, diagnostics) or moved to
the outbox's dead-letter lane, never deleted as delivered.  A connection with messages in flight
and no PUBACK for too long is declared lost, so a cut link is noticed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.contracts import Lane
from gateway.errors import AuthError, TransientError
from gateway.outbox import AsyncOutbox, Leased
from gateway.records import CONTENT_TYPE, SCHEMA_MAJOR, Joiner, RecordError, SeqMeta, wrap
from gateway.uplink import packets
from gateway.uplink.config import MqttSection
from gateway.uplink.connection import Session
from gateway.uplink.pacing import Pacer
from gateway.uplink.profiles import Profile

log = logging.getLogger(__name__)
# Publish-to-PUBACK latency is timed on one message in this many: enough for status and metrics,
# nothing measurable on the publish path.
_LATENCY_EVERY = 16

SCHEMA_VERSION = str(SCHEMA_MAJOR)
IDLE_POLL_S = 1.0  # wake at least this often: heartbeat, and records committed by another process
_ACK_STALL_S = 15.0  # messages in flight and no PUBACK for this long (at most keepalive): link dead
_PUBACK_AUTH = frozenset({0x87})  # not authorized (a broker policy forbids the topic)
# The broker will never take this record, however often it is sent: it goes to the dead-letter lane.
_PUBACK_NEVER = frozenset({0x99})  # payload format invalid
# Acknowledged records deleted together: up to this many, waiting at most this long for them.
_ACK_GATHER = 256
_ACK_GATHER_S = 0.005
# MQTT 3.1.1: a connection the broker ends this soon after a publish may have been ended by it.
_OVERSIZE_CLOSE_S = 2.0
# MQTT 3.1.1: connections a joined message may end, at most, while the search for the broker's
# silent packet limit goes on (a bisection: a few for any batch_bytes); then joins keep to what
# the broker took.
_JOIN_PROBES = 6


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


class Delivery:
    """Leases, publishes and acknowledges, on whichever connection :meth:`serve` is given."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        config: MqttSection,
        profile: Profile,
        topic: Callable[[str, dict[str, str] | None], str],
        beat: Callable[[float], None],
        *,
        topic_root: str,
    ) -> None:
        self._outbox = outbox
        self._cfg = config
        self._profile = profile
        self._topic = topic
        self._beat = beat
        self.topic_root = topic_root  # in the message that names what the broker must allow
        self.counters = UplinkCounters()
        self.delivered = 0
        self.publish_latency_s: collections.deque[float] = collections.deque(maxlen=256)  # sampled
        self.epoch = 0
        self.backlog_through = 0  # records up to this id are the backlog of the current connection
        self._replay = Pacer(
            _min(config.replay_msgs_per_s, profile.publishes_per_s),
            _min(config.replay_bytes_per_s, profile.bytes_per_s),
            now=time.monotonic(),
        )
        self._limit = Pacer(profile.publishes_per_s, profile.bytes_per_s, now=time.monotonic())
        self._oversize_seen = False  # logged at ERROR once per run of oversize records, then DEBUG
        # MQTT 3.1.1: record id -> connections the broker ended with it the oldest unacknowledged
        # publish; cleared by its PUBACK.  And the smallest packet found too large, as a limit.
        self._suspects: dict[int, int] = {}
        self._learned_max: int | None = None
        # The largest 3.1.1 PUBLISH the broker acknowledged: a record no larger than that cannot be
        # what it ends connections for (a flaky link can end three in a row with it in flight).
        self._acked_max = 0
        # MQTT 3.1.1: the smallest joined PUBLISH the broker ended a connection at (its first record
        # is not to blame for the others' bytes), and how many it ended so: see :meth:`_join_max`.
        self._join_refused: int | None = None
        self._join_refusals = 0
        self._sizes: dict[int, int] = {}  # record id -> PUBLISH bytes, while in flight (3.1.1)
        self._releasing: set[asyncio.Future[None]] = set()
        # Alarms handed over by a commit while a lease is under way: that lease may hold older
        # ones, so these wait for it and are queued in id order with what it brings.
        self._leasing = 0
        self._parked: list[Leased] = []
        # Features windows are held and joined (uplink.mqtt.batch_s) where a topic is a subject's;
        # a static topic carries one record's sequence in its properties, so not there.
        self._batch_s = config.batch_s if config.batch_s > 0 and not profile.static_topic else None
        self._batch_bytes = min(config.batch_bytes, profile.max_payload_bytes)

    async def start(self, session: Session, epoch: int) -> None:
        """Prepare for a new connection: the epoch, the properties, where the backlog ends."""
        self.epoch = epoch
        self._sizes.clear()  # the last connection's unacknowledged publishes go again
        session.props_head = packets.record_head(SCHEMA_VERSION, epoch, self._cfg.message_expiry_s)
        self.backlog_through = await self._outbox.last_id()

        def after_read() -> None:
            if session.live or session.backlog:
                self.pump(session)

        session.after_read = after_read

    async def serve(self, session: Session) -> None:
        """Deliver until the connection is lost (its error is raised) or the task is cancelled."""
        self._parked = []
        self._outbox.hand_alarms_to(lambda alarms: self._take_alarms(session, alarms))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_commits(session), name="uplink-mqtt:commits")
                tg.create_task(self._acker(session), name="uplink-mqtt:acker")
                await self._publish_loop(session)
        finally:
            # Alarms committed from now on are leased by the next connection; those handed over
            # until now are in session.leased, released by finish().
            self._outbox.hand_alarms_to(None)

    def _take_alarms(self, session: Session, alarms: list[Leased]) -> None:
        """Alarms leased by their own commit: queued ahead of the live records and published now."""
        for item in alarms:
            session.leased[item.id] = len(item.payload)
        self._parked += alarms
        if not self._leasing:
            self._queue_parked(session)
            self.pump(session)

    def _queue_parked(self, session: Session) -> None:
        """Put handed-over alarms into the live queue, every alarm there in id order, ahead of the rest."""
        if not self._parked:
            return
        live = session.live
        alarms = sorted([*(i for i in live if i.lane is Lane.ALARMS), *self._parked], key=lambda i: i.id)
        rest = [i for i in live if i.lane is not Lane.ALARMS]
        self._parked = []
        live.clear()
        live.extend(alarms)
        live.extend(rest)

    async def finish(self, session: Session) -> None:
        """Delete what was acknowledged, release the rest for the next connection."""
        self.take_acks(session)
        self._suspect_oversize(session)
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

    def _suspect_oversize(self, session: Session) -> None:
        """MQTT 3.1.1: note the record a connection the broker ended may have been ended for.

        With no maximum packet size to negotiate, a broker ends the connection of a client that
        sends a larger packet.  It handles packets in order, so the one it stopped at is the oldest
        publish not acknowledged; a record that is that one, again and again, is taken as too
        large (see :meth:`_publish`).  A PUBACK clears the suspicion.
        """
        if self._cfg.protocol == "5" or not session.ended_by_peer or not session.by_mid:
            return
        if time.monotonic() - session.last_publish > _OVERSIZE_CLOSE_S:
            return  # a broker restart or a network fault, not an answer to a publish
        mid, rid = next(iter(session.by_mid.items()))
        size = self._sizes.get(rid, 0)
        if session.joined.get(mid) and size > self._acked_max:
            # A joined message: its size, not its first record, is what may be too large.  Join
            # smaller, between what the broker took and this (see _join_max): else the records go
            # out one by one, are taken, and the next batch ends the connection again, every batch.
            self._join_refused = size if self._join_refused is None else min(self._join_refused, size)
            self._join_refusals += 1
            log.warning(
                "uplink mqtt: the broker ended the connection with a joined message of %d bytes the oldest "
                "in flight: taken as over its maximum packet size (MQTT 3.1.1 does not announce it); "
                "joined messages are now kept to %s bytes (%d taken, %d refused, %d of at most %d "
                'connections ended so): set the broker\'s limit higher, lower batch_bytes or use protocol = "5"',
                size,
                self._join_max(),
                self._acked_max,
                self._join_refused,
                self._join_refusals,
                _JOIN_PROBES,
            )
            return
        self._suspects[rid] = self._suspects.get(rid, 0) + 1
        log.debug(
            "uplink mqtt: the broker ended the connection with record %d the oldest in flight (%d time(s))",
            rid,
            self._suspects[rid],
        )

    def _join_probing(self) -> bool:
        """MQTT 3.1.1: whether joins still look for the broker's limit above what it took."""
        refused = self._join_refused
        if refused is None or self._join_refusals >= _JOIN_PROBES:
            return False
        return refused - self._acked_max > refused // 8  # closer than that: not worth a reconnect

    def _join_max(self) -> int | None:
        """MQTT 3.1.1: the largest joined PUBLISH to send: between the largest taken and the smallest refused.

        A bisection: each connection a joined message ends halves the gap at least, and each larger
        message taken narrows it from below; nothing is sent at or above a refused size again.  The
        search stops after _JOIN_PROBES ended connections or within an eighth of the refused size,
        and joins keep to the largest message taken.
        """
        refused = self._join_refused
        if refused is None or self._acked_max >= refused:
            return None  # nothing refused, or as large was taken since: the link ended that one
        if self._join_probing():
            return (self._acked_max + refused) // 2
        return self._acked_max

    def _properties(self, session: Session, seq: int, historical: bool) -> packets.Packed | None:
        # Encoded by hand: paho's Properties object costs more per message than the rest of the path.
        if self._cfg.protocol != "5":
            return None
        return packets.record_properties(session.props_head, seq, historical)

    async def _watch_commits(self, session: Session) -> None:
        while True:
            if await self._outbox.wait_committed(IDLE_POLL_S):
                session.more_live = True
                session.wake.set()

    async def _publish_loop(self, session: Session) -> None:
        cfg = self._cfg
        live, backlog = session.live, session.backlog
        session.replaying = self.backlog_through > 0
        replay_started = time.monotonic()
        while True:
            session.wake.clear()  # anything that happens from here on wakes the wait below
            self._raise_if_lost(session)
            self._beat(time.monotonic())
            self._check_stalled(session, time.monotonic())
            self.take_acks(session)
            # Leasing is a worker-thread hop and a transaction: only when something may be there
            # (records committed since the last look) and the local queue runs short.
            # Held windows wait for their batch, not for a PUBACK: they leave room for alarms.
            free = cfg.max_inflight - len(session.leased) + session.held_windows()
            if session.more_live and free > 0 and len(live) < cfg.batch:
                want = min(free, cfg.batch)
                session.more_live = False  # a commit during the lease sets it again
                got = await self._lease(session, want, after_id=self.backlog_through)
                live.extend(got)
                self._queue_parked(session)
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
            wait = self.pump(session)
            if session.wake.is_set():
                await asyncio.sleep(0)  # let paho's reader and the acker run before looking again
                continue
            try:
                async with asyncio.timeout(wait):
                    await session.wake.wait()
            except TimeoutError:
                session.more_live = True  # a poll now and then, whatever the commit signal said

    def pump(self, session: Session) -> float:
        """Publish what room and pacing allow, live first; return how long pacing asks to wait.

        Called by the publish loop and straight from paho's read handler, so a PUBACK frees room
        and the next message goes out in the same loop turn, as in paho's own threaded loop.
        """
        if session.lost is not None or not session.connected:
            return IDLE_POLL_S
        self.take_acks(session)
        live, backlog = session.live, session.backlog
        wait = IDLE_POLL_S
        now = time.monotonic()
        room = session.send_limit - len(session.by_mid)
        published = 0
        limited = not self._limit.unlimited
        paced = limited or not self._replay.unlimited
        while live and room > 0:
            if self._batch_s is not None and live[0].topic.startswith("features/"):
                self._hold(session, live.popleft(), now)
                continue
            pause = self._limit.wait_for(len(live[0].payload), now) if limited else 0.0
            if pause > 0:
                wait = min(wait, pause)
                break
            self._publish(session, live.popleft(), historical=False, now=now)
            room -= 1
            published += 1
        if session.held and room > 0:
            sent, pause = self._send_held(session, now, limited)
            room = self._room(session)
            published += sent
            wait = min(wait, pause)
        while backlog and not live and room > 0:
            size = len(backlog[0].payload)
            pause = max(self._limit.wait_for(size, now), self._replay.wait_for(size, now)) if paced else 0.0
            if pause > 0:
                wait = min(wait, pause)
                break
            items = self._backlog_run(backlog)
            rest = self._publish_joined(session, items, historical=True, now=now)
            backlog.extendleft(reversed(rest))  # no room left: still leased, sent after the next PUBACK
            room = self._room(session)
            published += 1
            session.replayed += len(items) - len(rest)
        if published and session.client.want_write():
            session.client.loop_write()  # now, not one loop turn later: the socket is non-blocking
        short = self._cfg.batch // 2
        if (session.more_live and len(live) < short) or (session.replaying and len(backlog) < short):
            session.wake.set()  # running short: the publish loop leases more
        return wait

    def _hold(self, session: Session, item: Leased, now: float) -> None:
        """Keep a features window for its topic's next message (it is durable in the outbox)."""
        since, items = session.held.get(item.topic, (now, []))
        items.append(item)
        session.held[item.topic] = (since, items)

    def _send_held(self, session: Session, now: float, limited: bool) -> tuple[int, float]:
        """Publish the held topics that are due (oldest batch_s old, batch_bytes full, or a drain).

        Returns (messages published, seconds until the next is due).
        """
        hold = self._batch_s or 0.0
        sent, wait = 0, IDLE_POLL_S
        for topic, (since, items) in list(session.held.items()):
            size = sum(len(i.payload) for i in items)
            if not session.flush and now - since < hold and size < self._batch_bytes:
                wait = min(wait, since + hold - now)
                continue
            if self._room(session) <= 0:
                break
            pause = self._limit.wait_for(size, now) if limited else 0.0
            if pause > 0:
                wait = min(wait, pause)
                break
            del session.held[topic]
            before = len(session.by_mid)
            rest = self._publish_joined(session, items, historical=False, now=now)
            sent += len(session.by_mid) - before
            if rest:  # no room left: held again, first in line, sent after the next PUBACK
                session.held[topic] = (since, rest)
                break
        return sent, max(wait, 0.0)

    def _room(self, session: Session) -> int:
        """PUBLISHes the broker's Receive Maximum still allows before a PUBACK."""
        return session.send_limit - len(session.by_mid)

    def _join_limit(self, session: Session, topic: str, properties: packets.Packed | None) -> int:
        """Payload bytes a joined message may have: batch_bytes, within the broker's packet limit."""
        v5 = self._cfg.protocol == "5"
        limits = (session.max_packet,) if v5 else (self._learned_max, self._join_max())
        return self._payload_within(
            topic, min((p for p in limits if p is not None), default=None), properties
        )

    def _pair_limit(self, topic: str) -> int | None:
        """MQTT 3.1.1: payload bytes two records may join to while the limit is searched for, or None.

        Below the smallest refused size, as the bisection's own limit may be below any two records'
        (its lower bound is then a record sent alone): a pair taken raises that bound.
        """
        if self._cfg.protocol == "5" or not self._join_probing() or self._join_refused is None:
            return None
        limits = (self._learned_max, self._join_refused - 1)
        return self._payload_within(topic, min(p for p in limits if p is not None), None)

    def _payload_within(self, topic: str, packet: int | None, properties: packets.Packed | None) -> int:
        """batch_bytes, or less: what a message's payload may have to make a packet of at most ``packet``."""
        limit = self._batch_bytes
        if packet is not None:
            v5 = self._cfg.protocol == "5"
            overhead = packets.publish_size(topic, packet, properties, v5=v5) - packet
            limit = min(limit, packet - overhead)
        return limit

    def _backlog_run(self, backlog: collections.deque[Leased]) -> list[Leased]:
        """The backlog's next records to replay in one message: the first, and its topic's next ones.

        Taken out of the backlog.  Records of one topic keep their order; other topics' records,
        interleaved with them, wait for their own message.
        """
        first = backlog.popleft()
        if self._batch_s is None or not first.topic.startswith("features/"):
            return [first]
        run = [first]
        size = len(first.payload)
        for item in backlog:
            if item.topic != first.topic:
                continue
            size += len(item.payload)
            if size > self._batch_bytes:
                break
            run.append(item)
        for item in run[1:]:
            backlog.remove(item)
        return run

    def _publish_joined(
        self, session: Session, items: list[Leased], *, historical: bool, now: float
    ) -> list[Leased]:
        """Publish records of one topic, as many per message as join (schema 4), while there is room.

        Returns the records not published for want of room (the broker's Receive Maximum counts
        PUBLISHes, not calls): still leased, they go first once a PUBACK frees room.
        """
        if len(items) == 1 or any(i.id in self._suspects for i in items):
            # One by one where a record may be what a 3.1.1 broker ends connections for.
            return self._publish_each(session, items, historical=historical, now=now)
        topic = self._topic(items[0].topic, None)
        limit = self._join_limit(session, topic, self._properties(session, items[-1].id, historical))
        pair = self._pair_limit(topic)
        groups: list[tuple[list[Leased], Joiner | None]] = []
        joiner: Joiner | None = None
        for item in items:
            if joiner is not None and joiner.add(item.payload, item.id):
                groups[-1][0].append(item)
                continue
            if pair is not None and joiner is not None and len(groups[-1][0]) == 1:
                # A record the limit leaves alone: joined with the next as a probe, if the two fit.
                probe = Joiner(self.epoch, historical=historical, batch_s=self._batch_s, limit=pair)
                first = groups[-1][0][0]
                if probe.add(first.payload, first.id) and probe.add(item.payload, item.id):
                    groups[-1] = ([first, item], probe)
                    joiner = None
                    continue
            joiner = Joiner(self.epoch, historical=historical, batch_s=self._batch_s, limit=limit)
            if not joiner.add(item.payload, item.id):
                joiner = None  # goes alone (an older schema, or unreadable: handled there)
            groups.append(([item], joiner))
        for n, (group, joined) in enumerate(groups):
            if self._room(session) <= 0:
                return [i for g, _ in groups[n:] for i in g]
            if (
                joined is not None
                and len(group) > 1
                and self._send_joined(session, group, joined.payload(), historical=historical, now=now)
            ):
                continue
            rest = self._publish_each(session, group, historical=historical, now=now)
            if rest:
                return rest + [i for g, _ in groups[n + 1 :] for i in g]
        return []

    def _publish_each(
        self, session: Session, items: list[Leased], *, historical: bool, now: float
    ) -> list[Leased]:
        """Publish records one a message while there is room; return those left for want of it."""
        for n, item in enumerate(items):
            if self._room(session) <= 0:
                return items[n:]
            self._publish(session, item, historical=historical, now=now)
        return []

    def _send_joined(
        self, session: Session, items: list[Leased], payload: bytes, *, historical: bool, now: float
    ) -> bool:
        """Publish one message of several records (a PUBACK acknowledges them all); False if too large."""
        first = items[0]
        topic = self._topic(first.topic, None)
        properties = self._properties(session, first.id, historical)
        if self._over_limit(session, topic, len(payload), properties) > 0:
            return False  # each alone, where the size limits are handled record by record
        info = session.client.publish(topic, payload, qos=1, retain=False, properties=cast(Any, properties))
        if info.rc != paho.MQTT_ERR_SUCCESS:
            session.lost = session.lost or TransientError(f"publish failed ({paho.error_string(info.rc)})")
            return True
        self._sent(session, first.id, info.mid, topic, len(payload), historical=historical, now=now)
        session.joined[info.mid] = [i.id for i in items[1:]]
        counts = len(items) - 1
        if historical:
            self.counters.historical += counts
        self.counters.republished += sum(1 for i in items[1:] if i.attempts)
        self.counters.published += counts
        if first.attempts:
            self.counters.republished += 1
        return True

    async def _acker(self, session: Session) -> None:
        """Delete acknowledged records in batches while publishing goes on."""
        # A delete costs more per commit than per row (47 rows a commit: 5.4 us a record; 256:
        # 3.5 us): while PUBACKs stream in, gather a few milliseconds' worth.  At most a quarter of
        # the in-flight window waits, so publishing never runs out of room for it.
        gather = max(1, min(_ACK_GATHER, self._cfg.max_inflight // 4))
        while True:
            await session.ack_wake.wait()
            session.ack_wake.clear()
            self.take_acks(session)
            if 0 < len(session.acked_ids) < gather and not (session.to_release or session.to_dead_letter):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_ACK_GATHER_S):
                        while len(session.acked_ids) < gather and session.lost is None:
                            session.ack_wake.clear()
                            await session.ack_wake.wait()
                            self.take_acks(session)
            if session.to_release:
                ids, session.to_release = session.to_release, []
                await self._outbox.release(ids)
            if session.to_dead_letter:
                moving, session.to_dead_letter = session.to_dead_letter, []
                for rid, why in moving:
                    await self._outbox.dead_letter([rid], why)
                    session.leased.pop(rid, None)
                session.wake.set()
            if session.acked_ids:
                ids, session.acked_ids = session.acked_ids, []
                await self._ack(session, ids)
                session.wake.set()  # the window has room again

    def _check_stalled(self, session: Session, now: float) -> None:
        """End a connection that has had messages (records, or only the status) in flight and no PUBACK for too long.

        A cut link drops nothing and refuses nothing: TCP retransmits with a backoff that, after a
        minute's cut, waits half a minute more after the link is back, and MQTT's keep-alive
        notices only after one and a half periods.  A fresh connection, probed every second, is
        up within seconds instead; what was in flight is sent again (duplicates, counted).
        """
        stall = min(_ACK_STALL_S, float(self._cfg.keepalive_s))
        if session.lost is not None:
            return
        if session.by_mid and now - session.last_ack > stall:
            session.lost = TransientError(
                f"no PUBACK for {stall:g} s with {len(session.by_mid)} message(s) in flight: "
                "the link looks dead: reconnecting"
            )
        # With no record to send (an empty outbox, a full disk refusing features) the status is the
        # only publish: unanswered as long, the broker is as dead, well before the keep-alive says so.
        elif session.status_since is not None and now - max(session.status_since, session.last_ack) > stall:
            session.lost = TransientError(
                f"no PUBACK for {stall:g} s for the status message: the link looks dead: reconnecting"
            )

    def _raise_if_lost(self, session: Session) -> None:
        if session.lost is not None:
            raise session.lost

    def _publish(self, session: Session, item: Leased, *, historical: bool, now: float) -> None:
        try:
            payload = wrap(item.payload, self._meta(item, historical))
        except RecordError as exc:
            # Damaged on disk: no broker can make sense of it, and it must not end the uplink.
            log.error(
                "uplink mqtt: record %d cannot be read: %s: moved to the dead-letter lane", item.id, exc
            )
            self.counters.dead_lettered += 1
            session.to_dead_letter.append((item.id, f"unreadable: {exc}"))
            session.ack_wake.set()
            return
        props: dict[str, str] | None = None
        if self._profile.static_topic:
            props = {
                "seq": str(item.id),
                "ep": str(self.epoch),
                "sv": SCHEMA_VERSION,
                "$.ct": CONTENT_TYPE,
            }
            if historical:
                props["hist"] = "1"
        topic = self._topic(item.topic, props)
        properties = self._properties(session, item.id, historical)
        over = self._over_limit(session, topic, len(payload), properties)
        if self._suspects.get(item.id, 0) >= self._cfg.oversize_disconnects:
            over = max(over, self._convict(item, topic, len(payload)))
        if over > 0:
            smaller = packets.trimmed(item.payload, over)
            if smaller is not None:
                payload = wrap(smaller, self._meta(item, historical))
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
        self._sent(session, item.id, info.mid, topic, len(payload), historical=historical, now=now)
        if item.attempts:
            self.counters.republished += 1

    def _sent(
        self, session: Session, rid: int, mid: int, topic: str, size: int, *, historical: bool, now: float
    ) -> None:
        """Account a message handed to paho (its first record ``rid``)."""
        if not session.by_mid:
            session.last_ack = now  # the wait for a PUBACK starts with the first message in flight
        session.last_publish = now
        session.by_mid[mid] = rid
        if self._cfg.protocol != "5":
            self._sizes[rid] = packets.publish_size(topic, size, None, v5=False)
        if self.counters.published % _LATENCY_EVERY == 0:
            session.sent_at[mid] = now
        self._limit.take(size, now)
        if historical:
            self._replay.take(size, now)
            self.counters.historical += 1
        self.counters.published += 1

    def _meta(self, item: Leased, historical: bool) -> SeqMeta:
        held = self._batch_s if item.topic.startswith("features/") else None
        return SeqMeta(item.id, self.epoch, historical, held)

    def _over_limit(
        self, session: Session, topic: str, payload_len: int, properties: packets.Packed | None
    ) -> int:
        """Bytes by which this PUBLISH exceeds the profile's payload or the broker's packet limit."""
        over = payload_len - self._profile.max_payload_bytes
        limit = session.max_packet if self._cfg.protocol == "5" else self._learned_max
        if limit is not None:
            size = packets.publish_size(topic, payload_len, properties, v5=self._cfg.protocol == "5")
            over = max(over, size - limit)
        return over

    def _convict(self, item: Leased, topic: str, payload_len: int) -> int:
        """A record whose publish ended the connection too often: too large; by how much, at least.

        The broker's limit is below its packet: later records of that size are handled at once.
        """
        size = packets.publish_size(topic, payload_len, None, v5=False)
        if size <= self._acked_max:
            # The broker took a packet this large before: the link, not the size, ended them.
            log.debug(
                "uplink mqtt: record %d (%d bytes) was in flight at %d ended connections, but the broker "
                "acknowledged %d bytes before: not taken as too large",
                item.id,
                size,
                self._suspects.get(item.id, 0),
                self._acked_max,
            )
            self._suspects.pop(item.id, None)
            return 0
        if self._learned_max is None or size - 1 < self._learned_max:
            self._learned_max = size - 1
            log.warning(
                "uplink mqtt: the broker ended the connection %d times at record %d (%d bytes): taken as "
                "over the broker's maximum packet size, which MQTT 3.1.1 does not announce; packets of "
                "%d bytes and more are now handled as too large: set the broker's limit higher or use "
                'protocol = "5"',
                self._suspects.get(item.id, 0),
                item.id,
                size,
                size,
            )
        self._suspects.pop(item.id, None)
        return max(1, size - self._learned_max)

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
        if self._cfg.protocol != "5" and self._learned_max is not None:
            limit = f"maximum packet size (found at {self._learned_max + 1} bytes, MQTT 3.1.1)"
        elif session.max_packet:
            limit = f"maximum packet size {session.max_packet}"
        else:
            limit = "payload limit"
        session.to_dead_letter.append((item.id, f"{over} bytes over the broker's {limit}"))
        session.ack_wake.set()

    def take_acks(self, session: Session) -> None:
        """Move PUBACKs handed over by paho's thread into the list of ids to delete."""
        session.ack_scheduled = False
        acks = session.acks
        if acks:
            session.last_ack = time.monotonic()
        while acks:
            mid, code = acks.popleft()
            if mid == session.status_mid:
                session.status_acked.set()
                session.status_since = None
                continue
            rid = session.by_mid.pop(mid, None)
            if rid is None:
                continue
            more = session.joined.pop(mid, None) if session.joined else None
            sent = session.sent_at.pop(mid, None)
            if sent is not None and code < 0x80:
                self.publish_latency_s.append(time.monotonic() - sent)
            if code in _PUBACK_NEVER:
                self.counters.refused += 1
                # Every record the message carried is moved, so every one is counted (joined windows).
                self.counters.dead_lettered += 1 + len(more or ())
                name = ReasonCode(PacketTypes.PUBACK, identifier=code).getName()
                log.error(
                    "uplink mqtt: the broker refused record %d (and %d joined with it) for good (%s): moved "
                    "to the dead-letter lane",
                    rid,
                    len(more or ()),
                    name,
                )
                session.to_dead_letter.append((rid, f"refused by the broker: {name}"))
                session.to_dead_letter += [(r, f"refused by the broker: {name}") for r in more or ()]
                continue
            if code >= 0x80:
                self.counters.refused += 1
                for r in (rid, *(more or ())):
                    session.leased.pop(r, None)
                    session.to_release.append(r)  # by the acker, off the loop: release waits on a lock
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
            if more:
                session.acked_ids += more
            if self._sizes:
                self._acked_max = max(self._acked_max, self._sizes.pop(rid, 0))
            if self._suspects:
                self._suspects.pop(rid, None)
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
        live = "through_id" not in where  # a backlog lease holds no alarm newer than a handed one
        self._leasing += live
        try:
            got = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_orphans)
            raise
        finally:
            self._leasing -= live
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


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
