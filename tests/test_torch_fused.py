"""Fused torch blocks against the classes they replace: transformers' LlamaRMSNorm,
GemmaRMSNorm, MambaRMSNormGated, FalconH1RMSNormGated and LlamaDecoderLayer (built from
config, random weights), diffusers' AdaLayerNormZero, torch.nn.LayerNorm, and mamba_ssm's
``rms_norm_ref`` mirrored from its source (mamba_ssm needs CUDA and Triton). Gradients
are compared with torch autograd through those classes."""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from normlab.torch import AdaLayerNorm, FusedAddLayerNorm, FusedAddRMSNorm, GatedRMSNorm, RMSNorm, convert  # noqa: E402
from tests.hf_classes import mamba_gated_norm  # noqa: E402
from tests.profiling import autograd_steps_inside, profiled_ops  # noqa: E402


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module


def _grads(outputs, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def _leaves(*shapes, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 2).to(dtype).requires_grad_() for s in shapes]


# float32 runs the kernels (float64 math, one rounding), HF rounds twice in float32:
# within a few ulps. bfloat16 runs the composite with the same recipe: identical bits.
TOLERANCE = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=0, atol=0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_fused_add_rms_norm_matches_hf_norm_after_the_add_with_its_casting_recipe(family, dtype):
    hf = _randomize(LlamaRMSNorm(64, eps=1e-6) if family == "llama" else GemmaRMSNorm(64, eps=1e-6)).to(dtype)
    ours = FusedAddRMSNorm(64, eps=1e-6, casting=family, weight_offset=1.0 if family == "gemma" else 0.0).to(dtype)
    ours.load_state_dict(hf.state_dict())
    x, r = _leaves((3, 5, 64), (3, 5, 64), dtype=dtype)
    y, total = ours(x, r)
    expected_total = x + r
    expected = hf(expected_total)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
    got = _grads([y, total], [x, r, ours.weight])
    want = _grads([expected, expected_total], [x, r, hf.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **(TOLERANCE[dtype] if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                                                 atol=1e-5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_add_layer_norm_matches_torch_layer_norm_of_the_sum(dtype):
    ref = _randomize(torch.nn.LayerNorm(32)).to(dtype)
    ours = FusedAddLayerNorm(32).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x, r = _leaves((4, 6, 32), (4, 6, 32), dtype=dtype)
    y, total = ours(x, r)
    expected = ref(x + r)
    torch.testing.assert_close(y, expected)
    for a, b in zip(_grads([y, total], [x, r, ours.weight, ours.bias]),
                    _grads([expected, x + r], [x, r, ref.weight, ref.bias])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)],
                         ids=["affine", "no_bias", "no_affine"])
def test_fused_add_layer_norm_on_half_input_is_torch_layer_norm_of_the_sum_bit_for_bit(dtype, affine, bias):
    # torch's kernel applies weight and bias in float32 and rounds once; at this width,
    # statistics taken another way differ from it somewhere among 300,000 values
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(1152, elementwise_affine=affine, bias=bias)
    if affine:
        ref = _randomize(ref)
    ref = ref.to(dtype)
    ours = FusedAddLayerNorm(1152, elementwise_affine=affine, bias=bias).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x, r = _leaves((2, 128, 1152), (2, 128, 1152), dtype=dtype)
    y, total = ours(x, r)
    expected = ref(x + r)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    for a, b in zip(_grads([y, total], [x, r, *ours.parameters()]), _grads([expected, x + r], [x, r, *ref.parameters()])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_add_layer_norm_on_half_input_with_float32_weights_is_torch_layer_norm_of_the_sum_bit_for_bit(dtype):
    # a half model that keeps its norms in float32 (transformers' _keep_in_fp32_modules):
    # torch's kernel takes the float32 weight and bias beside half input and accumulates
    # their gradients in the input's dtype; the block gives those bits, as nn.LayerNorm does
    torch.manual_seed(0)
    ref = _randomize(torch.nn.LayerNorm(1152))
    ours = FusedAddLayerNorm(1152)
    ours.load_state_dict(ref.state_dict())
    x, r = _leaves((2, 128, 1152), (2, 128, 1152), dtype=dtype)
    y, total = ours(x, r)
    expected = ref(x + r)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    for a, b in zip(_grads([y, total], [x, r, *ours.parameters()]), _grads([expected, x + r], [x, r, *ref.parameters()])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("params, x_dtype, r_dtype", [
    (torch.float16, torch.float32, torch.float32),  # a .half() block fed float32
    (torch.bfloat16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.float32),  # the sum is float32
    (torch.float64, torch.float32, torch.float32),
    (torch.float32, torch.float64, torch.float64),
])
@pytest.mark.parametrize("with_residual", [True, False], ids=["x, residual", "x alone"])
def test_fused_add_layer_norm_refuses_the_dtype_mixes_nn_layer_norm_refuses_with_its_error(params, x_dtype, r_dtype,
                                                                                            with_residual):
    """torch.nn.LayerNorm's refusal of the mix, its type and its words first, then (as the
    single twins say since 4d329e5) the module, the dtypes and the fix, which torch's words
    alone ("mixed dtype (CPU): all inputs must share same datatype.") do not name. Oracle:
    nn.LayerNorm(x + residual)'s error; the fix it names then runs."""
    ref, ours = torch.nn.LayerNorm(8).to(params), FusedAddLayerNorm(8).to(params)
    x, r = torch.randn(2, 8).to(x_dtype), torch.randn(2, 8).to(r_dtype)
    args, total = ((x, r), x + r) if with_residual else ((x,), x)
    try:
        taken = ref(total)
    except RuntimeError as error:
        assert "mixed dtype" in str(error)
        expected = pytest.ExceptionInfo.from_exc_info((type(error), error, error.__traceback__))
    else:  # (x alone, in the parameters' dtype: taken, as torch.nn's module takes it)
        torch.testing.assert_close(ours(*args), taken, rtol=0, atol=0)
        return
    with pytest.raises(type(expected.value)) as got:
        ours(*args)
    words = str(expected.value)
    advice = str(got.value)[len(words):].removeprefix(" " if words.endswith(".") else ": ")
    assert str(got.value).startswith(words)
    given = "x + residual" if with_residual else "x"
    assert advice == (f"FusedAddLayerNorm holds weight and bias in {params}, but got {given} of dtype {total.dtype} "
                      f"and shape (2, 8); cast {given.replace(' + ', ' and ')} (.to({params})) or the module "
                      f"(module.to({total.dtype}))"), advice
    ours(*(a.to(params) for a in args))  # (the fix it names runs, as torch.nn's module on the cast input)
    ref(total.to(params))

def mamba_rms_norm_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True):
    """mamba_ssm/ops/triton/layernorm_gated.py ``rms_norm_ref``, mirrored line by line
    (einops' rearrange written as reshape)."""
    dtype = x.dtype
    weight = weight.float()
    bias = bias.float() if bias is not None else None
    if upcast:
        x = x.float()
        z = z.float() if z is not None else z
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    if group_size is None:
        rstd = 1 / torch.sqrt((x.square()).mean(dim=-1, keepdim=True) + eps)
        out = (x * rstd * weight) + bias if bias is not None else (x * rstd * weight)
    else:
        x_group = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        rstd = 1 / torch.sqrt((x_group.square()).mean(dim=-1, keepdim=True) + eps)
        out = (x_group * rstd).reshape(x.shape) * weight
        if bias is not None:
            out = out + bias
    if z is not None and norm_before_gate:
        out *= F.silu(z)
    return out.to(dtype)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_gated_rms_norm_matches_mamba_ssm_reference_for_both_gate_positions(norm_before_gate, group_size):
    ours = _randomize(GatedRMSNorm(64, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate))
    x, z = _leaves((2, 7, 64), (2, 7, 64), dtype=torch.float32)
    y = ours(x, z)
    expected = mamba_rms_norm_ref(x, ours.weight, None, z, eps=1e-5, group_size=group_size,
                                  norm_before_gate=norm_before_gate)
    torch.testing.assert_close(y, expected, rtol=2e-6, atol=2e-6)
    for a, b in zip(_grads([y], [x, z, ours.weight]), _grads([expected], [x, z, ours.weight])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_keeps_groups_apart_as_hf_mamba2_and_falcon_h1_do(dtype):
    x, z = _leaves((2, 5, 64), (2, 5, 64), dtype=dtype)
    mamba, group_size = mamba_gated_norm(64, 16)
    mamba = _randomize(mamba).to(dtype)
    ours = GatedRMSNorm(64, eps=1e-6, group_size=group_size, norm_before_gate=False, casting="llama").to(dtype)
    ours.load_state_dict(mamba.state_dict())
    torch.testing.assert_close(ours(x, z), mamba(x, z), **TOLERANCE[dtype])
    for before in (True, False):
        falcon = _randomize(FalconH1RMSNormGated(64, eps=1e-6, n_groups=4, norm_before_gate=before)).to(dtype)
        ours = GatedRMSNorm(64, eps=1e-6, group_size=16, norm_before_gate=before, casting="gemma").to(dtype)
        ours.load_state_dict(falcon.state_dict())
        torch.testing.assert_close(ours(x, z), falcon(x, z), **TOLERANCE[dtype])


def _diffusers_ada_norm():
    diffusers = pytest.importorskip("diffusers.models.normalization")
    return diffusers.AdaLayerNormZero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ada_layer_norm_matches_diffusers_ada_layer_norm_zero(dtype):
    reference = _randomize(_diffusers_ada_norm()(48)).to(dtype)
    ours = AdaLayerNorm(48).to(dtype)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    x, emb = _leaves((3, 10, 48), (3, 48), dtype=dtype)
    got, want = ours(x, emb=emb), reference(x, emb=emb)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)
    inputs_ours = [x, emb, ours.linear.weight, ours.linear.bias]
    inputs_ref = [x, emb, reference.linear.weight, reference.linear.bias]
    for a, b in zip(_grads(got, inputs_ours), _grads(want, inputs_ref)):
        torch.testing.assert_close(a, b, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else
                                            dict(rtol=5e-2, atol=5e-2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", ["layer_norm", "fp32_layer_norm"])
def test_ada_layer_norm_in_half_precision_matches_diffusers_bit_for_bit_with_either_norm_type(norm_type, dtype):
    """Both of diffusers' norms round x̂ to the input's dtype before the modulation (torch's
    layer norm kernel for half input, FP32LayerNorm's cast back); the twin rounds there too."""
    reference = _randomize(_diffusers_ada_norm()(48, norm_type=norm_type)).to(dtype)
    ours = AdaLayerNorm(48, norm_type=norm_type).to(dtype)
    ours.load_state_dict(reference.state_dict())
    x, emb = _leaves((3, 10, 48), (3, 48), dtype=dtype)
    with torch.no_grad():
        got, want = ours(x, emb=emb), reference(x, emb=emb)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", ["layer_norm", "fp32_layer_norm"])
def test_ada_layer_norm_in_half_precision_gives_diffusers_gradients_bit_for_bit_with_either_norm_type(norm_type,
                                                                                                      dtype):
    """FP32LayerNorm casts x to float32 and x̂ back, so in backward the gradient reaching it
    is rounded to the input's dtype by the modulation and then goes through torch's float32
    layer norm backward, whose input gradient is not the half kernel's (nn.LayerNorm's) to the
    bit; every output and every gradient, on several shapes and seeds. Where x and emb
    broadcast, autograd sums the broadcast gradient once, in the half dtype, where
    diffusers' norm(x) * (1 + scale[:, None]) broadcasts, not batch by batch."""
    red = []
    for seed, (x_shape, emb_shape) in enumerate([((3, 4, 8), (3, 8)), ((2, 10, 48), (2, 48)),
                                                 ((1, 7, 32), (1, 32)), ((2, 3, 6, 24), (3, 24)),
                                                 # emb of batch 1 against x's batch, x's against emb's
                                                 ((4, 5, 16), (1, 16)), ((1, 5, 16), (4, 16)),
                                                 ((2, 3, 6, 8), (1, 8)), ((5, 16), (3, 16))]):
        width = x_shape[-1]
        reference = _randomize(_diffusers_ada_norm()(width, norm_type=norm_type), seed=seed).to(dtype)
        ours = AdaLayerNorm(width, norm_type=norm_type).to(dtype)
        ours.load_state_dict(reference.state_dict())
        gen = torch.Generator().manual_seed(100 + seed)
        x = (torch.randn(x_shape, generator=gen) * 3 + 1).to(dtype).requires_grad_()
        emb = torch.randn(emb_shape, generator=gen).to(dtype).requires_grad_()
        got, want = ours(x, emb=emb), reference(x, emb=emb)
        grads_ours = _grads(got, [x, emb, ours.linear.weight, ours.linear.bias], seed=seed)
        grads_ref = _grads(want, [x, emb, reference.linear.weight, reference.linear.bias], seed=seed)
        names = ["x", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp", "grad x", "grad emb", "grad weight",
                 "grad bias"]
        for name, a, b in zip(names, (*got, *grads_ours), (*want, *grads_ref)):
            if a.dtype != b.dtype or not torch.equal(a, b):
                red.append(f"{x_shape}: {name} ({int((a != b).sum()) if a.shape == b.shape else 'shape'} differ)")
    assert not red, red


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ada_layer_norm_in_half_precision_at_dit_width_matches_diffusers_bit_for_bit_with_gradients(dtype):
    """At DiT-XL's width, on many tokens: torch's layer norm kernel, as diffusers calls it,
    rounds x̂ to the input's dtype; statistics taken another way differ from it by a float32
    ulp here and there, which rounds to another half value somewhere among 300,000."""
    torch.manual_seed(0)
    reference = _randomize(_diffusers_ada_norm()(1152)).to(dtype)
    ours = AdaLayerNorm(1152).to(dtype)
    ours.load_state_dict(reference.state_dict())
    x, emb = _leaves((2, 128, 1152), (2, 1152), dtype=dtype)
    got, want = ours(x, emb=emb), reference(x, emb=emb)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    inputs_ours = [x, emb, ours.linear.weight, ours.linear.bias]
    inputs_ref = [x, emb, reference.linear.weight, reference.linear.bias]
    for a, b in zip(_grads(got, inputs_ours), _grads(want, inputs_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_ada_layer_norm_on_half_input_with_float32_weights_gives_diffusers_dtype_and_values(x_dtype):
    """A float32 model fed half-precision tokens: diffusers' norm(x)·(1 + scale) + shift
    promotes to float32 through its float32 scale and shift; so does the twin."""
    reference = _randomize(_diffusers_ada_norm()(48))
    ours = AdaLayerNorm(48)
    ours.load_state_dict(reference.state_dict())
    x, emb = _leaves((3, 10, 48), (3, 48), dtype=torch.float32)
    got, want = ours(x.to(x_dtype), emb=emb), reference(x.to(x_dtype), emb=emb)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        # (x̂ is rounded to the input's half precision on both sides, by torch's layer norm
        # kernel there and after float32 statistics here: a rounding step apart at most)
        torch.testing.assert_close(a, b, rtol=4e-3, atol=4e-3)


def _llama_model(family, dtype):
    if family == "llama":
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, vocab_size=50)
        model = LlamaModel(config)
    else:
        from transformers import GemmaConfig, GemmaModel

        config = GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, vocab_size=50, head_dim=16)
        model = GemmaModel(config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_convert_fuse_keeps_decoder_outputs_gradients_and_state_dict(family, dtype):
    model = _llama_model(family, dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = convert(copy.deepcopy(model), fuse=True)
    layer = fused.layers[0]
    assert type(layer).__name__.startswith("Fused")
    assert isinstance(layer.post_attention_layernorm, FusedAddRMSNorm)
    assert fused.state_dict().keys() == state.keys()
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in state.items())
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    want = model(ids).last_hidden_state
    got = fused(ids).last_hidden_state
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(got, want, **tolerance)
    grads_got = _grads([got], [fused.layers[0].post_attention_layernorm.weight, fused.layers[1].mlp.up_proj.weight])
    grads_want = _grads([want], [model.layers[0].post_attention_layernorm.weight, model.layers[1].mlp.up_proj.weight])
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tolerance))


def test_convert_fuse_leaves_layers_of_another_structure_alone():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True)
    with pytest.warns(UserWarning, match=r"fused no layer of Sequential, because it holds none that fuse=True"):
        converted = convert(torch.nn.Sequential(layer), fuse=True)
    assert type(converted[0]) is torch.nn.TransformerEncoderLayer


@pytest.mark.parametrize("make, reference, bad_inputs", [
    (lambda: FusedAddRMSNorm(8), lambda: torch.nn.RMSNorm(8), [(torch.randn(2, 4),), (torch.randn(2, 8), torch.randn(2, 4))]),
    (lambda: FusedAddLayerNorm(8), lambda: torch.nn.LayerNorm(8), [(torch.randn(2, 4),), (torch.randn(2, 8), torch.randn(3, 8))]),
    (lambda: GatedRMSNorm(8, group_size=4), lambda: torch.nn.RMSNorm(8), [(torch.randn(2, 4),), (torch.randn(2, 8), torch.randn(2, 6))]),
], ids=["add_rms", "add_layer", "gated"])
def test_fused_modules_raise_torchs_runtime_error_for_a_misshaped_input(make, reference, bad_inputs):
    with pytest.raises(RuntimeError):  # the oracle: torch's own module refuses the misshaped input this way
        reference()(bad_inputs[0][0])
    for inputs in bad_inputs:
        with pytest.raises(RuntimeError, match=r"size|shape") as caught:
            make()(*inputs)
        assert "pattern" not in str(caught.value) and "[n0]" not in str(caught.value)


def _not_tensor_calls():
    """(module, call taking the one argument to make a non-tensor, that argument's name)."""
    from normlab.torch import RMSNorm
    from normlab.torch.recipe_norms import RecipeLayerNorm, UnweightedRMSNorm

    x, other = torch.randn(2, 8), torch.randn(2, 8)
    emb = torch.randn(2, 8)
    return [
        (FusedAddRMSNorm(8), lambda m, a: m(a, other), "x"), (FusedAddRMSNorm(8), lambda m, a: m(x, a), "residual"),
        (FusedAddLayerNorm(8), lambda m, a: m(a, other), "x"), (FusedAddLayerNorm(8), lambda m, a: m(x, a), "residual"),
        (GatedRMSNorm(8), lambda m, a: m(a, other), "x"), (GatedRMSNorm(8), lambda m, a: m(x, a), "z"),
        (GatedRMSNorm(8), lambda m, a: m(x, gate=a), "gate"),
        (AdaLayerNorm(8), lambda m, a: m(a[None] if isinstance(a, torch.Tensor) else a, emb=emb), "x"),
        (AdaLayerNorm(8), lambda m, a: m(x[None], emb=a), "emb"),
        (RMSNorm(8, eps=1e-6, casting="llama"), lambda m, a: m(a), "input"),
        (RecipeLayerNorm(8, 1e-5, casting="cohere"), lambda m, a: m(a), "x"),
        (UnweightedRMSNorm(1e-6, "llama"), lambda m, a: m(a), "x"),
    ]


@pytest.mark.parametrize("not_a_tensor", [torch.randn(2, 8).tolist(), torch.randn(2, 8).numpy(), 1.0],
                         ids=["list", "numpy", "float"])
def test_fused_blocks_and_recipe_norms_refuse_a_non_tensor_with_torchs_type_error(not_a_tensor):
    with pytest.raises(TypeError, match="must be Tensor"):  # the oracle: torch.nn's norms refuse it so
        torch.nn.RMSNorm(8)(not_a_tensor)
    for module, call, name in _not_tensor_calls():
        call(module, torch.randn(2, 8))  # (the call is right with a tensor there)
        with pytest.raises(TypeError, match=rf"'{name}' \(position \d\) must be Tensor, not "
                                            rf"{type(not_a_tensor).__module__.replace('builtins', '')}"):
            call(module, not_a_tensor)


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), -float("inf")])
def test_a_weight_offset_that_is_not_finite_is_refused_at_construction_as_the_numpy_api_refuses_it(offset):
    # (it gave NaN or infinite outputs on every call)
    import numpy as np

    import normlab
    from normlab.torch import RMSNorm

    with pytest.raises(ValueError, match="weight_offset"):  # the oracle: the NumPy API's own rule
        normlab.normalize(np.ones((2, 4)), "b [d]", weight=np.ones(4), params="d", rms=True, weight_offset=offset)
    for make in (lambda: FusedAddRMSNorm(4, casting="gemma", weight_offset=offset),
                 lambda: RMSNorm(4, eps=1e-6, casting="gemma", weight_offset=offset)):
        with pytest.raises(ValueError, match=r"weight_offset=-?(nan|inf) would make every output"):
            make()


