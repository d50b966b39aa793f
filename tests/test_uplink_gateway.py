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
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import LoggedProcess

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
    from gateway.timebase import TimeBase  # noqa: PLC0415
    from gateway.uplink.config import MqttSection  # noqa: PLC0415
    from gateway.uplink.mqtt import MqttUplink  # noqa: PLC0415

    config = load(config_path, REGISTRY)
    mqtt = MqttSection.model_validate(json.loads(mqtt_path.read_text()))
    core = config.core
    key = load_or_create_key(core.site_key_path)
    identities = [core.gateway.name] + [x for e in config.sources for x in (e.info.name, e.info.subject)]
    timebase = TimeBase.open(core.gateway.state_dir)
    anonymizer = Anonymizer(
        Pseudonymizer(key), time_mode="relative", local_identities=identities, timebase=timebase
    )
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

        try:
            return await sup.run(drain, core.runtime.drain_deadline_s)
        finally:
            timebase.close()


def main() -> int:
    """Entry point when run as a script."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--mqtt", type=Path, required=True)
    parser.add_argument(
        "--wall-offset-s", type=float, default=0.0, help="an injected wall clock this far off"
    )
    args = parser.parse_args()
    if args.wall_offset_s:
        real_time = time.time
        time.time = lambda: real_time() + args.wall_offset_s
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_gateway(args.config, args.mqtt))


# --- the tests ---------------------------------------------------------------------------------------

if __name__ != "__main__":
    import cbor2
    from uplink_support import listener, require_mosquitto

    from gateway.anonymize import identity_forms
    from gateway.records import AlarmRecord, FeaturesWindow, StatusRecord
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


def _start(config: Path, mqtt: Path, wall_offset_s: float = 0.0) -> LoggedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    return LoggedProcess(
        [
            sys.executable,
            str(Path(__file__)),
            *("--config", str(config), "--mqtt", str(mqtt), "--wall-offset-s", str(wall_offset_s)),
        ],
        log=config.parent / "gateway.log",
        cwd=ROOT,
        env=env,
    )


def _finish(proc: LoggedProcess) -> tuple[str, str]:
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
        deadline = time.monotonic() + 90  # start-up included: long on a loaded machine
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
        ok = twin.wait_for(lambda t: accepted <= {m.seq for m in t.records() if m.epoch == epoch}, 90)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        _, err = _finish(proc)
        twin.stop()
    assert ok, f"missing after restart: {sorted(accepted - {m.seq for m in twin.records()})[:10]}\n{err}"
    assert code == 0, err
    replayed = [m for m in twin.records() if m.seq in accepted]
    assert all(m.historical for m in replayed)  # what waited in the outbox arrives marked as replayed
    (state,) = twin.checker.gateways.values()
    assert state.gaps == []


def _newest(twin: Any) -> dict[str, tuple[int, float]]:
    """(run, t) of the newest window the twin's view shows, per subject."""
    with twin._lock:
        return {
            s.subject: (s.run, s.t)
            for gw in twin.view.gateways.values()
            for s in gw.subjects.values()
            if s.t is not None
        }


