"""convert() on norms of model families that normlab's generic pattern twin, ``Norm``,
computes: diffusers' ``MiniMaxH3VideoGroupNorm`` (group norm of each frame on its own,
``"b (g [c]) t [h w]"``) and transformers' ``ChameleonLayerNorm`` (layer norm of each head,
``"... h [d]"`` with a weight and bias per head) and ``xLSTMMultiHeadLayerNorm`` (layer norm of
each head, ``"b s h [d]"``, the heads merged before a weight over them). The oracles are those classes, built with
random parameters, and tiny models built from their configs, run unconverted on the same inputs with torch's
autograd through them."""

import copy
import io
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
minimax = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_minimax_h3")

import normlab.torch as nt  # noqa: E402
from tests.test_convert_models import (  # noqa: E402
    TOLERANCE, assert_same_numbers, convert_quietly, random_parameters, run, unconvert_exactly,
)

BFLOAT16 = dict(rtol=1.6e-2, atol=2e-2)
MiniMaxH3VideoGroupNorm = minimax.MiniMaxH3VideoGroupNorm


def _tolerance(dtype):
    return TOLERANCE.get(dtype, BFLOAT16)


# ---------------------------------------------------------------------------------------
# MiniMax-H3's per-frame group norm


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["float32", "bfloat16", "float64"])
def test_minimax_h3s_per_frame_group_norm_becomes_a_norm_with_its_outputs_and_gradients(dtype, affine):
    """It was left unconverted with a warning: a GroupNorm whose forward folds the frames of
    (N, C, T, H, W) input into the batch, so no statistics span two frames."""
    original = random_parameters(MiniMaxH3VideoGroupNorm(4, 8, eps=1e-6, affine=affine)).to(dtype)
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is nt.PerFrameGroupNorm and converted.pattern == "b (g [c]) t [h w]"
    assert list(converted.state_dict()) == list(original.state_dict())
    x = (torch.randn(2, 8, 3, 4, 5) * 2 + 1).to(dtype)
    if dtype == torch.bfloat16:
        assert_within_bfloat16_roundings_of_the_original_in_float64(original, converted, x)
    else:
        assert_same_numbers(original, converted, x, _tolerance(dtype))
    assert converted(x).is_contiguous()


