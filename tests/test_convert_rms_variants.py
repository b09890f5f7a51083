"""convert() on RMS norms shaped otherwise than transformers' ones: diffusers' ``RMSNorm`` with
a bias (Sana's GLUMBConv, DC-AE), Stable Audio 3's with its weight named ``gamma``, and timm's channels-first ``RmsNorm2d`` and
``RmsNorm2dFp32`` (faithful copies in tests/mirrored_norms.py: timm cannot be imported here).
The oracles are the original classes, with random parameters, and small models built from
them (a diffusers model from its config), run unconverted on the same inputs with torch's
autograd through them."""

import copy
import io

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import TimmRmsNorm2d, TimmRmsNorm2dFp32  # noqa: E402
from tests.test_convert_models import (assert_same_numbers, convert_quietly, converted_copy, random_parameters,  # noqa: E402
                                       unconvert_exactly)

HALF = dict(rtol=1.6e-2, atol=1e-2)  # the kernels' path: within a rounding of the input's dtype
DTYPES = {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.bfloat16),
          "float16": (torch.float16, torch.float16), "bfloat16_on_float32_weight": (torch.bfloat16, torch.float32)}


try:
    from diffusers.models import normalization
except ImportError:
    normalization = None
needs_diffusers = pytest.mark.skipif(normalization is None, reason="diffusers is not installed")


def _biased_rms_norm(dtype=torch.float32):
    return random_parameters(normalization.RMSNorm(24, 1e-5, elementwise_affine=True, bias=True)).to(dtype)


@needs_diffusers
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_diffusers_rms_norm_with_a_bias_becomes_a_biased_rms_norm_with_its_outputs_and_gradients_to_the_bit(dtypes):
    """It was left unconverted with a warning that it computes something no normlab module
    does: it is the "t5" recipe (the input scaled in float32 by promotion, cast to a half
    weight's dtype, then weighed) followed by ``+ bias``."""
    x_dtype, w_dtype = dtypes
    original = _biased_rms_norm(w_dtype)
    converted = converted_copy(original)
    assert type(converted) is nt.BiasedRMSNorm and (converted.casting, converted.eps) == ("t5", 1e-5)
    assert list(converted.state_dict()) == list(original.state_dict()) == ["weight", "bias"]
    x = (torch.randn(3, 5, 24) * 2 + 0.5).to(x_dtype)
    assert_same_numbers(original, converted, x, None)
    with nt.use_path("kernel"):
        assert_same_numbers(original, converted, x, HALF)


@needs_diffusers
def test_a_biased_rms_norm_adds_its_bias_once_with_a_mask():
    """The masked path normalizes on the kernels: with every element counted it gives the
    original's numbers to float rounding, its bias added once."""
    original = _biased_rms_norm()
    converted = converted_copy(original)
    x = torch.randn(3, 5, 24) * 2 + 0.5
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(converted(x, mask=torch.ones(3, 5, 24, dtype=torch.bool)), expected)
        converted.casting = None  # (torch.nn.RMSNorm's own casts, which equal t5's in float32)
        torch.testing.assert_close(converted(x, mask=torch.ones(3, 5, 24, dtype=torch.bool)), expected)


def _dc_ae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)))


@needs_diffusers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_small_dc_ae_converted_gives_the_original_s_outputs_and_gradients_to_the_bit_and_unconverts_exactly(dtype):
    """DC-AE (Sana's autoencoder) normalizes with diffusers' RMSNorm(..., bias=True) in its
    ResBlocks, GLUMBConvs and output norm: all were left alone, with a warning. unconvert
    gives each its diffusers class back, with the same Parameter objects and attributes."""
    original = random_parameters(_dc_ae()).to(dtype)
    converted = convert_quietly(copy.deepcopy(original))
    assert {type(m).__name__ for m in converted.modules() if "Norm" in type(m).__name__} == {"BiasedRMSNorm"}
    assert_same_numbers(original, converted, torch.randn(1, 3, 8, 8).to(dtype), None,
                        call=lambda model, x: model(x).sample)
    restored = unconvert_exactly(converted, original)
    for (name, norm), kept in zip(restored.named_modules(), original.modules()):
        if type(norm) is normalization.RMSNorm:  # (diffusers' own attributes and parameter names, no more)
            assert vars(norm).keys() == vars(kept).keys() and list(norm._parameters) == ["weight", "bias"], name
    with torch.no_grad():
        x = torch.randn(1, 3, 8, 8).to(dtype)
        assert torch.equal(restored(x).sample, original(x).sample)
    saved = io.BytesIO()
    torch.save(restored, saved)
    assert b"normlab" not in saved.getvalue()


