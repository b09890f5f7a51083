"""convert() on the norm layers of real models, against the original classes as oracles.

transformers' classes are imported and its models built from config with random weights.
torchvision's and timm's cannot be imported here (the index's torchvision is a CUDA build
that fails beside torch's CPU wheel, and timm needs it): ``tests/mirrored_norms.py`` holds
faithful copies of their classes, taken from their source. Each comparison runs the
original model and its converted copy on the same input, in training and evaluation mode,
and compares outputs, input gradients and every parameter's gradient.
"""

import copy
import re
import warnings

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import (  # noqa: E402
    TimmGroupNorm, TimmLayerNorm, TimmLayerNorm2d, TimmLayerNorm2dFp32, TimmLayerNormFp32, TorchvisionLayerNorm2d,
    VitLike, convnext_like,
)

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def convert_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these models may leave a norm unconverted
        return nt.convert(model)


def converted_copy(original):
    return convert_quietly(copy.deepcopy(original))


def plain_call(model, x):
    return model(x)


def causal_lm_call(model, x):
    return model(inputs_embeds=x).logits


def run(model, x, seed, call):
    """Output, input gradient and parameter gradients of ``call(model, x)`` for a random
    output gradient drawn from ``seed``."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = call(model, x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    (y * grad_y).sum().backward()
    return y, x.grad, {name: p.grad for name, p in model.named_parameters()}


def assert_same_numbers(original, converted, x, tolerance, call=plain_call):
    """Outputs, input gradients and parameter gradients, in training and evaluation mode;
    ``tolerance`` None means to the bit."""
    for mode in ("train", "eval"):
        original.train(mode == "train")
        converted.train(mode == "train")
        expected, actual = run(original, x, 2, call), run(converted, x, 2, call)
        for what, e, a in (("output", expected[0], actual[0]), ("input grad", expected[1], actual[1])):
            assert a.dtype == e.dtype, f"{mode} {what}"
            if tolerance is None:
                assert torch.equal(a, e), f"{mode} {what}: {(a - e).abs().max()}"
            else:
                torch.testing.assert_close(a, e, **tolerance, msg=lambda m: f"{mode} {what}: {m}")
        assert list(actual[2]) == list(expected[2])
        for name, e in expected[2].items():
            a = actual[2][name]
            if e is None or a is None:  # a parameter the output does not depend on
                assert a is e, f"{mode} grad of {name}"
            elif tolerance is None:
                assert torch.equal(a, e), f"{mode} grad of {name}: {(a - e).abs().max()}"
            else:
                torch.testing.assert_close(a, e, **tolerance, msg=lambda m: f"{mode} grad of {name}: {m}")


def random_parameters(model, seed=0):
    """Move affine parameters away from their ones/zeros start, so a dropped weight shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.1)
    return model


def unconvert_exactly(converted, original):
    """``unconvert(converted)``, which must warn of nothing and give back the original's
    classes, module for module, holding the converted model's very Parameter objects."""
    parameters = list(converted.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        restored = nt.unconvert(converted)
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    assert all(a is b for a, b in zip(restored.parameters(), parameters, strict=True))
    return restored


def types_in(model):
    return sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})


# ---------------------------------------------------------------------------------------
# torchvision and timm (mirrored)

VISION_MODELS = {
    "torchvision_convnext": lambda: convnext_like(TorchvisionLayerNorm2d),
    "timm_convnext": lambda: convnext_like(TimmLayerNorm2d, block_norm=TimmLayerNorm),
    "timm_vit": lambda: VitLike(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(VISION_MODELS))
def test_vision_models_convert_every_norm_and_keep_outputs_and_gradients(name, dtype):
    torch.manual_seed(0)
    original = random_parameters(VISION_MODELS[name]()).to(dtype)
    converted = converted_copy(original)
    assert set(types_in(converted)) <= {"LayerNorm", "LayerNorm2d"}, types_in(converted)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    assert_same_numbers(original, converted, x, TOLERANCE[dtype])


@pytest.mark.parametrize("original_class", [TorchvisionLayerNorm2d, TimmLayerNorm2d])
def test_convnext_layer_norm_2d_becomes_channels_first_layer_norm_without_permutes(original_class):
    original = random_parameters(original_class(6, eps=1e-6))
    converted = convert_quietly(original)  # the original object is left as it was
    assert type(converted) is nt.LayerNorm2d
    assert converted._spec.pattern == "b [c] h w" and converted._spec.params == "c"
    assert converted.eps == 1e-6 and converted.weight is original.weight and converted.bias is original.bias
    assert list(converted.state_dict()) == ["weight", "bias"]
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, 5, 4).to(memory_format=memory_format)
        torch.testing.assert_close(converted(x), original(x), **TOLERANCE[torch.float32])
        with nt.use_path("native"):  # torch's own ops: the original's, to the bit
            assert torch.equal(converted(x), original(x))
    x = torch.randn(2, 6, 5, 4, dtype=torch.bfloat16)
    assert torch.equal(converted(x), original(x))


