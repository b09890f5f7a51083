"""``mask=`` and ``segment_ids=`` through ``torch.export``: the program holds torch's own
operations, so a process that never imports normlab loads and runs it, decomposes it to
core ATen (``run_decompositions()``, what ExecuTorch-style runtimes take) and runs
AOTInductor's compiled package of it. The oracle is torch on the counted elements alone:
``var_mean`` of each row's counted features, ``F.batch_norm`` in training on each segment."""

import re
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from normlab.torch.masked import normalize_masked  # noqa: E402

_WIDTH = 6


class _Padded(torch.nn.Module):
    """A padded batch's norms: a layer norm of each token's counted features, and a norm of
    each segment of the tokens (graphs in a batch, by their ids), the number of segments
    read off the ids (``Norm``) or given (``normalize_masked``)."""

    def __init__(self):
        super().__init__()
        self.layer = nt.LayerNorm(_WIDTH)
        self.segments = nt.Norm("[n] c", params="c", c=_WIDTH)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def forward(self, x, features, ids):
        flat = x.reshape(-1, _WIDTH)
        return (self.layer(x, mask=features), self.segments(flat, segment_ids=ids.reshape(-1)),
                normalize_masked(flat, "[n] c", mask=features.reshape(-1, _WIDTH), segment_ids=ids.reshape(-1),
                                 num_segments=4).y)


