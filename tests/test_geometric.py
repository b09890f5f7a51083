"""normlab.torch.geometric against PyG's own layers (the oracle): outputs, gradients,
running statistics and state_dict keys, on unsorted and sorted batch vectors, with a
graph that has no nodes. Also normalize_masked against a torch composite under
gradcheck and torch.compile."""

import re

import pytest

torch = pytest.importorskip("torch")
pyg_norm = pytest.importorskip("torch_geometric.nn.norm")

from normlab.torch import geometric  # noqa: E402
from normlab.torch.masked import normalize_masked  # noqa: E402
from tests.profiling import profiled_ops  # noqa: E402


def _batch(sorted_ids: bool, n=23, graphs=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, graphs - 1, (n,), generator=g)  # graph graphs-1 has no nodes
    if sorted_ids:
        batch = batch.sort().values
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 3 + 2
    return x, batch, graphs


def _copy_params(ours, theirs):
    theirs.load_state_dict(ours.state_dict())


def _compare(ours, theirs, x, *args, grads=True):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = ours(xa, *args), theirs(xb, *args)
    torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-9)
    if grads:
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-9)
        for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-8, atol=1e-9, msg=name)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-9, atol=1e-9)


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("sorted_ids", [True, False])
@pytest.mark.parametrize("affine,track", [(False, False), (True, True)])
def test_instance_norm_twin_matches_pyg_with_running_stats(sorted_ids, affine, track):
    x, batch, graphs = _batch(sorted_ids)
    ours = geometric.InstanceNorm(6, affine=affine, track_running_stats=track).double()
    theirs = pyg_norm.InstanceNorm(6, affine=affine, track_running_stats=track).double()
    _randomize(ours)
    _copy_params(ours, theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    _compare(ours, theirs, x, None, None)  # no batch vector: one graph (before PyG's buffers track gradients)
    for _ in range(2):
        _compare(ours, theirs, x, batch, graphs)
        for name in ("running_mean", "running_var"):  # PyG's update keeps the autograd graph in its buffers
            if getattr(theirs, name) is not None:
                setattr(theirs, name, getattr(theirs, name).detach())
    ours.eval()
    theirs.eval()
    _compare(ours, theirs, x, batch, graphs)
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("track", [True, False], ids=["running statistics", "none"])
@pytest.mark.parametrize("with_batch", [True, False], ids=["batch vector", "one graph"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_instance_norm_twin_with_a_momentum_of_none_raises_pygs_error_and_keeps_its_statistics(with_batch, track,
                                                                                                  train):
    # without a batch vector PyG calls F.instance_norm, whose momentum must be a float, in
    # evaluation too: the twin normalized and then failed in its own update ("unsupported
    # operand ... 'NoneType'"), or computed where PyG raises
    x, batch, graphs = _batch(True)
    args = (batch, graphs) if with_batch else ()
    ours = geometric.InstanceNorm(6, momentum=None, track_running_stats=track).double().train(train)
    theirs = pyg_norm.InstanceNorm(6, momentum=None, track_running_stats=track).double().train(train)
    outcomes = []
    for module in (ours, theirs):
        try:
            outcomes.append(("computes", module(x, *args)))
        except Exception as error:  # noqa: BLE001 (the oracle's type and words, whatever they are)
            outcomes.append((type(error), str(error)))
    if outcomes[1][0] == "computes":
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1])
    else:
        assert outcomes[0] == outcomes[1]
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("with_batch", [True, False], ids=["batch vector", "one graph"])
def test_a_checkpointed_block_ending_in_the_instance_norm_twin_updates_running_statistics_as_pygs(with_batch):
    """torch.utils.checkpoint recomputes the forward in backward, up to the last tensor
    saved for it. With a batch vector PyG updates its running statistics before its output,
    so the recomputation updates them again; the twin updated them after its op: once.
    (Without one PyG's F.instance_norm copies them back after it saves: once, as the twin.)"""
    from torch.utils.checkpoint import checkpoint

    x, batch, graphs = _batch(True)
    ours = geometric.InstanceNorm(6, affine=True, track_running_stats=True).double()
    theirs = pyg_norm.InstanceNorm(6, affine=True, track_running_stats=True).double()
    _copy_params(ours, theirs)
    args = (batch, graphs) if with_batch else ()
    for step in range(2):
        for module in (ours, theirs):
            checkpoint(lambda a: module(torch.relu(a), *args), (x + step).requires_grad_(),
                       use_reentrant=False).sum().backward()
        theirs.running_mean, theirs.running_var = theirs.running_mean.detach(), theirs.running_var.detach()
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())

