"""Joined windows (uplink.mqtt.batch_s) within the broker's limits, through a real TLS mosquitto:
never more PUBLISHes in flight than its Receive Maximum, joins no larger than the packet size it
announces (MQTT 5) or was found to end connections at (MQTT 3.1.1, where nothing is announced)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from test_uplink_batch import _features, feature_items
from uplink_support import GATEWAY_ID, RunningUplink, listener, mosquitto_pki, uplink_config, wait_until

from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.records.batch import Joiner
from gateway.uplink import packets
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI
from gateway.uplink.config import MqttSection
from gateway.uplink.delivery import _JOIN_PROBES
from gateway.uplink.mqtt import MqttUplink

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


def test_a_joined_backlog_never_overruns_receive_maximum_with_a_small_packet_limit(
    tmp_path: Path, pki: DemoPKI
) -> None:
    """Receive Maximum 2, Maximum Packet Size 400 (a few windows of 183 bytes join, batch_bytes do not):
    30 backlog windows go out in joined messages, never more than two in flight, one connection."""
    broker = MosquittoBroker(tmp_path / "broker", pki, max_packet_size=400, max_inflight_messages=2)
    broker.start()
    twin = listener(broker, pki)
    items, _ = feature_items(30)
    seen: dict[str, int] = {"peak": 0, "limit": 0}

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
            outbox.outbox.put_many(items)
            cfg = uplink_config(broker, pki, batch_s=0.3, batch_bytes=4096)
            uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
            run = RunningUplink(uplink)
            deadline = time.monotonic() + 20
            # Sampled between loop turns: publishing and PUBACKs are handled on this loop.
            while uplink.delivered < 30 and time.monotonic() < deadline:
                session = uplink._session  # in flight: not published otherwise
                if session is not None:
                    seen["peak"] = max(seen["peak"], len(session.by_mid))
                    seen["limit"] = session.send_limit
                await asyncio.sleep(0.0005)
            seen["connects"] = uplink.counters.connects
            seen["delivered"] = uplink.delivered
            await run.stop()

    try:
        asyncio.run(main())
        assert twin.wait_for(lambda t: len(_features(t)) >= 30, 10)
    finally:
        twin.stop()
        broker.stop()
    assert seen["limit"] == 2  # the broker's Receive Maximum, as negotiated
    assert seen["delivered"] == 30
    assert 0 < seen["peak"] <= 2
    assert seen["connects"] == 1  # the broker ended no connection (0x93 or packet too large)
    assert sorted(m.seq or 0 for m in _features(twin)) == list(range(1, 31))
    messages = twin.received - sum(1 for m in twin.records() if m.kind == "status")
    assert messages < 30  # joined within the packet limit, not each sent alone


def _first_joined_packet(items: list[OutItem], epoch: int, batch_s: float, batch_bytes: int) -> int:
    """Bytes of the first message a backlog of ``items`` (outbox ids 1, 2, ...) is replayed in (3.1.1).

    The first topic's records in id order, as many as batch_bytes holds, joined.
    """
    topic = items[0].topic
    joiner = Joiner(epoch, historical=True, batch_s=batch_s, limit=batch_bytes)
    size = 0
    for rid, item in enumerate(items, 1):
        if item.topic != topic:
            continue
        size += len(item.payload)
        if size > batch_bytes:
            break
        assert joiner.add(item.payload, rid)
    topic_root = f"{MqttSection.model_fields['topic_prefix'].default}/{GATEWAY_ID}"
    return packets.publish_size(f"{topic_root}/{topic}", len(joiner.payload()), None, v5=False)


def test_joined_messages_over_a_silent_311_packet_limit_do_not_end_every_batch(
    tmp_path: Path, pki: DemoPKI
) -> None:
    """MQTT 3.1.1, mosquitto max_packet_size 400, batch_bytes 2048: the first joined messages end
    the connection; joins are kept between the largest taken and the smallest refused until they
    fit, and stay so; windows keep flowing joined with no more reconnecting."""
    broker = MosquittoBroker(tmp_path / "broker", pki, max_packet_size=400)
    broker.start()
    twin = listener(broker, pki, protocol="3.1.1")
    seen: dict[str, int] = {}

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            cfg = uplink_config(broker, pki, protocol="3.1.1", batch_s=0.2, batch_bytes=2048)
            uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
            run = RunningUplink(uplink)
            n = 0

            async def produce(count: int) -> None:
                nonlocal n
                for _ in range(count // 3):
                    batch, _ = feature_items(3, start=n)
                    for item in batch:
                        outbox.submit(item)
                    n += 3
                    await asyncio.sleep(0.01)

            await produce(120)
            await wait_until(lambda: uplink.delivered >= n, 30, "the first windows delivered")
            seen["connects"] = uplink.counters.connects
            # Acknowledged by the broker is not yet received by the twin: count the later
            # messages from when the twin holds every earlier window (on a busy machine the
            # listener lags the PUBACKs by a few messages).
            first = n
            assert await asyncio.to_thread(
                twin.wait_for, lambda t: len({m.seq for m in _features(t)}) >= first, 10
            )
            received = twin.received
            await produce(120)  # 12 or more batches of 0.2 s
            await wait_until(lambda: uplink.delivered >= n, 20, "the later windows delivered")
            seen["later_connects"] = uplink.counters.connects - seen["connects"]
            seen["later_records"] = n - first
            last = n
            assert await asyncio.to_thread(
                twin.wait_for, lambda t: len({m.seq for m in _features(t)}) >= last, 10
            )
            seen["later_messages"] = twin.received - received
            seen["n"] = n
            await run.stop()

    try:
        asyncio.run(main())
        assert twin.wait_for(lambda t: len({m.seq for m in _features(t)}) >= seen["n"], 10)
    finally:
        twin.stop()
        broker.stop()
    # A few probes end a connection each (one may fall in the later windows, as the joins'
    # sizes depend on timing), then joins fit: not a connection ended every batch.  At most the
    # search's bound of refusals plus the first connection (3 refusals seen at most here).
    assert seen["connects"] + seen["later_connects"] <= 1 + _JOIN_PROBES, seen
    assert seen["later_connects"] <= 1, seen
    # Still joined: the search ends between a message taken and one refused, never below two
    # windows when two fit (a pair is tried below the refused size).
    assert seen["later_messages"] < seen["later_records"], seen
    assert {m.seq for m in _features(twin)} == set(range(1, seen["n"] + 1))


def test_a_311_packet_limit_just_under_the_first_joined_message_still_ends_joined(
    tmp_path: Path, pki: DemoPKI
) -> None:
    """MQTT 3.1.1, mosquitto's max_packet_size just under the first joined message of a backlog
    (five windows): that message ends the connection; the next joins are searched for between what
    the broker took and that size, and the windows that follow go joined, with no more reconnecting
    (halving left each window alone: half of five is less than two)."""
    batch_s, batch_bytes = 0.3, 915  # five windows of 183 bytes a message
    items, _ = feature_items(30)
    with Outbox(tmp_path / "ob.db") as store:
        store.put_many(items)
        epoch = store.epoch
    first = _first_joined_packet(items, epoch, batch_s, batch_bytes)
    # mosquitto counts a packet's remaining length and first byte, not the length's own two bytes:
    # it takes packets of up to first - 1 bytes, refuses first.
    broker = MosquittoBroker(tmp_path / "broker", pki, max_packet_size=first - 3)
    seen: dict[str, int] = {"first": first}

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            cfg = uplink_config(broker, pki, protocol="3.1.1", batch_s=batch_s, batch_bytes=batch_bytes)
            uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
            run = RunningUplink(uplink)
            await wait_until(lambda: uplink.delivered >= 30, 20, "the backlog delivered")
            seen["connects"] = uplink.counters.connects
            assert await asyncio.to_thread(
                twin.wait_for, lambda t: len({m.seq for m in _features(t)}) >= 30, 10
            )
            received = twin.received
            later, _ = feature_items(30, start=30)
            for item in later:
                outbox.submit(item)
            await wait_until(lambda: uplink.delivered >= 60, 20, "the later windows delivered")
            seen["later_connects"] = uplink.counters.connects - seen["connects"]
            assert await asyncio.to_thread(
                twin.wait_for, lambda t: len({m.seq for m in _features(t)}) >= 60, 10
            )
            seen["later_messages"] = twin.received - received
            seen["join_max"] = uplink._delivery._join_max() or 0
            await run.stop()

    with contextlib.ExitStack() as stack:
        broker.start()
        stack.callback(broker.stop)
        twin = listener(broker, pki, protocol="3.1.1")
        stack.callback(twin.stop)
        asyncio.run(main())
    assert 2 <= seen["connects"] <= 7, seen  # the first joined message ended one; at most six probes
    assert seen["later_connects"] == 0, seen
    assert 0 < seen["join_max"] < first, seen  # never the refused size again
    assert seen["later_messages"] <= 15, seen  # 30 windows, two or more a message
    assert {m.seq for m in _features(twin)} == set(range(1, 61))
