"""Liveness end to end: ``edgetwin run`` with a source that hangs on purpose, under a test-owned watchdog."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_e2e import (
    BED_MAC,
    PATIENT_ID,
    PUMP_ID,
    PUMP_SERIAL,
    ROOT,
    SOURCE_NAMES,
    NotifySocket,
    _config,
    _forms,
    _records,
    _start,
    _stop,
    notify,
)

from gateway import demo
from gateway.uplink.certs import demo_pki

pytestmark = pytest.mark.slow

__all__ = ["notify"]  # the fixture, shared with the end-to-end tests


def test_a_hanging_source_is_restarted_while_the_watchdog_pings_go_on(
    tmp_path: Path, notify: NotifySocket
) -> None:
    proc = _start(
        _config(tmp_path, stall="hang = { at_s = 1.0, duration_s = 600.0 }"), notify, watchdog_usec=1_000_000
    )
    try:
        notify.wait_for("READY=1", 60)
        deadline = time.monotonic() + 11
        while time.monotonic() < deadline:
            notify.poll(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        stderr = _stop(proc)
    pings = notify.pings()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) > 30
    # The period is a quarter of the 1 s watchdog; the hung source never held the pings back
    # (the source was stalled for 5 s; systemd would abort only after a 1 s gap).
    assert max(gaps) < 1.0, max(gaps)
    assert f"unit source:{SOURCE_NAMES[0]} stalled" in stderr
    assert f"unit source:{SOURCE_NAMES[0]} recovered" in stderr
    assert stderr.count(f"sim {SOURCE_NAMES[0]}: streaming") == 2  # restarted once, the process not
    heart = [
        bool(s.get("gap"))
        for r in _records(tmp_path / "out.jsonl")
        if r["record"]["type"] == "features"
        for s in r["record"]["streams"]
        if s["metric"] == "MDC_ECG_HEART_RATE"
    ]
    assert any(heart)  # the hang shows as gaps ...
    assert heart[-3:] == [False, False, False]  # ... and the restarted source delivers again


def _scan_run(tmp_path: Path, notify: NotifySocket, extra: str) -> str:
    config = _config(tmp_path)
    config.write_text(config.read_text().replace("[runtime]", f"[logging]\n{extra}\n\n[runtime]"))
    notify.received.clear()  # a READY from an earlier run must not count for this one
    proc = _start(config, notify, watchdog_usec=0)
    try:
        notify.wait_for("READY=1", 60)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            notify.poll(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        stderr = _stop(proc)
    return stderr


def test_logs_carry_no_identity_unless_enabled(tmp_path: Path, notify: NotifySocket) -> None:
    identifiers = [PATIENT_ID, BED_MAC, PUMP_SERIAL, PUMP_ID, "ward3-hub-17"]
    # Debug level: more lines than the default, every one of them scanned.
    stderr = _scan_run(tmp_path, notify, 'level = "debug"')
    lines = stderr.splitlines()
    assert len(lines) > 20
    assert "sensor fault" in stderr  # the lines that used to carry stream keys are there ...
    for identifier in identifiers:
        for form in _forms(identifier):
            assert form not in stderr, f"{identifier!r} logged as {form!r}"
    assert f"{SOURCE_NAMES[0]}/device~" in stderr  # ... naming devices by source and pseudonym
    # Enabled explicitly: raw identities, and a warning at start saying so.
    (tmp_path / "state" / "outbox.db").unlink()
    stderr = _scan_run(tmp_path, notify, "identities = true")
    assert "logging.identities is on" in stderr
    # The start log names the subjects it covers; a sensor fault, when one falls inside the short
    # run on a loaded machine, names the bed's address too.
    assert PATIENT_ID in stderr


class HangingBroker:
    """Accepts TCP connections and never answers: a broker (or a middlebox) that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test:hanging-broker", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self.sock.accept()
                self.accepted += 1
                self._held.append(conn)  # held open, never read or answered

    def __enter__(self) -> HangingBroker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self.sock.close()


@pytest.mark.campaign
def test_watchdog_pings_never_stop_while_the_broker_hangs(tmp_path: Path, notify: NotifySocket) -> None:
    """A broker that accepts TCP and hangs, with a 10 s connect timeout, for 5 minutes."""
    run_s = float(os.environ.get("EDGETWIN_CAMPAIGN_HANG_S", "300"))
    pki = demo_pki(tmp_path / "pki")
    with HangingBroker() as broker:
        config = _config(tmp_path)
        text = config.read_text().replace(
            f'[uplink]\nkind = "local"\npath = "{tmp_path / "out.jsonl"}"',
            f"""[uplink]
kind = "mqtt"

[uplink.mqtt]
host = "127.0.0.1"
port = {broker.port}
ca_file = "{pki.ca_file}"
cert_file = "{pki.gateway.cert}"
key_file = "{pki.gateway.key}"
connect_timeout_s = 10.0
reconnect_min_s = 1.0
reconnect_max_s = 10.0""",
        )
        assert 'kind = "mqtt"' in text
        config.write_text(text)
        proc = _start(config, notify, watchdog_usec=2_000_000)
        try:
            notify.wait_for("READY=1", 60)
            deadline = time.monotonic() + run_s
            while time.monotonic() < deadline:
                notify.poll(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            stderr = _stop(proc)
        accepted = broker.accepted
    pings = notify.pings()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(
        f"{len(pings)} pings over {run_s:g} s, longest gap {max(gaps):.2f} s, {accepted} connections accepted"
    )
    print("\n".join(line for line in stderr.splitlines() if "uplink" in line)[-3000:])
    assert accepted >= 2  # the uplink kept trying
    assert pings[-1] - pings[0] >= run_s - 5
    assert max(gaps) < 2.0  # WatchdogSec=2 s here: systemd would never have aborted the gateway


@pytest.mark.campaign
def test_a_demo_run_with_every_driver_logs_no_identity() -> None:
    """The demo starts every simulator this machine can run; its log at the default level is scanned."""
    from drivers.ble.testbed.harness import DEMO_ADDRESS  # noqa: PLC0415 - the optional BLE extra

    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "20"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "gateway ready" in log
    identifiers = [
        demo.PATIENT,
        "patient-MRN-0051177",  # the sim patient's subject in demo.BASE_CONFIG
        "A4:C1:38:5B:20:7E",  # its device
        DEMO_ADDRESS,  # the BLE strap
        "0000056661",  # the oximeter's serial number, reported by the device
        "SIM-MOTOR-7",  # the MCU node's id
        "demo-gateway",
    ]
    for identifier in identifiers:
        for form in _forms(identifier):
            assert form not in log, f"{identifier!r} logged as {form!r}"
    assert "device~" in log
