"""The custom ops: gradcheck, opcheck, torch.compile(fullgraph=True), torch.export, convert."""

import copy

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from normlab.torch import ops  # noqa: E402
from normlab.torch import spec as spec_module  # noqa: E402

GRADCHECK_CASES = [
    ("batch_norm", "[b] c [h w]", "c", {}, (3, 4, 2, 2), False),
    ("layer_norm", "... [d]", "d", {}, (2, 3, 5), False),
    ("group_norm", "b (g [c]) [h w]", "(g c)", {"g": 2}, (2, 6, 2, 2), False),
    ("rms_norm", "b [d]", "d", {}, (3, 5), True),
    ("instance_norm", "b c [l]", "c", {}, (2, 3, 4), False),
]


def _parameters(plan_shape, rms):
    weight = torch.randn(plan_shape, dtype=torch.float64, requires_grad=True)
    bias = None if rms else torch.randn(plan_shape, dtype=torch.float64, requires_grad=True)
    return weight, bias


GRADCHECK_LAYOUTS = [(case, False) for case in GRADCHECK_CASES] + [
    (case, True) for case in GRADCHECK_CASES if len(case[4]) == 4  # channels_last needs 4-D
]


@pytest.mark.parametrize("pattern, params, sizes, shape, rms, channels_last",
                         [case[1:] + (channels_last,) for case, channels_last in GRADCHECK_LAYOUTS],
                         ids=[case[0] + ("-channels_last" if cl else "") for case, cl in GRADCHECK_LAYOUTS])
@pytest.mark.parametrize("route", ["registered_op", "eager_function"])
def test_custom_op_passes_gradcheck_in_float64(pattern, params, sizes, shape, rms, channels_last, route):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    param_shape = spec_module.Spec.build(pattern, params, rms, **sizes).plan(shape).param_shape
    weight, bias = _parameters(param_shape, rms)
    inputs = (x, weight) if rms else (x, weight, bias)

    spec = spec_module.Spec.build(pattern, params, rms, **sizes)

    def function(x, weight, bias=None):
        if route == "registered_op":
            return torch.ops.normlab.normalize(x, weight, bias, pattern, params, spec.sizes, 1e-3, rms)[0]
        assert ops._is_eager(x, weight, bias)
        return nt.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=1e-3, rms=rms, **sizes)

    assert torch.autograd.gradcheck(function, inputs)


def test_opcheck_accepts_the_schema_fake_kernel_and_autograd_registration():
    x = torch.randn(3, 6, 2, 2, dtype=torch.float64).to(memory_format=torch.channels_last)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    result = torch.library.opcheck(torch.ops.normlab.normalize.default,
                                   (x.requires_grad_(), weight, bias, "b (g [c]) [h w]", "(g c)", "g=2", 1e-5, False))
    assert set(result.values()) == {"SUCCESS"}


# (the engine hands the gradients back in its own order where the reduced axes are not the
# trailing ones, x is permuted or params are in another order; Inductor asserts the fake kernel's
# strides: empty_like(x)'s, the parameters' contiguous)
KERNEL_BACKWARD_LAYOUTS = [("b [c] h w", (2, 6, 3, 4), None, None), ("b t [d]", (2, 3, 4), "transposed", None),
                           ("b c [h w]", (2, 6, 3, 4), "channels_last", None), ("b [c] h w", (2, 6, 3, 4), None, "w h")]


@pytest.mark.parametrize("pattern, shape, layout, params", KERNEL_BACKWARD_LAYOUTS,
                         ids=["middle_bracket", "transposed", "channels_last", "params_reordered"])
def test_inductor_compiled_kernel_path_gives_eager_gradients_whatever_the_layout(pattern, shape, layout, params):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(4, 3, requires_grad=True) if params else None
    grad_y = torch.randn(shape)

    def function(x, weight):
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return nt.normalize(x, pattern, weight=weight, params=params)

    inputs = (x, weight) if params else (x,)
    with nt.use_path("kernel"):
        expected = torch.autograd.grad(function(x, weight), inputs, grad_y)
        torch._dynamo.reset()
        grads = torch.autograd.grad(torch.compile(function, fullgraph=True)(x, weight), inputs, grad_y)
    torch.testing.assert_close(grads, expected)


