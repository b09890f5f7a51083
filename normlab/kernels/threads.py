"""How many threads a kernel call uses, and which threads run them.

**torch's pool.** Once ``normlab.torch`` is imported, and where torch runs its own ops on
GNU OpenMP (its Linux wheels), a threaded call is an OpenMP region on torch's very
threads (:mod:`normlab.kernels.openmp`): the caller and torch's workers, which spin
between torch's ops, so a region starts in about 1.5 µs and no second pool competes for
the cores. Calls then run threaded from :data:`REGION_SERIAL_BELOW` elements (a row
norm's forward from half that).

**normlab's pool.** Without torch (the NumPy API alone), a threaded call runs the kernel's claimed variant (see
:mod:`normlab.kernels._claims`) on the calling thread and on ``count − 1`` of normlab's
own worker threads at once; each takes chunks of the work until none is left. The
workers are plain Python threads that sleep on a queue between calls and run the
compiled code without the GIL. Why not one of Numba's threading layers (measured on a
2-core AMD EPYC, see ``benchmarks/threads.py --pool``):

* ``workqueue`` costs about 75 µs per call: the caller hands all the work to workers
  that must first wake up, and waits for them. normlab's caller starts on the work at
  once, and a worker that wakes late finds less to do.
* ``omp`` (GNU OpenMP) and ``tbb`` start a loop in 1-2 µs because their workers spin for
  a while after each loop, as torch's OpenMP workers do after each op. Next to torch's
  pool on the same cores, each pool's spinning workers took the cores the other needed
  (torch's own ops up to 10x slower, and torch.nn training steps 1.5x slower with tbb).
  GNU OpenMP also kills a child forked after a parallel region.

The workers sleep when idle, so torch's ops keep the cores; the caller waits on the
workers' last chunks only. Waking one costs 50-100 µs, so calls run threaded from
:data:`POOL_SERIAL_BELOW` elements. One call at a time uses the pool: a call made from another
thread meanwhile runs serially (same result). A child process forked from a parent
with a pool starts a new pool of its own (also where the parent used torch's pool, whose
threads the child lacks); the parent's idle workers end before the fork, so that the
process forks with no thread of normlab's (Python 3.12+ warns of a fork of a
multi-threaded process), and the parent's next threaded call starts them again.

**How many threads.** ``NUMBA_NUM_THREADS`` (the core count), capped at
``torch.get_num_threads()`` once ``normlab.torch`` is imported (so
``torch.set_num_threads`` governs normlab too, and DataLoader workers, which set it to 1,
run serially), and at ``numba.get_num_threads()`` where the user set it. One thread runs
the serial variant. Work is cut into chunks fixed by index, so the result is
bit-identical on any thread count.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import sys
import threading
import time
from typing import Callable, Optional


parallel_lock = threading.Lock()
POOL_SERIAL_BELOW = 1 << 19  # on normlab's pool (waking a sleeping worker costs 50-100 µs)
REGION_SERIAL_BELOW = 1 << 17  # on torch's OpenMP pool (a region starts in about 1.5 µs; see benchmarks/serial_threshold.py)
_limit: Optional[Callable[[], int]] = None  # torch.get_num_threads, once normlab.torch is imported
_forked_from_openmp = False
numba_layer: Optional[str] = None  # set by use_numba_layer: Numba's parallel variants instead of the pool


def use_numba_layer(name: Optional[str]) -> None:
    """Run threaded calls on Numba's ``parallel=True`` variants and its threading layer
    ``name`` (``"workqueue"``, ``"omp"``, ``"tbb"``) instead of normlab's pool, or back on
    the pool with None: for comparing the choices (``benchmarks/threads.py --pool``).
    The layer can be chosen once per process, before Numba starts one."""
    global numba_layer
    if name is not None:
        import numba

        numba.config.THREADING_LAYER = name
    numba_layer = name


class _Task:
    """One threaded call as the workers see it. The caller takes the arrays back
    (``arguments = None``) when it returns, and waits for any worker still inside the
    call, so that no worker holds a result's memory after the call: a dropped result's
    buffer is then free for the output pool at once."""

    __slots__ = ("claimed", "arguments", "lock", "inside")

    def __init__(self, claimed, arguments):
        self.claimed, self.arguments = claimed, arguments
        self.lock = threading.Lock()
        self.inside = 0

    def join(self) -> None:
        """Run by a worker: the call's remaining chunks, if the caller has not returned."""
        with self.lock:
            arguments = self.arguments
            if arguments is None:
                return
            self.inside += 1
        try:
            self.claimed(*arguments)  # a kernel: it raises nothing (NumPy's error model)
        finally:
            del arguments
            with self.lock:
                self.inside -= 1

    def close(self) -> None:
        """Run by the caller after its own share: take the arrays back, then wait for the
        workers inside (they have only their last chunk to finish, or none)."""
        with self.lock:
            self.arguments = None
            inside = self.inside
        while inside:
            time.sleep(0)
            with self.lock:
                inside = self.inside