def _per_frame_group_mean(t, groups):
    """The mean of each group's channels and positions in each frame of (N, C, T, H, W), spread back."""
    n, c, frames, h, w = t.shape
    per_group = t.reshape(n, groups, c // groups, frames, h * w).mean((2, 4), keepdim=True)
    return per_group.expand(n, groups, c // groups, frames, h * w).reshape(t.shape)


def assert_within_bfloat16_roundings_of_the_original_in_float64(original, converted, x, roundings=3):
    """The converted norm's bfloat16 output, input gradient and parameter gradients against the
    original run in float64 on the same (bfloat16) input and parameters, each element within a
    few bfloat16 roundings of the terms it sums: a fixed tolerance failed about one draw in ten
    (the input gradient subtracts group means, the parameter gradients sum 120 products), for
    the original's own bfloat16 numbers too."""
    ours = run(converted, x, 2, lambda model, x: model(x))
    in_float64 = copy.deepcopy(original).double()
    expected = run(in_float64, x.double(), 2, lambda model, x: model(x))
    groups, x64 = original.num_groups, x.double()
    mean = _per_frame_group_mean(x64, groups)
    rstd = (_per_frame_group_mean((x64 - mean).square(), groups) + original.eps).rsqrt()
    x_hat = (x64 - mean) * rstd
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype).double()  # (run's)
    weight, bias = (None if p is None else p.detach().reshape(1, -1, 1, 1, 1) for p in (in_float64.weight,
                                                                                     in_float64.bias))
    scaled = grad_y if weight is None else grad_y * weight
    unit = roundings * 2.0**-8
    bounds = {"output": unit * ((x_hat if weight is None else x_hat * weight).abs()
                                + (0 if bias is None else bias.abs())),
              "input grad": unit * rstd * (scaled.abs() + _per_frame_group_mean(scaled.abs(), groups)
                                           + x_hat.abs() * _per_frame_group_mean((scaled * x_hat).abs(), groups))}
    if weight is not None:
        bounds.update(weight=unit * (grad_y * x_hat).abs().sum((0, 2, 3, 4)),
                      bias=unit * grad_y.abs().sum((0, 2, 3, 4)))
    found = {"output": ours[0], "input grad": ours[1], **ours[2]}
    wanted = {"output": expected[0], "input grad": expected[1], **expected[2]}
    assert found["output"].dtype == x.dtype and set(ours[2]) == set(expected[2])
    for name, bound in bounds.items():
        error = (found[name].double() - wanted[name]).abs()
        assert (error <= bound).all(), f"{name}: {(error / bound).max()} of the bound"


def _layouts(shape):
    x = torch.randn(shape)
    wide = torch.randn(*shape[:-1], shape[-1] * 2)
    return {"contiguous": x, "channels_last_3d": x.to(memory_format=torch.channels_last_3d),
            "h and w transposed": x.transpose(3, 4).contiguous().transpose(3, 4),
            "frames first": x.transpose(1, 2).contiguous().transpose(1, 2),
            "expanded batch": x[:1].expand(shape), "every other column": wide[..., ::2]}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", [(2, 8, 3, 4, 5), (1, 8, 1, 4, 5), (2, 8, 1, 4, 5), (2, 8, 3, 1, 5), (2, 8, 3, 1, 1),
                                   (2, 8, 1, 1, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "h and w transposed", "frames first",
                                    "expanded batch", "every other column"])
def test_a_converted_per_frame_group_norm_returns_the_originals_layout_on_every_input_layout(layout, shape, affine):
    """The original folds the frames with a permute and a copy, and permutes back with another:
    its output is contiguous on any input, so a later .view runs. Its strides on axes of size 1
    (one frame: the frame axis' C·H·W; one position of channels_last_3d input: channels-last)
    differed from the twin's, which code comparing .stride() sees. Oracle: the original's
    output's strides, and its numbers in float64 (torch's float32 group norm of a channels-last
    group of two elements is off by up to 4e-3)."""
    original = random_parameters(MiniMaxH3VideoGroupNorm(4, 8, affine=affine))
    converted = convert_quietly(copy.deepcopy(original))
    x = _layouts(shape)[layout]
    expected, got = original(x), converted(x)
    torch.testing.assert_close(got, copy.deepcopy(original).double()(x.double()).float(), **TOLERANCE[torch.float32])
    assert got.is_contiguous() == expected.is_contiguous()
    assert got.stride() == expected.stride()
    got.view(shape[0], -1)


def test_a_converted_per_frame_group_norm_pickles_and_keeps_its_class():
    import pickle

    original = random_parameters(MiniMaxH3VideoGroupNorm(4, 8))
    converted = convert_quietly(copy.deepcopy(original))
    loaded = pickle.loads(pickle.dumps(converted))
    assert type(loaded) is nt.PerFrameGroupNorm and "PerFrameGroupNorm" in nt.__all__
    x = torch.randn(2, 8, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(loaded(x), original(x), **TOLERANCE[torch.float32])
    assert loaded(x).is_contiguous()


@pytest.mark.parametrize("groups, channels", [(3, 8), (16, 8)])
def test_a_per_frame_group_norm_of_channels_its_groups_do_not_divide_is_refused_as_the_original(groups, channels):
    """Oracle: diffusers' class (a torch.nn.GroupNorm) refuses to be built, in torch's words."""
    with pytest.raises(ValueError) as expected:
        MiniMaxH3VideoGroupNorm(groups, channels)
    with pytest.raises(type(expected.value)) as got:
        nt.PerFrameGroupNorm(groups, channels)
    assert str(got.value) == str(expected.value)


def assert_opacus_per_sample_gradients_equal_a_loop_over_the_original(original, twin_class, shape):
    """Opacus' GradSampleModule over the converted ``original`` gives the per-sample gradients
    of its weight and bias that autograd gives on the original, one sample at a time."""
    grad_sample = pytest.importorskip("opacus.grad_sample")
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is twin_class
    x, probe = torch.randn(shape), torch.randn(shape)
    probe = probe.reshape(original(x).shape)  # (the output's elements in its shape: xLSTM's norm merges heads)
    sampled = grad_sample.GradSampleModule(torch.nn.Sequential(converted), loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch's "Full backward hook is firing ...": x needs no grad)
        (sampled(x) * probe).sum().backward()
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad((original(x[i:i + 1]) * probe[i:i + 1]).sum(), [original.weight, original.bias])
        for i in range(len(x))))]
    torch.testing.assert_close([converted.weight.grad_sample, converted.bias.grad_sample], looped,
                               **TOLERANCE[torch.float32])


