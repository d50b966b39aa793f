"""The MQTT uplink against a real mosquitto with TLS and client certificates on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from peers import LoggedProcess
from tcp_proxy import TcpProxy
from uplink_support import (
    GATEWAY_ID,
    LeaseLog,
    LeaseRecorder,
    RunningUplink,
    listener,
    mosquitto_pki,
    running_broker,
    uplink_config,
    wait_until,
)

from gateway.contracts import Lane
from gateway.downlink.twin_link import Broker, publish_desired
from gateway.outbox import AsyncOutbox, FullPolicy, LaneBudget, Outbox, OutItem
from gateway.records import AlarmRecord, FeaturesWindow, StatusRecord, StreamWindow, encode, encode_status
from gateway.records.topics import DEFAULT_PREFIX
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoCA, DemoPKI
from gateway.uplink.mqtt import MqttUplink

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def feature_payload(i: int) -> bytes:
    stream = StreamWindow(
        "MDC_PULS_OXIM_SAT_O2", "%", "devpseudonym0001", 10, mdc=150456, features={"mean": 97.5, "min": 96.0}
    )
    return encode(FeaturesWindow("subj0000pseudo00", "medical", float(i), 10.0, (stream,)))


def alarm_payload(i: int) -> bytes:
    return encode(AlarmRecord("sensor_fault", "subj0000pseudo00", float(i), detail={"n": i}))


def _state(twin: Any) -> str | None:
    gw = twin.view.gateways.get(GATEWAY_ID)
    return gw.status.state if gw is not None and gw.status is not None else None


def records(n_features: int, n_alarms: int = 0, start: int = 0) -> list[OutItem]:
    now = time.time()
    out = [
        OutItem(Lane.FEATURES, "features/subj0000pseudo00", feature_payload(start + i), now)
        for i in range(n_features)
    ]
    out += [
        OutItem(Lane.ALARMS, "alarms/subj0000pseudo00", alarm_payload(start + i), now)
        for i in range(n_alarms)
    ]
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    yield from running_broker(tmp_path, pki, persistence=True)


def raw_properties(broker: MosquittoBroker, pki: DemoPKI, got: list[Any]) -> paho.Client:
    """A bare paho subscriber that keeps (topic, user properties, content type)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-props", protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki.twin.cert, pki.twin.key)
    c.tls_set_context(ctx)
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_message = lambda cl, u, m: got.append(
        (m.topic, dict(getattr(m.properties, "UserProperty", [])), getattr(m.properties, "ContentType", None))
    )
    c.connect(broker.host, broker.port)
    c.subscribe("edgetwin/#", qos=1)
    c.loop_start()
    assert subscribed.wait(5)
    return c


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publish_acks_on_puback_and_the_twin_sees_every_record(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker, protocol: str
) -> None:
    twin = listener(broker, pki, protocol=protocol)
    props: list[Any] = []
    raw = raw_properties(broker, pki, props)

    async def main() -> int:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
            outbox.outbox.put_many(records(40, 5))
            run = RunningUplink(MqttUplink(outbox, uplink_config(broker, pki, protocol=protocol), GATEWAY_ID))
            await wait_until(lambda: run.uplink.delivered == 45, 10, "45 acknowledged records")
            assert (await outbox.stats()).queued == 0  # deleted once acknowledged
            await wait_until(lambda: twin.records_received >= 45, 20, "the twin to receive 45 records")
            await run.stop()
            return outbox.outbox.epoch

    try:
        epoch = asyncio.run(main())
        assert twin.wait_for(lambda t: _state(t) == "offline", 20)
    finally:
        twin.stop()
        raw.disconnect()
        raw.loop_stop()
    recs = twin.records()
    assert sorted(m.seq for m in recs if m.seq is not None) == list(range(1, 46))
    assert {m.epoch for m in recs} == {epoch}
    assert [m.kind for m in recs[:5]] == ["alarms"] * 5  # the alarms lane goes first
    assert all(m.topic.startswith(("features/", "alarms/")) for m in recs)
    (state,) = twin.checker.gateways.values()
    assert (state.gaps, state.duplicates, state.reordered) == ([], 0, 0)
    assert twin.view.gateways[GATEWAY_ID].status == StatusRecord("offline", ep=epoch, clean=True)
    record_props = [p for t, p, _ in props if "/status" not in t]
    assert len(record_props) == 45
    if protocol == "5":
        assert {p["ep"] for p in record_props} == {str(epoch)}
        assert sorted(int(p["seq"]) for p in record_props) == list(range(1, 46))
        assert all(ct == "application/senml+cbor" for t, _, ct in props if "/status" not in t)
    else:
        assert all(p == {} for p in record_props)  # 3.1.1 has no properties: seq travels in the pack


