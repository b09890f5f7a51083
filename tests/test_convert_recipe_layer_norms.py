"""convert() on transformers' layer norms that compute in float32 and cast back: Cohere's
``CohereLayerNorm`` (bias-less, also per head for QK-norm with a ``(heads, head_dim)``
weight) and OLMo's parameter-less ``OlmoLayerNorm`` (whose eps is written into its
forward). The oracles are those classes and the models built from their configs with
random weights, run unconverted on the same inputs, with torch's autograd through them."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.deberta.modeling_deberta import DebertaLayerNorm  # noqa: E402
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4UnweightedRMSNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm  # noqa: E402

import normlab.torch as nt  # noqa: E402
from normlab.torch import RecipeLayerNorm  # noqa: E402
from tests.test_convert_models import (  # noqa: E402
    DTYPES, assert_same_numbers, convert_quietly, converted_copy, random_parameters,
)  # noqa: E402

NORMS = {
    "cohere": (lambda: CohereLayerNorm(64, eps=1e-5), (64,), "cohere"),
    "cohere_qk_norm": (lambda: CohereLayerNorm((4, 16), eps=1e-6), (4, 16), "cohere"),
    "olmo": (lambda: OlmoLayerNorm(64), (64,), "olmo"),
}


@pytest.mark.parametrize("dtypes", DTYPES, ids=["float32", "bfloat16", "bfloat16_on_float32_weight"])
@pytest.mark.parametrize("name", list(NORMS))
def test_float32_layer_norms_become_recipe_layer_norms_with_their_outputs_and_gradients_to_the_bit(name, dtypes):
    make, shape, casting = NORMS[name]
    x_dtype, weight_dtype = dtypes
    original = random_parameters(make()).to(weight_dtype)
    converted = convert_quietly(original)  # (a twin: the original module stays as it was)
    assert type(converted) is RecipeLayerNorm
    assert (converted.hidden_size, converted.casting) == (shape, casting)
    assert converted.eps == getattr(original, "variance_epsilon", 1e-5)  # OLMo's 1e-5 is read off its outputs
    assert list(converted.state_dict()) == list(original.state_dict())
    assert all(a is b for a, b in zip(converted.parameters(), original.parameters()))
    x = (torch.randn(3, 5, *shape) * 2 + 1).to(x_dtype)
    assert_same_numbers(original, converted, x, None)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(NORMS))
def test_recipe_layer_norms_on_the_kernels_agree_with_the_originals_to_float_rounding(name, x_dtype):
    make, shape, _ = NORMS[name]
    original = random_parameters(make())
    converted = converted_copy(original)
    tolerance = dict(rtol=1.6e-2, atol=1e-2) if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with nt.use_path("kernel"):
        assert_same_numbers(original, converted, torch.randn(4, 3, *shape).to(x_dtype), tolerance)


@pytest.mark.parametrize("eps", [1e-6, 2.5e-4, 0.0])
def test_a_layer_norm_with_its_eps_written_into_its_forward_is_converted_with_that_eps(eps):
    class WrittenEps(OlmoLayerNorm):
        def forward(self, hidden_states):
            return torch.nn.functional.layer_norm(hidden_states.float(), self.normalized_shape, None, None,
                                                  eps=eps).to(hidden_states.dtype)

    original = WrittenEps(48)
    converted = converted_copy(original)
    assert type(converted) is RecipeLayerNorm and converted.eps == eps
    x = torch.randn(2, 48) * (eps ** 0.5 + 1e-3)  # a scale at which eps counts as much as the data
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(converted(x.to(dtype)), original(x.to(dtype)))


class UnbiasedCohereLayerNorm(CohereLayerNorm):
    """Cohere's layer norm with the unbiased variance: another formula."""

    def forward(self, hidden_states):
        h = hidden_states.float()
        h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * h).to(hidden_states.dtype)


class WholeHeadLayerNorm(CohereLayerNorm):
    """A per-head weight, but the statistics over all heads together: not QK-norm."""

    def forward(self, hidden_states):
        h = hidden_states.float()
        h = torch.nn.functional.layer_norm(h, h.shape[-2:], eps=self.variance_epsilon)
        return (self.weight.float() * h).to(hidden_states.dtype)


class InputDtypeOlmoLayerNorm(OlmoLayerNorm):
    """OLMo's norm computing the mean and variance in the input's dtype."""

    def forward(self, hidden_states):
        mean = hidden_states.mean(-1, keepdim=True)
        var = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
        return (hidden_states - mean) * torch.rsqrt(var + 1e-5)


@pytest.mark.parametrize("original", [lambda: UnbiasedCohereLayerNorm(16), lambda: WholeHeadLayerNorm((2, 8)),
                                      lambda: InputDtypeOlmoLayerNorm(16)],
                         ids=["unbiased_variance", "whole_head_statistics", "input_dtype_statistics"])
def test_a_float32_layer_norm_lookalike_that_computes_something_else_is_left_alone(original):
    original = original()
    with pytest.warns(UserWarning, match=type(original).__name__):
        assert nt.convert(original) is original