# ---------------------------------------------------------------------------------------
# Stable Audio 3's RMS norm, whose weight is named gamma

try:
    from diffusers.models.transformers import transformer_stable_audio3 as stable_audio3
except ImportError:  # (diffusers too old for it, or not installed)
    stable_audio3 = None
needs_stable_audio3 = pytest.mark.skipif(stable_audio3 is None, reason="this diffusers has no Stable Audio 3")


@needs_stable_audio3
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_stable_audio_3s_rms_norm_becomes_a_gamma_rms_norm_with_its_outputs_and_gradients_to_the_bit(dtypes):
    """It was left unconverted with a warning that it computes something no normlab module
    does: it is the "gemma" recipe without an offset (x̂ and its weight in float32, cast once),
    with its weight registered as ``gamma``."""
    x_dtype, w_dtype = dtypes
    original = random_parameters(stable_audio3.StableAudio3RMSNorm(24, eps=1e-6)).to(w_dtype)
    converted = converted_copy(original)
    assert type(converted) is nt.GammaRMSNorm and (converted.casting, converted.eps) == ("gemma", 1e-6)
    assert list(converted.state_dict()) == list(original.state_dict()) == ["gamma"]
    assert converted.weight is converted.gamma
    x = (torch.randn(3, 5, 24) * 2 + 0.5).to(x_dtype)
    assert_same_numbers(original, converted, x, None)
    with nt.use_path("kernel"):
        assert_same_numbers(original, converted, x, HALF)
    with torch.no_grad():  # (mask= normalizes on the kernels: with every element counted, the same numbers)
        torch.testing.assert_close(converted(x, mask=torch.ones(3, 5, 24, dtype=torch.bool)), original(x), **HALF)


@needs_stable_audio3
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_stable_audio_3s_rms_norm_computing_in_the_inputs_dtype_becomes_a_gamma_rms_norm_with_its_bits(dtypes):
    """``force_fp32=False`` was left unconverted with a warning: it computes every step in the
    input's dtype and casts its weight to it (a float32 weight on bfloat16 input gives
    bfloat16, where "none" promotes to float32), the "input_dtype" recipe. Scripted, as the
    original scripts, it gives the scripted original's numbers."""
    x_dtype, w_dtype = dtypes
    original = random_parameters(stable_audio3.StableAudio3RMSNorm(24, eps=1e-6, force_fp32=False)).to(w_dtype)
    converted = converted_copy(original)
    assert type(converted) is nt.GammaRMSNorm and (converted.casting, converted.eps) == ("input_dtype", 1e-6)
    assert list(converted.state_dict()) == list(original.state_dict()) == ["gamma"]
    x = (torch.randn(3, 5, 24) * 2 + 0.5).to(x_dtype)
    assert_same_numbers(original, converted, x, None)
    with nt.use_path("kernel"):  # (each step rounded in the input's dtype there, once on the kernels)
        assert_same_numbers(original, converted, x, dict(rtol=1.6e-2, atol=5e-2))
    with torch.no_grad():
        assert_bits(torch.jit.script(converted)(x), torch.jit.script(original)(x))
        torch.testing.assert_close(converted(x, mask=torch.ones(3, 5, 24, dtype=torch.bool)), original(x),
                                   rtol=1.6e-2, atol=5e-2)


def assert_bits(actual, expected):
    assert actual.dtype == expected.dtype and torch.equal(actual, expected), (actual - expected).abs().max()