@pytest.mark.parametrize("original", [
    lambda: TorchvisionLayerNorm2d(6, elementwise_affine=False), lambda: TimmLayerNorm2d(6, affine=False),
    lambda: TorchvisionLayerNorm2d(6, bias=False),
], ids=["torchvision_no_affine", "timm_no_affine", "torchvision_no_bias"])
def test_layer_norm_2d_without_affine_parameters_keeps_their_absence(original):
    original = random_parameters(original())
    converted = convert_quietly(original)
    assert type(converted) is nt.LayerNorm2d and list(converted.state_dict()) == list(original.state_dict())
    assert_same_numbers(original, converted, torch.randn(2, 6, 3, 4), TOLERANCE[torch.float32])


def test_layer_norm_2d_refuses_input_without_its_channels_as_torch_does():
    with pytest.raises(RuntimeError, match=r"expects input of shape \(N, 6, H, W\), got \(2, 5, 3, 3\)"):
        nt.LayerNorm2d(6)(torch.randn(2, 5, 3, 3))


def test_converted_model_keeps_state_dict_keys_loads_both_ways_and_shares_parameters():
    torch.manual_seed(0)
    model = random_parameters(convnext_like(TimmLayerNorm2d, block_norm=TimmLayerNorm))
    keys = list(model.state_dict())
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = nt.convert(model)
    assert converted is model and list(converted.state_dict()) == keys
    assert all(a is b for a, b in zip(converted.parameters(), parameters))  # the same objects
    converted(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()  # the optimizer built before the conversion trains the converted model
    assert not torch.equal(converted.state_dict()["5.0.weight"], before["5.0.weight"])
    fresh = convnext_like(TimmLayerNorm2d, block_norm=TimmLayerNorm)
    fresh.load_state_dict(converted.state_dict())  # normlab -> original
    fresh_converted = converted_copy(convnext_like(TimmLayerNorm2d, block_norm=TimmLayerNorm))
    fresh_converted.load_state_dict(fresh.state_dict())  # original -> normlab
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh_converted(x), fresh(x), **TOLERANCE[torch.float32])


# ---------------------------------------------------------------------------------------
# Subclasses of torch.nn norms


class TaggedBatchNorm(torch.nn.BatchNorm2d):
    """A user subclass that only adds an attribute: torch.nn's forward."""

    def __init__(self, channels):
        super().__init__(channels)
        self.tag = "stem"


class ContiguousBatchNorm(torch.nn.BatchNorm2d):
    """A forward of its own that computes torch.nn's numbers."""

    def forward(self, x):
        return super().forward(x.contiguous())


class RunningStatsBatchNorm(torch.nn.BatchNorm2d):
    """Normalizes with the running statistics in training too: not torch.nn's numbers."""

    def forward(self, x):
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              False, 0.0, self.eps)


class ScaledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class UnbiasedLayerNorm2d(torch.nn.LayerNorm):
    """Permutes like ConvNeXt's LayerNorm2d, but with the unbiased variance."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
        return ((x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias).permute(0, 3, 1, 2)


@pytest.mark.parametrize("subclass", [TaggedBatchNorm, ContiguousBatchNorm])
def test_batch_norm_subclass_computing_torch_nn_numbers_is_converted_with_attributes_and_running_stats(subclass):
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), subclass(4)).double()
    original[1].tag = "stem"
    converted = converted_copy(original)
    assert type(converted[1]) is nt.BatchNorm2d and converted[1].tag == "stem"
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert_same_numbers(original, converted, x, TOLERANCE[torch.float64])
    for name, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("original_class, twin_class", [
    (lambda c: TimmGroupNorm(c, num_groups=4), nt.GroupNorm), (TimmLayerNorm, nt.LayerNorm),
    (TimmLayerNormFp32, nt.Float32LayerNorm),
], ids=["timm_group_norm", "timm_layer_norm", "timm_layer_norm_fp32"])
def test_subclass_with_a_forward_of_its_own_that_computes_torch_nn_numbers_is_converted(original_class, twin_class):
    original = random_parameters(original_class(8))
    converted = converted_copy(original)
    assert type(converted) is twin_class
    x = torch.randn(3, 8, 4) if twin_class is nt.GroupNorm else torch.randn(3, 5, 8)
    assert_same_numbers(original, converted, x, TOLERANCE[torch.float32])


@pytest.mark.parametrize("original_class, twin_class, shape", [
    (TimmLayerNormFp32, nt.Float32LayerNorm, (3, 5, 48)), (TimmLayerNorm2dFp32, nt.Float32LayerNorm2d, (2, 48, 3, 4)),
], ids=["layer_norm_fp32", "layer_norm_2d_fp32"])
@pytest.mark.parametrize("x_dtype, weight_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
], ids=["bfloat16", "float16", "bfloat16_on_float32_weight", "float16_on_float32_weight", "float32_on_bfloat16_weight"])
def test_timms_fp32_layer_norms_converted_still_compute_half_precision_in_float32(x_dtype, weight_dtype,
                                                                                   original_class, twin_class, shape):
    """timm's LayerNormFp32 and LayerNorm2dFp32 upcast input, weight and bias to float32 and
    cast back once: a half-precision model (or float32 weights under bfloat16 activations)
    gets its outputs, and its weights gradients to float32 accuracy, where torch's bfloat16
    layer norm rounds them; the converted layer (still an nn.LayerNorm) computes the same bits."""
    original = random_parameters(original_class(48)).to(weight_dtype)
    converted = converted_copy(original)
    assert type(converted) is twin_class and isinstance(converted, torch.nn.LayerNorm)
    assert_same_numbers(original, converted, (torch.randn(shape) * 2 + 1).to(x_dtype), None)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("original_class, twin_class, shape", [
    (lambda: TimmLayerNormFp32(48, affine=False), nt.Float32LayerNorm, (3, 5, 48)),
    (lambda: TimmLayerNorm2dFp32(48, affine=False), nt.Float32LayerNorm2d, (2, 48, 3, 4)),
    (lambda: pytest.importorskip("diffusers.models.normalization").FP32LayerNorm(48, elementwise_affine=False),
     nt.Float32LayerNorm, (3, 5, 48)),
], ids=["layer_norm_fp32", "layer_norm_2d_fp32", "diffusers_fp32_layer_norm"])
def test_fp32_layer_norms_without_parameters_converted_still_compute_half_precision_in_float32(
        x_dtype, original_class, twin_class, shape):
    """diffusers' FP32LayerNorm(..., elementwise_affine=False) (Wan's, HunyuanVideo's norms)
    upcasts as timm's does; without parameters its forward is torch's own bfloat16 layer norm
    to the bit, but not its input gradient (nor its float16 forward): it became a plain
    LayerNorm, one unit off in about a third of the input gradient's elements."""
    original = original_class()
    converted = converted_copy(original)
    assert type(converted) is twin_class
    assert_same_numbers(original, converted, (torch.randn(shape) * 2 + 1).to(x_dtype), None)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_convert_inside_no_grad_or_inference_mode_makes_the_decisions_it_makes_outside(mode):
    """The probes that compare input gradients (an upcasting layer norm; recipes that give
    one output) ran on inference tensors inside torch.inference_mode(), failed, and took
    timm's LayerNormFp32 for a plain LayerNorm there."""
    normalization = pytest.importorskip("diffusers.models.normalization")

    def norms():
        return [TimmLayerNormFp32(16), TimmLayerNormFp32(16, affine=False), normalization.MochiRMSNorm(16, 1e-6),
                normalization.RMSNorm(16, 1e-6, elementwise_affine=False)]

    def decisions(models):
        return [(type(m).__name__, getattr(m, "casting", None)) for m in map(convert_quietly, models)]

    expected = decisions(norms())
    assert expected == [("Float32LayerNorm", None), ("Float32LayerNorm", None), ("RMSNorm", "mochi"),
                        ("UnweightedRMSNorm", "diffusers")]
    with mode():
        assert decisions(norms()) == expected


def test_a_layer_norm_subclass_calling_torchs_half_precision_layer_norm_stays_a_plain_layer_norm():
    original = TimmLayerNorm(48, affine=False)
    assert type(converted_copy(original)) is nt.LayerNorm
    assert_same_numbers(original, converted_copy(original), (torch.randn(3, 5, 48) * 2 + 1).to(torch.bfloat16), None)


@pytest.mark.parametrize("original_class, shape", [
    (TimmLayerNormFp32, (3, 5, 48)), (TimmLayerNorm2dFp32, (2, 48, 3, 4)),
], ids=["layer_norm_fp32", "layer_norm_2d_fp32"])
def test_timms_fp32_layer_norms_converted_script_and_trace_as_the_originals_do(original_class, shape):
    """timm's fp32 layer norms compile with torch.jit.script (timm models script) and trace
    with fx as the root module; their converted twins do too, with the originals' numbers."""
    original = random_parameters(original_class(48))
    converted = converted_copy(original)
    for x in (torch.randn(shape), torch.randn(shape).to(torch.bfloat16)):
        for tool in (torch.jit.script, torch.fx.symbolic_trace):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # (torch.jit.script's)
                expected, actual = tool(original)(x), tool(converted)(x)
            assert actual.dtype == expected.dtype
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


class AnyRankBatchNorm(torch.nn.BatchNorm1d):
    """torch.nn's forward, with a rank check that also takes (N, C, H, W)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected 2D or more input (got {input.dim()}D input)")


class LargeBatchNorm(torch.nn.BatchNorm2d):
    """torch.nn's forward, with a check that refuses batches of fewer than 4 samples."""

    def _check_input_dim(self, input):
        super()._check_input_dim(input)
        if input.shape[0] < 4:
            raise ValueError("LargeBatchNorm takes batches of 4 samples or more")