def test_broker_outage_buffers_on_disk_then_everything_arrives_in_order(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    twin = listener(broker, pki, client_id="twin-outage", session_expiry_s=300)

    async def main() -> tuple[int, int]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db"), flush_interval_s=0.02) as outbox:
            run = RunningUplink(MqttUplink(outbox, uplink_config(broker, pki), GATEWAY_ID))
            stop = asyncio.Event()

            async def produce() -> None:
                i = 0
                while not stop.is_set():
                    outbox.submit(records(1, 1 if i % 10 == 0 else 0, start=i)[0])
                    if i % 10 == 0:
                        outbox.submit(records(0, 1, start=i)[0])
                    i += 1
                    await asyncio.sleep(0.01)

            producer = asyncio.create_task(produce(), name="test-producer")
            await wait_until(lambda: run.uplink.delivered > 20, 10, "records flowing")
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not run.uplink.connected, 20, "the uplink to notice")
            # Buffered on disk while the broker is away (the producer's pace slows on a loaded machine).
            await wait_until(lambda: outbox.outbox.stats().queued > 50, 20, "records buffered on disk")
            queued = (await outbox.stats()).queued
            await asyncio.to_thread(broker.start)
            await asyncio.sleep(1.0)
            stop.set()
            await producer
            await outbox.flush()
            last = await outbox.last_id()
            await wait_until(lambda: run.uplink.delivered > 0 and run.uplink.connected, 10, "reconnection")
            await wait_until(lambda: outbox.outbox.stats().queued == 0, 20, "the backlog to drain")
            await run.stop()
            return last, queued

    try:
        last, queued = asyncio.run(main())
        assert twin.wait_for(lambda t: len({m.seq for m in t.records()}) >= last, 15)
    finally:
        twin.stop()
    recs = twin.records()
    assert {m.seq for m in recs} == set(range(1, last + 1))  # everything arrives
    (state,) = twin.checker.gateways.values()
    assert state.gaps == []  # and the twin reports no gap
    assert state.reordered == 0
    assert state.historical >= queued  # the backlog was marked as replayed
    for lane in ("alarms", "features"):
        for historical in (False, True):
            firsts: list[int] = []
            seen: set[int] = set()
            for m in recs:
                if m.kind == lane and m.historical == historical and m.seq not in seen:
                    seen.add(m.seq or 0)
                    firsts.append(m.seq or 0)
            assert firsts == sorted(firsts), f"{lane} historical={historical} out of order"


async def delivered_everywhere(run: RunningUplink, outbox: AsyncOutbox, twin: Any, n: int) -> None:
    """Wait until ``n`` records are acknowledged (deleted from the outbox) and at the twin; stop the uplink."""
    await wait_until(lambda: run.uplink.delivered == n, 20, f"{n} records acknowledged")
    assert (await outbox.stats()).queued == 0  # deleted once acknowledged
    await wait_until(lambda: twin.records_received >= n, 20, f"{n} records at the twin")
    await run.stop()


