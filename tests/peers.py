"""Test peers shared by the driver tests: a SampleSink that records what a driver hands over, a
driver running as a task, a free port, a socat pseudo-terminal pair, a process whose output goes
to files, and the mark of tests that must not run beside each other."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from gateway.contracts import Alarm, AlarmKind, Diagnostic, Driver, SampleSink
from gateway.sample import Sample, SampleBlock

# Tests that must not run beside each other (bounds of real time on the event loop or a stop,
# chromium, namespaces and mounts) hold one lock across the pytest-xdist workers (tests/conftest.py).
ONE_AT_A_TIME = pytest.mark.one_at_a_time


class RecordingSink:
    """A SampleSink that keeps everything it is handed; blocks with the monotonic time they arrived.

    ``samples=False`` or ``blocks=False`` makes handing over that kind a test failure, for drivers
    that must deliver only the other.
    """

    def __init__(self, *, samples: bool = True, blocks: bool = True) -> None:
        self._takes_samples = samples
        self._takes_blocks = blocks
        self.samples: list[Sample] = []
        self.blocks: list[tuple[float, SampleBlock]] = []
        self.alarms: list[Alarm] = []
        self.diagnostics: list[Diagnostic] = []

    def put(self, sample: Sample) -> None:
        if not self._takes_samples:
            raise AssertionError("the driver under test hands over blocks only")
        self.samples.append(sample)

    def put_block(self, block: SampleBlock) -> None:
        if not self._takes_blocks:
            raise AssertionError("the driver under test hands over single samples")
        self.blocks.append((time.monotonic(), block))

    def alarm(self, alarm: Alarm) -> None:
        self.alarms.append(alarm)

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        self.diagnostics.append(diagnostic)

    def of(self, device: str, metric: str) -> list[Sample]:
        """The samples of one device's metric."""
        return [s for s in self.samples if s.stream.device == device and s.stream.metric.name == metric]

    def values(self, metric: str) -> list[float]:
        """The values of the samples of one metric."""
        return [s.value for s in self.samples if s.stream.metric.name == metric]

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Times and values of the blocks of one metric, concatenated."""
        bs = [b for _, b in self.blocks if b.stream.metric.name == metric]
        return np.concatenate([b.t_mono for b in bs]), np.concatenate([b.value for b in bs])

    def alarms_of(self, kind: AlarmKind) -> list[Alarm]:
        """The alarms of one kind."""
        return [a for a in self.alarms if a.kind == kind]


def cli_start_s() -> float:
    """Seconds the ``edgetwin`` command line takes to start and exit on this machine, now.

    A same-run baseline for "at once": on a loaded machine interpreter start-up alone takes
    many seconds, so an absolute bound tells load apart from a slow path badly.
    """
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "gateway.cli", "version"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=120,
    )
    return time.monotonic() - t0


def stop_process(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """SIGTERM a process we started (an orderly stop), killed only when it overruns ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class LoggedProcess(subprocess.Popen[str]):
    """A process we started whose stderr (and stdout, unless given) goes to files, never to a pipe.

    A pipe nobody reads until the end holds 64 KiB: a chatty process (a gateway logging under
    load) then blocks in its next write, and the test hangs or times out.  A file never fills.
    ``communicate()`` waits as Popen's does and returns what the files hold; ``err()`` and ``out()``
    read them so far without waiting, for the failure message of a process still running.
    """

    def __init__(
        self, args: Sequence[str], *, log: Path, stdout: int | IO[Any] | None = None, **kwargs: Any
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while log.exists():  # a process started again keeps its own file, the first one's stays
            n += 1
            log = log.with_name(f"{log.stem.split('~')[0]}~{n}{log.suffix}")
        self.err_path = log
        self.out_path = log.with_name(log.name + ".out")
        # Opened here and closed once the child holds them: the child writes, we read the files.
        with self.out_path.open("w") as out, log.open("w") as err:
            super().__init__(args, stdout=out if stdout is None else stdout, stderr=err, text=True, **kwargs)

    def err(self) -> str:
        """What the process wrote to stderr so far."""
        return self.err_path.read_text(errors="replace")

    def out(self) -> str:
        """What the process wrote to stdout so far (empty when stdout went elsewhere)."""
        return self.out_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM it (killed when it overruns ``timeout``), reap it; what it wrote to stderr."""
        stop_process(self, timeout)
        return self.err()

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:  # noqa: A002
        """Wait for the process (``TimeoutExpired`` after ``timeout``); its stdout and stderr."""
        if input is not None:
            raise TypeError("LoggedProcess.communicate: no input: write to stdin=PIPE instead")
        self.wait(timeout)
        return self.out(), self.err()


# Under pytest-xdist several test processes pick ports at once, and a port picked, closed and
# handed to a peer that binds it a second later can meanwhile be picked by another worker or taken
# by any outgoing connection's local port, as long as it is one of the kernel's ephemeral ports.
# So each worker picks from its own range below the ephemeral range, in turn, checked free by a
# bind: no other worker and no connection's local port can take it between pick and use.
_PORT_BASE = 20000
_PORTS_PER_WORKER = 1000
_MAX_WORKERS = 12
_port_cursor: dict[str, int] = {}


def _worker_ports() -> range | None:
    """This test process's own port range, or None when the ephemeral range leaves no room."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw") or 0) % _MAX_WORKERS
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if ephemeral_low < _PORT_BASE + _MAX_WORKERS * _PORTS_PER_WORKER:
        return None
    start = _PORT_BASE + index * _PORTS_PER_WORKER
    return range(start, start + _PORTS_PER_WORKER)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback TCP port nothing listens on now, from this test worker's own range.

    Falls back to the kernel's pick where the ephemeral range leaves no room for the ranges.
    """
    ports = _worker_ports()
    if ports is not None:
        # Started at a place of its own per process, so two suites on one machine seldom meet.
        cursor = _port_cursor.setdefault("next", os.getpid() % len(ports))
        for step in range(len(ports)):
            port = ports[(cursor + step) % len(ports)]
            if _bindable(port):
                _port_cursor["next"] = (cursor + step + 1) % len(ports)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        picked: int = s.getsockname()[1]
        return picked


@contextlib.contextmanager
def logged(logger: str, text: str) -> Iterator[threading.Event]:
    """An event set once ``logger`` logs a message containing ``text`` (INFO and up) in this process.

    For a scenario timed from what the gateway did (a port opened), not from when the test began.
    """
    seen = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()

    log, handler = logging.getLogger(logger), Watch()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def socat_ptys(a: Path, b: Path) -> Iterator[None]:
    """A socat pty pair linked at ``a`` and ``b`` (both there on entry), stopped on exit."""
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5.0
        while not (a.exists() and b.exists()):
            assert proc.poll() is None, "socat exited"
            assert time.monotonic() < deadline, "socat made no ptys"
            time.sleep(0.01)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=5)


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, object], name: str) -> AsyncIterator[asyncio.Task[object]]:
    """``coro`` as a task named ``name`` while the block runs; cancelled and awaited at its end."""
    task: asyncio.Task[object] = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running_driver(driver: Driver, sink: SampleSink, start_s: float = 10.0) -> AsyncIterator[None]:
    """``driver.run`` as a task: entered once it called ``started()``, cancelled on exit."""
    started = asyncio.Event()
    async with background(driver.run(sink, started=started.set), "driver-under-test"):
        await asyncio.wait_for(started.wait(), start_s)
        yield
