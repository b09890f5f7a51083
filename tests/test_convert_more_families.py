"""convert() on more of transformers' norm classes: RMS norms without a weight (over the
last axis, whatever its size), Qwen3-Next's and Bailing's gated RMS norms, DeBERTa's layer
norm (divides by sqrt, casts before its weight), ImageGPT's RMS norm (divides by sqrt in
the input's dtype) and VitDet's channels-first layer norm. The
oracles are those classes, built with random parameters, and small models built from their
configs, run unconverted on the same inputs with torch's autograd through them; VitDet's
norm, which rounds its own way, is held to torch's float64 layer norm instead."""

import copy
import gc
import importlib
import io
import warnings
import weakref

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch.nn import functional as F  # noqa: E402
from transformers.models.bailing_hybrid.modeling_bailing_hybrid import BailingHybridRMSNormGated  # noqa: E402
from transformers.models.deberta.modeling_deberta import DebertaLayerNorm  # noqa: E402
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4UnweightedRMSNorm  # noqa: E402
from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated  # noqa: E402
from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaWeightlessRMSNorm  # noqa: E402
from transformers.models.hy_v4.modeling_hy_v4 import HYV4UnweightedRMSNorm  # noqa: E402
from transformers.models.imagegpt.modeling_imagegpt import ImageGPTLayerNorm  # noqa: E402
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearRMSNormGated  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm  # noqa: E402
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridRMSNormGated  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated  # noqa: E402
from transformers.models.vitdet.modeling_vitdet import VitDetLayerNorm  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import TimmRmsNorm  # noqa: E402
from tests.test_convert_models import (  # noqa: E402
    DTYPES, assert_same_numbers, convert_quietly, converted_copy, random_parameters, types_in,
)



def _newer_class(model: str, name: str):
    """A norm class of a model family that older transformers releases lack (Python 3.10
    gets transformers 5.20, which has neither Dory nor Inkling2): None there, and its
    cases skip, saying so."""
    try:
        return getattr(importlib.import_module(f"transformers.models.{model}.modeling_{model}"), name)
    except ModuleNotFoundError:
        return None


def _needs(cls, model: str):
    return pytest.mark.skipif(cls is None, reason=f"transformers {transformers.__version__} has no {model} model")


DoryL2Norm = _newer_class("dory", "DoryL2Norm")
Inkling2UnweightedRMSNorm = _newer_class("inkling2", "Inkling2UnweightedRMSNorm")
PocketTTSFlowLayerNorm = _newer_class("pocket_tts", "PocketTTSFlowLayerNorm")
GradiumPhononTTSFlowLayerNorm = _newer_class("gradium_phonon_tts", "GradiumPhononTTSFlowLayerNorm")
PeAudioMaskedGroupNorm = _newer_class("pe_audio", "PeAudioMaskedGroupNorm")
Emu3VQVAEGroupNorm = _newer_class("emu3", "Emu3VQVAEGroupNorm")

DTYPE_IDS = ["float32", "bfloat16", "bfloat16_on_float32_weight"]
BFLOAT16 = dict(rtol=1.6e-2, atol=1e-2)

# ---------------------------------------------------------------------------------------
# RMS norms without a weight

UNWEIGHTED = {
    "llama4_l2_norm": (lambda: Llama4TextL2Norm(1e-6), "llama"),
    "deepseek_v4": (lambda: DeepseekV4UnweightedRMSNorm(1e-6), "deepseek"),
    "falcon_mamba": (lambda: FalconMambaWeightlessRMSNorm(24, eps=1e-6), "llama"),  # (an unused buffer of ones)
    "inkling2": (lambda: Inkling2UnweightedRMSNorm(1e-5), "llama"),
    # LTX-Video's VAE: llama's outputs, but the input enters x · rsqrt(...) in its own dtype,
    # which rounds its bfloat16 gradient otherwise
    "diffusers_rms_norm": (lambda: _diffusers_normalization.RMSNorm(24, 1e-6, elementwise_affine=False), "diffusers"),
    # timm's (EVA's and MobileNetV5's family of layers): x · rsqrt(mean(x²) + eps) in the input's dtype
    "timm_rms_norm": (lambda: TimmRmsNorm(24, affine=False), "none"),
}
try:
    from diffusers.models import normalization as _diffusers_normalization
