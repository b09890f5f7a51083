"""ONNX export of the twins and the fused blocks against the export of the code they replace:
the ONNX graph's norm ops, and ONNX Runtime's outputs at a batch and length other than the
example's. Oracles: torch.nn's modules and diffusers' AdaLayerNormZero, exported by torch's
own exporters, and ONNX Runtime."""

import copy
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.composites import AddNorm  # noqa: E402
from tests.prerequisites import skip_without_dynamo_exporter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


class _Fused(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, other):
        return self.block(x, other)


class _Modulated(nn.Module):
    """A norm called as DiT calls AdaLayerNormZero: ``norm(x, emb=emb)``."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, emb):
        return self.norm(x, emb=emb)


def _layer_norm_pairs(name):
    """(the code a layer-norm block replaces, the block on its state, second input's shape)."""
    torch.manual_seed(0)
    if name == "FusedAddLayerNorm":
        original = nn.LayerNorm(8)
        with torch.no_grad():
            original.weight.uniform_(0.5, 1.5)
            original.bias.normal_()
        block = nt.FusedAddLayerNorm(8)
        block.load_state_dict(original.state_dict())
        return AddNorm(original), _Fused(block), lambda batch, length: (batch, length, 8)
    diffusers = pytest.importorskip("diffusers.models.normalization")
    original = diffusers.AdaLayerNormZero(8)
    block = nt.AdaLayerNorm(8)
    block.load_state_dict(original.state_dict())
    return _Modulated(original), _Modulated(block), lambda batch, length: (batch, 8)


def _export(model, inputs, path):
    """The TorchScript exporter with a dynamic batch and length; the graph's op counts."""
    torch.onnx.export(model, inputs, path, dynamo=False, opset_version=17, input_names=["x", "other"],
                      dynamic_axes={"x": {0: "batch", 1: "length"}, "other": {0: "batch", 1: "length"}})
    return Counter(node.op_type for node in onnx.load(path).graph.node)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("name", ["FusedAddLayerNorm", "AdaLayerNorm"])
def test_a_layer_norm_block_exports_one_layer_normalization_as_the_code_it_replaces(name, dtype, tmp_path):
    """On half input the TorchScript exporter refused the blocks ("Failed to export a node
    ... because it is not constant": torch's layer norm was given the input's traced sizes),
    and on float32 it wrote their statistics as ReduceMean, Sub, Sqrt, ... where the code
    they replace exports one LayerNormalization."""
    original, block = (m.to(dtype).eval() for m in _layer_norm_pairs(name)[:2])
    other_shape = _layer_norm_pairs(name)[2]
    gen = torch.Generator().manual_seed(1)

    def inputs(batch, length):
        return (torch.randn(batch, length, 8, generator=gen).to(dtype),
                torch.randn(other_shape(batch, length), generator=gen).to(dtype))

    example, other = inputs(2, 3), inputs(5, 7)
    expected_ops = _export(original, example, str(tmp_path / "original.onnx"))
    ops = _export(block, example, str(tmp_path / "block.onnx"))
    assert ops["LayerNormalization"] == expected_ops["LayerNormalization"] == 1
    assert "ReduceMean" not in ops
    feeds = {"x": other[0].numpy(), "other": other[1].numpy()}
    got = onnxruntime.InferenceSession(str(tmp_path / "block.onnx")).run(None, feeds)
    want = onnxruntime.InferenceSession(str(tmp_path / "original.onnx")).run(None, feeds)
    for have, expected in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(have), torch.from_numpy(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_a_converted_olmo_layer_norm_exports_as_olmos_own_with_a_dynamic_batch_and_length(dtype, tmp_path):
    """The TorchScript exporter refused convert()'s twin of OLMo's layer norm in every dtype
    ("Failed to export a node ... because it is not constant"): its recipe gave torch's
    layer norm the input's traced last size, where OLMo gives its normalized_shape."""
    olmo = pytest.importorskip("transformers.models.olmo.modeling_olmo")
    original = olmo.OlmoLayerNorm(8).to(dtype)
    twin = nt.convert(copy.deepcopy(original))
    assert type(twin).__name__ == "RecipeLayerNorm"
    gen = torch.Generator().manual_seed(2)
    paths = [str(tmp_path / f"{name}.onnx") for name in ("original", "twin")]
    for model, path in zip((original, twin), paths):
        torch.onnx.export(model, (torch.randn(2, 3, 8, generator=gen).to(dtype),), path, dynamo=False,
                          opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "length"}})
    ops = [Counter(node.op_type for node in onnx.load(path).graph.node) for path in paths]
    assert ops[1] == ops[0] and ops[0]["LayerNormalization"] == 1
    x = torch.randn(5, 7, 8, generator=gen).to(dtype)
    (got,), (want,) = (onnxruntime.InferenceSession(path).run(None, {"x": x.numpy()}) for path in paths[::-1])
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want))
    torch.testing.assert_close(torch.from_numpy(got), original(x))


