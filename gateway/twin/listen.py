"""``edgetwin twin listen``: subscribe to gateways' topics, decode, check sequences, show state.

Consumers scale out with MQTT 5 shared subscriptions: listeners started with the same ``group``
share the stream (each message goes to one of them).  A member of a group sees only its share, so
it does not report gaps; the union of the group's outputs is complete.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.records import RecordError, StatusRecord, as_map, status_map
from gateway.twin.decoder import DEFAULT_PREFIX, TwinMessage, decode_messages
from gateway.twin.errors import TwinAuthError, TwinConfigError, TwinConnectError, TwinError
from gateway.twin.sequence import SeqEvent, SequenceChecker
from gateway.twin.view import TwinView, describe

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """Where to listen and as whom."""

    host: str
    port: int = 8883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    tls: bool = True
    protocol: str = "5"
    prefix: str = DEFAULT_PREFIX
    group: str | None = None  # shared subscription group ($share/<group>/...)
    client_id: str | None = None
    # A persistent session (with a fixed client_id): the broker queues messages while the twin is away.
    session_expiry_s: int = 0

    @property
    def topic_filter(self) -> str:
        """What to subscribe to."""
        base = f"{self.prefix.rstrip('/')}/#"
        return f"$share/{self.group}/{base}" if self.group else base


class _NamedContext(ssl.SSLContext):
    """A client context that sends and verifies a given name, whatever address paho dials."""

    server_name: str | None = None

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


OnMessage = Callable[[TwinMessage, SeqEvent | None], None]


class Listener:
    """A subscriber that decodes and checks; paho's thread does the work, results are kept here."""

    def __init__(
        self, options: ListenOptions, on_message: OnMessage | None = None, *, keep: bool = True
    ) -> None:
        self.options = options
        self.checker = SequenceChecker()
        self.view = TwinView()
        self.messages: list[TwinMessage] = []
        self.corrupt = 0
        self.received = 0  # messages of gateways, status included
        self.records_received = 0  # records only (features, alarms, diagnostics)
        self._keep = keep
        self._on_message = on_message
        self._lock = threading.RLock()  # predicates given to wait_for may call records()
        self._changed = threading.Condition(self._lock)
        self._subscribed = threading.Event()
        self._error: TwinError | None = None
        self._client: paho.Client | None = None

    def _context(self) -> ssl.SSLContext:
        o = self.options
        ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.server_name = o.server_name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if o.ca_file is not None:
                ctx.load_verify_locations(cafile=str(o.ca_file))
            else:
                ctx.load_default_certs()
            if o.cert_file is not None:
                ctx.load_cert_chain(str(o.cert_file), str(o.key_file) if o.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise TwinConfigError(
                f"twin listen {o.host}:{o.port}: cannot load TLS files: {exc}: check --ca, --cert, --key"
            ) from exc
        return ctx

    def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; raise a TwinError saying why when that fails."""
        o = self.options
        # A restart (the same Listener started again) waits for its own subscription.
        self._subscribed.clear()
        self._error = cast("TwinError | None", None)  # set by paho's thread: not narrowed here
        v5 = o.protocol == "5"
        persistent = o.session_expiry_s > 0 and o.client_id is not None
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id or f"edgetwin-twin-{secrets.token_hex(4)}",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not persistent,
        )
        if o.tls:
            client.tls_set_context(self._context())
        client.on_connect = self._connected
        client.on_subscribe = self._subscribed_cb
        client.on_message = self._message
        client.on_disconnect = self._disconnected
        self._client = client
        connect_props = None
        if v5:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = o.session_expiry_s if persistent else 0
        try:
            if v5:
                client.connect(
                    o.host, o.port, keepalive=30, clean_start=not persistent, properties=connect_props
                )
            else:
                client.connect(o.host, o.port, keepalive=30)
        except ssl.SSLCertVerificationError as exc:
            raise TwinAuthError(
                f"twin listen {o.host}:{o.port}: the broker's certificate was refused: "
                f"{exc.verify_message}: check --ca and the broker's host name"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise TwinConnectError(
                f"twin listen {o.host}:{o.port}: cannot connect: {exc}: is the broker running?"
            ) from exc
        client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise self._error or TwinConnectError(
                f"twin listen {o.host}:{o.port}: not subscribed within {timeout:g} s: check the broker and --cert"
            )
        if self._error is not None:
            self.stop()
            raise self._error

    def stop(self) -> None:
        """Disconnect and stop paho's thread."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _connected(self, client: paho.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
        if rc.is_failure:
            self._error = TwinAuthError(f"twin listen: the broker refused the connection: {rc}")
            self._subscribed.set()
            return
        client.subscribe(self.options.topic_filter, qos=1)

    def _subscribed_cb(
        self, _client: paho.Client, _u: Any, _mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        if any(c.is_failure for c in codes):
            self._error = TwinAuthError(
                f"twin listen: subscription to {self.options.topic_filter} refused: {codes[0]}"
            )
        self._subscribed.set()

    def _disconnected(self, _client: paho.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
        if not self._subscribed.is_set():
            self._error = TwinConnectError(
                f"twin listen: the broker closed the connection ({rc}): check --cert/--key"
            )
            self._subscribed.set()

    def _message(self, _client: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        props: dict[str, str] = {}
        mp = getattr(message, "properties", None)
        if mp is not None and hasattr(mp, "UserProperty"):
            props = dict(mp.UserProperty)
        try:
            msgs = decode_messages(message.topic, bytes(message.payload), props, self.options.prefix)
        except RecordError as exc:
            with self._changed:
                self.corrupt += 1
                self._changed.notify_all()
            log.warning("%s", exc)
            return
        for i, msg in enumerate(msgs):
            self._record(msg, first=i == 0)

    def _record(self, msg: TwinMessage, *, first: bool) -> None:
        event = None
        with self._changed:
            self.received += first  # messages, however many records each holds
            if msg.kind != "status":
                self.records_received += 1
            rec = msg.record
            if msg.seq is not None and msg.epoch is not None and not isinstance(rec, StatusRecord):
                # Held windows (schema 4) leave in order per subject, not per lane: so are checked.
                lane = msg.kind if msg.batch_s is None else msg.topic
                event = self.checker.observe(msg.gateway, msg.epoch, msg.seq, lane, msg.historical, rec.run)
            self.view.update(msg, received=time.monotonic())
            if self._keep:
                self.messages.append(msg)
            self._changed.notify_all()
        if self._on_message is not None:
            self._on_message(msg, event)

    def wait_for(self, predicate: Callable[[Listener], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked on every message) or the timeout passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))
        return True

    def records(self) -> list[TwinMessage]:
        """A copy of the kept messages (status excluded)."""
        with self._lock:
            return [m for m in self.messages if m.kind != "status"]


def json_line(msg: TwinMessage, event: SeqEvent | None) -> str:
    """One JSON line per message (for --json)."""
    body: dict[str, Any] = {
        "gateway": msg.gateway,
        "topic": msg.topic,
        "seq": msg.seq,
        "epoch": msg.epoch,
        "historical": msg.historical,
        "record": status_map(msg.record) if isinstance(msg.record, StatusRecord) else as_map(msg.record),
    }
    if event is not None:
        body["event"] = event.kind
    return json.dumps(body, separators=(",", ":"))


def run_listen(
    options: ListenOptions,
    *,
    out: IO[str],
    as_json: bool,
    count: int | None,
    duration: float | None,
    stop: threading.Event,
    report: IO[str],
) -> int:
    """The command's body: listen until ``count`` records, ``duration`` or ``stop``; return an exit code."""
    lock = threading.Lock()
    check_gaps = options.group is None

    def show(msg: TwinMessage, event: SeqEvent | None) -> None:
        with lock:
            if as_json:
                out.write(json_line(msg, event) + "\n")
            else:
                note = ""
                if event is not None and (check_gaps or event.kind == "duplicate"):
                    note = f"   <- {event.kind}" + (f" ({event.detail})" if event.detail else "")
                out.write(describe(msg) + note + "\n")
            out.flush()

    listener = Listener(options, show, keep=False)
    listener.start()
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while not stop.is_set():
            if count is not None and listener.records_received >= count:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            stop.wait(0.1)
    finally:
        listener.stop()
    with lock:
        report.write("\n" + listener.view.render(now=time.monotonic()) + "\n")
        if check_gaps:
            for line in listener.checker.report():
                report.write(line + "\n")
        else:
            report.write(
                f"shared subscription group {options.group}: this member received {listener.received} message(s)\n"
            )
        if listener.corrupt:
            report.write(f"{listener.corrupt} message(s) could not be decoded\n")
        report.flush()
    return 0


__all__ = ["ListenOptions", "Listener", "OnMessage", "json_line", "run_listen"]