except ImportError:
    _diffusers_normalization = None
NEEDS = {"inkling2": _needs(Inkling2UnweightedRMSNorm, "inkling2"),
         "diffusers_rms_norm": pytest.mark.skipif(_diffusers_normalization is None, reason="diffusers is not installed")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", [pytest.param(name, marks=NEEDS.get(name, ())) for name in UNWEIGHTED])
def test_rms_norms_without_a_weight_become_unweighted_rms_norms_matching_to_the_bit_at_any_size(name, dtype):
    make, casting = UNWEIGHTED[name]
    original = make()
    converted = convert_quietly(original)
    assert type(converted) is nt.UnweightedRMSNorm
    assert (converted.casting, converted.eps) == (casting, original.eps)
    assert converted.state_dict().keys() == original.state_dict().keys()
    for shape in [(3, 5, 24), (2, 96), (7, 1)]:  # the last axis's size is the input's own
        assert_same_numbers(original, converted, (torch.randn(shape) * 2 + 0.5).to(dtype), None)


@pytest.mark.skipif(_diffusers_normalization is None, reason="diffusers is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
def test_diffusers_mochi_rms_norm_becomes_the_mochi_recipe_with_its_gradients_to_the_bit(dtype):
    """MochiRMSNorm scales the input itself (promoted to float32), then the weight in float32,
    and casts once: "gemma"'s outputs, which it was given, but the input's gradient rounds
    where the input enters the product (a third of the bfloat16 elements differed)."""
    original = random_parameters(_diffusers_normalization.MochiRMSNorm(24, eps=1e-6)).to(dtype)
    converted = converted_copy(original)
    assert type(converted) is nt.RMSNorm and (converted.casting, converted.weight_offset) == ("mochi", 0.0)
    assert_same_numbers(original, converted, (torch.randn(3, 5, 24) * 2 + 0.5).to(dtype), None)
    with nt.use_path("kernel"):
        assert_same_numbers(original, converted, (torch.randn(3, 5, 24) * 2 + 0.5).to(dtype), BFLOAT16)


def test_falcon_mambas_unused_weight_stays_where_its_mixer_reads_it():
    original = FalconMambaWeightlessRMSNorm(24)
    converted = converted_copy(original)
    assert torch.equal(converted.weight, torch.ones(24)) and list(converted.state_dict()) == []


def test_unweighted_rms_norms_on_the_kernels_agree_with_the_originals_to_float_rounding():
    x = torch.randn(4, 3, 40) * 3
    for name, (make, _) in UNWEIGHTED.items():
        if name in NEEDS and NEEDS[name].args[0]:
            continue  # (this transformers release lacks the class)
        original = make()
        converted = converted_copy(original)
        with nt.use_path("kernel"):
            assert_same_numbers(original, converted, x, dict(rtol=1e-5, atol=1e-6))
            assert_same_numbers(original, converted, x.bfloat16(), BFLOAT16)


class SumOfSquaresNorm(Llama4TextL2Norm):
    """An L2 norm onto the unit sphere (the sum of squares, not the mean): another formula."""

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps)


class FixedSizeNorm(Llama4TextL2Norm):
    """Normalizes over the last two axes: not a last-axis RMS norm, though it is one on 2-D input."""

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean((-2, -1), keepdim=True) + self.eps)).type_as(x) if x.dim() > 2 \
            else super().forward(x)


@pytest.mark.parametrize("make", [pytest.param(DoryL2Norm, marks=_needs(DoryL2Norm, "dory")), HYV4UnweightedRMSNorm,
                                  SumOfSquaresNorm, FixedSizeNorm],
                         ids=["dory_l2_norm", "hy_v4_reciprocal_root", "sum_of_squares", "last_two_axes"])
def test_weightless_norms_that_compute_something_else_are_left_alone_with_a_warning(make):
    original = make()
    with pytest.warns(UserWarning, match=rf"{type(original).__name__} \(<model>\)"):
        assert nt.convert(original) is original


def test_unweighted_rms_norm_refuses_a_zero_dimensional_input_and_an_unknown_casting():
    with pytest.raises(RuntimeError, match="at least one dimension"):
        nt.UnweightedRMSNorm()(torch.tensor(1.0))
    with pytest.raises(ValueError, match="'llama', 'deepseek', 'diffusers'"):
        nt.UnweightedRMSNorm(casting="gemma")


