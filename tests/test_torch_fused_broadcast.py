"""A residual that broadcasts against the input, in the fused add-and-norm blocks: the
composite they replace, ``norm(x + residual)`` (transformers' LlamaRMSNorm after
``residual + hidden_states``, torch.nn.LayerNorm after the add), broadcasts either way;
so do the blocks, returning the broadcast sum, with gradients autograd sums over the
broadcast axes. (Liger's and vLLM's fused kernels take equal shapes only.)"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from normlab.torch import FusedAddLayerNorm, FusedAddRMSNorm  # noqa: E402

SHAPES = [
    ((3, 5, 16), (5, 16)),      # one residual for every sample
    ((5, 16), (3, 5, 16)),      # the input broadcast up to the residual
    ((3, 5, 16), (16,)),        # a residual per channel
    ((3, 1, 16), (1, 5, 16)),   # each broadcasts along another axis
    ((3, 5, 1), (3, 5, 16)),    # the input's trailing axis is 1: the sum's is the norm's
]
IDS = ["residual_2d", "x_2d", "residual_1d", "both", "x_trailing_1"]


def _blocks(kind, dtype):
    gen = torch.Generator().manual_seed(0)
    if kind == "rms":
        # (LlamaRMSNorm computes in float32 even for float64 input: torch's RMSNorm there)
        theirs = LlamaRMSNorm(16, eps=1e-6) if dtype != torch.float64 else torch.nn.RMSNorm(16, eps=1e-6)
        ours = FusedAddRMSNorm(16, eps=1e-6)
    else:
        ours, theirs = FusedAddLayerNorm(16), torch.nn.LayerNorm(16)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ours.load_state_dict(theirs.state_dict())
    return ours.to(dtype), theirs.to(dtype)


@pytest.mark.parametrize("x_shape, residual_shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_fused_add_blocks_broadcast_the_residual_as_the_composite_norm_of_the_sum_does(kind, dtype, x_shape,
                                                                                       residual_shape):
    ours, theirs = _blocks(kind, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=gen).to(dtype).requires_grad_()
    residual = torch.randn(residual_shape, generator=gen).to(dtype).requires_grad_()
    y, total = ours(x, residual)
    want_total = residual + x
    want_y = theirs(want_total)
    assert y.shape == want_y.shape and total.shape == want_total.shape
    tolerance = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6),
                 torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)
    torch.testing.assert_close(y, want_y, **tolerance)
    g_y, g_total = torch.randn(y.shape, generator=gen).to(dtype), torch.randn(y.shape, generator=gen).to(dtype)
    inputs = [x, residual, ours.weight]
    got = torch.autograd.grad([y, total], inputs, [g_y, g_total])
    want = torch.autograd.grad([want_y, want_total], [x, residual, theirs.weight], [g_y, g_total])
    for a, b in zip(got, want):
        assert a.shape == b.shape
        # (bfloat16 sums the broadcast axes in another order: a few ulps of the largest entry)
        atol = tolerance["atol"] if dtype != torch.bfloat16 else 4 * 2 ** -8 * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=tolerance["rtol"], atol=max(atol, tolerance["atol"]))


@pytest.mark.parametrize("x_shape, residual_shape", [((3, 4, 6), (4, 6)), ((4, 6), (2, 4, 6))])
@pytest.mark.parametrize("make", [lambda: FusedAddRMSNorm(6), lambda: FusedAddLayerNorm(6)], ids=["rms", "layer"])
def test_fused_add_blocks_with_a_broadcast_residual_pass_gradcheck(make, x_shape, residual_shape):
    torch.manual_seed(0)
    block = make().double()
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(residual_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x, residual))


@pytest.mark.parametrize("make, reference", [
    (lambda: FusedAddRMSNorm(16), lambda: torch.nn.RMSNorm(16)),
    (lambda: FusedAddLayerNorm(16), lambda: torch.nn.LayerNorm(16)),
], ids=["rms", "layer"])
def test_fused_add_blocks_refuse_what_the_composite_refuses_with_a_runtime_error(make, reference):
    x = torch.randn(3, 5, 16)
    with pytest.raises(RuntimeError):  # the oracle: torch's add refuses it
        reference()(x + torch.randn(4, 16))
    with pytest.raises(RuntimeError, match=r"\[4, 16\].*\[3, 5, 16\]"):
        make()(x, torch.randn(4, 16))
    with pytest.raises(RuntimeError):  # the sum's trailing axis is not the norm's
        reference()(torch.randn(3, 5, 1) + torch.randn(3, 5, 1))
    with pytest.raises(RuntimeError, match="normalized_shape"):
        make()(torch.randn(3, 5, 1), torch.randn(5, 1))


# ---------------------------------------------------------------------------------------
# A gate that broadcasts against the input: transformers' gated norms compute
# ``x * silu(gate)`` (before or after the statistics), which broadcasts either way

GATE_SHAPES = [
    ((3, 5, 16), (5, 16)),      # one gate for every sample
    ((5, 16), (3, 5, 16)),      # the input broadcast up to the gate
    ((3, 5, 16), (3, 1, 16)),   # one gate per sample
    ((1, 5, 16), (3, 1, 16)),   # each broadcasts along another axis (x keeps its tokens: transformers
]                               # 5.20's FalconH1 norm squeezes an x of one token before the gate)
GATE_IDS = ["gate_2d", "x_2d", "gate_per_sample", "both"]


@pytest.mark.parametrize("x_shape, gate_shape", GATE_SHAPES, ids=GATE_IDS)
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_broadcasts_the_gate_as_transformers_gated_norms_do(dtype, norm_before_gate, x_shape,
                                                                            gate_shape):
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated

    from normlab.torch import GatedRMSNorm

    gen = torch.Generator().manual_seed(2)
    theirs = FalconH1RMSNormGated(16, eps=1e-6, n_groups=4, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(16, generator=gen))
    ours = GatedRMSNorm(16, eps=1e-6, group_size=4, norm_before_gate=norm_before_gate, casting="gemma")
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = torch.randn(x_shape, generator=gen).to(dtype).requires_grad_()
    z = torch.randn(gate_shape, generator=gen).to(dtype).requires_grad_()
    y, want = ours(x, z), theirs(x, z)
    assert y.shape == want.shape and y.dtype == want.dtype
    tolerance = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y, want, **tolerance)
    g = torch.randn(y.shape, generator=gen).to(dtype)
    got = torch.autograd.grad(y, [x, z, ours.weight], g)
    expected = torch.autograd.grad(want, [x, z, theirs.weight], g)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        # (bfloat16 sums the broadcast axes in another order: a few ulps of the largest entry)
        atol = tolerance["atol"] if dtype == torch.float32 else 4 * 2 ** -8 * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=tolerance["rtol"], atol=max(atol, tolerance["atol"]))


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_with_a_broadcast_gate_passes_gradcheck(norm_before_gate):
    from normlab.torch import GatedRMSNorm

    torch.manual_seed(0)
    block = GatedRMSNorm(6, group_size=3, norm_before_gate=norm_before_gate).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x, z))


def test_a_gate_that_does_not_broadcast_raises_torchs_runtime_error_naming_both_shapes():
    from normlab.torch import GatedRMSNorm

    with pytest.raises(RuntimeError, match=r"z has size \[3, 6\].*\[2, 4, 6\].*x \* silu\(z\)"):
        GatedRMSNorm(6)(torch.randn(2, 4, 6), torch.randn(3, 6))
