"""The whole gateway (sim sources -> pipeline -> outbox -> MQTT uplink) as a subprocess.

Run as a script, this file is that gateway: it composes the runtime's parts with the MQTT uplink
the way ``edgetwin run`` does once ``[uplink.mqtt]`` is wired in, reading the MQTT settings from a
JSON file beside the TOML config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PATIENT_ID = "MRN-0048213-SMITH"
BED_MAC = "A4:C1:38:5B:20:7E"
PUMP_SERIAL = "SN-PLC-20931"
PUMP_ID = "plant-A/pump-3"
GATEWAY_NAME = "ward3-hub-17"
SOURCE_NAMES = ("bed7-monitor", "pump3-plc")


# --- the gateway process ---------------------------------------------------------------------------


async def _gateway(config_path: Path, mqtt_path: Path) -> int:
    from drivers import REGISTRY  # noqa: PLC0415
    from gateway.anonymize import Anonymizer, Pseudonymizer, load_or_create_key  # noqa: PLC0415
    from gateway.config import load  # noqa: PLC0415
    from gateway.notify import Notifier  # noqa: PLC0415
    from gateway.outbox import AsyncOutbox, Outbox  # noqa: PLC0415
    from gateway.runtime import Pipeline, budgets_for  # noqa: PLC0415
    from gateway.supervisor import Group, Supervisor, Unit  # noqa: PLC0415
    from gateway.uplink.config import MqttSection  # noqa: PLC0415
    from gateway.uplink.mqtt import MqttUplink  # noqa: PLC0415

    config = load(config_path, REGISTRY)
    mqtt = MqttSection.model_validate(json.loads(mqtt_path.read_text()))
    core = config.core
    key = load_or_create_key(core.site_key_path)
    identities = [core.gateway.name] + [x for e in config.sources for x in (e.info.name, e.info.subject)]
    anonymizer = Anonymizer(Pseudonymizer(key), time_mode="relative", local_identities=identities)
    budgets = budgets_for(config)
    async with AsyncOutbox(lambda: Outbox(core.outbox_path, budgets=budgets)) as outbox:
        pipeline = Pipeline(config, anonymizer, outbox)
        uplink = MqttUplink(outbox, mqtt, anonymizer.gateway_pseudonym(core.gateway.name))
        sup = Supervisor(Notifier.from_env(), start_timeout_s=5.0)

        async def hold(started: Callable[[], None]) -> None:
            started()
            await asyncio.Event().wait()

        sup.add(Unit("outbox", Group.OUTBOX, hold, critical=True))
        sup.add(
            Unit("uplink", Group.UPLINK, uplink.run, heartbeat=lambda: uplink.last_beat, stale_after_s=30.0)
        )
        sup.add(Unit("pipeline", Group.PIPELINE, pipeline.run, critical=True))
        for entry in config.sources:
            driver = REGISTRY[entry.driver].factory(entry.info, entry.config)

            async def run_source(started: Callable[[], None], driver: Any = driver) -> None:
                await driver.run(pipeline.sink, started=started)

            sup.add(Unit(f"source:{entry.info.name}", Group.SOURCES, run_source))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.request_stop)
        print(f"client-id {uplink.client_id}", flush=True)

        async def drain(deadline: float) -> None:
            await pipeline.step()
            await outbox.flush()
            await uplink.drain(deadline)

        return await sup.run(drain, core.runtime.drain_deadline_s)


def main() -> int:
    """Entry point when run as a script."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--mqtt", type=Path, required=True)
    args = parser.parse_args()
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_gateway(args.config, args.mqtt))


# --- the tests ---------------------------------------------------------------------------------------

if __name__ != "__main__":
    from uplink_support import listener, require_mosquitto

    from gateway.anonymize import identity_forms
    from gateway.uplink.broker import MosquittoBroker
    from gateway.uplink.certs import DemoPKI, demo_pki

    pytestmark = pytest.mark.slow


