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


POLL_CAP = 20_000  # iterations of a job's polling loop: a safety net against a hang, never reached when stop_requested() works


def _wait_for_stop(seen: list) -> None:
    """A long job's loop: poll stop_requested() up to POLL_CAP times; record what it saw on leaving."""
    for n in range(POLL_CAP):
        if stop_requested():
            break
        time.sleep(0.001)
    seen.append((stop_requested(), n))


def test_a_failing_job_stops_the_rest_and_raises_here():
    """Items not yet started never start; the running one is asked to stop and returns before the error is raised."""
    started, seen = [], []
    first_running = threading.Event()

    def job(i):
        started.append(i)
        if i == 0:
            first_running.set()
            _wait_for_stop(seen)  # only stop_requested() lets job 0 finish, so no third item can be handed out
            return i
        assert first_running.wait(30), "job 0 never started"  # both jobs are running when job 1 fails
        raise ValueError(f"job {i} failed")

    with torch_threads(2):
        with pytest.raises(ValueError, match="job 1 failed"):
            list(run_side_by_side(job, range(10), workers=2))
        assert torch.get_num_threads() == 2  # the jobs' 1-thread setting did not outlive them
    assert sorted(started) == [0, 1]  # items 2-9 were never started
    assert len(seen) == 1 and seen[0][0] is True and seen[0][1] < POLL_CAP - 1  # job 0 returned (before the raise) because it was told to stop
    assert not stop_requested()


def test_running_jobs_are_told_to_stop_when_another_fails():
    """Python cannot interrupt a thread: long jobs poll stop_requested(), set while the run is abandoned."""
    seen, at_start = [], []
    polling = threading.Event()

    def job(i):
        if i == 0:
            assert polling.wait(30), "job 1 never started"
            raise KeyboardInterrupt  # what Ctrl-C raises in the waiting thread, here from a job
        at_start.append(stop_requested())
        polling.set()
        _wait_for_stop(seen)
        return i

    with torch_threads(2), pytest.raises(KeyboardInterrupt):
        list(run_side_by_side(job, range(2), workers=2))
    assert at_start == [False]  # not set before anything failed
    assert len(seen) == 1 and seen[0][0] is True and seen[0][1] < POLL_CAP - 1  # job 1 left its loop because it was told to stop, not at its cap
    assert not stop_requested()  # cleared for the next run
