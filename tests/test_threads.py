"""The pool that runs a large product's parts on several threads (nn2run.threads)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from nn2run import threads


def _recorder(seen: list, k: int):
    def call():
        seen.append((k, threading.get_ident()))
    return [(call, ())]


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(threads.POOL, "threads", 2)
    return threads.POOL


def test_parts_run_on_as_many_threads_as_set(pool, monkeypatch):
    seen: list = []
    pool.run([_recorder(seen, k) for k in range(4)])
    assert sorted(k for k, _ in seen) == [0, 1, 2, 3]
    assert len({ident for _, ident in seen}) == 2
    assert {ident for k, ident in seen if k % 2 == 0} == {threading.get_ident()}   # this thread: parts 0, 2
    monkeypatch.setattr(pool, "threads", 1)
    seen.clear()
    pool.run([_recorder(seen, k) for k in range(4)])
    assert [k for k, _ in seen] == [0, 1, 2, 3] and {i for _, i in seen} == {threading.get_ident()}


def test_a_busy_pool_runs_the_parts_on_the_calling_thread(pool):
    """A second machine (another thread's) that finds the workers in use does its own work."""
    seen: list = []
    with pool._busy:
        pool.run([_recorder(seen, k) for k in range(2)])
    assert {i for _, i in seen} == {threading.get_ident()}


def test_an_error_in_a_workers_part_reaches_the_caller_and_the_pool_still_works(pool):
    def fail():
        raise FloatingPointError("in the worker's part")
    with pytest.raises(FloatingPointError, match="worker's part"):
        pool.run([[(lambda: None, ())], [(fail, ())]])
    seen: list = []
    pool.run([_recorder(seen, k) for k in range(2)])
    assert sorted(k for k, _ in seen) == [0, 1]


def test_two_threads_compute_a_product_in_parts_like_one(pool):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 300)).astype(np.float32), rng.standard_normal((300, 512)).astype(np.float32)
    out = np.zeros((8, 512), np.float32)
    pool.run([[(np.matmul, (x, w[:, lo:lo + 128], out[:, lo:lo + 128]))] for lo in range(0, 512, 128)])
    np.testing.assert_allclose(out, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("env, want", [({"OPENBLAS_NUM_THREADS": "3"}, 3), ({"OMP_NUM_THREADS": "5"}, 5),
                                       ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "7"}, 2)])
def test_the_thread_count_is_openblas_own_choice(monkeypatch, env, want):
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert threads.default_threads() == want


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_threads_takes_a_positive_integer(bad):
    with pytest.raises(ValueError, match="positive integer"):
        threads.set_threads(bad)


@pytest.mark.skipif(not hasattr(threads.os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_workers_of_its_own(pool):
    """Threads do not survive a fork: a child of a process whose pool has started workers
    must start its own, not hand work to threads that are not there (it would wait forever)."""
    import multiprocessing
    seen: list = []
    pool.run([_recorder(seen, k) for k in range(2)])          # the parent's worker exists
    assert pool._workers
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_split_in_child)
    child.start()
    child.join(timeout=20)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0


def _split_in_child():
    threads.POOL.threads = 2
    seen: list = []
    threads.POOL.run([_recorder(seen, k) for k in range(2)])
    raise SystemExit(0 if sorted(k for k, _ in seen) == [0, 1] and len({i for _, i in seen}) == 2 else 1)


def test_an_interrupted_wait_still_waits_for_the_worker(pool, monkeypatch):
    """Ctrl-C while this thread waits must not leave the worker writing while the caller
    goes on (its next run would read a stale 'done')."""
    import time
    finished = threading.Event()

    def slow():
        time.sleep(0.2)
        finished.set()

    pool.run([[(lambda: None, ())], [(lambda: None, ())]])        # the worker exists
    worker = pool._workers[0]
    real = worker._done.acquire
    calls = []

    def interrupted_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(worker, "_done", type("L", (), {"acquire": staticmethod(interrupted_once),
                                                         "release": worker._done.release})())
    with pytest.raises(KeyboardInterrupt):
        pool.run([[(lambda: None, ())], [(slow, ())]])
    assert finished.is_set()