_THREAD_END_WAIT_S = 1.0  # a joined thread's system thread ends microseconds later; never wait long


def _wait_for_the_system_thread(thread: threading.Thread) -> None:
    """Wait until ``thread``'s system thread is gone from ``/proc`` (Linux): Python 3.12's
    ``join`` returns a moment before it ends, and the fork warning counts system threads."""
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + _THREAD_END_WAIT_S
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(1e-4)


class _Worker:
    def __init__(self):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="normlab-kernel-worker", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            task = self.tasks.get()
            if task is None:  # stopped (the process is about to fork)
                return
            task.join()
            del task


class _Pool:
    """The workers that run threaded kernel calls beside the caller, started as needed."""

    def __init__(self):
        self.workers: list[_Worker] = []

    def stop(self) -> None:
        """End the workers' threads and wait for them; the next threaded call starts new ones.
        Called with :data:`parallel_lock` held, so no call is handing them work."""
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.tasks.put(None)
        for worker in workers:
            worker.thread.join()
            _wait_for_the_system_thread(worker.thread)

    def run(self, claimed, args: tuple, loops: int, count: int):
        while len(self.workers) < count - 1:
            self.workers.append(_Worker())
        from normlab.kernels._claims import claims_array

        arguments = args + (claims_array(loops, count),)
        task = _Task(claimed, arguments)
        for worker in self.workers[:count - 1]:
            worker.tasks.put(task)
        try:
            return claimed(*arguments)
        finally:
            task.close()


_pool = _Pool()
_regions = None  # openmp.Regions: torch's OpenMP pool, once found
_share_torch_pool: Optional[bool] = None  # None: whenever torch is imported; False: never
_looked_up = False  # torch's pool was looked for (found or not): not again
_forked = False  # this process is a child forked after normlab was imported


def share_torch_pool(share: bool = True) -> None:
    """Whether threaded calls run on torch's own OpenMP pool where torch is imported and
    runs on GNU OpenMP (see :mod:`normlab.kernels.openmp`), the default, or always on
    normlab's own pool (``share=False``, as ``benchmarks/threads.py --pool normlab``
    compares). The pool is looked up at the first kernel call, so that importing
    ``normlab.torch`` imports no Numba."""
    global _share_torch_pool, _regions, _looked_up
    _share_torch_pool = share
    _regions = None if not share else _regions
    _looked_up = _regions is not None


def _current_regions():
    """torch's pool where normlab's threaded calls use it, else None; looked up once: where torch is imported, in a process that is no
    forked or ``multiprocessing`` child (torch's OpenMP threads are not in a forked child,
    and a region there would wait for them forever; torch's own threaded ops hang there)."""
    global _regions, _looked_up
    if _looked_up or _share_torch_pool is False or "torch" not in sys.modules:
        return _regions
    _looked_up = True
    if _forked or _in_child_process():
        return None
    from normlab.kernels import openmp

    start = openmp.region_starter()
    _regions = None if start is None else openmp.Regions(start)
    if _regions is not None and _limit is None:
        limit_by(sys.modules["torch"].get_num_threads)  # torch's threads: torch.set_num_threads governs
    return _regions


def _in_child_process() -> bool:
    """True in a ``multiprocessing`` child (a DataLoader worker, a Pool's worker): forked
    ones may have a parent's OpenMP state without its threads."""
    process = sys.modules.get("multiprocessing.process")
    return process is not None and process.parent_process() is not None