def test_live_alarms_go_out_from_their_commit_in_order_and_are_acknowledged(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    twin = listener(broker, pki)
    leases = LeaseLog()

    async def main() -> int:
        async with AsyncOutbox(
            lambda: LeaseRecorder(tmp_path / "ob.db", leases), flush_interval_s=0.02
        ) as outbox:
            run = RunningUplink(MqttUplink(outbox, uplink_config(broker, pki), GATEWAY_ID))
            outbox.submit(records(1, start=100)[0])
            await wait_until(lambda: run.uplink.delivered == 1, 10, "the uplink delivering")
            # Alarms between features, some in one commit, some alone, while features stream.
            for i in range(60):
                outbox.submit(records(1, start=i)[0])
                if i % 3 == 0:
                    outbox.submit(records(0, 1, start=i)[0])
                if i % 7 == 0:
                    outbox.submit(records(0, 1, start=1000 + i)[0])
                    await asyncio.sleep(0.005)
            await outbox.flush()
            last = await outbox.last_id()
            await delivered_everywhere(run, outbox, twin, last)
            return last

    try:
        last = asyncio.run(main())
    finally:
        twin.stop()
    recs = twin.records()
    assert sorted(m.seq for m in recs if m.seq is not None) == list(range(1, last + 1))
    alarms = [m.seq or 0 for m in recs if m.kind == "alarms"]
    assert len(alarms) == 20 + 9
    assert alarms == sorted(alarms)  # alarms in order among themselves
    assert not any(m.historical for m in recs if m.kind == "alarms")
    # None of them waited for a lease: each was handed over by the commit that made it durable.
    assert Lane.ALARMS not in leases.lanes
    assert leases.lanes.count(Lane.FEATURES) == 61
    (state,) = twin.checker.gateways.values()
    assert (state.gaps, state.duplicates) == ([], 0)


def test_alarms_handed_over_on_a_connection_that_dies_are_released_and_sent_again(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    twin = listener(broker, pki)
    leases = LeaseLog()

    async def main() -> list[int]:
        with TcpProxy(broker.host, broker.port) as proxy:
            async with AsyncOutbox(
                lambda: LeaseRecorder(tmp_path / "ob.db", leases), flush_interval_s=0.02
            ) as outbox:
                cfg = uplink_config(broker, pki, port=proxy.port)
                run = RunningUplink(MqttUplink(outbox, cfg, GATEWAY_ID))
                outbox.submit(records(1)[0])
                await wait_until(lambda: run.uplink.delivered == 1, 10, "the uplink delivering")
                proxy.stall()  # published into a black hole: no PUBACK comes
                for i in range(5):
                    outbox.submit(records(0, 1, start=i)[0])
                    await outbox.flush()
                ids = list(range(2, 7))
                await wait_until(lambda: run.uplink.counters.published >= 6, 10, "the alarms published")
                proxy.clear()  # the stalled connection is reset: a new one takes over
                await delivered_everywhere(run, outbox, twin, 6)
                return ids

    try:
        ids = asyncio.run(main())
    finally:
        twin.stop()
    # Handed over by their commits (no lease), released when the connection died, then leased
    # by the next connection as records sent once already.
    assert [leases.attempts.get(rid) for rid in ids] == [[1]] * 5
    recs = twin.records()
    alarms = [m.seq or 0 for m in recs if m.kind == "alarms"]
    assert sorted(set(alarms)) == ids  # none lost
    firsts = list(dict.fromkeys(alarms))
    assert firsts == ids  # and first seen in order


def test_live_records_overtake_a_paced_backlog(tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker) -> None:
    twin = listener(broker, pki)
    rate = 40.0  # a burst of 40, then 40/s: the rest of the backlog takes about 4 s

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
            outbox.outbox.put_many(records(200))  # the backlog of an outage
            cfg = uplink_config(broker, pki, replay_msgs_per_s=rate)
            run = RunningUplink(MqttUplink(outbox, cfg, GATEWAY_ID))
            await wait_until(lambda: run.uplink.delivered >= 20, 20, "the replay to start")
            started = time.monotonic()
            outbox.submit(records(0, 1, start=1000)[0])  # a live alarm
            await wait_until(lambda: any(m.kind == "alarms" for m in twin.records()), 20, "the live alarm")
            print(f"\nlive alarm at the twin {time.monotonic() - started:.2f} s after it was submitted")
            await wait_until(lambda: run.uplink.delivered == 201, 30, "the backlog")
            await wait_until(lambda: twin.records_received >= 201, 20, "the backlog at the twin")
            await run.stop()

    try:
        asyncio.run(main())
    finally:
        twin.stop()
    recs = twin.records()
    at = next(i for i, m in enumerate(recs) if m.kind == "alarms")
    alarm = recs[at]
    assert not alarm.historical
    assert all(m.historical for m in recs if m.kind == "features")
    # The alarm went ahead of the paced backlog, not behind it: judged by the order of arrival at the
    # twin (one connection, in publish order) rather than by a latency a loaded machine stretches.
    # Two seconds of the pace are left for the alarm's way into a publish; one that waited for the
    # backlog had none of it behind.
    behind = sum(1 for m in recs[at + 1 :] if m.kind == "features")
    assert behind >= 200 - rate - 2 * rate, (behind, at)
    (state,) = twin.checker.gateways.values()
    assert state.gaps == []


def test_disk_budget_during_an_outage_keeps_alarms_and_reports_drops(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    size = len(feature_payload(0)) + len("features/subj0000pseudo00")
    budgets = {
        Lane.ALARMS: LaneBudget(None, None, FullPolicy.NEVER_DROP),
        Lane.FEATURES: LaneBudget(30 * size, None, FullPolicy.DROP_OLDEST),
        Lane.DIAGNOSTICS: LaneBudget(16 * 1024, None, FullPolicy.DROP_NEWEST),
    }
    # The twin keeps a persistent session: the broker queues for it while it is away.
    twin = listener(broker, pki, client_id="twin-budget", session_expiry_s=300)
    broker.stop()  # a long outage

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db", budgets=budgets)) as outbox:
            run = RunningUplink(MqttUplink(outbox, uplink_config(broker, pki), GATEWAY_ID))
            for batch in range(10):
                outbox.outbox.put_many(records(20, 2, start=batch * 100))
            stats = await outbox.stats()
            assert stats.lanes[Lane.ALARMS].queued == 20  # every alarm kept
            assert stats.lanes[Lane.FEATURES].queued == 30  # features trimmed to the budget
            assert stats.dropped[Lane.FEATURES] == {"budget": 170}  # ... and the drops counted
            await asyncio.to_thread(broker.start)
            await wait_until(lambda: run.uplink.delivered == 50, 10, "delivery after the outage")
            await run.stop()

    try:
        asyncio.run(main())
        assert twin.wait_for(lambda t: t.records_received >= 50, 10)
    finally:
        twin.stop()
    recs = twin.records()
    assert sum(1 for m in recs if m.kind == "alarms") == 20
    (state,) = twin.checker.gateways.values()
    # Ids 1-20 (the first features) precede the first id the twin saw; the other 150 are gaps.
    assert state.seen.first == 21
    assert state.missing == 150
    status = twin.view.gateways[GATEWAY_ID].status
    assert status is not None
    assert status.dropped == {"features": 170}


# --- refused connections: which check failed and what to do ------------------------------------------


def _run_until_error(tmp_path: Path, cfg: Any) -> str:
    """Run the uplink until it reports itself degraded; the reason it gives (it keeps retrying)."""

    async def main() -> str:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
            uplink = MqttUplink(outbox, cfg, GATEWAY_ID)
            running = RunningUplink(uplink)
            try:
                await wait_until(
                    lambda: uplink.problem not in (None, "not connected yet"), 10, "a degraded uplink"
                )
                assert not running.task.done(), "the uplink gave up instead of retrying"
                assert uplink.describe().startswith("degraded (")
                return str(uplink.problem)
            finally:
                await running.stop()

    return asyncio.run(main())


def test_wrong_ca_is_refused_naming_the_ca_file(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    other = DemoCA(tmp_path / "other", "another CA")
    exc = _run_until_error(tmp_path, uplink_config(broker, pki, ca_file=other.ca_file))
    assert "not signed by a CA in" in str(exc)
    assert str(other.ca_file) in str(exc)
    assert "set uplink.mqtt.ca_file" in str(exc)


def test_wrong_host_name_is_refused_naming_both_names(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    exc = _run_until_error(tmp_path, uplink_config(broker, pki, server_name="broker.example"))
    assert "does not match host name 'broker.example'" in str(exc)
    assert "set uplink.mqtt.host (or server_name)" in str(exc)


def test_missing_client_certificate_is_refused_saying_so(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    exc = _run_until_error(tmp_path, uplink_config(broker, pki, cert_file=None, key_file=None))
    assert "requires a client certificate and none is configured" in str(exc)
    assert "cert_file" in str(exc)


def test_expired_server_certificate_is_refused(tmp_path: Path, pki: DemoPKI) -> None:
    ca = DemoCA(tmp_path / "pki2")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    expired = DemoPKI(
        ca.ca_file,
        ca.issue(
            "broker",
            "broker",
            server=True,
            hosts=("127.0.0.1",),
            valid_from=past - dt.timedelta(days=30),
            valid_until=past,
        ),
        ca.issue("gateway", "gateway"),
        ca.issue("twin", "twin"),
    )
    b = MosquittoBroker(tmp_path / "b2", expired)
    b.start()
    try:
        exc = _run_until_error(tmp_path, uplink_config(b, expired))
    finally:
        b.stop()
    assert "the server certificate has expired" in str(exc)
    assert "renew the broker's certificate" in str(exc)


def test_expired_client_certificate_is_refused_before_connecting(tmp_path: Path, pki: DemoPKI) -> None:
    ca = DemoCA(tmp_path / "pki3")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    old = ca.issue("gw", "gw", valid_from=past - dt.timedelta(days=30), valid_until=past)
    cfg = uplink_config(
        MosquittoBroker(tmp_path / "unused", pki, port=1), pki, cert_file=old.cert, key_file=old.key
    )
    exc = _run_until_error(tmp_path, cfg)
    assert "expired on" in str(exc)
    assert "renew it" in str(exc)


# --- the twin scales out with shared subscriptions ------------------------------------------------------


def test_two_listeners_in_one_group_split_the_stream(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    outs = [tmp_path / f"twin{i}.jsonl" for i in range(2)]
    procs = [
        LoggedProcess(
            [
                sys.executable,
                "-m",
                "gateway.uplink.commands",
                "twin",
                "listen",
                "--broker",
                f"{broker.host}:{broker.port}",
                "--ca",
                str(pki.ca_file),
                "--cert",
                str(pki.twin.cert),
                "--key",
                str(pki.twin.key),
                "--group",
                "twins",
                "--json",
                "--out",
                str(out),
                "--duration",
                "120",  # ended by the test once it has what it needs
            ],
            log=out.with_suffix(".log"),
            cwd=ROOT,
        )
        for out in outs
    ]
    try:
        # Both members subscribed, seen rather than assumed (a member started late on a loaded
        # machine got no share): status probes of another gateway, split between the members like
        # the stream, until each has written one. Status lines carry no seq: not counted below.
        probe = Broker(broker.host, broker.port, pki.ca_file, pki.twin.cert, pki.twin.key)
        deadline = time.monotonic() + 90
        while not all(o.exists() and o.read_text().strip() for o in outs):
            assert time.monotonic() < deadline, "the two listeners never both received a probe"
            assert all(p.poll() is None for p in procs), [p.err() for p in procs]
            publish_desired(
                probe, f"{DEFAULT_PREFIX}/probe0000000000/status", encode_status(StatusRecord("online"))
            )
            time.sleep(0.2)

        async def main() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
                outbox.outbox.put_many(records(200))
                run = RunningUplink(MqttUplink(outbox, uplink_config(broker, pki), GATEWAY_ID))
                await wait_until(lambda: run.uplink.delivered == 200, 10, "200 records")
                await run.stop()

        asyncio.run(main())

        def seqs(path: Path) -> list[int]:
            if not path.exists():
                return []
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            return [x["seq"] for x in lines if x["seq"] is not None]

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(seqs(outs[0])) + len(seqs(outs[1])) < 200:
            time.sleep(0.1)
    finally:
        for p in procs:
            p.terminate()
        reports = [p.communicate(timeout=10)[0] for p in procs]
    a, b = seqs(outs[0]), seqs(outs[1])
    assert a
    assert b, reports  # both members got a share
    assert not set(a) & set(b)  # ... and no message went to both
    assert sorted(a + b) == list(range(1, 201))  # ... and together they have it all
    assert all("shared subscription group twins" in r for r in reports)


def test_demo_link_shows_decoded_records_and_the_twin_view(tmp_path: Path) -> None:
    import io  # noqa: PLC0415

    from gateway.uplink.config import MqttSection  # noqa: PLC0415
    from gateway.uplink.demo import demo_link  # noqa: PLC0415

    out = io.StringIO()
    with demo_link(tmp_path / "demo", out) as link:
        cfg = MqttSection.model_validate(link.mqtt_config())

        async def main() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "ob.db")) as outbox:
                outbox.outbox.put_many(records(3, 1))
                run = RunningUplink(MqttUplink(outbox, cfg, GATEWAY_ID))
                await wait_until(lambda: link.twin.records_received >= 4, 10, "the twin")
                await run.stop()

        asyncio.run(main())
    text = out.getvalue()
    assert text.count("twin <- ") >= 4
    assert "ALARM sensor_fault" in text
    assert "FEATURES SpO2 mean 97.5 %" in text  # the feature is named, with its unit
    assert "The twin's view:" in text
    assert f"gateway {GATEWAY_ID}: offline" in text
    assert "4 received" in text
    assert "0 missing" in text