@pytest.mark.parametrize("pattern, memory_format", [("b c [h w]", torch.contiguous_format),
                                                    ("[b] c [h w]", torch.channels_last)])
def test_the_compiled_backward_op_allocates_no_tensor_to_compare_layouts_where_the_gradient_has_x_s(pattern,
                                                                                                   memory_format):
    """The op behind torch.compile's backward made a torch.empty_like(x) on every call only
    to read its strides, which a contiguous or channels_last x already has."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorded(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).contiguous(memory_format=memory_format)
    grad_y = torch.randn_like(x)
    _, mean, rstd = ops._normalize_impl(x, None, None, pattern, None, "", 1e-5, False)
    with Recorded() as recorded:
        grad_x, _, _ = ops._normalize_backward_laid_out(grad_y, x, None, mean, rstd, pattern, None, "", 1e-5,
                                                        False, False)
    assert torch.ops.aten.empty_like.default not in recorded.ops
    assert grad_x.stride() == x.stride()
    expected = ops._normalize_backward_impl(grad_y, x, None, mean, rstd, pattern, None, "", 1e-5, False, False)[0]
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=0)


def test_opcheck_accepts_the_backward_op_where_the_engine_orders_the_gradient_otherwise():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    _, mean, rstd = ops._normalize_impl(x, None, None, "b [c] h w", None, "", 1e-5, False)
    result = torch.library.opcheck(torch.ops.normlab.normalize_backward.default,
                                   (torch.randn_like(x), x, None, mean, rstd, "b [c] h w", None, "", 1e-5, False, False))
    assert set(result.values()) == {"SUCCESS"}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.LayerNorm(8 * 3 * 3), torch.nn.RMSNorm(8 * 3 * 3),
    )


def test_torch_compile_fullgraph_traces_the_converted_model_without_graph_breaks():
    reference = _model()
    model = nt.convert(copy.deepcopy(reference))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 5, 5)
    y = compiled(x)
    y.square().sum().backward()
    expected = reference(x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


def test_torch_export_records_torch_standard_ops_and_the_custom_op_when_the_kernel_is_forced():
    model = nt.convert(_model())
    x = torch.randn(4, 3, 5, 5)
    exported = torch.export.export(model, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.normlab.normalize.default not in targets  # torch's ops, for exporters and Inductor
    torch.testing.assert_close(exported.module()(x), model(x))
    with nt.use_path("kernel"):
        exported = torch.export.export(model, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.normlab.normalize.default) == 4
    torch.testing.assert_close(exported.module()(x), model(x))


def test_convert_keeps_parameters_buffers_and_outputs():
    reference = _model().double()
    reference(torch.randn(4, 3, 5, 5, dtype=torch.float64))  # non-trivial running statistics
    model = copy.deepcopy(reference)
    weights = [p for p in model.parameters()]
    converted = nt.convert(model)
    assert converted is model
    assert [type(m).__module__ for m in (model[1], model[2], model[5], model[6])] == ["normlab.torch"] * 4
    assert all(a is b for a, b in zip(weights, converted.parameters()))  # the same objects
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    for name, value in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[name], value), name
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(reference, mode)()
        getattr(converted, mode)()
        torch.testing.assert_close(converted(x), reference(x))


def test_convert_replaces_a_lone_norm_layer_and_leaves_other_modules_alone():
    layer = torch.nn.InstanceNorm2d(3, affine=True)
    assert type(nt.convert(layer)) is nt.InstanceNorm2d
    linear = torch.nn.Linear(2, 2)
    assert nt.convert(linear) is linear


def test_convert_sync_batchnorm_builds_normlab_sync_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    converted = nt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is nt.SyncBatchNorm
    assert converted[1].weight is model[1].weight


@pytest.mark.parametrize("process_group", [None, "a process group"])
def test_convert_sync_batchnorm_rescopes_sync_batch_norms_to_its_process_group_as_torchs_does(process_group):
    """The oracle: torch's conversion of its own SyncBatchNorm, which stores the group it is
    given (None: the whole world) in a new layer sharing the parameters and buffers."""
    def model(sync_class):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), sync_class(4, process_group="the previous group"))

    expected = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model(torch.nn.SyncBatchNorm), process_group)
    original = model(nt.SyncBatchNorm)
    layer = original[1]
    converted = nt.SyncBatchNorm.convert_sync_batchnorm(original, process_group)
    assert type(converted[1]) is nt.SyncBatchNorm
    assert converted[1].process_group == expected[1].process_group == process_group
    assert converted[1].weight is layer.weight and converted[1].running_mean is layer.running_mean
    assert converted[1].state_dict().keys() == expected[1].state_dict().keys()


@pytest.mark.parametrize("path", ["kernel", "composite"])
def test_torch_compile_fullgraph_traces_generic_norms_with_dynamic_shapes_in_training_and_evaluation(path):
    model = torch.nn.Sequential(
        nt.Norm("b (g [c]) [h w]", params="(g c)", g=2, c=2),
        nt.Norm("[b] c [h w]", params="c", c=4, track_running_stats=True),
    )
    with nt.use_path(path):
        for mode in ("train", "eval"):
            getattr(model, mode)()
            compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
            for batch in (2, 5):  # one graph for changing batch sizes
                x = torch.randn(batch, 4, 3, 3)
                expected = model(x)
                torch.testing.assert_close(compiled(x), expected)


BATCH_NORM_TWINS = [("BatchNorm1d", (5, 4)), ("BatchNorm1d", (5, 4, 3)), ("BatchNorm2d", (2, 4, 3, 3)),
                    ("BatchNorm2d-channels_last", (2, 4, 3, 3)), ("BatchNorm3d", (2, 4, 2, 2, 2))]


@pytest.mark.parametrize("name, shape", BATCH_NORM_TWINS, ids=[f"{n}-{len(s)}d" for n, s in BATCH_NORM_TWINS])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_batch_norm_in_evaluation_compiles_into_one_graph_as_torch_nn_does(name, shape, grad):
    cls = name.split("-")[0]
    torch.manual_seed(0)
    reference = getattr(torch.nn, cls)(4)
    with torch.no_grad():
        reference.running_mean.uniform_(-1, 1), reference.running_var.uniform_(0.5, 2)
    twin = nt.convert(copy.deepcopy(reference)).eval()
    reference.eval()
    x = torch.randn(shape)
    if name.endswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(grad)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")  # a graph break raises
    y = compiled(x)
    torch.testing.assert_close(y, reference(x))
    if grad:
        (grad_x,) = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(grad_x, torch.autograd.grad(reference(x).square().sum(), x)[0])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_strict_export_with_a_dynamic_batch_takes_every_size_past_the_eager_shortcuts_of_batch_norm(mode):
    # eager, a training step repeats the last one at its shape, and evaluation below 32 MiB
    # takes F.batch_norm: compared under Dynamo, those sizes were guards on the batch
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(4)
    twin = nt.convert(copy.deepcopy(reference))
    step = torch.randn(4, 4, 256, 256)  # a training step at batch 4 (1 MiB a sample)
    with torch.no_grad():
        for model in (reference, twin):
            model(step)
            getattr(model, mode)()
    batch = torch.export.Dim("batch", max=64)
    programs = [torch.export.export(model, (torch.randn(2, 4, 256, 256),), dynamic_shapes=({0: batch},), strict=True)
                for model in (reference, twin)]
    for size in (4, 40):
        x = torch.randn(size, 4, 256, 256)
        torch.testing.assert_close(programs[1].module()(x), programs[0].module()(x))


@pytest.mark.slow
def test_compiled_batch_norm_in_evaluation_keeps_the_contract_at_a_running_mean_of_a_million_stds():
    # Inductor decomposes the op into (x - mean)·rstd·w + b, which does not cancel as torch's
    # folded eager kernel does; the oracle is the definition in float64
    torch.manual_seed(0)
    twin = nt.BatchNorm2d(4).eval()
    with torch.no_grad():
        twin.running_mean.fill_(1e6), twin.running_var.fill_(1.0)
        twin.weight.uniform_(0.5, 2), twin.bias.uniform_(-1, 1)
    x = 1e6 + torch.randn(2, 4, 8, 8)
    shape = (4, 1, 1)
    want = ((x.double() - 1e6) / (1.0 + twin.eps) ** 0.5 * twin.weight.double().reshape(shape)
            + twin.bias.double().reshape(shape))
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(twin, fullgraph=True)(x)
    assert (y.double() - want).abs().max().item() < 1e-4


def _dynamo_graph_ops(model, x):
    graphs = []

    def recording_backend(graph_module, _example_inputs):
        graphs.append([(node.op, str(node.target)) for node in graph_module.graph.nodes  # (tensor operations)
                       if node.op in ("call_function", "call_method")
                       and isinstance(node.meta.get("example_value"), torch.Tensor)])
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    return graphs


def test_a_converted_cnn_in_evaluation_compiles_to_torch_nn_graph_op_for_op():
    # float32 batch norm in evaluation, where the eager twin checks its running means first
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.GroupNorm(2, 4), torch.nn.Flatten(), torch.nn.LayerNorm(36)).eval()
    converted = nt.convert(copy.deepcopy(reference)).eval()
    x = torch.randn(2, 3, 5, 5)
    assert _dynamo_graph_ops(converted, x) == _dynamo_graph_ops(reference, x)


def _masked_batch_norm_by_hand(x, mask, weight, bias, eps=1e-5):
    """Batch norm over the elements where ``mask`` holds, in torch operations (autograd's oracle)."""
    counted = mask.expand_as(x).to(x.dtype)
    count = counted.sum(dim=(0, 2), keepdim=True)
    mean = (x * counted).sum(dim=(0, 2), keepdim=True) / count
    var = ((x - mean).square() * counted).sum(dim=(0, 2), keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * weight[:, None] + bias[:, None]


COMPILED_AUTOGRAD_TWINS = {
    "BatchNorm2d": (lambda: torch.nn.BatchNorm2d(4), (6, 4, 3, 3)),
    "BatchNorm2d-channels_last": (lambda: torch.nn.BatchNorm2d(4), (6, 4, 3, 3)),
    "LayerNorm": (lambda: torch.nn.LayerNorm(5), (3, 4, 5)),
    "GroupNorm": (lambda: torch.nn.GroupNorm(2, 4), (3, 4, 5)),
    "InstanceNorm1d": (lambda: torch.nn.InstanceNorm1d(4, affine=True), (3, 4, 5)),
    "RMSNorm": (lambda: torch.nn.RMSNorm(5), (3, 4, 5)),
}


def _compiled_autograd():
    """Compiled autograd as torch's own helper (``maybe_enable_compiled_autograd``) sets it up:
    a full graph, here on the aot_eager backend (no C++ compiler in the test)."""
    from torch._dynamo import compiled_autograd

    return compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True))


