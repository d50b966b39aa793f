"""The retained status topic tells the truth about losses: a fresh subscriber to the real TLS mosquitto
reads the run, the drop counters by lane and reason, the newest loss and the degraded state, and they
are the figures the diagnostics and the ``STATUS=`` line show."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_outbox_faults import fill, small_tmpfs
from uplink_support import GATEWAY_ID, RunningUplink, mosquitto_pki, running_broker, uplink_config, wait_until

from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, FullPolicy, LaneBudget, Outbox, OutItem
from gateway.records import DiagnosticRecord, StatusRecord, decode_status, encode
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI
from gateway.uplink.mqtt import MqttUplink

pytestmark = pytest.mark.slow
TOPIC = f"edgetwin/v1/{GATEWAY_ID}/status"
ORIGIN = 1.7e9  # the records' clock in this test: seconds since this wall-clock time


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    yield from running_broker(tmp_path, pki)


def retained_status(broker: MosquittoBroker, pki: DemoPKI) -> StatusRecord:
    """Connect as a new subscriber and return the retained status the broker hands it."""
    got: list[bytes] = []
    arrived = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"fresh-{time.monotonic_ns()}", protocol=paho.MQTTv5
    )
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki.twin.cert, pki.twin.key)
    c.tls_set_context(ctx)

    def on_message(_c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        if m.retain:
            got.append(bytes(m.payload))
            arrived.set()

    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe(TOPIC, qos=1)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        assert arrived.wait(10), "no retained status"
    finally:
        c.disconnect()
        c.loop_stop()
    return decode_status(got[0])


async def status_becomes(
    broker: MosquittoBroker, pki: DemoPKI, check: Callable[[StatusRecord], bool], timeout: float = 10.0
) -> StatusRecord:
    """Read the retained status as a fresh subscriber until ``check(status)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        status = await asyncio.to_thread(retained_status, broker, pki)
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"the retained status never matched; last: {status}")
        await asyncio.sleep(0.3)


def test_status_topic_reports_losses_the_degraded_state_and_the_run(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    payload = encode(DiagnosticRecord("counters", 1.0, None, {"n": 1.0, "pad": "p" * 200}))
    budgets = {
        Lane.ALARMS: LaneBudget(None, None, FullPolicy.NEVER_DROP),
        Lane.FEATURES: LaneBudget(30 * (len(payload) + 8), None, FullPolicy.DROP_OLDEST),
        Lane.DIAGNOSTICS: LaneBudget(1024 * 1024, None, FullPolicy.DROP_NEWEST),
    }
    with small_tmpfs(tmp_path, 10) as mnt:
        db = mnt / "outbox.db"
        # A corrupt main file: its 25 queued records are counted as lost, in a new epoch.
        with Outbox(db, reserve_bytes=0) as ob:
            ob.put_many([OutItem(Lane.FEATURES, "f/x", payload, time.time()) for _ in range(25)])
        with db.open("r+b") as f:
            f.write(os.urandom(100))

        def make() -> Outbox:
            return Outbox(db, budgets=budgets, reserve_bytes=512 * 1024)

        async def main() -> tuple[StatusRecord, StatusRecord, StatusRecord, str]:
            async with AsyncOutbox(make, flush_interval_s=0.02) as ao:
                assert ao.report().drops == {"features": {"corrupt": 25}}
                # Then a budget drop: 100 features into a lane that holds 30.
                ao.outbox.put_many([OutItem(Lane.FEATURES, "f/y", payload, time.time()) for _ in range(100)])
                uplink = MqttUplink(
                    ao, uplink_config(broker, pki), GATEWAY_ID, run=7, record_time=lambda t: t - ORIGIN
                )
                run = RunningUplink(uplink)
                try:
                    await wait_until(lambda: uplink.delivered == 30, 10, "30 records delivered")
                    first = await status_becomes(broker, pki, lambda s: s.state == "online")
                    # Now the disk fills while connected: the gateway says so at once.
                    filler = fill(mnt)
                    n = 0
                    while ao.health() is None and n < 20_000:
                        ao.submit(OutItem(Lane.FEATURES, f"f/z{n}", payload, time.time()))
                        n += 1
                        if n % 100 == 0:
                            await asyncio.sleep(0.02)
                    assert ao.health() is not None, "the disk never filled"
                    for i in range(5):
                        ao.submit(OutItem(Lane.DIAGNOSTICS, f"d/{i}", b"d" * 50, time.time()))
                        ao.submit(OutItem(Lane.FEATURES, f"f/w{i}", payload, time.time()))
                    await ao.flush()
                    full = await status_becomes(
                        broker,
                        pki,
                        lambda s: (
                            s.degraded is not None and s.drops.get("diagnostics", {}).get("disk_full") == 5
                        ),
                    )
                    counters, headline = ao.counters(), ao.report().headline()
                    filler.unlink()
                    await wait_until(lambda: ao.health() is None, 15, "space to be taken back")
                    back = await status_becomes(broker, pki, lambda s: s.degraded is None)
                finally:
                    await run.stop()
                diag = {k: v for k, v in counters.items() if k.startswith("drop_")}
                return first, full, back, f"{headline} {diag}"

        first, full, back, seen = asyncio.run(main())

    # Before the disk filled: the recovery and the budget drop, by lane and reason; the newest loss.
    assert (first.run, first.degraded) == (7, None)
    assert first.drops == {"features": {"corrupt": 25, "budget": 70}}
    assert first.dropped == {"features": 95}
    assert first.loss is not None
    assert (first.loss.lane, first.loss.reason, first.loss.n) == ("features", "budget", 70)
    assert abs(first.loss.t - (time.time() - ORIGIN)) < 120  # in the records' clock, not wall time
    # Full: degraded with its reason, the refused diagnostics counted; the same figures as the
    # diagnostics and the STATUS= line of that moment.
    assert full.degraded == "disk_full"
    assert full.drops["diagnostics"]["disk_full"] == 5
    assert full.drops["features"]["disk_full"] >= 5
    for lane, reasons in full.drops.items():
        for reason, n in reasons.items():
            assert f"'drop_{lane}_{reason}': {n}" in seen
    assert f"dropped {sum(full.dropped.values())}" in seen
    # Space back: no longer degraded, the counters kept.
    assert back.drops["diagnostics"]["disk_full"] == 5
    assert back.run == 7
