"""Every torch feature on every normlab twin, with the torch.nn original as the oracle:
double backward and gradgradcheck, torch.func, forward-mode AD, fx, TorchScript, errors
and constructor signatures. (The whole-model battery is in test_torch_features.py.)"""

import copy
import inspect
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.autograd import forward_ad  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import TorchvisionLayerNorm2d  # noqa: E402
from tests.profiling import profiled_ops  # noqa: E402

# (id, torch.nn original, input shape, an input torch.nn refuses)
TWINS = [
    ("batch_norm_1d", lambda: nn.BatchNorm1d(2), (3, 2, 2), (3, 3, 2)),
    ("batch_norm_2d", lambda: nn.BatchNorm2d(2), (3, 2, 2, 2), (3, 3, 2, 2)),
    ("batch_norm_3d", lambda: nn.BatchNorm3d(2), (2, 2, 2, 2, 2), (2, 2, 2, 2)),
    ("layer_norm", lambda: nn.LayerNorm((2, 3)), (2, 2, 3), (2, 3, 2)),
    ("group_norm", lambda: nn.GroupNorm(2, 4), (2, 4, 2, 1), (2, 6, 2, 1)),
    ("instance_norm_1d", lambda: nn.InstanceNorm1d(2, affine=True), (2, 2, 3), (2, 3, 3)),
    ("instance_norm_2d", lambda: nn.InstanceNorm2d(2, affine=True, track_running_stats=True), (2, 2, 2, 2),
     (2, 2, 2, 2, 2)),
    ("instance_norm_3d", lambda: nn.InstanceNorm3d(2, affine=True), (2, 2, 2, 2, 1), (2, 3, 2, 2, 1)),
    ("rms_norm", lambda: nn.RMSNorm(3), (2, 2, 3), (2, 3, 2)),
    ("norm_pattern", lambda: nn.GroupNorm(2, 4), (2, 4, 2, 1), (2, 6, 2, 1)),  # Norm, group norm's pattern
]
IDS = [case[0] for case in TWINS]
SCRIPTABLE = [case for case in TWINS if case[0] != "norm_pattern"]  # Norm has no torch.nn class to script
TOLERANCE = dict(atol=1e-9, rtol=1e-7)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")


def pair(name, factory):
    """The float64 torch.nn original with random parameters and running statistics, and its twin."""
    torch.manual_seed(0)
    original = factory().double()
    with torch.no_grad():
        for tensor in list(original.parameters()) + [b for b in original.buffers() if b.is_floating_point()]:
            tensor.copy_(torch.rand_like(tensor) + 0.5)
    if name == "norm_pattern":
        twin = nt.Norm("b (g [c]) [h w]", params="(g c)", g=2, c=2, dtype=torch.float64)
        twin.load_state_dict(original.state_dict())
    else:
        twin = nt.convert(copy.deepcopy(original))
        assert type(twin).__module__ == "normlab.torch"
    return original, twin


def inputs(shape, seed=1):
    torch.manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_twin_passes_gradgradcheck_in_x_and_parameters_in_float64(name, factory, shape, _bad):
    _, twin = pair(name, factory)
    names = [n for n, _ in twin.named_parameters()]

    def function(x, *parameters):
        return torch.func.functional_call(twin, dict(zip(names, parameters)), (x,))

    arguments = (inputs(shape).requires_grad_(), *(p.detach().requires_grad_() for p in twin.parameters()))
    assert torch.autograd.gradcheck(function, arguments)
    assert torch.autograd.gradgradcheck(function, arguments)