def serial_below(row_forward: bool = False) -> int:
    """Elements below which a kernel call runs serially: where starting a call on the
    threads costs more than the second thread saves (measured by
    ``benchmarks/serial_threshold.py``). Starting an OpenMP region on torch's pool, whose
    workers spin between ops, costs far less than waking normlab's sleeping workers, and
    there a row norm's forward (one pass, no parameter sums) pays from half the size."""
    regions = _regions if _looked_up else _current_regions()  # (its answer once looked up, without its call)
    if regions is None:
        return POOL_SERIAL_BELOW
    return REGION_SERIAL_BELOW // 2 if row_forward else REGION_SERIAL_BELOW


def run(claimed, serial, args: tuple, loops: int, count: int):
    """Run a kernel's ``claimed`` variant on the caller and ``count − 1`` threads of torch's
    pool or normlab's; its ``serial`` variant where another thread's call has the pool."""
    if not parallel_lock.acquire(blocking=False):
        return serial(*args)
    try:
        regions = _current_regions()
        if regions is not None and regions.run(claimed, args, loops, count):
            return None
        return _pool.run(claimed, args, loops, count)
    finally:
        parallel_lock.release()


def limit_by(count: Optional[Callable[[], int]]) -> None:
    """Cap every threaded call at ``count()`` threads (``None`` removes the cap).

    >>> limit_by(lambda: 1); for_call()
    1
    >>> limit_by(None)
    """
    global _limit
    _limit = count


@functools.lru_cache(maxsize=1)
def _pool_size() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS  # fixed once Numba is imported


def for_call() -> int:
    """The number of threads the next threaded kernel call may use (1: run it serially)."""
    if _forked_from_openmp:
        return 1
    count = _pool_size()
    if _limit is not None:
        count = min(count, _limit())
    if count > 1 and _numba_started():
        import numba

        count = min(count, numba.get_num_threads())  # the user's numba.set_num_threads
    return max(1, count)


def _numba_started() -> bool:
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return parallel is not None and parallel._is_initialized


_UNCAPPED = contextlib.nullcontext()


def at_most(count: int):
    """A context in which this thread's parallel loops run on at most ``count`` threads.
    Numba's own per-thread setting (``numba.set_num_threads``) is left alone unless it
    asks for more, and restored on exit."""
    return _UNCAPPED if count >= _pool_size() else _Capped(count)


class _Capped:
    def __init__(self, count: int):
        self.count = count
        self.previous = None

    def __enter__(self):
        import numba

        previous = numba.get_num_threads()
        if previous > self.count:
            self.previous = previous
            numba.set_num_threads(self.count)

    def __exit__(self, *_):
        if self.previous is not None:
            import numba

            numba.set_num_threads(self.previous)


def layer() -> Optional[str]:
    """The threading layer Numba started (normlab starts none unless
    :func:`use_numba_layer` chose one), or None."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return None if parallel is None else parallel._threading_layer


def describe() -> str:
    """``"2 (normlab pool)"``: threads per call, and who runs them."""
    if numba_layer is not None:
        return f"{for_call()} (numba {numba_layer})"
    regions = _current_regions()
    return f"{for_call()} ({'torch OpenMP pool' if regions is not None else 'normlab pool'})"


_held_for_fork = False  # the fork hooks hold parallel_lock: the pool's workers were stopped


def _before_fork() -> None:
    """Stop normlab's idle workers, so that a fork (multiprocessing's "fork" start method, a
    DataLoader's workers) copies a process whose only threads are the user's: Python 3.12+
    warns that a fork of a multi-threaded process may deadlock the child. Where another
    thread's call has the pool, its workers are busy and stay (the child starts its own
    pool either way); nothing waits here."""
    global _held_for_fork
    if parallel_lock.acquire(blocking=False):
        _held_for_fork = True
        _pool.stop()


def _after_fork_in_parent() -> None:
    global _held_for_fork
    if _held_for_fork:
        _held_for_fork = False
        parallel_lock.release()


def _after_fork_in_child() -> None:
    global parallel_lock, _forked_from_openmp, _pool, _regions, _looked_up, _forked, _held_for_fork
    _held_for_fork = False
    parallel_lock = threading.Lock()  # a parent's thread may have held it at the fork
    _pool = _Pool()  # the parent's workers do not exist here
    _regions = None  # nor torch's OpenMP workers: a region would wait for them forever
    _looked_up = _forked = True
    if layer() == "omp" and sys.platform.startswith("linux"):  # GNU OpenMP kills such a child
        _forked_from_openmp = True


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
