"""Per-head norms on packed projections (QK-norm): q and k sliced from one qkv tensor.

A slice of a packed projection is a strided view: its rows (one head of one token) are
contiguous but spaced unevenly. The row kernels read such a view where it lies and write
into one (``out=``); these tests check the numbers against torch (``F.rms_norm``,
``F.layer_norm``, ``torch.nn.RMSNorm``, autograd, gradcheck) and transformers' own
``Qwen3RMSNorm``, ``Olmo2RMSNorm`` and ``Qwen3ForCausalLM``, and check that no copy is
made by watching which memory the kernels are handed.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normlab

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import torch.nn.functional as F  # noqa: E402

import normlab.torch as nt  # noqa: E402
from normlab.kernels import rows, rows_backward  # noqa: E402

B, T, H, KV, D = 2, 5, 4, 2, 8  # batch, tokens, query heads, key/value heads, head size


class KernelSpy:
    """Stands in for a row kernel and records the arrays of each call (threaded or serial)."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __call__(self, *args, **kwargs):
        self.calls.append([a for a in args if isinstance(a, np.ndarray)])
        return self.kernel(*args, **kwargs)

    def serial(self, *args):
        self.calls.append([a for a in args if isinstance(a, np.ndarray)])
        return self.kernel.serial(*args)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The arrays each row kernel was handed, by kernel name."""
    calls = {"forward": [], "backward": []}
    for name in ("row_forward", "row_forward32"):
        monkeypatch.setattr(rows, name, KernelSpy(getattr(rows, name), calls["forward"]))
    monkeypatch.setattr(rows, "row_backward", KernelSpy(rows.row_backward, calls["backward"]))
    monkeypatch.setattr(rows_backward, "row_backward32", KernelSpy(rows_backward.row_backward32, calls["backward"]))
    return calls


def packed_qkv(dtype, seed=0):
    """(b, t, (h + 2·kv)·d): q, k and v of every token side by side, as one projection gives them."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, (H + 2 * KV) * D)).astype(dtype) * 3 + 1


def heads(qkv):
    """q, k, v as (b, t, heads, d) strided views of ``qkv`` (no copy)."""
    q = qkv[..., :H * D].reshape(B, T, H, D)
    k = qkv[..., H * D:(H + KV) * D].reshape(B, T, KV, D)
    v = qkv[..., (H + KV) * D:].reshape(B, T, KV, D)
    assert all(np.shares_memory(part, qkv) for part in (q, k, v))
    return q, k, v


