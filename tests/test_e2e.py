"""End to end: ``edgetwin run`` as a subprocess under a test-owned NOTIFY_SOCKET."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import LoggedProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

PATIENT_ID = "MRN-0048213-SMITH"
BED_MAC = "A4:C1:38:5B:20:7E"
PUMP_SERIAL = "SN-PLC-20931"
PUMP_ID = "plant-A/pump-3"
SOURCE_NAMES = ("bed7-monitor", "pump3-plc")


SENSOR_OFF = '{ kind = "sensor_off", at_s = 1.0, duration_s = 1.5 }'


def _config(tmp: Path, *, stall: str = "", sensor_off: str = SENSOR_OFF, sections: str = "") -> Path:
    """Two simulated sources (a patient whose probe comes off as ``sensor_off`` says, a pump); ``sections`` added."""
    path = tmp / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
name = "ward3-hub-17"
state_dir = "{tmp / "state"}"

[pipeline]
window_s = 2.0
hop_s = 1.0
grace_s = 0.3
sensor_lost_s = 2.0

[uplink]
kind = "local"
path = "{tmp / "out.jsonl"}"

[runtime]
drain_deadline_s = 5.0
start_timeout_s = 10.0
{sections}
[[sources]]
name = "{SOURCE_NAMES[0]}"
driver = "sim"
subject = "{PATIENT_ID}"
profile = "patient"
device = "{BED_MAC}"
rate_hz = 5.0
events = [{sensor_off}]
{stall}

[[sources]]
name = "{SOURCE_NAMES[1]}"
driver = "sim"
subject = "{PUMP_ID}"
kind = "industrial"
profile = "pump"
device = "{PUMP_SERIAL}"
rate_hz = 5.0
"""
    )
    return path


class NotifySocket:
    """The service manager's side of sd_notify: a datagram socket the test owns."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.received: list[tuple[float, str]] = []

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, msg in self.received:
                if msg.startswith(prefix):
                    return msg
            self.poll(0.1)
        raise AssertionError(f"no {prefix!r} within {timeout} s; got {[m for _, m in self.received]}")

    def poll(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                self.received.append((time.monotonic(), data.decode()))
                self.sock.settimeout(0.0)
        except (TimeoutError, BlockingIOError):
            return

    def pings(self) -> list[float]:
        return [t for t, m in self.received if m == "WATCHDOG=1"]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.sock.close()


def _start(config: Path, notify: NotifySocket, watchdog_usec: int) -> LoggedProcess:
    env = dict(
        os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec), PYTHONPATH=str(ROOT)
    )
    env.pop("WATCHDOG_PID", None)
    return LoggedProcess(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        log=config.parent / "gateway.log",
        env=env,
    )


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stop(proc: LoggedProcess) -> str:
    """Kill the process if it still runs (a failed test), reap it; return stderr."""
    if proc.poll() is None:
        proc.kill()
    _, stderr = proc.communicate(timeout=10)
    return stderr


def test_ready_records_flow_sigterm_drains(tmp_path: Path, notify: NotifySocket) -> None:
    proc = _start(_config(tmp_path), notify, watchdog_usec=1_000_000)
    try:
        ready = notify.wait_for("READY=1", 60)
        assert "units running" in ready
        out = tmp_path / "out.jsonl"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            notify.poll(0.2)
            recs = _records(out)
            kinds = {(r["record"]["type"], r["record"].get("alarm")) for r in recs}
            if (
                ("features", None) in kinds
                and ("alarm", "sensor_fault") in kinds
                and len(notify.pings()) >= 3
            ):
                break
        else:
            pytest.fail(f"records did not flow: {[r['topic'] for r in _records(out)]}")
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=5.0 + 5.0)
        elapsed = time.monotonic() - t_term
        notify.poll(0.2)
    finally:
        stderr = _stop(proc)
    assert code == 0, stderr
    assert elapsed < 5.0 + 2.0
    assert any(m.startswith("STOPPING=1") for _, m in notify.received)
    assert "<6>" in stderr  # journald priority prefixes
    recs = _records(tmp_path / "out.jsonl")
    features = [r for r in recs if r["record"]["type"] == "features"]
    # Both subjects produce aligned windows with all their streams.
    subjects = {f["record"]["subject"] for f in features}
    assert len(subjects) == 2
    # The sensor fault is an alarm of its own, told apart from the patient's values.
    faults = [r for r in recs if r["record"].get("alarm") == "sensor_fault"]
    assert faults
    assert faults[0]["lane"] == "alarms"


def _forms(identifier: str) -> set[str]:
    """Every way the test can think of to write an identifier into text."""
    texts = {identifier, identifier.lower(), identifier.upper(), identifier.replace(":", "").replace("-", "")}
    out: set[str] = set()
    for t in texts:
        b = t.encode()
        out |= {t, b.hex(), b.hex().upper(), base64.b64encode(b).decode().rstrip("=")}
        out.add(base64.urlsafe_b64encode(b).decode().rstrip("="))
    return out


def test_no_identifier_leaves_the_gateway(tmp_path: Path, notify: NotifySocket) -> None:
    proc = _start(_config(tmp_path), notify, watchdog_usec=0)
    try:
        notify.wait_for("READY=1", 60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(_records(tmp_path / "out.jsonl")) < 20:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        _stop(proc)
    text = (tmp_path / "out.jsonl").read_text()
    assert len(text.splitlines()) >= 20
    identifiers = [PATIENT_ID, BED_MAC, PUMP_SERIAL, PUMP_ID, "ward3-hub-17", *SOURCE_NAMES]
    for identifier in identifiers:
        for form in _forms(identifier):
            assert form not in text, f"{identifier!r} leaked as {form!r}"
    # The same check on the raw bytes still queued or kept in the outbox database.
    db = (tmp_path / "state" / "outbox.db").read_bytes()
    for identifier in identifiers:
        assert identifier.encode() not in db


def test_watchdog_stops_while_the_loop_is_blocked(tmp_path: Path, notify: NotifySocket) -> None:
    stall = "stall_loop = { at_s = 3.0, duration_s = 4.0 }"
    proc = _start(_config(tmp_path, stall=stall), notify, watchdog_usec=1_000_000)
    try:
        notify.wait_for("READY=1", 60)
        deadline = time.monotonic() + 14
        while time.monotonic() < deadline:
            notify.poll(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        _stop(proc)
    pings = notify.pings()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) > 10
    # Normal period is a quarter of the 1 s watchdog; during the 4 s stall nothing is sent.
    assert max(gaps) >= 3.5
    assert sorted(gaps)[len(gaps) // 2] < 0.5
    # ... and the pings resume after the stall (the supervisor did not die).
    assert pings[-1] - pings[gaps.index(max(gaps))] > 1.0
