"""What torch's profiler lists for the recipe twins that :func:`~normlab.torch.convert` puts
in place of the model families' norms (transformers' LLaMA, Gemma, T5, Cohere, OLMo,
DeBERTa, Llama 4 and DeepSeek-V4 norms, diffusers' RMS norm with a bias, timm's
channels-first RMS norms and float32 layer norms): one range a call named as torch's op
for the same computation, as torch.nn's norms show theirs."""

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.deberta.modeling_deberta import DebertaLayerNorm  # noqa: E402
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4UnweightedRMSNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm  # noqa: E402
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import TimmLayerNorm2dFp32, TimmLayerNormFp32, TimmRmsNorm2d, TimmRmsNorm2dFp32  # noqa: E402
from tests.profiling import autograd_steps, autograd_steps_inside, profiled_ops  # noqa: E402
from tests.test_convert_models import converted_copy  # noqa: E402


def _diffusers_biased_rms_norm():
    normalization = pytest.importorskip("diffusers.models.normalization")
    return normalization.RMSNorm(64, 1e-5, elementwise_affine=True, bias=True)


# (the original, the input's shape, the op torch.nn's module of the same computation shows)
ORIGINALS = {
    "LlamaRMSNorm": (lambda: LlamaRMSNorm(64, eps=1e-6), (4, 64), "rms_norm"),
    "GemmaRMSNorm": (lambda: GemmaRMSNorm(64, eps=1e-6), (4, 64), "rms_norm"),
    "T5LayerNorm": (lambda: T5LayerNorm(64), (4, 64), "rms_norm"),
    "Llama4TextL2Norm": (lambda: Llama4TextL2Norm(1e-6), (4, 64), "rms_norm"),
    "DeepseekV4UnweightedRMSNorm": (lambda: DeepseekV4UnweightedRMSNorm(1e-6), (4, 64), "rms_norm"),
    "diffusers RMSNorm(bias=True)": (_diffusers_biased_rms_norm, (4, 64), "rms_norm"),
    "timm RmsNorm2d": (lambda: TimmRmsNorm2d(8), (2, 8, 5, 5), "rms_norm"),
    "timm RmsNorm2dFp32": (lambda: TimmRmsNorm2dFp32(8), (2, 8, 5, 5), "rms_norm"),
    "CohereLayerNorm": (lambda: CohereLayerNorm(64, eps=1e-5), (4, 64), "layer_norm"),
    "CohereLayerNorm, per head": (lambda: CohereLayerNorm((4, 16), eps=1e-5), (3, 4, 16), "layer_norm"),
    "OlmoLayerNorm": (lambda: OlmoLayerNorm(64), (4, 64), "layer_norm"),
    "DebertaLayerNorm": (lambda: DebertaLayerNorm(64, eps=1e-7), (4, 64), "layer_norm"),
    "timm LayerNormFp32": (lambda: TimmLayerNormFp32(64), (4, 64), "layer_norm"),
    "timm LayerNorm2dFp32": (lambda: TimmLayerNorm2dFp32(8), (2, 8, 5, 5), "layer_norm"),
}
# (a call each way a user runs one: training, without gradients, in evaluation)
CALLS = {
    "forward and backward": lambda module, x: module(x).float().sum().backward(),
    "no_grad": lambda module, x: torch.no_grad()(module)(x),
    "eval": lambda module, x: torch.no_grad()(module.eval())(x),
}


def _torch_nn_oracle(op: str, shape) -> dict:
    """The names torch's profiler gives torch.nn's module of the same computation."""
    module = torch.nn.RMSNorm(shape[-1]) if op == "rms_norm" else torch.nn.LayerNorm(shape[-1])
    return profiled_ops(lambda: module(torch.randn(shape)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["auto", "kernel"])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("name", list(ORIGINALS))
def test_the_profiler_lists_each_converted_recipe_norm_call_once_by_the_name_of_torch_s_op(name, call, path, dtype):
    """A converted LlamaRMSNorm (its family's torch operations: aten::pow, aten::mean,
    aten::rsqrt, ...) showed under no name a user looks for; it is one ``normlab::rms_norm``
    range a call, as torch.nn.RMSNorm's ``aten::rms_norm`` (and a Cohere layer norm one
    ``normlab::layer_norm``), on the families' operations and on the kernels, in training,
    without gradients and in evaluation. Oracle: the names and counts torch's profiler
    gives torch.nn's module of the same computation."""
    make, shape, op = ORIGINALS[name]
    oracle = _torch_nn_oracle(op, shape)
    assert oracle.get(f"aten::{op}") == 1
    twin = converted_copy(make()).to(dtype)
    assert type(twin).__module__.startswith("normlab.")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    with nt.use_path(path), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the kernels' path on half-precision input may say it upcasts)
        names = profiled_ops(lambda: CALLS[call](twin, x), warmup=2)
    assert names.get(f"normlab::{op}") == 1, sorted(names)
    assert "normlab::normalize" not in names, sorted(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(ORIGINALS))
def test_the_profiler_lists_a_converted_recipe_norms_backward_as_one_range_around_its_autograd_steps(name, dtype):
    """A converted LlamaRMSNorm's backward showed only as its family's autograd steps
    (PowBackward0, MeanBackward1, RsqrtBackward0, ...), where the kernel twins' shows as
    ``normlab::rms_norm_backward``: it is one such range a backward, around those steps.
    Oracle: the autograd steps torch's profiler lists for the original's backward (the
    ``sum`` before it and the gradients' accumulation lie outside the norm)."""
    make, shape, op = ORIGINALS[name]
    original = make().to(dtype)
    twin = converted_copy(original)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    expected = autograd_steps(lambda: original(x).sum().backward())
    del expected["SumBackward0"], expected["torch::autograd::AccumulateGrad"]
    if name == "diffusers RMSNorm(bias=True)":
        expected["AddBackward0"] -= 1  # (the bias, added after the norm's range, as in the forward)
    count, inside = autograd_steps_inside(lambda: twin(x).sum().backward(), f"normlab::{op}_backward", warmup=2)
    assert count == 1
    if expected <= autograd_steps(lambda: twin(x).sum().backward()):  # (the family's operations, not the kernels)
        assert inside == +expected, (inside, expected)


def test_a_compiled_recipe_norm_is_not_compiled_again_when_a_profiler_starts():
    """The recipe twins read the profiler's flag only outside Dynamo: a compiled graph that
    read it would be compiled again whenever a profiler starts, where torch.nn's is not.
    Oracle: Dynamo's own count of the frames it compiled."""
    from torch._dynamo.testing import CompileCounter

    twins = torch.nn.Sequential(converted_copy(LlamaRMSNorm(64, eps=1e-6)), converted_copy(CohereLayerNorm(64)),
                                converted_copy(Llama4TextL2Norm(1e-6)))
    counter = CompileCounter()
    compiled = torch.compile(twins, backend=counter)
    x = torch.randn(4, 64)
    with torch.no_grad():
        compiled(x)
        profiled_ops(lambda: compiled(x), warmup=0)
        compiled(x)
    assert counter.frame_count == 1