def _write_config(tmp: Path, broker: Any, pki: Any) -> tuple[Path, Path]:
    config = tmp / "edgetwin.toml"
    config.write_text(
        f"""
[gateway]
name = "{GATEWAY_NAME}"
state_dir = "{tmp / "state"}"

[pipeline]
window_s = 1.0
hop_s = 0.5
grace_s = 0.1
sensor_lost_s = 2.0

[uplink]
kind = "none"

[runtime]
drain_deadline_s = 3.0
start_timeout_s = 5.0

[[sources]]
name = "{SOURCE_NAMES[0]}"
driver = "sim"
subject = "{PATIENT_ID}"
profile = "patient"
device = "{BED_MAC}"
rate_hz = 10.0
events = [{{ kind = "sensor_off", at_s = 1.0, duration_s = 1.0 }}]

[[sources]]
name = "{SOURCE_NAMES[1]}"
driver = "sim"
subject = "{PUMP_ID}"
kind = "industrial"
profile = "pump"
device = "{PUMP_SERIAL}"
rate_hz = 10.0
"""
    )
    mqtt = tmp / "mqtt.json"
    mqtt.write_text(
        json.dumps(
            {
                "host": broker.host,
                "port": broker.port,
                "ca_file": str(pki.ca_file),
                "cert_file": str(pki.gateway.cert),
                "key_file": str(pki.gateway.key),
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 0.5,
                "connect_timeout_s": 3.0,
            }
        )
    )
    return config, mqtt


def _start(config: Path, mqtt: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), "--config", str(config), "--mqtt", str(mqtt)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=10)


def _queued(db: Path) -> tuple[set[int], int]:
    """The ids committed in an outbox database, and its epoch (read by a second connection)."""
    if not db.exists():
        return set(), 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        ids = {row[0] for row in conn.execute("SELECT id FROM records")}
        row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return ids, int(row[0]) if row else 0
    except sqlite3.OperationalError:
        return set(), 0
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    require_mosquitto()
    return demo_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", pki)
    yield b
    b.stop()


def test_sigkill_while_the_broker_is_down_loses_nothing_accepted(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    config, mqtt = _write_config(tmp_path, broker, pki)
    db = tmp_path / "state" / "outbox.db"
    proc = _start(config, mqtt)  # the broker is down: everything stays in the outbox
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(_queued(db)[0]) < 40:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
    finally:
        _, first_err = _finish(proc)
    accepted, epoch = _queued(db)
    assert len(accepted) >= 40, first_err
    # The uplink said so once, as a state change, not once per attempt.
    assert first_err.count("connection refused: the broker is not listening") == 1, first_err

    broker.start()
    twin = listener(broker, pki)
    proc = _start(config, mqtt)
    try:
        ok = twin.wait_for(lambda t: accepted <= {m.seq for m in t.records() if m.epoch == epoch}, 20)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    finally:
        _, err = _finish(proc)
        twin.stop()
    assert ok, f"missing after restart: {sorted(accepted - {m.seq for m in twin.records()})[:10]}\n{err}"
    assert code == 0, err
    replayed = [m for m in twin.records() if m.seq in accepted]
    assert all(m.historical for m in replayed)  # what waited in the outbox arrives marked as replayed
    (state,) = twin.checker.gateways.values()
    assert state.gaps == []


def test_a_sniffer_on_every_topic_sees_no_identifier(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    broker.start()
    seen: list[bytes] = []
    lock = threading.Lock()

    def keep(c: Any, u: Any, m: Any) -> None:
        props = getattr(m, "properties", None)
        user = repr(getattr(props, "UserProperty", "")).encode()
        with lock:
            seen.extend([m.topic.encode(), m.payload, user])

    sniffer = paho.Client(CallbackAPIVersion.VERSION2, client_id="sniffer", protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki.twin.cert, pki.twin.key)
    sniffer.tls_set_context(ctx)
    subscribed = threading.Event()
    sniffer.on_subscribe = lambda *a: subscribed.set()
    sniffer.on_message = keep
    sniffer.connect(broker.host, broker.port)
    sniffer.subscribe("#", qos=1)
    sniffer.loop_start()
    assert subscribed.wait(5)
    config, mqtt = _write_config(tmp_path, broker, pki)
    proc = _start(config, mqtt)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                text = b"\n".join(seen)
            if text.count(b"features/") >= 8 and b"alarms/" in text:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        out, err = _finish(proc)
        sniffer.disconnect()
        sniffer.loop_stop()
    with lock:
        blob = b"\n".join(seen)
    assert blob.count(b"features/") >= 8
    assert b"alarms/" in blob, err
    client_id = out.split("client-id ", 1)[1].split()[0]
    log = broker.log_tail(200).encode()
    assert f"as {client_id}".encode() in log  # the gateway's client id as the broker saw it
    for identity in (PATIENT_ID, BED_MAC, PUMP_SERIAL, PUMP_ID, GATEWAY_NAME, *SOURCE_NAMES):
        for form in identity_forms(identity):
            assert form not in blob, f"{identity!r} leaked as {form!r}"
            assert form not in client_id.encode()


if __name__ == "__main__":
    sys.exit(main())
