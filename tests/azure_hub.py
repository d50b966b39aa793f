"""A test peer playing IoT Hub's device-twin side over mosquitto (topics only, one device).

It holds the twin (desired and reported properties, each with its ``$version``), answers
``$iothub/twin/GET/?$rid=`` with ``$iothub/twin/res/200/?$rid=``, merges reported patches and
answers them with ``$iothub/twin/res/204/?$rid=…&$version=``, sends desired patches on
``$iothub/twin/PATCH/properties/desired/?$version=`` and calls direct methods on
``$iothub/methods/POST/<name>/?$rid=``, collecting the answers from ``$iothub/methods/res/#``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from downlink_support import DEADLINE_S, Site

from gateway.downlink.azure import c2d_chunk_topic, merge_patch, query
from gateway.downlink.twin_link import Broker, _connect


class AzureSite(Site):
    """A site whose uplink uses the azure profile (MQTT 3.1.1, IoT Hub's static topics)."""

    def text(self, sources: str, *, port: int | None = None, deadline_s: float = DEADLINE_S) -> str:
        text = super().text(sources, port=port, deadline_s=deadline_s)
        azure = 'connect_timeout_s = 2.0\nprofile = "azure"\nprotocol = "3.1.1"\nazure_hub = "hub1"\n'
        return text.replace("connect_timeout_s = 2.0\n", azure)


class AzureHub:
    """The hub's twin for one device, on a broker."""

    def __init__(self, broker: Broker) -> None:
        self.desired: dict[str, Any] = {"$version": 1}
        self.reported: dict[str, Any] = {"$version": 1}
        self.gets = 0
        self.refuse_gets = 0  # answer this many twin reads with 429 (throttled) first
        self.refuse_patches = 0  # answer this many reported patches with 429 first, not merging them
        self.patches = 0
        self.methods: dict[str, tuple[int, dict[str, Any]]] = {}  # rid -> (status, body)
        self._lock = threading.Lock()
        self._rid = 0
        self._client = _connect(broker, "azure-hub", 10.0)
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_args: subscribed.set()
        subs = ["$iothub/twin/GET/#", "$iothub/twin/PATCH/properties/reported/#", "$iothub/methods/res/#"]
        self._client.subscribe([(s, 1) for s in subs])
        # Subscribed before the gateway's first twin read can come.
        assert subscribed.wait(10.0), "the hub peer got no SUBACK within 10 s"

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        topic, rid = message.topic, query(message.topic).get("$rid", "")
        with self._lock:
            if topic.startswith("$iothub/twin/GET/"):
                self.gets += 1
                if self.refuse_gets:
                    self.refuse_gets -= 1
                    self._client.publish(f"$iothub/twin/res/429/?$rid={rid}", b"", qos=1)
                    return
                body = json.dumps({"desired": self.desired, "reported": self.reported})
                self._client.publish(f"$iothub/twin/res/200/?$rid={rid}", body, qos=1)
            elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
                self.patches += 1
                if self.refuse_patches:
                    self.refuse_patches -= 1
                    self._client.publish(f"$iothub/twin/res/429/?$rid={rid}", b"", qos=1)
                    return
                version = self.reported["$version"] + 1
                self.reported = {
                    **merge_patch(self.reported, json.loads(message.payload)),
                    "$version": version,
                }
                self._client.publish(f"$iothub/twin/res/204/?$rid={rid}&$version={version}", b"", qos=1)
            elif topic.startswith("$iothub/methods/res/"):
                status = int(topic.split("/")[3])
                self.methods[rid] = (status, json.loads(message.payload))

    def patch_desired(self, patch: dict[str, Any], *, send: bool = True, skip: int = 0) -> int:
        """Merge a desired patch into the twin; send it to the device (not while it is offline).

        ``skip`` versions are used up unseen first, as patches the device missed would.
        """
        with self._lock:
            version = int(self.desired["$version"]) + 1 + skip
            self.desired = {**merge_patch(self.desired, patch), "$version": version}
            if send:
                body = json.dumps(patch)
                self._client.publish(
                    f"$iothub/twin/PATCH/properties/desired/?$version={version}", body, qos=1
                )
            return version

    def send_c2d(self, device_id: str, out_dir: Path) -> int:
        """Send the cloud-to-device messages ``twin azure-model`` wrote (as the hub would deliver them)."""
        listing = json.loads((out_dir / "messages.json").read_text())
        infos = []
        with self._lock:
            for n, message in enumerate(listing):
                bag = urlencode({"$.mid": f"c{self._rid}-{n}", **message["properties"]})
                topic = f"devices/{device_id}/messages/devicebound/{bag}"
                infos.append(self._client.publish(topic, (out_dir / message["file"]).read_bytes(), qos=1))
        for info in infos:
            info.wait_for_publish(10.0)
        return len(listing)

    def send_chunks(self, device_id: str, bundle: str, chunks: list[bytes]) -> None:
        """Send a bundle's chunks as C2D messages, as IoT Hub delivers them (QoS 1, PUBACK awaited)."""
        with self._lock:
            infos = [
                self._client.publish(c2d_chunk_topic(device_id, bundle, i), data, qos=1)
                for i, data in enumerate(chunks)
            ]
        for info in infos:
            info.wait_for_publish(10.0)

    def call(self, method: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
        """Invoke a direct method and wait for its answer."""
        with self._lock:
            self._rid += 1
            rid = f"m{self._rid}"
            self._client.publish(f"$iothub/methods/POST/{method}/?$rid={rid}", b"{}", qos=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if rid in self.methods:
                    return self.methods[rid]
            time.sleep(0.05)
        raise AssertionError(f"no answer to direct method {method} within {timeout} s")

    def ours(self) -> dict[str, Any]:
        """The gateway's reported property as the hub holds it."""
        with self._lock:
            return dict(self.reported.get("edgetwin") or {})

    def wait(self, predicate: Any, what: str, timeout: float = 45.0) -> dict[str, Any]:
        """Wait until the reported property satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rep = self.ours()
            if rep and predicate(rep):
                return rep
            time.sleep(0.02)
        raise AssertionError(f"not {what} within {timeout} s: {self.ours()}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
