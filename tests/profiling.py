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


def autograd_steps_inside(run, range_name: str, warmup: int = 1) -> tuple:
    """``(count, steps)`` for one profiled call of ``run``: how many ranges named
    ``range_name`` torch's profiler lists, and the names of the autograd nodes
    (``PowBackward0``, ...) that ran inside the first of them."""
    from collections import Counter

    from torch.profiler import profile

    for _ in range(warmup):
        run()
    with profile() as prof:
        run()
    events = prof.events()
    ranges = [event for event in events if event.name == range_name]
    if not ranges:
        return 0, Counter()
    start, end = ranges[0].time_range.start, ranges[0].time_range.end
    nodes = {event.name.split(": ", 1)[1] for event in events
             if event.name.startswith("autograd::engine::evaluate_function: ")}
    return len(ranges), Counter(event.name for event in events if event.name in nodes
                                and start <= event.time_range.start and event.time_range.end <= end)


def autograd_steps(run, warmup: int = 1):
    """The names of the autograd nodes (``PowBackward0``, ...) torch's profiler lists for one call of ``run``."""
    from collections import Counter

    from torch.profiler import profile

    for _ in range(warmup):
        run()
    with profile() as prof:
        run()
    return Counter(event.name.split(": ", 1)[1] for event in prof.events()
                   if event.name.startswith("autograd::engine::evaluate_function: "))
