"""What torch's profiler lists for a call: the tests of the names a user searches
``prof.key_averages()`` for (normlab's twins beside torch.nn's and PyG's modules)."""


def profiled_ops(run, warmup: int = 1) -> dict:
    """``{name: count}`` of ``prof.key_averages()`` for one call of ``run``, after ``warmup``
    calls unprofiled (which build the twins' caches, so that the cached paths are the ones
    listed)."""
    from torch.profiler import profile

    for _ in range(warmup):
        run()
    with profile() as prof:
        run()
    return {event.key: event.count for event in prof.key_averages()}
