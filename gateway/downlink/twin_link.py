"""The twin's side of the downlink: publish a signed desired state, collect gateways' reported states."""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.twin.errors import TwinConfigError, TwinConnectError


@dataclass(frozen=True, slots=True)
class Broker:
    """Where the twin connects and as whom."""

    host: str
    port: int = 8883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = True
    protocol: str = "5"


def _client(broker: Broker, who: str) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgetwin-twin-{who}-{secrets.token_hex(4)}",
        protocol=paho.MQTTv5 if broker.protocol == "5" else paho.MQTTv311,
    )
    if broker.tls:
        ctx = ssl.create_default_context(cafile=str(broker.ca_file) if broker.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if broker.cert_file is not None:
                ctx.load_cert_chain(str(broker.cert_file), str(broker.key_file) if broker.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise TwinConfigError(
                f"twin {who} {broker.host}:{broker.port}: cannot load TLS files: {exc}: check --ca, --cert, --key"
            ) from exc
        client.tls_set_context(ctx)
    return client


def _connect(broker: Broker, who: str, timeout_s: float) -> paho.Client:
    client = _client(broker, who)
    connected = threading.Event()
    result: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        result.append(rc)
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise TwinConnectError(
            f"twin {who} {broker.host}:{broker.port}: cannot connect: {exc}: check --broker and TLS files"
        ) from exc
    client.loop_start()
    if not connected.wait(timeout_s) or result[0].is_failure:
        client.loop_stop()
        why = str(result[0]) if result else f"no CONNACK within {timeout_s:g} s"
        raise TwinConnectError(
            f"twin {who} {broker.host}:{broker.port}: not connected: {why}: check the broker"
        )
    return client


def publish_desired(broker: Broker, topic: str, envelope: bytes, timeout_s: float = 10.0) -> None:
    """Publish a desired state retained at QoS 1 and wait for the broker's PUBACK."""
    client = _connect(broker, "publish", timeout_s)
    try:
        info = client.publish(topic, envelope, qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise TwinConnectError(f"twin publish {topic}: no PUBACK within {timeout_s:g} s: publish again")
    finally:
        client.disconnect()
        client.loop_stop()


def publish_many(
    broker: Broker, messages: list[tuple[str, bytes]], timeout_s: float = 60.0, window: int = 16
) -> None:
    """Publish messages retained at QoS 1 on one connection, at most ``window`` unacknowledged at a time."""
    client = _connect(broker, "publish", 10.0)
    try:
        inflight: list[tuple[str, Any]] = []
        end = time.monotonic() + timeout_s
        for n, (topic, payload) in enumerate(messages, 1):
            inflight.append((topic, client.publish(topic, payload, qos=1, retain=True)))
            while inflight and (len(inflight) >= window or n == len(messages)):
                sent, info = inflight.pop(0)
                info.wait_for_publish(max(0.1, end - time.monotonic()))
                if not info.is_published():
                    raise TwinConnectError(
                        f"twin publish {sent}: no PUBACK within {timeout_s:g} s: publish again"
                    )
    finally:
        client.disconnect()
        client.loop_stop()


def send_command(broker: Broker, topic: str, cmd: str, timeout_s: float = 10.0) -> None:
    """Publish a command (QoS 1, not retained: a gateway offline now does not get it later)."""
    client = _connect(broker, "command", timeout_s)
    try:
        info = client.publish(topic, json.dumps({"cmd": cmd}).encode(), qos=1)
        info.wait_for_publish(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()


def watch(broker: Broker, topic: str) -> tuple[paho.Client, list[tuple[bool, bytes]]]:
    """Subscribe to ``topic``; the list fills with (retained, payload) as messages come."""
    client = _connect(broker, "watch", 10.0)
    seen: list[tuple[bool, bytes]] = []
    client.on_message = lambda _c, _u, message: seen.append((bool(message.retain), bytes(message.payload)))
    client.subscribe(topic, qos=1)
    return client, seen


def collect_reported(
    broker: Broker, prefix: str, gateways: list[str], wait_s: float
) -> dict[str, dict[str, Any]]:
    """The retained reported state of each gateway (all under ``prefix`` when none named)."""
    client = _connect(broker, "status", 10.0)
    found: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        gateway = message.topic.split("/")[-2]
        try:
            value = json.loads(message.payload)
        except ValueError:
            value = {"error": "reported state is not JSON"}
        with lock:
            found[gateway] = value

    client.on_message = on_message
    topics = [f"{prefix}/{g}/reported" for g in gateways] or [f"{prefix}/+/reported"]
    client.subscribe([(t, 1) for t in topics])
    end = time.monotonic() + wait_s
    while time.monotonic() < end and not (gateways and all(g in found for g in gateways)):
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    with lock:
        return dict(found)


def fetch_retained(broker: Broker, topic: str, wait_s: float = 2.0) -> bytes | None:
    """The retained message on ``topic``, or None when there is none within ``wait_s``."""
    client, seen = watch(broker, topic)
    end = time.monotonic() + wait_s
    try:
        while not seen and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return seen[0][1] if seen and seen[0][1] else None
