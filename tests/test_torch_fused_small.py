"""FusedAddRMSNorm's forward alone on small inputs (a decoding step's token), which runs
in torch operations: against transformers' LlamaRMSNorm and GemmaRMSNorm of the sum, and
the same bits on one thread and two."""

import sys

import pytest

torch = pytest.importorskip("torch")

pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from normlab.torch.fused import FusedAddRMSNorm  # noqa: E402
from tests.composites import AddNorm  # noqa: E402

blocks = sys.modules["normlab.torch.fused"]


def _pair(family, hidden, dtype):
    hf = (LlamaRMSNorm if family == "llama" else GemmaRMSNorm)(hidden, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(1)) * 0.5)
    ours = FusedAddRMSNorm(hidden, eps=1e-6, casting=family, weight_offset=1.0 if family == "gemma" else 0.0)
    ours.load_state_dict(hf.state_dict())
    return hf.to(dtype), ours.to(dtype)


def _tokens(shape, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 2).to(dtype) for _ in range(2)]


def _counting_kernel_calls(monkeypatch) -> list:
    calls = []
    forward = blocks._Call.forward  # (every kernel call of the blocks, with autograd or without)
    monkeypatch.setattr(blocks._Call, "forward", lambda *a: calls.append(1) or forward(*a))
    return calls


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_step_is_the_hf_norm_of_the_sum(family, dtype, monkeypatch):
    calls = _counting_kernel_calls(monkeypatch)
    hf, ours = _pair(family, 1024, dtype)
    x, r = _tokens((1, 1, 1024), dtype)
    with torch.no_grad():
        y, total = ours(x, r)
        want = hf(x + r)
    assert not calls  # (torch's operations, not a kernel call)
    assert torch.equal(total, x + r)
    if dtype == torch.bfloat16:
        assert torch.equal(y, want)  # the recipe's operations
    else:
        torch.testing.assert_close(y, want, rtol=2e-6, atol=2e-6)


def test_inference_mode_and_eval_without_gradients_take_it_too(monkeypatch):
    calls = _counting_kernel_calls(monkeypatch)
    hf, ours = _pair("llama", 256, torch.float32)
    x, r = _tokens((4, 256), torch.float32)
    with torch.inference_mode():
        y, _ = ours(x, r)
    ours.weight.requires_grad_(False)
    y2, _ = ours(x, r)
    assert not calls
    for got in (y, y2):
        torch.testing.assert_close(got, hf(x + r).detach(), rtol=2e-6, atol=2e-6)


def test_recorded_and_large_calls_keep_the_kernels(monkeypatch):
    calls = _counting_kernel_calls(monkeypatch)
    hf, ours = _pair("llama", 1024, torch.float32)
    x, r = _tokens((1, 1024), torch.float32)
    ours(x, r)  # the weight needs its gradient: autograd records the call
    x, r = _tokens((256, 1024), torch.float32)  # 2^18 elements
    with torch.no_grad():
        for residual in (r, None):  # (the kernels straight, without autograd's node)
            got = ours(x, residual)
            y, total = got if residual is not None else (got, x)
            assert y.grad_fn is None and torch.equal(total, x + r if residual is not None else x)
            torch.testing.assert_close(y, hf(total), rtol=2e-6, atol=2e-6)
    assert len(calls) == 3


@pytest.mark.parametrize("hidden", [16384, 65536])
def test_the_same_bits_on_one_thread_and_two(hidden):
    # torch splits the reduction of one long row among threads: such rows take the kernels
    _, ours = _pair("llama", hidden, torch.float32)
    x, r = _tokens((1, hidden), torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                results.append(ours(x, r)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


class _Holder(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, residual):
        return self.norm(x, residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_export_with_a_dynamic_batch_takes_any_batch_size(dtype):
    # the size check ran before the check for torch's operations, and became a guard on the batch
    hf, ours = _pair("llama", 64, dtype)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        exported = torch.export.export(_Holder(ours), tuple(_tokens((2, 7, 64), dtype)), strict=True,
                                       dynamic_shapes={"x": {0: batch}, "residual": {0: batch}})
        x, r = _tokens((5000, 7, 64), dtype)  # past the small forward's size
        y, total = exported.module()(x, r)
        assert torch.equal(total, x + r)
        torch.testing.assert_close(y, hf(x + r), **({} if dtype == torch.bfloat16 else dict(rtol=2e-6, atol=2e-6)))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_non_strict_export_records_the_operations_of_the_code_it_replaces(family):
    # torch.promote_types of the two dtypes, taken on every call, was recorded as a dead
    # aten.promote_types node in each fused layer, which x + residual then the family's norm lacks
    hf, ours = _pair(family, 64, torch.float32)
    x, r = _tokens((2, 7, 64), torch.float32)

    def operations(module):
        with torch.no_grad():
            graph = torch.export.export(module, (x, r), strict=False).graph
        return {node.target for node in graph.nodes if node.op == "call_function"}

    assert operations(_Holder(ours)) <= operations(AddNorm(hf))


def test_a_compiled_forward_is_one_graph_on_both_sides_of_the_small_size():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    _, ours = _pair("llama", 64, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(_Holder(ours), backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for shape in ((2, 64), (3, 64), (5000, 64)):
            compiled(*_tokens(shape, torch.float32))
    assert counter.frame_count == 1