class _Segmented(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nt.Norm("[n] c", params="c", c=4)

    def forward(self, x, ids):
        return self.norm(x, segment_ids=ids, num_segments=3)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_exporting_segment_ids_raises_an_error_that_names_the_module_and_what_exports(dynamo, tmp_path):
    """The dynamo exporter, whose non-strict capture normlab refused, retried with Dynamo,
    which reads torch.onnx.is_in_onnx_export() as False: the graph then held normlab's op,
    and the user read "No ONNX function found for normlab.normalize_masked ... submit a PR
    to PyTorch". The message now names the module and what exports instead, for either
    exporter."""
    skip_without_dynamo_exporter(dynamo)
    inputs = (torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(Exception) as raised:
        torch.onnx.export(_Segmented(), inputs, str(tmp_path / "segments.onnx"), dynamo=dynamo, verbose=False)
    assert "Norm('[n] c'): segment_ids= does not export to ONNX" in str(raised.value)
    assert "mask= does" in str(raised.value)


def test_a_model_exported_inside_use_path_kernel_runs_in_onnxruntime_with_torch_nn_outputs(tmp_path):
    """Inside use_path("kernel") the dynamo exporter recorded normlab's custom op, which ONNX
    has not: "No ONNX function found for normlab.normalize ... submit a PR to PyTorch"
    (the TorchScript exporter recorded torch's ops). Exported, the forced kernels now take
    torch's ops too."""
    skip_without_dynamo_exporter(True)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.GroupNorm(2, 4), nn.Flatten(2), nn.LayerNorm(9)).eval()
    twin = nt.convert(copy.deepcopy(reference))
    path = str(tmp_path / "forced.onnx")
    with nt.use_path("kernel"):
        torch.onnx.export(twin, (torch.randn(2, 4, 3, 3),), path, dynamo=True, verbose=False, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    assert {node.domain for node in onnx.load(path).graph.node} <= {""}
    x = torch.randn(5, 4, 3, 3)
    (got,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), reference(x))


def test_a_qwen3_next_gated_norm_exported_at_opset_23_in_float16_loads_in_onnxruntime(tmp_path):
    """GatedRMSNorm viewed its one group as (..., 1, hidden): torch's exporter then fused the
    float32 statistics and the float16 weight into one RMSNormalization of mixed types,
    which ONNX Runtime refused to load ("Type parameter (T) of Optype (Mul) bound to
    different types"), where Qwen3NextRMSNormGated's own export loads. One group is now
    the row itself, and the export is Qwen's graph."""
    skip_without_dynamo_exporter(True)
    qwen = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    torch.manual_seed(0)
    original = qwen.Qwen3NextRMSNormGated(8, eps=1e-6)
    with torch.no_grad():
        original.weight.uniform_(0.5, 1.5)
    twin = nt.convert(copy.deepcopy(original)).half()
    assert type(twin).__name__ == "GatedRMSNorm" and twin.casting == "qwen3_next"
    batch, length = torch.export.Dim("batch", min=2), torch.export.Dim("length", min=2)
    path = str(tmp_path / "gated.onnx")
    torch.onnx.export(twin, (torch.randn(2, 3, 8).half(), torch.randn(2, 3, 8).half()), path, dynamo=True,
                      opset_version=23, verbose=False, input_names=["x", "gate"],
                      dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}))
    x, gate = torch.randn(5, 7, 8).half(), torch.randn(5, 7, 8).half()
    (got,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy(), "gate": gate.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), original.half()(x, gate), rtol=1e-2, atol=2e-3)


class _FusedGroupNorm(nn.Module):
    """A residual add and a group norm of each token's channels, per-channel parameters:
    ``nn.GroupNorm(2, 8)`` on the tokens of ``x + residual``, as one fused block."""

    def __init__(self, norm):
        super().__init__()
        from normlab.torch.fused import Block

        self.norm, self.block = norm, Block("b t (g [c])", "(g c)", sizes=(("g", 2), ("c", 4)))

    def forward(self, x, residual):
        from normlab.torch.fused import fused_normalize

        return fused_normalize(x, self.block, residual=residual, weight=self.norm.weight, bias=self.norm.bias)[0]


