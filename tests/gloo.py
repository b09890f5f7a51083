"""Processes of one gloo group for the distributed tests, met through a file in a fresh
temporary directory rather than a TCP port: a port found free and closed again before rank
0's store binds it can be taken in between (by another test's store under pytest-xdist, or
any connection's local port on a busy machine), and two runs could meet in one store."""

import tempfile


def spawn(fn, *args, nprocs: int = 2) -> None:
    """``fn(rank, init_method, *args)`` in ``nprocs`` processes; each passes ``init_method``
    to ``torch.distributed.init_process_group``. Raises as ``torch.multiprocessing.spawn``."""
    import torch.multiprocessing as mp  # (here: the suite is collected where torch does not import)

    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(fn, args=(f"file://{directory}/store", *args), nprocs=nprocs, join=True)