@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_gradient_penalty_gives_torch_nn_parameter_gradients(name, factory, shape, _bad):
    x = inputs(shape).requires_grad_()
    found = []
    for model in pair(name, factory):
        (grad_x,) = torch.autograd.grad(model(x).tanh().sum(), x, create_graph=True)
        (grad_x.square().sum() - 1).square().backward()
        found.append([p.grad for p in model.parameters()] + [x.grad.clone()])
        x.grad = None
    for actual, expected in zip(*found, strict=True):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_torch_func_transforms_give_torch_nn_results(name, factory, shape, _bad):
    x = inputs(shape)
    found = []
    for model in pair(name, factory):
        model.eval()  # torch.nn's batch norm cannot update buffers under a transform
        parameters = dict(model.named_parameters())
        grad = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sin().sum())(parameters)
        per_sample = torch.func.vmap(lambda row: model(row.unsqueeze(0)).squeeze(0))(x)
        jacobian = torch.func.jacrev(model)(x)
        found.append((grad, per_sample, jacobian))
    torch.testing.assert_close(found[0], found[1], **TOLERANCE)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_forward_mode_ad_gives_torch_nn_tangents(name, factory, shape, _bad, training):
    x, tangent = inputs(shape), inputs(shape, seed=2)
    found = []
    for model in pair(name, factory):
        model.train(training)
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
        if training:  # torch.nn's batch norm cannot update buffers under torch.func's transforms
            found.append(dual)
            continue
        _, jvp = torch.func.jvp(model, (x,), (tangent,))
        found.append((dual, jvp, torch.func.jacfwd(model)(x)))
    torch.testing.assert_close(found[0], found[1], **TOLERANCE)


@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_forward_mode_ad_in_training_updates_running_statistics_as_torch_nn(name, factory, shape, _bad):
    # dual tensors, then torch.func.jvp and jacfwd (which torch.nn's instance norm runs and
    # its batch norm refuses): the buffers take the batch's primal values, with no tangent
    x, tangent = inputs(shape), inputs(shape, seed=2)
    found = []
    for model in pair(name, factory):
        model.train()
        with forward_ad.dual_level():
            model(forward_ad.make_dual(x, tangent))
            assert all(forward_ad.unpack_dual(buffer).tangent is None for buffer in model.buffers())
        try:
            outcome = (torch.func.jvp(model, (x,), (tangent,)), torch.func.jacfwd(model)(x))
        except RuntimeError as error:
            outcome = type(error)
        found.append((outcome, [buffer.clone() for buffer in model.buffers()]))
    (expected, expected_buffers), (actual, actual_buffers) = found
    if isinstance(expected, type):
        assert actual is expected
    else:
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    torch.testing.assert_close(actual_buffers, expected_buffers, **TOLERANCE)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_fake_tensor_mode_propagates_torch_nn_shapes_dtypes_and_strides(name, factory, shape, _bad, training):
    """Shape propagation under FakeTensorMode: a fake float32 input gives an output and an
    input gradient with torch.nn's type, shape, dtype and strides (values: none to read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    found = []
    for model in pair(name, factory):
        model.float().train(training)
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.randn(shape, requires_grad=True)
            y = model(x)
            y.sum().backward()
        found.append((type(y), y.shape, y.dtype, y.stride(), x.grad.shape))
    assert found[0] == found[1]



@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_make_fx_traces_a_training_batch_norm_as_torch_nn_with_its_buffers(tracing_mode):
    """make_fx's shape propagation (a fake mode over the module's real buffers, as
    FakeTensorMode in the test above holds them too): torch.nn's batch norm traces, counts
    the batch and leaves its running statistics; the twin counted it through NumPy, which
    reads a fake tensor's memory ("Cannot access data pointer of Tensor")."""
    from torch.fx.experimental.proxy_tensor import make_fx

    found = []
    for model in (torch.nn.BatchNorm2d(3, momentum=None), nt.BatchNorm2d(3, momentum=None)):
        make_fx(model, tracing_mode=tracing_mode, _allow_non_fake_inputs=True)(torch.randn(2, 3, 4, 4) + 1)
        found.append([buffer.clone() for buffer in model.buffers()])
    torch.testing.assert_close(found[1], found[0])

