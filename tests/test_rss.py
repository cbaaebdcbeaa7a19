"""Peak-memory bookkeeping of the pipeline (Linux /proc; glibc for returning freed memory)."""

import platform
import sys

import pytest

from core.rss import peak_rss_mb, release_free_memory, reset_peak_rss
from tests.conftest import ROOT, needs_kept_heap

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


HEAP_PROBE = """
import ctypes, json
from core.rss import kept_heap

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 100 * 2**20  # a hidden-state-sized block, over glibc's largest automatic mmap threshold (32 MB)

def drop_on_free():
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)  # make it resident
    held = rss_mb()
    libc.free(p)
    return held - rss_mb()

out = {}
with kept_heap() as on:
    out["on"] = on
    out["inside"] = drop_on_free()
    with kept_heap() as inner:  # nested: the outer setting holds, and is not undone by the inner exit
        out["inner_on"] = inner
    out["after_inner"] = drop_on_free()
    held = rss_mb()
out["on_exit"] = held - rss_mb()
out["after"] = drop_on_free()
print(json.dumps(out))
"""


def _heap_probe(**env) -> dict:
    import json
    import os
    import subprocess

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LAYERSCOPE_KEEP_HEAP"))}
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], env={**clean, **env}, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@needs_kept_heap
def test_kept_heap_keeps_large_freed_blocks_inside_and_hands_them_back_on_exit():
    got = _heap_probe()
    assert got["on"] is True and got["inner_on"] is True
    assert got["inside"] < 20 and got["after_inner"] < 20  # a freed 100 MB block stays in the heap for the next batch
    assert got["on_exit"] > 90  # leaving the block returns it to the system
    assert got["after"] > 90  # and large blocks are mapped and unmapped again, as glibc does by default


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize("env", [{"LAYERSCOPE_KEEP_HEAP": "0"}, {"MALLOC_TOP_PAD_": "0"}], ids=["opt-out", "user's own glibc setting"])
def test_kept_heap_leaves_glibc_alone_when_asked(env):
    got = _heap_probe(**env)
    assert got["on"] is False and got["inner_on"] is False
    assert got["inside"] > 90 and got["after"] > 90  # glibc unmaps the freed block at once