# ---------------------------------------------------------------------------------------
# Gated RMS norms: Qwen3-Next's recipe (the gate's product in float32) and sigmoid gates

GATED = {
    "qwen3_next": (lambda: Qwen3NextRMSNormGated(64, eps=1e-6), "qwen3_next", "silu"),
    "olmo_hybrid": (lambda: OlmoHybridRMSNormGated(64, eps=1e-6), "qwen3_next", "silu"),
    "bailing_hybrid": (lambda: BailingHybridRMSNormGated(64, eps=1e-6), "gemma", "sigmoid"),
    "kimi_linear": (lambda: KimiLinearRMSNormGated(64, eps=1e-6), "gemma", "sigmoid"),
}


def gated_run(model, x, gate):
    x, gate = x.detach().clone().requires_grad_(), gate.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x, gate)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)).sum().backward()
    return y, x.grad, gate.grad, model.weight.grad


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(GATED))
def test_gated_norms_become_gated_rms_norms_with_their_outputs_and_gradients(name, dtypes):
    make, casting, activation = GATED[name]
    x_dtype, weight_dtype = dtypes
    original = random_parameters(make()).to(weight_dtype)
    converted = convert_quietly(original)
    assert type(converted) is nt.GatedRMSNorm
    assert (converted.casting, converted.gate_activation, converted.norm_before_gate) == (casting, activation, True)
    assert converted.group_size == 64 and converted.state_dict().keys() == original.state_dict().keys()
    generator = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(2, 5, 64, generator=generator).mul(2).to(x_dtype) for _ in range(2))
    # bfloatl6 runs the recipe's torch operations: to the bit; float32 runs the kernels
    tolerance = None if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for expected, actual in zip(gated_run(original, x, gate), gated_run(converted, x, gate)):
        assert actual.dtype == expected.dtype
        if tolerance is None:
            assert torch.equal(actual, expected), (actual - expected).abs().max()
        else:
            torch.testing.assert_close(actual, expected, **tolerance)


def scripted_run(model, x, gate):
    """:func:`gated_run` on a scripted model, whose weight may lie in a part."""
    x, gate = x.detach().clone().requires_grad_(), gate.detach().clone().requires_grad_()
    (weight,) = model.parameters()
    weight.grad = None
    y = model(x, gate)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)).sum().backward()
    return y, x.grad, gate.grad, weight.grad


