"""One gateway per state directory: a second ``edgetwin run`` leaves at once, naming the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import LoggedProcess, cli_start_s

from gateway.observe.lock import LOCK_NAME, StateDirBusyError, holder, state_dir_lock

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp: Path) -> Path:
    path = tmp / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
state_dir = "{tmp / "state"}"
[uplink]
kind = "none"
[[sources]]
name = "bed1"
driver = "sim"
subject = "bed-1"
profile = "patient"
device = "A4:C1:38:00:00:01"
"""
    )
    return path


def _run(config: Path) -> LoggedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    return LoggedProcess(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        log=config.parent / "gateway.log",
        env=env,
    )


@pytest.mark.slow
def test_second_run_exits_at_once_naming_the_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    first = _run(config)
    try:
        deadline = time.monotonic() + 30
        while holder(state) != first.pid:
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the first gateway never took the lock"
            time.sleep(0.1)
        baseline = cli_start_s()
        t0 = time.monotonic()
        second = _run(config)
        _, err = second.communicate(timeout=120)
        took = time.monotonic() - t0
        baseline = max(baseline, cli_start_s())  # load changes while the test runs
        assert second.returncode == 1
        assert f"the state directory is in use by PID {first.pid} (" in err
        assert "gateway.cli run --config" in err  # the running process's command line
        assert "give this one its own gateway.state_dir" in err
        # At once: no retry, no start of any unit (interpreter start-up only, as the baseline).
        assert took < 3 * baseline + 5, (took, baseline)
        assert first.poll() is None  # the first one was not disturbed
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0, first.err()
    assert holder(state) is None  # released at exit; the stale file does not block a restart
    assert (state / LOCK_NAME).exists()
    with state_dir_lock(state):
        assert holder(state) == os.getpid()


def test_lock_in_process_names_the_holder(tmp_path: Path) -> None:
    # flock locks belong to the open file description: a second open in one process conflicts too.
    with state_dir_lock(tmp_path), pytest.raises(StateDirBusyError) as info, state_dir_lock(tmp_path):
        pass
    assert info.value.pid == os.getpid()
    assert f"PID {os.getpid()}" in str(info.value)
    with state_dir_lock(tmp_path):  # released by the first block's exit
        pass


def test_unwritable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception, match="cannot create the lock file"), state_dir_lock(blocker / "state"):
        pass


@pytest.mark.slow
def test_rotate_key_is_refused_while_a_gateway_runs_and_changes_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rotate = [sys.executable, "-m", "gateway.cli", "rotate-key", "--config", str(config)]
    gateway = _run(config)
    try:
        deadline = time.monotonic() + 30
        while holder(state) != gateway.pid or not (state / "outbox.db").exists():
            assert gateway.poll() is None, gateway.communicate()[1]
            assert time.monotonic() < deadline, "the gateway never took the lock"
            time.sleep(0.1)
        key = (state / "site.key").read_bytes()
        refused = subprocess.run(rotate, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 75  # EX_TEMPFAIL: stop the gateway, then try again
        assert (
            f"edgetwin rotate-key {state}: refused, a gateway (PID {gateway.pid}) is running"
            in refused.stderr
        )
        assert "stop it first" in refused.stderr
        assert "nothing was changed" in refused.stderr
        assert (state / "site.key").read_bytes() == key
        assert (state / "outbox.db").exists()
        assert not list(state.glob("site.key.*"))  # no key retired
        assert gateway.poll() is None  # the running gateway was not disturbed
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.communicate(timeout=30)
    assert gateway.returncode == 0, gateway.err()
    done = subprocess.run(rotate, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (state / "site.key").read_bytes() != key
