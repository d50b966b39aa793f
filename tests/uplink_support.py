"""Shared pieces of the uplink and twin tests: a demo PKI, mosquitto, uplink configs, a twin."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Leased, Outbox, OutItem
from gateway.twin.listen import Listener, ListenOptions
from gateway.uplink.broker import MosquittoBroker, mosquitto_available
from gateway.uplink.certs import DemoPKI, demo_pki
from gateway.uplink.config import MqttSection
from gateway.uplink.mqtt import MqttUplink

GATEWAY_ID = "gwk3j2x7q9m4t8vb"


def require_mosquitto() -> None:
    if not mosquitto_available():
        pytest.fail("mosquitto is not installed: run 'bash .ci/setup test' (or apt-get install mosquitto)")


def mosquitto_pki(factory: pytest.TempPathFactory) -> DemoPKI:
    """A demo PKI for a module's tests against mosquitto (fails clearly when it is not installed)."""
    require_mosquitto()
    return demo_pki(factory.mktemp("pki"))


def running_broker(tmp_path: Path, pki: DemoPKI, **kw: Any) -> Iterator[MosquittoBroker]:
    """A started mosquitto for one test; stopped after it (the body of a yield fixture)."""
    b = MosquittoBroker(tmp_path / "broker", pki, **kw)
    b.start()
    yield b
    b.stop()


def uplink_config(broker: MosquittoBroker, pki: DemoPKI, **overrides: Any) -> MqttSection:
    base: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": pki.ca_file,
        "cert_file": pki.gateway.cert,
        "key_file": pki.gateway.key,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
        "connect_timeout_s": 3.0,
        "replay_msgs_per_s": 100_000.0,
        "replay_bytes_per_s": 1e9,
    }
    base.update(overrides)
    return MqttSection.model_validate(base)


def mqtt_toml(broker: MosquittoBroker, pki: DemoPKI) -> str:
    """The ``[uplink]`` tables of a gateway config publishing to ``broker`` as the demo PKI's gateway."""
    return f"""
[uplink]
kind = "mqtt"
[uplink.mqtt]
host = "{broker.host}"
port = {broker.port}
ca_file = "{pki.ca_file}"
cert_file = "{pki.gateway.cert}"
key_file = "{pki.gateway.key}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
"""


def listener(broker: MosquittoBroker, pki: DemoPKI, **kw: Any) -> Listener:
    opts = ListenOptions(
        host=broker.host,
        port=broker.port,
        ca_file=pki.ca_file,
        cert_file=pki.twin.cert,
        key_file=pki.twin.key,
        **kw,
    )
    twin = Listener(opts)
    twin.start()
    return twin


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class RunningUplink:
    """An MqttUplink running as a task, stopped (and its errors surfaced) by ``stop``."""

    def __init__(self, uplink: MqttUplink) -> None:
        self.uplink = uplink
        self.started = asyncio.Event()
        self.task = asyncio.create_task(uplink.run(self.started.set), name="test-uplink")

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def with_outbox(path: Path, body: Callable[[AsyncOutbox], Awaitable[None]], **kw: Any) -> None:
    async with AsyncOutbox(lambda: Outbox(path, **kw), flush_interval_s=0.02) as outbox:
        await body(outbox)


def items(kind: str, n: int, payload: Callable[[int], bytes], lane: Any, start: int = 0) -> list[OutItem]:
    now = time.time()
    return [OutItem(lane, f"{kind}/subj{i % 3}", payload(i), now) for i in range(start, start + n)]


@dataclass
class LeaseLog:
    """What an outbox's ``lease`` handed out: each record's lane, and its attempts at each lease."""

    lanes: list[Lane] = field(default_factory=list)
    attempts: dict[int, list[int]] = field(default_factory=dict)


class LeaseRecorder(Outbox):
    """The outbox, noting in a :class:`LeaseLog` every record its ``lease`` hands out."""

    def __init__(self, path: Path, log: LeaseLog) -> None:
        super().__init__(path)
        self.log = log

    def lease(self, n: int, *, after_id: int = 0, through_id: int | None = None) -> list[Leased]:
        got = super().lease(n, after_id=after_id, through_id=through_id)
        for r in got:
            self.log.lanes.append(r.lane)
            self.log.attempts.setdefault(r.id, []).append(r.attempts)
        return got
