"""``torch.jit.trace`` of the twins warns exactly as tracing torch.nn's modules does: no
TracerWarning from normlab's own checks (under tracing, sizes are traced tensors, and a
Python comparison of them turns into a bool with a warning a user cannot act on).
Oracle: the warnings torch.nn's own module gives under the same trace."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import normlab.torch as nt  # noqa: E402
from tests.composites import AddNorm  # noqa: E402

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


@pytest.mark.parametrize("name", ["batch_norm_1d", "batch_norm_2d", "batch_norm_3d"])
def test_tracing_a_batch_norm_after_an_eager_training_step_of_that_shape_warns_as_torch_nn_does(name):
    # the twin repeats its last training step where the shape, strides and dtype are the same:
    # that comparison of traced sizes ran before the twin saw the trace
    make, shape = CASES[name]
    twin, reference = make(nt), make(nn)
    with torch.no_grad():
        twin(torch.randn(shape)), reference(torch.randn(shape))
    assert tracer_warnings(twin, shape) == tracer_warnings(reference, shape)


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


def _replaced_modules():
    """(name, the module convert() or a fused block replaces, its twin on the same state,
    inputs): torchvision's ConvNeXt LayerNorm2d, transformers' Cohere layer norm and Mamba2
    gated norm, diffusers' AdaLayerNormZero."""
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm

    from tests.hf_classes import mamba_gated_norm
    from tests.mirrored_norms import TorchvisionLayerNorm2d

    diffusers = pytest.importorskip("diffusers.models.normalization")
    ada = diffusers.AdaLayerNormZero(8)
    ada_twin = nt.AdaLayerNorm(8)
    ada_twin.load_state_dict(ada.state_dict())
    cases = [("layer_norm_2d", TorchvisionLayerNorm2d(4), (torch.randn(2, 4, 3, 3),)),
             ("cohere", CohereLayerNorm(8), (torch.randn(2, 3, 8),)),
             ("mamba_gated", mamba_gated_norm(8, 4)[0], (torch.randn(2, 3, 8), torch.randn(2, 3, 8)))]
    return [(name, original, nt.convert(copy.deepcopy(original)), inputs) for name, original, inputs in cases] + [
        ("ada_layer_norm", ada, ada_twin, {"x": torch.randn(2, 3, 8), "emb": torch.randn(2, 8)})]


def test_tracing_the_converted_and_fused_norms_warns_as_tracing_the_modules_they_replace():
    """LayerNorm2d, RecipeLayerNorm, GatedRMSNorm and AdaLayerNorm compared traced sizes in
    their own checks: each torch.jit.trace, and so each TorchScript ONNX export, warned
    "Converting a tensor to a Python boolean might cause the trace to be incorrect"."""
    pytest.importorskip("transformers")
    for name, original, twin, inputs in _replaced_modules():
        assert type(twin).__module__ == "normlab.torch", name

        def tracer_warnings_of(module):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if isinstance(inputs, dict):  # (keywords: AdaLayerNorm takes emb= after three optional arguments)
                    torch.jit.trace(module.eval(), example_kwarg_inputs=inputs, check_trace=False, strict=False)
                else:
                    torch.jit.trace(module.eval(), inputs, check_trace=False, strict=False)
            return {(w.filename.rsplit("/", 1)[-1], w.lineno) for w in caught
                    if issubclass(w.category, torch.jit.TracerWarning)}

        assert tracer_warnings_of(twin) == tracer_warnings_of(original), name


class _Masked(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, mask):
        return self.norm(x, mask=mask)


@pytest.mark.parametrize("mask_shape", [(2, 3, 1), (2, 3, 6), (6,)], ids=["rows", "elements", "features"])
def test_tracing_a_twin_called_with_a_mask_gives_no_tracer_warning(mask_shape):
    """The mask's check compared its sizes with the input's, traced tensors under
    torch.jit.trace: a TracerWarning ("Converting a tensor to a Python boolean might cause the
    trace to be incorrect") per axis, where the check only refuses a misfit and the trace is
    right. Oracle for the values: torch's var_mean of each row's counted features."""
    torch.manual_seed(0)
    model = _Masked(nt.LayerNorm(6))
    x, mask = torch.randn(2, 3, 6), torch.rand(mask_shape) < 0.7
    mask[..., 0] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (x, mask), check_trace=False)
    assert [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []
    full = mask.expand(x.shape).reshape(-1, 6)
    var, mean = (torch.stack(s) for s in zip(*(torch.var_mean(row[m], correction=0)
                                               for row, m in zip(x.reshape(-1, 6), full))))
    want = (x.reshape(-1, 6) - mean[:, None]) * torch.rsqrt(var[:, None] + 1e-5)
    torch.testing.assert_close(traced(x, mask), want.reshape(x.shape))


@pytest.mark.parametrize("grad", [True, False], ids=["recorded", "no_grad"])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_tracing_a_fused_add_rms_norm_warns_as_tracing_the_add_and_the_hf_norm_it_replaces(family, grad):
    """FusedAddRMSNorm compared the traced sizes of the residual with the input's (its small
    forward's check) and of its weight with the block's: a TracerWarning per size."""
    transformers = pytest.importorskip("transformers")
    original_class = {"llama": transformers.models.llama.modeling_llama.LlamaRMSNorm,
                      "gemma": transformers.models.gemma.modeling_gemma.GemmaRMSNorm}[family]
    original = AddNorm(original_class(8))
    twin = nt.FusedAddRMSNorm(8, casting=family, weight_offset=1.0 if family == "gemma" else 0.0)
    twin.load_state_dict(original.norm.state_dict())
    inputs = tuple(torch.randn(2, 3, 8) for _ in range(2))

    def tracer_warnings_of(module):
        with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(grad):
            warnings.simplefilter("always")
            traced = torch.jit.trace(module, inputs, check_trace=False)
        return traced, {(w.filename.rsplit("/", 1)[-1], w.lineno) for w in caught
                        if issubclass(w.category, torch.jit.TracerWarning)}

    traced_original, expected = tracer_warnings_of(original)
    traced_twin, actual = tracer_warnings_of(twin)
    assert actual == expected
    other = tuple(torch.randn(4, 5, 8) for _ in range(2))  # (the trace takes other sizes, as the original's)
    for a, e in zip(traced_twin(*other), traced_original(*other)):
        torch.testing.assert_close(a, e)


def test_a_fused_add_rms_norm_step_asks_for_the_tracing_state_no_more_than_a_torch_nn_norm_does():
    """The block tells a traced weight's sizes (tensors under torch.jit.trace) by their class,
    not by asking torch for its tracing state on every call (a C call of every training
    step). Oracle: torch.nn.RMSNorm's step, whose module call asks once."""
    import cProfile
    import pstats

    def asked(module, *inputs):
        def step():
            output = module(*inputs)
            (output[0] if isinstance(output, tuple) else output).sum().backward()

        step()  # (builds the cached calls)
        profile = cProfile.Profile()
        profile.runcall(step)
        return sum(stats[1] for key, stats in pstats.Stats(profile).stats.items() if "_get_tracing_state" in key[2])

    x, residual = torch.randn(2, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    assert asked(nt.FusedAddRMSNorm(64), x, residual) == asked(nn.RMSNorm(64), x)