@pytest.mark.parametrize("params, x_dtype, emb_dtype", [
    (torch.float32, torch.float32, torch.float64),
    (torch.float32, torch.float64, torch.float64),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float64, torch.float64, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
])
def test_ada_layer_norm_refuses_an_emb_of_another_dtype_with_linears_error_the_dtypes_and_the_fix(params, x_dtype,
                                                                                                  emb_dtype):
    """diffusers' AdaLayerNormZero's refusal of an emb its linear does not take, its type and
    its words first ("mat1 and mat2 must have the same dtype, ..."), then the module, the
    dtypes and the fix, which torch's words alone do not name. Oracle: diffusers' error; each
    fix it names then runs, on diffusers' module and on the twin."""
    reference, ours = _diffusers_ada_norm()(8).to(params), AdaLayerNorm(8).to(params)
    x, emb = torch.randn(2, 3, 8, dtype=x_dtype), torch.randn(2, 8, dtype=emb_dtype)
    with pytest.raises(RuntimeError) as expected:
        reference(x, emb=emb)
    with pytest.raises(type(expected.value)) as got:
        ours(x, emb=emb)
    words = str(expected.value)
    assert words.startswith("mat1 and mat2 must have the same dtype")
    assert str(got.value).startswith(words + ": "), str(got.value)
    advice = str(got.value)[len(words) + 2:]
    assert advice == (f"AdaLayerNorm holds linear.weight and linear.bias in {params}, but got emb of dtype {emb_dtype} "
                      f"and shape (2, 8); cast emb (.to({params})) or the module (module.to({emb_dtype}))"), advice
    for module in (reference, ours):  # (the fixes it names run)
        module(x, emb=emb.to(params))
        copy.deepcopy(module).to(emb_dtype)(x, emb=emb)