class _Logged(torch.Tensor):
    """A tensor subclass with a ``__torch_function__`` of its own (as DTensor's), counting the
    torch functions it is handed."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("held_by", ["input", "parameters"])
@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_a_torch_function_subclass_in_the_input_or_parameters_gets_torch_nn_s_calls_and_output(
        name, factory, shape, _bad, held_by, grad):
    """The subclass is handed the twin's torch calls, and the output is of its type (as
    torch.nn's is), with torch.nn's values, buffers and gradients."""
    found = []
    for model in pair(name, factory):
        x = inputs(shape)
        if held_by == "input":
            x = x.as_subclass(_Logged)
        else:
            for param_name, param in list(model.named_parameters()):
                setattr(model, param_name, nn.Parameter(param.detach().clone().as_subclass(_Logged)))
        _Logged.calls = 0
        with torch.set_grad_enabled(grad):
            y = model(x)
        assert _Logged.calls > 0
        gradients = torch.autograd.grad(y.sum(), list(model.parameters())) if grad else ()
        found.append((type(y), _plain(y), [_plain(b) for b in model.buffers()], [_plain(g) for g in gradients]))
    assert found[1][0] is found[0][0]
    torch.testing.assert_close(found[1][1:], found[0][1:], **TOLERANCE)


@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_transforms_and_tracing_under_no_grad_give_torch_nn_results(name, factory, shape, _bad):
    # without gradients the twins have fast paths straight into the kernels: none may run here
    x, tangent = inputs(shape), inputs(shape, seed=2)
    found = []
    for model in pair(name, factory):
        model.eval()
        with torch.no_grad():
            with forward_ad.dual_level():
                dual = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
            per_sample = torch.func.vmap(lambda row: model(row.unsqueeze(0)).squeeze(0))(x)
            traced = torch.jit.trace(copy.deepcopy(model), x, check_trace=False)(x + 1)
        found.append((dual, per_sample, traced))
    torch.testing.assert_close(found[0], found[1], **TOLERANCE)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, factory, shape, _bad", TWINS, ids=IDS)
def test_fx_symbolic_trace_and_jit_trace_with_save_give_torch_nn_outputs(name, factory, shape, _bad, training):
    x = inputs(shape)
    original, twin = pair(name, factory)
    original.train(training), twin.train(training)
    expected = original(x)
    graph = torch.fx.symbolic_trace(nn.Sequential(copy.deepcopy(twin)))
    assert [node.op for node in graph.graph.nodes] == ["placeholder", "call_module", "output"]  # a leaf, as torch's
    torch.testing.assert_close(graph(x), expected, **TOLERANCE)
    traced = torch.jit.trace(copy.deepcopy(twin), x, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), expected, **TOLERANCE)


ROOT_TRACEABLE = [case for case in TWINS if case[0] in ("layer_norm", "group_norm", "rms_norm")]


@pytest.mark.parametrize("name, factory, shape, _bad", ROOT_TRACEABLE, ids=[case[0] for case in ROOT_TRACEABLE])
def test_fx_symbolic_trace_of_the_twin_itself_gives_torch_nn_s_graph_which_saves_and_loads(name, factory, shape, _bad):
    """fx traces torch.nn's LayerNorm, GroupNorm and RMSNorm as the root module (not its
    batch and instance norms: their forward branches on the input's rank); so it traces the
    twin, with torch.nn's signature (no mask) and outputs, through torch.save and pickle."""
    x = inputs(shape)
    original, twin = pair(name, factory)
    graph, reference = torch.fx.symbolic_trace(copy.deepcopy(twin)), torch.fx.symbolic_trace(original)
    assert graph.code == reference.code
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    for traced in (graph, torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(graph))):
        torch.testing.assert_close(traced(x), original(x), **TOLERANCE)
    with pytest.raises(TypeError):
        graph(x, mask=torch.ones(shape, dtype=torch.bool))


def test_fx_symbolic_trace_of_layer_norm_2d_itself_gives_torchvisions_outputs():
    twin, original = nt.LayerNorm2d(3), TorchvisionLayerNorm2d(3, eps=1e-6)
    original.load_state_dict(twin.state_dict())
    x = inputs((2, 3, 4, 5)).float()
    torch.testing.assert_close(torch.fx.symbolic_trace(twin)(x), torch.fx.symbolic_trace(original)(x))


def test_fx_symbolic_trace_of_a_biased_rms_norm_itself_saves_and_loads_with_torch_nn_outputs_plus_the_bias():
    """Its forward's annotations were strings (the module postponed them), which fx wrote into
    the graph's signature, and torch.save of the graph failed ("'str' object has no attribute
    '__name__'")."""
    twin, original = nt.BiasedRMSNorm(3, dtype=torch.float64), nn.RMSNorm(3, dtype=torch.float64)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5), twin.bias.uniform_(-1.0, 1.0)
        original.weight.copy_(twin.weight)
    graph = torch.fx.symbolic_trace(twin)
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    x = inputs((2, 2, 3))
    for traced in (graph, torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(graph))):
        torch.testing.assert_close(traced(x), original(x) + twin.bias, **TOLERANCE)


