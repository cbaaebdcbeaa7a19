"""Peak resident memory (RSS) of this process, per pipeline step.

Linux keeps a process's peak RSS as ``VmHWM`` in /proc/self/status, and writing ``5`` to
/proc/self/clear_refs resets that peak to the current RSS, so each step of a build can report
its own peak. Where either is unavailable (other systems, locked-down containers) the figure is
the process's peak so far (``resource.getrusage``), and ``reset_peak_rss`` says so.

Between steps, ``release_free_memory`` hands memory the last step freed back to the system
(glibc keeps freed heap pages otherwise): on the default run the build process drops from about
1 GB to about 0.6 GB after the activations step, and the next step's peak falls with it.

During extraction, ``kept_heap`` stops glibc from handing every large tensor's pages back to the
system the moment it is freed, so the next batch reuses them: see its docstring.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (since the last successful ``reset_peak_rss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB (macOS reports bytes)


def available_memory_bytes() -> int | None:
    """Memory the system can give a new allocation without swapping (``MemAvailable`` in
    /proc/meminfo); None where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameter numbers (glibc malloc.h)


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc ``mallopt(param, value)`` pairs in order; False where this is not glibc or
    glibc refuses one of them (the ones before it stay set)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) for param, value in settings)
    except (OSError, AttributeError):
        return False


def share_malloc_arena() -> bool:
    """Let threads started from now on allocate from the existing glibc heap arena(s) instead of
    a fresh one each (``mallopt(M_ARENA_MAX, 1)``). False where that is not glibc.

    glibc gives a thread that allocates while another holds the main arena's lock an arena of its
    own, and pages freed in one arena serve only that arena. With two SAEs trained side by side
    (``core.threads``) the `saes` step's peak grew by about 600 MB over one SAE at a time; with
    one arena, by about 300 MB, at the same speed (README, "Configuration").
    """
    return _mallopt((M_ARENA_MAX, 1))


KEEP_HEAP_BYTES = 1 << 30  # inside kept_heap(): blocks below this come from the heap, and this much freed heap top is kept
AFTER_MMAP_THRESHOLD = 32 << 20  # after it: glibc's own ceiling for its sliding thresholds (DEFAULT_MMAP_THRESHOLD_MAX)
OPT_OUT = "LAYERSCOPE_KEEP_HEAP"  # set to 0 to keep glibc's own settings
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
_depth, _on = 0, False
_depth_lock = threading.Lock()


@contextlib.contextmanager
def kept_heap():
    """Inside the block, glibc serves blocks under 1 GB from its heap and keeps what is freed there
    for the next allocation, instead of mapping every large tensor freshly from the kernel and
    unmapping it when it is freed. Yields True where that was set; False where this is not glibc
    or glibc refuses a threshold that high (some versions cap it at 32 MB), where
    ``LAYERSCOPE_KEEP_HEAP=0``, or where the user set glibc's own ``MALLOC_*_`` or
    ``GLIBC_TUNABLES`` variables (theirs win). Nested blocks share the outermost one's setting.

    Why: by default glibc maps each block over 32 MB (a batch's attention scores, FFN
    activations, hidden states: 12-200 MB each) with a fresh mmap, so every batch touches that
    much brand-new memory again, one page fault per 4 KiB, each page zeroed by the kernel. The
    ``activations`` step runs its batches in this block: on the 2-core Intel Xeon virtual machine
    it took 30.0-32.0 s against 31.8-32.1 s, with a third of the page faults (0.73-0.79M against
    2.0-2.3M) and the same peak (README, "Configuration"). The other steps gained at most 2% from
    it and kept 100-500 MB more at their peak, so it is scoped to extraction.

    On leaving, the thresholds are set to glibc's own ceiling (blocks over 32 MB mapped again,
    the heap's top trimmed beyond 64 MB) and the freed heap is handed back (``release_free_memory``).
    """
    global _depth, _on
    with _depth_lock:
        outer = _depth == 0
        if outer:
            wanted = os.environ.get(OPT_OUT, "1") != "0" and not any(v in os.environ for v in _GLIBC_ENV)
            _on = wanted and _mallopt((M_MMAP_THRESHOLD, KEEP_HEAP_BYTES), (M_TRIM_THRESHOLD, KEEP_HEAP_BYTES))
        _depth += 1
    try:
        yield _on
    finally:
        with _depth_lock:
            _depth -= 1
            restore = outer and _on
            if outer:
                _on = False
        if restore:
            _mallopt((M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD), (M_TRIM_THRESHOLD, 2 * AFTER_MMAP_THRESHOLD))
            release_free_memory()
