"""The demo's link: a throwaway CA, a local broker with TLS, and a twin that prints what it receives.

``edgetwin demo`` uses :func:`demo_link` around ``run_gateway``: the gateway publishes to the
local broker over TLS with a client certificate, exactly as it would to the cloud, and the twin
listener shows the decoded records and, at the end, the sequence check and every twin's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gateway.twin.listen import Listener, ListenOptions
from gateway.twin.sequence import SeqEvent
from gateway.twin.view import describe
from gateway.uplink.broker import EmbeddedBroker, MosquittoBroker, local_broker
from gateway.uplink.certs import DemoPKI, demo_pki


@dataclass(frozen=True, slots=True)
class DemoLink:
    """What the demo needs to configure the gateway's uplink, and the twin listening."""

    pki: DemoPKI
    host: str
    port: int
    protocol: str  # "5" with mosquitto, "3.1.1" with the embedded broker
    twin: Listener

    def mqtt_config(self) -> dict[str, Any]:
        """The ``[uplink.mqtt]`` table for this link."""
        return {
            "host": self.host,
            "port": self.port,
            "protocol": self.protocol,
            "ca_file": str(self.pki.ca_file),
            "cert_file": str(self.pki.gateway.cert),
            "key_file": str(self.pki.gateway.key),
            "reconnect_max_s": 5.0,
        }


class _BrokerThread:
    """Runs the embedded broker's event loop in a thread, so synchronous code can start and stop it."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="demo-broker", daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.broker.__aenter__(), self.loop).result(timeout=10)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.broker.__aexit__(None, None, None), self.loop).result(
                timeout=10
            )
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@contextlib.contextmanager
def demo_link(workdir: Path, out: IO[str], *, as_json: bool = False) -> Iterator[DemoLink]:
    """Start CA, broker and twin; print each decoded record to ``out``; the twin's report at the end."""
    pki = demo_pki(workdir / "pki")
    broker = local_broker(workdir / "broker", pki)
    runner: MosquittoBroker | _BrokerThread = (
        broker if isinstance(broker, MosquittoBroker) else _BrokerThread(broker)
    )
    protocol = "5" if "5" in broker.protocols else "3.1.1"
    lock = threading.Lock()

    def show(msg: Any, event: SeqEvent | None) -> None:
        from gateway.twin.listen import json_line  # noqa: PLC0415

        line = json_line(msg, event) if as_json else "twin <- " + describe(msg)
        with lock:
            out.write(line + "\n")
            out.flush()

    runner.start()
    try:
        twin = Listener(
            ListenOptions(
                host=broker.host,
                port=broker.port,
                ca_file=pki.ca_file,
                cert_file=pki.twin.cert,
                key_file=pki.twin.key,
                protocol=protocol,
            ),
            show,
            keep=False,
        )
        twin.start()
        try:
            yield DemoLink(pki, broker.host, broker.port, protocol, twin)
        finally:
            twin.stop()
            with lock:
                out.write("\nThe twin's view:\n" + twin.view.render() + "\n")
                for line in twin.checker.report():
                    out.write(line + "\n")
                out.flush()
    finally:
        runner.stop()