def _tokens_group_norm(norm, x, residual):
    return norm((x + residual).reshape(-1, 8)).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_a_fused_group_norm_with_per_channel_parameters_runs_and_exports_as_nn_group_norm(dtype, tmp_path):
    """Torch's layer norm took the parameters of any block normalizing trailing axes, also
    where they span a kept axis too: float16 and bfloat16 input raised "shape '[4]' is
    invalid for input of size 8", and so did float32 in ONNX export."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    block = _FusedGroupNorm(norm).to(dtype)
    x, residual = torch.randn(2, 3, 8).to(dtype), torch.randn(2, 3, 8).to(dtype)
    with torch.no_grad():
        want = _tokens_group_norm(norm.to(dtype), x, residual)
        torch.testing.assert_close(block(x, residual), want, rtol=1e-3, atol=2e-3)
    path = str(tmp_path / "group.onnx")
    torch.onnx.export(block, (x, residual), path, dynamo=False, opset_version=17, input_names=["x", "residual"])
    (got,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy(), "residual": residual.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_norm_in_evaluation_with_running_statistics_exports_with_segment_ids(dynamo, tmp_path):
    """In evaluation the running statistics normalize and segment_ids change nothing: such a
    model exported before the refusal of segment_ids, and still exports, giving the eager
    output (the refusal is for the segments' own statistics, in training)."""
    skip_without_dynamo_exporter(dynamo)
    model = _Segmented()
    model.norm = nt.Norm("[n] c", params="c", c=4, track_running_stats=True)
    model(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    model.eval()
    inputs = (torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    path = str(tmp_path / "segments.onnx")
    torch.onnx.export(model, inputs, path, dynamo=dynamo, verbose=False, input_names=["x", "ids"])
    session = onnxruntime.InferenceSession(path)
    feeds = {"x": inputs[0].numpy(), "ids": inputs[1].numpy()}  # (one exporter keeps the unused ids)
    (got,) = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    torch.testing.assert_close(torch.from_numpy(got), model(*inputs))


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_a_converted_mamba2_gated_norm_exports_at_every_opset_its_original_exports_at(opset, tmp_path):
    """GatedRMSNorm split its rows into groups with unflatten, which the TorchScript exporter
    takes from opset 13 on: exporting a converted Mamba2 model at opset 9 or 11 raised "Exporting
    the operator 'aten::unflatten' ... is not supported", where MambaRMSNormGated's own view
    exports. The groups are now a reshape, as Mamba2 views them."""
    pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    from tests.hf_classes import mamba_gated_norm

    torch.manual_seed(0)
    original, _ = mamba_gated_norm(8, group_size=4)  # (whole rows on transformers releases before group_size)
    with torch.no_grad():
        original.weight.uniform_(0.5, 1.5)
    twin = nt.convert(copy.deepcopy(original))
    assert type(twin).__name__ == "GatedRMSNorm"
    path = str(tmp_path / "gated.onnx")
    axes = {0: "batch", 1: "length"}
    torch.onnx.export(twin, (torch.randn(2, 3, 8), torch.randn(2, 3, 8)), path, dynamo=False, opset_version=opset,
                      input_names=["x", "gate"], dynamic_axes={"x": axes, "gate": axes})
    x, gate = torch.randn(5, 7, 8), torch.randn(5, 7, 8)
    (got,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy(), "gate": gate.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), original(x, gate))


class _MaskedLayerNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, mask):
        return self.norm(x, mask=mask)


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_a_masked_layer_norm_exported_at_any_opset_runs_in_onnxruntime_on_the_counted_features(opset, tmp_path):
    """At opsets 9 and 11 the TorchScript exporter records clamp as Clip, which ONNX Runtime
    lacks for the float64 counts of mask=: the exported model failed to load ("Could not find
    an implementation for Clip(11) node"). Oracle: torch's var_mean of each row's counted
    features."""
    torch.manual_seed(0)
    model = _MaskedLayerNorm(nt.LayerNorm(6))
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    path = str(tmp_path / "masked.onnx")
    axes = {0: "batch", 1: "length"}
    torch.onnx.export(model, (torch.randn(2, 3, 6), torch.rand(2, 3, 6) < 0.7), path, dynamo=False,
                      opset_version=opset, input_names=["x", "mask"], dynamic_axes={"x": axes, "mask": axes})
    x, mask = torch.randn(4, 5, 6) * 3 + 5, torch.rand(4, 5, 6) < 0.7
    mask[..., :2] = True
    (got,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy(), "mask": mask.numpy()})
    var, mean = (torch.stack(s).reshape(4, 5, 1) for s in zip(*(torch.var_mean(row[m], correction=0)
                                                                  for row, m in zip(x.reshape(-1, 6),
                                                                                    mask.reshape(-1, 6)))))
    want = (x - mean) * torch.rsqrt(var + model.norm.eps) * model.norm.weight + model.norm.bias
    torch.testing.assert_close(torch.from_numpy(got), want.detach())


