"""The Python peers of the ingest benchmark, each in a process of its own (bench_peers.py).

    python ua_client.py count  ENDPOINT ITEMS
    python ua_client.py bridge ENDPOINT ITEMS BROKER_HOST BROKER_PORT CA CERT KEY

Both subscribe to ITEMS bench variables (``Pump1.Bench.Item0000``... in ``urn:edgetwin:plcsim``)
with asyncua's handler API, a 50 ms publishing interval, sampling 0 and queues of 10, as
``bench_opcua.bare`` does.  ``count`` only counts each notification: the bare client, the library's
own floor.  ``bridge`` is the plain asyncua -> paho bridge people write: one JSON message per
notification, QoS 1, over TLS with a client certificate.  Both print ``count <n> <time>`` twice a
second; the bridge adds ``acked <n>``, the messages the broker acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from asyncua import ua
from asyncua.client.client import Client


class Counter:
    """The bare baseline: asyncua's handler API, counting."""

    def __init__(self) -> None:
        self.count = 0

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        """One notification: counted."""
        self.count += 1


class Bridge(Counter):
    """One MQTT message per notification, the node's id as the topic."""

    def __init__(self, mqtt: Any) -> None:
        super().__init__()
        self.mqtt = mqtt
        self.acked = 0  # PUBACKs: messages the broker took (paho's network thread counts them)
        mqtt.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.acked += 1

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        """One notification: published as JSON (value and source time), then counted."""
        when = data.monitored_item.Value.SourceTimestamp
        payload = json.dumps({"v": val, "t": when.isoformat() if when else None})
        self.mqtt.publish(f"bench/bridge/{node.nodeid.Identifier}", payload, qos=1)
        self.count += 1


def _mqtt(host: str, port: int, ca: str, cert: str, key: str) -> Any:
    import paho.mqtt.client as paho  # noqa: PLC0415 - only the bridge needs it
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bridge")
    client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    client.connect(host, port)
    client.loop_start()
    return client


async def main(argv: list[str]) -> None:
    """Subscribe and report the count until killed."""
    mode, endpoint, items = argv[0], argv[1], int(argv[2])
    handler = Counter() if mode == "count" else Bridge(_mqtt(argv[3], int(argv[4]), *argv[5:8]))
    client = Client(endpoint, timeout=30)
    await client.connect()
    idx = await client.get_namespace_index("urn:edgetwin:plcsim")
    sub = await client.create_subscription(50, handler)
    nodes = [
        client.get_node(ua.NodeId(ua.String(f"Pump1.Bench.Item{i:04d}"), ua.Int16(idx))) for i in range(items)
    ]
    await sub.subscribe_data_change(nodes, queuesize=10, sampling_interval=ua.Double(0.0))
    lost = False
    while True:
        acked = f" acked {handler.acked}" if isinstance(handler, Bridge) else ""
        print(f"count {handler.count} {time.monotonic():.3f}{acked}", flush=True)
        await asyncio.sleep(0.5)
        try:
            await client.check_connection()
        except Exception as exc:  # said once: a plain client has no reconnect
            if not lost:
                print(f"ua_client {mode}: session lost: {exc!r}", file=sys.stderr, flush=True)
            lost = True


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