class NoBatchInstanceNorm(torch.nn.InstanceNorm2d):
    """torch.nn's forward, with an unbatched input normalized its own way."""

    def _handle_no_batch_input(self, input):
        return super()._handle_no_batch_input(input) * 2


class ExpWeightLayerNorm(torch.nn.LayerNorm):
    """torch.nn's forward, with the weight a property: the exponential of a parameter."""

    def __init__(self, channels):
        super().__init__(channels)
        del self.weight
        self.log_weight = torch.nn.Parameter(torch.full((channels,), 0.5))

    @property
    def weight(self):
        return self.log_weight.exp()


class WideEpsBatchNorm(torch.nn.BatchNorm2d):
    """torch.nn's forward, with eps a property."""

    @property
    def eps(self):
        return 0.5

    @eps.setter
    def eps(self, value):
        pass


@pytest.mark.parametrize("original_class, x", [
    (AnyRankBatchNorm, torch.randn(3, 4, 5, 5)), (LargeBatchNorm, torch.randn(2, 4, 3, 3)),
    (NoBatchInstanceNorm, torch.randn(4, 3, 3)), (ExpWeightLayerNorm, torch.randn(3, 4)),
    (WideEpsBatchNorm, torch.randn(3, 4, 2, 2)),
], ids=["takes_another_rank", "refuses_small_batches", "unbatched_input_its_own_way", "weight_property",
        "eps_property"])
