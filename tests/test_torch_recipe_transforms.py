"""convert()'s recipe norms (RMSNorm with LLaMA's and Gemma's recipes, RecipeLayerNorm for
Cohere's, per-head Cohere's, OLMo's and DeBERTa's layer norms, UnweightedRMSNorm for Llama
4's L2 norm and LTX-2's channels-first norms, BiasedRMSNorm and GammaRMSNorm for diffusers' RMSNorm with a bias and Stable
Audio 3's (in float32 and in the input's dtype), RMSNorm2d for timm's channels-first RMS norms) under torch.func and on the way to deployment, in bfloat16, where the recipes
round: ``vmap`` and ``vjp`` to the bit, ``jacfwd`` and ``hessian``, ``torch.export`` with a
dynamic batch and length, and ``torch.compile`` with ``fullgraph=True`` (no more graphs than
the original's). Oracles: transformers' classes on the same parameters, under the same
transforms (timm's: the faithful copies in tests/mirrored_norms.py)."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch.func import hessian, jacfwd, vjp, vmap  # noqa: E402
from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.deberta.modeling_deberta import DebertaLayerNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm  # noqa: E402
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import TimmRmsNorm2d, TimmRmsNorm2dFp32  # noqa: E402

BF16 = torch.bfloat16
ORIGINALS = {  # name -> (the original, the trailing shape it normalizes, the twin's class)
    "llama_rms_norm": (lambda: LlamaRMSNorm(16, eps=1e-6), (16,), "RMSNorm"),
    "gemma_rms_norm": (lambda: GemmaRMSNorm(16, eps=1e-6), (16,), "RMSNorm"),
    "cohere": (lambda: CohereLayerNorm(16), (16,), "RecipeLayerNorm"),
    "cohere_qk_norm": (lambda: CohereLayerNorm((2, 8)), (2, 8), "RecipeLayerNorm"),
    "olmo": (lambda: OlmoLayerNorm(16), (16,), "RecipeLayerNorm"),
    "deberta": (lambda: DebertaLayerNorm(16), (16,), "RecipeLayerNorm"),
    "llama4_l2_norm": (lambda: Llama4TextL2Norm(1e-6), (16,), "UnweightedRMSNorm"),
    "diffusers_rms_norm_with_a_bias": (
        lambda: pytest.importorskip("diffusers.models.normalization").RMSNorm(16, 1e-6, bias=True), (16,),
        "BiasedRMSNorm"),
    "stable_audio_3_rms_norm": (
        lambda: pytest.importorskip("diffusers.models.transformers.transformer_stable_audio3").StableAudio3RMSNorm(16),
        (16,), "GammaRMSNorm"),
    "stable_audio_3_rms_norm_in_the_inputs_dtype": (
        lambda: pytest.importorskip("diffusers.models.transformers.transformer_stable_audio3").StableAudio3RMSNorm(
            16, force_fp32=False), (16,), "GammaRMSNorm"),
    # (channels second: a sample of (batch, length, 16, 2, 3) under vmap is (length, 16, 2, 3))
    "ltx2_per_channel_rms_norm": (
        lambda: pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_ltx2").PerChannelRMSNorm(eps=1e-6),
        (16, 2, 3), "UnweightedRMSNorm"),
    "ltx2_audio_pixel_norm": (
        lambda: pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_ltx2_audio").LTX2AudioPixelNorm(
            eps=1e-6), (16, 2, 3), "UnweightedRMSNorm"),
    "timm_rms_norm_2d": (lambda: TimmRmsNorm2d(16), (16, 2, 3), "RMSNorm2d"),
    "timm_rms_norm_2d_fp32": (lambda: TimmRmsNorm2dFp32(16), (16, 2, 3), "RMSNorm2d"),
}


def _pair(name, dtype=BF16):
    make, shape, twin_class = ORIGINALS[name]
    torch.manual_seed(0)
    original = make()
    with torch.no_grad():
        for p in original.parameters():
            p.uniform_(-0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (each is converted)
        twin = nt.convert(copy.deepcopy(original))
    assert type(twin).__name__ == twin_class
    return original.to(dtype), twin.to(dtype), shape


def _input(shape, batch, length, dtype=BF16, seed=1):
    return (torch.randn(batch, length, *shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5).to(dtype)


def _assert_same_bits(got, expected):
    assert got.dtype == expected.dtype and torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_vmap_and_vjp_of_a_converted_recipe_norm_give_the_originals_bits(name):
    original, twin, shape = _pair(name)
    x = _input(shape, 3, 4)
    _assert_same_bits(vmap(twin)(x), vmap(original)(x))
    _assert_same_bits(vmap(twin, in_dims=1)(x), vmap(original, in_dims=1)(x))
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(original(x).dtype)
    _assert_same_bits(vjp(twin, x)[1](grad_y)[0], vjp(original, x)[1](grad_y)[0])


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_jacfwd_and_hessian_of_a_converted_recipe_norm_match_the_originals(name):
    original, twin, shape = _pair(name, torch.float32)  # (the originals compute float64 input in float32)
    x = _input(shape, 1, 1, torch.float32)
    torch.testing.assert_close(jacfwd(twin)(x), jacfwd(original)(x))
    torch.testing.assert_close(hessian(lambda t: twin(t).sin().sum())(x), hessian(lambda t: original(t).sin().sum())(x))


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("name", list(ORIGINALS))
def test_an_exported_converted_recipe_norm_gives_the_originals_bits_at_another_batch_and_length(name, strict):
    original, twin, shape = _pair(name)
    dims = {0: torch.export.Dim("batch", min=2, max=64), 1: torch.export.Dim("length", min=2, max=64)}
    program = torch.export.export(twin, (_input(shape, 2, 3),), dynamic_shapes=(dims,), strict=strict)
    x = _input(shape, 5, 7)
    _assert_same_bits(program.module()(x), original(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ORIGINALS))
def test_a_compiled_converted_recipe_norm_gives_the_originals_bits_with_no_more_graphs(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    original, twin, shape = _pair(name)
    counts = []
    for module in (twin, original):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")  # (torch's operations as they are: bits comparable)
        compiled = torch.compile(module, backend=counter, fullgraph=True)
        for batch, length in [(2, 3), (3, 3), (4, 3), (4, 5)]:
            x = _input(shape, batch, length, seed=batch + length)
            _assert_same_bits(compiled(x), original(x))
        counts.append(counter.frame_count)
    assert counts[0] <= counts[1], counts