def test_a_converted_per_frame_group_norm_gives_opacus_the_per_sample_gradients_of_a_loop_over_the_original():
    assert_opacus_per_sample_gradients_equal_a_loop_over_the_original(
        random_parameters(MiniMaxH3VideoGroupNorm(4, 8)), nt.PerFrameGroupNorm, (3, 8, 2, 3, 3))


def test_a_converted_per_frame_group_norm_refuses_input_of_another_rank_as_the_original_does():
    original = MiniMaxH3VideoGroupNorm(4, 8)
    converted = convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 8, 4, 5)
    with pytest.raises(ValueError):
        original(x)
    with pytest.raises(RuntimeError, match="b \\(g \\[c\\]\\) t \\[h w\\]"):
        converted(x)


def _tiny_minimax_h3():
    torch.manual_seed(0)
    model = minimax.AutoencoderKLMiniMaxH3(
        block_out_channels=(8, 16), layers_per_block=1, spatial_downsample_factors=(2, 1),
        temporal_downsample_factors=(1, 2), norm_num_groups=4, latent_channels=4, decoder_num_layers=1,
        decoder_num_attention_heads=2, decoder_attention_head_dim=8, latents_mean=(0.0,) * 4,
        latents_std=(1.0,) * 4, clip_length=4, token_drop=0)
    return random_parameters(model)


def _encode(model, x):
    return model.encode(x).latent_dist.mean


def test_a_tiny_minimax_h3_vae_converts_every_norm_keeps_outputs_and_gradients_and_unconverts():
    original = _tiny_minimax_h3()
    converted = convert_quietly(copy.deepcopy(original))
    per_frame = [name for name, m in original.named_modules() if isinstance(m, MiniMaxH3VideoGroupNorm)]
    assert per_frame and all(type(converted.get_submodule(name)) is nt.PerFrameGroupNorm for name in per_frame)
    assert list(converted.state_dict()) == list(original.state_dict())
    assert_same_numbers(original, converted, torch.randn(2, 3, 4, 8, 8), dict(rtol=1e-4, atol=1e-4), call=_encode)
    restored = unconvert_exactly(converted, original)
    for name in per_frame:
        before, after = original.get_submodule(name), restored.get_submodule(name)
        assert type(after) is MiniMaxH3VideoGroupNorm and after.__dict__.keys() == before.__dict__.keys()
        assert list(after._parameters) == list(before._parameters) and list(after._buffers) == list(before._buffers)


def test_a_tiny_minimax_h3_vae_converted_in_bfloat16_gives_its_latents_to_bfloat16_rounding():
    """(Its encoder's weight gradients, summed over many rounded products, are held in the
    float32 test above: diffusers keeps this encoder in float32 where it loads one in bfloat16.)"""
    original = _tiny_minimax_h3().to(torch.bfloat16)
    converted = convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(_encode(converted, x), _encode(original, x), **BFLOAT16)


