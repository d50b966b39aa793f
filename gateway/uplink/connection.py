"""One MQTT connection at a time: a reusable async context manager around paho, as aiomqtt does.

``async with connection as session`` opens a connection - each step bounded, see
:mod:`gateway.uplink.transport` - and waits for CONNACK; the block runs with the connection up, and
leaving it closes the connection.  A failure to connect is an :class:`~transport.AttemptError`
saying at which step; the reconnect loop around it (``MqttUplink.run``) decides when to try again.
The same object is entered again for the next connection.

paho-mqtt's network loop runs on the event loop (its external-loop interface: a reader and a
writer on the socket, ``loop_misc`` once a second): one thread, so no lock or GIL hand-over per
message, and PUBACKs are handled in batches.  Only the TLS handshake runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import AuthError, ClockBehindError, ConfigError, EdgetwinError, TransientError
from gateway.outbox import Leased
from gateway.uplink import expiry, tls, transport
from gateway.uplink.config import MqttSection
from gateway.uplink.profiles import Profile, azure_username

log = logging.getLogger(__name__)

# A broker that closes the connection between the TLS handshake and CONNACK is refusing our client
# certificate more often than it is restarting; after this many in a row it is reported as such.
_SILENT_REFUSALS_FOR_AUTH = 3

# CONNACK reason codes (MQTT 5 numbering; paho maps 3.1.1 return codes onto them).
_CONNACK_AUTH = frozenset({0x86, 0x87, 0x8A, 0x8C, 0x85, 0x8B})  # bad credentials, not authorized, banned...
_CONNACK_TRANSIENT = frozenset({0x88, 0x89, 0x97, 0x9F, 0x80, 0x83})  # unavailable, busy, quota, rate...
_CONNACK_REDIRECT = frozenset({0x9C, 0x9D})  # use another server, server moved


# Queued packets joined into one send (a few TLS records; the socket takes it in one call).
_JOIN_BYTES = 64 * 1024


def _joinable(packet: Any) -> bool:
    """A queued packet whose completion paho does not act on: everything but QoS 0 PUBLISH, DISCONNECT."""
    command = packet["command"] & 0xF0
    return command != paho.DISCONNECT and not (command == paho.PUBLISH and packet["qos"] == 0)


_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
_PUBACK_REASONS: dict[int, ReasonCode] = {}
_PUBACK_OK = frozenset({0x00, 0x10})


def _puback_reason(code: int) -> ReasonCode:
    """One shared ReasonCode per PUBACK code."""
    reason = _PUBACK_REASONS.get(code)
    if reason is None:
        reason = _PUBACK_REASONS[code] = ReasonCode(PacketTypes.PUBACK, identifier=code)
    return reason


class PahoClient(paho.Client):
    """paho's client reading the socket in large chunks.

    paho asks for one byte, then the length, then the rest of each packet: three TLS reads per
    PUBACK.  Serving those from a buffer filled by one large read takes two thirds of the reads
    (and a fifth of the CPU per message) away.
    """

    _rbuf = b""
    _rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(65536)  # BlockingIOError when there is nothing: paho expects it
            if not data:
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        chunk = self._rbuf[self._rpos : end]
        self._rpos = end
        return chunk

    def buffered(self) -> bool:
        """True while read bytes wait in the buffer (the socket will not signal them)."""
        return self._rpos < len(self._rbuf)

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """A PUBACK without properties (what a broker sends for success) decoded without paho's objects.

        paho builds two ReasonCode objects and a Properties object for every PUBACK, a tenth of
        the event loop's CPU per record; the reason code and the empty properties are shared
        here (the callback only reads them).  Anything longer goes to paho.
        """
        packet = self._in_packet["packet"]
        size = len(packet)
        v5 = self._protocol == paho.MQTTv5
        code = packet[2] if size > 2 else 0
        plain = size == 2 or (v5 and (size == 3 or (size == 4 and packet[3] == 0)))
        # Success and "no matching subscribers" only: refusals take paho's path, with its checks.
        if cmd == "PUBACK" and plain and code in _PUBACK_OK:
            mid = (packet[0] << 8) | packet[1]
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, _puback_reason(code), _NO_PROPERTIES)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def _packet_write(self) -> MQTTErrorCode:
        """Write queued packets, those that need no completion step joined into one send.

        paho sends each packet on its own: one TLS record and one system call per PUBLISH, the
        largest single cost per message on the event loop.  Packets whose being written needs no
        action (everything but QoS 0 PUBLISH and DISCONNECT: QoS 1 completes on its PUBACK) are
        joined, up to :data:`_JOIN_BYTES`, into one that paho then writes as usual.
        """
        out = self._out_packet
        if len(out) > 1 and _joinable(out[0]) and _joinable(out[1]):
            parts: list[bytes] = []
            size = 0
            while out and size < _JOIN_BYTES and _joinable(out[0]):
                packet = out.popleft()
                data = packet["packet"]
                chunk = bytes(data[packet["pos"] :]) if packet["pos"] else bytes(data)
                parts.append(chunk)
                size += len(chunk)
            joined = b"".join(parts)
            out.appendleft(
                {
                    "command": paho.PUBLISH,
                    "mid": 0,
                    "qos": 1,
                    "pos": 0,
                    "to_process": len(joined),
                    "packet": joined,
                    "info": None,
                }
            )
        return super()._packet_write()

    # The TCP connection is opened on the event loop (name lookup and connect each with a timeout,
    # see transport.open_tcp); paho takes it from here for the TLS handshake and CONNECT.
    ready_socket: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        sock, self.ready_socket = self.ready_socket, None
        if sock is None:
            raise ConnectionError("no connected socket handed over")
        sock.setblocking(True)
        sock.settimeout(self._connect_timeout)
        return sock


@dataclass(eq=False)
class Session:
    """One connection: the paho client and what is in flight on it."""

    client: PahoClient
    loop: asyncio.AbstractEventLoop
    connack: asyncio.Future[tuple[int, str, Any]]
    thread: int = field(default_factory=threading.get_ident)  # the event loop's thread
    sock: Any = None  # the socket registered with the event loop
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # publisher: window freed, records committed
    ack_wake: asyncio.Event = field(default_factory=asyncio.Event)  # acker: PUBACKs arrived
    acks: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    ack_scheduled: bool = False
    lost: EdgetwinError | None = None
    connected: bool = False
    last_log_error: str = ""
    by_mid: dict[int, int] = field(default_factory=dict)  # paho message id -> outbox id
    sent_at: dict[int, float] = field(default_factory=dict)  # paho message id -> monotonic, sampled
    leased: dict[int, int] = field(default_factory=dict)  # outbox id -> size, leased and not acked
    acked_ids: list[int] = field(default_factory=list)  # PUBACKed, not yet deleted from the outbox
    max_packet: int | None = None
    retain: bool = True
    status_mid: int | None = None
    status_acked: asyncio.Event = field(default_factory=asyncio.Event)
    status_since: float | None = None  # monotonic time of the status publish still awaiting its PUBACK
    misc: asyncio.TimerHandle | None = None
    props_head: bytes = b""  # MQTT 5 properties common to every record of this session
    send_limit: int = 65535  # published and not yet acknowledged, at most
    more_live: bool = True  # records may have been committed since the last live lease
    live: collections.deque[Leased] = field(default_factory=collections.deque)  # leased, to publish first
    backlog: collections.deque[Leased] = field(default_factory=collections.deque)  # leased, replayed behind
    replayed: int = 0
    replaying: bool = False
    last_ack: float = 0.0  # monotonic time of the last PUBACK, or of the first publish after idle
    tls_desc: str = ""
    after_read: Callable[[], None] | None = (
        None  # the delivery stage: publish into room a PUBACK freed  # "TLSv1.3 TLS_AES_256_GCM_SHA384", taken when the handshake completes
    )
    to_release: list[int] = field(default_factory=list)  # refused by the broker, released by the acker
    to_dead_letter: list[tuple[int, str]] = field(default_factory=list)  # (id, why), moved by the acker
    ended_by_peer: bool = False  # the broker (or the network) ended it, not we nor a stall we declared
    last_publish: float = 0.0  # monotonic time of the newest record publish
    # uplink.mqtt.batch_s: features windows held by topic (since when, leased records in id order),
    # and for a message of several records the ids after the one in ``by_mid``.
    held: dict[str, tuple[float, list[Leased]]] = field(default_factory=dict)
    joined: dict[int, list[int]] = field(default_factory=dict)  # paho message id -> further outbox ids
    flush: bool = False  # publish what is held now (a drain before stopping)

    def held_windows(self) -> int:
        """Features windows held for their batch now: leased and durable, not yet published."""
        return sum(len(items) for _, items in self.held.values())


class Connection:
    """Connects to the broker on ``async with`` (AttemptError when it cannot), closes on leaving."""

    def __init__(
        self,
        config: MqttSection,
        profile: Profile,
        client_id: str,
        *,
        password: str | None,
        will: Callable[[], tuple[str, bytes]],
        bounded: Callable[[str, float], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._cfg = config
        self._profile = profile
        self.client_id = client_id
        self._password = password
        self._will = will  # (topic, payload) of the "offline" Will, read at each connection
        self._bounded = bounded  # reports the caller alive during a wait bounded by its timeouts
        self._tls = transport.TlsMaterial(config) if config.tls else None
        self._silent = 0  # closed right after the TLS handshake, in a row
        self._session: Session | None = None

    @property
    def tls(self) -> transport.TlsMaterial | None:
        """The TLS files and context (None without TLS), for the probe between attempts."""
        return self._tls

    async def __aenter__(self) -> Session:
        if self._session is not None:
            raise RuntimeError("Connection: already entered; it is reusable, not re-entrant")
        # Each step has its own timeout (files, name, TCP, TLS, CONNACK): bounded.
        with self._bounded("connecting to the broker", 4 * self._cfg.connect_timeout_s + 5.0):
            try:
                session = await self._connect(self._silent)
            except transport.AttemptError as exc:
                self._silent = self._silent + 1 if "right after the TLS handshake" in str(exc) else 0
                raise
            except EdgetwinError as exc:
                self._silent = 0
                raise transport.AttemptError(exc, transport.Stage.MQTT) from exc
        self._silent = 0
        self._session = session
        return session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await self._stop_client(session)

    def check_certificate(self) -> None:
        """Warn 30 days before our client certificate expires; refuse to connect once it has."""
        if self._cfg.cert_file is None:
            return
        info = expiry.read_cert_info(self._cfg.cert_file)
        found = expiry.expiry_message(info)
        if found is None:
            return
        expired, message = found
        if expired:
            raise AuthError(f"uplink mqtt {self._cfg.host}:{self._cfg.port}: {message}")
        log.warning("uplink mqtt: %s", message)

    def _new_client(self, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext | None) -> Session:
        """A paho client for one connection, with the Will and the callbacks set."""
        cfg = self._cfg
        v5 = cfg.protocol == "5"
        client = PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        session = Session(client, loop, loop.create_future())
        # A connection lost before anyone awaits the CONNACK (a cancelled connect) must not end as
        # "Future exception was never retrieved": the loss is reported through session.lost.
        session.connack.add_done_callback(_consume_exception)
        client.user_data_set(session)
        client.connect_timeout = cfg.connect_timeout_s
        client.max_queued_messages_set(0)
        # Unlimited in paho (it scans every message in flight per PUBACK otherwise); the uplink's
        # window bounds what is in flight, and the broker's receive maximum is applied at CONNACK.
        client.max_inflight_messages_set(0)
        if context is not None:
            client.tls_set_context(context)
        username = cfg.username
        if cfg.profile == "azure" and username is None and cfg.azure_hub is not None:
            username = azure_username(cfg.azure_hub, self.client_id)
        if username is not None:
            client.username_pw_set(username, self._password)
        topic, payload = self._will()
        client.will_set(topic, payload, qos=1, retain=self._profile.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return session

    # paho's callbacks run on the event loop (external-loop mode), except while the worker thread
    # does the TCP and TLS handshake: _call hands over to the loop from there.

    @staticmethod
    def _on_log(_client: paho.Client, session: Session, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            session.last_log_error = buf

    @staticmethod
    def _on_connect(
        _client: paho.Client, session: Session, _flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        info = (int(rc.value), str(rc), props)

        def deliver() -> None:
            if not session.connack.done():
                session.connack.set_result(info)

        _call(session, deliver)

    @staticmethod
    def _on_disconnect(
        _client: paho.Client, session: Session, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        reason = str(rc)
        last = session.last_log_error

        def deliver() -> None:
            session.connected = False
            if session.lost is None:
                session.ended_by_peer = rc.is_failure
                session.lost = TransientError(f"connection lost ({reason}{'; ' + last if last else ''})")
            if not session.connack.done():
                session.connack.set_exception(session.lost)
            session.wake.set()
            session.ack_wake.set()

        _call(session, deliver)

    @staticmethod
    def _on_publish(
        _client: paho.Client, session: Session, mid: int, rc: ReasonCode, _props: Properties | None
    ) -> None:
        session.acks.append((mid, int(rc.value)))
        if not session.ack_scheduled:
            session.ack_scheduled = True
            _call(session, session.wake.set)

    async def _connect(self, silent_refusals: int) -> Session:
        """Open one connection and wait for CONNACK, each step bounded; AttemptError says where it failed."""
        cfg = self._cfg
        loop = asyncio.get_running_loop()
        # Loading a trust store and parsing certificates take up to ~0.1 s: off the event loop.
        context = await asyncio.to_thread(self._tls.context) if self._tls is not None else None
        try:
            await asyncio.to_thread(self.check_certificate)
        except EdgetwinError as exc:
            raise transport.AttemptError(exc, transport.Stage.FILES) from exc
        sock = await transport.open_tcp(cfg, cfg.connect_timeout_s)
        session = self._new_client(loop, context)
        client = session.client
        client.ready_socket = sock
        fd = sock.fileno()
        stage = transport.Stage.TLS if cfg.tls else transport.Stage.MQTT
        kwargs: dict[str, Any] = {}
        if cfg.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
            kwargs = {"clean_start": True, "properties": properties}
        handshake = asyncio.create_task(
            asyncio.to_thread(client.connect, cfg.host, cfg.port, cfg.keepalive_s, **kwargs),
            name="uplink-mqtt:handshake",
        )
        try:
            # The handshake's socket has the connect timeout; this outer bound only backs it up.
            async with asyncio.timeout(cfg.connect_timeout_s + 2.0):
                await asyncio.shield(handshake)
        except BaseException as exc:
            if isinstance(context, tls.NamedContext):
                context.close_failed(fd)  # the TLS socket owns the connection once wrapped
            sock.close()  # plain TCP, or not wrapped yet
            handshake.add_done_callback(lambda task: _abandon(task, client, context, fd))
            with contextlib.suppress(Exception):
                client.disconnect()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, TimeoutError):  # the socket's timeout, or the outer bound
                step = "TLS handshake" if cfg.tls else "CONNECT"
                raise transport.AttemptError(
                    TransientError(
                        f"{transport.where(cfg)}: TCP connected but the {step} got no answer within "
                        f"{cfg.connect_timeout_s:g} s: retrying; check the broker and what lies between"
                    ),
                    stage,
                ) from exc
            if not isinstance(exc, OSError | ssl.SSLError | ValueError):
                raise
            error = tls.classify(exc, cfg)
            if isinstance(error, ClockBehindError):  # say from when the broker's certificate is valid
                error = await transport.clock_behind(cfg, cfg.connect_timeout_s)
            raise transport.AttemptError(error, stage) from exc
        if isinstance(context, tls.NamedContext):
            context.forget(fd)
        session.tls_desc = tls.describe_peer(client.socket())
        try:
            self._attach(session)
        except TransientError as exc:  # closed during the CONNECT write: what the broker said, if anything
            raise transport.AttemptError(
                self._closed_before_connack(session, silent_refusals), transport.Stage.MQTT
            ) from exc
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                code, reason, props = await session.connack
        except BaseException as exc:
            await self._stop_client(session)
            stage = transport.Stage.MQTT
            if isinstance(exc, TimeoutError):
                raise transport.AttemptError(
                    TransientError(
                        f"{transport.where(cfg)}: no CONNACK within {cfg.connect_timeout_s:g} s: retrying"
                    ),
                    stage,
                ) from exc
            if isinstance(exc, TransientError):
                raise transport.AttemptError(
                    self._closed_before_connack(session, silent_refusals), stage
                ) from exc
            raise
        if code >= 0x80:
            await self._stop_client(session)
            raise transport.AttemptError(self._connack_error(code, reason, props), transport.Stage.MQTT)
        client.on_log = None  # from here on, paho would format a debug line per publish for it
        session.connected = True
        if props is not None:
            session.max_packet = getattr(props, "MaximumPacketSize", None)
            # The broker's receive maximum bounds what is published and unacknowledged (MQTT 5).
            session.send_limit = int(getattr(props, "ReceiveMaximum", 65535))
            session.retain = bool(getattr(props, "RetainAvailable", 1)) and self._profile.retain
        else:
            session.retain = self._profile.retain
        return session

    def _closed_before_connack(self, session: Session, silent_refusals: int) -> EdgetwinError:
        cfg, where = self._cfg, f"uplink mqtt {self._cfg.host}:{self._cfg.port}"
        text = session.last_log_error
        known = tls.from_text(text, cfg) if text else None
        if known is not None:
            return known
        if cfg.tls and cfg.cert_file is None:
            return AuthError(
                f"{where}: the broker closed the connection right after the TLS handshake: it requires a "
                "client certificate and none is configured: set uplink.mqtt.cert_file and key_file "
                "(edgetwin provision key)"
            )
        if cfg.tls and silent_refusals + 1 >= _SILENT_REFUSALS_FOR_AUTH:
            return AuthError(
                f"{where}: the broker closed the connection right after the TLS handshake "
                f"{silent_refusals + 1} times in a row: it most likely refuses the client certificate "
                f"{cfg.cert_file}: check it is issued by a CA the broker trusts and not revoked"
            )
        return TransientError(
            f"{where}: the broker closed the connection before CONNACK ({text or 'no reason'}): retrying"
        )

    def _connack_error(self, code: int, reason: str, props: Any) -> EdgetwinError:
        where = f"uplink mqtt {self._cfg.host}:{self._cfg.port}"
        if code in _CONNACK_REDIRECT:
            target = getattr(props, "ServerReference", None)
            return TransientError(
                f"{where}: the broker sends us to another server ({reason}"
                + (f": {target}" if target else "")
                + "): retrying here; if it lasts, set uplink.mqtt.host to the server it names"
            )
        if code in _CONNACK_AUTH:
            return AuthError(
                f"{where}: the broker refused the connection: {reason}: check that the client certificate "
                f"(or user name) is registered and allowed to connect as client id {self.client_id}"
            )
        if code in _CONNACK_TRANSIENT:
            return TransientError(f"{where}: the broker refused the connection for now: {reason}: retrying")
        return ConfigError(
            f"{where}: the broker refused the connection: {reason} (0x{code:02X}): retrying; "
            "check uplink.mqtt.protocol and profile"
        )

    def _attach(self, session: Session) -> None:
        """Drive paho's network loop from the event loop: reader, writer and a misc timer."""
        client, loop = session.client, session.loop
        sock = client.socket()
        if sock is None:
            raise TransientError(
                f"uplink mqtt {self._cfg.host}:{self._cfg.port}: connection closed at once: retrying"
            )
        session.sock = sock

        def readable() -> None:
            # TLS (and our buffer) may hold bytes the socket no longer signals: read them all now.
            while client.loop_read() == paho.MQTT_ERR_SUCCESS and client.socket() is not None:
                ssl_sock = client.socket()
                if not client.buffered() and not (isinstance(ssl_sock, ssl.SSLSocket) and ssl_sock.pending()):
                    break
            if session.after_read is not None:
                session.after_read()

        def writable() -> None:
            client.loop_write()

        def register_write(_c: paho.Client, _u: Any, s: Any) -> None:
            loop.add_writer(s, writable)

        def unregister_write(_c: paho.Client, _u: Any, s: Any) -> None:
            loop.remove_writer(s)

        def closed(_c: paho.Client, _u: Any, s: Any) -> None:
            loop.remove_reader(s)
            loop.remove_writer(s)

        def misc() -> None:
            if client.loop_misc() == paho.MQTT_ERR_SUCCESS:
                session.misc = loop.call_later(1.0, misc)

        client.on_socket_register_write = register_write
        client.on_socket_unregister_write = unregister_write
        client.on_socket_close = closed
        loop.add_reader(sock, readable)
        if client.want_write():
            loop.add_writer(sock, writable)
        session.misc = loop.call_later(1.0, misc)

    async def _stop_client(self, session: Session) -> None:
        client, loop = session.client, session.loop
        if session.misc is not None:
            session.misc.cancel()
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop_write()  # DISCONNECT goes out now; paho closes the socket after it
        if session.sock is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(session.sock)
                loop.remove_writer(session.sock)
        with contextlib.suppress(Exception):
            sock = client.socket()
            if sock is not None:
                sock.close()


def _abandon(task: asyncio.Future[Any], client: PahoClient, context: ssl.SSLContext | None, fd: int) -> None:
    """Close what a handshake given up on opened, whenever its worker thread ends."""
    _consume_exception(task)
    if isinstance(context, tls.NamedContext):
        context.close_failed(fd)
    with contextlib.suppress(Exception):
        sock = client.socket()
        if sock is not None:
            sock.close()


def _call(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` on the session's event loop: now when already there, else handed over."""
    if threading.get_ident() == session.thread:
        fn()
    else:
        session.loop.call_soon_threadsafe(fn)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
