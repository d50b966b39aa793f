"""Several windows of a subject per message (uplink.mqtt.batch_s) through a real TLS mosquitto:
the twin reads every record with its own sequence id, a connection lost with joined messages in
flight loses nothing and duplicates nothing silently, and alarms are never held behind a batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from uplink_support import (
    GATEWAY_ID,
    RunningUplink,
    listener,
    mosquitto_pki,
    running_broker,
    uplink_config,
    wait_until,
)

from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.records import AlarmRecord, FeaturesWindow, StreamWindow, encode, on_wire
from gateway.twin.decoder import TwinMessage
from gateway.twin.listen import Listener, ListenOptions
from gateway.twin.sequence import SeqEvent
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI
from gateway.uplink.config import MqttSection
from gateway.uplink.connection import PahoClient, Session
from gateway.uplink.delivery import Delivery
from gateway.uplink.mqtt import MqttUplink
from gateway.uplink.profiles import GENERIC

pytestmark = pytest.mark.slow
SUBJECTS = ("subj0000pseudo00", "subj0001pseudo01", "subj0002pseudo02")


def window(subject: str, i: int) -> FeaturesWindow:
    spo2 = StreamWindow(
        "MDC_PULS_OXIM_SAT_O2",
        "%",
        "devpseudonym0001",
        10,
        mdc=150456,
        features={"mean": 90.0 + i % 97 / 10, "std": 0.6, "min": 89.0, "max": 99.0},
        shape="level",
    )
    temp = StreamWindow("Pump/Motor/Temp", "Cel", "devpseudonym0002", 10, features={"mean": 40 + i / 100})
    return FeaturesWindow(subject, "medical", 10.0 * i, 30.0, (spo2, temp), run=1, hb=60.0)


def feature_items(n: int, start: int = 0) -> tuple[list[OutItem], dict[tuple[str, float], FeaturesWindow]]:
    """Windows of three subjects, interleaved as a gateway stores them; and what a reader gets back."""
    now = time.time()
    out, sent = [], {}
    for i in range(start, start + n):
        w = window(SUBJECTS[i % 3], i)
        out.append(OutItem(Lane.FEATURES, f"features/{w.subject}", encode(w), now))
        sent[(w.subject, w.t)] = on_wire(w)
    return out, sent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    yield from running_broker(tmp_path, pki, persistence=True)


def _features(twin: Any) -> list[TwinMessage]:
    return [m for m in twin.records() if m.kind == "features"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_joined_windows_reach_the_twin_each_with_its_own_sequence(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker, protocol: str
) -> None:
    twin = listener(broker, pki, protocol=protocol)
    items, sent = feature_items(30)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
            outbox.outbox.put_many(items)
            cfg = uplink_config(broker, pki, protocol=protocol, batch_s=0.3, batch_bytes=1024)
            run = RunningUplink(MqttUplink(outbox, cfg, GATEWAY_ID))
            await wait_until(lambda: run.uplink.delivered == 30, 15, "30 acknowledged records")
            await wait_until(lambda: len(_features(twin)) >= 30, 10, "the twin to read 30 windows")
            await run.stop()

    try:
        asyncio.run(main())
    finally:
        twin.stop()
    recs = _features(twin)
    assert sorted(m.seq or 0 for m in recs) == list(range(1, 31))
    assert all(m.batch_s == 0.3 for m in recs)
    for m in recs:  # every window as it was sent
        assert isinstance(m.record, FeaturesWindow)
        assert m.record == sent[(m.record.subject, m.record.t)]
    messages = twin.received - sum(1 for m in twin.records() if m.kind == "status")
    assert messages < 30 / 2  # several windows per message (status messages not counted)
    (state,) = twin.checker.gateways.values()
    assert (state.gaps, state.duplicates, state.reordered) == ([], 0, 0)


def test_a_connection_lost_with_joined_messages_in_flight_loses_nothing_and_duplicates_nothing_silently(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    twin = listener(broker, pki, client_id="twin-batch", session_expiry_s=300)
    sent: dict[tuple[str, float], FeaturesWindow] = {}

    async def main() -> int:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            cfg = uplink_config(broker, pki, batch_s=0.3, batch_bytes=512)
            run = RunningUplink(MqttUplink(outbox, cfg, GATEWAY_ID))
            stop = asyncio.Event()

            async def produce() -> None:
                i = 0
                while not stop.is_set():
                    batch, more = feature_items(3, start=i)
                    sent.update(more)
                    for item in batch:
                        outbox.submit(item)
                    i += 3
                    await asyncio.sleep(0.01)

            producer = asyncio.create_task(produce(), name="test-producer")
            await wait_until(lambda: run.uplink.delivered > 30, 10, "joined messages flowing")
            # Cut while joined messages are in flight: some are acknowledged, some not.
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not run.uplink.connected, 5, "the uplink to notice")
            await asyncio.to_thread(broker.start)
            await wait_until(lambda: run.uplink.connected, 10, "reconnection")
            before = run.uplink.delivered
            await wait_until(lambda: run.uplink.delivered > before, 10, "delivery after reconnecting")
            stop.set()
            await producer
            await outbox.flush()
            last = await outbox.last_id()
            await wait_until(lambda: outbox.outbox.stats().queued == 0, 20, "the outbox to drain")
            await run.stop()
            return last

    try:
        last = asyncio.run(main())
        assert twin.wait_for(lambda t: len({m.seq for m in _features(t)}) >= last, 15)
    finally:
        twin.stop()
    recs = _features(twin)
    assert {m.seq for m in recs} == set(range(1, last + 1))  # nothing lost
    (state,) = twin.checker.gateways.values()
    assert state.gaps == []
    # Whatever arrived twice (a PUBACK lost with the connection) is reported, record by record,
    # and is the same record both times.
    assert state.duplicates == len(recs) - len({m.seq for m in recs})
    first: dict[int | None, Any] = {}
    for m in recs:
        assert first.setdefault(m.seq, m.record) == m.record
        assert isinstance(m.record, FeaturesWindow)
        assert m.record == sent[(m.record.subject, m.record.t)]
    assert state.reordered == 0
    assert twin.received < len(recs)  # messages (status included): windows were joined


def test_an_alarm_is_never_held_behind_a_batch(tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker) -> None:
    seen_features_at_alarm: list[int] = []

    def on_message(msg: TwinMessage, _event: SeqEvent | None) -> None:
        if msg.kind == "alarms":
            seen_features_at_alarm.append(len(_features(twin)))

    twin = Listener(
        ListenOptions(
            host=broker.host,
            port=broker.port,
            ca_file=pki.ca_file,
            cert_file=pki.twin.cert,
            key_file=pki.twin.key,
        ),
        on_message,
    )
    twin.start()
    items, _ = feature_items(6)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            # Held for far longer than the test waits for the alarm.
            run = RunningUplink(MqttUplink(outbox, uplink_config(broker, pki, batch_s=120.0), GATEWAY_ID))
            await wait_until(lambda: run.uplink.connected, 10, "the uplink to connect")
            for item in items:  # live windows (what was queued before connecting is replayed at once)
                outbox.submit(item)
            await outbox.flush()
            alarm = AlarmRecord("sensor_lost", SUBJECTS[0], 61.0, "devpseudonym0001", "MDC_PULS_OXIM_SAT_O2")
            outbox.submit(OutItem(Lane.ALARMS, f"alarms/{SUBJECTS[0]}", encode(alarm), time.time()))
            await wait_until(lambda: bool(seen_features_at_alarm), 10, "the alarm at the twin")
            # A drain (an orderly stop) sends what is held at once.
            await run.uplink.drain(time.monotonic() + 10)
            await wait_until(lambda: len(_features(twin)) >= 6, 10, "the held windows after the drain")
            await run.stop()

    try:
        asyncio.run(main())
    finally:
        twin.stop()
    assert seen_features_at_alarm == [0]  # the alarm went while every window was still held
    assert sorted(m.seq or 0 for m in _features(twin)) == [1, 2, 3, 4, 5, 6]


def test_one_puback_acknowledges_every_record_of_its_message_and_only_those(tmp_path: Path) -> None:
    """Two joined messages in flight and two windows still held when the connection ends: the
    PUBACK that came deletes its message's records; everything else is leased again, none lost."""

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
            outbox.outbox.put_many(feature_items(6)[0])
            leased = await outbox.lease(10)
            assert [i.id for i in leased] == [1, 2, 3, 4, 5, 6]
            cfg = MqttSection.model_validate({"host": "127.0.0.1", "batch_s": 60.0})
            root = f"edgetwin/v1/{GATEWAY_ID}"
            delivery = Delivery(
                outbox, cfg, GENERIC, lambda rel, _props: f"{root}/{rel}", lambda _now: None, topic_root=root
            )
            loop = asyncio.get_running_loop()

            def session() -> Session:
                client = PahoClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv5)
                return Session(client, loop, loop.create_future())

            # Message 101 holds ids 1 and 4 (subject 0), message 102 ids 2 and 5 (subject 1); 3 and
            # 6 are held.  Only 101's PUBACK arrives before the connection ends.
            first = session()
            first.leased = {i.id: len(i.payload) for i in leased}
            first.by_mid, first.joined = {101: 1, 102: 2}, {101: [4], 102: [5]}
            first.acks.append((101, 0))
            await delivery.finish(first)
            assert delivery.counters.acked == 2
            again = await outbox.lease(10)
            assert sorted(i.id for i in again) == [2, 3, 5, 6]  # released, sent by the next connection

            # A refused message: all its records are released, and the connection is given up.
            second = session()
            second.leased = {i.id: len(i.payload) for i in again}
            second.by_mid, second.joined = {201: 2}, {201: [5]}
            second.acks.append((201, 0x80))
            delivery.take_acks(second)
            assert sorted(second.to_release) == [2, 5]
            assert second.lost is not None
            await delivery.finish(second)
            assert sorted(i.id for i in await outbox.lease(10)) == [2, 3, 5, 6]
            assert (await outbox.stats()).queued == 4

    asyncio.run(main())