def _torch_refusal(op, *args):
    try:
        op(*args)
    except RuntimeError as error:
        return error
    raise AssertionError(f"{op} took {args}")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("make, names, torch_op", [
    (lambda: FusedAddRMSNorm(8, casting="none"), ("x", "residual"), lambda t: t.pow(2).mean(-1)),
    (lambda: FusedAddRMSNorm(8, casting="none"), ("x",), lambda t: t.pow(2).mean(-1)),
    (lambda: FusedAddLayerNorm(8, casting="none"), ("x", "residual"), torch.var_mean),
    (lambda: FusedAddLayerNorm(8, casting="none"), ("x",), torch.var_mean),
    (lambda: GatedRMSNorm(8, casting="none"), ("x", "z"), torch.nn.functional.silu),
    (lambda: GatedRMSNorm(8, casting="none"), ("x",), lambda t: t.pow(2).mean(-1)),
], ids=["add-rms x, residual", "add-rms x", "add-ln x, residual", "add-ln x", "gated x, z", "gated x"])
def test_fused_blocks_without_casting_refuse_integer_input_with_torchs_error_then_the_fix(make, names, torch_op,
                                                                                          dtype):
    """casting="none" computes in the input's dtype, where torch refuses integers (a mean, a
    var_mean, a silu): torch's error, its type and its words first, then the module, the
    dtype and the fix (cast the input to the module's dtype), which torch's words do not
    name. Oracle: torch's own operation on the integer tensor; the fix then runs."""
    module = make()
    args = [torch.ones(2, 8, dtype=dtype) for _ in names]
    expected = _torch_refusal(torch_op, args[0])
    with pytest.raises(type(expected)) as got:
        module(*args)
    words = str(expected)
    assert str(got.value).startswith(words + ": "), str(got.value)
    given = " and ".join(names) if names != ("x", "residual") else "x + residual"
    listed = "weight and bias" if isinstance(module, FusedAddLayerNorm) else "weight"
    assert str(got.value)[len(words) + 2:] == (
        f"{type(module).__name__} holds {listed} in torch.float32, but got {given} of dtype {dtype} and shape "
        f"(2, 8); cast {' and '.join(names)} (.to(torch.float32))"), str(got.value)
    module(*(a.to(torch.float32) for a in args))  # (the fix it names runs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_ada_layer_norm_refuses_an_integer_emb_with_diffusers_error_then_the_fix(dtype):
    """Oracle: diffusers' AdaLayerNormZero's error for an integer emb (its silu's), type and
    words first; then the module, the dtype and the cast, which runs."""
    reference, ours = _diffusers_ada_norm()(8), AdaLayerNorm(8)
    x, emb = torch.randn(2, 3, 8), torch.ones(2, 8, dtype=dtype)
    expected = _torch_refusal(lambda: reference(x, emb=emb))
    with pytest.raises(type(expected)) as got:
        ours(x, emb=emb)
    assert str(got.value) == (f"{expected}: AdaLayerNorm holds linear.weight and linear.bias in torch.float32, but "
                              f"got emb of dtype {dtype} and shape (2, 8); cast emb (.to(torch.float32))")
    ours(x, emb=emb.to(torch.float32))
    reference(x, emb=emb.to(torch.float32))


