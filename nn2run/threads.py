"""More than one core for the products OpenBLAS runs on one.

At a small batch the VM binds a product as column blocks that OpenBLAS multiplies with its
small-matrix kernel (`nn2run.vm.column_blocks`), which runs on the calling thread whatever
OpenBLAS's thread count. A large one is bound in parts, one per thread (`nn2run.vm`):
`POOL.run` hands all but the first part to worker threads and does the first itself; NumPy releases the GIL inside each
matmul, so the parts run at once (a 8 × 513 × 2048 product: ~1.8× on two cores). Parts
too small to pay for the hand-over (~10 µs) are not split.

The thread count is OpenBLAS's own choice, so that both kinds of product use the same
cores: OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS or OMP_NUM_THREADS if set, else the cores
this process may run on; `set_threads` changes it (for every machine, at once). With one
thread the parts run one after the other. One set of workers serves the process: a machine
that finds them busy (another thread's machine is using them) runs its parts itself.

Imports the standard library only.
"""

from __future__ import annotations

import os
import threading

SPLIT_MIN = 4_000_000        # multiply-adds: a smaller product is not split (hand-over ~10 µs)


def default_threads() -> int:
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:            # no affinity on this platform
        return os.cpu_count() or 1


class _Worker:
    """A daemon thread that runs one list of calls each time it is given one."""

    def __init__(self):
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._calls, self._error = [], None
        threading.Thread(target=self._loop, name="nn2run-products", daemon=True).start()

    def _loop(self):
        while True:
            self._go.acquire()
            try:
                for fn, args in self._calls:
                    fn(*args)
            except BaseException as e:      # handed to the caller, which raises it
                self._error = e
            self._done.release()

    def start(self, calls) -> None:
        self._calls = calls
        self._go.release()

    def wait(self) -> None:
        try:
            self._done.acquire()
        except BaseException:       # Ctrl-C in the wait: the worker is still writing the
            self._done.acquire()    # arrays, so let it finish before the caller goes on
            raise
        error, self._error = self._error, None
        if error is not None:
            raise error


class _Pool:
    def __init__(self):
        self.threads = default_threads()
        self._workers: list[_Worker] = []
        self._busy = threading.Lock()

    def run(self, parts) -> None:
        """Run the call lists `parts`, over up to `threads` threads (this one included)."""
        n = min(self.threads, len(parts))
        if n < 2 or not self._busy.acquire(blocking=False):
            for part in parts:
                for fn, args in part:
                    fn(*args)
            return
        try:
            while len(self._workers) < n - 1:
                self._workers.append(_Worker())
            shares = [[call for part in parts[k::n] for call in part] for k in range(n)]
            for worker, share in zip(self._workers, shares[1:]):
                worker.start(share)
            try:
                for fn, args in shares[0]:
                    fn(*args)
            finally:
                for worker in self._workers[:n - 1]:
                    worker.wait()
        finally:
            self._busy.release()

    def forked(self) -> None:
        """In a forked child the workers are gone (threads do not survive a fork)."""
        self._workers, self._busy = [], threading.Lock()


POOL = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL.forked)


def set_threads(n: int) -> None:
    """The number of threads the VMs' split products use from now on (1: no workers)."""
    if type(n) is not int or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    POOL.threads = n


def get_threads() -> int:
    return POOL.threads

