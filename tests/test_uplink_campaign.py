"""Network fault campaign: the uplink under link cuts, loss, latency and a restarting broker.

Each scenario writes records at a steady rate while the fault runs, then lets the uplink drain,
and counts with the twin's sequence check: every record accepted is delivered or reported lost
(the outbox's persisted drop counters), duplicates are counted, and the time from the network or
broker coming back to the first acknowledgement is measured.  The rows go into BENCHMARKS.md.

Run with ``pytest -m campaign tests/test_uplink_campaign.py -s``; needs root for the namespace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns import NetNs, why_unavailable
from test_uplink_mqtt import alarm_payload, feature_payload
from uplink_support import GATEWAY_ID, RunningUplink, listener, mosquitto_pki, uplink_config, wait_until

from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI, demo_pki
from gateway.uplink.mqtt import MqttUplink

pytestmark = [pytest.mark.campaign, pytest.mark.slow]

RATE_HZ = 50.0  # records written per second while a fault runs (one alarm in 25)


@dataclass
class Row:
    """One line of the campaign table."""

    scenario: str
    accepted: int = 0
    delivered: int = 0
    reported_lost: int = 0
    duplicates: int = 0
    reconnect_s: float = 0.0

    def __str__(self) -> str:
        return (
            f"| {self.scenario} | {self.accepted} | {self.delivered} | {self.reported_lost} | "
            f"{self.duplicates} | {self.reconnect_s:.1f} s |"
        )


Fault = Callable[[MqttUplink], Awaitable[float]]


def _run(
    tmp_path: Path,
    broker: MosquittoBroker,
    pki: DemoPKI,
    scenario: str,
    fault: Fault,
    *,
    settle_s: float = 3.0,
    **overrides: Any,
) -> Row:
    """Start ``broker``, write records while ``fault`` runs, drain, count; the broker is stopped after.

    ``overrides`` go into the uplink's configuration (e.g. the port of a proxy in between).
    """
    row = Row(scenario)
    config = {"reconnect_min_s": 0.5, "reconnect_max_s": 60.0, **overrides}
    broker.start()
    twin = listener(broker, pki, client_id="twin-campaign", session_expiry_s=3600)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.05) as outbox:
            uplink = MqttUplink(outbox, uplink_config(broker, pki, **config), GATEWAY_ID)
            run = RunningUplink(uplink)
            stop = asyncio.Event()
            submitted = 0

            async def produce() -> None:
                nonlocal submitted
                while not stop.is_set():
                    alarm = submitted % 25 == 0
                    lane, kind = (Lane.ALARMS, "alarms") if alarm else (Lane.FEATURES, "features")
                    outbox.submit(
                        OutItem(
                            lane,
                            f"{kind}/subj0000pseudo00",
                            (alarm_payload if alarm else feature_payload)(submitted),
                            time.time(),
                        )
                    )
                    submitted += 1
                    await asyncio.sleep(1.0 / RATE_HZ)

            producer = asyncio.create_task(produce(), name="campaign:producer")
            try:
                await wait_until(lambda: uplink.problem is None, 20, "the first connection")
                await asyncio.sleep(settle_s)
                row.reconnect_s = await fault(uplink)
                await asyncio.sleep(settle_s)
                stop.set()
                await producer
                await outbox.flush()
                await wait_until(lambda: outbox.outbox.stats().queued == 0, 180, "the outbox drained")
                row.accepted = submitted  # refused ones (a full queue) are in the drop counters
                row.reported_lost = outbox.outbox.stats().dropped_total
                expected = row.accepted - row.reported_lost
                await wait_until(
                    lambda: len({m.seq for m in twin.records() if m.seq is not None}) >= expected,
                    120,
                    "the twin received every record",
                )
            finally:
                stop.set()
                await run.stop()

    try:
        asyncio.run(main())
    finally:
        twin.stop()
        broker.stop()
    seqs = [m.seq for m in twin.records() if m.seq is not None]
    row.delivered = len(set(seqs))
    row.duplicates = len(seqs) - len(set(seqs))
    print(row)
    return row


def _check(row: Row) -> None:
    assert row.accepted > 0
    # Zero accepted records lost without being reported.
    assert row.accepted == row.delivered + row.reported_lost, row


async def _first_ack_after(uplink: MqttUplink, since: float) -> float:
    acked = uplink.counters.acked
    await wait_until(
        lambda: uplink.counters.acked > acked and uplink.problem is None, 180, "delivery resumed"
    )
    return time.monotonic() - since


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def ns() -> Iterator[NetNs]:
    why = why_unavailable()
    if why is not None:
        pytest.skip(why)
    with NetNs() as made:
        yield made


def _ns_broker(tmp_path: Path, ns: NetNs) -> tuple[MosquittoBroker, DemoPKI]:
    pki = demo_pki(tmp_path / "pki", hosts=(ns.inner_ip,))
    # The namespace is fresh: its port 8883 is free.
    broker = MosquittoBroker(
        tmp_path / "broker", pki, host=ns.inner_ip, port=8883, persistence=True, wrapper=ns.wrapper
    )
    return broker, pki


def test_a_60_s_link_cut(tmp_path: Path, ns: NetNs) -> None:
    broker, pki = _ns_broker(tmp_path, ns)

    async def cut(uplink: MqttUplink) -> float:
        await asyncio.to_thread(ns.cut)
        await asyncio.sleep(60.0)
        await asyncio.to_thread(ns.restore)
        return await _first_ack_after(uplink, time.monotonic())

    row = _run(tmp_path, broker, pki, "link cut 60 s (netns, veth down)", cut)
    _check(row)
    assert row.reconnect_s < 5.0


@pytest.mark.parametrize(
    ("label", "spec"), [("30 % loss", ("loss", "30%")), ("2 s latency", ("delay", "2s"))]
)
def test_loss_and_latency(tmp_path: Path, ns: NetNs, label: str, spec: tuple[str, ...]) -> None:
    refused = ns.netem(*spec)
    if refused is not None:
        pytest.skip(f"{label}: {refused} (this kernel has no sch_netem)")
    broker, pki = _ns_broker(tmp_path, ns)

    async def hold(uplink: MqttUplink) -> float:
        await asyncio.sleep(60.0)
        return await _first_ack_after(uplink, time.monotonic())

    row = _run(tmp_path, broker, pki, f"{label} for 60 s (tc netem)", hold)
    _check(row)


def test_a_broker_restarting_every_5_s_for_2_minutes(tmp_path: Path, pki: DemoPKI) -> None:
    broker = MosquittoBroker(tmp_path / "broker", pki, persistence=True)

    async def restarts(uplink: MqttUplink) -> float:
        worst = 0.0
        end = time.monotonic() + 120.0
        while time.monotonic() < end:
            await asyncio.sleep(5.0)
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(broker.start)
            worst = max(worst, await _first_ack_after(uplink, time.monotonic()))
        return worst

    row = _run(tmp_path, broker, pki, "broker restarted every 5 s for 2 min (worst)", restarts)
    _check(row)
    assert row.reconnect_s < 5.0
