"""Network rows of the fault campaign through a userspace TCP proxy (tests/tcp_proxy.py).

This kernel has no ``sch_netem`` and no packet filter, so latency, a black hole, a cut and
connection resets are played by a proxy on loopback between the uplink and the real TLS
mosquitto.  Each row writes records at 50/s while the fault runs, drains, and counts with the
twin's sequence check: accepted = delivered + reported lost (the outbox's persisted drop
counters), duplicates counted, time from the fault's end to the first acknowledgement measured.

A short run of every fault is in the default suite; the 60 s rows are under ``campaign``:
``pytest -m campaign tests/test_uplink_proxy.py -s`` prints the rows for BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tcp_proxy import TcpProxy
from test_uplink_campaign import Row, _check, _first_ack_after, _run
from uplink_support import GATEWAY_ID, RunningUplink, mosquitto_pki, uplink_config, wait_until

from gateway.outbox import AsyncOutbox, Outbox
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI
from gateway.uplink.mqtt import MqttUplink

# Collected at the end of each run (gc.collect), so a socket left unclosed on a fault path is
# reported by the test that made it: a reset during the TLS handshake once left one.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


def _through_proxy(
    tmp_path: Path,
    pki: DemoPKI,
    scenario: str,
    play: Callable[[TcpProxy, MqttUplink], object],
    *,
    settle_s: float = 3.0,
    keepalive_s: int = 60,
) -> tuple[Row, TcpProxy]:
    broker = MosquittoBroker(tmp_path / "broker", pki, persistence=True)
    with TcpProxy(broker.host, broker.port) as proxy:

        async def fault(uplink: MqttUplink) -> float:
            return await play(proxy, uplink)  # type: ignore[misc,no-any-return]

        row = _run(
            tmp_path,
            broker,
            pki,
            scenario,
            fault,
            settle_s=settle_s,
            port=proxy.port,
            keepalive_s=keepalive_s,
        )
    gc.collect()
    return row, proxy


async def _hold(proxy: TcpProxy, uplink: MqttUplink, start: Callable[[], None], seconds: float) -> float:
    """Play a fault for ``seconds``, end it, return the time to the first acknowledgement after."""
    start()
    await asyncio.sleep(seconds)
    proxy.clear()
    return await _first_ack_after(uplink, time.monotonic())


def test_short_network_faults_through_a_proxy_lose_nothing_unreported(tmp_path: Path, pki: DemoPKI) -> None:
    times: dict[str, float] = {}

    async def play(proxy: TcpProxy, uplink: MqttUplink) -> float:
        times["cut 3 s"] = await _hold(proxy, uplink, proxy.cut, 3.0)
        times["black hole 7 s"] = await _hold(proxy, uplink, proxy.stall, 7.0)
        times["latency 2 s"] = await _hold(proxy, uplink, lambda: proxy.latency(2.0), 3.0)
        times["resets 5 %"] = await _hold(proxy, uplink, lambda: proxy.resets(0.05), 3.0)
        return max(times.values())

    row, proxy = _through_proxy(
        tmp_path, pki, "proxy: cut, black hole, latency, resets (short)", play, settle_s=1.0, keepalive_s=5
    )
    print(times)
    _check(row)
    assert row.delivered > 0
    assert proxy.connections >= 3  # the cut and the black hole each cost a connection
    assert times["cut 3 s"] < 5.0
    assert times["black hole 7 s"] < 5.0


# --- the campaign's 60 s rows --------------------------------------------------------------------------


@pytest.mark.campaign
@pytest.mark.parametrize(
    ("label", "fault"),
    [
        ("2 s latency each way", "latency"),
        ("black hole: accepts TCP, never forwards", "stall"),
        ("link cut: every connection reset", "cut"),
        ("5 % of chunks end the connection (reset)", "resets"),
    ],
)
def test_a_60_s_network_fault_through_a_proxy(tmp_path: Path, pki: DemoPKI, label: str, fault: str) -> None:
    async def play(proxy: TcpProxy, uplink: MqttUplink) -> float:
        start = {
            "latency": lambda: proxy.latency(2.0),
            "stall": proxy.stall,
            "cut": proxy.cut,
            "resets": lambda: proxy.resets(0.05),
        }[fault]
        return await _hold(proxy, uplink, start, 60.0)

    row, proxy = _through_proxy(tmp_path, pki, f"{label} for 60 s (proxy)", play)
    print(f"{row} connections {proxy.connections}, resets {proxy.resets_made}")
    _check(row)
    if fault in ("stall", "cut"):
        assert row.reconnect_s < 5.0


def test_an_idle_uplink_notices_a_hung_broker_by_its_unanswered_status(tmp_path: Path, pki: DemoPKI) -> None:
    # Nothing to send (an empty outbox; a full disk refusing features looks the same) but the
    # retained status when its counters change: a broker that stops answering is noticed within
    # the PUBACK deadline (15 s), not after one and a half keep-alives (90 s at the default 60 s).
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    try:
        with TcpProxy(broker.host, broker.port) as proxy:

            async def main() -> float:
                async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as ao:
                    uplink = MqttUplink(ao, uplink_config(broker, pki, port=proxy.port), GATEWAY_ID)
                    run = RunningUplink(uplink)
                    try:
                        await wait_until(lambda: uplink.connected, 10, "connected")
                        proxy.stall()
                        hung = time.monotonic()
                        assert uplink.rebirth()  # the status again, as a change of its counters sends it
                        await wait_until(lambda: not uplink.connected, 40, "the hung broker noticed")
                        return time.monotonic() - hung
                    finally:
                        await run.stop()

            noticed = asyncio.run(main())
    finally:
        broker.stop()
    assert 14.0 < noticed < 25.0