class GatedHolder(torch.nn.Module):
    """A model holding a gated norm, as a Mamba2 or FalconH1 mixer does."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, gate):
        return self.norm(x, gate)


SCRIPTED_GATED = {
    "falcon_h1_gate_first": lambda: FalconH1RMSNormGated(64, n_groups=4, norm_before_gate=False),
    "falcon_h1_norm_first": lambda: FalconH1RMSNormGated(64, n_groups=4, norm_before_gate=True),
    "falcon_h1_one_group": lambda: FalconH1RMSNormGated(64, n_groups=1),
}


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(SCRIPTED_GATED))
def test_a_scripted_converted_gated_norm_gives_the_scripted_originals_outputs_and_gradients(name, dtypes):
    """torch.jit.script compiles FalconH1's gated norm; a converted one, alone and inside a
    model, scripts too and gives the scripted original's outputs to the bit, and its
    gradients to the bit in bfloat16 (three calls: the first ones profile, the later ones
    run TorchScript's optimized graph, whose float32 backward differentiates the silu as
    its grouping of each graph has it: one rounding apart)."""
    x_dtype, weight_dtype = dtypes
    original = random_parameters(SCRIPTED_GATED[name]()).to(weight_dtype)
    converted = converted_copy(original)
    assert type(converted) is nt.GatedRMSNorm
    generator = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(2, 5, 64, generator=generator).mul(2).to(x_dtype) for _ in range(2))
    expected_model, actual_model = torch.jit.script(original), torch.jit.script(converted)
    wrapped = torch.jit.script(GatedHolder(copy.deepcopy(converted)))
    for _ in range(3):
        expected = scripted_run(expected_model, x, gate)
        for model in (actual_model, wrapped):
            actual = scripted_run(model, x, gate)
            assert actual[0].dtype == expected[0].dtype and torch.equal(actual[0], expected[0])
            for a, e in zip(actual[1:], expected[1:]):
                assert a.dtype == e.dtype
                if x_dtype == torch.bfloat16:
                    assert torch.equal(a, e), (a - e).abs().max()
                else:  # (TorchScript's optimized float32 backward rounds as its own graph of each class groups it)
                    torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_a_scripted_gated_rms_norm_refuses_a_gate_given_twice():
    scripted = torch.jit.script(nt.GatedRMSNorm(8, group_size=4))
    with pytest.raises(Exception, match="takes the gate once"):
        scripted(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8))


def test_a_gated_norm_with_an_activation_no_recipe_has_is_left_alone():
    class TanhGeluGatedRMSNorm(Qwen3NextRMSNormGated):
        def forward(self, hidden_states, gate):
            h = hidden_states.float()
            h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(
                hidden_states.dtype)
            return h * F.gelu(gate.float(), approximate="tanh")  # gelu's tanh form: no recipe's activation

    original = TanhGeluGatedRMSNorm(16)
    with pytest.warns(UserWarning, match="TanhGeluGatedRMSNorm"):
        assert nt.convert(original) is original


# ---------------------------------------------------------------------------------------
# DeBERTa's layer norm and VitDet's channels-first layer norm


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_debertas_layer_norm_becomes_a_recipe_layer_norm_with_its_outputs_and_gradients_to_the_bit(dtypes):
    x_dtype, weight_dtype = dtypes
    original = random_parameters(DebertaLayerNorm(48, eps=1e-7)).to(weight_dtype)
    converted = convert_quietly(original)
    assert type(converted) is nt.RecipeLayerNorm
    assert (converted.casting, converted.eps, converted.hidden_size) == ("deberta", 1e-7, (48,))
    assert list(converted.state_dict()) == list(original.state_dict()) == ["weight", "bias"]
    assert_same_numbers(original, converted, (torch.randn(3, 5, 48) * 2 + 1).to(x_dtype), None)


EsmFold2LayerNorm = _newer_class("esmfold2", "EsmFold2LayerNorm")


@_needs(EsmFold2LayerNorm, "esmfold2")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["float32", "bfloat16", "float16", "float64"])
def test_esmfold2s_float32_layer_norm_becomes_a_float32_layer_norm_with_its_outputs_and_gradients(x_dtype):
    """It was left unconverted with a warning: F.layer_norm on the input cast to float32, with
    its parameters as they are, which ESMFold2 keeps in float32 (on parameters of any other
    dtype it raises "mixed dtype"); on float32 parameters that is timm's LayerNormFp32.
    Half-precision and float64 input take its operations: its bits; float32 input the kernels,
    as a converted nn.LayerNorm's."""
    original = random_parameters(EsmFold2LayerNorm(48, eps=1e-5))
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is nt.Float32LayerNorm
    assert list(converted.state_dict()) == list(original.state_dict()) == ["weight", "bias"]
    x = (torch.randn(3, 5, 48) * 2 + 1).to(x_dtype)
    assert_same_numbers(original, converted, x, dict(rtol=1e-5, atol=1e-5) if x_dtype == torch.float32 else None)


@_needs(EsmFold2LayerNorm, "esmfold2")
def test_a_converted_esmfold2_layer_norm_computes_half_precision_parameters_where_the_original_raises():
    original = random_parameters(EsmFold2LayerNorm(48)).to(torch.bfloat16)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        original(x)
    converted = convert_quietly(copy.deepcopy(original))
    expected = F.layer_norm(x.float(), [48], original.weight.float(), original.bias.float(), 1e-5).to(x.dtype)
    assert torch.equal(converted(x), expected)


@_needs(EsmFold2LayerNorm, "esmfold2")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["float32", "bfloat16", "float16", "float64"])
def test_esmfold2s_layer_norm_without_a_bias_becomes_a_float32_layer_norm_with_its_outputs_and_gradients(x_dtype):
    """ESMFold2's adaptive norm conditions on an EsmFold2LayerNorm built with bias=False, which
    was left unconverted with a warning."""
    original = random_parameters(EsmFold2LayerNorm(48, eps=1e-5, bias=False))
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is nt.Float32LayerNorm and converted.bias is None
    assert list(converted.state_dict()) == list(original.state_dict()) == ["weight"]
    x = (torch.randn(3, 5, 48) * 2 + 1).to(x_dtype)
    assert_same_numbers(original, converted, x, dict(rtol=1e-5, atol=1e-5) if x_dtype == torch.float32 else None)


