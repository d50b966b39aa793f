"""Liveness end to end: ``edgetwin run`` with a source that hangs on purpose, under a test-owned watchdog."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import pytest
from test_e2e import (
    BED_MAC,
    PATIENT_ID,
    PUMP_ID,
    PUMP_SERIAL,
    SOURCE_NAMES,
    NotifySocket,
    _config,
    _forms,
    _records,
    _start,
    _stop,
    notify,
)

pytestmark = pytest.mark.slow

__all__ = ["notify"]  # the fixture, shared with the end-to-end tests


def test_a_hanging_source_is_restarted_while_the_watchdog_pings_go_on(
    tmp_path: Path, notify: NotifySocket
) -> None:
    proc = _start(
        _config(tmp_path, stall="hang = { at_s = 1.0, duration_s = 600.0 }"), notify, watchdog_usec=1_000_000
    )
    try:
        notify.wait_for("READY=1", 20)
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
    # The period is a quarter of the 1 s watchdog; the hung source never held the pings back.
    assert max(gaps) < 0.75, max(gaps)
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
    proc = _start(config, notify, watchdog_usec=0)
    try:
        notify.wait_for("READY=1", 20)
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
    assert BED_MAC in stderr
