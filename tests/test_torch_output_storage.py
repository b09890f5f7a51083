"""The storage of a twin's output, as tools that free and refill memory use it: torch.nn's
norms return tensors whose storage torch allocated, which ``resize_`` grows, shrinks and
frees (PyG's reversible ``GroupAddRev`` frees each group's input and output with
``untyped_storage().resize_(0)`` and refills them in backward). Oracles: torch.nn's
modules (the storage's ``resizable()``, ``resize_``'s effect, the output's strides) and
PyG's ``GroupAddRev`` on them (outputs and gradients)."""

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import normlab.torch as nt  # noqa: E402

# (id, torch.nn original, input shape, memory format): the sizes of small calls, and one
# of the kernels' threaded sizes
NORMS = [
    ("layer_norm", lambda: nn.LayerNorm(64), (512, 64), None),
    ("layer_norm_one_row", lambda: nn.LayerNorm(64), (1, 64), None),
    ("layer_norm_2d_shape", lambda: nn.LayerNorm((3, 8)), (5, 3, 8), None),
    ("rms_norm", lambda: nn.RMSNorm(64), (2, 7, 64), None),
    ("group_norm", lambda: nn.GroupNorm(4, 16), (2, 16, 5, 5), None),
    ("layer_norm_threaded_size", lambda: nn.LayerNorm(512), (300, 512), None),
    ("batch_norm_1d", lambda: nn.BatchNorm1d(64), (512, 64), None),
    ("batch_norm_2d", lambda: nn.BatchNorm2d(16), (2, 16, 5, 5), None),
    ("batch_norm_2d_channels_last", lambda: nn.BatchNorm2d(16), (2, 16, 5, 5), torch.channels_last),
    ("batch_norm_3d_threaded_size", lambda: nn.BatchNorm3d(8), (4, 8, 16, 32, 32), None),
    ("instance_norm_1d", lambda: nn.InstanceNorm1d(8), (4, 8, 33), None),
    ("instance_norm_2d", lambda: nn.InstanceNorm2d(16), (8, 16, 32, 32), None),
    ("instance_norm_2d_affine_tracked", lambda: nn.InstanceNorm2d(16, affine=True, track_running_stats=True),
     (2, 16, 5, 5), None),
    ("instance_norm_2d_channels_last", lambda: nn.InstanceNorm2d(16, affine=True), (2, 16, 5, 5),
     torch.channels_last),
    ("instance_norm_3d", lambda: nn.InstanceNorm3d(4, affine=True), (2, 4, 3, 5, 6), None),
]
IDS = [case[0] for case in NORMS]


def _pair(make, dtype):
    torch.manual_seed(0)
    original = make().to(dtype)
    with torch.no_grad():
        for param in original.parameters():
            param.uniform_(0.5, 1.5)
    return original, nt.convert(copy.deepcopy(original))


def _input(shape, dtype, memory_format):
    x = torch.randn(shape, dtype=dtype)
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def _outputs(module, x, how):
    """The module's output on ``x``: with autograd recording (``train``), under
    ``torch.no_grad()``, or in evaluation mode under ``torch.inference_mode()``."""
    if how == "train":
        return module(x.detach().requires_grad_())
    if how == "no_grad":
        with torch.no_grad():
            return module(x)
    with torch.inference_mode():
        return module.eval()(x)