@pytest.mark.parametrize("name, factory, shape, _bad", SCRIPTABLE, ids=[case[0] for case in SCRIPTABLE])
def test_jit_script_compiles_the_twin_and_gives_torch_nn_outputs(name, factory, shape, _bad):
    x = inputs(shape)
    original, twin = pair(name, factory)
    scripted = torch.jit.script(twin)
    assert type(twin).__module__ == "normlab.torch"  # scripting leaves the eager module as it was
    torch.testing.assert_close(scripted(x), original(x), **TOLERANCE)
    torch.testing.assert_close(twin.running_mean if hasattr(twin, "running_mean") else None,
                               original.running_mean if hasattr(original, "running_mean") else None)


@pytest.mark.parametrize("name, factory, shape, bad", TWINS, ids=IDS)
def test_a_misfit_input_raises_torch_nn_exception_type_in_the_users_terms(name, factory, shape, bad):
    original, twin = pair(name, factory)
    with pytest.raises(Exception) as expected:
        original(inputs(bad))
    with pytest.raises(expected.type) as raised:
        twin(inputs(bad))
    assert "[n0" not in str(raised.value) and "n0=" not in str(raised.value)


@pytest.mark.parametrize("name, factory, shape, bad", SCRIPTABLE, ids=[case[0] for case in SCRIPTABLE])
def test_a_misfit_input_with_a_mask_raises_torch_nn_exception_type_naming_both_shapes_and_the_fix(name, factory,
                                                                                                   shape, bad):
    """With ``mask=`` a twin given an input of the wrong channel count or trailing shape raised
    from inside the masked statistics: "pass n0=3 or leave it out" (an axis of the pattern
    the module builds, not an argument of the module), "pass a weight of shape (3,) or change
    params", or, a batch norm in evaluation, "shape '[1, 3, 1, 1]' is invalid for input of
    size 2". It now raises torch.nn's exception type for that input, saying in the module's
    terms which shape it expected, the input's, and what to change (or torch.nn's own words,
    for the number of axes; Norm, which has no torch.nn class, speaks of its pattern). Oracle:
    torch.nn's module on the same input, without a mask."""
    for training in (True, False):
        original, twin = pair(name, factory)
        x = inputs(bad)
        with pytest.raises(Exception) as expected:
            original.train(training)(x)
        with pytest.raises(expected.type) as raised:
            twin.train(training)(x, mask=torch.ones(bad, dtype=torch.bool))
        message = str(raised.value)
        assert "n0" not in message and "params" not in message, message
        names_the_input = str(tuple(bad)) in message or str(list(bad)) in message
        # (torch.nn's words first for the number of axes, then the shape and the fix)
        assert message.startswith(str(expected.value)) or (names_the_input and "expected" in message
                                                             and "build" in message), message