def test_rms_norm_without_casting_refuses_integer_input_with_torch_nns_error_then_the_fix():
    """Oracle: torch.nn.RMSNorm's error for a long input, type and words first."""
    x = torch.ones(2, 8, dtype=torch.long)
    expected = _torch_refusal(torch.nn.RMSNorm(8), x)
    with pytest.raises(type(expected)) as got:
        RMSNorm(8, casting="none")(x)
    assert str(got.value) == (f"{expected}: RMSNorm holds weight in torch.float32, but got input of dtype torch.int64 "
                              f"and shape (2, 8); cast the input (x.to(torch.float32))")
    RMSNorm(8, casting="none")(x.to(torch.float32))


def test_ada_layer_norm_raises_runtime_error_for_a_misshaped_input():
    from diffusers.models.normalization import AdaLayerNormZero

    with pytest.raises(RuntimeError):  # diffusers' module refuses it with torch's RuntimeError
        AdaLayerNormZero(4, num_embeddings=None)(torch.randn(2, 3, 6), emb=torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="size"):
        AdaLayerNorm(4)(torch.randn(2, 3, 6), emb=torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="emb"):
        AdaLayerNorm(4)(torch.randn(2, 3, 4), emb=torch.randn(3, 4))


class _Logged(torch.Tensor):
    """A tensor subclass with a ``__torch_function__`` of its own (as DTensor and users'
    tracing classes have): it records each torch function it is handed."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_fused_blocks_hand_tensor_subclasses_each_torch_operation_as_the_blocks_they_replace_do():
    gen = torch.Generator().manual_seed(5)
    x, r, z = (torch.randn(2, 3, 64, generator=gen) for _ in range(3))
    (mamba, group_size), llama = mamba_gated_norm(64, 16), _randomize(LlamaRMSNorm(64))
    mamba, add_rms = _randomize(mamba), FusedAddRMSNorm(64)
    gated = GatedRMSNorm(64, group_size=group_size, eps=1e-6, norm_before_gate=False, casting="llama")  # as HF Mamba2
    add_rms.load_state_dict(llama.state_dict())
    gated.load_state_dict(mamba.state_dict())
    cases = [(add_rms, lambda a, b: (llama(a + b), a + b), r),  # (ours, the composite it replaces, second input)
             (gated, lambda a, b: (mamba(a, b),), z)]
    for ours, theirs, other in cases:
        _Logged.calls = []
        got = ours(x.as_subclass(_Logged), other.as_subclass(_Logged))
        got = got if isinstance(got, tuple) else (got,)
        assert _Logged.calls, "the subclass saw no torch operation"
        for g, e in zip(got, theirs(x, other), strict=True):
            assert type(g) is _Logged
            torch.testing.assert_close(g.as_subclass(torch.Tensor), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_shape, emb_shape", [
    ((3, 5, 16), (1, 16)),     # one conditioning for the whole batch
    ((1, 5, 16), (3, 16)),     # one sequence under three conditionings
    ((5, 16), (3, 16)),        # x without a batch axis
    ((16,), (3, 16)),          # a single token
    ((2, 3, 5, 16), (3, 16)),  # a leading axis before the batch
    ((2, 3, 5, 16), (1, 16)),
    ((1, 5, 16), (0, 16)),     # an empty conditioning batch
], ids=["emb_batch_1", "x_batch_1", "x_2d", "x_1d", "x_4d", "x_4d_emb_batch_1", "emb_batch_0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ada_layer_norm_broadcasts_x_and_emb_as_diffusers_ada_layer_norm_zero_does(x_shape, emb_shape, dtype):
    """diffusers computes norm(x)·(1 + scale[:, None]) + shift[:, None], which broadcasts
    emb's batch against x's axis -3; the twin gives the same shapes, values, and the
    gradients autograd sums over the broadcast axes."""
    reference = _randomize(_diffusers_ada_norm()(16)).to(dtype)
    ours = AdaLayerNorm(16).to(dtype)
    ours.load_state_dict(reference.state_dict())
    x, emb = _leaves(x_shape, emb_shape, dtype=dtype)
    got, want = ours(x, emb=emb), reference(x, emb=emb)
    assert [t.shape for t in got] == [t.shape for t in want]
    tolerance = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
                 torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)
    inputs = [x, emb, ours.linear.weight, ours.linear.bias]
    for a, b in zip(_grads(got, inputs), _grads(want, [x, emb, reference.linear.weight, reference.linear.bias])):
        # (bfloat16 sums over the broadcast batch in another order: a few ulps of the largest entry)
        scale = 1.0 if dtype != torch.bfloat16 or not b.numel() else 4 * 2 ** -8 * b.abs().max().item() / tolerance["atol"]
        torch.testing.assert_close(a, b, rtol=tolerance["rtol"], atol=tolerance["atol"] * max(scale, 1.0))


def test_ada_layer_norm_with_a_leading_axis_compiles_to_one_full_graph_with_diffusers_outputs():
    # x of (frames, batch, tokens, dim) against emb of (batch, dim): the composite's view
    # came from a plan there, whose shape arithmetic Dynamo cannot trace
    reference = _randomize(_diffusers_ada_norm()(16))
    ours = AdaLayerNorm(16)
    ours.load_state_dict(reference.state_dict())
    x, emb = _leaves((4, 2, 5, 16), (2, 16), dtype=torch.float32)
    with torch.no_grad():
        got = torch.compile(ours, fullgraph=True, backend="eager")(x, emb=emb)  # (Dynamo's graph; no codegen)
        torch.testing.assert_close(got, reference(x, emb=emb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, emb_shape", [((3, 4, 6), (1, 6)), ((1, 4, 6), (3, 6)), ((2, 3, 2, 6), (1, 6))])
def test_ada_layer_norm_with_broadcast_batches_passes_gradcheck_and_gradgradcheck(x_shape, emb_shape):
    torch.manual_seed(0)
    block = AdaLayerNorm(6).double()
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(emb_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, emb: block(x, emb=emb), (x, emb))
    assert torch.autograd.gradgradcheck(lambda x, emb: block(x, emb=emb)[0], (x, emb))


def test_ada_layer_norm_refuses_batches_that_do_not_broadcast_as_diffusers_does():
    with pytest.raises(RuntimeError):  # the oracle: diffusers' module refuses it
        _diffusers_ada_norm()(4)(torch.randn(3, 5, 4), emb=torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"\[3, 5, 4\].*\[2, 4\].*broadcast"):
        AdaLayerNorm(4)(torch.randn(3, 5, 4), emb=torch.randn(2, 4))


def _saved_storages(run):
    """The storages of the tensors autograd saves while ``run()`` records its graph."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, set(saved)


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (3, 5, 64)), (torch.float64, (3, 5, 64)),
                                          (torch.bfloat16, (8, 256, 256))])  # (bfloat16: its kernels' size)