# ---------------------------------------------------------------------------------------
# Chameleon's per-head QK layer norm


def _chameleon_layer_norm(heads=4, head_dim=8):
    from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

    return random_parameters(ChameleonLayerNorm((heads, head_dim)))


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
                         ids=["float32", "bfloat16", "bfloat16_on_float32_parameters", "float64"])
def test_chameleons_per_head_layer_norm_becomes_a_per_head_layer_norm_with_its_outputs_and_gradients(dtypes):
    """It was left unconverted with a warning: torch's layer norm over each head's head_dim
    values, then a weight and bias of shape (heads, head_dim) in torch operations, which
    promote bfloat16 input beside float32 parameters to float32 (those calls: its bits)."""
    x_dtype, parameter_dtype = dtypes
    original = _chameleon_layer_norm().to(parameter_dtype)
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is nt.PerHeadLayerNorm and converted.pattern == "... h [d]"
    assert list(converted.state_dict()) == list(original.state_dict()) == ["weight", "bias"]
    x = (torch.randn(6, 4, 8) * 2 + 1).to(x_dtype)
    tolerance = None if x_dtype != parameter_dtype else _tolerance(x_dtype)
    assert_same_numbers(original, converted, x, tolerance)


def test_a_converted_chameleon_layer_norm_under_cpu_autocast_gives_the_originals_bits_and_dtype():
    original = _chameleon_layer_norm()
    converted = convert_quietly(copy.deepcopy(original))
    x = torch.randn(6, 4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = original(x), converted(x)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)


HEAD_LAYOUTS = {  # name -> (the base tensor's shape, the input as a view of it)
    "contiguous": ((2, 5, 4, 8), lambda t: t * 1),
    "channels_last": ((2, 5, 4, 8), lambda t: t.to(memory_format=torch.channels_last)),
    "heads and tokens transposed": ((2, 4, 5, 8), lambda t: t.transpose(1, 2)),
    "expanded batch": ((1, 5, 4, 8), lambda t: t.expand(2, 5, 4, 8)),
    "every other column": ((2, 5, 4, 16), lambda t: t[..., ::2]),
}


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_a_converted_chameleon_layer_norm_returns_the_originals_layout_on_every_input_layout(layout):
    """The original's output is torch's layer norm's, contiguous whatever the input's layout;
    the twin's kept a channels_last or transposed input's, so a later .view failed."""
    original = _chameleon_layer_norm()
    converted = convert_quietly(copy.deepcopy(original))
    shape, view = HEAD_LAYOUTS[layout]
    base = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    found = []
    for model in (original, converted):
        x = view(base.clone().requires_grad_())
        x.retain_grad()
        y = model(x)
        y.backward(torch.ones_like(y))
        found.append((y.detach(), y.stride(), x.grad.stride(), y.view(2, -1).shape))
    torch.testing.assert_close(found[1][0], found[0][0], **_tolerance(torch.float32))
    assert found[1][1:] == found[0][1:]