@pytest.mark.parametrize("name", list(COMPILED_AUTOGRAD_TWINS))
def test_compiled_autograd_traces_an_eager_twins_backward_into_a_full_graph_with_torch_nn_gradients(name):
    build, shape = COMPILED_AUTOGRAD_TWINS[name]
    torch.manual_seed(0)
    reference = build().double()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p))
    model = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, dtype=torch.float64)
    if name.endswith("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    probe = torch.randn(shape, dtype=torch.float64)
    grads = []
    for module, compiled in ((reference, False), (model, True)):
        torch._dynamo.reset()
        leaf = x.clone().requires_grad_()
        loss = (module(leaf) * probe).sum()  # the forward eager: the twin runs the kernels
        if compiled:
            with _compiled_autograd():
                loss.backward()
        else:
            loss.backward()
        grads.append([leaf.grad] + [p.grad for p in module.parameters()])
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected)


def test_compiled_autograd_traces_the_backward_of_norm_with_a_mask_into_a_full_graph():
    torch.manual_seed(0)
    norm = nt.Norm("[b] c [t]", params="c", c=4).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4, dtype=torch.float64))
        norm.bias.copy_(torch.randn(4, dtype=torch.float64))
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = (torch.arange(6) < torch.tensor([6, 4, 2])[:, None])[:, None, :]
    probe = torch.randn(3, 4, 6, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad((_masked_batch_norm_by_hand(leaf, mask, norm.weight, norm.bias) * probe).sum(),
                                   [leaf, norm.weight, norm.bias])
    torch._dynamo.reset()
    leaf = x.clone().requires_grad_()
    loss = (norm(leaf, mask=mask) * probe).sum()
    with _compiled_autograd():
        loss.backward()
    for got, want in zip([leaf.grad, norm.weight.grad, norm.bias.grad], expected):
        torch.testing.assert_close(got, want)


def _fused_add(block, reference):
    """A fused add-and-norm block beside ``x + r`` into its torch.nn norm: (y, x + r) each."""
    return block, lambda x, other: reference(x + other), lambda x, other: x + other


def _fused_blocks():
    torch.manual_seed(1)
    rms, layer = torch.nn.RMSNorm(8, eps=1e-6).double(), torch.nn.LayerNorm(8).double()
    gated_norm = torch.nn.RMSNorm(8, eps=1e-5).double()
    linear = torch.nn.Linear(8, 48).double()
    for module in (rms, layer, gated_norm):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p))
    add_rms, add_layer, gated, ada = (nt.FusedAddRMSNorm(8).double(), nt.FusedAddLayerNorm(8).double(),
                                      nt.GatedRMSNorm(8).double(), nt.AdaLayerNorm(8).double())
    add_rms.load_state_dict(rms.state_dict())
    add_layer.load_state_dict(layer.state_dict())
    gated.load_state_dict(gated_norm.state_dict())
    ada.linear.load_state_dict(linear.state_dict())

    def modulated(x, emb):
        shift, scale = linear(torch.nn.functional.silu(emb)).chunk(6, dim=1)[:2]
        return torch.nn.functional.layer_norm(x, (8,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    return {
        "FusedAddRMSNorm": (lambda x, r: add_rms(x, r), lambda x, r: (rms(x + r), x + r), rms, add_rms),
        "FusedAddLayerNorm": (lambda x, r: add_layer(x, r), lambda x, r: (layer(x + r), x + r), layer, add_layer),
        "GatedRMSNorm": (lambda x, z: (gated(x, z),),
                         lambda x, z: (gated_norm(x) * torch.nn.functional.silu(z),), gated_norm, gated),
        "AdaLayerNorm": (lambda x, emb: (ada(x, emb=emb[:, 0])[0],), lambda x, emb: (modulated(x, emb[:, 0]),),
                         linear, ada),
    }


@pytest.mark.parametrize("name", ["FusedAddRMSNorm", "FusedAddLayerNorm", "GatedRMSNorm", "AdaLayerNorm"])
def test_compiled_autograd_traces_an_eager_fused_blocks_backward_into_a_full_graph_with_torch_nn_gradients(name):
    """The blocks' backward ran the kernels' NumPy calls, which Dynamo cannot trace:
    compiled autograd with fullgraph=True raised "Attempted to call function marked as skipped"."""
    block, reference, torch_module, twin = _fused_blocks()[name]
    g = torch.Generator().manual_seed(2)
    x, other = torch.randn(3, 4, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, generator=g,
                                                                                   dtype=torch.float64)
    probes = [torch.randn(3, 4, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    grads = []
    for forward, module, compiled in ((reference, torch_module, False), (block, twin, True)):
        torch._dynamo.reset()
        leaves = x.clone().requires_grad_(), other.clone().requires_grad_()
        loss = sum((out * probe).sum() for out, probe in zip(forward(*leaves), probes))  # the forward eager
        if compiled:
            with _compiled_autograd():
                loss.backward()
        else:
            loss.backward()
        grads.append([leaf.grad for leaf in leaves] + [p.grad for p in module.parameters()])
    assert len(grads[0]) == len(grads[1])
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("build", [lambda: nt.LayerNorm(5), lambda: nt.RMSNorm(5), lambda: nt.BatchNorm1d(4)],
                         ids=["LayerNorm", "RMSNorm", "BatchNorm1d"])
def test_an_eager_backward_tells_a_traced_one_by_dynamo_s_flag_alone(build, monkeypatch):
    # torch.compiler.is_compiling is two Python calls (it asks torch.jit.is_scripting) on every
    # eager backward; Dynamo, which compiled autograd traces the backward with, folds
    # is_dynamo_compiling (one) to True as well
    calls = []
    is_compiling = torch.compiler.is_compiling
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: calls.append(1) or is_compiling())
    x = torch.randn(3, 4, 5, requires_grad=True)
    loss = build()(x).sum()
    calls.clear()
    loss.backward()
    assert calls == [] and x.grad is not None