def test_a_restarted_gateway_with_its_wall_clock_an_hour_back_is_shown_at_once(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    broker.start()
    twin = listener(broker, pki)
    config, mqtt = _write_config(tmp_path, broker, pki)
    proc = _start(config, mqtt)
    try:
        assert twin.wait_for(lambda t: len(_newest(t)) == 2, 90), "run 1's windows"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _finish(proc)
        before = _newest(twin)
        assert {run for run, _ in before.values()} == {1}
        # Restarted with the wall clock an hour behind (no NTP yet after a reboot).
        n_run1 = len(twin.records())
        proc = _start(config, mqtt, wall_offset_s=-3600.0)
        # Timed from the new run's first record, not from the start of a process whose start-up
        # a loaded machine stretches.
        assert twin.wait_for(lambda t: len(t.records()) > n_run1, 90), "no record of run 2"
        t0 = time.monotonic()
        shown = twin.wait_for(lambda t: {run for run, _ in _newest(t).values()} == {2}, 30)
        waited = time.monotonic() - t0
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        _, err = _finish(proc)
        twin.stop()
    assert shown, f"the twin kept showing run 1: {_newest(twin)}\n{err}"
    assert code == 0, err
    after = _newest(twin)
    for subject, (_, t) in after.items():
        assert t > before[subject][1]  # time went on, not an hour back
    # Within a window (1 s) or two of the new run's first records; an hour back it never was.
    assert waited < 10.0, waited
    (state,) = twin.checker.gateways.values()
    assert (state.restarts, state.missing, state.duplicates) == (1, 0, 0), state.summary()
    (gw,) = twin.view.gateways.values()
    assert all(s.stale == 0 for s in gw.subjects.values())  # no fresh window was taken as old


def test_the_will_of_a_killed_gateway_names_its_epoch(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    broker.start()
    twin = listener(broker, pki)
    config, mqtt = _write_config(tmp_path, broker, pki)
    proc = _start(config, mqtt)
    try:
        assert twin.wait_for(lambda t: len(t.records()) >= 3, 90)
        proc.send_signal(signal.SIGKILL)  # no orderly offline: the broker publishes the Will
        proc.wait(timeout=5)

        def offline(t: Any) -> bool:
            gw = next(iter(t.view.gateways.values()))
            return gw.status is not None and gw.status.state == "offline"

        assert twin.wait_for(offline, 10)
    finally:
        _finish(proc)
        twin.stop()
    (gw,) = twin.view.gateways.values()
    assert gw.status is not None
    assert gw.status.clean is False
    assert gw.status.ep == twin.records()[0].epoch != 0  # the epoch of its records, not 0


def _sniffer(broker: MosquittoBroker, pki: DemoPKI) -> tuple[Any, list[bytes], threading.Lock]:
    """A raw subscriber to every topic: keeps each message's topic, payload and user properties."""
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

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
    return sniffer, seen, lock


def _phase(config: Path, mqtt: Path, twin: Any, seen: list[bytes], lock: threading.Lock) -> tuple[str, bytes]:
    """Run the gateway until the twin has 8 windows of it; its client id and what the sniffer saw."""
    with lock:
        start = len(seen)
    twin_start = len(twin.records())
    proc = _start(config, mqtt)
    try:
        ok = twin.wait_for(lambda t: len(t.records()) - twin_start >= 8, 90)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        out, err = _finish(proc)
    assert ok, err
    assert code == 0, err
    with lock:
        blob = b"\n".join(seen[start:])
    return out.split("client-id ", 1)[1].split()[0], blob


def test_after_rotate_key_nothing_links_the_old_and_the_new_gateway(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    from drivers import REGISTRY  # noqa: PLC0415
    from gateway.config import load  # noqa: PLC0415
    from gateway.rotation import rotate_identity  # noqa: PLC0415

    broker.start()
    sniffer, seen, lock = _sniffer(broker, pki)
    twin = listener(broker, pki)
    config, mqtt = _write_config(tmp_path, broker, pki)
    try:
        old_id, _ = _phase(config, mqtt, twin, seen, lock)
        old = list(twin.messages)
        done = rotate_identity(load(config, REGISTRY).core)
        rotated = time.monotonic()
        new_id, new_blob = _phase(config, mqtt, twin, seen, lock)
        since_rotation = time.monotonic() - rotated
        new = twin.messages[len(old) :]
    finally:
        twin.stop()
        sniffer.disconnect()
        sniffer.loop_stop()
    assert new_id == done.gateway_pseudonym != old_id  # the client id is the new pseudonym

    def facts(msgs: list[Any]) -> dict[str, set[Any]]:
        out: dict[str, set[Any]] = {k: set() for k in ("gw", "subject", "dev", "epoch", "seq", "run", "t")}
        for m in msgs:
            out["gw"].add(m.gateway)
            rec = m.record
            if isinstance(rec, StatusRecord):
                out["epoch"].add(rec.ep)
                continue
            out["subject"].add(rec.subject)
            out["epoch"].add(m.epoch)
            out["seq"].add(m.seq)
            out["run"].add(rec.run)
            out["t"].add(rec.t)
            devs = [s.dev for s in rec.streams] if isinstance(rec, FeaturesWindow) else []
            out["dev"] |= set(devs) | ({rec.dev} if isinstance(rec, AlarmRecord) and rec.dev else set())
        return out

    before, after = facts(old), facts(new)
    for key in ("gw", "subject", "dev", "epoch"):
        assert before[key], key
        assert after[key], key
        assert not before[key] & after[key], key
    # Sequence, run and time start again: nothing carries on from the old identity.
    assert min(after["seq"]) == 1
    assert before["run"] == after["run"] == {1}
    # Time counts from an origin set at the rotation, not on from the old identity's.
    assert max(after["t"]) <= since_rotation + 0.5
    # No pseudonym or epoch of the old identity appears anywhere in what the new one sent.
    for value in before["gw"] | before["subject"] | before["dev"]:
        assert value.encode() not in new_blob
    for epoch in before["epoch"]:
        assert str(epoch).encode() not in new_blob
        assert cbor2.dumps(epoch) not in new_blob
    assert done.outbox_retired is not None


def test_a_sniffer_on_every_topic_sees_no_identifier(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    broker.start()
    sniffer, seen, lock = _sniffer(broker, pki)
    config, mqtt = _write_config(tmp_path, broker, pki)
    proc = _start(config, mqtt)
    try:
        deadline = time.monotonic() + 90
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
