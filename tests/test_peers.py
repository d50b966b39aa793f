"""The test peers' process helper: a process that logs a lot never blocks on its own output."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from peers import LoggedProcess

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
