import threading
import time

import pytest

from dipnode.node.jobs.executor import Executor, ExecutorBusy, ExecutorClosed, LocalExecutor


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_runs_at_most_n_at_once_and_every_job(n):
    ex = LocalExecutor(n)
    assert isinstance(ex, Executor)
    lock = threading.Lock()
    active = peak = 0
    done: list[int] = []
    release = threading.Event()

    def job(i):
        def run():
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            release.wait(10)
            time.sleep(0.005)  # overlap the jobs a little
            with lock:
                active -= 1
                done.append(i)
        return run

    submitted = 0
    futures = []
    while submitted < 3 * n:  # the worker loop: submit only into free slots
        if ex.free_slots():
            futures.append(ex.submit(submitted, job(submitted)))
            submitted += 1
            if submitted == n:
                assert ex.running() == list(range(n)) and ex.free_slots() == 0
                with pytest.raises(ExecutorBusy, match=f"max_concurrent={n}"):
                    ex.submit(99, job(99))
                release.set()
        else:
            time.sleep(0.001)
    ex.shutdown(wait=True)
    assert sorted(done) == list(range(3 * n)) and peak == n and ex.running() == []


@pytest.mark.timeout(30)
def test_slot_is_free_when_the_future_resolves():
    ex = LocalExecutor(1)
    for i in range(20):
        ex.submit(i, lambda: None).result(5)
        assert ex.free_slots() == 1  # no window where a finished job still holds the slot
    ex.shutdown()


@pytest.mark.timeout(30)
def test_same_job_twice_is_refused_and_exceptions_surface(caplog):
    ex = LocalExecutor(2)
    gate = threading.Event()
    ex.submit(7, lambda: gate.wait(10))
    with pytest.raises(ExecutorBusy, match="job 7 is already running"):
        ex.submit(7, lambda: None)
    gate.set()

    def boom():
        raise RuntimeError("fit diverged")

    fut = ex.submit(8, boom)
    with pytest.raises(RuntimeError, match="fit diverged"):
        fut.result(5)
    assert "job 8 raised RuntimeError" in caplog.text
    ex.shutdown(wait=True)
    assert ex.free_slots() == 0
    with pytest.raises(ExecutorClosed):
        ex.submit(9, lambda: None)


def test_bad_capacity():
    with pytest.raises(ValueError, match="max_concurrent: expected an integer >= 1, got 0"):
        LocalExecutor(0)