@pytest.mark.parametrize("path", ["cached", "general"])
def test_fused_add_rms_norm_saves_the_sum_as_llama_rms_norm_after_the_add_does(dtype, shape, path):
    """LlamaRMSNorm on ``x + r`` saves neither x nor r, so changing them in place after the
    call is legal there: the block must allow it too, and give the gradients it gives
    without the change (and, in float, LlamaRMSNorm's)."""
    hf = _randomize(LlamaRMSNorm(shape[-1], eps=1e-6)).to(dtype)
    ours = FusedAddRMSNorm(shape[-1], eps=1e-6, casting="llama").to(dtype)
    ours.load_state_dict(hf.state_dict())

    def gradients(norm, change):
        x0, r0 = _leaves(shape, shape, dtype=dtype)
        # non-leaves, which may change in place; non-contiguous ones skip the cached call
        x, r = ((x0 * 1, r0 * 1) if path == "cached" else
                (x0.transpose(0, 1).contiguous().transpose(0, 1), r0.transpose(0, 1).contiguous().transpose(0, 1)))
        assert x.is_contiguous() == (path == "cached")

        def run():
            if norm is hf:
                total = x + r
                return hf(total), total
            return norm(x, r)

        (y, total), saved = _saved_storages(run)
        assert not saved & {x.untyped_storage().data_ptr(), r.untyped_storage().data_ptr()}
        if change:
            with torch.no_grad():
                x.mul_(2)
                r.add_(1)
        return (y, total, *_grads([y, total], [x0, r0, norm.weight]))

    got = gradients(ours, change=True)
    for mine, unchanged in zip(got, gradients(ours, change=False)):
        assert torch.equal(mine, unchanged)
    if dtype != torch.bfloat16:  # (bfloat16 gradients: see test_torch_fused_half.py)
        for mine, theirs in zip(got, gradients(hf, change=True)):
            torch.testing.assert_close(mine, theirs, rtol=2e-6, atol=2e-6)


class _InputSizedCopies(TorchDispatchMode):
    """Counts the copies (``clone``, ``copy_``) torch's operations make of ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and args[0].numel() == self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype, shape, threshold", [
    (torch.float32, (2, 1024, 4096), None),  # 32 MiB of gradient: the size rule as it stands
    (torch.float32, (3, 5, 64), 0),  # any size, with the rule lowered
    (torch.bfloat16, (4, 128, 1024), 0),  # (the half kernels' sizes)
])
def test_leaf_x_and_residual_get_the_gradients_of_the_sum_with_no_copy(monkeypatch, dtype, shape, threshold):
    """torch's ``x + r`` hands one gradient tensor to both x and r, and its engine copies it
    before it becomes a leaf's ``.grad`` (into memory fresh from the system at 32 MiB and
    more): where both need gradients there, the block writes a second array in its
    backward pass instead. Each must be the gradient of the sum, as torch's autograd gives it."""
    import normlab.kernels.pool as pool

    if threshold is not None:
        monkeypatch.setattr(pool, "FRESH_PAGES_FROM", threshold)
    width = shape[-1]
    hf = _randomize(LlamaRMSNorm(width, eps=1e-6))
    ours = FusedAddRMSNorm(width, eps=1e-6, casting="llama").to(dtype)
    ours.load_state_dict(hf.state_dict())
    x, r = _leaves(shape, shape, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    grad_y, grad_total = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    y, total = ours(x, r)
    with _InputSizedCopies(x.numel()) as copies:
        torch.autograd.backward([y, total], [grad_y, grad_total])
    assert copies.count == 0
    assert x.grad.data_ptr() != r.grad.data_ptr()
    # autograd.grad returns the inputs' gradients as they come, uncopied: one tensor for both
    # (a second array would be a write for nothing)
    returned = torch.autograd.grad(ours(x, r), [x, r], [grad_y, grad_total])
    assert returned[0].data_ptr() == returned[1].data_ptr()
    # and so do a model's activations (no leaves), whose gradients torch adds up in place
    hidden, stream = (t.detach().requires_grad_() * 1 for t in (x, r))
    seen = []
    for t in (hidden, stream):
        t.register_hook(seen.append)
    torch.autograd.backward(ours(hidden, stream), [grad_y, grad_total])
    assert seen[0].data_ptr() == seen[1].data_ptr()
    # the oracle: torch's autograd through LlamaRMSNorm on the sum, in float64
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, r))
    total64 = x64 + r64
    hf.double().weight.data.copy_(ours.weight.detach())  # (bfloat16 weights, exact in float64)
    torch.autograd.backward([hf(total64), total64], [grad_y.double(), grad_total.double()])
    tolerance = TOLERANCE[dtype] if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    for mine, theirs in ((x.grad, x64.grad), (r.grad, r64.grad), *zip(returned, (x64.grad, r64.grad))):
        torch.testing.assert_close(mine.double(), theirs, **tolerance)