def torch_rms_norm(x, weight, eps):
    """torch's RMS norm over the last axis, on a contiguous float64 copy."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float64))
    return F.rms_norm(t, (x.shape[-1],), torch.from_numpy(np.asarray(weight, np.float64)), eps).numpy()


def reads_memory_of(calls, buffer, position):
    return bool(calls) and all(np.shares_memory(call[position], buffer) for call in calls)


# ---------------------------------------------------------------------------------------
# NumPy API


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_heads_of_q_and_k_sliced_from_packed_qkv_run_on_the_kernels_without_a_copy(dtype, kernel_calls):
    qkv = packed_qkv(dtype)
    q, k, _ = heads(qkv)
    weight = np.linspace(0.5, 1.5, D).astype(dtype)
    for part in (q, k):
        y = normlab.normalize(part, "b t h [d]", weight=weight, params="d", rms=True, eps=1e-6)
        np.testing.assert_allclose(y, torch_rms_norm(part, weight, 1e-6), rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-6 if dtype == np.float32 else 1e-12)
    assert len(kernel_calls["forward"]) == 2 and reads_memory_of(kernel_calls["forward"], qkv, 0)


def test_out_writes_normalized_heads_back_into_the_packed_buffer_in_place(kernel_calls):
    qkv = packed_qkv(np.float32)
    original = qkv.copy()
    q, k, v = heads(qkv)
    expected_q, expected_k = (torch_rms_norm(part, np.ones(D), 1e-6) for part in heads(original)[:2])
    for part in (q, k):
        assert normlab.normalize(part, "b t h [d]", rms=True, eps=1e-6, out=part) is part
    np.testing.assert_allclose(q, expected_q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k, expected_k, rtol=1e-5, atol=1e-6)
    assert v.tobytes() == heads(original)[2].tobytes()  # v is left as it was
    assert len(kernel_calls["forward"]) == 2
    assert reads_memory_of(kernel_calls["forward"], qkv, 0) and reads_memory_of(kernel_calls["forward"], qkv, 1)


def test_out_into_a_strided_view_of_another_buffer_gets_the_result_and_nothing_around_it():
    qkv = packed_qkv(np.float64)
    q = heads(qkv)[0]
    target = np.full((B, T, 3 * H * D), 7.0)
    out = target[..., H * D:2 * H * D].reshape(B, T, H, D)
    normlab.normalize(q, "b t h [d]", rms=True, eps=1e-6, out=out)
    np.testing.assert_allclose(out, torch_rms_norm(q, np.ones(D), 1e-6), rtol=1e-12, atol=1e-12)
    assert (target[..., :H * D] == 7).all() and (target[..., 2 * H * D:] == 7).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_on_strided_heads_match_torch_autograd_without_a_copy(dtype, kernel_calls):
    qkv = packed_qkv(dtype)
    k = heads(qkv)[1]
    weight = np.linspace(0.5, 1.5, D).astype(dtype)
    grad_y = np.random.default_rng(3).standard_normal(k.shape).astype(dtype)
    grad_x, grad_w, _ = normlab.normalize_backward(grad_y, k, "b t h [d]", weight=weight, params="d", rms=True,
                                                   eps=1e-6)
    x_t = torch.tensor(k, dtype=torch.float64, requires_grad=True)
    w_t = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    F.rms_norm(x_t, (D,), w_t, 1e-6).backward(torch.from_numpy(grad_y.astype(np.float64)))
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_x, x_t.grad.numpy(), **tolerance)
    np.testing.assert_allclose(grad_w, w_t.grad.numpy(), **tolerance)
    assert reads_memory_of(kernel_calls["backward"], qkv, 1)  # (grad_y, x, ...): x read in place


def sliced(axis_size):
    """(start, stop, step) of a non-empty slice of an axis of ``axis_size``."""
    return st.tuples(st.integers(0, axis_size // 2), st.integers(0, (axis_size - 1) // 2),
                     st.sampled_from([1, 1, 2, -1]))


def apply_slice(array, axis, bounds):
    start, stop, step = bounds
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, array.shape[axis] - stop)
    index_step = [slice(None)] * array.ndim
    index_step[axis] = slice(None, None, step)
    return array[tuple(index)][tuple(index_step)]


@given(rows_slice=sliced(5), heads_slice=sliced(4), width=st.integers(1, 6), rms=st.booleans(), data=st.data())
def test_any_strided_view_normalizes_as_torch_does_on_a_contiguous_copy(rows_slice, heads_slice, width, rms, data):
    """Whether its rows are read in place or copied, a strided view (and a strided out)
    gives torch's numbers on a contiguous copy."""
    buffer = np.random.default_rng(width).standard_normal((5, 4, 9)) * 2 + 3
    column = data.draw(st.integers(0, 9 - width))
    view = apply_slice(apply_slice(buffer[..., column:column + width], 0, rows_slice), 1, heads_slice)
    if data.draw(st.booleans()):
        view = view.transpose(1, 0, 2)
    t = torch.from_numpy(np.ascontiguousarray(view))
    expected = (F.rms_norm(t, (width,), eps=1e-5) if rms else F.layer_norm(t, (width,), eps=1e-5)).numpy()
    actual = normlab.normalize(view, "a b [d]", rms=rms, backend="numba")
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)
    spread = data.draw(st.sampled_from([1, 2]))  # 1: rows of out contiguous, 2: every other element
    out = np.full(view.shape[:-1] + (spread * width + 3,), 7.0)
    target = out[..., 1:1 + spread * width:spread]
    normlab.normalize(view, "a b [d]", rms=rms, backend="numba", out=target)
    np.testing.assert_allclose(target, expected, rtol=1e-10, atol=1e-10)
    assert (out[..., 0] == 7).all() and (out[..., spread * width + 1:] == 7).all()


# ---------------------------------------------------------------------------------------
# torch: RMSNorm(head_dim) on views of a packed projection


def qkv_views(qkv):
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
    return q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_of_head_dim_on_packed_q_and_k_matches_torch_nn_rms_norm_without_a_copy(dtype, kernel_calls):
    qkv = torch.randn(B, T, (H + 2 * KV) * D, dtype=dtype, requires_grad=True)
    q, k, _ = qkv_views(qkv)
    assert not q.is_contiguous() and not k.is_contiguous()
    norm = nt.RMSNorm(D, eps=1e-6, dtype=dtype)
    reference = torch.nn.RMSNorm(D, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, D))
        reference.weight.copy_(norm.weight)
    grad_q, grad_k = torch.randn(q.shape, dtype=dtype), torch.randn(k.shape, dtype=dtype)

    def step(module):
        qkv.grad, module.weight.grad = None, None
        out_q, out_k = module(q), module(k)
        torch.autograd.backward((out_q, out_k), (grad_q, grad_k))
        return out_q, out_k, qkv.grad, module.weight.grad

    ours, theirs = step(norm), step(reference)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, **tolerance)
    buffer = qkv.detach().numpy()
    assert len(kernel_calls["forward"]) == 2 and reads_memory_of(kernel_calls["forward"], buffer, 0)
    assert len(kernel_calls["backward"]) == 2 and reads_memory_of(kernel_calls["backward"], buffer, 1)


def test_rms_norm_on_a_packed_slice_without_gradients_reads_it_in_place(kernel_calls):
    qkv = torch.randn(B, T, (H + 2 * KV) * D)
    q = qkv_views(qkv)[0]
    norm = nt.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        y = norm(q)
    torch.testing.assert_close(y, torch.nn.RMSNorm(D, eps=1e-6)(q), rtol=1e-5, atol=1e-6)
    assert reads_memory_of(kernel_calls["forward"], qkv.numpy(), 0)