EsmFold2AdaptiveLayerNorm = _newer_class("esmfold2", "EsmFold2AdaptiveLayerNorm")


@_needs(EsmFold2AdaptiveLayerNorm, "esmfold2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_esmfold2s_adaptive_layer_norm_converts_its_condition_norm_and_keeps_its_outputs(dtype):
    """The block takes the condition as a second positional input and modulates a weightless
    float32 layer norm of its first by a gate and shift of its own Linear layers: it stays,
    and its condition's norm becomes a Float32LayerNorm, where convert() warned of it."""
    original = random_parameters(EsmFold2AdaptiveLayerNorm(48)).to(dtype)
    original.cond_norm.float()  # (as ESMFold2 keeps it, in a bfloat16 model too: on others it raises)
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is EsmFold2AdaptiveLayerNorm and type(converted.cond_norm) is nt.Float32LayerNorm
    assert list(converted.state_dict()) == list(original.state_dict())
    condition = (torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1)) * 2 + 1).to(dtype)
    x = (torch.randn(3, 5, 48) * 2 + 1).to(dtype)
    # (bfloat16: the norm takes its operations, to the bit; float32 the kernels)
    assert_same_numbers(original, converted, x, None if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5),
                        call=lambda model, x: model(x, condition))


@_needs(EsmFold2AdaptiveLayerNorm, "esmfold2")
def test_a_converted_esmfold2_diffusion_transformer_trains_a_step_as_the_original():
    from transformers.models.esmfold2 import modeling_esmfold2

    config = transformers.EsmFold2Config(pairwise_hidden_size=8, structure_head=dict(diffusion_module=dict(
        hidden_size=16, num_attention_heads=2, intermediate_size=24, num_hidden_layers=2,
        atom_encoder=dict(output_dim=16))))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    original = random_parameters(modeling_esmfold2.EsmFold2DiffusionTransformer(config))
    converted = converted_copy(original)
    assert types_in(converted) == ["EsmFold2AdaptiveLayerNorm", "Float32LayerNorm"]
    assert list(converted.state_dict()) == list(original.state_dict())
    generator = torch.Generator().manual_seed(1)
    tokens, single, pair = (torch.randn(shape, generator=generator)
                            for shape in ((2, 5, 16), (2, 5, 16), (2, 5, 5, 8)))
    losses = []
    for model in (original, converted):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(tokens, single, model.compute_pair_biases(pair)).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, expected in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda message: f"{name}: {message}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_debertas_layer_norm_on_the_kernels_agrees_to_float_rounding(x_dtype):
    original = random_parameters(DebertaLayerNorm(48))
    converted = converted_copy(original)
    with nt.use_path("kernel"):
        assert_same_numbers(original, converted, torch.randn(4, 3, 48).to(x_dtype),
                            BFLOAT16 if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_imagegpts_layer_norm_becomes_rms_norm_with_its_recipe_to_the_bit(dtypes):
    x_dtype, weight_dtype = dtypes
    original = ImageGPTLayerNorm(40, eps=1e-5)
    torch.nn.init.normal_(original.weight, generator=torch.Generator().manual_seed(0))  # (it starts uninitialized)
    original = original.to(weight_dtype)
    converted = convert_quietly(original)
    assert type(converted) is nt.RMSNorm
    assert (converted.casting, converted.eps, converted.weight_offset) == ("imagegpt", 1e-5, 0.0)
    assert list(converted.state_dict()) == ["weight"]
    assert_same_numbers(original, converted, (torch.randn(3, 5, 40) * 2 + 1).to(x_dtype), None)


def channels_first_layer_norm_in_float64(x, weight, bias, eps):
    """torch's layer norm over the channels of (N, C, H, W), in float64: the oracle."""
    return F.layer_norm(x.double().permute(0, 2, 3, 1), weight.shape, weight.double(), bias.double(),
                        eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_vitdets_layer_norm_becomes_a_channels_first_layer_norm_with_torchs_float64_numbers(dtype):
    original = random_parameters(VitDetLayerNorm(12)).to(dtype)
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is nt.ChannelsFirstLayerNorm and converted.eps == original.eps == 1e-6
    assert list(converted.state_dict()) == ["weight", "bias"]
    tolerance = BFLOAT16 if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    x = (torch.randn(2, 12, 5, 4) * 2 + 1).to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()  # (unseeded: the bounds below hold for any draw)
    w64, b64 = (p.detach().double().requires_grad_() for p in (original.weight, original.bias))
    expected = channels_first_layer_norm_in_float64(x64, w64, b64, 1e-6)
    grad_y = torch.randn(expected.shape).to(dtype).double()  # (the same output gradient in both dtypes)
    expected_grads = torch.autograd.grad(expected, (x64, w64, b64), grad_y)
    torch.testing.assert_close(original(x).double(), expected, **tolerance)  # (the oracle is its formula)
    y = converted(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, **tolerance)
    grads = torch.autograd.grad(y, (x, converted.weight, converted.bias), grad_y.to(dtype))
    # Each gradient element sums terms (over the channels for x, over (N, H, W) for the
    # parameters) that torch's own layer norm rounds in bfloat16: the error bound is a few
    # roundings of the terms' magnitudes, not a fixed tolerance (which a random draw can cross)
    x_hat = channels_first_layer_norm_in_float64(x64, torch.ones_like(w64), torch.zeros_like(b64), 1e-6).detach()
    rstd = (x64.detach().var(1, unbiased=False, keepdim=True) + 1e-6).rsqrt()
    grad_w = grad_y * w64.detach()[:, None, None]
    magnitudes = (rstd * (grad_w.abs() + grad_w.abs().mean(1, keepdim=True)
                          + x_hat.abs() * (grad_w * x_hat).abs().mean(1, keepdim=True)),
                  (grad_y * x_hat).abs().sum((0, 2, 3)), grad_y.abs().sum((0, 2, 3)))
    unit = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    for actual, oracle, magnitude in zip(grads, expected_grads, magnitudes):
        assert ((actual.double() - oracle).abs() <= 3 * unit * (magnitude + oracle.abs())).all()


def test_a_converted_vitdet_trains_with_the_weight_decay_groups_transformers_trainer_gives_the_original():
    """transformers' Trainer keeps weight decay off the parameters of ``nn.LayerNorm``
    modules and of parameters named like norms. VitDet's norm is no ``nn.LayerNorm`` and its
    ``norm1``/``norm2``/``norm3`` match no such name, so the Trainer decays their weights;
    its converted twin must be no ``nn.LayerNorm`` either, or AdamW steps on the groups the
    Trainer builds leave the converted model elsewhere than the original."""
    config = transformers.VitDetConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       image_size=16, patch_size=8, pretrain_image_size=16, residual_block_indices=[1],
                                       use_relative_position_embeddings=False)
    torch.manual_seed(0)
    original = transformers.VitDetModel(config)
    converted = converted_copy(original)
    assert any(type(m).__module__.startswith("normlab.") for m in converted.modules())
    decayed = transformers.Trainer.get_decay_parameter_names  # (reads the model alone, not the Trainer)
    assert decayed(None, converted) == decayed(None, original)
    assert any(".residual.norm" in name for name in decayed(None, original))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for model in (original, converted):
        names = set(decayed(None, model))
        groups = [{"params": [p for n, p in model.named_parameters() if n in names], "weight_decay": 0.5},
                  {"params": [p for n, p in model.named_parameters() if n not in names], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=0.1, eps=1e-3)  # (eps: the keys' biases get rounding, no gradient)
        for _ in range(2):
            optimizer.zero_grad()
            model(x).last_hidden_state.square().mean().backward()
            optimizer.step()
    for name, expected in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], expected, rtol=1e-4, atol=1e-4,
                                   msg=lambda message: f"{name}: {message}")