@needs_stable_audio3
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
def test_fx_traces_stable_audio_3s_rms_norm_in_the_inputs_dtype_as_the_root_module_into_the_originals_bits(dtypes):
    """fx traces StableAudio3RMSNorm(force_fp32=False) itself; the twin raised TypeError "torch.fx
    traces an RMSNorm with a casting recipe or weight_offset inside a model, not as the root
    module"."""
    x_dtype, w_dtype = dtypes
    original = random_parameters(stable_audio3.StableAudio3RMSNorm(24, eps=1e-6, force_fp32=False)).to(w_dtype)
    expected, graph = torch.fx.symbolic_trace(original), torch.fx.symbolic_trace(converted_copy(original))
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = (torch.randn(3, 5, 24) * 2 + 0.5).to(x_dtype)
    for traced in (graph, loaded):
        assert_bits(traced(x), expected(x))


def test_a_gamma_rms_norm_reads_and_sets_its_weight_as_gamma():
    norm = nt.GammaRMSNorm(4, eps=1e-6, casting="gemma")
    assert list(norm.state_dict()) == ["gamma"] and norm.weight is norm.gamma
    norm.weight = torch.nn.Parameter(torch.full((4,), 2.0))
    assert list(norm.state_dict()) == ["gamma"] and torch.equal(norm.gamma, torch.full((4,), 2.0))
    x = torch.randn(3, 4)
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, [4], torch.full((4,), 2.0), 1e-6))
    assert torch.jit.script(norm)(x).equal(norm(x))