def test_gradcheck_passes_through_rms_norm_on_a_packed_slice():
    qkv = torch.randn(1, 3, (H + 2 * KV) * D, dtype=torch.float64, requires_grad=True)
    norm = nt.RMSNorm(D, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, D))

    assert torch.autograd.gradcheck(lambda packed: norm(packed[..., H * D:(H + KV) * D].view(1, 3, KV, D)), (qkv,))
    assert torch.autograd.gradcheck(lambda packed: norm(packed[..., :H * D].view(1, 3, H, D)), (qkv,))


@pytest.mark.parametrize("rms", [True, False], ids=["rms_norm", "layer_norm"])
def test_a_per_head_norm_pattern_under_vmap_gives_torch_nn_s_norm_of_each_packed_head(rms):
    """``Norm("b t h [d]")`` on the strided q heads of each of a vmapped stack of packed
    projections (an ensemble, per-sample gradients), as torch.nn.RMSNorm/LayerNorm give."""
    torch.manual_seed(0)
    norm = nt.Norm("b t h [d]", params="d", d=D, rms=rms, eps=1e-6)
    reference = torch.nn.RMSNorm(D, eps=1e-6) if rms else torch.nn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    norm.load_state_dict(reference.state_dict())
    stacked = torch.randn(3, B, T, (H + 2 * KV) * D)

    def heads(module):
        return lambda qkv: module(qkv_views(qkv)[0])

    torch.testing.assert_close(torch.func.vmap(heads(norm))(stacked), torch.func.vmap(heads(reference))(stacked))


@pytest.mark.parametrize("casting", ["olmo", "cohere", "deberta"])
@pytest.mark.parametrize("path", ["auto", "kernel"])
def test_recipe_layer_norm_with_a_weight_per_head_normalizes_each_head_and_scales_it_on_every_path(casting, path):
    """RecipeLayerNorm((heads, head_dim)): each head normalized, scaled by its own weight
    and bias. The "olmo" recipe handed the (heads, head_dim) weight to F.layer_norm over the
    last axis, which raised "Expected weight to be of same shape as normalized_shape" on the
    default path while the kernels computed."""
    torch.manual_seed(0)
    norm = nt.RecipeLayerNorm((H, D), casting=casting, bias=True).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    with nt.use_path(path):
        y = norm(x)
    expected = F.layer_norm(x, (D,), eps=norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(y, expected)
    grad_y = torch.randn_like(y)
    inputs = (x, norm.weight, norm.bias)
    torch.testing.assert_close(torch.autograd.grad(y, inputs, grad_y), torch.autograd.grad(expected, inputs, grad_y))


transformers = pytest.importorskip("transformers")
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402

from tests.test_convert_models import (  # noqa: E402
    assert_same_numbers, causal_lm_call, converted_copy, random_parameters)


@pytest.mark.parametrize("original_class, size, part", [(Qwen3RMSNorm, D, "heads"), (Olmo2RMSNorm, H * D, "whole")],
                         ids=["qwen3_per_head", "olmo2_whole_projection"])
def test_converted_qk_norms_on_packed_slices_match_transformers(original_class, size, part):
    """Qwen3 normalizes each head (``view(b, t, h, d)``), OLMo2 the whole q projection."""
    original = random_parameters(original_class(size, eps=1e-6))
    converted = converted_copy(original)
    assert type(converted) is nt.RMSNorm
    qkv = torch.randn(B, T, (H + 2 * KV) * D, requires_grad=True)
    q = qkv_views(qkv)[0] if part == "heads" else qkv[..., :H * D]
    grad = torch.randn(q.shape)
    results = []
    for module in (original, converted):
        qkv.grad, module.weight.grad = None, None
        y = module(q)
        y.backward(grad)
        results.append((y, qkv.grad, module.weight.grad))
    for expected, actual in zip(*results):
        assert torch.equal(actual, expected)  # the recipe runs transformers' own operations
    with nt.use_path("kernel"):  # on the kernels: float rounding apart
        torch.testing.assert_close(converted(q), results[0][0], rtol=1e-5, atol=1e-5)


def tiny_qwen3():
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=H, num_key_value_heads=KV, head_dim=D,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    return random_parameters(transformers.Qwen3ForCausalLM(config))


def test_converted_tiny_qwen3_gives_the_same_logits_and_gradients_to_the_bit_in_float32():
    original = tiny_qwen3()
    converted = converted_copy(original)
    attention = converted.model.layers[0].self_attn
    assert type(attention.q_norm) is nt.RMSNorm and type(attention.k_norm) is nt.RMSNorm
    assert attention.q_norm.casting == "llama" and attention.q_norm.normalized_shape == (D,)
    norms = [m for m in converted.modules() if isinstance(m, nt.RMSNorm)]
    assert len(norms) == 2 * 4 + 1  # per layer: input, post-attention, q and k; then the final norm
    assert list(converted.state_dict()) == list(original.state_dict())
    assert_same_numbers(original, converted, torch.randn(2, 7, 32), None, call=causal_lm_call)
