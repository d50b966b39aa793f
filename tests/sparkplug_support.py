"""Peers of the Sparkplug tests: Tahu's JavaScript codec in its own process, and a host on mosquitto.

:class:`Tahu` decodes what the gateway published with Eclipse Tahu's ``sparkplug-payload`` (npm,
installed in tests/sparkplug by ``bash .ci/setup test``), an implementation independent of ours.
:class:`Host` is an MQTT client with the twin's certificate: it records every message under
``spBv1.0/#`` (QoS, retain flag and order) and publishes STATE and commands as a host would.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from peers import LoggedProcess

from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI

ROOT = Path(__file__).resolve().parent
CODEC = ROOT / "sparkplug" / "codec.mjs"


class Tahu:
    """Eclipse Tahu's JavaScript Sparkplug B codec, one node process answering JSON lines.

    Its answers come on stdout, read line by line; what it writes to stderr goes to ``log``.
    """

    def __init__(self, log: Path) -> None:
        node = shutil.which("node")
        if node is None or not (ROOT / "sparkplug" / "node_modules" / "sparkplug-payload").is_dir():
            pytest.fail("node or sparkplug-payload missing: run 'bash .ci/setup test'")
        self.proc = LoggedProcess(
            [node, str(CODEC)], log=log, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=CODEC.parent
        )

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"Tahu's codec ended (code {self.proc.poll()}): {self.proc.err()[-2000:]}"
        answer = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def decode(self, data: bytes) -> dict[str, Any]:
        """The payload as Tahu reads it."""
        result: dict[str, Any] = self._ask({"decode": base64.b64encode(data).decode()})
        return result

    def encode(self, payload: dict[str, Any]) -> bytes:
        """A payload encoded by Tahu (commands a host sends)."""
        return base64.b64decode(self._ask({"encode": payload})["b64"])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float
    decoded: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        parts = self.topic.split("/")
        if len(parts) > 1 and parts[1] == "STATE":
            return "STATE"
        return parts[2] if len(parts) > 2 else ""

    @property
    def device(self) -> str | None:
        parts = self.topic.split("/")
        return parts[4] if len(parts) > 4 else None


class Host:
    """A host application's MQTT client: records ``spBv1.0/#``, publishes STATE and NCMD."""

    def __init__(
        self, broker: MosquittoBroker, pki: DemoPKI, host_id: str = "scada-1", *, announce: bool = False
    ) -> None:
        self.host_id = host_id
        self.announce = announce  # publish STATE online at each connection, as a primary host does
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"host-{host_id}", protocol=paho.MQTTv5
        )
        self.client.tls_set(ca_certs=str(pki.ca_file), certfile=str(pki.twin.cert), keyfile=str(pki.twin.key))
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("host: no SUBACK from the broker")

    def _on_connect(self, client: paho.Client, *_args: Any) -> None:
        client.subscribe("spBv1.0/#", qos=1)
        if self.announce:
            body = json.dumps({"online": True, "timestamp": int(time.time() * 1000)})
            client.publish(f"spBv1.0/STATE/{self.host_id}", body, qos=1, retain=True)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), time.monotonic())
            )

    def state(self, online: bool, ts: int, host_id: str | None = None) -> None:
        """Publish this host's (or another's) STATE, QoS 1, retained, as a host application does."""
        body = json.dumps({"online": online, "timestamp": ts})
        topic = f"spBv1.0/STATE/{host_id or self.host_id}"
        self.client.publish(topic, body, qos=1, retain=True).wait_for_publish(5)

    def command(self, topic: str, payload: bytes) -> None:
        """Publish a command (QoS 0, not retained, as the specification says)."""
        self.client.publish(topic, payload, qos=0, retain=False).wait_for_publish(5)

    def sparkplug(self) -> list[Message]:
        """The edge node's messages so far (STATE and commands left out), in arrival order."""
        with self._lock:
            return [m for m in self.messages if m.kind not in ("", "STATE", "NCMD", "DCMD")]

    def wait(self, predicate: Any, timeout: float, what: str) -> list[Message]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.sparkplug()
            if predicate(msgs):
                return msgs
            time.sleep(0.02)
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what}: {[m.topic for m in self.sparkplug()]}"
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
