"""Peak resident memory (RSS) of this process, per pipeline step.

Linux keeps a process's peak RSS as ``VmHWM`` in /proc/self/status, and writing ``5`` to
/proc/self/clear_refs resets that peak to the current RSS, so each step of a build can report
its own peak. Where either is unavailable (other systems, locked-down containers) the figure is
the process's peak so far (``resource.getrusage``), and ``reset_peak_rss`` says so.

Between steps, ``release_free_memory`` hands memory the last step freed back to the system
(glibc keeps freed heap pages otherwise): on the default run the build process drops from about
1 GB to about 0.6 GB after the activations step, and the next step's peak falls with it.
"""

from __future__ import annotations

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


M_ARENA_MAX = -8  # glibc's mallopt parameter number for the arena limit (malloc.h)


def share_malloc_arena() -> bool:
    """Let threads started from now on allocate from the existing glibc heap arena(s) instead of
    a fresh one each (``mallopt(M_ARENA_MAX, 1)``). False where that is not glibc.

    glibc gives a thread that allocates while another holds the main arena's lock an arena of its
    own, and pages freed in one arena serve only that arena. With two SAEs trained side by side
    (``core.threads``) the `saes` step's peak grew by about 600 MB over one SAE at a time; with
    one arena, by about 300 MB, at the same speed (README, "Configuration").
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False