@pytest.mark.parametrize("name, factory, shape, _bad", SCRIPTABLE, ids=[case[0] for case in SCRIPTABLE])
def test_constructor_signature_is_torch_nn_signature(name, factory, shape, _bad):
    original, twin = pair(name, factory)
    def described(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    extras = {"casting", "weight_offset"}  # RMSNorm's keyword-only casting recipe
    assert [p for p in described(type(twin)) if p[0] not in extras] == described(type(original))
    assert "normalized_shape" in str(inspect.signature(nt.LayerNorm))


def test_the_registered_custom_op_passes_gradgradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    weight, bias = (torch.rand(4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def function(x, weight, bias):
        return torch.ops.normlab.normalize(x, weight, bias, "b (g [c]) [l]", "(g c)", "g=2", 1e-5, False)[0]

    assert torch.autograd.gradgradcheck(function, (x, weight, bias))


_PROFILED = [("LayerNorm", lambda: nn.LayerNorm(64), (32, 64), grad) for grad in (True, False)] + [
    ("RMSNorm", lambda: nn.RMSNorm(64), (32, 64), grad) for grad in (True, False)] + [
    ("GroupNorm", lambda: nn.GroupNorm(4, 8), (4, 8, 6, 6), grad) for grad in (True, False)] + [
    ("BatchNorm2d", lambda: nn.BatchNorm2d(8), (4, 8, 6, 6), grad) for grad in (True, False)] + [
    # (with a gradient, batch norm in evaluation is torch operations: their own names show)
    ("BatchNorm2d, evaluation", lambda: nn.BatchNorm2d(8).eval(), (4, 8, 6, 6), False)]


@pytest.mark.parametrize("path", ["auto", "kernel"])
@pytest.mark.parametrize("name, make, shape, grad", _PROFILED,
                         ids=[f"{case[0]}, {'grad' if case[3] else 'no_grad'}" for case in _PROFILED])
def test_the_profiler_lists_each_twin_call_by_the_name_of_torch_nns_op(name, make, shape, grad, path):
    """torch.nn's norms show in ``prof.key_averages()`` as their op (``aten::layer_norm``);
    a twin's call on the kernels shows as the same name under normlab's
    (``normlab::layer_norm``), once a call, on the cached paths and the general one (the
    no-grad ones call no torch op). Oracle: the names torch's profiler gives torch.nn's module."""
    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), requires_grad=grad)
    names = {}
    for label, module in (("torch.nn", reference), ("twin", twin)):
        with torch.set_grad_enabled(grad), nt.use_path(path):
            # (the cached paths too: built on the first calls, taken from the second)
            names[label] = profiled_ops(lambda: module(x), warmup=3)
    ops = [key.split("::")[1] for key in names["torch.nn"] if key in {f"aten::{op}" for op in
                                                                   ("layer_norm", "rms_norm", "group_norm",
                                                                    "batch_norm")}]
    assert len(ops) == 1
    # (or torch's own op, where the twin calls it: batch norm in evaluation on small inputs)
    assert names["twin"].get(f"normlab::{ops[0]}") == 1 or names["twin"].get(f"aten::{ops[0]}") == 1


_PROFILED_BACKWARD = [case for case in _PROFILED if case[3]] + [
    ("InstanceNorm2d", lambda: nn.InstanceNorm2d(8, affine=True), (4, 8, 6, 6), True)]


@pytest.mark.parametrize("path", ["auto", "kernel"])
@pytest.mark.parametrize("name, make, shape, grad", _PROFILED_BACKWARD, ids=[case[0] for case in _PROFILED_BACKWARD])
def test_the_profiler_lists_each_twins_backward_by_the_name_of_torch_nns_backward_op(name, make, shape, grad, path):
    """torch.nn's norms' backward shows in ``prof.key_averages()`` as its op
    (``aten::native_layer_norm_backward``); a twin's backward on the kernels shows as one range
    named after its forward's, ``normlab::layer_norm_backward``, not only as its autograd
    Function's node (``_RowFunctionBackward``). Oracle: the names torch's profiler gives
    torch.nn's module, forward and backward."""
    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), requires_grad=True)
    names = {}
    for label, module in (("torch.nn", reference), ("twin", twin)):
        with nt.use_path(path):
            names[label] = profiled_ops(lambda: module(x).sum().backward(), warmup=3)  # (the cached paths too)
    ops = [key.split("::")[1] for key in names["torch.nn"] if key in {f"aten::{op}" for op in (
        "layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")}]
    # (torch's instance_norm calls its batch_norm: the outer op names the module)
    op = next(op for op in ops if op != "batch_norm") if len(ops) > 1 else ops[0]
    backward_ops = [key for key in names["torch.nn"] if key.startswith("aten::") and key.endswith("_backward")]
    # torch.nn's backward op is aten::native_<op>_backward (on CPU its RMSNorm's is torch operations,
    # and its instance norm's is batch norm's): the twin's carries the op's name and _backward
    assert f"aten::native_{op}_backward" in backward_ops or op in ("rms_norm", "instance_norm"), backward_ops
    assert names["twin"].get(f"normlab::{op}_backward") == 1, sorted(names["twin"])


_PROFILED_MASKED = [(make, shape, mask_shape, grad) for make, shape, mask_shape in (
    (lambda: nn.LayerNorm(16), (3, 5, 16), (3, 5, 1)), (lambda: nn.RMSNorm(16), (3, 5, 16), (3, 5, 1)),
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5), (3, 1, 5)), (lambda: nn.BatchNorm1d(4), (3, 4, 5), (3, 1, 5)),
    (lambda: nn.InstanceNorm1d(4), (3, 4, 5), (3, 1, 5))) for grad in (True, False)]


