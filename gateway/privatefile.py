"""Files in the state directory: written whole (a crash leaves the old file or the new one), owner-only by default.

A file the running gateway rewrites (the alarm ledger, the estimators' state, the legend, the
Sparkplug node's state) goes through its :class:`FileWriter`, :func:`writer_of` its path: each
write is synced (file, then its folder: two fsyncs, 3 ms to 170 ms on a loaded machine) in a
worker thread, so the event loop and every alarm it carries never wait for the disk.  One writer
per file: its writes run one at a time in the order they were asked for, a newer state replaces
one not yet begun (the last state asked for is the one the file ends with), and a caller
cancelled meanwhile leaves its write to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = [
    "FileWriter",
    "Outcome",
    "WriteFailures",
    "all_written",
    "fsync_dir",
    "landed",
    "write_atomic",
    "writer_of",
]

# Shared by every file's writer; a file never has more than one of its writes in it at a time.
# Two threads: the syncs mostly wait on the disk, and a slow file must not hold up the others'.
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgetwin-write")
_WRITERS: weakref.WeakValueDictionary[Path, FileWriter] = weakref.WeakValueDictionary()
_WRITERS_LOCK = threading.Lock()

log = logging.getLogger(__name__)

#: Told a write's outcome: None when it is on disk, else what it raised.
Outcome = Callable[[Exception | None], None]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsynced, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (a rename into it) durable."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FileWriter:
    """The writes of one file, each by :func:`write_atomic` in a worker thread; see the module docstring."""

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self._lock = threading.Lock()
        self._next: bytes | None = None  # the newest state asked for and not yet begun
        self._waiting: list[tuple[Future[None], Outcome | None]] = []  # done when ``_next`` is written
        self._last: Future[None] | None = None  # of the newest state asked for
        self._running = False

    def submit(self, data: bytes, then: Outcome | None = None) -> Future[None]:
        """Ask for ``data`` to be the file's content (from any thread; never blocks): done when it, or a newer one, is written.

        ``then`` is told the outcome (None or the exception) in the writer's thread before the
        future is done, so that whoever waits for it finds it told.
        """
        done: Future[None] = Future()
        done.set_running_or_notify_cancel()  # not cancellable: a write once asked for is carried out
        with self._lock:
            self._next = data
            self._waiting.append((done, then))
            self._last = done
            start, self._running = not self._running, True
        if start:
            try:
                _POOL.submit(self._drain)
            except RuntimeError:  # the interpreter is exiting: no new thread, written here
                self._drain()
        return done

    def _drain(self) -> None:
        while True:
            with self._lock:
                data, waiting = self._next, self._waiting
                self._next, self._waiting = None, []
                if data is None:
                    self._running = False
                    return
            failed: Exception | None = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.path, data, self.mode)
            except Exception as exc:  # noqa: BLE001 - each caller's future carries it (mostly OSError)
                failed = exc
            for _, then in waiting:
                if then is not None:
                    try:
                        then(failed)
                    except Exception:
                        # A bug of the caller's: the writes of this file and those waiting go on.
                        log.exception("state file %s: telling a write's outcome failed", self.path)
            for done, _ in waiting:
                if failed is None:
                    done.set_result(None)
                else:
                    done.set_exception(failed)

    async def write(self, data: bytes) -> None:
        """Write ``data`` and wait until it (or a newer state) is on disk; raise what the write raised."""
        await landed(self.submit(data))

    async def written(self) -> None:
        """Wait until every write asked for so far is done (failed ones included: their callers were told)."""
        last = self._last
        if last is not None:
            with contextlib.suppress(Exception):  # told to whoever asked for that write
                await landed(last)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every write asked for so far is done, at most ``timeout`` s; whether they are."""
        last = self._last
        if last is None:
            return True
        try:
            last.exception(timeout)
        except TimeoutError:
            return False
        return True


class WriteFailures:
    """A state file's failed writes, told once (WARNING) until one succeeds again (INFO): the ``then`` of its writes."""

    def __init__(self, logger: logging.Logger, who: str, path: Path | None, loses: str) -> None:
        self._log, self._who, self._path, self._loses = logger, who, path, loses
        self.failing = False

    def __call__(self, failed: Exception | None) -> None:
        """Tell a write's outcome (``then`` of :meth:`FileWriter.submit`: in its writer's thread)."""
        if failed is None:
            if self.failing:
                self._log.info("%s %s: written again", self._who, self._path)
            self.failing = False
            return
        if not self.failing:
            why = failed.strerror if isinstance(failed, OSError) and failed.strerror else failed
            self._log.warning("%s %s: cannot write: %s: %s", self._who, self._path, why, self._loses)
        self.failing = True


def writer_of(path: Path, mode: int = 0o600) -> FileWriter:
    """The one :class:`FileWriter` of ``path`` in this process (made at the first call; ``mode`` is that call's)."""
    key = path.absolute()
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            writer = _WRITERS[key] = FileWriter(path, mode)
        return writer


async def landed(done: Future[None]) -> None:
    """Wait for a write a :class:`FileWriter` was asked for, never cancelling it (a rename half done); raise what it raised."""
    waited = asyncio.wrap_future(done)
    # A caller cancelled before the write ends leaves it unwatched: its error is its writer's to tell.
    waited.add_done_callback(lambda f: f.cancelled() or f.exception())
    await asyncio.wait({waited})
    waited.result()


async def all_written() -> None:
    """Wait until every file's writes asked for so far are done (at the stop)."""
    with _WRITERS_LOCK:
        writers = list(_WRITERS.values())
    for writer in writers:
        await writer.written()