@pytest.mark.parametrize("make, shape, memory_format", [case[1:] for case in NORMS], ids=IDS)
@pytest.mark.parametrize("how", ["train", "no_grad", "inference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_twins_output_storage_resizes_as_torch_nns_does(make, shape, memory_format, how, dtype):
    """A twin's output came from ``torch.from_numpy``, whose storage cannot be resized:
    ``y.resize_`` to more elements and ``untyped_storage().resize_(0)`` raised "Trying to
    resize storage that is not resizable" where torch.nn's output resizes. Now, as torch.nn's:
    resizable, grown with its values kept, freed to no bytes; laid out as torch.nn's."""
    original, twin = _pair(make, dtype)
    x = _input(shape, dtype, memory_format)
    layouts = []
    for module in (original, twin):
        y = _outputs(module, x, how).detach()
        layouts.append(y.stride())
        values = y.as_strided((y.numel(),), (1,)).clone()  # (in memory order: resize_ keeps the memory)
        assert y.untyped_storage().resizable(), type(module)
        grown = y.resize_(y.numel() * 2)  # (a plain tensor's resize_: a no-grad output, or detached)
        assert grown.shape == (values.numel() * 2,)
        torch.testing.assert_close(grown[:values.numel()], values, rtol=0, atol=0)
        y.untyped_storage().resize_(0)
        assert y.untyped_storage().nbytes() == 0
    assert layouts[1] == layouts[0]


_TRAINED = [case for case in NORMS if case[0].startswith(("batch", "instance"))]


@pytest.mark.parametrize("make, shape, memory_format", [case[1:] for case in _TRAINED],
                         ids=[case[0] for case in _TRAINED])
@pytest.mark.parametrize("hook", [False, True])
def test_a_batch_or_instance_norm_twins_input_gradient_storage_resizes_as_torch_nns_does(make, shape, memory_format,
                                                                                       hook):
    """The input gradient of a batch or instance norm twin in training came from
    ``torch.from_numpy`` too; now it resizes as torch.nn's does, and has its values and
    layout, also where a saved-tensor hook hands back x in another layout than the forward's."""
    original, twin = _pair(make, torch.float64)
    x, grad_y = _input(shape, torch.float64, memory_format), torch.randn(shape, dtype=torch.float64)
    pack = (lambda t: t.clone(memory_format=torch.contiguous_format)) if hook else (lambda t: t)
    grads = []
    for module in (original, twin):
        leaf = x.detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(leaf)
        y.backward(grad_y)
        assert leaf.grad.untyped_storage().resizable(), type(module)
        grads.append(leaf.grad)
    assert grads[1].stride() == grads[0].stride()
    torch.testing.assert_close(grads[1], grads[0])
    grads[1].untyped_storage().resize_(0)


_AFFINE_TRAINED = [case for case in _TRAINED if case[1]().weight is not None]


@pytest.mark.parametrize("make, shape, memory_format", [case[1:] for case in _AFFINE_TRAINED],
                         ids=[case[0] for case in _AFFINE_TRAINED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_batch_or_instance_norm_twins_parameter_gradients_resize_as_torch_nns_do(make, shape, memory_format, dtype):
    """A float64 batch norm twin's weight.grad and bias.grad, and an affine instance norm
    twin's in float32 and float64, came from ``torch.from_numpy`` (two views of one NumPy
    buffer), which ``resize_`` refused where torch.nn's resize; now each is a tensor of its
    own that torch allocated, as torch.nn's, with its values: grown with its values kept, and
    freed without touching the other's."""
    original, twin = _pair(make, dtype)
    x, grad_y = _input(shape, dtype, memory_format), torch.randn(shape, dtype=dtype)
    results = []
    for module in (original, twin):
        module(x).backward(grad_y)
        grads = [param.grad for param in module.parameters()]
        assert len(grads) == 2
        for g in grads:
            assert g.untyped_storage().resizable(), type(module)
        values = [g.clone() for g in grads]
        grown = [g.resize_(g.numel() * 2) for g in grads]
        for g, kept in zip(grown, values):
            torch.testing.assert_close(g[:kept.numel()], kept, rtol=0, atol=0)
        grown[0].untyped_storage().resize_(0)
        torch.testing.assert_close(grown[1][:values[1].numel()], values[1], rtol=0, atol=0)
        results.append(values)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for mine, theirs in zip(*reversed(results)):
        torch.testing.assert_close(mine, theirs, **tolerance)


# (id, torch.nn original, input shape, input made strided): layer, RMS and group norm with
# gradients, on the kernels' one-chunk sizes, past one chunk of rows (kernels.row_chunks), at a
# threaded size, and on a strided input
ROW_GRADIENT_NORMS = [
    ("layer_norm", lambda: nn.LayerNorm(64), (512, 64), False),
    ("layer_norm_one_row", lambda: nn.LayerNorm(64), (1, 64), False),
    ("layer_norm_no_bias", lambda: nn.LayerNorm(64, bias=False), (8, 64), False),
    ("layer_norm_2d_shape", lambda: nn.LayerNorm((3, 8)), (5, 3, 8), False),
    ("rms_norm", lambda: nn.RMSNorm(64), (2, 7, 64), False),
    ("group_norm", lambda: nn.GroupNorm(4, 16), (2, 16, 5, 5), False),
    ("layer_norm_chunked_rows", lambda: nn.LayerNorm(64), (1024, 64), False),
    ("layer_norm_threaded_size", lambda: nn.LayerNorm(512), (300, 512), False),
    ("layer_norm_strided_input", lambda: nn.LayerNorm(64), (16, 64), True),
]


@pytest.mark.parametrize("make, shape, strided", [case[1:] for case in ROW_GRADIENT_NORMS],
                         ids=[case[0] for case in ROW_GRADIENT_NORMS])
@pytest.mark.parametrize("loss", ["sum", "grad_output", "strided_grad_output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_norms_input_and_parameter_gradients_resize_as_torch_nns_do(make, shape, strided, loss, dtype):
    """The gradients of a layer, RMS or group norm twin (x.grad, weight.grad, bias.grad) came
    from ``torch.from_numpy``, whose storage cannot be resized: ``resize_`` to more elements
    and ``untyped_storage().resize_(0)`` raised "Trying to resize storage that is not
    resizable" where torch.nn's gradients resize. Now, as torch.nn's: resizable, grown with
    their values kept, freed to no bytes (each alone: freeing one leaves the others' values);
    laid out as torch.nn's, with its values."""
    original, twin = _pair(make, dtype)
    x = _input(shape, dtype, None)
    if strided:
        x = torch.cat((x, x), dim=-1)[..., ::2]
    grad_y = torch.randn(shape, dtype=dtype)
    if loss == "strided_grad_output":
        grad_y = torch.cat((grad_y, grad_y), dim=-1)[..., 1::2]
    results = []
    for module in (original, twin):
        leaf = x.detach().requires_grad_()
        y = module(leaf)
        if loss == "sum":  # (the output gradient is then one value expanded)
            y.sum().backward()
        else:
            y.backward(grad_y)
        gradients = [leaf.grad] + [param.grad for param in module.parameters()]
        results.append([(g.clone(), g.stride()) for g in gradients])
        for g in gradients:
            assert g.untyped_storage().resizable(), type(module)
        values = [g.as_strided((g.numel(),), (1,)).clone() for g in gradients]
        grown = [g.resize_(g.numel() * 2) for g in gradients]
        for g, kept in zip(grown, values):
            torch.testing.assert_close(g[:kept.numel()], kept, rtol=0, atol=0)
        grown[0].untyped_storage().resize_(0)
        assert grown[0].untyped_storage().nbytes() == 0
        for g, kept in zip(grown[1:], values[1:]):  # (each in its own storage: still there)
            torch.testing.assert_close(g[:kept.numel()], kept, rtol=0, atol=0)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for (mine, mine_strides), (theirs, theirs_strides) in zip(results[1], results[0]):
        assert mine_strides == theirs_strides
        torch.testing.assert_close(mine, theirs, **tolerance)


@pytest.mark.parametrize("how", ["train", "no_grad"])
def test_a_twins_output_has_torch_nns_strides_for_an_input_with_unusual_strides_on_a_size_one_axis(how):
    """An input that is contiguous, but with any stride on a size-1 axis (a transposed
    column): torch.nn's layer norm gives an output of C-order strides, and so does the twin
    (an output made like the input would copy its strides)."""
    original, twin = _pair(lambda: nn.LayerNorm(64), torch.float32)
    x = torch.randn(64, 1).t()  # (shape (1, 64), strides (1, 1))
    assert x.is_contiguous() and x.stride() != (64, 1)
    expected = _outputs(original, x, how)
    actual = _outputs(twin, x, how)
    assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected)


class _NodeInstanceNorm(nn.Module):
    """An instance norm over the nodes' features (its input seen as one instance of 64
    channels), which PyG's graphs take in the (nodes, features) layout."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.InstanceNorm1d(channels, affine=True)

    def forward(self, x):
        return self.norm(x.t()[None])[0].t()


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_norm_whose_output_goes_straight_into_a_reversible_gnn_trains_after_convert(norm, dtype):
    """PyG's ``GroupAddRev`` frees its input (here the norm's output) in forward and refills
    it in backward with ``resize_``: a converted model computing ``rev(norm(x), edges)``
    raised "Trying to resize storage that is not resizable" in its first backward, where
    torch.nn's trains. Now it gives torch.nn's output, gradients and running statistics."""
    from torch_geometric.nn import GroupAddRev, SAGEConv

    make = {"layer_norm": lambda: nn.LayerNorm(64), "rms_norm": lambda: nn.RMSNorm(64),
            "group_norm": lambda: nn.GroupNorm(4, 64), "batch_norm": lambda: nn.BatchNorm1d(64),
            "instance_norm": lambda: _NodeInstanceNorm(64)}[norm]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = make()
            self.rev = GroupAddRev(SAGEConv(32, 32), num_groups=2)

        def forward(self, x, edge_index):
            return self.rev(self.norm(x), edge_index)

    torch.manual_seed(0)
    theirs = Model().to(dtype)
    ours = nt.convert(copy.deepcopy(theirs))
    assert any(type(module).__module__.startswith("normlab") for module in ours.norm.modules())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g, dtype=dtype)
    edges = torch.randint(0, 512, (2, 2048), generator=g)
    results = []
    for model in (ours, theirs):
        nodes = x.clone().requires_grad_()
        out = model(nodes, edges)
        y = out.detach().clone()  # (its memory is freed in backward)
        try:
            out.square().sum().backward()
        except RuntimeError as error:
            pytest.fail(f"{type(error).__name__}: {error}", pytrace=False)
        results.append((y, nodes.grad, [p.grad for p in model.parameters()], list(model.buffers())))
    (y, grad, grads, buffers), (y_ref, grad_ref, grads_ref, buffers_ref) = results
    # (float32: gradients summed over 512 nodes, in another order than torch.nn's)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(grad, grad_ref, **tolerance)
    for g, g_ref in zip(grads + buffers, grads_ref + buffers_ref):
        torch.testing.assert_close(g, g_ref, **tolerance)


# (id, torch.nn original, input shape, autograd, strided input or "offset"): inputs whose storage was freed
FREED_INPUTS = [
    ("layer_norm", "nn.LayerNorm(64)", (4, 64), False, False),
    ("layer_norm_grad", "nn.LayerNorm(64)", (4, 64), True, False),
    ("layer_norm_threaded_size", "nn.LayerNorm(512)", (300, 512), False, False),
    ("rms_norm", "nn.RMSNorm(64)", (2, 7, 64), False, False),
    ("rms_norm_grad", "nn.RMSNorm(64)", (2, 7, 64), True, False),
    ("group_norm", "nn.GroupNorm(4, 16)", (2, 16, 5, 5), False, False),
    ("group_norm_grad", "nn.GroupNorm(4, 16)", (2, 16, 5, 5), True, False),
    ("batch_norm", "nn.BatchNorm2d(8)", (4, 8, 3, 3), False, False),
    ("batch_norm_grad", "nn.BatchNorm2d(8)", (4, 8, 3, 3), True, False),
    ("batch_norm_threaded_size", "nn.BatchNorm2d(8)", (64, 8, 32, 32), False, False),
    ("batch_norm_threaded_size_grad", "nn.BatchNorm2d(8)", (64, 8, 32, 32), True, False),
    ("batch_norm_1d", "nn.BatchNorm1d(8)", (16, 8), False, False),
    ("layer_norm_offset", "nn.LayerNorm(64)", (4, 64), False, "offset"),
    ("layer_norm_offset_grad", "nn.LayerNorm(64)", (4, 64), True, "offset"),
    ("batch_norm_offset", "nn.BatchNorm1d(8)", (16, 8), False, "offset"),
    ("batch_norm_offset_grad", "nn.BatchNorm1d(8)", (16, 8), True, "offset"),
]

# Each case in one child process, in turn (a kernel that reads address 0 ends the process):
# torch.nn's error and the twin's on an input whose storage was freed. torch.nn.RMSNorm
# itself crashes there, so its case takes torch's layer_norm's check of the memory.
_FREED_CHILD = """
import json, sys, torch
from torch import nn
import normlab.torch as nt
for name, make, shape, grad, strided in json.loads(sys.argv[1]):
    original = eval(make)
    twin = nt.convert(eval(make))
    if strided == "offset":  # (the rows after the first of a tensor: its address is the offset's bytes once freed)
        x = torch.randn([shape[0] + 1] + shape[1:])[1:]
    else:
        x = torch.randn(shape[:-1] + [2 * shape[-1]])[..., ::2] if strided else torch.randn(shape)
    x.untyped_storage().resize_(0)
    x.requires_grad_(grad)
    errors = []
    for call in ((lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:])) if "RMS" in make else original,
                 twin):
        try:
            with torch.set_grad_enabled(grad):
                call(x)
            errors.append(None)
        except Exception as error:
            errors.append([type(error).__name__, str(error)])
    print(json.dumps([name] + errors), flush=True)
"""


@pytest.fixture(scope="module")
def freed_input_errors():
    import json
    import subprocess
    import sys

    cases = json.dumps([list(case) for case in FREED_INPUTS])
    run = subprocess.run([sys.executable, "-c", _FREED_CHILD, cases], capture_output=True, text=True, timeout=600)
    return {line[0]: line[1:] for line in map(json.loads, run.stdout.splitlines())}, run.returncode, run.stderr


@pytest.mark.slow  # (one child process that imports torch and normlab: about 5 s)
@pytest.mark.parametrize("case", FREED_INPUTS, ids=[case[0] for case in FREED_INPUTS])
def test_a_twin_given_an_input_whose_storage_was_freed_raises_torchs_error_and_does_not_crash(case,
                                                                                             freed_input_errors):
    """A twin handed an input whose storage was freed (``resize_(0)``, as GroupAddRev frees
    tensors until backward) gave its address, 0, to the kernels, which crashed the process
    (segmentation fault); torch.nn's layer and group norms raise a RuntimeError. The twin
    raises torch's error type and words, and says the storage was freed. Oracle: torch.nn's
    module on the same tensor (torch's layer_norm for RMSNorm, which crashes there too)."""
    results, returncode, stderr = freed_input_errors
    assert case[0] in results, f"the child process ended (return code {returncode}) before this case: {stderr[-600:]}"
    expected, got = results[case[0]]
    assert expected is not None and expected[0] == "RuntimeError"
    assert got is not None and got[0] == expected[0], got
    assert got[1].startswith(expected[1]) and "resize_(0)" in got[1], got[1]


def _ada_layer_norm_zero():
    return pytest.importorskip("diffusers.models.normalization").AdaLayerNormZero(64)


# (id, fused block, its reference in torch operations or the original class, second input's
# shape): the reference takes the block (its parameters) and the two inputs
FUSED = [
    ("fused_add_rms_norm", lambda: nt.FusedAddRMSNorm(64),
     lambda m, x, r: (F.rms_norm(x + r, (64,), m.weight, m.eps), x + r), (4, 8, 64)),
    ("fused_add_layer_norm", lambda: nt.FusedAddLayerNorm(64),
     lambda m, x, r: (F.layer_norm(x + r, (64,), m.weight, m.bias, m.eps), x + r), (4, 8, 64)),
    ("gated_rms_norm", lambda: nt.GatedRMSNorm(64, group_size=16),
     lambda m, x, z: F.rms_norm(x.unflatten(-1, (4, 16)), (16,), eps=m.eps).flatten(-2) * m.weight * F.silu(z),
     (4, 8, 64)),
    ("gated_rms_norm_gate_first", lambda: nt.GatedRMSNorm(64, norm_before_gate=False),
     lambda m, x, z: F.rms_norm(x * F.silu(z), (64,), m.weight, m.eps), (4, 8, 64)),
    ("ada_layer_norm", lambda: nt.AdaLayerNorm(64), None, (4, 64)),
]


@pytest.mark.parametrize("make, reference, other_shape", [case[1:] for case in FUSED], ids=[c[0] for c in FUSED])
@pytest.mark.parametrize("how", ["train", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_a_fused_blocks_outputs_and_input_gradients_resize_as_torch_nns_do(make, reference, other_shape, how, dtype,
                                                                          transposed):
    """A fused block's outputs (and with autograd its input gradients) came from
    ``torch.from_numpy``: ``resize_`` raised "Trying to resize storage that is not resizable",
    where the operations it replaces give tensors that resize. Now they resize as those do,
    with the reference's values and gradients (diffusers' AdaLayerNormZero for AdaLayerNorm)."""
    torch.manual_seed(0)
    block = make().to(dtype)
    with torch.no_grad():
        for param in block.parameters():
            param.uniform_(0.5, 1.5)
    if reference is None:  # (the original class, with the block's parameters)
        original = _ada_layer_norm_zero().to(dtype)
        original.load_state_dict(block.state_dict())
        reference = lambda m, x, emb: original(x, emb=emb)  # noqa: E731
    # (a transposed x takes the blocks' general path, a contiguous one their cached calls)
    x = torch.randn(64, 8, 4, dtype=dtype).permute(2, 1, 0) if transposed else torch.randn(4, 8, 64, dtype=dtype)
    other = torch.randn(other_shape, dtype=dtype)
    results = []
    for module, call in ((block, lambda a, b: block(a, emb=b) if isinstance(block, nt.AdaLayerNorm) else block(a, b)),
                         (block, lambda a, b: reference(block, a, b))):
        leaves = [t.detach().clone().requires_grad_(how == "train") for t in (x, other)]
        with torch.set_grad_enabled(how == "train"):
            outputs = call(*leaves)
        outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        outputs = outputs[:2] if isinstance(block, nt.FusedAddRMSNorm) or isinstance(block, nt.FusedAddLayerNorm) \
            else outputs[:1]  # (AdaLayerNorm's chunks come from its linear layer)
        grads = []
        if how == "train":
            grads = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(outputs)), leaves)
        for t in outputs + list(grads):
            t = t.detach()
            assert t.untyped_storage().resizable(), (tuple(t.shape), "the block's" if not results else "reference's")
        results.append([t.detach().clone() for t in outputs + list(grads)])
        storages = {t.untyped_storage().data_ptr(): t.detach() for t in outputs + list(grads)}
        for t in storages.values():  # (once each: x's and the residual's gradients may be one tensor)
            values = t.as_strided((t.numel(),), (1,)).clone()  # (in memory order: resize_ keeps the memory)
            grown = t.resize_(t.numel() * 2)
            torch.testing.assert_close(grown[:values.numel()], values, rtol=0, atol=0)
            t.untyped_storage().resize_(0)
    # (bfloat16: the block rounds as its casting recipe, the reference as torch's operations)
    tolerance = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: {},
                 torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_per_frame_group_norms_input_gradient_resizes_as_the_diffusers_originals_does(dtype):
    """A Norm whose rows split a grouped axis ("b (g [c]) t [h w]", the converted MiniMax-H3
    group norm of each frame) computes its input gradient in the rows' order, and NumPy's
    reshape to the input's shape copied it into NumPy's memory, which reached torch through
    ``torch.from_numpy`` and cannot be resized, where the original's (torch's group norm)
    resizes."""
    minimax = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_minimax_h3")
    original, twin = _pair(lambda: minimax.MiniMaxH3VideoGroupNorm(4, 8, eps=1e-6), dtype)
    assert type(twin) is nt.PerFrameGroupNorm
    x, grad_y = torch.randn(2, 8, 3, 4, 5, dtype=dtype), torch.randn(2, 8, 3, 4, 5, dtype=dtype)
    grads = []
    for module in (original, twin):
        leaf = x.detach().requires_grad_()
        module(leaf).backward(grad_y)
        assert leaf.grad.untyped_storage().resizable(), type(module)
        grads.append(leaf.grad)
    assert grads[1].stride() == grads[0].stride()
    torch.testing.assert_close(grads[1], grads[0])
    values = grads[1].clone()
    assert torch.equal(grads[1].resize_(2 * x.numel())[:x.numel()], values.view(-1))
    grads[1].untyped_storage().resize_(0)
    assert grads[1].untyped_storage().nbytes() == 0


# (id, torch.nn original, input shape, the axis a mask= cuts, how many of its positions it
# counts): the mask counts a prefix along that axis, on which torch.nn's module (given the
# prefix alone) is the oracle: whole rows for layer and RMS norm, positions for the others
MASKED = [
    ("layer_norm", lambda: nn.LayerNorm(64), (4, 8, 64), 1, 5),
    ("rms_norm", lambda: nn.RMSNorm(64), (4, 8, 64), 1, 5),
    ("batch_norm_1d", lambda: nn.BatchNorm1d(8), (4, 8, 10), 2, 7),
    ("batch_norm_2d", lambda: nn.BatchNorm2d(8), (4, 8, 5, 6), 2, 3),
    ("instance_norm_2d", lambda: nn.InstanceNorm2d(8, affine=True), (4, 8, 5, 6), 2, 3),
    ("group_norm", lambda: nn.GroupNorm(2, 8), (4, 8, 10), 2, 7),
]


@pytest.mark.parametrize("make, shape, axis, counted", [case[1:] for case in MASKED], ids=[c[0] for c in MASKED])
@pytest.mark.parametrize("how", ["train", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_masked_twins_output_and_input_gradient_resize_as_torch_nns_do(make, shape, axis, counted, how, dtype):
    """A twin called with mask= returned an output (and gave an input gradient) from
    ``torch.from_numpy``, which ``resize_`` refused with "Trying to resize storage that is not
    resizable", where torch.nn's resize. Now they resize as torch.nn's, with torch.nn's
    values and gradients on what the mask counts (torch.nn's module on that part alone)."""
    original, twin = _pair(make, dtype)
    x = torch.randn(shape, dtype=dtype)
    mask_shape = list(shape)
    mask_shape[-1 if isinstance(original, (nn.LayerNorm, nn.RMSNorm)) else 1] = 1
    index = [1] * len(shape)
    index[axis] = shape[axis]
    mask = (torch.arange(shape[axis]) < counted).reshape(index).expand(mask_shape)
    part = [slice(None)] * len(shape)
    part[axis] = slice(0, counted)
    grad_y = torch.randn(x[tuple(part)].shape, dtype=dtype)
    results = []
    for module, call in ((twin, lambda a: twin(a, mask=mask)[tuple(part)]), (original, lambda a: original(a[tuple(part)]))):
        leaf = x.clone().requires_grad_(how == "train")
        with torch.set_grad_enabled(how == "train"):
            y = call(leaf)
        tensors = [y.detach()]
        if how == "train":
            (y * grad_y).sum().backward()
            tensors.append(leaf.grad)
        for t in tensors:
            assert t.untyped_storage().resizable(), type(module)
        results.append([t.clone() for t in tensors] + [b.clone() for b in module.buffers()])
        for t in tensors:
            values = t.untyped_storage().nbytes()
            t.untyped_storage().resize_(values * 2)
            t.untyped_storage().resize_(0)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tolerance)


_EMPTY_INPUTS = {
    "norm_over_time": (lambda: nt.Norm("b [t] c", "c", c=16), (0, 5, 16), {}),
    "norm_over_batch": (lambda: nt.Norm("[b] c", "c", c=16), (0, 16), {}),
    "per_head_layer_norm": (lambda: nt.PerHeadLayerNorm(2, 8), (0, 3, 2, 8), {}),
    "norm_with_mask": (lambda: nt.Norm("b [t] c", "c", c=16), (0, 5, 16), {"mask": True}),
}


@pytest.mark.parametrize("name", list(_EMPTY_INPUTS))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_twin_given_an_empty_input_leaves_its_storage_resizable_and_returns_one_that_resizes(name, grad):
    """The NumPy view of an empty tensor was ``Tensor.numpy()``'s, which marks the storage
    non-resizable for good: a Norm called on an empty batch left the caller's input, and its
    own output, unable to resize, where torch.nn's layer norm leaves the input as it was and
    returns an output that resizes."""
    make, shape, extra = _EMPTY_INPUTS[name]
    outcomes = []
    for module in (nn.LayerNorm(shape[-1]), make()):
        x = torch.randn(shape, requires_grad=grad)
        kwargs = {"mask": torch.ones(shape, dtype=torch.bool)} if extra and type(module) is not nn.LayerNorm else {}
        y = module(x, **kwargs)
        if grad:
            y.sum().backward()
        outcomes.append((x.untyped_storage().resizable(), y.untyped_storage().resizable(),
                         x.grad.untyped_storage().resizable() if grad else None))
    assert outcomes[0] == (True, True, True if grad else None)
    assert outcomes[1] == outcomes[0]


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", ["rms", "layer"])
def test_a_fused_blocks_parameter_gradients_resize_as_torch_nns_on_x_plus_residual(block, dtype, layout):
    """The fused blocks handed autograd their parameter gradients through
    ``torch.from_numpy`` (the cached calls, float32 and float64 alike, and the general path
    a transposed input takes), whose storage never resizes, where torch.nn's norm of
    x + residual gives gradients that do."""
    make = {"rms": lambda: (nn.RMSNorm(16, eps=1e-6), nt.FusedAddRMSNorm(16, eps=1e-6)),
            "layer": lambda: (nn.LayerNorm(16), nt.FusedAddLayerNorm(16))}[block]
    original, twin = (module.to(dtype) for module in make())
    with torch.no_grad():
        for param in original.parameters():
            param.uniform_(0.5, 1.5)
    twin.load_state_dict(original.state_dict())
    x, residual = torch.randn(2, 6, 16, dtype=dtype), torch.randn(2, 6, 16, dtype=dtype)
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    grad_y = torch.randn(2, 6, 16, dtype=dtype)
    original(x + residual).backward(grad_y)
    twin(x, residual)[0].backward(grad_y)
    for name, expected in original.named_parameters():
        actual = dict(twin.named_parameters())[name]
        assert expected.grad.untyped_storage().resizable()
        assert actual.grad.untyped_storage().resizable(), name
        torch.testing.assert_close(actual.grad, expected.grad)
        values = actual.grad.clone()
        assert torch.equal(actual.grad.resize_(32)[:16], values)
        actual.grad.untyped_storage().resize_(0)


_MASKED_PARAMETERS = {
    "layer_norm": (lambda: nn.LayerNorm(16), (3, 5, 16)),
    "rms_norm": (lambda: nn.RMSNorm(16), (3, 5, 16)),
    "group_norm": (lambda: nn.GroupNorm(4, 16), (3, 16, 5)),
    "batch_norm": (lambda: nn.BatchNorm1d(16), (3, 16, 5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(_MASKED_PARAMETERS))
def test_a_masked_twins_parameter_gradients_resize_as_torch_nns(name, dtype):
    """With mask=, the twins' backward handed autograd the parameter gradients through
    ``torch.from_numpy``, whose storage never resizes, where torch.nn's module (here on the
    same input with every element counted, the mask all True) gives gradients that do."""
    make, shape = _MASKED_PARAMETERS[name]
    original, twin = _pair(make, dtype)
    x, grad_y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    original(x).backward(grad_y)
    twin(x, mask=torch.ones(shape, dtype=torch.bool)).backward(grad_y)
    for param_name, expected in original.named_parameters():
        actual = dict(twin.named_parameters())[param_name]
        assert expected.grad.untyped_storage().resizable()
        assert actual.grad.untyped_storage().resizable(), param_name
        torch.testing.assert_close(actual.grad, expected.grad)
        actual.grad.untyped_storage().resize_(0)
        assert actual.grad.untyped_storage().nbytes() == 0


# (id, PyG's original, whether forward takes a batch vector): the graph norms that convert() turns into twins
GEOMETRIC = [
    ("layer_norm_graph_mode", lambda nn_: nn_.LayerNorm(16), True),
    ("layer_norm_node_mode", lambda nn_: nn_.LayerNorm(16, mode="node"), True),
    ("graph_norm", lambda nn_: nn_.GraphNorm(16), True),
    ("instance_norm", lambda nn_: nn_.InstanceNorm(16, affine=True), True),
]


@pytest.mark.parametrize("make, batched", [case[1:] for case in GEOMETRIC], ids=[case[0] for case in GEOMETRIC])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_converted_graph_norms_output_and_gradients_resize_as_pygs_do(make, batched, dtype):
    """A converted PyG LayerNorm in graph mode (a segment norm whose weight spans the reduced
    channels) returned an output, and gave an input gradient, that ``resize_`` refused
    ("Trying to resize storage that is not resizable"): the engine made them with NumPy
    (its product with the weight) and the twin handed them over through
    ``torch.from_numpy``. PyG's originals give tensors that resize; so do the twins now,
    with the originals' values."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import norm as pyg_norms

    torch.manual_seed(0)
    original = make(pyg_norms).to(dtype)
    twin = nt.convert(copy.deepcopy(original))
    assert type(twin).__module__.startswith("normlab")
    x = torch.randn(12, 16, dtype=dtype)
    batch = torch.tensor([0] * 5 + [1] * 7)
    grad_y = torch.randn(12, 16, dtype=dtype)
    results = []
    for module in (original, twin):
        leaf = x.clone().requires_grad_()
        y = module(leaf, batch) if batched else module(leaf)
        y.backward(grad_y)
        tensors = [y.detach(), leaf.grad, *(p.grad for p in module.parameters())]
        for t in tensors:
            assert t.untyped_storage().resizable(), type(module)
        values = [t.clone() for t in tensors]
        for t, kept in zip(tensors, values):
            grown = t.resize_(t.numel() * 2)
            torch.testing.assert_close(grown[:kept.numel()], kept.reshape(-1) if kept.dim() else kept, rtol=0, atol=0)
        results.append(values)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    for mine, theirs in zip(*reversed(results)):
        torch.testing.assert_close(mine, theirs, **tolerance)


# (id, torch.nn original or fused block, input shape): past the sizes normlab recycles
# (8 MB; 128 KB for the fused blocks)
UNRECYCLED = [
    ("layer_norm", lambda: nn.LayerNorm(1024), (2100, 1024)),
    ("batch_norm_2d", lambda: nn.BatchNorm2d(64), (10, 64, 60, 60)),
    ("instance_norm_2d", lambda: nn.InstanceNorm2d(64, affine=True), (10, 64, 60, 60)),
    ("fused_add_rms_norm", lambda: nt.FusedAddRMSNorm(1024), (64, 1024)),
]


@pytest.mark.parametrize("make, shape", [case[1:] for case in UNRECYCLED], ids=[case[0] for case in UNRECYCLED])
def test_with_the_output_pool_off_large_outputs_and_gradients_resize_as_torch_nns_do(monkeypatch, make, shape):
    """With ``NORMLAB_OUTPUT_POOL=0`` nothing is recycled, and the README says the twins'
    outputs then come from torch; yet those past the pool's size still reached torch through
    ``torch.from_numpy`` (the size alone was checked), and ``resize_`` refused them. Now
    they resize as torch.nn's (or the torch operations a fused block replaces) do."""
    monkeypatch.setenv("NORMLAB_OUTPUT_POOL", "0")
    torch.manual_seed(0)
    module = make()
    twin = nt.convert(copy.deepcopy(module)) if isinstance(module, nn.Module) and type(module).__module__.startswith(
        "torch") else module
    x = torch.randn(shape).requires_grad_()
    if isinstance(twin, nt.FusedAddRMSNorm):
        residual = torch.randn(shape).requires_grad_()
        y, total = twin(x, residual)
        (y.sum() + total.sum()).backward()
        tensors = [y.detach(), total.detach(), x.grad, residual.grad]
        expected_total = x.detach() + residual.detach()
        torch.testing.assert_close(total.detach(), expected_total)
        torch.testing.assert_close(y.detach(), F.rms_norm(expected_total, (shape[-1],), twin.weight.detach(),
                                                          twin.eps), rtol=1e-5, atol=1e-5)
    else:
        y = twin(x)
        y.backward(torch.ones_like(y))
        leaf = x.detach().clone().requires_grad_()
        reference = module(leaf)
        reference.backward(torch.ones_like(reference))
        assert reference.untyped_storage().resizable() and leaf.grad.untyped_storage().resizable()
        torch.testing.assert_close(y.detach(), reference.detach(), rtol=1e-4, atol=1e-4)
        tensors = [y.detach(), x.grad]
    for t in tensors:
        assert t.untyped_storage().resizable(), type(twin)
        t.untyped_storage().resize_(0)
