"""The drop-in battery: every torch feature on a converted model with batch, group,
instance, layer and RMS norm, against its torch.nn original (outputs, gradients, graphs,
ONNX Runtime). Each twin on its own: test_torch_twin_features.py."""

import copy
import io
import os

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.autograd import forward_ad  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.prerequisites import skip_without_dynamo_exporter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
TOLERANCE = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=1e-4, rtol=1e-4)}
NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm, nn.RMSNorm)


def original(dtype=torch.float64, rms=True) -> nn.Sequential:
    """A tiny CNN with each norm kind, random affine parameters and running statistics."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True),
              nn.Tanh(), nn.Flatten(), nn.LayerNorm(16)] + ([nn.RMSNorm(16)] if rms else []) + [nn.Linear(16, 2)]
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for module in model:
            if isinstance(module, NORMS):
                for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
                    tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model


def pair(dtype=torch.float64, rms=True):
    reference = original(dtype, rms)
    converted = nt.convert(copy.deepcopy(reference))
    assert sum(type(m).__module__ == "normlab.torch" for m in converted.modules()) == 4 + rms
    return reference, converted


def batch(size=3, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(size, 3, 4, 4, dtype=dtype)


def assert_close(actual, expected, dtype=torch.float64):
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_wgan_gp_gradient_penalty_gives_torch_nn_parameter_gradients():
    found = []
    for model in pair():
        real, fake = batch(seed=1), batch(seed=2)
        mix = torch.lerp(real, fake, torch.rand(3, 1, 1, 1, dtype=torch.float64)).requires_grad_()
        (grad,) = torch.autograd.grad(model(mix).sum(), mix, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).square().mean()
        (model(fake).mean() - model(real).mean() + 10 * penalty).backward()
        found.append([p.grad for p in model.parameters()])
    for actual, expected in zip(*found, strict=True):
        assert_close(actual, expected)


def test_torch_func_grad_vmap_jacrev_and_functional_call_give_torch_nn_results():
    x = batch()
    found = []
    for model in pair():
        model.eval()  # torch.nn's batch norm cannot update its buffers under a transform
        parameters = dict(model.named_parameters())
        grad = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(parameters)
        per_sample = torch.func.vmap(lambda row: model(row.unsqueeze(0)).squeeze(0))(x)
        found.append((grad, per_sample, torch.func.jacrev(model)(x[:2])))
    assert_close(found[0], found[1])


def test_forward_mode_ad_jvp_jacfwd_and_dual_tensors_give_torch_nn_tangents():
    x, tangent = batch(seed=1), batch(seed=2)
    found = []
    for model in pair():
        with forward_ad.dual_level():  # in training: batch statistics, running statistics updated
            dual = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
        model.eval()
        _, jvp = torch.func.jvp(model, (x,), (tangent,))
        found.append((dual, jvp, torch.func.jacfwd(model)(x[:2])))
    assert_close(found[0], found[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_keeps_each_norm_one_module_call_and_torch_nn_outputs(training):
    x = batch()
    reference, converted = pair()
    reference.train(training), converted.train(training)
    traced, expected = torch.fx.symbolic_trace(converted), torch.fx.symbolic_trace(reference)
    assert [n.op for n in traced.graph.nodes] == [n.op for n in expected.graph.nodes]
    assert_close(traced(x), reference(x))


def test_fx_fuse_of_the_converted_model_in_eval_gives_torch_nn_outputs():
    from torch.fx.experimental.optimization import fuse

    x = batch()
    reference, converted = pair()
    with pytest.warns(UserWarning, match="optimization.fuse leaves normlab's BatchNorm2d unfused"):
        fused = fuse(converted.eval())
    assert_close(fused(x), reference.eval()(x))


def test_fx_fuse_warns_for_each_batch_norm_twin_it_would_have_folded_and_folds_them_after_unconvert():
    """torch.fx.experimental.optimization.fuse matches torch.nn's exact classes: each batch
    norm twin after a convolution or linear layer says it stays unfused and names the fixes
    (one after a ReLU, which fuse leaves alone anyway, says nothing). Oracle: torch's fuse of
    the model never converted, whose modules unconvert then gives it."""
    import warnings

    from torch.fx.experimental.optimization import fuse

    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(1),
                             nn.Linear(64, 5), nn.BatchNorm1d(5)).eval()
    converted = nt.convert(copy.deepcopy(original))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fuse(converted)
    named = [str(w.message).split("normlab's ")[1].split(" ")[0] for w in caught
             if "torch.fx.experimental.optimization.fuse leaves" in str(w.message)]
    assert named == ["BatchNorm2d", "BatchNorm1d"]
    assert "fuse_modules" in str(caught[0].message) and "unconvert" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fuse(nt.unconvert(converted))
    assert [type(m) for m in fused.modules()][1:] == [type(m) for m in fuse(original).modules()][1:]


def test_jit_trace_saves_loads_and_gives_torch_nn_outputs():
    x = batch()
    reference, converted = pair()
    for mode in ("train", "eval"):
        getattr(reference, mode)(), getattr(converted, mode)()
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(copy.deepcopy(converted), x, check_trace=False), buffer)
        buffer.seek(0)
        assert_close(torch.jit.load(buffer)(x), copy.deepcopy(reference)(x))


def test_jit_script_gives_torch_nn_outputs_and_running_statistics():
    x = batch()
    reference, converted = pair()
    scripted = torch.jit.script(converted)
    assert_close(scripted(x), reference(x))
    assert_close(converted[1].running_var, reference[1].running_var)
    scripted.eval(), reference.eval()
    assert_close(scripted(x), reference(x))


def _compiled_graph(model, x):
    """The one graph torch.compile(dynamic=True, fullgraph=True) builds, and the model run on x."""
    graphs = []

    def recording_backend(graph_module, _example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend, dynamic=True, fullgraph=True)
    return graphs, compiled


def _tensor_ops(graph_module):
    return [(node.op, str(node.target)) for node in graph_module.graph.nodes
            if node.op in ("call_function", "call_method") and isinstance(node.meta.get("example_value"), torch.Tensor)]


@pytest.mark.slow
def test_torch_compile_dynamic_builds_one_graph_of_torch_nn_tensor_ops_across_batch_sizes():
    reference, converted = pair()
    graphs, compiled = _compiled_graph(converted, batch())
    for size in (2, 3, 5):
        x = batch(size)
        assert_close(compiled(x), reference(x))
    assert len(graphs) == 1
    expected_graphs, compiled_reference = _compiled_graph(reference, batch())
    compiled_reference(batch())
    # the same tensor operations as torch.nn's graph: Inductor fuses around the norms as it does for torch.nn
    assert _tensor_ops(graphs[0]) == _tensor_ops(expected_graphs[0])
    assert "normlab" not in graphs[0].code


def test_torch_export_with_a_dynamic_batch_gives_torch_nn_outputs_at_other_sizes():
    reference, converted = pair()
    reference.eval(), converted.eval()
    exported = torch.export.export(converted, (batch(3),), dynamic_shapes={"input": {0: torch.export.Dim("b")}})
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets)  # torch's standard ops, for every exporter
    for size in (2, 7):
        assert_close(exported.module()(batch(size)), reference(batch(size)))


def _onnx_run(model, x, dynamo: bool, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    skip_without_dynamo_exporter(dynamo)

    path = os.fspath(tmp_path / f"model{int(dynamo)}.onnx")
    torch.onnx.export(model, (x,), path, dynamo=dynamo, input_names=["x"])
    graph = onnx.load(path).graph
    (y,) = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy()})
    return sorted({node.op_type for node in graph.node}), torch.from_numpy(y)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
def test_onnx_export_emits_torch_nn_standard_ops_and_onnxruntime_gives_torch_nn_outputs(dynamo, tmp_path):
    # torch's TorchScript exporter has no aten::rms_norm: that model leaves RMSNorm out
    reference, converted = pair(torch.float32, rms=dynamo)
    reference.eval(), converted.eval()
    x = batch(dtype=torch.float32)
    expected_ops, expected = _onnx_run(reference, x, dynamo, tmp_path)
    ops, y = _onnx_run(converted, x, dynamo, tmp_path)
    assert ops == expected_ops and {"LayerNormalization", "InstanceNormalization"} <= set(ops)
    assert_close(y, expected, torch.float32)
    assert_close(y, reference(x), torch.float32)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_rms_norm_exports_with_the_torchscript_exporter_as_plain_onnx_ops(tmp_path):
    reference = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8)).eval()
    x = torch.randn(3, 8)
    ops, y = _onnx_run(nt.convert(copy.deepcopy(reference)), x, False, tmp_path)
    assert {"ReduceMean", "Sqrt"} <= set(ops)
    assert_close(y, reference(x), torch.float32)


def test_fuse_modules_folds_normlab_batch_norm_into_the_convolution():
    x = batch()
    reference, converted = pair()
    fused = torch.ao.quantization.fuse_modules(converted.eval(), [["0", "1"]])
    assert isinstance(fused[1], nn.Identity) and type(fused[0]) is nn.Conv2d
    assert_close(fused(x), reference.eval()(x))
    qat = torch.ao.quantization.fuse_modules_qat(pair()[1].train(), [["0", "1"]])
    assert type(qat[0]).__name__ == "ConvBn2d"
    assert_close(qat(x), reference.train()(x))


def test_a_load_state_dict_pre_hook_on_a_batch_norm_fused_for_qat_sees_it_in_loads_as_on_torch_nn():
    # register_load_state_dict_pre_hook keeps a weak reference to its module: QAT's ConvBn2d
    # keeps the batch norm torch's fuser was handed, and the twin it stood for is gone
    import gc

    seen = []
    fused = []
    for model in pair():
        model[1].register_load_state_dict_pre_hook(lambda module, state, prefix, *args: seen.append((prefix, module)))
        fused.append(torch.ao.quantization.fuse_modules_qat(model.train(), [["0", "1"]], inplace=True))
    gc.collect()
    for model in fused:
        copy.deepcopy(model).load_state_dict(model.state_dict())
        seen.clear()
        model.load_state_dict(model.state_dict())
        assert [(prefix, module is model[0][1]) for prefix, module in seen] == [("0.1.", True)]



def test_a_batch_norm_folded_in_evaluation_keeps_its_load_state_dict_pre_hook_as_on_torch_nn():
    # fuse_modules in evaluation folds the batch norm into the convolution and keeps no
    # torch.nn batch norm: a caller still holding the (converted) batch norm loads into it,
    # its hook seeing it, as torch.nn's does, never "the hook of a dead Module"
    import gc

    for model in pair():
        norm, seen = model[1], []
        norm.register_load_state_dict_pre_hook(lambda module, state, prefix, *args: seen.append(module))
        state = copy.deepcopy(norm.state_dict())
        torch.ao.quantization.fuse_modules(model.eval(), [["0", "1"]], inplace=True)
        gc.collect()
        copy.deepcopy(norm)
        norm.load_state_dict(state)
        assert len(seen) == 1 and seen[0] is norm

def test_fuse_conv_bn_eval_gives_torch_nn_outputs():
    x = batch()
    reference, converted = pair()
    reference.eval(), converted.eval()
    fused = nn.utils.fusion.fuse_conv_bn_eval(converted[0], converted[1])
    assert_close(fused(x), reference[1](reference[0](x)))


def test_a_wrong_input_shape_raises_torch_nn_exception_type():
    """torch.nn's exception, its type and its words; the twin may go on to name the shapes
    and the fix (5e95a1b)."""
    reference, converted = pair()
    bad = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError) as expected:
        reference[1:](bad)
    with pytest.raises(RuntimeError) as raised:
        converted[1:](bad)
    assert type(raised.value) is type(expected.value)
    assert str(raised.value).startswith(str(expected.value)), (str(raised.value), str(expected.value))


class _ResidualBlock(nn.Module):
    """A ResNet block as torchvision and transformers write it: conv, norm, ReLU(inplace=True),
    conv, norm, then the shortcut added in place into the norm's output."""

    def __init__(self, norm):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.norm1, self.norm2, self.relu = norm(), norm(), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x)))))
        out += x
        return self.relu(out)


@pytest.mark.parametrize("norm", [lambda: nn.BatchNorm2d(4), lambda: nn.GroupNorm(2, 4)], ids=["batch", "group"])
def test_channels_last_residual_block_trains_with_in_place_relu_and_shortcut_as_torch_nn(norm):
    # the norms keep channels_last; their output must be no view made inside an autograd
    # Function, which autograd refuses to let ReLU(inplace=True) or `out += x` modify
    torch.manual_seed(0)
    reference = _ResidualBlock(norm).double().to(memory_format=torch.channels_last)
    converted = nt.convert(copy.deepcopy(reference))
    x = batch(dtype=torch.float64).repeat(1, 2, 1, 1)[:, :4].contiguous(memory_format=torch.channels_last)
    found = []
    for model in (reference, converted):
        source = x.clone().requires_grad_()
        y = model(source)
        y.square().sum().backward()
        found.append((y, source.grad, [p.grad for p in model.parameters()], list(model.buffers())))
    assert found[1][0].is_contiguous(memory_format=torch.channels_last)
    assert_close(found[1], found[0])
