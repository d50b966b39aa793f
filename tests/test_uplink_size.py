"""Packet sizes: computed exactly, and a record over the broker's maximum is never lost silently.

The size formula is checked against the bytes paho itself writes; the boundary against a real
mosquitto configured with a small ``max_packet_size`` (it sends it in CONNACK and ends the
connection of a client that sends a larger packet).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, _ConnectionState
from uplink_support import (
    GATEWAY_ID,
    RunningUplink,
    listener,
    mosquitto_pki,
    uplink_config,
    wait_until,
)

from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, DropReason, Outbox, OutItem
from gateway.records import AlarmRecord, FeaturesWindow, SeqMeta, StreamWindow, encode, wrap
from gateway.uplink import packets
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI
from gateway.uplink.delivery import SCHEMA_VERSION
from gateway.uplink.mqtt import MqttUplink

MAX_PACKET = 2048
PREFIX = f"edgetwin/v1/{GATEWAY_ID}"


def _written_by_paho(topic: str, payload: bytes, properties: packets.Packed | None, v5: bool) -> int:
    """The length of the PUBLISH paho writes for these parts (read back from a socket pair)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="size", protocol=paho.MQTTv5 if v5 else paho.MQTTv311
        )
        # A connected socket without a broker: only paho's encoder and writer run.
        client._sock = ours
        client._state = _ConnectionState.MQTT_CS_CONNECTED
        assert client.publish(topic, payload, qos=1, properties=properties).rc == paho.MQTT_ERR_SUCCESS  # type: ignore[arg-type]
        got = 0
        for _ in range(10_000):
            client.loop_write()
            try:
                while chunk := theirs.recv(1 << 20):
                    got += len(chunk)
            except BlockingIOError:
                pass
            if not client.want_write():
                return got
        raise AssertionError("paho did not finish writing")
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("payload_len", [0, 1, 60, 61, 100, 16_300, 16_400, 2_097_000, 2_097_200])
@pytest.mark.parametrize("historical", [False, True])
def test_publish_size_is_what_paho_writes(payload_len: int, historical: bool) -> None:
    topic = f"{PREFIX}/features/subj0000pseudo00"
    head = packets.record_head(SCHEMA_VERSION, 1_733_000_000_123, 3600)
    props = packets.record_properties(head, 123_456, historical)
    payload = b"x" * payload_len
    assert packets.publish_size(topic, payload_len, props) == _written_by_paho(topic, payload, props, True)
    assert packets.publish_size(topic, payload_len, None, v5=False) == _written_by_paho(
        topic, payload, None, False
    )


# --- against mosquitto ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


def _record(kind: str, pad: int) -> bytes:
    """A features record padded by a device pseudonym of ``pad`` bytes, or an alarm by its detail."""
    if kind == "alarm":
        return encode(
            AlarmRecord("sensor_fault", "subj0000pseudo00", 12.0, detail={"trace": "t" * pad, "n": 7})
        )
    stream = StreamWindow("MDC_PULS_OXIM_SAT_O2", "%", "d" * pad, 10, features={"mean": 97.5})
    return encode(FeaturesWindow("subj0000pseudo00", "medical", 12.0, 10.0, (stream,)))


def _features_of_size(target: int, seq: int, epoch: int, topic: str) -> bytes:
    """A features record whose PUBLISH (replayed as backlog, MQTT 5) is exactly ``target`` bytes."""
    head = packets.record_head(SCHEMA_VERSION, epoch, None)
    props = packets.record_properties(head, seq, historical=True)
    for pad in range(1, target):
        payload = _record("features", pad)
        size = packets.publish_size(f"{PREFIX}/{topic}", len(wrap(payload, SeqMeta(seq, epoch, True))), props)
        if size == target:
            return payload
        assert size < target, f"no padding gives {target} bytes"
    raise AssertionError("unreachable")


def test_records_at_and_over_the_brokers_maximum_packet_size(tmp_path: Path, pki: DemoPKI) -> None:
    small_broker = MosquittoBroker(tmp_path / "broker", pki, max_packet_size=MAX_PACKET)
    small_broker.start()
    twin = listener(small_broker, pki)
    topic = "features/subj0000pseudo00"
    seen: dict[str, object] = {}

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            epoch = outbox.outbox.epoch
            now = time.time()
            outbox.outbox.put_many(
                [
                    OutItem(Lane.FEATURES, topic, _features_of_size(MAX_PACKET, 1, epoch, topic), now),
                    OutItem(Lane.FEATURES, topic, _features_of_size(MAX_PACKET + 1, 2, epoch, topic), now),
                    OutItem(Lane.ALARMS, "alarms/subj0000pseudo00", _record("alarm", 4 * MAX_PACKET), now),
                    OutItem(Lane.FEATURES, topic, _record("features", 8), now),
                ]
            )
            uplink = MqttUplink(outbox, uplink_config(small_broker, pki), GATEWAY_ID)
            run = RunningUplink(uplink)
            try:
                await wait_until(lambda: outbox.outbox.stats().queued == 0, 10, "an empty queue")
                await wait_until(lambda: twin.records_received >= 3, 20, "three records at the twin")
                await asyncio.sleep(0.5)  # a broker that ends the link for a packet does it by now
                seen["connects"] = uplink.counters.connects
                seen["counters"] = uplink.counters
                seen["dead"] = outbox.outbox.dead_letters()
                seen["dropped"] = outbox.outbox.stats().lanes[Lane.FEATURES].dropped
            finally:
                await run.stop()

    try:
        asyncio.run(main())
    finally:
        twin.stop()
        small_broker.stop()
    recs = {m.seq: m for m in twin.records() if m.seq is not None}
    # Exactly the maximum: delivered.  One byte over: kept in the dead-letter lane, counted.
    assert sorted(recs) == [1, 3, 4]
    assert seen["connects"] == 1, "the broker ended the connection: a packet was over its maximum"
    assert seen["dead"] == [(2, topic, f"1 bytes over the broker's maximum packet size {MAX_PACKET}")]
    assert seen["dropped"] == {DropReason.DEAD_LETTER.value: 1}
    # The alarm is delivered without its optional detail, with a note saying so.
    alarm = recs[3].record
    assert isinstance(alarm, AlarmRecord)
    assert alarm.alarm == "sensor_fault"
    assert "trace" not in alarm.detail
    assert "bytes over the broker's limit" in str(alarm.detail["trimmed"])
    counters = seen["counters"]
    assert getattr(counters, "trimmed") == 1  # noqa: B009
    assert getattr(counters, "dead_lettered") == 1  # noqa: B009
