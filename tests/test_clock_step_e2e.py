"""``edgetwin run`` whose wall clock steps while it runs, under libfaketime (this process only).

A Pi without a real-time clock boots two days behind; NTP steps it forward mid-run, later a few
seconds back.  libfaketime reads the offset from a file the test rewrites (``FAKETIME_NO_CACHE``)
and leaves the monotonic clock alone, as NTP does.  The simulator stamps its samples' wall time
from its start projected on the monotonic clock, as drivers that keep a wall offset do, so its
stamps stay on the old side of the step: record time must come from the monotonic instant.  The
alarms' ages ``edgetwin status`` shows are counted on the monotonic clock too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from peers import LoggedProcess
from test_e2e import _config as e2e_config
from test_e2e import _records as e2e_records

ROOT = Path(__file__).resolve().parent.parent
# Debian's libfaketime, under the machine's multiarch folder (x86_64, aarch64, ...).
FAKETIME = next(
    iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))),
    Path("/usr/lib/faketime/libfaketime.so.1"),
)
DAYS_BEHIND_S = 2 * 86400.0

pytestmark = pytest.mark.skipif(
    not FAKETIME.exists(),
    reason=f"libfaketime not found at {FAKETIME} (apt install libfaketime; .ci/setup test installs it)",
)


def _records(path: Path) -> list[dict[str, Any]]:
    return [r["record"] for r in e2e_records(path)]


def _wait(
    out: Path, proc: LoggedProcess, done: Any, what: str, timeout: float = 20.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = _records(out)
        if done(recs):
            return recs
        assert proc.poll() is None, proc.err()
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s: {[r['type'] for r in _records(out)]}\n{proc.err()}")


def _features(recs: list[dict[str, Any]]) -> list[float]:
    """The patient's windows' times (the pump's are interleaved with them)."""
    return [float(r["t"]) for r in recs if r["type"] == "features" and r["kind"] == "medical"]


def _steps(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r["type"] == "diag" and r["diag"] == "clock_step"]


def _alarm_ages(config: Path, env: dict[str, str]) -> list[float]:
    """``since_s`` of each alarm on, from ``edgetwin status --json`` (its own clock as the gateway's)."""
    got = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "status", "--config", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # Its exit status says how healthy the gateway is (a probe off is not healthy): not checked here.
    return [float(a["since_s"]) for a in json.loads(got.stdout)["alarms"]]


def test_records_follow_a_wall_clock_stepped_forward_and_never_run_back(tmp_path: Path) -> None:
    offset = tmp_path / "faketime"
    offset.write_text("-2d\n")
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        LD_PRELOAD=str(FAKETIME),
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    out = tmp_path / "out.jsonl"
    # The probe off for the whole run: its alarms are on when the status is asked.
    off = '{ kind = "sensor_off", at_s = 1.0, duration_s = 300.0 }'
    config = e2e_config(
        tmp_path, sensor_off=off, sections=f'[status]\nsocket = "{tmp_path / "control.sock"}"\n'
    )
    started = time.monotonic()
    proc = LoggedProcess(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        log=tmp_path / "gateway.log",
        env=env,
    )
    try:
        _wait(out, proc, lambda r: len(_features(r)) >= 3, "three windows", timeout=40.0)
        offset.write_text("+0\n")  # NTP steps it forward
        _wait(out, proc, lambda r: len(_steps(r)) == 1, "clock_step for the forward step")
        n = len(_features(_records(out)))
        _wait(out, proc, lambda r: len(_features(r)) >= n + 3, "windows after the forward step")
        # The probe came off a second after the start: the alarms say so, not two days.
        ages = _alarm_ages(config, env)
        assert ages
        assert all(0.0 < age < time.monotonic() - started for age in ages), ages
        offset.write_text("-5\n")  # and a few seconds back
        _wait(out, proc, lambda r: len(_steps(r)) == 2, "clock_step for the step back")
        n = len(_features(_records(out)))
        _wait(out, proc, lambda r: len(_features(r)) >= n + 3, "windows after the step back")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15.0) == 0, proc.err()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    recs = _records(out)
    fwd, back = _steps(recs)
    assert fwd["detail"]["applied_s"] == pytest.approx(DAYS_BEHIND_S, abs=1.0)
    assert back["detail"] == {"step_s": pytest.approx(-5.0, abs=0.5), "applied_s": 0.0}
    t = _features(recs)
    assert t == sorted(t)  # never back, across both steps
    # The windows after the forward step carry the time it moved record time to, as its report says.
    assert all(x > fwd["t"] for x in t[-6:])
    assert t[-1] - t[0] > DAYS_BEHIND_S
