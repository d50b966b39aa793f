"""``edgetwin run`` whose wall clock steps while it runs, under libfaketime (this process only).

A Pi without a real-time clock boots two days behind; NTP steps it forward mid-run, later a few
seconds back.  libfaketime reads the offset from a file the test rewrites (``FAKETIME_NO_CACHE``)
and leaves the monotonic clock alone, as NTP does.  The simulator stamps its samples' wall time
from its start projected on the monotonic clock, as drivers that keep a wall offset do, so its
stamps stay on the old side of the step: record time must come from the monotonic instant.  The
alarms' ages ``edgetwin status`` shows are counted on the monotonic clock too, and across a restart
on the time base's life clock: a Pi that restarts two days behind shows the alarms it left on as
old as they are, the downtime counted once NTP sets its clock right.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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


def faked(offset: Path) -> dict[str, str]:
    """The environment of a process whose wall clock reads ``offset``'s offset, as it is at each reading."""
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        LD_PRELOAD=str(FAKETIME),
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )


def set_clock(offset: Path, clock: str) -> None:
    """Set the faked clock to ``clock``, replacing the file whole: a process reading it meanwhile never sees it empty."""
    tmp = offset.with_name(offset.name + ".new")
    tmp.write_text(f"{clock}\n")
    tmp.replace(offset)


@dataclass(frozen=True)
class Faked:
    """``edgetwin run`` on ``tmp_path`` under a faked wall clock: its offset file, environment, config."""

    offset: Path
    env: dict[str, str]
    config: Path
    out: Path

    @classmethod
    def at(cls, tmp_path: Path, clock: str, off_at_s: float) -> Faked:
        """The clock at offset ``clock``; the probe off ``off_at_s`` after the start, for longer than the test."""
        offset = tmp_path / "faketime"
        set_clock(offset, clock)
        off = f'{{ kind = "sensor_off", at_s = {off_at_s}, duration_s = 600.0 }}'
        config = e2e_config(
            tmp_path, sensor_off=off, sections=f'[status]\nsocket = "{tmp_path / "control.sock"}"\n'
        )
        return cls(offset, faked(offset), config, tmp_path / "out.jsonl")

    def start(self) -> LoggedProcess:
        """A gateway started on the config (each start logs to a file of its own)."""
        cmd = [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)]
        return LoggedProcess(cmd, log=self.config.with_name("gateway.log"), env=self.env)

    def set(self, clock: str) -> None:
        """Set the faked clock to ``clock`` (read by the process at its next reading)."""
        set_clock(self.offset, clock)


def _stop(proc: LoggedProcess) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15.0) == 0, proc.err()


def test_records_follow_a_wall_clock_stepped_forward_and_never_run_back(tmp_path: Path) -> None:
    g = Faked.at(tmp_path, "-2d", 1.0)
    out, config, env = g.out, g.config, g.env
    started = time.monotonic()
    proc = g.start()
    try:
        _wait(out, proc, lambda r: len(_features(r)) >= 3, "three windows", timeout=40.0)
        g.set("+0")  # NTP steps it forward
        _wait(out, proc, lambda r: len(_steps(r)) == 1, "clock_step for the forward step")
        n = len(_features(_records(out)))
        _wait(out, proc, lambda r: len(_features(r)) >= n + 3, "windows after the forward step")
        # The probe came off a second after the start: the alarms say so, not two days.
        ages = _alarm_ages(config, env)
        assert ages
        assert all(0.0 < age < time.monotonic() - started for age in ages), ages
        g.set("-5")  # and a few seconds back
        _wait(out, proc, lambda r: len(_steps(r)) == 2, "clock_step for the step back")
        n = len(_features(_records(out)))
        _wait(out, proc, lambda r: len(_features(r)) >= n + 3, "windows after the step back")
        _stop(proc)
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


def _ages_on(config: Path, env: dict[str, str], proc: LoggedProcess, timeout: float = 30.0) -> list[float]:
    """The alarms' ages once ``edgetwin status`` answers with some on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.err()
        with contextlib.suppress(ValueError, KeyError):  # not answering yet
            ages = _alarm_ages(config, env)
            if ages:
                return ages
        time.sleep(0.5)
    raise AssertionError(f"no alarms on within {timeout} s\n{proc.err()}")


def test_alarms_left_on_show_their_true_age_after_a_restart_two_days_behind(tmp_path: Path) -> None:
    # The probe off from the start, in both runs: its alarms are carried over the restart.
    g = Faked.at(tmp_path, "+0", 0.0)
    started = time.monotonic()
    proc = g.start()
    try:
        _ages_on(g.config, g.env, proc)
        seen = time.monotonic()  # the alarms were raised between the start and now
        time.sleep(6.0)
        _stop(proc)
        stopped = time.monotonic()
        time.sleep(8.0)  # down; then it boots with its clock two days behind
        g.set("-2d")
        proc = g.start()
        ages = _ages_on(g.config, g.env, proc)
        # The downtime is not known yet: the time held before the stop and since the start, never 0.
        since_start = time.monotonic() - stopped - 8.0
        assert all(stopped - seen - 1.0 < age < stopped - started + since_start + 1.0 for age in ages), ages
        g.set("+0")  # NTP sets it right
        _wait(g.out, proc, lambda r: len(_steps(r)) == 1, "clock_step for the forward step")
        ages = _ages_on(g.config, g.env, proc)
        # As old as they are: the downtime counted, not the clock's two days.
        assert all(time.monotonic() - seen - 1.0 < age < time.monotonic() - started + 1.0 for age in ages), (
            ages
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15.0) == 0, proc.err()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
