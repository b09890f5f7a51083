"""``torch.jit.trace`` of the twins warns exactly as tracing torch.nn's modules does: no
TracerWarning from normlab's own checks (under tracing, sizes are traced tensors, and a
Python comparison of them turns into a bool with a warning a user cannot act on).
Oracle: the warnings torch.nn's own module gives under the same trace."""

import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import normlab.torch as nt  # noqa: E402

CASES = {
    "batch_norm_1d": (lambda m: m.BatchNorm1d(4), (3, 4)),
    "batch_norm_2d": (lambda m: m.BatchNorm2d(4), (2, 4, 3, 3)),
    "batch_norm_3d": (lambda m: m.BatchNorm3d(4), (2, 4, 2, 3, 3)),
    "group_norm": (lambda m: m.GroupNorm(2, 4), (2, 4, 3, 3)),
    "instance_norm_2d": (lambda m: m.InstanceNorm2d(4, affine=True, track_running_stats=True), (2, 4, 3, 3)),
    "layer_norm": (lambda m: m.LayerNorm(4), (2, 3, 4)),
    "rms_norm": (lambda m: m.RMSNorm(4), (2, 3, 4)),
    "rms_norm_no_weight": (lambda m: m.RMSNorm(4, elementwise_affine=False), (2, 3, 4)),
}


def tracer_warnings(module, shape) -> set:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(module, torch.randn(shape), check_trace=False)
    return {(w.filename.rsplit("/", 1)[-1], w.lineno) for w in caught if issubclass(w.category, torch.jit.TracerWarning)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_tracing_a_twin_warns_as_tracing_torch_nn_does(name, training):
    make, shape = CASES[name]
    assert tracer_warnings(make(nt).train(training), shape) == tracer_warnings(make(nn).train(training), shape)


def test_tracing_a_converted_model_adds_no_warnings_of_normlab():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Flatten(2),
                             nn.LayerNorm(16), nn.RMSNorm(16)).eval()

    shape = (2, 3, 6, 6)
    assert tracer_warnings(nt.convert(model()), shape) == tracer_warnings(model(), shape)
