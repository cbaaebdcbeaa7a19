import threading
import time

import pytest
import torch

from core.threads import run_side_by_side, stop_requested, torch_threads


def _job(i: int) -> tuple[int, int, str]:
    time.sleep(0.01 * (i % 3))  # finish out of order
    return i * i, torch.get_num_threads(), threading.current_thread().name


def test_every_item_runs_once_with_its_share_of_the_threads():
    with torch_threads(2):
        out = dict(run_side_by_side(_job, range(7), workers=2))
        assert torch.get_num_threads() == 2  # restored afterwards
    assert sorted(out) == list(range(7))
    assert all(r[0] == i * i for i, r in out.items())
    assert {r[1] for r in out.values()} == {1}  # 2 threads / 2 workers
    assert len({r[2] for r in out.values()}) == 2 and all(r[2].startswith("layerscope-job") for r in out.values())


@pytest.mark.parametrize("workers, items", [(1, 5), (4, 1), (8, 5)])
def test_one_worker_or_one_item_or_too_few_threads_runs_in_this_thread(workers, items):
    """One item, one worker, or a single torch thread: in order, here, on all threads."""
    with torch_threads(1 if workers == 8 else 2):
        expected = torch.get_num_threads()
        out = list(run_side_by_side(_job, range(items), workers))
    assert [i for i, _ in out] == list(range(items))
    assert {r[1] for _, r in out} == {expected}
    assert {r[2] for _, r in out} == {threading.current_thread().name}


def test_a_failing_job_stops_the_rest_and_raises_here():
    started = []

    def job(i):
        started.append(i)
        if i == 1:
            raise ValueError("job 1 failed")
        time.sleep(0.05)
        return i

    with torch_threads(2):
        with pytest.raises(ValueError, match="job 1 failed"):
            list(run_side_by_side(job, range(10), workers=2))
        assert torch.get_num_threads() == 2  # the jobs' 1-thread setting did not outlive them
    assert len(started) < 10


def test_running_jobs_are_told_to_stop_when_another_fails():
    """Python cannot interrupt a thread: long jobs poll stop_requested(), set while the run is abandoned."""
    polled = []

    def job(i):
        if i == 0:
            time.sleep(0.05)
            raise KeyboardInterrupt  # what Ctrl-C raises in the waiting thread, here from a job
        t0 = time.perf_counter()
        while not stop_requested() and time.perf_counter() - t0 < 10:
            time.sleep(0.005)
        polled.append(time.perf_counter() - t0)
        return i

    t0 = time.perf_counter()
    with torch_threads(2), pytest.raises(KeyboardInterrupt):
        list(run_side_by_side(job, range(2), workers=2))
    assert time.perf_counter() - t0 < 5 and polled and polled[0] < 5  # job 1 saw the request, long before its 10 s
    assert not stop_requested()  # cleared for the next run