def test_a_channels_first_layer_norm_with_the_unbiased_variance_is_left_alone():
    class UnbiasedVitDetLayerNorm(VitDetLayerNorm):
        def forward(self, x):
            x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True) + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]

    original = UnbiasedVitDetLayerNorm(6)
    with pytest.warns(UserWarning, match="UnbiasedVitDetLayerNorm"):
        assert nt.convert(original) is original


@_needs(PocketTTSFlowLayerNorm, "pocket_tts")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_pocket_tts_layer_norm_keeps_its_gradients_through_a_forward_mode_jvp(affine):
    # PocketTTS writes its flow head's layer norm out because torch's fused one gives wrong
    # gradients through a forward-mode JVP (pytorch#196700), which its training differentiates
    original = PocketTTSFlowLayerNorm(16, eps=1e-6, elementwise_affine=affine).double()
    random_parameters(original)
    converted = convert_quietly(copy.deepcopy(original))
    assert type(converted) is nt.WrittenOutLayerNorm  # (a LayerNorm; in float64 the twin's own computation)
    generator = torch.Generator().manual_seed(0)
    x, tangent, grad_y = (torch.randn(3, 5, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    found = []
    for model in (original, converted):
        inputs = (x.clone().requires_grad_(), *model.parameters())
        y, y_tangent = torch.func.jvp(model, (inputs[0],), (tangent,))
        found.append(torch.autograd.grad(((y + y_tangent) * grad_y).sum(), inputs))
    torch.testing.assert_close(found[1], found[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=["bfloat16", "float16", "bfloat16_on_float32_weight", "float32"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("family", [
    pytest.param("pocket_tts", marks=_needs(PocketTTSFlowLayerNorm, "pocket_tts")),
    pytest.param("gradium_phonon_tts", marks=_needs(GradiumPhononTTSFlowLayerNorm, "gradium_phonon_tts"))])
def test_a_written_out_flow_head_layer_norm_keeps_its_half_precision_outputs_dtype_and_gradients(family, affine,
                                                                                                 dtypes):
    """PocketTTS's and Gradium's flow-head layer norms are written out in torch operations:
    in bfloat16 and float16 each step rounds in the input's dtype, and float32 parameters
    promote a bfloat16 input's output to float32. Converted, they became a LayerNorm, whose
    torch layer norm computes in float32 and keeps the input's dtype: outputs 1% off in
    bfloat16, and bfloat16 where the original gives float32."""
    cls = {"pocket_tts": PocketTTSFlowLayerNorm, "gradium_phonon_tts": GradiumPhononTTSFlowLayerNorm}[family]
    x_dtype, w_dtype = dtypes
    original = random_parameters(cls(16, eps=1e-6, elementwise_affine=affine)).to(w_dtype)
    converted = convert_quietly(torch.nn.Sequential(copy.deepcopy(original)))[0]
    assert isinstance(converted, torch.nn.LayerNorm)
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 16, generator=generator) * 2 + 1).to(x_dtype)
    found = []
    for model in (original, converted):
        inputs = (x.clone().requires_grad_(), *model.parameters())
        y = model(inputs[0])
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        found.append((y, *torch.autograd.grad(y, inputs, grad_y)))
    exact = x_dtype != torch.float32  # (float32: the kernels, to float rounding)
    for got, expected in zip(found[1], found[0]):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **(dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)))


@pytest.mark.parametrize("make, call", [
    pytest.param(lambda: PeAudioMaskedGroupNorm(num_groups=2, num_channels=8),
                 lambda norm, x, other: norm(x, padding_mask=(other > 0).float()),
                 marks=_needs(PeAudioMaskedGroupNorm, "pe_audio")),
    pytest.param(lambda: Emu3VQVAEGroupNorm(num_channels=8, num_groups=2, eps=1e-6, affine=True),
                 lambda norm, x, other: norm(x, other), marks=_needs(Emu3VQVAEGroupNorm, "emu3")),
], ids=["pe_audio_padding_mask", "emu3_quant_states"])
def test_norm_subclasses_whose_forward_takes_more_than_the_input_are_left_alone_with_a_warning(make, call):
    # their models pass the second argument (by name, or by position where a twin would read it as its mask)
    original = random_parameters(make())
    model = torch.nn.ModuleDict({"norm": original})
    with pytest.warns(UserWarning, match=rf"{type(original).__name__} \(norm\)"):
        nt.convert(model)
    assert model["norm"] is original
    x, other = torch.randn(2, 8, 5), torch.randn(2, 8, 5)
    assert torch.equal(call(model["norm"], x, other), call(original, x, other))


# ---------------------------------------------------------------------------------------
# Whole small models


def tiny_model(kind):
    torch.manual_seed(0)
    if kind == "qwen3_next":
        config = transformers.Qwen3NextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])
    elif kind == "falcon_mamba":
        config = transformers.FalconMambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2,
                                                expand=2, conv_kernel=4, time_step_rank=4)
    elif kind == "llama4":
        config = transformers.Llama4TextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, use_qk_norm=True)
    elif kind == "imagegpt":
        config = transformers.ImageGPTConfig(vocab_size=65, n_positions=16, n_embd=32, n_layer=2, n_head=4)
        model = transformers.ImageGPTForCausalImageModeling(config)
        with torch.no_grad():
            for module in model.modules():  # (ImageGPT's norms start uninitialized)
                if type(module).__name__ == "ImageGPTLayerNorm":
                    module.weight.normal_()
        return random_parameters(model)
    else:
        config = transformers.DebertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=32)
        return random_parameters(transformers.AutoModelForMaskedLM.from_config(config))
    return random_parameters(transformers.AutoModelForCausalLM.from_config(config))