@pytest.mark.parametrize("frozen", ["weight", "bias", "weight and bias"])
@pytest.mark.parametrize("module", ["add", "adaln"])
def test_frozen_parameters_get_no_gradient_and_the_others_those_of_the_replaced_code(frozen, module):
    """Fine-tuning freezes some norm parameters (``requires_grad_(False)``): they get no
    ``.grad``, and every other input gets the gradient that torch's autograd gives through
    torch.nn.LayerNorm on ``x + r`` (diffusers' AdaLayerNormZero for AdaLN-Zero)."""
    x, r = _leaves((4, 8, 64), (4, 8, 64), dtype=torch.float32)
    inputs = [x, r]
    if module == "add":
        theirs = _randomize(torch.nn.LayerNorm(64))
        ours = FusedAddLayerNorm(64)

        def run(norm):
            return norm(x, r) if norm is ours else (norm(x + r), x + r)
    else:  # (its norm has no parameters: the linear layer's, and emb too where both are frozen)
        normalization = pytest.importorskip("diffusers.models.normalization")
        theirs = _randomize(normalization.AdaLayerNormZero(64, norm_type="layer_norm"))
        ours = AdaLayerNorm(64)
        emb = r[:, 0].detach().requires_grad_(frozen != "weight and bias")
        inputs = [x, emb] if emb.requires_grad else [x]

        def run(norm):
            return norm(x, emb=emb)
    ours.load_state_dict(theirs.state_dict())
    names = frozen.split(" and ")
    for norm in (theirs, ours):
        params = dict(norm.named_parameters())
        for name in names:
            params[name if module == "add" else f"linear.{name}"].requires_grad_(False)
    trainable = [[p for _, p in sorted(norm.named_parameters()) if p.requires_grad] for norm in (ours, theirs)]
    got = _grads(run(ours), inputs + trainable[0])
    want = _grads(run(theirs), inputs + trainable[1])
    for mine, other in zip(got, want):
        torch.testing.assert_close(mine, other, rtol=2e-5, atol=2e-5)


def _penalty_gradients(norm, x, r, weight):
    """A gradient penalty through the block called twice, its weight shared by both calls
    (one layer used twice): the first gradients, kept in the graph, and the penalty's."""
    h, total = norm(x, r)
    y, total = norm(h, total)
    loss = y.sin().sum() + 0.1 * total.square().sum()
    first = torch.autograd.grad(loss, [x, r, weight], create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    return (*first, *torch.autograd.grad(penalty, [x, r, weight]))


@pytest.mark.parametrize("path", ["cached", "general"])
def test_a_block_called_twice_has_the_second_derivatives_of_rms_norm_after_the_add(path):
    """The create_graph backward must give each call's own partial derivatives: taken at the
    saved tensors themselves, torch's engine went on up the input's history to the same
    weight's earlier call and added that gradient in again."""
    # (F.rms_norm: LlamaRMSNorm takes its statistics in float32 even on float64 inputs)
    weight = _randomize(LlamaRMSNorm(16, eps=1e-6)).double().weight
    ours = FusedAddRMSNorm(16, eps=1e-6, casting="llama").double()
    ours.load_state_dict({"weight": weight})
    x0, r0 = _leaves((3, 5, 16), (3, 5, 16), dtype=torch.float64)
    x, r = (x0, r0) if path == "cached" else (x0.transpose(0, 1).detach().requires_grad_(),
                                              r0.transpose(0, 1).detach().requires_grad_())
    assert x.is_contiguous() == (path == "cached")

    def torch_ops(a, b):
        total = a + b
        return F.rms_norm(total, (16,), weight, eps=1e-6), total

    got = _penalty_gradients(ours, x, r, ours.weight)
    want = _penalty_gradients(torch_ops, x, r, weight)
    for mine, theirs in zip(got, want):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_two_threads_taking_second_derivatives_over_one_graph_get_rms_norm_after_the_add_s():
    """Concurrent create_graph backward passes over one graph (retain_graph), as torch allows
    on CPU: the second thread runs while the first is paused inside its pass, and must still
    get the gradients of torch's rms_norm on x + r."""
    import threading

    weight = _randomize(LlamaRMSNorm(16, eps=1e-6)).double().weight
    ours = FusedAddRMSNorm(16, eps=1e-6, casting="llama").double()
    ours.load_state_dict({"weight": weight})
    x, r = _leaves((3, 5, 16), (3, 5, 16), dtype=torch.float64)

    def grads(y, total, weight):
        loss = y.sin().sum() + total.square().sum()
        return torch.autograd.grad(loss, [x, r, weight], create_graph=True, retain_graph=True)

    total = x + r  # (F.rms_norm: LlamaRMSNorm takes its statistics in float32 even on float64)
    want = grads(F.rms_norm(total, (16,), weight, eps=1e-6), total, weight)
    y, total = ours(x, r)
    paused, resumed = threading.Event(), threading.Event()

    def hook(grad):  # holds the first thread at its first visit to the weight
        if threading.current_thread().name == "first" and not paused.is_set():
            paused.set()
            resumed.wait(30)
        return grad

    ours.weight.register_hook(hook)
    got = {}

    def run(name):
        if name == "second":
            paused.wait(30)
        try:
            got[name] = grads(y, total, ours.weight)
        except RuntimeError as error:
            got[name] = error
        finally:
            resumed.set()

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for name in ("first", "second"):
        assert not isinstance(got[name], RuntimeError), (name, got[name])
        for mine, theirs in zip(got[name], want):
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_normalize_with_a_weight_repeated_inside_each_row_is_torch_group_norm_of_the_sum(dtype):
    # "b (g [c]) [t]": a group's row holds each channel's t positions, so the weight repeats
    # inside it, which the kernels' tables cannot hold (a cached call ran them on None)
    from normlab.torch.fused import Block, fused_normalize

    block = Block("b (g [c]) [t]", params="(g c)", sizes=(("g", 2),))
    x, r, w, b = _leaves((2, 6, 5), (2, 6, 5), (6,), (6,), dtype=dtype)
    got = fused_normalize(x, block, residual=r, weight=w, bias=b)
    want = (F.group_norm(x + r, 2, w, b), x + r)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(_grads(got, (x, r, w, b)), _grads(want, (x, r, w, b)), **tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_normalize_in_half_precision_with_a_weight_over_part_of_the_reduced_axes_is_its_definition(dtype):
    # "b [t d]" weighted per "d": torch's layer norm takes a weight of the whole reduced shape
    # (t, d) only, so this block normalizes first and weighs after ("shape '[3, 4]' is invalid")
    from normlab.torch.fused import Block, fused_normalize

    block = Block("b [t d]", params="d")
    x, r, w, b = _leaves((2, 3, 4), (2, 3, 4), (4,), (4,), dtype=dtype)
    got, total = fused_normalize(x, block, residual=r, weight=w, bias=b)
    exact = F.layer_norm((x + r).double(), (3, 4)) * w.double() + b.double()
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(_grads([got], (x, r, w, b)), _grads([exact], (x, r, w, b)), rtol=2e-2, atol=2e-2,
                               check_dtype=False)


@pytest.mark.parametrize("given", ["scale", "shift"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_normalize_with_a_scale_or_a_shift_alone_has_the_gradients_of_its_definition(dtype, given):
    # the kernels' backward sums both modulation gradients; the one not given has no tensor to take its sum
    from normlab.torch.fused import Block, fused_normalize

    x, modulation = _leaves((2, 3, 8), (2, 8), dtype=dtype)
    got = fused_normalize(x, Block("b t [d]", modulation="b d"), **{given: modulation})
    normed = F.layer_norm(x, (8,))
    want = normed * (1 + modulation[:, None]) if given == "scale" else normed + modulation[:, None]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(_grads([got], (x, modulation)), _grads([want], (x, modulation)), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make, reference", [(lambda: FusedAddRMSNorm(0), lambda: LlamaRMSNorm(0)),
                                             (lambda: FusedAddLayerNorm(0), lambda: torch.nn.LayerNorm(0))],
                         ids=["rms", "layer"])
def test_fused_add_blocks_of_width_zero_give_the_empty_outputs_of_the_norm_of_the_sum(make, reference, dtype):
    # torch.nn.LayerNorm(0) and LlamaRMSNorm(0) take (..., 0) inputs; the blocks' plan refused the size 0
    ours, theirs = make().to(dtype), reference().to(dtype)
    x, r = _leaves((2, 3, 0), (2, 3, 0), dtype=dtype)
    y, total = ours(x, r)
    want = theirs(x + r)
    assert (y.shape, y.dtype, total.shape) == (want.shape, want.dtype, (2, 3, 0))
    grads = torch.autograd.grad([y.sum(), total.sum()], [x, r, *ours.parameters()])
    assert [g.shape for g in grads] == [(2, 3, 0), (2, 3, 0), *[(0,)] * len(list(ours.parameters()))]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # (torch's nn.Linear(0, 0), in both)
def test_ada_layer_norm_of_width_zero_gives_diffusers_empty_outputs():
    diffusers = pytest.importorskip("diffusers.models.normalization")
    x, emb = _leaves((2, 3, 0), (2, 0), dtype=torch.float32)
    got, want = AdaLayerNorm(0)(x, emb=emb), diffusers.AdaLayerNormZero(0)(x, emb=emb)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert torch.autograd.grad(got[0].sum(), x)[0].shape == (2, 3, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 2])
def test_gated_rms_norm_of_width_zero_gives_the_empty_outputs_of_the_gated_norms_it_replaces(group_size, dtype):
    # GatedRMSNorm(0) raised ZeroDivisionError (its group size, the whole row, was 0), where
    # FalconH1RMSNormGated(0) and torch.nn.RMSNorm(0) construct and take (..., 0) inputs
    ours = GatedRMSNorm(0, group_size=group_size).to(dtype)
    theirs = (FalconH1RMSNormGated(0) if group_size is None else mamba_gated_norm(0, group_size)[0]).to(dtype)
    x, z = _leaves((2, 3, 0), (2, 3, 0), dtype=dtype)
    y, want = ours(x, z), theirs(x, z)
    assert (y.shape, y.dtype) == (want.shape, want.dtype) == ((2, 3, 0), dtype)
    grads = torch.autograd.grad(y.sum(), [x, z, ours.weight])
    assert [g.shape for g in grads] == [(2, 3, 0), (2, 3, 0), (0,)]
    assert ours(x).shape == (2, 3, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_rms_blocks_take_eps_none_as_torch_rms_norm_of_the_sum_takes_it(dtype):
    # FusedAddRMSNorm(64, eps=None) and GatedRMSNorm(64, eps=None) raised a bare TypeError
    # (float(None)); torch.nn.RMSNorm(eps=None) uses the machine epsilon of the dtype it
    # computes in. Values near 1e-4, whose mean square (1e-8) an eps of 1e-6 would swamp.
    gen = torch.Generator().manual_seed(3)
    x, r = ((torch.randn(2, 3, 64, generator=gen) * 1e-4).to(dtype).requires_grad_() for _ in range(2))
    added, gated = FusedAddRMSNorm(64, eps=None, casting="gemma").to(dtype), GatedRMSNorm(64, eps=None).to(dtype)
    reference = torch.nn.RMSNorm(64, eps=None).to(dtype)
    want = reference(x + r)
    want_grads = torch.autograd.grad(want.sum(), [x, r, reference.weight])
    (y, total), y_gated = added(x, r), gated(x + r)
    for got, module in ((y, added), (y_gated, gated)):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), [x, r, module.weight]), want_grads)
    with torch.no_grad():  # (a small forward without autograd takes torch's operations)
        torch.testing.assert_close(added(x, r)[0], want)