def test_torch_jit_script_compiles_a_converted_chameleon_layer_norm_into_the_scripted_originals_bits():
    """TorchScript compiles ChameleonLayerNorm; the twin raised "torch.jit.script cannot
    compile normlab's PerHeadLayerNorm"."""
    original = _chameleon_layer_norm()
    converted = convert_quietly(torch.nn.Sequential(copy.deepcopy(original)))
    expected, scripted = torch.jit.script(torch.nn.Sequential(original)), torch.jit.script(converted)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # (the first calls profile, the later ones run TorchScript's optimized graph)
        found = []
        for model in (expected, scripted, loaded):
            leaf = x.clone().requires_grad_()
            y = model(leaf)
            y.backward(torch.ones_like(y))
            found.append((y, leaf.grad, [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
        torch.testing.assert_close(found[1], found[0], rtol=0, atol=0)
        torch.testing.assert_close(found[2], found[0], rtol=0, atol=0)
    assert scripted[0].weight is converted[0].weight


def test_a_converted_chameleon_layer_norm_gives_opacus_the_per_sample_gradients_of_a_loop_over_the_original():
    assert_opacus_per_sample_gradients_equal_a_loop_over_the_original(
        _chameleon_layer_norm(), nt.PerHeadLayerNorm, (5, 3, 4, 8))


def _tiny_chameleon():
    from transformers import ChameleonConfig, ChameleonModel

    torch.manual_seed(0)
    config = ChameleonConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocabulary_map={"<image>": 63},
        vq_config=dict(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=16, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1))
    return random_parameters(ChameleonModel(config))


def _last_hidden_state(model, ids):
    return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_tiny_chameleon_converts_its_qk_norms_keeps_outputs_and_gradients_and_unconverts(dtype):
    from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

    original = _tiny_chameleon().to(dtype)
    converted = convert_quietly(copy.deepcopy(original))
    per_head = [name for name, m in original.named_modules() if isinstance(m, ChameleonLayerNorm)]
    assert len(per_head) == 4 and all(type(converted.get_submodule(name)) is nt.PerHeadLayerNorm
                                      for name in per_head)
    assert list(converted.state_dict()) == list(original.state_dict())
    ids = torch.randint(0, 60, (2, 5), generator=torch.Generator().manual_seed(1))
    # (the embedding's gradient is the input's here; bfloat16: the logits' rounding, carried through two layers)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for model in (original, converted):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_last_hidden_state(converted, ids), _last_hidden_state(original, ids), **tolerance)
    original.train(), converted.train()
    grads = []
    for model in (original, converted):
        model.zero_grad()
        _last_hidden_state(model, ids).float().square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if "norm" in name and p.grad is not None})
    assert list(grads[1]) == list(grads[0])
    torch.testing.assert_close(grads[1], grads[0], **(dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32
                                                      else dict(rtol=1e-1, atol=1e-1)))
    restored = unconvert_exactly(converted, original)
    for name in per_head:
        before, after = original.get_submodule(name), restored.get_submodule(name)
        assert type(after) is ChameleonLayerNorm and after.__dict__.keys() == before.__dict__.keys()


# ---------------------------------------------------------------------------------------
# xLSTM's multi-head layer norm


def _xlstm_layer_norm(heads=4, head_dim=8, use_bias=True, in_float32=True):
    from transformers.models.xlstm.modeling_xlstm import xLSTMMultiHeadLayerNorm

    return random_parameters(xLSTMMultiHeadLayerNorm(heads, head_dim, eps=1e-5, use_bias=use_bias,
                                                     force_float32_reductions=in_float32))


def _heads_input(dtype, shape=(3, 5, 4, 8)):
    """As xLSTM's mLSTM layer hands its norm the heads: (batch, heads, sequence, head_dim) transposed."""
    batch, sequence, heads, head_dim = shape
    return (torch.randn(batch, heads, sequence, head_dim) * 2 + 1).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("in_float32", [True, False], ids=["float32_reductions", "input_dtype_reductions"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64)],
                         ids=["float32", "bfloat16", "float16", "bfloat16_on_float32_parameters", "float64"])
