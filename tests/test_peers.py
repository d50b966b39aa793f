"""The test peers' helpers: a process that logs a lot never blocks on its own output; free ports
are each test worker's own; tests marked one_at_a_time never overlap."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import peers
import pytest
from peers import LoggedProcess, free_port

# 400 KB on stderr (a pipe holds 64 KiB), then a line on stdout, then it waits to be stopped.
CHATTY = (
    "import sys, time\n"
    "for i in range(4000): sys.stderr.write(f'{i:05d} ' + 'x' * 94 + '\\n')\n"
    "print('done', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_process_writing_more_than_a_pipe_holds_goes_on_and_its_log_is_kept(tmp_path: Path) -> None:
    proc = LoggedProcess([sys.executable, "-c", CHATTY], log=tmp_path / "chatty.log")
    try:
        deadline = time.monotonic() + 60  # an interpreter's start-up on a loaded machine
        while "done" not in proc.out():  # with stderr=PIPE and nobody reading, it never gets here
            assert proc.poll() is None, proc.err()
            assert time.monotonic() < deadline, f"blocked after {len(proc.err())} bytes of stderr"
            time.sleep(0.05)
    finally:
        err = proc.stop(timeout=10)
    lines = err.splitlines()
    assert len(lines) == 4000
    assert lines[-1].startswith("03999 ")
    assert proc.returncode is not None


def test_communicate_waits_and_a_second_start_keeps_the_first_log(tmp_path: Path) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    first = LoggedProcess([sys.executable, "-c", code], log=tmp_path / "gw.log")
    assert first.communicate(timeout=60) == ("out\n", "err\n")
    assert first.returncode == 3
    second = LoggedProcess(
        [sys.executable, "-c", "import sys; sys.stderr.write('again')"], log=tmp_path / "gw.log"
    )
    assert second.communicate(timeout=60)[1] == "again"
    assert second.err_path != first.err_path
    assert first.err() == "err\n"


def test_free_ports_are_the_workers_own_below_the_ephemeral_range_and_skip_a_taken_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low < 32000:
        pytest.skip(f"the ephemeral ports start at {low}: free_port falls back to the kernel's pick")
    monkeypatch.setattr(peers, "_port_cursor", {})
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    first, second = free_port(), free_port()
    assert 23000 <= first < 24000, first
    assert 23000 <= second < 24000, second
    assert first != second
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw4")
    assert 24000 <= free_port() < 25000
    # A port another program listens on is passed over, not handed out.
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    with socket.socket() as held:
        held.bind(("127.0.0.1", second))
        held.listen()
        monkeypatch.setattr(peers, "_port_cursor", {"next": second - 23000})
        assert free_port() not in (second, first)


_MARKED = """
import os, time
import pytest

@pytest.mark.one_at_a_time
def test_{name}() -> None:
    with open(os.environ["RUNS"], "a") as runs:
        runs.write(f"{{os.environ.get('PYTEST_XDIST_WORKER')}} start {{time.monotonic()}}\\n")
    time.sleep(1.0)
    with open(os.environ["RUNS"], "a") as runs:
        runs.write(f"{{os.environ.get('PYTEST_XDIST_WORKER')}} end {{time.monotonic()}}\\n")
"""


def test_one_at_a_time_tests_in_two_workers_do_not_overlap(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    one_at_a_time: one at a time\n")
    for name in ("first", "second"):
        (suite / f"test_{name}.py").write_text(_MARKED.format(name=name))
    runs = tmp_path / "runs.txt"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "worksteal"],
        cwd=suite,
        env={**os.environ, "RUNS": str(runs)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line.split() for line in runs.read_text().splitlines()]
    assert len({worker for worker, _, _ in lines}) == 2, lines  # each test in a worker of its own
    # Started, ended, started, ended: the second began after the first ended.
    assert [event for _, event, _ in lines] == ["start", "end", "start", "end"], lines
    assert float(lines[2][2]) >= float(lines[1][2])