def test_an_eps_none_rms_block_resolves_its_eps_once_per_dtype_and_again_when_the_dtype_changes():
    # the block with eps=None was rebuilt by dataclasses.replace on every call (six Python
    # calls); a float64 call after a float32 one must still take float64's machine epsilon
    import sys

    gen = torch.Generator().manual_seed(4)
    x, r = (torch.randn(2, 64, generator=gen) * 1e-4 for _ in range(2))
    ours, reference = FusedAddRMSNorm(64, eps=None), torch.nn.RMSNorm(64, eps=None)
    for dtype in (torch.float32, torch.float64, torch.float32):
        ours, reference = ours.to(dtype), reference.to(dtype)
        xd, rd = x.to(dtype), r.to(dtype)
        torch.testing.assert_close(ours(xd, rd)[0], reference(xd + rd))
        entered = []

        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_name in ("replace", "rms_default_eps", "__post_init__"):
                entered.append(frame.f_code.co_name)

        sys.setprofile(profile)
        try:
            y = ours(xd, rd)[0]
        finally:
            sys.setprofile(None)
        assert entered == []
        torch.testing.assert_close(y, reference(xd + rd))


def test_a_compiled_eps_none_rms_block_is_one_graph_per_dtype_as_with_a_float_eps():
    """The eps resolved per dtype was kept in the module's __dict__ from inside the compiled
    call too: that write made the next call fail its guards and compile again (three graphs
    for two dtypes with fullgraph=True, four without). Oracle: torch.nn.RMSNorm(eps=None)."""
    from torch._dynamo.testing import CompileCounter

    gen = torch.Generator().manual_seed(5)
    ours, reference = FusedAddRMSNorm(64, eps=None), torch.nn.RMSNorm(64, eps=None)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    for dtype in (torch.float32, torch.float32, torch.float64, torch.float64):
        ours, reference = ours.to(dtype), reference.to(dtype)
        x, r = (torch.randn(2, 64, generator=gen, dtype=dtype) * 1e-4 for _ in range(2))
        torch.testing.assert_close(compiled(x, r)[0], reference(x + r))
    assert counter.frame_count == 2


@pytest.mark.parametrize("block", ["FusedAddRMSNorm", "GatedRMSNorm"])
def test_a_compiled_eps_none_rms_block_called_eagerly_between_calls_is_one_graph_per_dtype(block):
    """Eager calls keep the eps resolved for the last dtype in the module's __dict__, and the
    compiled call read it there: each graph guarded on the dtype the eager calls had last left,
    so alternating eager and compiled calls over float32, float64 and float32 again compiled a
    third graph, where a float eps compiles two. Oracle: torch.nn.RMSNorm(eps=None), eager."""
    from torch._dynamo.testing import CompileCounter

    gen = torch.Generator().manual_seed(6)
    ours = FusedAddRMSNorm(64, eps=None) if block == "FusedAddRMSNorm" else GatedRMSNorm(64, eps=None)
    reference = torch.nn.RMSNorm(64, eps=None)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    for dtype in (torch.float32, torch.float64, torch.float32):
        ours, reference = ours.to(dtype), reference.to(dtype)
        x, r = (torch.randn(2, 64, generator=gen, dtype=dtype) * 1e-4 for _ in range(2))
        for _ in range(2):
            if block == "FusedAddRMSNorm":
                torch.testing.assert_close(compiled(x, r)[0], reference(x + r))
                torch.testing.assert_close(ours(x, r)[0], reference(x + r))
            else:  # (no gate: the norm alone)
                torch.testing.assert_close(compiled(x), reference(x))
                torch.testing.assert_close(ours(x), reference(x))
    assert counter.frame_count == 2


def test_fused_add_layer_norm_takes_eps_none_where_nn_layer_norm_does_and_raises_its_type_error_in_the_forward():
    ours, theirs = FusedAddLayerNorm(8, eps=None), torch.nn.LayerNorm(8, eps=None)
    x = torch.randn(2, 8)
    with pytest.raises(TypeError) as want:
        theirs(x)
    for args in ((x, x), (x,)):
        with pytest.raises(TypeError) as got:
            ours(*args)
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])  # (the cached and the general Function)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make, reference", [(FusedAddRMSNorm, lambda size: torch.nn.RMSNorm(size, eps=1e-6)),
                                             (FusedAddLayerNorm, torch.nn.LayerNorm)], ids=["rms", "layer"])
