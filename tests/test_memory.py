"""Freed heap memory goes back to the system after start-up (glibc ``malloc_trim``)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import platform
import subprocess
import sys

import pytest

from gateway.memory import resident_kb, trim, trim_after_ready

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


@glibc
def test_trim_returns_freed_heap_pages() -> None:
    # 64 MB in blocks below glibc's mmap threshold (they live in the heap), all but the last
    # freed: without a trim the freed heap stays resident behind the one block still in use.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(1024)]
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    for b in blocks[:-1]:
        libc.free(b)
    try:
        before = resident_kb()
        freed = trim()
        assert freed > 32 * 1024, (before, freed)
        assert resident_kb() <= before - 32 * 1024
    finally:
        libc.free(blocks[-1])


@glibc
def test_trims_after_ready_then_periodically(caplog: pytest.LogCaptureFixture) -> None:
    async def ready() -> bool:
        return True

    async def main() -> None:
        task = asyncio.create_task(trim_after_ready(ready, 0.01, settle_s=0.0), name="test:trim")
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.DEBUG, logger="gateway.memory"):
        asyncio.run(main())
    lines = [r for r in caplog.records if r.name == "gateway.memory"]
    assert "freed during start-up" in lines[0].getMessage()
    assert lines[0].levelno == logging.INFO
    assert len(lines) >= 3
    assert all(r.levelno == logging.DEBUG for r in lines[1:])


def test_no_trim_when_the_gateway_never_became_ready_or_trims_are_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def never() -> bool:
        return False

    async def ready() -> bool:
        return True

    with caplog.at_level(logging.DEBUG, logger="gateway.memory"):
        asyncio.run(asyncio.wait_for(trim_after_ready(never, 0.01, settle_s=0.0), 1.0))
        asyncio.run(asyncio.wait_for(trim_after_ready(ready, 0.0, settle_s=0.0), 1.0))  # memory_trim_s = 0
    assert not [r for r in caplog.records if r.name == "gateway.memory"]


# In a process of its own: the allocator's settings are process-wide.
MAPPED_AFTER_A_BIG_FREE = """
import ctypes, sys
from gateway.memory import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
fixed = sys.argv[1] == "fixed" and fix_mmap_threshold()
libc.free(libc.malloc(8 << 20))  # a mapped block freed: glibc would now keep blocks below 8 MiB in its heap
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(int(fixed), libc.mallinfo2().hblkhd - before)
libc.free(block)
"""


@glibc
def test_large_blocks_stay_mapped_after_a_larger_one_was_freed() -> None:
    def mapped(how: str) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", MAPPED_AFTER_A_BIG_FREE, how], capture_output=True, text=True, check=True
        ).stdout.split()
        return int(out[0]), int(out[1])

    # The threshold pinned: a 1 MiB block is a mapping of its own, unmapped when freed.
    fixed, in_mappings = mapped("fixed")
    assert fixed == 1
    assert in_mappings >= 1 << 20
    # Left to glibc (what the gateway did before): the same block came out of the heap.
    assert mapped("default") == (0, 0)