def _inputs(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, _WIDTH, generator=g) * 3 + 5
    features = torch.rand(batch, length, _WIDTH, generator=g) < 0.7
    features[..., :2] = True  # (two counted features a token, two counted tokens a segment and feature)
    ids = (torch.arange(batch * length) * 3 // (batch * length)).reshape(batch, length)  # three graphs
    return x, features, ids


def _oracle(model, x, features, ids):
    """torch on the counted elements: each row's (segment's) statistics from them alone."""
    eps = model.layer.eps
    mean = torch.stack([torch.var_mean(row[m], correction=0)[1] for row, m in
                        zip(x.reshape(-1, _WIDTH), features.reshape(-1, _WIDTH))]).reshape(*x.shape[:-1], 1)
    var = torch.stack([torch.var_mean(row[m], correction=0)[0] for row, m in
                       zip(x.reshape(-1, _WIDTH), features.reshape(-1, _WIDTH))]).reshape(*x.shape[:-1], 1)
    layer = (x - mean) * torch.rsqrt(var + eps) * model.layer.weight + model.layer.bias
    flat, flat_ids, flat_features = x.reshape(-1, _WIDTH), ids.reshape(-1), features.reshape(-1, _WIDTH)
    segments, masked = torch.empty_like(flat), torch.empty_like(flat)
    for s in range(int(flat_ids.max()) + 1):
        rows = flat_ids == s
        segments[rows] = torch.nn.functional.batch_norm(flat[rows], None, None, model.segments.weight,
                                                        model.segments.bias, training=True, eps=eps)
        for c in range(_WIDTH):
            counted = flat[rows, c][flat_features[rows, c]]
            var_c, mean_c = torch.var_mean(counted, correction=0)
            masked[rows, c] = (flat[rows, c] - mean_c) * torch.rsqrt(var_c + eps)
    return layer, segments, masked


def _export(model, strict=False):
    batch, length = torch.export.Dim("batch", min=2), torch.export.Dim("length", min=2)
    dims = {0: batch, 1: length}
    return torch.export.export(model, _inputs(3, 5, 0), dynamic_shapes=(dims, dims, dims), strict=strict)


_RUN_WITHOUT_NORMLAB = """
import sys
import torch
program, inputs, result = sys.argv[1:]
x, features, ids = torch.load(inputs)
if program.endswith("aoti.pt2"):
    outputs = torch._inductor.aoti_load_package(program)(x, features, ids)
    namespaces = None
else:
    exported = torch.export.load(program)
    outputs = exported.module()(x, features, ids)
    core = exported.run_decompositions()
    namespaces = sorted({node.target.namespace for node in core.graph.nodes
                         if isinstance(node.target, torch._ops.OpOverload)})
    for got, want in zip(core.module()(x, features, ids), outputs):
        torch.testing.assert_close(got, want)
assert not any(name.split(".")[0] == "normlab" for name in sys.modules), "normlab was imported"
torch.save({"outputs": outputs, "namespaces": namespaces}, result)
"""


def _run_without_normlab(program, inputs, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_RUN_WITHOUT_NORMLAB), str(program),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "result.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "result.pt")


@pytest.mark.slow
def test_an_exported_masked_and_segmented_model_runs_where_normlab_was_never_imported(tmp_path):
    """The program held normlab's op normalize_masked: torch.export.load in a process
    without import normlab.torch failed (an unknown operator), and so did every runtime
    without normlab. Run at another batch and length, with another number of segments."""
    model = _Padded()
    torch.export.save(_export(model), tmp_path / "padded.pt2")
    inputs = _inputs(4, 7, 1)
    result = _run_without_normlab(tmp_path / "padded.pt2", inputs, tmp_path)
    assert result["namespaces"] == ["aten"]
    for got, want in zip(result["outputs"], _oracle(model, *inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_a_strict_export_of_a_masked_and_segmented_model_holds_torchs_operations_alone():
    model = _Padded()
    exported = _export(model, strict=True)
    assert {node.target.namespace for node in exported.graph.nodes
            if isinstance(node.target, torch._ops.OpOverload)} == {"aten"}
    inputs = _inputs(4, 7, 1)
    for got, want in zip(exported.module()(*inputs), _oracle(model, *inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_aot_inductors_package_of_a_masked_and_segmented_model_runs_where_normlab_was_never_imported(tmp_path):
    model = _Padded()
    package = torch._inductor.aoti_compile_and_package(_export(model), package_path=str(tmp_path / "padded.aoti.pt2"))
    inputs = _inputs(2, 9, 2)
    for got, want in zip(_run_without_normlab(package, inputs, tmp_path)["outputs"], _oracle(model, *inputs)):
        torch.testing.assert_close(got, want)


class _Padded1d(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, tokens):
        return self.norm(x, mask=tokens[:, None, :])


class _Unmasked(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, tokens):
        return self.norm(x)


def _batch_norm_reference(x, counted):
    """torch.nn.BatchNorm1d in training on the counted tokens alone: its output there and its
    running statistics after the step."""
    reference = torch.nn.BatchNorm1d(x.shape[1]).double()
    tokens = x.transpose(1, 2)[counted]  # (counted tokens, channels)
    return reference(tokens), reference.running_mean, reference.running_var


@pytest.mark.parametrize("name", ["BatchNorm1d-mask", "Norm-mask", "Norm"])
def test_an_exported_training_step_with_running_statistics_saves_loads_and_updates_them_as_torch_nn(name, tmp_path):
    """The update ran under torch.no_grad(), which torch.export records as a
    wrap_with_set_grad_enabled region: torch.export.load refused the saved program
    ("SpecViolationError: Node.meta wrap_with_set_grad_enabled is missing val field")."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 2 + 1
    tokens = torch.arange(6) < torch.tensor([6, 4, 3])[:, None]
    norm = (nt.BatchNorm1d(4) if name.startswith("BatchNorm") else
            nt.Norm("[b] c [t]", params="c", c=4, track_running_stats=True)).double()
    model = (_Unmasked if name == "Norm" else _Padded1d)(norm)
    torch.export.save(torch.export.export(model, (x, tokens)), tmp_path / "step.pt2")
    loaded = torch.export.load(tmp_path / "step.pt2").module()
    counted = tokens if name != "Norm" else torch.ones_like(tokens)
    y = loaded(x, tokens)
    want_y, want_mean, want_var = _batch_norm_reference(x, counted)
    torch.testing.assert_close(y.transpose(1, 2)[counted], want_y)
    state = loaded.state_dict()
    torch.testing.assert_close(state["norm.running_mean"], want_mean)
    torch.testing.assert_close(state["norm.running_var"], want_var)


class _Masked(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, mask):
        return self.norm(x, mask=mask)


_MISFITS = {
    "LayerNorm": (lambda: nt.LayerNorm(6), (2, 5, 6), (2, 4, 1)),
    "RMSNorm": (lambda: nt.RMSNorm(6), (2, 5, 6), (3, 5, 1)),
    "GroupNorm": (lambda: nt.GroupNorm(2, 6), (2, 6, 5), (2, 6, 3)),
    "BatchNorm1d": (lambda: nt.BatchNorm1d(6), (4, 6, 5), (4, 1, 3)),
    "SyncBatchNorm": (lambda: nt.SyncBatchNorm(6), (4, 6, 5), (1, 4, 6, 5)),
}


@pytest.mark.parametrize("name", sorted(_MISFITS))
def test_a_strict_export_of_a_twin_given_a_misfitting_mask_says_what_eager_says(name):
    """A mask that does not broadcast to the input: eager and a non-strict torch.export raise
    normlab's PatternShapeError (the pattern, both shapes, the fix); a strict export, whose
    Dynamo ran torch.broadcast_shapes on fake tensors, raised torch's broadcasting error
    instead ("Attempting to broadcast a dimension of length 5"). The shapes are now compared
    size by size, and Dynamo hands on normlab's error (wrapped, as it wraps every exception
    raised in the traced code)."""
    build, x_shape, mask_shape = _MISFITS[name]
    x, mask = torch.randn(x_shape), torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError) as eager:
        build()(x, mask=mask)
    message = str(eager.value)
    assert f"mask of shape {mask_shape} does not broadcast" in message
    with pytest.raises(type(eager.value), match=re.escape(message)):
        torch.export.export(_Masked(build()), (x, mask), strict=False)
    with pytest.raises(Exception) as strict:  # noqa: B017 (Dynamo's own wrapper: torch._dynamo.exc.Unsupported)
        torch.export.export(_Masked(build()), (x, mask), strict=True)
    assert message in str(strict.value) and "Attempting to broadcast" not in str(strict.value)
