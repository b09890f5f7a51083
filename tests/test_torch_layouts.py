"""Tensors whose memory NumPy cannot read as they are (sparse and MKL-DNN layouts, and
lazily negated views such as ``z.conj().imag`` of a complex ``z``) into the twins: what
torch.nn computes (an MKL-DNN batch norm in training or evaluation, a negated view) the
twin computes, and where torch.nn raises, the twin raises the same exception type; never
NumPy's TypeError or a value read without its sign. The module has run on dense input
first, so its cached calls for that shape are in place. Oracle: torch.nn on the same
input and state."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from tests.twins import randomized_pair  # noqa: E402

CASES = [
    ("LayerNorm", (4,), (3, 4)),
    ("RMSNorm", (4,), (3, 4)),
    ("GroupNorm", (2, 4), (3, 4, 5, 5)),
    ("BatchNorm1d", (4,), (3, 4)),
    ("BatchNorm2d", (4,), (3, 4, 5, 5)),
    ("InstanceNorm2d", (4,), (3, 4, 5, 5)),
]
LAYOUTS = {"sparse": lambda x: x.to_sparse(), "mkldnn": lambda x: x.to_mkldnn(),
           # the values of x, read through the negative bit of the conjugate's imaginary part
           "negated view": lambda x: torch.complex(torch.zeros_like(x), -x).conj().imag}


def _outcome(module, x):
    try:
        y = module(x)
    except Exception as error:  # noqa: BLE001 (the exception type is what is compared)
        return type(error), None
    return None, y.to_dense()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("cls_name, args, shape", CASES, ids=[c[0] for c in CASES])
def test_a_tensor_of_another_layout_meets_torchs_outcome(cls_name, args, shape, mode, layout, grad):
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    for module in (reference, twin):
        getattr(module, mode)()
    for _ in range(2):  # dense calls first: the twin keeps what they planned
        dense = torch.randn(shape)
        for module in (reference, twin):
            module(dense)
    x = LAYOUTS[layout](torch.randn(shape) * 2 + 1)
    assert layout != "negated view" or x.is_neg()
    with torch.set_grad_enabled(grad):
        expected_error, expected = _outcome(reference, x)
        error, got = _outcome(twin, x)
    assert error is expected_error
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(twin.state_dict()[name], value, rtol=1e-5, atol=1e-5)


def _negated(x):
    return torch.complex(torch.zeros_like(x), -x).conj().imag


@pytest.mark.parametrize("which", ["x", "residual"])
def test_fused_add_rms_norm_reads_a_negated_view_with_its_sign(which):
    """Oracle: torch's ``x + residual`` and ``F.rms_norm``."""
    from normlab.torch import FusedAddRMSNorm

    torch.manual_seed(0)
    norm = FusedAddRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, residual = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    norm(x, residual)  # a dense call first
    inputs = {"x": x, "residual": residual}
    inputs[which] = _negated(inputs[which])
    assert inputs[which].is_neg()
    y, total = norm(inputs["x"], inputs["residual"])
    torch.testing.assert_close(total, x + residual)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + residual, (8,), norm.weight, 1e-6))


def test_gated_rms_norm_reads_a_negated_gate_with_its_sign():
    """Oracle: mamba_ssm's RMSNormGated formula (norm before gate) in torch operations."""
    from normlab.torch import GatedRMSNorm

    torch.manual_seed(0)
    norm = GatedRMSNorm(8, group_size=4, eps=1e-6)
    x, z = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    norm(x, z)
    groups = x.view(2, 3, 2, 4)
    normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = normed.view(2, 3, 8) * norm.weight * torch.nn.functional.silu(z)
    torch.testing.assert_close(norm(x, _negated(z)), expected)


def _nested(layout):
    """Two rows of 2 and 3 tokens of 4 features, the strided or the jagged nested layout."""
    torch.manual_seed(1)
    return torch.nested.nested_tensor([torch.randn(2, 4) * 2 + 1, torch.randn(3, 4) * 2 + 1], layout=layout,
                                      requires_grad=True)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
