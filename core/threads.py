"""Independent CPU jobs side by side, each on its share of torch's threads.

Training one small SAE keeps two cores less busy than two SAEs on one core each: its matmuls
(2,048 x 384 x 1,536) are too small for two threads to split without waiting on each other.
On the 2-core development machine two default-run SAEs trained in two Python threads with one
torch thread each took 8.5-10.7 s against 10.8-14.8 s one after the other on two threads, with
the same weights bit for bit (README, "Configuration"). Python threads suffice: torch releases
the GIL inside its kernels, and the jobs share the process's memory (models, activations)
instead of copying it into worker processes.

Jobs must not share mutable state; where they do (a model whose block list a splice swaps),
the owner guards it with a lock. Python cannot interrupt a thread, so long loops inside jobs
(the SAE trainer) poll ``stop_requested()``: after Ctrl-C or a failed job, the jobs still
running stop at their next step instead of running to the end.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from core.rss import share_malloc_arena

T = TypeVar("T")
R = TypeVar("R")

_stop = threading.Event()


class Abandoned(Exception):
    """Raised inside a job that noticed ``stop_requested()``; never reaches the caller."""


def stop_requested() -> bool:
    """True while side-by-side jobs are being abandoned (Ctrl-C, or another job failed)."""
    return _stop.is_set()


@contextlib.contextmanager
def torch_threads(n: int):
    """Set torch's intra-op thread count to ``n`` inside the block (threads started there inherit it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_side_by_side(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` for every item, as each finishes, with up to ``workers`` running at once.

    ``workers`` is capped by the number of items and by torch's thread count; each job gets
    ``threads // workers`` torch threads, and so does this thread until the generator is done
    (the caller's own work between items runs on that share too). With one worker the items run
    in order in this thread, on all threads. An exception in a job (or Ctrl-C here) cancels the
    jobs not yet started, asks the running ones to stop (``stop_requested``) and is raised here
    once they have returned.
    """
    items = list(items)
    threads = torch.get_num_threads()
    workers = max(1, min(workers, len(items), threads))
    if workers == 1:
        for item in items:
            yield item, fn(item)
        return
    share_malloc_arena()  # a heap arena per thread would hold each job's freed pages apart (core.rss)
    try:
        with torch_threads(threads // workers), ThreadPoolExecutor(workers, thread_name_prefix="layerscope-job") as pool:
            pending = {pool.submit(fn, item): item for item in items[:workers]}
            queue, end = iter(items[workers:]), object()
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        item = pending.pop(future)
                        result = future.result()  # raises the job's exception
                        nxt = next(queue, end)
                        if nxt is not end:
                            pending[pool.submit(fn, nxt)] = nxt
                        yield item, result
            except BaseException:  # Ctrl-C or a failed job: the running jobs stop at their next poll
                _stop.set()
                raise
            finally:
                for future in pending:
                    future.cancel()
    finally:
        _stop.clear()
