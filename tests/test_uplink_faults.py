"""The uplink against broker surprises: it stays up, says "degraded" and why, and heals by itself.

Real peers on loopback: mosquitto with TLS and client certificates, and small asyncio servers for
what a real broker does not do on purpose (a plain-text answer, a redirecting CONNACK, a port that
accepts TCP and never answers).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_supervisor import Receiver
from uplink_support import GATEWAY_ID, RunningUplink, mosquitto_pki, uplink_config, wait_until

from gateway.notify import Notifier
from gateway.outbox import AsyncOutbox, Outbox
from gateway.supervisor import Backoff, Group, Supervisor, Unit
from gateway.uplink.broker import MosquittoBroker, free_port
from gateway.uplink.certs import DemoCA, DemoPKI
from gateway.uplink.config import MqttSection
from gateway.uplink.mqtt import MqttUplink

pytestmark = pytest.mark.slow

# The issue's bound: connected within 5 s of the broker listening again.
RECONNECT_BOUND_S = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "notify.sock")
    yield r
    r.sock.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeServer:
    """An asyncio TCP server on a loopback port that counts the connections it accepts."""

    def __init__(self, port: int, handler: Handler) -> None:
        self.port = port
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            await self._handler(reader, writer)
        finally:
            writer.close()
            self._writers.discard(writer)

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()


async def _plain_text(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A captive portal, or a broker restarted without TLS: an answer that is not TLS.
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


def _connack(code: int, props: bytes = b"") -> bytes:
    body = b"\x00" + bytes([code]) + bytes([len(props)]) + props
    return b"\x20" + bytes([len(body)]) + body


def _redirecting(code: int) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        ref = b"twin-b.example:8883"
        writer.write(_connack(code, b"\x1c" + len(ref).to_bytes(2, "big") + ref))
        await writer.drain()

    return handler


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Accepts TCP, never answers (a half-dead broker or a black-holing middlebox).
    while await reader.read(1 << 16):
        pass


async def _start_and_time_to_connect(uplink: MqttUplink, broker: MosquittoBroker) -> float:
    """Start ``broker``, return how long after it listened the uplink was connected; stop it again."""
    await asyncio.to_thread(broker.start)
    listening = time.monotonic()
    try:
        await wait_until(lambda: uplink.problem is None, RECONNECT_BOUND_S + 5.0, "the uplink connected")
        return time.monotonic() - listening
    finally:
        await asyncio.to_thread(broker.stop)


async def _with_uplink(
    tmp_path: Path, cfg: MqttSection, body: Callable[[MqttUplink], Awaitable[None]]
) -> None:
    async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
        uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
        running = RunningUplink(uplink)
        try:
            await body(uplink)
            assert not running.task.done(), "the uplink unit ended instead of retrying"
        finally:
            await running.stop()


def test_plain_text_on_the_broker_port_degrades_then_the_broker_is_used_within_5_s(
    tmp_path: Path, pki: DemoPKI
) -> None:
    port = free_port()
    broker = MosquittoBroker(tmp_path / "broker", pki, port=port)
    # Default cap (60 s): without a probe the retry after ~7 s of failures would come 4-8 s later.
    cfg = uplink_config(broker, pki, reconnect_min_s=0.5, reconnect_max_s=60.0)
    measured: dict[str, float] = {}

    async def body(uplink: MqttUplink) -> None:
        async with FakeServer(port, _plain_text) as fake:
            await wait_until(lambda: "does not speak TLS on this port" in str(uplink.problem), 10, "degraded")
            assert uplink.describe().startswith("degraded (")
            await asyncio.sleep(7.0)
            assert fake.accepted >= 3, "it stopped retrying"
        measured["s"] = await _start_and_time_to_connect(uplink, broker)

    asyncio.run(_with_uplink(tmp_path, cfg, body))
    print(f"plain text then broker: connected {measured['s']:.2f} s after it listened")
    assert measured["s"] < RECONNECT_BOUND_S


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (0x9C, "sends us to another server (Use another server: twin-b.example:8883)"),
        (0x9D, "sends us to another server (Server moved: twin-b.example:8883)"),
        (0x82, "refused the connection: Protocol error (0x82): retrying"),
    ],
)
def test_unlisted_connack_codes_are_retried_not_fatal(tmp_path: Path, code: int, said: str) -> None:
    port = free_port()
    cfg = MqttSection.model_validate(
        {"host": "127.0.0.1", "port": port, "tls": False, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}
    )

    async def body(uplink: MqttUplink) -> None:
        async with FakeServer(port, _redirecting(code)) as fake:
            await wait_until(lambda: fake.accepted >= 3, 10, "three attempts")
            assert said in str(uplink.problem)

    asyncio.run(_with_uplink(tmp_path, cfg, body))


def test_a_wrong_broker_certificate_replaced_by_the_right_one_is_used_within_5_s(
    tmp_path: Path, pki: DemoPKI
) -> None:
    other = DemoCA(tmp_path / "other", "a CA the gateway does not trust")
    wrong = DemoPKI(
        pki.ca_file, other.issue("broker", "broker", server=True, hosts=("127.0.0.1",)), pki.gateway, pki.twin
    )
    bad = MosquittoBroker(tmp_path / "bad", wrong)
    good = MosquittoBroker(tmp_path / "good", pki, port=bad.port)
    cfg = uplink_config(bad, pki, reconnect_min_s=0.5, reconnect_max_s=60.0)
    measured: dict[str, float] = {}

    async def body(uplink: MqttUplink) -> None:
        await asyncio.to_thread(bad.start)
        try:
            await wait_until(
                lambda: "not signed by a CA in" in str(uplink.problem), 10, "a refused certificate"
            )
            await asyncio.sleep(6.0)  # the backoff grows past the bound meanwhile
            assert uplink.problem is not None
        finally:
            await asyncio.to_thread(bad.stop)
        measured["s"] = await _start_and_time_to_connect(uplink, good)

    asyncio.run(_with_uplink(tmp_path, cfg, body))
    print(f"wrong certificate replaced: connected {measured['s']:.2f} s after the right one listened")
    assert measured["s"] < RECONNECT_BOUND_S


def test_a_client_certificate_missing_at_start_is_picked_up_when_it_appears(
    tmp_path: Path, pki: DemoPKI
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", pki)
    later = tmp_path / "provisioned" / "gateway.crt"
    cfg = uplink_config(broker, pki, cert_file=later, reconnect_min_s=0.5, reconnect_max_s=60.0)
    measured: dict[str, float] = {}

    async def body(uplink: MqttUplink) -> None:
        await asyncio.to_thread(broker.start)
        try:
            await wait_until(lambda: uplink.problem not in (None, "not connected yet"), 10, "degraded")
            assert "cannot load the client certificate" in str(uplink.problem)
            await asyncio.sleep(4.0)
            later.parent.mkdir()
            shutil.copy(pki.gateway.cert, later)
            provisioned = time.monotonic()
            await wait_until(lambda: uplink.problem is None, RECONNECT_BOUND_S + 5.0, "the uplink connected")
            measured["s"] = time.monotonic() - provisioned
        finally:
            await asyncio.to_thread(broker.stop)

    asyncio.run(_with_uplink(tmp_path, cfg, body))
    assert measured["s"] < RECONNECT_BOUND_S


def test_a_broker_that_accepts_tcp_and_never_answers_never_starves_the_watchdog(
    tmp_path: Path, pki: DemoPKI, receiver: Receiver
) -> None:
    port = free_port()
    # Each attempt waits out a 3 s handshake timeout; the unit's heartbeat allows only 1 s, so an
    # attempt that did not count as a bounded wait would be taken for a stalled unit.
    cfg = uplink_config(
        MosquittoBroker(tmp_path / "unused", pki, port=port),
        pki,
        connect_timeout_s=3.0,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )
    pings: list[float] = []
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with (
            FakeServer(port, _silent) as fake,
            AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox,
        ):
            uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
            notifier = Notifier(str(receiver.path), watchdog_usec=400_000)  # a ping every 0.1 s
            sup = Supervisor(notifier, backoff=Backoff(base_s=0.1, cap_s=0.5))
            sup.add(
                Unit(
                    "uplink", Group.UPLINK, uplink.run, heartbeat=lambda: uplink.last_beat, stale_after_s=1.0
                )
            )
            task = asyncio.create_task(sup.run(lambda _d: asyncio.sleep(0), 1.0), name="test:supervisor")
            end = time.monotonic() + 8.0
            while time.monotonic() < end:
                before = len(receiver.messages)
                receiver.drain()
                pings.extend(time.monotonic() for m in receiver.messages[before:] if m == "WATCHDOG=1")
                await asyncio.sleep(0.05)
            seen["accepted"] = fake.accepted
            seen["problem"] = uplink.problem
            seen["restarts"] = sup.units[0].failures
            sup.request_stop()
            await task
            notifier.close()

    asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(
        f"hanging broker: {len(pings)} WATCHDOG pings, longest gap {max(gaps):.2f} s, {seen['accepted']} attempts"
    )
    assert seen["accepted"] >= 2, "the uplink did not retry"
    # Neither taken for stalled and restarted by the supervisor, nor starving the watchdog.
    assert seen["restarts"] == 0
    assert "TLS handshake got no answer within 3 s" in str(seen["problem"])
    assert len(pings) >= 30
    assert max(gaps) < 1.5  # a loaded machine may delay a ping by a few tenths, not more


def test_a_connection_begun_on_settings_a_revision_replaced_is_not_kept(tmp_path: Path, pki: DemoPKI) -> None:
    """A revision retargets the uplink while an attempt on the old settings is mid-handshake: the
    session that attempt opens is dropped, and the uplink ends connected with the new settings."""
    from tcp_proxy import TcpProxy  # noqa: PLC0415 - only this test relays

    broker = MosquittoBroker(tmp_path / "broker", pki, port=free_port())
    broker.start()
    try:
        with TcpProxy("127.0.0.1", broker.port) as slow:
            slow.latency(2.0)  # each handshake step takes seconds: the old attempt is still on its way
            old = uplink_config(broker, pki, port=slow.port, connect_timeout_s=15.0)
            new = uplink_config(broker, pki)

            async def body(uplink: MqttUplink) -> None:
                await wait_until(lambda: slow.connections >= 1, 10.0, "an attempt through the slow link")
                uplink.retarget(new)
                await wait_until(lambda: uplink.connected, 30.0, "the uplink connected")
                session = uplink._session  # which peer the live session talks to
                assert session is not None
                assert session.sock is not None
                assert session.sock.getpeername()[1] == broker.port, "kept a session on the replaced settings"

            asyncio.run(_with_uplink(tmp_path, old, body))
    finally:
        broker.stop()