@pytest.mark.parametrize("how", ["onnx opset 9", "onnx opset 17", "jit.trace"])
def test_an_exported_masked_layer_norm_gives_exactly_bias_for_a_row_of_padding_holding_nan_or_inf(how, tmp_path):
    """A row with nothing counted gives exactly bias (README, masks), whatever its padding
    holds; the traced definition that ONNX export and torch.jit.trace record computed
    (x − 0)·0 there, NaN for a NaN or Inf left in the padding. Oracles: the bias, and torch's
    var_mean of each other row's counted features."""
    torch.manual_seed(0)
    model = _MaskedLayerNorm(nt.LayerNorm(6))
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    example = (torch.randn(2, 3, 6), torch.rand(2, 3, 6) < 0.7)
    x, mask = torch.randn(4, 5, 6), torch.ones(4, 5, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = False
    mask[0, 4, :3] = False
    x[1, 2, 0], x[1, 2, 4], x[3, 0, 1] = float("nan"), float("inf"), float("-inf")
    if how == "jit.trace":
        got = torch.jit.trace(model, example, check_trace=False)(x, mask)
    else:
        path = str(tmp_path / "masked.onnx")
        axes = {0: "batch", 1: "length"}
        torch.onnx.export(model, example, path, dynamo=False, opset_version=int(how.split()[-1]),
                          input_names=["x", "mask"], dynamic_axes={"x": axes, "mask": axes})
        (got,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy(), "mask": mask.numpy()})
        got = torch.from_numpy(got)
    bias = model.norm.bias.detach()
    for row in (got[1, 2], got[3, 0]):
        assert torch.equal(row, bias)
    live = mask.any(-1)
    var, mean = (torch.stack(s) for s in zip(*(torch.var_mean(row[m], correction=0)
                                               for row, m in zip(x[live], mask[live]))))
    want = (x[live] - mean[:, None]) * torch.rsqrt(var[:, None] + model.norm.eps) * model.norm.weight + bias
    torch.testing.assert_close(got[live], want.detach())


class _SegmentNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, mask, ids):
        return self.norm(x, mask=mask, segment_ids=ids, num_segments=3)


def test_a_traced_segment_norm_gives_exactly_bias_for_a_segment_of_padding_holding_nan_or_inf():
    """The same with segment_ids= under torch.jit.trace: a segment with nothing counted gave
    NaN for a NaN or Inf in its padding. Oracles: the bias, and torch's var_mean of each other
    segment's counted elements."""
    torch.manual_seed(0)
    model = _SegmentNorm(nt.Norm("b [t] d", "d", d=4))
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    x, mask = torch.randn(2, 6, 4), torch.ones(2, 6, 4, dtype=torch.bool)
    mask[0, 2:4] = False  # segment 1 of sample 0: all padding
    mask[1, 0, 1] = False
    x[0, 2, 0], x[0, 3, 3], x[1, 0, 1] = float("nan"), float("-inf"), float("inf")
    traced = torch.jit.trace(model, (torch.randn(2, 6, 4), torch.rand(2, 6, 4) < 0.7, ids), check_trace=False)
    got = traced(x, mask, ids)
    bias = model.norm.bias.detach()
    assert torch.equal(got[0, 2:4], bias.expand(2, 4))
    for b in range(2):
        for s in range(3):
            rows, m = x[b, 2 * s:2 * s + 2], mask[b, 2 * s:2 * s + 2]
            if not m.any():
                continue
            var, mean = (torch.stack(t) for t in zip(*(torch.var_mean(rows[:, c][m[:, c]], correction=0)
                                                       for c in range(4))))
            want = (rows - mean) * torch.rsqrt(var + model.norm.eps) * model.norm.weight + bias
            torch.testing.assert_close(got[b, 2 * s:2 * s + 2][m], want.detach()[m])