@pytest.mark.parametrize("make, shape, mask_shape, grad", _PROFILED_MASKED,
                         ids=[f"{type(case[0]()).__name__}, {'grad' if case[3] else 'no_grad'}"
                              for case in _PROFILED_MASKED])
def test_the_profiler_lists_a_twins_call_with_a_mask_by_the_name_of_torch_nns_op(make, shape, mask_shape, grad):
    """A twin called with ``mask=`` runs the masked kernels: its call shows in
    ``prof.key_averages()`` under normlab's name of torch.nn's op, as its calls without a mask
    do. Oracle: the op name torch's profiler gives torch.nn's module (which has no mask)."""
    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=generator, requires_grad=grad)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    mask[0, ..., -2:] = False
    names = {}
    for label, call in (("torch.nn", lambda: reference(x)), ("twin", lambda: twin(x, mask=mask))):
        with torch.set_grad_enabled(grad):
            names[label] = profiled_ops(call)
    ops = [key.split("::")[1] for key in names["torch.nn"]
           if key in {f"aten::{op}" for op in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")}]
    # (torch's instance_norm calls its batch_norm: the outer op names the module)
    op = next(name for name in ops if name != "batch_norm") if len(ops) > 1 else ops[0]
    assert names["twin"].get(f"normlab::{op}") == 1, sorted(names["twin"])


@pytest.mark.parametrize("make, shape, mask_shape, grad", [case for case in _PROFILED_MASKED if case[3]],
                         ids=[type(case[0]()).__name__ for case in _PROFILED_MASKED if case[3]])
def test_the_profiler_lists_a_twins_backward_with_a_mask_by_the_name_of_torch_nns_op(make, shape, mask_shape, grad):
    """The backward of a twin's call with ``mask=`` shows as one range named after the
    forward's with ``_backward`` (``normlab::layer_norm_backward``), as without a mask, not
    only as its autograd Function's node (``_EagerBackward``). Oracle: torch.nn's op names in
    torch's profiler."""
    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7), requires_grad=True)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    mask[0, ..., -2:] = False
    names = {}
    for label, call in (("torch.nn", lambda: reference(x)), ("twin", lambda: twin(x, mask=mask))):
        names[label] = profiled_ops(lambda: call().sum().backward())
    ops = [key.split("::")[1] for key in names["torch.nn"]
           if key in {f"aten::{op}" for op in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")}]
    op = next(name for name in ops if name != "batch_norm") if len(ops) > 1 else ops[0]
    assert names["twin"].get(f"normlab::{op}_backward") == 1, sorted(names["twin"])


_COMPILED_AUTOGRAD = [("BatchNorm2d", lambda: nn.BatchNorm2d(4), (2, 4, 3, 3), False),
                      ("InstanceNorm2d", lambda: nn.InstanceNorm2d(4, affine=True), (2, 4, 3, 3), False),
                      ("LayerNorm, mask", lambda: nn.LayerNorm(8), (2, 3, 8), True)]


@pytest.mark.slow
@pytest.mark.parametrize("name, make, shape, masked", _COMPILED_AUTOGRAD, ids=[c[0] for c in _COMPILED_AUTOGRAD])
def test_compiled_autograd_of_a_twin_is_not_compiled_again_when_a_profiler_starts(name, make, shape, masked):
    """Under compiled autograd, a twin's backward is traced by Dynamo: it must not read the
    profiler's flag there (Dynamo would guard on it and compile the backward again whenever a
    profiler starts), as torch.nn's module is not. Oracle: torch._dynamo's counters of
    torch.nn's module and the twin."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mask = torch.ones(shape[:-1] + (1,), dtype=torch.bool)
    graphs = {}
    for label, call in (("torch.nn", lambda: reference(x)),
                        ("twin", (lambda: twin(x, mask=mask)) if masked else (lambda: twin(x)))):
        torch._dynamo.reset()
        counters.clear()
        with compiled_autograd._enable(torch.compile):
            for _ in range(2):
                call().sum().backward()
            before = counters["stats"]["unique_graphs"]
            with profile():
                call().sum().backward()
            call().sum().backward()
        graphs[label] = counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert graphs["twin"] == graphs["torch.nn"] == 0, graphs


# (torch.nn's module, an input it refuses): the ranks, an instance norm's channels, a group
# norm's channels and rank, the dtypes its CPU kernels refuse to mix
_REFUSED_CALLS = [
    ("BatchNorm2d, 1D", lambda: nn.BatchNorm2d(8), lambda: torch.randn(8)),
    ("BatchNorm2d, unbatched", lambda: nn.BatchNorm2d(8), lambda: torch.randn(8, 3, 3)),
    # (one sample of one value per channel: a batch axis alone is what training refuses next)
    ("BatchNorm1d, 1D", lambda: nn.BatchNorm1d(8), lambda: torch.randn(8)),
    ("BatchNorm2d, unbatched, one position", lambda: nn.BatchNorm2d(8), lambda: torch.randn(8, 1, 1)),
    ("BatchNorm1d untracked in eval, 1D", lambda: nn.BatchNorm1d(8, track_running_stats=False).eval(),
     lambda: torch.randn(8)),
    ("BatchNorm1d in eval, 1D", lambda: nn.BatchNorm1d(8).eval(), lambda: torch.randn(8)),
    ("BatchNorm2d, 3D", lambda: nn.BatchNorm2d(8), lambda: torch.randn(2, 8, 3)),
    ("BatchNorm1d, 4D", lambda: nn.BatchNorm1d(8), lambda: torch.randn(2, 8, 3, 3)),
    ("BatchNorm3d, 4D", lambda: nn.BatchNorm3d(8), lambda: torch.randn(2, 8, 3, 3)),
    ("InstanceNorm2d, 2D", lambda: nn.InstanceNorm2d(8), lambda: torch.randn(2, 8)),
    ("InstanceNorm1d, 4 channels of 8", lambda: nn.InstanceNorm1d(8, affine=True), lambda: torch.randn(2, 4, 5)),
    ("InstanceNorm2d, unbatched, 4 channels of 8", lambda: nn.InstanceNorm2d(8, affine=True),
     lambda: torch.randn(4, 5, 5)),
    ("GroupNorm, 4 channels of 8", lambda: nn.GroupNorm(2, 8), lambda: torch.randn(2, 4, 5)),
    ("GroupNorm, 6 channels in 4 groups", lambda: nn.GroupNorm(4, 8), lambda: torch.randn(2, 6, 5)),
    ("GroupNorm, 1D", lambda: nn.GroupNorm(2, 8), lambda: torch.randn(8)),
    ("BatchNorm2d, float64 input", lambda: nn.BatchNorm2d(8), lambda: torch.randn(2, 8, 3, 3, dtype=torch.float64)),
    ("BatchNorm2d in eval, float64 input", lambda: nn.BatchNorm2d(8).eval(),
     lambda: torch.randn(2, 8, 3, 3, dtype=torch.float64)),
    ("LayerNorm, float64 input", lambda: nn.LayerNorm(8), lambda: torch.randn(2, 8, dtype=torch.float64)),
    ("LayerNorm, bfloat16 parameters", lambda: nn.LayerNorm(8).bfloat16(), lambda: torch.randn(2, 8)),
    ("GroupNorm, float64 input", lambda: nn.GroupNorm(2, 8), lambda: torch.randn(2, 8, 3, dtype=torch.float64)),
    ("InstanceNorm1d, float64 input", lambda: nn.InstanceNorm1d(8, affine=True),
     lambda: torch.randn(2, 8, 3, dtype=torch.float64)),
]


def _suggested_calls(message: str, reference: nn.Module, x):
    """The calls a message's fix names, as torch.nn runs them: another module (``use
    BatchNorm1d(8)``, ``build GroupNorm(2, 4)``), the input or the module cast, a batch axis."""
    import re

    for name, arguments in re.findall(r"(?:use|build) (\w+)\(([\d, ]+)\)", message):
        module = getattr(nn, name)(*map(int, arguments.split(", ")))
        yield f"{name}({arguments})", lambda module=module: module(x)
    for dtype in re.findall(r"x\.to\(torch\.(\w+)\)", message):
        yield f"x.to({dtype})", lambda dtype=dtype: reference(x.to(getattr(torch, dtype)))
    for dtype in re.findall(r"module\.to\(torch\.(\w+)\)", message):
        yield f"module.to({dtype})", lambda dtype=dtype: copy.deepcopy(reference).to(getattr(torch, dtype))(x)
    if "x.unsqueeze(0)" in message:
        yield "x.unsqueeze(0)", lambda: reference(x.unsqueeze(0))


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
@pytest.mark.parametrize("name, make, make_input", _REFUSED_CALLS, ids=[case[0] for case in _REFUSED_CALLS])
def test_a_twins_refusal_is_torch_nns_in_its_type_and_words_followed_by_the_shape_and_a_fix_torch_nn_accepts(
        name, make, make_input, masked):
    """torch.nn's refusals of a rank ("expected 4D input (got 1D input)"), an instance norm's
    channels, a group norm's channels and "mixed dtype (CPU)" name neither the shape the
    module takes nor a fix; the twin's error is torch.nn's, its type and its words first,
    then the module, the input's shape (or dtype) and what to do. Oracle: torch.nn's error
    for the call, and torch.nn running each call the fix names."""
    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    x = make_input()
    with pytest.raises((ValueError, RuntimeError)) as theirs:
        reference(x)
    with pytest.raises(type(theirs.value)) as ours:
        twin(x, mask=torch.ones(x.shape, dtype=torch.bool)) if masked else twin(x)
    message = str(ours.value)
    assert message.startswith(str(theirs.value)) and len(message) > len(str(theirs.value)), message
    assert type(reference).__name__ in message and (str(tuple(x.shape)) in message), message
    fixes = list(_suggested_calls(message, reference, x))
    assert fixes or "; pass " in message or "reshape" in message, message
    for fix, call in fixes:
        call()  # (torch.nn's module runs the call the message suggests)


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
def test_a_group_norm_twin_refuses_torch_s_own_group_norm_error_inputs_with_torch_s_expected_words(masked):
    """PyTorch's own error inputs for group_norm (OpInfo's error_inputs_group_norm: an input
    of one axis, channels its groups do not divide) and the words its tests expect of them,
    given to a GroupNorm twin without parameters (torch.nn's forward with weight=None), with
    and without a mask. Oracle: torch's OpInfo error inputs and their error_regex."""
    import re

    from torch.testing._internal.common_methods_invocations import op_db

    opinfo = next(op for op in op_db if op.name == "nn.functional.group_norm")
    errors = list(opinfo.error_inputs("cpu"))
    assert errors
    for error in errors:
        x, groups = error.sample_input.input, error.sample_input.args[0]
        twin = nt.GroupNorm(groups, groups, affine=False)
        with pytest.raises(RuntimeError) as raised:
            twin(x, mask=torch.ones(x.shape, dtype=torch.bool)) if masked else twin(x)
        assert re.search(error.error_regex, str(raised.value)), str(raised.value)
        assert str(tuple(x.shape)) in str(raised.value), str(raised.value)


# (torch.nn's module, an input it refuses, whether the compiled error holds the eager fix)
_COMPILED_REFUSALS = [
    ("BatchNorm2d, 3D", lambda: nn.BatchNorm2d(8), lambda: torch.randn(2, 8, 3), True),
    ("GroupNorm, 6 channels of 8", lambda: nn.GroupNorm(2, 8), lambda: torch.randn(2, 6, 3), False),
    ("BatchNorm2d, float64 input", lambda: nn.BatchNorm2d(8), lambda: torch.randn(2, 8, 3, 3, dtype=torch.float64),
     False),
]


@pytest.mark.parametrize("name, make, make_input, advised", _COMPILED_REFUSALS,
                         ids=[case[0] for case in _COMPILED_REFUSALS])
def test_a_compiled_twins_refusal_is_torch_nns_compiled_one_with_the_fix_where_the_call_goes_back_to_eager(
        name, make, make_input, advised):
    """What the README says of a refusal under torch.compile: torch.nn's compiled error (its
    type, its words first) alone where Dynamo raises it from its trace, the eager error with
    the fix where the call goes back to eager. Oracle: torch.nn's module compiled alike."""
    x = make_input()
    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    torch._dynamo.reset()
    with pytest.raises(Exception) as theirs:
        torch.compile(reference, backend="eager")(x)
    with pytest.raises(type(theirs.value)) as ours:
        torch.compile(twin, backend="eager")(x)
    torch._dynamo.reset()
    # (the first line: Dynamo's lines after it name each module's own code)
    message, expected = str(ours.value).splitlines()[0], str(theirs.value).splitlines()[0]
    assert message.startswith(expected), message
    assert (message != expected) is advised, message  # (the fix follows torch's words, or nothing does)
