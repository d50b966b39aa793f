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
* A retained status topic says "online" and, through the Will, "offline", with the run, the drop
  counters by lane and reason, the newest loss and the degraded state: the figures diagnostics and
  the ``STATUS=`` line show, from one source (:meth:`gateway.outbox.AsyncOutbox.report`).

* A record no packet the broker takes can carry is not deleted as delivered: an alarm or a
  diagnostic goes without its optional detail (with a note), anything else to the outbox's
  dead-letter lane, counted (sizes: :mod:`gateway.uplink.packets`).

The pieces: :class:`~gateway.uplink.connection.Connection` is the transport, a reusable async
context manager for one connection; :meth:`MqttUplink.run` is the one reconnect loop around it
(capped, jittered backoff, cut short by :func:`gateway.uplink.transport.probe`), which also keeps
the status topic; :class:`~gateway.uplink.delivery.Delivery` is the stage that leases, publishes
and acknowledges on one connection.  The log shows state changes only: connected, lost,
reconnected, refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import backoff
from gateway.cleanup import cancel_requested, run_shielded
from gateway.errors import ConfigError, EdgetwinError
from gateway.liveness import Heartbeat
from gateway.outbox import AsyncOutbox
from gateway.records import StatusLoss, StatusRecord, encode_status
from gateway.records.topics import azure_topic
from gateway.uplink import transport
from gateway.uplink.config import MqttSection, is_loopback
from gateway.uplink.connection import Connection, Session
from gateway.uplink.delivery import IDLE_POLL_S, SCHEMA_VERSION, Delivery
from gateway.uplink.profiles import PROFILES

log = logging.getLogger(__name__)

_CLEANUP_DEADLINE_S = 5.0
_MONITOR_EVERY_S = 1.0  # cheap: the status is built from counters in memory
# Counters that keep growing (a lane over its budget) republish the status at most this often; a
# change of the degraded state goes out at once.
_STATUS_MIN_GAP_S = 2.0
_CERT_CHECK_EVERY_S = 6 * 3600.0
# While backing off, how often to check whether the step that failed would pass now: a broker
# listening again is used within about this long.  A TLS probe costs the broker a handshake.
_PROBE_EVERY_S = 1.0
_PROBE_TLS_EVERY_S = 2.0
_HEALTHY_SESSION_S = 10.0  # a connection that lasted this long resets the backoff
_TOPICS_KEPT = 4096  # full topics remembered (subjects x lanes); cleared, not grown, past this


