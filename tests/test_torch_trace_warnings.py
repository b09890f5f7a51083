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


@pytest.mark.parametrize("masked", [False, True])
def test_compiling_the_functional_api_gives_no_warning_about_normlabs_caches(masked):
    """The functional API parses its pattern on every call; under torch.compile Dynamo
    traces the parser, and through an ``functools.lru_cache`` it warned that it ignores
    the cache (a warning about normlab's internals, at every compile)."""
    from normlab.torch import normalize
    from normlab.torch.masked import normalize_masked

    x = torch.randn(4, 3, 5)
    mask = torch.rand(4, 1, 5) < 0.5

    def f(x, mask):
        if masked:
            return normalize_masked(x, "[b] c [t]", mask=mask, params="c", weight=torch.ones(3)).y
        return normalize(x, "[b] c [t]", params="c", weight=torch.ones(3))

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(f, fullgraph=True)(x, mask)
    torch.testing.assert_close(compiled, f(x, mask))
    assert not [w for w in caught if "lru_cache" in str(w.message)]