@pytest.mark.parametrize("name", list(NORMS))
def test_recipe_layer_norm_refuses_input_of_another_size_as_the_original_does(name):
    make, shape, _ = NORMS[name]
    original = make()
    x = torch.randn(2, *shape[:-1], shape[-1] + 1)
    with pytest.raises(RuntimeError):
        original(x)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, " + ", ".join(map(str, shape))):
        converted_copy(original)(x)


def test_recipe_layer_norm_built_directly_normalizes_each_head_with_its_own_weight():
    norm = RecipeLayerNorm((3, 8), eps=1e-6)
    original = CohereLayerNorm((3, 8), eps=1e-6)
    random_parameters(original)
    norm.weight = original.weight
    x = torch.randn(2, 5, 3, 8)
    assert torch.equal(norm(x), original(x))
    assert list(norm.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="casting must be one of 'olmo', 'cohere'"):
        RecipeLayerNorm(8, casting="llama")


_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def _causal_lm(family, **extra):
    config = AutoConfig.for_model(family, **_TINY, **extra)
    torch.manual_seed(0)
    return random_parameters(AutoModelForCausalLM.from_config(config))


def _logits(model, x):
    return model(inputs_embeds=x).logits


@pytest.mark.parametrize("family, extra, norms, dtype", [
    ("cohere", {}, 2 + 1, torch.float32), ("cohere", dict(use_qk_norm=True), 2 * 3 + 1, torch.float32),
    ("cohere", dict(use_qk_norm=True), 2 * 3 + 1, torch.bfloat16), ("olmo", {}, 2 * 2 + 1, torch.float32),
], ids=["cohere", "cohere_qk_norm", "cohere_qk_norm_bfloat16", "olmo"])
def test_cohere_and_olmo_causal_lms_convert_every_norm_and_keep_logits_and_gradients_to_the_bit(family, extra, norms,
                                                                                                  dtype):
    original = _causal_lm(family, **extra).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = nt.convert(copy.deepcopy(original), fuse=True)
    # no norm left unconverted; nothing to fuse in these layers, which the one warning says
    assert [str(w.message)[:47] for w in caught] == ["normlab.torch.convert(fuse=True) fused no layer"]
    assert sum(type(m) is RecipeLayerNorm for m in converted.modules()) == norms
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 7, 32).to(dtype)
    assert_same_numbers(original, converted, x, None, call=_logits)


def test_fx_records_a_converted_cohere_qk_norm_as_one_leaf_call_with_the_originals_outputs():
    class QKNormed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.norm = CohereLayerNorm((2, 4))

        def forward(self, x):
            return self.norm(self.proj(x).unflatten(-1, (2, 4)))

    original = random_parameters(QKNormed())
    traced = torch.fx.symbolic_trace(converted_copy(original))
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["proj", "norm"]
    x = torch.randn(3, 8)
    assert torch.equal(traced(x), original(x))


SCRIPTED = {
    **{name: make for name, (make, _, _) in NORMS.items()},
    "deberta": lambda: DebertaLayerNorm(64, eps=1e-7),
    "llama4_l2_norm": lambda: Llama4TextL2Norm(1e-6),
    "deepseek_v4": lambda: DeepseekV4UnweightedRMSNorm(1e-6),
    "llama_rms_norm": lambda: LlamaRMSNorm(64, eps=1e-6),  # (RMSNorm with a casting recipe)
    "gemma_rms_norm": lambda: GemmaRMSNorm(64, eps=1e-6),
    "t5_layer_norm": lambda: T5LayerNorm(64),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(SCRIPTED))
def test_torch_jit_script_compiles_a_converted_recipe_norm_into_the_scripted_originals_numbers(name, dtype):
    original = random_parameters(SCRIPTED[name]())
    scripted = torch.jit.script(converted_copy(original))  # (was: "try blocks aren't supported", from the kernels' path)
    shape = getattr(original, "weight", torch.empty(64)).shape
    x = (torch.randn(3, 5, *shape) * 2 + 1).to(dtype)
    # (TorchScript's autodiff differentiates each scripted graph on its own: a float32 gradient may
    # round one ulp apart between two graphs of the same operations)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    assert_same_numbers(torch.jit.script(original), scripted, x, tolerance)
    with torch.no_grad():
        assert torch.equal(scripted(x), original(x))  # (the forward: the family's operations, to the bit)


def test_a_scripted_rms_norm_with_a_recipe_and_eps_none_takes_torch_s_default_eps_for_the_dtype_it_computes_in():
    original = random_parameters(LlamaRMSNorm(64, eps=torch.finfo(torch.float32).eps)).to(torch.bfloat16)
    twin = nt.RMSNorm(64, eps=None, casting="llama").to(torch.bfloat16)
    twin.load_state_dict(original.state_dict())
    x = torch.randn(3, 5, 64).to(torch.bfloat16) * 1e-3  # (small: the eps shows)
    assert torch.equal(torch.jit.script(twin)(x), torch.jit.script(original)(x))


def test_scripting_an_rms_norm_with_a_weight_offset_and_no_recipe_says_what_compiles_it():
    with pytest.raises(RuntimeError, match="casting recipe.*torch.compile"):
        torch.jit.script(torch.nn.Sequential(nt.RMSNorm(8, weight_offset=1.0)))
