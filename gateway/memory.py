"""Give memory that start-up freed back to the system (glibc ``malloc_trim``).

Start-up allocates and frees far more than the running gateway keeps: imports, config and card
validation, TLS contexts, the first connections of every driver.  glibc keeps freed chunks in its
heaps for reuse, so they stay resident (and count against ``MemoryMax=``) although nothing uses
them; ``malloc_trim(0)`` returns the free pages of every heap with ``madvise``.  Elsewhere (musl,
macOS) there is nothing to call and :func:`trim` does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

__all__ = ["SETTLE_S", "resident_kb", "trim", "trim_after_ready"]

#: After READY, the sources' first connections and the first windows: start-up's transient garbage.
SETTLE_S = 60.0

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    # The process's own symbols (libc among them): no ldconfig or compiler run to find the library.
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def resident_kb() -> int:
    """The resident set of the process in kB (``VmRSS``), 0 where /proc is not there."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1])


def trim() -> int:
    """Return free heap pages to the system; the kB the resident set shrank by (0 without glibc)."""
    fn = _malloc_trim()
    if fn is None:
        return 0
    before = resident_kb()
    fn(0)
    return max(0, before - resident_kb())


async def trim_after_ready(
    ready: Callable[[], Awaitable[bool]], every_s: float, *, settle_s: float = SETTLE_S
) -> None:
    """Trim once start-up has settled (``settle_s`` after READY), then every ``every_s`` (0: never)."""
    if every_s <= 0 or not await ready():
        return
    await asyncio.sleep(settle_s)
    freed = trim()
    log.info("memory: returned %.1f MB freed during start-up to the system", freed / 1024)
    while True:
        await asyncio.sleep(every_s)
        # Each trim is an madvise over free pages, about a millisecond; logged only in debug.
        log.debug("memory: returned %.1f MB of freed heap to the system", trim() / 1024)
