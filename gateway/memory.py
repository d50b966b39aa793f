"""Give memory that start-up freed back to the system (glibc ``malloc_trim``), and keep large blocks out of the heaps.

Start-up allocates and frees far more than the running gateway keeps: imports, config and card
validation, TLS contexts, the first connections of every driver.  glibc keeps freed chunks in its
heaps for reuse, so they stay resident (and count against ``MemoryMax=``) although nothing uses
them; ``malloc_trim(0)`` returns the free pages of every heap with ``madvise``.  Elsewhere (musl,
macOS) there is nothing to call and :func:`trim` does nothing.

glibc also raises its mmap threshold (from 128 KiB up to 32 MiB) each time a block it had mapped
is freed; from then on blocks of that size come out of the heaps, and the holes the short-lived
ones leave (window arrays, encode and commit buffers) keep the heaps growing for minutes after
start-up.  :func:`fix_mmap_threshold` pins it: such blocks get their own mapping and go back to
the system when freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

__all__ = ["MMAP_THRESHOLD", "SETTLE_S", "fix_mmap_threshold", "resident_kb", "trim", "trim_after_ready"]

#: After READY, the sources' first connections and the first windows: start-up's transient garbage.
SETTLE_S = 60.0

#: Blocks from this size up are mapped on their own (glibc's default, kept from rising).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)

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


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Map blocks of ``size`` bytes and more on their own, whatever was freed before; False without glibc."""
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    # Any explicit value also turns off glibc's raising of the threshold (and of the trim threshold).
    return bool(fn(_M_MMAP_THRESHOLD, size))


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