def test_the_sum_alone_gives_the_parameters_no_gradient_as_the_add_before_a_norm_does(make, reference, dtype, strided):
    # the kernels' backward got zeros for the unused y and returned zero parameter gradients,
    # where torch's s = x + r; y = norm(s) leaves them None (allow_unused=True; .grad unset)
    ours, theirs = _randomize(make(8).to(dtype)), _randomize(reference(8).to(dtype))
    base, r = _leaves((2, 6, 8) if strided else (2, 3, 8), (2, 3, 8), dtype=dtype)
    x = base[:, ::2] if strided else base
    y, total = ours(x, r)
    assert type(y.grad_fn).__name__ == ("_FusedFunctionBackward" if strided else "_CachedFusedFunctionBackward")
    s = x + r
    got = torch.autograd.grad(total.sum(), [base, r, *ours.parameters()], allow_unused=True)
    want = torch.autograd.grad(s.sum(), [base, r, *theirs.parameters()], allow_unused=True)
    assert [g is None for g in got] == [g is None for g in want] == [False, False, *[True] * len(want[2:])]
    torch.testing.assert_close(got[:2], want[:2])
    # y alone and both outputs still give every gradient, the norm's of the sum
    for both in (False, True):
        (y, total), s = ours(x, r), x + r
        torch.testing.assert_close(_grads((y, total) if both else (y,), [base, r, *ours.parameters()]),
                                   _grads((theirs(s), s) if both else (theirs(s),), [base, r, *theirs.parameters()]))
    y, total = ours(x, r)
    total.sum().backward()
    assert all(p.grad is None for p in ours.parameters()) and base.grad is not None


@pytest.mark.parametrize("how", ["compiled", "traced"])
def test_a_converted_mamba2_gated_norm_compiled_or_traced_takes_an_empty_input_as_the_original(how):
    """Compiled or traced, GatedRMSNorm views its rows' groups without a plan; that view named
    the group count -1, which a reshape of no elements cannot decide ("cannot reshape tensor of
    0 elements"), where Mamba2's own view names it and gives an empty output."""
    torch.manual_seed(0)
    original, group = mamba_gated_norm(8, group_size=4)
    twin = convert(copy.deepcopy(original))
    assert isinstance(twin, GatedRMSNorm)
    for shape in [(0, 3, 8), (2, 0, 8)]:
        x, gate = torch.randn(shape), torch.randn(shape)
        torch._dynamo.reset()
        run = (torch.compile(twin, backend="eager", dynamic=False) if how == "compiled"
               else torch.jit.trace(twin, (x, gate), check_trace=False))
        torch.testing.assert_close(run(x, gate), original(x, gate))


_PROFILED_FUSED = [
    ("FusedAddRMSNorm", lambda: torch.nn.RMSNorm(16), lambda: FusedAddRMSNorm(16), lambda m, x, r: m(x, r)[0]),
    ("FusedAddLayerNorm", lambda: torch.nn.LayerNorm(16), lambda: FusedAddLayerNorm(16), lambda m, x, r: m(x, r)[0]),
    ("GatedRMSNorm", lambda: torch.nn.RMSNorm(16), lambda: GatedRMSNorm(16), lambda m, x, r: m(x, r)),
    ("AdaLayerNorm", lambda: torch.nn.LayerNorm(16), lambda: AdaLayerNorm(16),
     lambda m, x, r: m(x, emb=r[:, 0])[0])]


@pytest.mark.parametrize("name, make_reference, make, call", _PROFILED_FUSED, ids=[c[0] for c in _PROFILED_FUSED])
def test_the_profiler_lists_a_fused_blocks_call_and_backward_by_the_name_of_its_norms_op(name, make_reference, make,
                                                                                           call):
    """A fused block's call on the kernels shows in ``prof.key_averages()`` as one range named
    as its norm's op in torch.nn (``normlab::rms_norm`` beside torch.nn.RMSNorm's
    ``aten::rms_norm``), and its backward as that name with ``_backward``, not only as its
    autograd Function (``_CachedFusedFunction``). Oracle: the op torch's profiler gives the
    torch.nn norm the block replaces."""
    def keys(run):
        return profiled_ops(lambda: run().sum().backward())

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, generator=generator, requires_grad=True)
    r = torch.randn(2, 3, 16, generator=generator, requires_grad=True)
    reference = make_reference()
    ops = [key.split("::")[1] for key in keys(lambda: reference(x)) if key in ("aten::layer_norm", "aten::rms_norm")]
    assert len(ops) == 1
    block = make()
    names = keys(lambda: call(block, x, r))
    assert names.get(f"normlab::{ops[0]}") == 1 and names.get(f"normlab::{ops[0]}_backward") == 1, sorted(names)


@pytest.mark.parametrize("name, make_reference, make, call", _PROFILED_FUSED, ids=[c[0] for c in _PROFILED_FUSED])
def test_the_profiler_lists_a_fused_blocks_half_precision_backward_as_one_range_named_after_its_norms_op(
        name, make_reference, make, call):
    """In bfloat16 a fused block's backward is its casting recipe's autograd steps
    (MulBackward0, RsqrtBackward0, ...), which showed only as those, where on the kernels it
    shows as ``normlab::rms_norm_backward``: it is that one range, around those steps.
    Oracle: the op torch's profiler gives the torch.nn norm the block replaces."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, generator=generator).to(torch.bfloat16).requires_grad_()
    r = torch.randn(2, 3, 16, generator=generator).to(torch.bfloat16).requires_grad_()
    reference = make_reference().to(torch.bfloat16)
    ops = [key.split("::")[1] for key in profiled_ops(lambda: reference(x).sum().backward())
           if key in ("aten::layer_norm", "aten::rms_norm")]
    assert len(ops) == 1
    block = make().to(torch.bfloat16)
    count, inside = autograd_steps_inside(lambda: call(block, x, r).float().sum().backward(),
                                          f"normlab::{ops[0]}_backward")
    assert count == 1 and sum(inside.values()) > 0, inside
    assert "SumBackward0" not in inside and "torch::autograd::AccumulateGrad" not in inside, inside


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name, make_reference, make, call", _PROFILED_FUSED, ids=[c[0] for c in _PROFILED_FUSED])
def test_the_profiler_lists_a_fused_blocks_half_precision_call_once_by_the_name_of_its_norms_op(name, make_reference,
                                                                                                 make, call, grad):
    """In bfloat16 a fused block runs its casting recipe's torch operations (a small
    FusedAddRMSNorm without gradients too): FusedAddRMSNorm and GatedRMSNorm showed there
    only as those steps (aten::pow, aten::mean, aten::rsqrt, ...); each call is one range
    named as its norm's op, as in float32 on the kernels. Oracle: the op, and its count,
    that torch's profiler gives the torch.nn norm the block replaces."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, generator=generator).to(torch.bfloat16).requires_grad_(grad)
    r = torch.randn(2, 3, 16, generator=generator).to(torch.bfloat16)
    reference = make_reference().to(torch.bfloat16)
    with torch.set_grad_enabled(grad):
        ops = [key.split("::")[1] for key in profiled_ops(lambda: reference(x))
               if key in ("aten::layer_norm", "aten::rms_norm")]
        assert len(ops) == 1
        block = make().to(torch.bfloat16)
        names = profiled_ops(lambda: call(block, x, r))
    assert names.get(f"normlab::{ops[0]}") == 1, sorted(names)