@pytest.mark.parametrize("sorted_ids", [True, False])
@pytest.mark.parametrize("mode", ["graph", "node"])
def test_layer_norm_twin_matches_pyg_in_both_modes(sorted_ids, mode):
    x, batch, graphs = _batch(sorted_ids, seed=1)
    ours, theirs = geometric.LayerNorm(6, mode=mode).double(), pyg_norm.LayerNorm(6, mode=mode).double()
    _randomize(ours)
    _copy_params(ours, theirs)
    _compare(ours, theirs, x, batch, graphs)
    _compare(ours, theirs, x, batch)  # batch_size inferred
    _compare(ours, theirs, x)
    assert repr(ours) == repr(theirs)
    ours_plain, theirs_plain = geometric.LayerNorm(6, affine=False).double(), pyg_norm.LayerNorm(6, affine=False)
    assert ours_plain.state_dict().keys() == theirs_plain.state_dict().keys()
    _compare(ours_plain, theirs_plain.double(), x, batch, graphs)



@pytest.mark.parametrize("name, affine, with_batch", [
    ("InstanceNorm", False, True), ("InstanceNorm", True, True), ("InstanceNorm", False, False),
    ("LayerNorm", False, True), ("LayerNorm", True, True)])
def test_integer_node_features_give_pygs_outputs_and_running_statistics_or_its_exception(name, affine, with_batch):
    """PyG divides integer features by the node counts (float32 statistics and outputs) with a
    batch vector, and hands them to F.instance_norm ("not implemented for 'Long'") without;
    the twins computed an int64 output of made-up values (and raised once normalize_masked
    refused integer input)."""
    torch.manual_seed(0)
    x, batch = torch.randint(-3, 4, (7, 4)), torch.tensor([0, 0, 0, 1, 1, 1, 1]) if with_batch else None
    extra = {"track_running_stats": with_batch} if name == "InstanceNorm" else {}
    ours, theirs = (getattr(module, name)(4, affine=affine, **extra) for module in (geometric, pyg_norm))
    try:
        expected = theirs(x, batch)
    except Exception as error:
        with pytest.raises(type(error), match=re.escape(str(error))):
            ours(x, batch)
        return
    got = ours(x, batch)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("x_dtype, params", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_layer_norm_twin_in_node_mode_on_half_input_gives_pygs_bits_and_gradients(x_dtype, params):
    # PyG calls F.layer_norm, torch's half kernel (parameter gradients accumulated in the
    # input's dtype); the twin gives its bits, as the torch.nn LayerNorm twin does
    g = torch.Generator().manual_seed(3)
    ours, theirs = geometric.LayerNorm(64, mode="node").to(params), pyg_norm.LayerNorm(64, mode="node").to(params)
    _randomize(ours)
    _copy_params(ours, theirs)
    x, grad = (torch.randn(3000, 64, generator=g).to(x_dtype) for _ in range(2))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    ya.backward(grad)
    yb.backward(grad)
    for a, b in [(ya, yb), (xa.grad, xb.grad), (ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)

@pytest.mark.parametrize("sorted_ids", [True, False])
def test_graph_norm_twin_matches_pyg_including_the_mean_scale_gradient(sorted_ids):
    x, batch, graphs = _batch(sorted_ids, seed=2)
    ours, theirs = geometric.GraphNorm(6).double(), pyg_norm.GraphNorm(6).double()
    _randomize(ours)
    _copy_params(ours, theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _compare(ours, theirs, x, batch, graphs)
    _compare(ours, theirs, x)
    assert repr(ours) == repr(theirs)



@pytest.mark.parametrize("features, channels", [((3, 6), 6), ((), 1), ((1,), 4), ((3, 1), 5)],
                         ids=["heads", "one-channel", "one-column-stretched", "heads-stretched"])
def test_graph_norm_twin_takes_node_features_of_any_shape_as_pyg_broadcasts_them(features, channels):
    x, batch, graphs = _batch(False, seed=4)
    # (n, heads, c) and (n,); a single column (n, 1) PyG stretches across the parameters' channels
    x = torch.randn(x.shape[0], *features, dtype=torch.float64) + 2
    ours, theirs = geometric.GraphNorm(channels).double(), pyg_norm.GraphNorm(channels).double()
    _randomize(ours)
    _copy_params(ours, theirs)
    _compare(ours, theirs, x, batch, graphs)
    _compare(ours, theirs, x)

def test_batch_norm_twin_matches_pyg_and_keeps_its_module_keys():
    x, _, _ = _batch(True, seed=3)
    ours, theirs = geometric.BatchNorm(6).double(), pyg_norm.BatchNorm(6).double()
    _randomize(ours)
    _copy_params(ours, theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for _ in range(2):
        _compare(ours, theirs, x)
    ours.eval()
    theirs.eval()
    _compare(ours, theirs, x)
    single = geometric.BatchNorm(6, allow_single_element=True).double().eval()
    assert single(x[:1]).shape == (1, 6)
    with pytest.raises(ValueError, match="allow_single_element"):
        geometric.BatchNorm(6, allow_single_element=True, track_running_stats=False)


def test_normalize_masked_passes_gradcheck_with_segments_and_a_mask():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    mask = torch.tensor([True, True, False, True, True, False, True])[:, None]
    assert torch.autograd.gradcheck(
        lambda x, w: normalize_masked(x, "[n] c", weight=w, params="c", segment_ids=ids, mask=mask).y, (x, w))


def test_normalize_masked_is_one_op_under_torch_compile():
    x = torch.randn(4, 3, 5)
    mask = torch.rand(4, 1, 5) < 0.5
    eager = normalize_masked(x, "[b] c [t]", mask=mask).y
    compiled = torch.compile(lambda x, m: normalize_masked(x, "[b] c [t]", mask=m).y, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), eager)


def test_the_composite_for_other_devices_matches_the_kernel_and_its_gradients():
    from normlab.torch import masked
    from normlab.torch.spec import Spec

    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(9, 1, generator=g) < 0.6
    ids = torch.tensor([0, 0, 1, 1, 1, 3, 3, 0, 1])
    kernel = normalize_masked(x, "[n] c", mask=mask, segment_ids=ids, num_segments=4)
    composite = masked._composite(x, None, None, mask, ids, Spec.build("[n] c"), 1e-5, 4, None)
    torch.testing.assert_close(kernel.y, composite[0])
    for ours, theirs in zip(kernel[1:], composite[1:]):
        torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(kernel.y, x, grad)[0], torch.autograd.grad(composite[0], x, grad)[0])


def _against_float64(ours, theirs, nodes, args, g):
    """``ours`` on float32 ``nodes`` against PyG's ``theirs`` in float64 on the same nodes, to
    float32's accuracy: outputs, node gradients and parameter gradients."""
    x, x64 = nodes.clone().requires_grad_(), nodes.double().requires_grad_()
    y, expected = ours(x, *args), theirs(x64, *args)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    seed = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(seed.float())
    expected.backward(seed)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-3, rtol=1e-4, msg=name)


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("with_batch", [True, False], ids=["batch", "no-batch"])
def test_graph_norm_twin_on_float32_nodes_far_from_zero_stays_float32_accurate(offset, with_batch):
    """Node features far from zero (|mean|/std of 1e4 and 1e6) into a GraphNorm whose
    mean_scale is still 1 in some channels (PyG's initial value: each graph centred): the twin
    agrees with PyG's GraphNorm run in float64 on the same nodes to float32's accuracy,
    outputs and every gradient, as the other twins do (PyG's float32 sum is off by 6e-3 and
    by 4 there)."""
    g = torch.Generator().manual_seed(6)
    batch = torch.repeat_interleave(torch.arange(4), torch.tensor([1500, 1, 0, 7])) if with_batch else None
    nodes = torch.randn(1508, 6, generator=g) + offset
    ours, theirs = geometric.GraphNorm(6), pyg_norm.GraphNorm(6).double()
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.uniform_(0.5, 1.5, generator=g)
        ours.mean_scale[3:].uniform_(0.5, 1.5, generator=g)
    theirs.load_state_dict(ours.state_dict())
    _against_float64(ours, theirs, nodes, (batch, 4) if with_batch else (), g)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_graph_mode_layer_norm_twin_without_a_batch_vector_on_float32_nodes_far_from_zero_stays_float32_accurate(
        offset):
    """One whole graph (node-level tasks, a NeighborLoader's minibatch) into LayerNorm in
    graph mode, node features far from zero: the twin agrees with PyG's LayerNorm run in
    float64 to float32's accuracy, outputs and gradients, as with a batch vector (PyG's
    float32 mean is off by 8e-5 and 0.1 there)."""
    g = torch.Generator().manual_seed(7)
    nodes = torch.randn(3000, 5, generator=g) + offset
    ours, theirs = geometric.LayerNorm(5), pyg_norm.LayerNorm(5).double()
    _randomize(ours)
    theirs.load_state_dict(ours.state_dict())
    _against_float64(ours, theirs, nodes, (), g)


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("with_batch", [True, False], ids=["batch", "no-batch"])
def test_instance_norm_twin_in_evaluation_on_float32_nodes_far_from_zero_stays_float32_accurate(offset, with_batch):
    """A trained InstanceNorm (running statistics far from zero, as its node features) in
    evaluation: the twin agrees with PyG's InstanceNorm run in float64 on the same nodes to
    float32's accuracy, outputs and gradients, with a batch vector and without one (one
    whole graph, a NeighborLoader's minibatch), as the torch.nn twins do in evaluation.
    Without one, torch's op folds the running statistics into x·α + β, which in float32 was
    off by 6e-4 and 0.04 there."""
    g = torch.Generator().manual_seed(8)
    nodes = torch.randn(3000, 5, generator=g) + offset
    ours = geometric.InstanceNorm(5, affine=True, track_running_stats=True)
    theirs = pyg_norm.InstanceNorm(5, affine=True, track_running_stats=True).double()
    _randomize(ours)
    with torch.no_grad():
        ours.running_mean.copy_(offset + torch.randn(5, generator=g))
        ours.running_var.uniform_(0.5, 2.0, generator=g)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([2000, 1, 999]))
    _against_float64(ours, theirs, nodes, (batch, 3) if with_batch else (), g)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_running_statistics_handed_in_requiring_grad_raise_pyg_s_error_without_a_batch_vector(train):
    """functional_call may hand a PyG norm running statistics that require grad: without a
    batch vector PyG's InstanceNorm calls F.instance_norm, whose op refuses them; the twin's
    training path updated them in place and returned (torch.nn's twins: 2494c11)."""
    reference = pyg_norm.InstanceNorm(4, track_running_stats=True).double().train(train)
    twin = geometric.InstanceNorm(4, track_running_stats=True).double().train(train)
    x = torch.randn(10, 4, dtype=torch.float64)
    for module in (reference, twin):
        buffers = {"running_mean": module.running_mean.clone().requires_grad_(),
                   "running_var": module.running_var.clone().requires_grad_()}
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            torch.func.functional_call(module, buffers, (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_instance_norm_twin_without_a_batch_vector_on_half_nodes_keeps_pygs_float32_running_statistics(dtype):
    """Half-precision node features (a model under CPU autocast, whose Linear gives bfloat16)
    into an InstanceNorm with float32 running statistics, trained without a batch vector (one
    whole graph, a NeighborLoader's minibatch): PyG's F.instance_norm updates the statistics in
    float32, and so does the twin now; it rounded each step's mean and variance to the nodes'
    dtype first, 0.03 off PyG's running mean after one bfloat16 step of nodes near 100."""
    g = torch.Generator().manual_seed(9)
    ours = geometric.InstanceNorm(5, affine=True, track_running_stats=True)
    theirs = pyg_norm.InstanceNorm(5, affine=True, track_running_stats=True)
    for _ in range(3):
        x = (torch.randn(13, 5, generator=g) * 3 + 100).to(dtype)
        y, expected = ours(x), theirs(x)
        assert y.dtype == expected.dtype == dtype
        torch.testing.assert_close(y, expected)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-6, atol=1e-5, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation_without_running_statistics"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_the_profiler_lists_the_instance_norm_twins_call_by_the_name_of_pygs_op(training, grad):
    """PyG's InstanceNorm without a batch vector shows in ``prof.key_averages()`` as torch's
    ``aten::instance_norm``; its twin, which runs the kernels there, as ``normlab::instance_norm``
    (as the torch.nn twins do), and so with a batch vector. Oracle: the op name torch's
    profiler gives PyG's module."""
    reference = pyg_norm.InstanceNorm(8, affine=True).train(training)
    twin = geometric.InstanceNorm(8, affine=True).train(training)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(3), requires_grad=grad)
    batch = torch.tensor([0] * 5 + [1] * 7)
    names = {}
    for label, call in (("PyG", lambda: reference(x)), ("twin", lambda: twin(x)),
                        ("twin, batch", lambda: twin(x, batch))):
        with torch.set_grad_enabled(grad):
            names[label] = profiled_ops(call)
    assert names["PyG"].get("aten::instance_norm") == 1
    assert names["twin"].get("normlab::instance_norm") == 1, sorted(names["twin"])
    assert names["twin, batch"].get("normlab::instance_norm") == 1, sorted(names["twin, batch"])


_NODE_SHAPE_CASES = {
    "InstanceNorm_affine": lambda m: m.InstanceNorm(5, affine=True),
    "InstanceNorm_tracked": lambda m: m.InstanceNorm(5, affine=True, track_running_stats=True),
    "InstanceNorm_plain": lambda m: m.InstanceNorm(5),
    "LayerNorm_graph": lambda m: m.LayerNorm(5, mode="graph"),
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("with_batch", [True, False], ids=["batch", "no_batch"])
@pytest.mark.parametrize("shape", [(7, 1), (7,), (7, 3), (7, 5, 2)], ids=str)
@pytest.mark.parametrize("name", list(_NODE_SHAPE_CASES))
def test_nodes_of_another_shape_than_the_channels_are_taken_or_refused_as_pygs_layer_does(name, shape, with_batch,
                                                                                      training):
    """(n, 1) nodes with 5 channels' weights: PyG's InstanceNorm and graph LayerNorm, plain
    torch operations, broadcast the one channel over the weight (output (n, 5)), where the
    twins refused them with normlab's PatternParamsError; other shapes PyG refuses with
    torch's errors, which the twins raise too (of the same type). Oracle: PyG's layers."""
    make = _NODE_SHAPE_CASES[name]
    batch = torch.tensor([0, 0, 1, 1, 1, 3, 3]) if with_batch else None
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(module):
        module = module.double().train(training)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(4)))
        xg = x.clone().requires_grad_(True)
        try:
            y = module(xg, batch)
        except Exception as error:  # (the oracle's own exception, whatever its type)
            return type(error)
        grads = torch.autograd.grad((y * y).sum(), (xg, *module.parameters()))
        return y.detach(), grads, [b.clone() for b in module.buffers()]

    theirs = run(make(pyg_norm))
    ours = run(make(geometric))
    if isinstance(theirs, type):
        assert isinstance(ours, type) and issubclass(ours, theirs), (ours, theirs)
    else:
        assert not isinstance(ours, type), ours
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