MODELS = {"qwen3_next": nt.GatedRMSNorm, "falcon_mamba": nt.UnweightedRMSNorm, "llama4": nt.UnweightedRMSNorm,
          "deberta": nt.RecipeLayerNorm, "imagegpt": nt.RMSNorm}


def assert_same(actual, expected, tolerance, what):
    if tolerance is None:
        assert torch.equal(actual, expected), f"{what}: {(actual - expected).abs().max()}"
    else:
        torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_small_models_from_config_give_the_same_logits_and_gradients(kind, dtype):
    # to the bit where the converted norms run their recipe's torch operations: everywhere but
    # in float32 Qwen3-Next's gated norm and DeBERTa's head's torch.nn.LayerNorm, which run on
    # the kernels (statistics in float64)
    on_kernels = kind in ("qwen3_next", "deberta") and dtype == torch.float32
    tolerance = dict(rtol=1e-4, atol=1e-5) if on_kernels else None
    original = tiny_model(kind).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no norm left unconverted
        converted = nt.convert(copy.deepcopy(original))
    assert any(isinstance(m, MODELS[kind]) for m in converted.modules())
    assert list(converted.state_dict()) == list(original.state_dict())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for model in (original, converted):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        original.eval(), converted.eval()
        assert_same(converted(input_ids=ids).logits, original(input_ids=ids).logits, tolerance, "logits")
    for (name, expected), (_, actual) in zip(original.named_parameters(), converted.named_parameters()):
        assert (actual.grad is None) == (expected.grad is None), name
        if expected.grad is not None:
            assert_same(actual.grad, expected.grad, tolerance, name)