def test_xlstms_multi_head_layer_norm_becomes_a_multi_head_layer_norm_with_its_outputs_and_gradients(
        dtypes, use_bias, in_float32):
    """It was left unconverted with a warning: the layer norm of each head of (batch, sequence,
    heads, head_dim) input, in float32 or the input's dtype, cast to the input's dtype, the
    heads merged, then a weight (and a bias) over them in torch operations. Calls that round
    otherwise than the kernels (half precision, float64 normalized in float32, parameters that
    promote) take its operations: its bits."""
    x_dtype, parameter_dtype = dtypes
    original = _xlstm_layer_norm(use_bias=use_bias, in_float32=in_float32).to(parameter_dtype)
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is nt.MultiHeadLayerNorm and converted.pattern == "b s h [d]"
    assert (converted.num_heads, converted.head_dim, converted.force_float32_reductions) == (4, 8, in_float32)
    assert list(converted.state_dict()) == list(original.state_dict()) == ["weight", "bias"][:1 + use_bias]
    on_the_kernels = x_dtype == parameter_dtype and (x_dtype == torch.float32 or (
        x_dtype == torch.float64 and not in_float32))
    assert_same_numbers(original, converted, _heads_input(x_dtype), _tolerance(x_dtype) if on_the_kernels else None)
    assert converted(_heads_input(x_dtype)).is_contiguous()


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (2, 5, 4, 6), (5, 4, 8)], ids=["heads", "head_dim", "rank"])
def test_a_converted_xlstm_layer_norm_refuses_other_shapes_in_the_originals_type_and_words(shape):
    original = _xlstm_layer_norm()
    converted = convert_quietly(copy.deepcopy(original))
    x = torch.randn(shape)
    with pytest.raises(ValueError) as expected:
        original(x)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        converted(x)


def _scripted_results(model, x):
    found = []
    for _ in range(3):  # (the first calls profile, the later ones run TorchScript's optimized graph)
        leaf = x.clone().requires_grad_()
        y = model(leaf)
        y.backward(torch.ones_like(y))
        found.append((y, leaf.grad, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("use_bias, in_float32", [(True, True), (False, False)], ids=["bias", "no_bias_input_dtype"])
def test_torch_jit_script_compiles_a_converted_xlstm_layer_norm_into_the_scripted_originals_bits(use_bias, in_float32,
                                                                                                 dtype):
    """TorchScript compiles xLSTMMultiHeadLayerNorm; the twin raised "torch.jit.script cannot
    compile normlab's MultiHeadLayerNorm"."""
    original = _xlstm_layer_norm(use_bias=use_bias, in_float32=in_float32).to(dtype)
    converted = convert_quietly(torch.nn.Sequential(copy.deepcopy(original)))
    expected, scripted = torch.jit.script(torch.nn.Sequential(original)), torch.jit.script(converted)
    x = torch.randn(2, 5, 4, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.testing.assert_close(_scripted_results(scripted, x), _scripted_results(expected, x), rtol=0, atol=0)
    assert scripted[0].weight is converted[0].weight
    with pytest.raises(torch.jit.Error, match="Expected 4 heads, got 3"):
        scripted(torch.randn(2, 5, 3, 8).to(dtype))


def test_a_converted_xlstm_layer_norm_gives_opacus_the_per_sample_gradients_of_a_loop_over_the_original():
    assert_opacus_per_sample_gradients_equal_a_loop_over_the_original(
        _xlstm_layer_norm(), nt.MultiHeadLayerNorm, (5, 3, 4, 8))


def _tiny_xlstm():
    from transformers import xLSTMConfig, xLSTMModel

    torch.manual_seed(0)
    config = xLSTMConfig(vocab_size=50, hidden_size=32, embedding_dim=32, num_heads=2, num_blocks=2,
                         num_hidden_layers=2, use_bias=True, mode="train", chunk_size=4,
                         ffn_round_up_to_multiple_of=16, use_cache=False)
    return random_parameters(xLSTMModel(config))


def test_a_tiny_xlstm_converts_every_norm_trains_a_step_as_the_original_and_unconverts():
    from transformers.models.xlstm.modeling_xlstm import xLSTMMultiHeadLayerNorm

    original = _tiny_xlstm()
    converted = convert_quietly(copy.deepcopy(original))
    heads = [name for name, m in original.named_modules() if isinstance(m, xLSTMMultiHeadLayerNorm)]
    assert len(heads) == 2 and all(type(converted.get_submodule(name)) is nt.MultiHeadLayerNorm for name in heads)
    assert list(converted.state_dict()) == list(original.state_dict())
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (original, converted):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = _last_hidden_state(model, ids).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **TOLERANCE[torch.float32])
    for name, expected in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], expected, rtol=1e-4, atol=1e-5,
                                   msg=lambda message: f"{name}: {message}")
    restored = unconvert_exactly(converted, original)
    for name in heads:
        before, after = original.get_submodule(name), restored.get_submodule(name)
        assert type(after) is xLSTMMultiHeadLayerNorm and after.__dict__.keys() == before.__dict__.keys()