@needs_stable_audio3
@pytest.mark.parametrize("force_fp32", [True, False], ids=["in_float32", "in_the_inputs_dtype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_small_stable_audio_3_dit_converted_gives_its_outputs_and_gradients_to_the_bit_and_unconverts_exactly(
        dtype, force_fp32):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    original = random_parameters(diffusers.StableAudio3DiTModel(
        io_channels=4, embed_dim=16, depth=1, num_heads=2, cond_token_dim=8, global_cond_dim=8, local_add_cond_dim=3,
        timestep_features_dim=8, ff_mult=2.0, num_memory_tokens=2)).to(dtype)
    for norm in original.modules():
        if type(norm) is stable_audio3.StableAudio3RMSNorm:
            norm.force_fp32 = force_fp32
    converted = convert_quietly(copy.deepcopy(original))
    assert {type(m).__name__ for m in converted.modules() if "Norm" in type(m).__name__} == {"GammaRMSNorm"}
    conditions = dict(timestep=torch.tensor([0.3]), encoder_hidden_states=torch.randn(1, 3, 8).to(dtype),
                      global_hidden_states=torch.randn(1, 8).to(dtype))
    assert_same_numbers(original, converted, torch.randn(1, 4, 6).to(dtype), None,
                        call=lambda model, x: model(x, **conditions).sample)
    restored = unconvert_exactly(converted, original)
    for (name, norm), kept in zip(restored.named_modules(), original.modules()):
        if type(norm) is stable_audio3.StableAudio3RMSNorm:  # (its own attributes and parameter name, no more)
            assert vars(norm).keys() == vars(kept).keys() and list(norm._parameters) == ["gamma"], name


# ---------------------------------------------------------------------------------------
# timm's channels-first RMS norms

TIMM_2D = {"rms_norm_2d": (TimmRmsNorm2d, "none"), "rms_norm_2d_fp32": (TimmRmsNorm2dFp32, "float32")}


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_weight"])
@pytest.mark.parametrize("name", TIMM_2D)
def test_timms_channels_first_rms_norms_become_rms_norm_2d_with_their_outputs_and_gradients_to_the_bit(
        name, affine, dtypes):
    """They were left unconverted with a warning that they compute something no normlab
    module does: x · rsqrt(mean over the channels of x² + eps) · weight, everything in the
    input's dtype (RmsNorm2d) or on the input and weight upcast to float32 (RmsNorm2dFp32)."""
    cls, casting = TIMM_2D[name]
    x_dtype, w_dtype = dtypes
    original = random_parameters(cls(24, affine=affine)).to(w_dtype)
    converted = converted_copy(original)
    assert type(converted) is nt.RMSNorm2d and (converted.casting, converted.eps) == (casting, 1e-6)
    assert list(converted.state_dict()) == list(original.state_dict())
    x = (torch.randn(2, 24, 3, 4) * 2 + 0.5).to(x_dtype)
    assert_same_numbers(original, converted, x, None)
    assert_same_numbers(original, converted, x.to(memory_format=torch.channels_last), None)
    if not affine:  # (any input of two or more axes, channels second)
        assert_same_numbers(original, converted, (torch.randn(3, 24, 5) * 2 + 0.5).to(x_dtype), None)
    with nt.use_path("kernel"):  # ("none" rounds each step in bfloat16, where the kernels round once: a
        # weight's gradient sums 24 products, each within 3 bfloat16 units of timm's)
        assert_same_numbers(original, converted, x, dict(rtol=1.6e-2, atol=5e-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_small_cnn_with_timms_rms_norm_2d_converted_gives_its_outputs_and_gradients_to_the_bit(dtype):
    torch.manual_seed(0)
    original = random_parameters(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), TimmRmsNorm2d(8), torch.nn.GELU(), torch.nn.Conv2d(8, 16, 3, stride=2),
        TimmRmsNorm2dFp32(16), torch.nn.GELU(), TimmRmsNorm2d(16, affine=False))).to(dtype)
    converted = convert_quietly(copy.deepcopy(original))
    assert [type(m).__name__ for m in converted if "Norm" in type(m).__name__] == ["RMSNorm2d"] * 3
    assert_same_numbers(original, converted, torch.randn(2, 3, 8, 8).to(dtype), None)
    scripted = torch.jit.script(converted)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    with torch.no_grad():
        assert torch.equal(scripted(x), original(x))


# ---------------------------------------------------------------------------------------
# LTX-2's channels-first RMS norms without a weight (its video and audio VAEs)

try:
    from diffusers.models.autoencoders import autoencoder_kl_ltx2 as ltx2_video
    from diffusers.models.autoencoders import autoencoder_kl_ltx2_audio as ltx2_audio
except ImportError:  # (diffusers too old for LTX-2, or not installed)
    ltx2_video = ltx2_audio = None
needs_ltx2 = pytest.mark.skipif(ltx2_video is None, reason="this diffusers has no LTX-2")

LTX2_NORMS = {
    "per_channel_rms_norm": lambda: ltx2_video.PerChannelRMSNorm(),
    "per_channel_rms_norm_eps": lambda: ltx2_video.PerChannelRMSNorm(channel_dim=1, eps=1e-6),
    "audio_pixel_norm": lambda: ltx2_audio.LTX2AudioPixelNorm(dim=1, eps=1e-6),
}
LOW_PRECISION = dict(rtol=1.6e-2, atol=5e-2)  # (every step rounded in the input's dtype, once on the kernels)


@needs_ltx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", LTX2_NORMS)
def test_ltx2s_channels_first_rms_norms_become_unweighted_rms_norms_with_their_outputs_and_gradients_to_the_bit(
        name, dtype):
    """They were left unconverted with a warning that they compute something no normlab
    module does: x / sqrt(mean over the channels of x² + eps), every step in the input's
    dtype (the "imagegpt" recipe, over axis 1), no weight; PerChannelRMSNorm's forward
    takes a channel_dim it ignores, and so does the twin."""
    original = LTX2_NORMS[name]()
    converted = converted_copy(original)
    assert type(converted) is nt.UnweightedRMSNorm
    assert (converted.casting, converted.normalized_dim, converted.eps) == ("imagegpt", 1, original.eps)
    assert list(converted.state_dict()) == list(original.state_dict()) == []
    for shape in [(2, 8, 3, 4), (2, 8, 2, 3, 4), (2, 8, 5)]:
        x = (torch.randn(shape) * 2 + 0.5).to(dtype)
        assert_same_numbers(original, converted, x, None)
        with nt.use_path("kernel"):
            assert_same_numbers(original, converted, x, LOW_PRECISION)
    x = (torch.randn(2, 8, 3, 4) * 2 + 0.5).to(dtype)
    assert_same_numbers(original, converted, x.to(memory_format=torch.channels_last), None)
    if name.startswith("per_channel"):
        for channel_dim in (None, 1, 2, -1):
            assert_bits(converted(x, channel_dim), original(x, channel_dim))
        with pytest.raises(TypeError, match="channel_dim"):  # (a mask, as other twins take second)
            converted(x, torch.ones(2, 8, 3, 4, dtype=torch.bool))


@needs_ltx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_ltx2s_audio_pixel_norm_scripted_converted_gives_the_scripted_originals_bits(dtype):
    original = ltx2_audio.LTX2AudioPixelNorm(dim=1, eps=1e-6)
    expected_model, actual_model = torch.jit.script(original), torch.jit.script(converted_copy(original))
    x = (torch.randn(2, 8, 3, 4) * 2 + 0.5).to(dtype)
    grad = torch.randn(x.shape).to(dtype)
    for _ in range(3):  # (the first calls profile, the later ones run TorchScript's optimized graph)
        results = []
        for model in (expected_model, actual_model):
            leaf = x.clone().requires_grad_()
            y = model(leaf)
            y.backward(grad)
            results.append((y, leaf.grad))
        for actual, expected in zip(*results[::-1]):
            assert_bits(actual, expected)


class _PassesChannelDim(torch.nn.Module):
    """A block that hands its norm a channel_dim, positionally or by name."""

    def __init__(self, norm, by_name):
        super().__init__()
        self.norm, self.by_name = norm, by_name

    def forward(self, x):
        return self.norm(x * 2, channel_dim=1) if self.by_name else self.norm(x * 2, 1)


@needs_ltx2
@pytest.mark.parametrize("by_name", [False, True], ids=["positional", "keyword"])
def test_fx_traces_a_model_handing_a_converted_per_channel_rms_norm_its_channel_dim_as_the_original(by_name):
    """fx recorded the twin's call by passing channel_dim on positionally to a helper that
    takes keywords alone: TypeError "_fx_call_module() takes 2 positional arguments but 3 were given"."""
    original = ltx2_video.PerChannelRMSNorm(eps=1e-6)
    expected = torch.fx.symbolic_trace(_PassesChannelDim(original, by_name))
    actual = torch.fx.symbolic_trace(_PassesChannelDim(converted_copy(original), by_name))
    x = torch.randn(2, 8, 3, 4)
    assert_bits(actual(x), expected(x))


@needs_ltx2
def test_fx_traces_a_converted_ltx2_audio_pixel_norm_as_the_root_module_as_the_original_into_a_graph_that_saves():
    """fx traces LTX2AudioPixelNorm itself; the twin raised TypeError "_fx_call_module() takes
    2 positional arguments but 3 were given" (fx makes its channel_dim a placeholder)."""
    original = ltx2_audio.LTX2AudioPixelNorm(dim=1, eps=1e-6)
    expected, graph = torch.fx.symbolic_trace(original), torch.fx.symbolic_trace(converted_copy(original))
    assert [n.op for n in graph.graph.nodes].count("placeholder") == 1
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 8, 3, 4) * 2 + 0.5).to(dtype)
        for traced in (graph, loaded):
            assert_bits(traced(x), expected(x))