def test_a_qwen3_next_built_on_the_meta_device_then_converted_gets_the_original_s_initial_weights():
    """transformers' Qwen3-Next zeroes the weights of its ``1 + weight`` RMS norms in
    ``_init_weights``, which finds them by ``isinstance(module, Qwen3NextRMSNorm)``. A model
    built on the meta device, converted, then materialized with ``to_empty`` and
    ``init_weights()`` must get those zeros on its twins, not the ones transformers gives
    any other class named ``...RMSNorm`` (norms that would scale by 2)."""
    config = tiny_model("qwen3_next").config
    models = []
    for convert in (False, True):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        if convert:
            nt.convert(model)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        models.append(model)
    original, converted = models
    assert isinstance(converted.model.norm, nt.RMSNorm) and not converted.model.norm.weight.any()
    for name, expected in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], expected), name


def test_a_converted_qwen3_next_is_freed_on_del_and_its_copies_initialize_their_own_norms():
    """``del model`` frees a converted transformers model's parameters at once, as it frees
    the original's (no cycle left for Python's cyclic collector to find later), and a deep
    copy or a ``torch.save``/``torch.load`` of it initializes its own norms as the original
    class does (Qwen3-Next's: zeros), not those of the model it was copied from."""
    model = nt.convert(tiny_model("qwen3_next"))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for duplicate in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        duplicate.model.norm.weight._is_hf_initialized = False
        duplicate._init_weights(duplicate.model.norm)
        assert not duplicate.model.norm.weight.any()
    assert model.model.norm.weight.any()
    parameter = weakref.ref(model.model.norm.weight)
    gc.disable()
    try:
        del model
        assert parameter() is None
    finally:
        gc.enable()
