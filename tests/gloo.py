"""Processes of one gloo group for the distributed tests, met through a file in a fresh
temporary directory rather than a TCP port: a port found free and closed again before rank
0's store binds it can be taken in between (by another test's store under pytest-xdist, or
any connection's local port on a busy machine), and two runs could meet in one store."""

import os
import sys
import tempfile


def spawn(fn, *args, nprocs: int = 2) -> None:
    """``fn(rank, init_method, *args)`` in ``nprocs`` processes; each passes ``init_method``
    to ``torch.distributed.init_process_group``. Raises as ``torch.multiprocessing.spawn``."""
    import torch.multiprocessing as mp  # (here: the suite is collected where torch does not import)

    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(fn, args=(f"file://{directory}/store", *args), nprocs=nprocs, join=True)


def spawn_and_exit(fn, *args, nprocs: int = 2) -> None:
    """As :func:`spawn`, for tests that build a DeviceMesh (``fully_shard``, tensor
    parallelism): each process ends at once (``os._exit(0)``) when ``fn`` has returned.

    torch's DTensor caches (redistribution planners, sharding propagation, in Python and in
    C++) keep every DeviceMesh they planned for, and a mesh keeps its groups, so such a
    test's group outlives ``destroy_process_group`` into interpreter shutdown, with
    torch.nn's modules alone as much as with converted ones. There its gloo worker, dropping
    its last work, needs the GIL, and taking it during finalization ends the thread through
    a noexcept destructor: "terminate called without an active exception" (SIGABRT), about
    one run in twenty under load, after every assertion has passed. Nothing of the test's is
    left to run by then, so the process leaves without finalizing; a failure in ``fn``
    raises as before, and ``torch.multiprocessing.spawn`` reports it."""
    spawn(_exit_after, fn, *args, nprocs=nprocs)


def _exit_after(rank: int, init_method: str, fn, *args) -> None:
    fn(rank, init_method, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