@needs_ltx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_small_ltx2_video_and_audio_vaes_converted_give_their_outputs_and_gradients_to_the_bit_and_unconvert(dtype):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    video = random_parameters(diffusers.AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("LTX2VideoDownBlock3D", "LTX2VideoDownBlock3D"), decoder_block_out_channels=(8, 16),
        layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True), decoder_inject_noise=(False, False, False),
        downsample_type=("spatial", "spatiotemporal"), upsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True), upsample_factor=(2, 2), patch_size=1)).to(dtype)
    audio = random_parameters(diffusers.AutoencoderKLLTX2Audio(
        base_channels=8, output_channels=2, ch_mult=(1, 2), num_res_blocks=1, in_channels=2, resolution=16,
        latent_channels=4, mel_bins=16)).to(dtype)
    for original, x, norm_class in ((video, torch.randn(1, 3, 5, 8, 8), ltx2_video.PerChannelRMSNorm),
                                    (audio, torch.randn(1, 2, 8, 16), ltx2_audio.LTX2AudioPixelNorm)):
        converted = convert_quietly(copy.deepcopy(original))
        assert {type(m).__name__ for m in converted.modules() if "Norm" in type(m).__name__} == {"UnweightedRMSNorm"}
        assert_same_numbers(original, converted, x.to(dtype), None, call=lambda model, x: model(x).sample)
        restored = unconvert_exactly(converted, original)
        for (name, norm), kept in zip(restored.named_modules(), original.modules()):
            if type(norm) is norm_class:  # (its own attributes, no more)
                assert vars(norm).keys() == vars(kept).keys(), name
