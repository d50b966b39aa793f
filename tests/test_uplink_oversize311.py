"""MQTT 3.1.1 has no maximum packet size to negotiate: mosquitto with ``max_packet_size`` just ends
the connection of a client that sends a larger packet.  A record that keeps ending the connection
is taken as too large (after ``oversize_disconnects`` times): an alarm goes without its optional
detail, anything else to the dead-letter lane, counted; the uplink does not loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tcp_proxy import TcpProxy
from uplink_support import GATEWAY_ID, RunningUplink, listener, mosquitto_pki, uplink_config, wait_until

from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.records import AlarmRecord, FeaturesWindow, StreamWindow, encode
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI
from gateway.uplink.mqtt import MqttUplink

pytestmark = pytest.mark.slow
MAX_PACKET = 2048


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


def features(pad: int, t: float) -> bytes:
    stream = StreamWindow("MDC_PULS_OXIM_SAT_O2", "%", "d" * pad, 10, features={"mean": 97.5})
    return encode(FeaturesWindow("subj0000pseudo00", "medical", t, 10.0, (stream,)))


def test_a_record_that_keeps_ending_a_311_connection_is_set_aside_not_looped(
    tmp_path: Path, pki: DemoPKI
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", pki, max_packet_size=MAX_PACKET)
    broker.start()
    twin = listener(broker, pki, protocol="3.1.1")
    seen: dict[str, Any] = {}
    topic = "features/subj0000pseudo00"

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            now = time.time()
            big_alarm = encode(
                AlarmRecord("sensor_fault", "subj0000pseudo00", 12.0, detail={"trace": "t" * 3000, "n": 7})
            )
            outbox.outbox.put_many(
                [
                    OutItem(Lane.FEATURES, topic, features(8, 1.0), now),  # 1
                    OutItem(Lane.FEATURES, topic, features(4 * MAX_PACKET, 2.0), now),  # 2: too large
                    OutItem(Lane.ALARMS, "alarms/subj0000pseudo00", big_alarm, now),  # 3: too large
                    *(OutItem(Lane.FEATURES, topic, features(8, 3.0 + i), now) for i in range(5)),  # 4-8
                ]
            )
            cfg = uplink_config(broker, pki, protocol="3.1.1", oversize_disconnects=3, max_inflight=4)
            uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
            run = RunningUplink(uplink)
            try:
                await wait_until(lambda: outbox.outbox.stats().queued == 0, 30, "an empty queue")
                connects = uplink.counters.connects
                await asyncio.sleep(1.5)  # no more reconnecting: nothing left that ends the link
                seen["connects"] = (connects, uplink.counters.connects)
                seen["dead"] = outbox.outbox.dead_letters()
                seen["drops"] = outbox.report().drops
                seen["counters"] = uplink.counters
            finally:
                await run.stop()

    try:
        asyncio.run(main())
        assert twin.wait_for(lambda t: t.records_received >= 7, 20)
    finally:
        twin.stop()
        broker.stop()
    recs = {m.seq: m for m in twin.records() if m.seq is not None}
    assert sorted(recs) == [1, 3, 4, 5, 6, 7, 8]  # every record but the oversize features
    alarm = recs[3].record
    assert isinstance(alarm, AlarmRecord)
    assert "trace" not in alarm.detail
    assert "bytes over the broker's limit" in str(alarm.detail["trimmed"])
    ((rid, dead_topic, why),) = seen["dead"]
    assert (rid, dead_topic) == (2, topic)
    assert "MQTT 3.1.1" in why
    assert seen["drops"] == {"features": {"dead_letter": 1}}
    first, later = seen["connects"]
    assert first == later, "the uplink kept reconnecting"
    # Three ended connections convict the alarm; the features record, larger than the limit found
    # then, goes at once.  A PUBACK lost with a connection may cost one more round.
    assert 4 <= first <= 6
    assert seen["counters"].trimmed == 1
    assert seen["counters"].dead_lettered == 1


def test_an_unreadable_stored_record_goes_to_dead_letters_and_delivery_goes_on(
    tmp_path: Path, pki: DemoPKI
) -> None:
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            now = time.time()
            outbox.outbox.put_many(
                [
                    OutItem(Lane.FEATURES, "features/s", features(8, 1.0), now),
                    OutItem(Lane.FEATURES, "features/s", b"\x63abc", now),  # a CBOR string, not a pack
                    OutItem(Lane.FEATURES, "features/s", features(8, 2.0), now),
                ]
            )
            uplink = MqttUplink(outbox, uplink_config(broker, pki), GATEWAY_ID)
            run = RunningUplink(uplink)
            try:
                await wait_until(lambda: outbox.outbox.stats().queued == 0, 10, "an empty queue")
                seen["delivered"] = uplink.delivered
                seen["dead"] = outbox.outbox.dead_letters()
                seen["connects"] = uplink.counters.connects
            finally:
                await run.stop()

    try:
        asyncio.run(main())
    finally:
        broker.stop()
    assert seen["delivered"] == 2
    ((rid, _, why),) = seen["dead"]
    assert rid == 2
    assert why.startswith("unreadable: ")
    assert seen["connects"] == 1


def connected_again(uplink: MqttUplink, connects: int) -> Callable[[], bool]:
    """True once the uplink has connected more often than ``connects`` times."""
    return lambda: uplink.counters.connects > connects


@pytest.mark.campaign
def test_a_flaky_link_does_not_make_a_record_the_broker_took_before_too_large(
    tmp_path: Path, pki: DemoPKI
) -> None:
    """Connections cut again and again with the same record in flight: not a size problem when the
    broker acknowledged a packet as large before, so the record is delivered, nothing set aside."""
    broker = MosquittoBroker(tmp_path / "broker", pki)  # no packet limit
    broker.start()
    topic = "features/subj0000pseudo00"
    seen: dict[str, Any] = {}

    async def main() -> None:
        with TcpProxy(broker.host, broker.port) as proxy:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
                cfg = uplink_config(
                    broker, pki, port=proxy.port, protocol="3.1.1", oversize_disconnects=3, max_inflight=4
                )
                uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
                run = RunningUplink(uplink)
                try:
                    outbox.outbox.put_many([OutItem(Lane.FEATURES, topic, features(1500, 1.0), time.time())])
                    await wait_until(lambda: outbox.outbox.stats().queued == 0, 20, "the first record")
                    # PUBACKs now take 1 s: the next record is in flight when each cut comes.
                    proxy.latency(1.0)
                    outbox.outbox.put_many([OutItem(Lane.FEATURES, topic, features(1500, 2.0), time.time())])
                    for _ in range(5):  # some cuts land before the record is out again
                        connects = uplink.counters.connects
                        await wait_until(lambda: uplink.connected, 20, "connected")
                        await wait_until(lambda: uplink.counters.published > 0, 20, "published")
                        await asyncio.sleep(0.4)
                        proxy.cut()
                        await wait_until(lambda: not uplink.connected, 10, "the cut seen")
                        proxy.clear()
                        proxy.latency(1.0)
                        await wait_until(connected_again(uplink, connects), 20, "reconnected")
                    proxy.clear()
                    await wait_until(lambda: outbox.outbox.stats().queued == 0, 20, "an empty queue")
                    seen["dead"] = outbox.outbox.dead_letters()
                    seen["drops"] = outbox.report().drops
                    seen["counters"] = uplink.counters
                finally:
                    await run.stop()

    try:
        asyncio.run(main())
    finally:
        broker.stop()
    assert seen["dead"] == []
    assert seen["drops"] == {}
    assert seen["counters"].dead_lettered == 0
    assert seen["counters"].trimmed == 0