_PROFILED_PYG = [("LayerNorm", "graph"), ("LayerNorm", "node"), ("GraphNorm", None)]


@pytest.mark.parametrize("name, mode", _PROFILED_PYG, ids=[f"{name}, {mode}" for name, mode in _PROFILED_PYG])
def test_the_profiler_lists_a_pyg_twins_call_and_backward_by_the_name_of_its_norm(name, mode):
    """The PyG twins' calls on the kernels show in ``prof.key_averages()`` as one range named
    after the norm (``normlab::layer_norm``, as torch.nn.LayerNorm's ``aten::layer_norm``, which
    PyG's node-mode LayerNorm calls; ``normlab::graph_norm``: torch has no graph norm), and their
    backward as that name with ``_backward``, not as the functional call's ``normlab::normalize``.
    Oracle: the op torch's profiler gives PyG's LayerNorm and torch.nn's LayerNorm."""
    def keys(call):
        return profiled_ops(lambda: call().sum().backward())

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=generator, requires_grad=True)
    batch = torch.tensor([0, 0, 0, 1, 1, 1])
    if name == "LayerNorm":
        reference = torch.nn.LayerNorm(8)
        torch_ops = {key for key in keys(lambda: reference(x)) if key.startswith("aten::")}
        pyg_ops = {key for key in keys(lambda: pyg_norm.LayerNorm(8, mode="node")(x, batch)) if key.startswith("aten::")}
        op = "layer_norm"
        assert f"aten::{op}" in torch_ops and f"aten::{op}" in pyg_ops
        twin = geometric.LayerNorm(8, mode=mode)
    else:
        op = "graph_norm"
        twin = geometric.GraphNorm(8)
    names = keys(lambda: twin(x, batch))
    assert names.get(f"normlab::{op}") == 1 and names.get(f"normlab::{op}_backward") == 1, sorted(names)
    assert "normlab::normalize" not in names