@pytest.mark.parametrize("cls_name, args", [("LayerNorm", (4,)), ("RMSNorm", (4,)), ("GroupNorm", (2, 4)),
                                             ("BatchNorm1d", (4,)), ("InstanceNorm1d", (4,))],
                         ids=["LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "InstanceNorm1d"])
def test_a_nested_tensor_meets_torchs_outcome_forward_and_backward(cls_name, args, layout):
    """Oracle: torch.nn on the same nested tensor (it normalizes both layouts over the last
    dimension in a layer norm, the jagged one in an RMS norm, and refuses the rest)."""
    reference, twin = randomized_pair(cls_name, args, torch.float32)
    outcomes = []
    for module in (reference, twin):
        x = _nested(layout)
        try:
            y = module(x)
        except Exception as error:  # noqa: BLE001 (the exception type is what is compared)
            outcomes.append((type(error), None))
            continue
        padded = y.to_padded_tensor(0.0)
        (padded * torch.arange(padded.numel()).reshape(padded.shape)).sum().backward()
        outcomes.append((None, (padded, x.grad.to_padded_tensor(0.0)) + tuple(p.grad for p in module.parameters())))
    (expected_error, expected), (error, got) = outcomes
    assert error is expected_error
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _nested_pair(layout):
    """x and a second input of x's rows (a residual, a gate), in one nested layout."""
    x = _nested(layout)
    torch.manual_seed(2)
    rows = [torch.randn(2, 4), torch.randn(3, 4)]
    if layout == torch.jagged:  # (the same offsets as x: jagged tensors add where their rows agree)
        other = torch.nested.nested_tensor_from_jagged(torch.cat(rows), x.offsets())
    else:
        other = torch.nested.nested_tensor(rows, layout=layout)
    return x, other.requires_grad_()


def _fused_cases():
    from torch.nn import functional as F
    from normlab.torch import FusedAddLayerNorm, FusedAddRMSNorm, GatedRMSNorm

    layer_norm, rms_norm = torch.nn.LayerNorm(4), torch.nn.RMSNorm(4, eps=1e-6)
    return {"FusedAddLayerNorm": (FusedAddLayerNorm(4), lambda x, r: (layer_norm(x + r), x + r), layer_norm),
            # (on float32 every casting is nn.LayerNorm's: none of them may refuse a layout it takes)
            "FusedAddLayerNorm-none": (FusedAddLayerNorm(4, casting="none"), lambda x, r: (layer_norm(x + r), x + r),
                                       layer_norm),
            "FusedAddRMSNorm": (FusedAddRMSNorm(4, eps=1e-6), lambda x, r: (rms_norm(x + r), x + r), rms_norm),
            "GatedRMSNorm": (GatedRMSNorm(4, eps=1e-6), lambda x, z: rms_norm(x) * F.silu(z), rms_norm)}


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
@pytest.mark.parametrize("block", ["FusedAddLayerNorm", "FusedAddLayerNorm-none", "FusedAddRMSNorm", "GatedRMSNorm"])
def test_a_fused_block_on_nested_tensors_computes_what_the_torch_nn_code_it_replaces_does(block, layout):
    """Oracle: torch.nn.LayerNorm of x + residual, torch.nn.RMSNorm of x + residual and
    torch.nn.RMSNorm(x) * silu(z) on the same nested tensors (torch.nn computes the layer
    norm of both layouts, the RMS norm of the jagged one): outputs, the gradients of both
    inputs and of the weight (and bias), or the refusal (a RuntimeError or NotImplementedError)."""
    torch.manual_seed(0)
    fused, replaced, norm = _fused_cases()[block]
    with torch.no_grad():
        for reference, twin in zip(norm.parameters(), fused.parameters()):
            twin.copy_(reference.uniform_(0.5, 1.5))
    outcomes = []
    for module, call in ((norm, replaced), (fused, fused)):
        x, other = _nested_pair(layout)
        try:
            outputs = call(x, other)
        except (RuntimeError, NotImplementedError):
            outcomes.append(None)
            continue
        padded = [y.to_padded_tensor(0.0) for y in (outputs if isinstance(outputs, tuple) else (outputs,))]
        sum((y * torch.arange(y.numel()).reshape(y.shape)).sum() for y in padded).backward()
        outcomes.append((padded, x.grad.to_padded_tensor(0.0), other.grad.to_padded_tensor(0.0),
                         [p.grad for p in module.parameters()]))
    expected, got = outcomes
    assert (got is None) == (expected is None)
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