# ---------------------------------------------------------------------------------------
# under torch.func, torch.export and torch.compile

PATTERN_NORMS = {  # name -> (the original, a sample's shape)
    "minimax_h3_per_frame_group_norm": (lambda: MiniMaxH3VideoGroupNorm(4, 8, eps=1e-6), (8, 3, 2, 3)),
    "chameleon_per_head_layer_norm": (_chameleon_layer_norm, (5, 4, 8)),
    "xlstm_multi_head_layer_norm": (_xlstm_layer_norm, (5, 4, 8)),
}


def _pair(name):
    make, shape = PATTERN_NORMS[name]
    original = random_parameters(make())
    return original, convert_quietly(copy.deepcopy(original)), shape


@pytest.mark.parametrize("name", list(PATTERN_NORMS))
def test_vmap_jacrev_and_jacfwd_of_a_converted_pattern_norm_match_the_originals(name):
    original, converted, shape = _pair(name)
    x = torch.randn(3, *shape, dtype=torch.float64)
    original, converted = original.double(), converted.double()
    found = []
    for model in (original, converted):
        per_sample = torch.func.vmap(lambda row: model(row.unsqueeze(0)).squeeze(0))(x)
        grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(
            dict(model.named_parameters()))
        found.append((per_sample, grads, torch.func.jacrev(model)(x[:1]), torch.func.jacfwd(model)(x[:1])))
    torch.testing.assert_close(found[1], found[0], rtol=1e-10, atol=1e-12)


# (xLSTM's forward branches on its input's values, so fx traces it inside a model alone, as the twin)
@pytest.mark.parametrize("name", ["minimax_h3_per_frame_group_norm", "chameleon_per_head_layer_norm"])
def test_fx_traces_a_converted_pattern_norm_as_the_root_module_into_the_originals_operations_which_save(name):
    """fx traces these originals themselves; the twins raised TypeError "torch.fx traces ...
    inside a model, not as the root module"."""
    original, converted, shape = _pair(name)
    expected, graph = torch.fx.symbolic_trace(original), torch.fx.symbolic_trace(converted)
    assert [n.op for n in graph.graph.nodes].count("placeholder") == 1
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for size in (2, 3):
        x = torch.randn(size, *shape)
        for traced in (graph, loaded):
            y = traced(x)
            assert torch.equal(y, expected(x)) and y.stride() == expected(x).stride()


@pytest.mark.parametrize("name", list(PATTERN_NORMS))
def test_an_exported_converted_pattern_norm_gives_the_originals_outputs_at_other_batch_sizes(name):
    original, converted, shape = _pair(name)
    exported = torch.export.export(converted, (torch.randn(2, *shape),),
                                   dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    assert not any("normlab" in str(n.target) for n in exported.graph.nodes if n.op == "call_function")
    for size in (3, 5):
        x = torch.randn(size, *shape)
        torch.testing.assert_close(exported.module()(x), original(x), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", list(PATTERN_NORMS))
def test_a_compiled_converted_pattern_norm_gives_the_originals_outputs_and_gradients(name):
    original, converted, shape = _pair(name)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, *shape)
    found = []
    for model in (original, compiled):
        probe = x.clone().requires_grad_()
        y = model(probe)
        y.backward(torch.ones_like(y))
        found.append((y.detach(), probe.grad))
    torch.testing.assert_close(found[1], found[0], **TOLERANCE[torch.float32])