class MqttUplink:
    """Delivers the outbox to an MQTT broker; see the module docstring for the contract."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        config: MqttSection,
        gateway_id: str,
        *,
        password: str | None = None,
        run: int | None = None,
        record_time: Callable[[float], float] | None = None,
    ) -> None:
        self._outbox = outbox
        self._run = run  # the gateway's boot counter, named in the status
        # Wall clock to the records' clock, so the status's loss time reads like a record's time.
        self._record_time = record_time or (lambda t_wall: round(t_wall, 3))
        self._cfg = config
        self._profile = PROFILES[config.profile]
        self.client_id = gateway_id
        self.topic_root = f"{config.topic_prefix}/{gateway_id}"
        self.status_topic = f"{self.topic_root}/status"
        self._topics: dict[str, str] = {}
        self._password = password
        # Progress and bounded waits, as the supervisor reads them (gateway.liveness).
        self._heart = Heartbeat(stale_after_s=30.0)
        self.pulse = self._heart.pulse
        self.problem: str | None = "not connected yet"  # why the uplink is degraded; None when connected
        self.connected = False
        self._session: Session | None = None
        self._status_seen: StatusRecord | None = None  # the last "online" status published
        self._next_cert_check = 0.0
        self._connection = Connection(
            config, self._profile, gateway_id, password=password, will=self._will, bounded=self._bounded
        )
        self._delivery = Delivery(
            outbox, config, self._profile, self._topic, self._set_beat, topic_root=self.topic_root
        )
        self.counters = self._delivery.counters
        # The downlink (gateway.downlink.unit): subscribes on each connection, None when off.
        self.downlink: Any = None

    def retarget(self, config: MqttSection) -> None:
        """Connect with ``config`` from the next connection on: a revision's broker address, CA or timings.

        Only the connection's keys may differ from the running ones (gateway.downlink.diff): the
        client id, the profile, the delivery and the outbox stay as they are.
        """
        self._cfg = config
        self._connection = Connection(
            config,
            self._profile,
            self.client_id,
            password=self._password,
            will=self._will,
            bounded=self._bounded,
        )

    @property
    def delivered(self) -> int:
        """Records acknowledged by the broker (and deleted from the outbox) since start."""
        return self._delivery.delivered

    @property
    def publish_latency_s(self) -> collections.deque[float]:
        """Sampled publish-to-PUBACK times of the newest messages, seconds."""
        return self._delivery.publish_latency_s

    @property
    def backlog_through(self) -> int:
        """Records up to this id are the backlog of the current connection."""
        return self._delivery.backlog_through

    def _set_beat(self, now: float) -> None:
        self._heart.beat(now)

    @property
    def last_beat(self) -> float:
        """Monotonic time of the last sign of life; "now" while inside a wait bounded by a timeout."""
        return self._heart.last_beat

    @last_beat.setter
    def last_beat(self, value: float) -> None:
        self._heart.beat(value)

    def _bounded(self, what: str, seconds: float) -> contextlib.AbstractContextManager[None]:
        """Report alive while inside a wait that its own timeouts end within ``seconds``."""
        return self._heart.bounded(what, seconds)

    @property
    def held_windows(self) -> int:
        """Features windows held for their batch now (``batch_s``); 0 without a connection."""
        session = self._session
        return 0 if session is None else session.held_windows()

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
        # One string per subject and lane, built once: this runs for every record sent.
        topic = self._topics.get(relative)
        if topic is None:
            if len(self._topics) >= _TOPICS_KEPT:
                self._topics.clear()
            topic = self._topics[relative] = f"{self.topic_root}/{relative}"
        return topic

    def status(self, state: str, *, clean: bool = True) -> StatusRecord:
        """The status document now: run, drops by lane and reason, the newest loss, degraded state."""
        report = self._outbox.report()
        last = report.last
        loss = None
        if last is not None:
            loss = StatusLoss(last.lane, last.reason, last.n, self._record_time(last.t_wall))
        return StatusRecord(
            state,
            ep=self._delivery.epoch,
            run=self._run,
            clean=clean if state == "offline" else None,
            dropped=report.by_lane,
            drops={lane: dict(r) for lane, r in report.drops.items() if any(r.values())},
            degraded=report.degraded_token,
            loss=loss,
        )

    def _will(self) -> tuple[str, bytes]:
        # Read before each connection: the Will must name the epoch the records carry, not 0.
        self._delivery.epoch = self._outbox.outbox.epoch
        return self._status_topic(), encode_status(self.status("offline", clean=False))

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
                connection = self._connection
                async with connection as session:
                    if connection is not self._connection:
                        # Retargeted while this attempt was connecting: the session is on the
                        # replaced settings, and a revision must not be judged on it.
                        log.info("%s: connected on replaced settings; connecting with the new ones", where)
                        continue
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
                if cancel_requested():
                    raise asyncio.CancelledError from exc
                attempt += 1
                self.problem = str(exc.cause)
                if transport.reported_as(exc.cause) != reported:
                    reported = transport.reported_as(exc.cause)
                    retrying = "" if "retrying" in reported else "retrying; "
                    log.warning("%s (%srecords stay in the outbox)", exc.cause, retrying)
                else:
                    log.debug("still cannot connect (attempt %d): %s", attempt, exc.cause)
                await self._wait_retry(self._backoff(attempt), exc.stage)
            except EdgetwinError as exc:
                if cancel_requested():
                    raise asyncio.CancelledError from exc
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
                with self._bounded("probing the broker", 2 * cfg.connect_timeout_s + 3.0):
                    passes = await transport.probe(cfg, self._connection.tls, failed, cfg.connect_timeout_s)
                if passes:
                    log.debug("uplink mqtt: the %s step passes again: connecting now", failed.name.lower())
                    return
                now = time.monotonic()
                next_probe = now + every
                continue
            await asyncio.sleep(min(left, max(0.0, next_probe - now), IDLE_POLL_S))
            now = time.monotonic()

    def _backoff(self, attempt: int) -> float:
        return backoff.delay(attempt, self._cfg.reconnect_min_s, self._cfg.reconnect_max_s)

    async def _serve(self, session: Session) -> None:
        """Deliver on one connection until it drops (TransientError) or the task is cancelled."""
        cfg = self._cfg
        self._session = session
        self.connected = True
        graceful = False

        try:
            await self._delivery.start(session, self._outbox.outbox.epoch)
            stats = await self._outbox.stats()
            self._publish_status(session, self.status("online"))
            if self.downlink is not None:
                self.downlink.attach(session.client, self.topic_root)
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
                    tg.create_task(self._monitor(session), name="uplink-mqtt:monitor")
                    await self._delivery.serve(session)
            except BaseExceptionGroup as group:
                if cancel_requested():  # our stop met a lost connection: the stop wins
                    raise asyncio.CancelledError from None
                raise _first(group) from None
        except asyncio.CancelledError:
            graceful = session.connected
            raise
        finally:
            self.connected = False
            self._session = None
            if self.downlink is not None:
                self.downlink.detach()
            await run_shielded(self._end_session(session, graceful), _CLEANUP_DEADLINE_S, who="uplink mqtt")

    async def _monitor(self, session: Session) -> None:
        """Republish the status when what it says changes; re-check our certificate now and then."""
        published = time.monotonic()
        while True:
            await asyncio.sleep(_MONITOR_EVERY_S)
            status, seen = self.status("online"), self._status_seen
            now = time.monotonic()
            if status != seen and (
                seen is None or status.degraded != seen.degraded or now - published >= _STATUS_MIN_GAP_S
            ):
                log.info(
                    "uplink mqtt: outbox drops now %s%s: sending the twin the status",
                    dict(status.dropped) or "none",
                    f", degraded ({status.degraded})" if status.degraded else "",
                )
                self._publish_status(session, status)
                published = now
            if time.monotonic() >= self._next_cert_check:
                self._next_cert_check = time.monotonic() + _CERT_CHECK_EVERY_S
                # Parsing a certificate takes a while: off the event loop.
                await asyncio.to_thread(self._connection.check_certificate)

    def _publish_status(self, session: Session, status: StatusRecord) -> paho.MQTTMessageInfo:
        if status.state == "online":
            self._status_seen = status
        props = None
        if self._cfg.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ContentType = "application/json"
            props.UserProperty = [("sv", SCHEMA_VERSION)]
        info = session.client.publish(
            self._status_topic(),
            encode_status(status),
            qos=1,
            retain=session.retain,
            properties=props,
        )
        session.status_mid = info.mid
        if session.status_since is None:
            session.status_since = time.monotonic()
        return info

    def rebirth(self) -> bool:
        """Publish the status record again now (a twin that lost it asks over the downlink)."""
        session = self._session
        if session is None or not session.connected:
            return False
        self._publish_status(session, self.status("online"))
        return True

    async def _end_session(self, session: Session, graceful: bool) -> None:
        """Delete what was acknowledged, release the rest, say goodbye if the link is still up."""
        try:
            await self._delivery.finish(session)
        finally:
            if graceful:
                session.status_acked.clear()
                with contextlib.suppress(Exception):
                    self._publish_status(session, self.status("offline", clean=True))
                    async with asyncio.timeout(1.0):
                        while not session.status_acked.is_set():
                            await asyncio.sleep(0.01)
                            self._delivery.take_acks(session)

    async def drain(self, deadline: float) -> None:
        """Wait while connected until everything queued is acknowledged or the deadline passes."""
        while time.monotonic() < deadline:
            session = self._session
            if session is None or not session.connected:
                return  # nothing can leave now; the outbox keeps it
            if not session.leased and (await self._outbox.stats()).queued == 0:
                return
            if not session.flush:
                session.flush = True  # held windows go now, not when their batch is due
                session.wake.set()
            await asyncio.sleep(0.05)


def check_certificates(config: MqttSection, now: dt.datetime | None = None) -> list[str]:
    """Lines for ``edgetwin check``: each certificate of the uplink, its subject and expiry."""
    from gateway.uplink import certs  # noqa: PLC0415 - cryptography, not loaded into the service

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
