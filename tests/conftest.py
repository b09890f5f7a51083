"""Shared test settings: hypothesis profiles sized for a 2-core CI machine."""

import importlib.util
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("NORMLAB_HYPOTHESIS_PROFILE", "ci"))

# helpers of the torch tests, which hold no tests but are collected for doctests: without
# torch (a NumPy-only install) their import would be a collection error, not a skip
collect_ignore = [] if importlib.util.find_spec("torch") else ["composites.py", "mirrored_norms.py", "twins.py"]


@pytest.fixture
def every_call_threaded(monkeypatch):
    """Every kernel call takes its threaded variant, however small the input (a call on
    one thread still runs the serial one): what the tests of bit-identical results on
    one and two threads need, on inputs small enough to be quick. The kernels ask
    ``threads.serial_below`` at each call."""
    from normlab.kernels import threads

    monkeypatch.setattr(threads, "serial_below", lambda row_forward=False: 0)


@pytest.fixture(autouse=True)
def _dynamo_state_left_behind_by_a_test_is_cleared():
    """After a test in which torch.compile converted frames, Dynamo's caches are cleared. A
    compiled call that raises (the refusal tests) leaves the frames it ran through marked as
    frames Dynamo will not convert, for the rest of the process: a later
    ``torch.compile(fullgraph=True)`` of the same code in the same worker then runs them
    eagerly and fails ("Attempt to trace generator"), as it does for any torch module that
    raised under torch.compile once. Tests that compile nothing pay nothing."""
    dynamo = sys.modules.get("torch._dynamo")
    before = dynamo.utils.counters["frames"]["total"] if dynamo is not None else 0
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and dynamo.utils.counters["frames"]["total"] != before:
        dynamo.reset()
