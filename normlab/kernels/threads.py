"""How many threads a kernel call uses, and which thread pool runs them.

**The pool.** Numba runs ``prange`` loops on one of three threading layers. normlab picks
``workqueue`` before its first kernel starts a pool, unless the user chose one
(``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``) or Numba code elsewhere
in the process already started one:

* its workers sleep on a semaphore as soon as a loop ends. The ``omp`` layer's GNU
  OpenMP workers spin for a while after each loop, as do PyTorch's own OpenMP workers
  after each of its ops: in a training loop that alternates the two, each pool's spinning
  workers took the cores the other needed (epochs 3-20x slower than with
  ``OMP_WAIT_POLICY=PASSIVE``, which no user sets). See ``benchmarks/threads.py``.
* it is fork-safe. GNU OpenMP is not: a child forked after the parent ran an ``omp``
  loop dies in its first one ("fork() called from a process already using GNU OpenMP").
* it must not be entered from two threads at once, so threaded calls take
  :data:`parallel_lock` (other threads' calls wait; results do not depend on it).

**How many threads.** A threaded call uses Numba's ``NUMBA_NUM_THREADS`` (the core
count), capped at ``torch.get_num_threads()`` once ``normlab.torch`` is imported (so
``torch.set_num_threads`` governs normlab too, and DataLoader workers, which set it to 1,
run serially), and at 1 in a child forked after the parent ran an ``omp`` loop.
``numba.set_num_threads`` lowers it further for the calling thread. One thread runs the
serial variant. Work is cut into chunks fixed by index, so the result is bit-identical on
any thread count.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from typing import Callable, Optional

PREFERRED_LAYER = "workqueue"

parallel_lock = threading.Lock()
_limit: Optional[Callable[[], int]] = None  # torch.get_num_threads, once normlab.torch is imported
_forked_from_openmp = False


def choose_layer() -> None:
    """Point Numba at :data:`PREFERRED_LAYER` unless the user or an earlier pool decided.
    Called when the kernels are first imported, before any of them compiles."""
    import numba
    from numba.np.ufunc import parallel

    if ("NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default"
            and not parallel._is_initialized):
        numba.config.THREADING_LAYER = PREFERRED_LAYER


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
    return max(1, count)


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
    """The threading layer Numba started, or None while no threaded kernel has run."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return None if parallel is None else parallel._threading_layer


def describe() -> str:
    """``"2 (workqueue)"``: threads per call, and the layer (once started)."""
    return f"{for_call()} ({layer() or 'not started'})"


def _after_fork_in_child() -> None:
    global parallel_lock, _forked_from_openmp
    parallel_lock = threading.Lock()  # a parent's thread may have held it at the fork
    if layer() == "omp" and sys.platform.startswith("linux"):  # GNU OpenMP kills such a child
        _forked_from_openmp = True


os.register_at_fork(after_in_child=_after_fork_in_child)