def test_a_subclass_redefining_what_torch_nn_forward_reads_is_left_alone_and_computes_as_before(original_class, x):
    """A twin's class has torch.nn's _check_input_dim, _handle_no_batch_input, weight and
    eps, not the subclass's: it would refuse what the original computes, compute what it
    refuses, or compute another norm. Oracle: the original module on the same input."""
    original = original_class(4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        converted = nt.convert(torch.nn.Sequential(copy.deepcopy(original)))[0]
    outcomes = []
    for module in (original, converted):
        try:
            outcomes.append(module(x))
        except ValueError as error:
            outcomes.append(str(error))
    assert type(outcomes[1]) is type(outcomes[0])
    if isinstance(outcomes[0], str):
        assert outcomes[1] == outcomes[0]
    else:
        torch.testing.assert_close(outcomes[1], outcomes[0])
    assert type(converted) is original_class
    assert [original_class.__name__ in str(w.message) for w in record] == [True]


def test_norms_that_compute_something_else_are_left_alone_with_one_warning_naming_them():
    model = torch.nn.Sequential(ScaledLayerNorm(4), ScaledLayerNorm(4), torch.nn.LayerNorm(4),
                                UnbiasedLayerNorm2d(4), FakeRMSNorm(4), RunningStatsBatchNorm(4))
    originals = list(model)
    with pytest.warns(UserWarning) as record:
        nt.convert(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "left 5 norm layer(s) unconverted" in message
    for listed in ("ScaledLayerNorm (0, 1)", "UnbiasedLayerNorm2d (3)", "FakeRMSNorm (4)", "RunningStatsBatchNorm (5)"):
        assert listed in message
    assert [m is o for m, o in zip(model, originals)] == [True, True, False, True, True, True]
    assert type(model[2]) is nt.LayerNorm


def test_a_norm_holding_its_own_parameters_beside_parts_that_are_no_norms_is_named_in_the_warning():
    # README: "any layer named ...Norm... that normlab does not recognize is left alone; one
    # warning per call lists them". PyG's HeteroBatchNorm holds its weight and running
    # statistics beside an aggregation. Blocks named so whose parameters lie in their parts
    # are not norms: diffusers' AdaLayerNormZero holds the nn.LayerNorm it calls (converted
    # on its own), Wav2Vec2's NoLayerNormConvLayer a convolution alone
    geometric = pytest.importorskip("torch_geometric.nn.norm")
    diffusers = pytest.importorskip("diffusers.models.normalization")
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2NoLayerNormConvLayer

    model = torch.nn.ModuleDict(dict(hetero=geometric.HeteroBatchNorm(8, 3), zero=diffusers.AdaLayerNormZero(16),
                                     conv=Wav2Vec2NoLayerNormConvLayer(transformers.Wav2Vec2Config(), layer_id=1)))
    with pytest.warns(UserWarning) as record:
        nt.convert(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "left 1 norm layer(s) unconverted" in message and "HeteroBatchNorm (hetero)" in message
    assert type(model["zero"].norm) is nt.LayerNorm


def test_a_norm_whose_only_part_is_its_modulation_and_which_normalizes_with_its_own_eps_is_named_in_the_warning():
    # diffusers' AdaGroupNorm (UNet2DConditionModel's resnet_time_scale_shift="ada_group")
    # calls F.group_norm(x, num_groups, eps=self.eps) itself; its one part is the Linear
    # of its modulation, so it was left alone without a word
    diffusers = pytest.importorskip("diffusers.models.normalization")
    model = torch.nn.ModuleDict(dict(ada=diffusers.AdaGroupNorm(8, 16, 4), single=diffusers.AdaLayerNormSingle(16)))
    with pytest.warns(UserWarning) as record:
        nt.convert(model)
    assert len(record) == 1
    assert "left 1 norm layer(s) unconverted" in str(record[0].message)
    assert "AdaGroupNorm (ada)" in str(record[0].message)


def test_a_norm_named_with_a_lowercase_norm_is_named_in_the_warning():
    # diffusers' WanRMS_norm and QwenImageRMS_norm (the RMS norms of Wan's and Qwen-Image's
    # VAEs: F.normalize over the channels, times sqrt(dim) and gamma) were left alone without
    # a word, as their names hold no "Norm"; transformers' AutoformerLayernorm, whose one
    # part is the nn.LayerNorm it calls, is still looked into
    wan = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")
    qwen = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_qwenimage")
    autoformer = pytest.importorskip("transformers.models.autoformer.modeling_autoformer")
    transformers = pytest.importorskip("transformers")
    model = torch.nn.ModuleDict(dict(wan=wan.WanRMS_norm(8), qwen=qwen.QwenImageRMS_norm(8, images=False),
                                     autoformer=autoformer.AutoformerLayernorm(transformers.AutoformerConfig(d_model=8))))
    x = torch.randn(2, 8, 3, 4, 4)
    want = model["wan"](x[:, :, 0]), model["qwen"](x)
    with pytest.warns(UserWarning) as record:
        nt.convert(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "left 2 norm layer(s) unconverted" in message
    assert "WanRMS_norm (wan)" in message and "QwenImageRMS_norm (qwen)" in message
    assert type(model["autoformer"].layernorm) is nt.LayerNorm
    assert torch.equal(model["wan"](x[:, :, 0]), want[0]) and torch.equal(model["qwen"](x), want[1])


@pytest.mark.slow
def test_convert_keeps_the_warnings_of_its_probes_dtype_mixes_from_the_caller():
    # diffusers' Krea2RMSNorm calls F.rms_norm on a float32 copy with its own weight: on a
    # probe's bfloat16 weight torch warns "Mismatch dtype between input and weight", a mix
    # the model never runs; convert() printed it. torch gives it once per process, so the
    # conversion runs in a fresh one
    pytest.importorskip("diffusers.models.transformers.transformer_krea2")
    import json
    import subprocess
    import sys

    script = ("import json, warnings, torch, normlab.torch as nt\n"
              "from diffusers.models.transformers.transformer_krea2 import Krea2RMSNorm\n"
              "with warnings.catch_warnings(record=True) as record:\n"
              "    warnings.simplefilter('always')\n"
              "    nt.convert(torch.nn.ModuleDict(dict(norm=Krea2RMSNorm(16))))\n"
              "print(json.dumps([str(w.message) for w in record]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(messages) == 1, messages  # normlab's own: the norm it leaves alone, by name
    assert "Krea2RMSNorm (norm)" in messages[0]


@pytest.mark.slow
def test_convert_leaves_torch_s_once_per_process_warnings_to_the_model_s_own_calls():
    # the probes above, by ignoring torch's "Mismatch dtype between input and weight" (given
    # once per process), used it up: the model's own bfloat16 call of Krea2RMSNorm, a mix it
    # does run and which convert leaves alone, then warned nothing. Oracle: the same call in
    # a process that never converted
    pytest.importorskip("diffusers.models.transformers.transformer_krea2")
    import json
    import subprocess
    import sys

    script = ("import json, sys, warnings, torch, normlab.torch as nt\n"
              "from diffusers.models.transformers.transformer_krea2 import Krea2RMSNorm\n"
              "model = torch.nn.ModuleDict(dict(norm=Krea2RMSNorm(16)))\n"
              "if sys.argv[1] == 'convert':\n"
              "    with warnings.catch_warnings():\n"
              "        warnings.simplefilter('ignore')\n"
              "        nt.convert(model)\n"
              "model = model.to(torch.bfloat16)\n"
              "with warnings.catch_warnings(record=True) as record:\n"
              "    warnings.simplefilter('always')\n"
              "    model['norm'](torch.randn(2, 16, dtype=torch.bfloat16))\n"
              "print(json.dumps([str(w.message) for w in record]))\n")
    warned = {}
    for run in ("plain", "convert"):
        result = subprocess.run([sys.executable, "-c", script, run], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        warned[run] = json.loads(result.stdout.strip().splitlines()[-1])
    assert any("Mismatch dtype" in message for message in warned["plain"]), warned
    assert warned["convert"] == warned["plain"]


def test_converting_a_converted_model_changes_nothing_and_warns_nothing():
    model = converted_copy(VitLike())
    modules = list(model.modules())
    assert list(converted_copy(model).modules()).__len__() == len(modules)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(a is b for a, b in zip(nt.convert(model).modules(), modules))


# ---------------------------------------------------------------------------------------
# Lazy norms


def test_lazy_norms_become_normlab_twins_at_their_first_forward():
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LazyBatchNorm2d(), torch.nn.Flatten(2),
                                   torch.nn.LazyInstanceNorm1d(affine=True, track_running_stats=True)).double()

    original, converted = model(), convert_quietly(model())  # a lazy module cannot be deep-copied
    # nothing to convert before the channels are known: still torch's lazy module, with the twin's forward
    assert isinstance(converted[1], torch.nn.LazyBatchNorm2d) and converted[1].has_uninitialized_params()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    for step in range(3):
        torch.testing.assert_close(converted(x * (step + 1)), original(x * (step + 1)), **TOLERANCE[torch.float64])
        assert (type(converted[1]), type(converted[3])) == (nt.BatchNorm2d, nt.InstanceNorm1d)
        assert (type(original[1]), type(original[3])) == (torch.nn.BatchNorm2d, torch.nn.InstanceNorm1d)
    for name, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, **TOLERANCE[torch.float64])
    assert_same_numbers(original, converted, x, TOLERANCE[torch.float64])


@pytest.mark.parametrize("lazy, twin", [(torch.nn.LazyBatchNorm1d, nt.BatchNorm1d),
                                        (torch.nn.LazyInstanceNorm1d, nt.InstanceNorm1d)])
def test_a_lazy_norm_left_lazy_takes_a_mask_at_its_first_forward(lazy, twin):
    # its first forward was torch.nn's, which has no mask: TypeError from the lazy hook
    kwargs = dict(affine=True, track_running_stats=True)
    converted = convert_quietly(lazy(**kwargs).double())
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    lengths = (5, 3)
    mask = torch.arange(5) < torch.tensor(lengths)[:, None, None]  # (2, 1, 5): the second sample padded
    y = converted(x, mask=mask)
    assert type(converted) is twin
    # torch.nn's module on the data with the padding removed: batch norm over the real frames of
    # every sample, instance norm over each sample's own
    reference = getattr(torch.nn, twin.__name__)(3, **kwargs).double()
    if twin is nt.BatchNorm1d:
        frames = torch.cat([x[i, :, :n].t() for i, n in enumerate(lengths)])
        wants = reference(frames).split(lengths)
    else:
        wants = [reference(x[i:i + 1, :, :n])[0].t() for i, n in enumerate(lengths)]
    for i, (n, want) in enumerate(zip(lengths, wants)):
        torch.testing.assert_close(y[i, :, :n].t(), want, **TOLERANCE[torch.float64])
    if twin is nt.BatchNorm1d:  # (the reference's instance norm ran once per sample: its running statistics twice)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(converted, name), getattr(reference, name), **TOLERANCE[torch.float64])


def test_a_lazy_norm_left_lazy_is_no_torch_nn_norm_instance_until_its_first_forward():
    # torchvision's init loop (isinstance(m, nn.BatchNorm2d): constant_(m.weight, 1)) skips torch's
    # uninitialized lazy norm; with the twin among its classes it met an UninitializedParameter
    model = convert_quietly(torch.nn.Sequential(torch.nn.LazyBatchNorm2d(), torch.nn.LazyInstanceNorm1d()))
    assert not isinstance(model[0], torch.nn.BatchNorm2d) and not isinstance(model[1], torch.nn.InstanceNorm1d)
    assert isinstance(model[0], torch.nn.LazyBatchNorm2d) and isinstance(model[1], torch.nn.LazyInstanceNorm1d)
    model[0](torch.randn(2, 3, 4, 4))
    assert type(model[0]) is nt.BatchNorm2d and isinstance(model[0], torch.nn.BatchNorm2d)


def test_a_lazy_norm_left_lazy_whose_forward_is_called_without_its_hook_raises_torchs_error():
    # module.forward(x) skips torch's lazy hook: the module is still lazy, and torch says so
    converted = convert_quietly(torch.nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="uninitialized parameter"):
        converted.forward(torch.randn(2, 3))


def test_an_initialized_lazy_norm_is_converted_at_once():
    lazy = torch.nn.LazyBatchNorm1d()
    lazy(torch.randn(4, 3))
    assert type(nt.convert(lazy)) is nt.BatchNorm1d


# ---------------------------------------------------------------------------------------
# transformers' RMS norms

try:
    import transformers
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
except ImportError:  # the test extra installs it
    transformers = GemmaRMSNorm = LlamaRMSNorm = MistralRMSNorm = Qwen2RMSNorm = T5LayerNorm = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers: pip install '.[test]'")


class HiddenScaler(torch.nn.Module):
    """LLaMA's RMS norm under another name, written another way."""

    def __init__(self, size, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.mean(h.pow(2), dim=-1, keepdim=True).add(self.eps).rsqrt()
        return self.weight * h.type_as(x)


class FakeRMSNorm(torch.nn.Module):
    """Named like an RMS norm, with its attributes, but it subtracts the mean."""

    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


RMS_CLASSES = [(LlamaRMSNorm, "llama", 0.0), (MistralRMSNorm, "llama", 0.0), (Qwen2RMSNorm, "llama", 0.0),
               (GemmaRMSNorm, "gemma", 1.0), (T5LayerNorm, "t5", 0.0), (HiddenScaler, "llama", 0.0)]
RMS_IDS = ["llama", "mistral", "qwen2", "gemma", "t5", "hidden_scaler"]
# (input dtype, weight dtype): as loaded in float32, a bfloat16 model, and bfloat16 activations
# on float32 weights (mixed precision), where the recipes round differently
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=["float32", "bfloat16", "bfloat16_on_float32_weight"])
@needs_transformers
@pytest.mark.parametrize("original_class, casting, offset", RMS_CLASSES, ids=RMS_IDS)
def test_rms_norms_are_recognized_by_what_they_compute_and_match_to_the_bit(original_class, casting, offset,
                                                                            dtypes):
    x_dtype, weight_dtype = dtypes
    original = random_parameters(original_class(64, eps=1e-6)).to(weight_dtype)
    converted = convert_quietly(original)
    assert type(converted) is nt.RMSNorm
    assert (converted.casting, converted.weight_offset, converted.eps) == (casting, offset, 1e-6)
    assert converted.weight is original.weight and list(converted.state_dict()) == ["weight"]
    x = torch.randn(3, 5, 64).to(x_dtype)
    assert_same_numbers(original, converted, x, None)


@needs_transformers
@pytest.mark.parametrize("original_class, casting, offset", RMS_CLASSES[:5:2], ids=["llama", "qwen2", "t5"])
def test_recipes_agree_with_transformers_in_float64(original_class, casting, offset):
    # transformers' classes compute float64 input in float32; the recipes keep float64
    original = random_parameters(original_class(64, eps=1e-6)).double()
    converted = converted_copy(original)
    assert_same_numbers(original, converted, torch.randn(3, 64, dtype=torch.float64), dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("dtypes", DTYPES, ids=["float32", "bfloat16", "bfloat16_on_float32_weight"])
@needs_transformers
@pytest.mark.parametrize("original_class", [LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm], ids=["llama", "gemma", "t5"])
def test_recipes_on_the_kernels_agree_with_transformers_to_float_rounding(original_class, dtypes):
    x_dtype, weight_dtype = dtypes
    original = random_parameters(original_class(64, eps=1e-6)).to(weight_dtype)
    converted = converted_copy(original)
    low = torch.bfloat16 in dtypes
    with nt.use_path("kernel"):
        assert_same_numbers(original, converted, torch.randn(4, 64).to(x_dtype),
                            dict(rtol=1.6e-2, atol=1e-2) if low else dict(rtol=1e-5, atol=1e-6))


def test_an_rms_norm_lookalike_that_computes_something_else_is_left_alone():
    fake = FakeRMSNorm(8)
    with pytest.warns(UserWarning, match=r"FakeRMSNorm \(<model>\)"):
        assert nt.convert(fake) is fake


def tiny_causal_lm(kind):
    config_class = {"llama": transformers.LlamaConfig, "gemma": transformers.GemmaConfig}[kind]
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    return random_parameters(transformers.AutoModelForCausalLM.from_config(config))


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_tiny_causal_lms_from_config_give_the_same_logits_and_gradients_to_the_bit(kind, dtype):
    original = tiny_causal_lm(kind).to(dtype)
    converted = converted_copy(original)
    norms = [m for m in converted.modules() if isinstance(m, nt.RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and {m.casting for m in norms} == {kind}
    assert not [m for m in converted.modules() if "RMSNorm" in type(m).__name__ and not isinstance(m, nt.RMSNorm)]
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 7, 32).to(dtype)
    assert_same_numbers(original, converted, x, None, call=causal_lm_call)


@needs_transformers
def test_tiny_llama_in_float64_agrees_to_float32_rounding():
    original = tiny_causal_lm("llama").double()
    converted = converted_copy(original)
    assert_same_numbers(original, converted, torch.randn(2, 7, 32, dtype=torch.float64),
                        dict(rtol=1e-4, atol=1e-5), call=causal_lm_call)


@needs_transformers
def test_converting_a_llama_in_a_process_without_a_process_group_walks_its_modules_once(monkeypatch):
    """convert() looked for fully_shard's parameters wherever torch.distributed.fsdp was
    imported (transformers imports it), and walked a transformers model four more times to
    keep its norms' original init: half as many Python calls again as before either, on a
    model that never touched torch.distributed. fully_shard needs a process group."""
    import torch.distributed.fsdp  # noqa: F401  (as transformers imports it)

    assert not torch.distributed.is_initialized()
    model = tiny_causal_lm("llama")
    walks = []
    modules = torch.nn.Module.modules
    monkeypatch.setattr(torch.nn.Module, "modules", lambda self: walks.append(self) or modules(self))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nt.convert(model)
    assert walks == [model] and isinstance(model.model.norm, nt.RMSNorm)


# ---------------------------------------------------------------------------------------
# RMSNorm's casting argument


def test_rms_norm_without_casting_keeps_torch_nn_semantics_in_bfloat16():
    reference = random_parameters(torch.nn.RMSNorm(32, eps=1e-6)).bfloat16()
    twin = converted_copy(reference)
    assert twin.casting is None
    x = torch.randn(4, 32).bfloat16()
    assert torch.equal(twin(x), reference(x))


def test_gemma_weight_offset_starts_the_weight_at_zero_and_is_in_the_repr():
    norm = nt.RMSNorm(4, eps=1e-6, casting="gemma", weight_offset=1.0)
    assert norm.weight.tolist() == [0.0] * 4
    assert "casting='gemma', weight_offset=1.0" in repr(norm)
    x = torch.randn(3, 4)
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (4,), eps=1e-6))


def test_an_unknown_casting_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="casting must be None .* 'llama', 'gemma', 't5', 'none'"):
        nt.RMSNorm(4, casting="bf16")


@pytest.mark.parametrize("casting", ["llama", "gemma", "t5", "imagegpt"])
@pytest.mark.parametrize("shape", [(2, 1), (2, 5), (32,)])
def test_a_casting_twin_refuses_an_input_that_torch_nn_rms_norm_refuses(casting, shape):
    # the family's own operations would broadcast a (2, 1) input against the weight
    # without a word; the twin raises torch.nn.RMSNorm's error for it, as for any misfit
    twin = nt.RMSNorm((4, 8), eps=1e-6, casting=casting)
    x = torch.randn(shape)
    with pytest.raises((RuntimeError, ValueError)) as expected:
        torch.nn.RMSNorm((4, 8), eps=1e-6)(x)
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        twin(x)
    with torch.no_grad():
        twin.weight.data = torch.ones(8)  # a weight that no longer fits (torch.nn: its own error)
        x = torch.randn(3, 4, 8)
        with pytest.raises(RuntimeError) as expected:
            torch.nn.functional.rms_norm(x, (4, 8), twin.weight, 1e-6)
        with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
            twin(x)


def _norm_with_variance_epsilon(name):
    """transformers' norms that keep their epsilon as ``variance_epsilon``, random weights."""
    if name == "LlamaRMSNorm":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as cls
    elif name == "T5LayerNorm":
        from transformers.models.t5.modeling_t5 import T5LayerNorm as cls
    elif name == "DebertaLayerNorm":
        from transformers.models.deberta.modeling_deberta import DebertaLayerNorm as cls
    else:
        from tests.hf_classes import mamba_gated_norm

        return random_parameters(mamba_gated_norm(16, 8)[0])
    return random_parameters(cls(16))


@needs_transformers
@pytest.mark.parametrize("name, twin", [("LlamaRMSNorm", "RMSNorm"), ("T5LayerNorm", "RMSNorm"),
                                        ("DebertaLayerNorm", "RecipeLayerNorm"), ("MambaRMSNormGated", "GatedRMSNorm")])
def test_variance_epsilon_set_after_convert_changes_the_converted_norm_as_it_changes_the_original(name, twin):
    """transformers' norms read variance_epsilon on each call; a converted one kept it as a
    plain attribute beside its eps and ignored it: code written for the original class
    (norm.variance_epsilon = ...) changed nothing. unconvert gives the value back."""
    original = _norm_with_variance_epsilon(name)
    converted = converted_copy(torch.nn.ModuleDict(dict(norm=original)))["norm"]
    assert type(converted).__name__ == twin
    original.variance_epsilon = converted.variance_epsilon = 0.5
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [torch.randn(3, 16).to(dtype) * 0.1 for _ in range(2 if twin == "GatedRMSNorm" else 1)]
        with torch.no_grad():  # (the gated twin runs float32 on the kernels: one rounding from the original's)
            torch.testing.assert_close(converted(*inputs), original(*inputs), rtol=1e-5, atol=0)


@needs_transformers
def test_unconvert_gives_a_llama_its_norms_epsilons_as_they_were_set_after_convert():
    model = nt.convert(tiny_causal_lm("llama"))
    layer = model.model.layers[0]
    layer.input_layernorm.variance_epsilon = 0.5
    layer.post_attention_layernorm.eps = 0.25  # (the twin's own name for it)
    nt.unconvert(model)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert type(layer.input_layernorm) is type(layer.post_attention_layernorm) is LlamaRMSNorm
    assert (layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon) == (0.5, 0.25)
