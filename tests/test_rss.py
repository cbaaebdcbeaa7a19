"""Peak-memory bookkeeping of the pipeline (Linux /proc; glibc for returning freed memory)."""

import platform
import sys

import pytest

from core.rss import peak_rss_mb, release_free_memory, reset_peak_rss

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def test_peak_follows_a_large_allocation_and_resets():
    assert reset_peak_rss()
    before = peak_rss_mb()
    block = bytearray(200 * 2**20)  # zero-filled by the kernel on first touch:
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page so it is resident
    assert peak_rss_mb() >= before + 190
    del block
    assert reset_peak_rss()
    assert peak_rss_mb() < before + 100  # the peak starts again from the current size


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_system():
    blocks = [bytearray(b"x" * 64_000) for _ in range(4000)]  # ~256 MB of heap blocks (below the mmap threshold)
    keep = blocks[-1]  # the last block pins the top of the heap, so nothing is trimmed by itself
    del blocks[:-1]
    held = rss_mb()
    release_free_memory()
    assert rss_mb() < held - 200
    assert keep[0] == ord("x")
