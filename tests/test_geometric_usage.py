"""normlab.torch.geometric as PyG users run it, against PyG's own layers (the oracle):
TorchScript of the twins, torch.func's transforms, and a batch vector that is wrong in the ways users get it wrong
(the errors torch users catch, repeating the pattern and the shape; never a crash deep in
a scatter, and never a silent truncation of float ids)."""

import copy
import io
import warnings

import pytest

torch = pytest.importorskip("torch")
pyg_norm = pytest.importorskip("torch_geometric.nn.norm")

from normlab.torch import geometric  # noqa: E402
from tests.prerequisites import skip_without_dynamo_exporter  # noqa: E402

_LAYERS = {
    "instance": lambda m: m.InstanceNorm(5, affine=True, track_running_stats=True),
    "layer_graph": lambda m: m.LayerNorm(5),
    "layer_node": lambda m: m.LayerNorm(5, mode="node"),
    "graph": lambda m: m.GraphNorm(5),
}


def _graphs(seed=0):
    """12 nodes in graphs 0..4 of a batch of 6: graph 2 and graph 5 have no nodes, graph 1 one."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.tensor([0, 0, 0, 1, 3, 3, 3, 3, 4, 4, 4, 4])[torch.randperm(12, generator=g)]
    return torch.randn(12, 5, generator=g, dtype=torch.float64) * 2 + 1, batch


def _randomized_pair(name):
    """(twin, PyG's layer) in float64 with the same random parameters."""
    ours, theirs = _LAYERS[name](geometric).double(), _LAYERS[name](pyg_norm).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_scripted_twins_match_scripted_pyg_layers_through_training_and_evaluation(name):
    ours, theirs = _randomized_pair(name)
    ours, theirs = torch.jit.script(ours), torch.jit.script(theirs)
    buffer = io.BytesIO()
    torch.jit.save(ours, buffer)  # a scripted twin saves and loads as PyG's scripted layer does
    ours = torch.jit.load(io.BytesIO(buffer.getvalue()))
    x, batch = _graphs()
    for call in ((batch, 6), (batch, None), (None, None), (batch, 6)):
        ya, yb = ours(x, *call), theirs(x, *call)
        torch.testing.assert_close(ya, yb)
        for name_, t in theirs.state_dict().items():  # PyG's buffers keep the autograd graph: compare values
            torch.testing.assert_close(ours.state_dict()[name_], t.detach(), msg=name_)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x, batch, 6), theirs(x, batch, 6))


@pytest.mark.parametrize("name", ["instance", "layer_graph", "graph"])
def test_a_bad_batch_vector_fails_as_runtime_error_naming_the_pattern_and_shape(name):
    x, batch = _graphs(seed=1)
    ours, theirs = _LAYERS[name](geometric).double(), _LAYERS[name](pyg_norm).double()
    bad = {"shorter": (batch[:-1], None), "negative id": (batch - 1, None), "id >= batch_size": (batch, 4),
           "two-dimensional": (batch[:, None], None)}
    for what, call in bad.items():
        with pytest.raises((RuntimeError, ValueError)):  # PyG refuses each (a 2-D one: ValueError in GraphNorm)
            theirs(x, *call)
        with pytest.raises(RuntimeError, match=r"input shape \(12, 5\)") as caught:
            ours(x, *call)
        assert isinstance(caught.value, ValueError), what  # also normlab's ValueError kind
    x_before = x.clone()
    for ids in (batch.double(), batch.bool()):  # PyG refuses them; .long() would truncate 0.5 to graph 0
        with pytest.raises(TypeError, match="integer tensor"):
            ours(x, ids)
    assert torch.equal(x, x_before)


def test_graph_norm_twin_names_the_nodes_own_shape_for_a_bad_batch_vector_and_takes_small_integer_ids():
    """GraphNorm on (n, heads, c) or (n, 1) nodes named the flattened (n, heads·c) or the
    broadcast (n, c) in its error, a shape the user never passed; and int16 or uint8 ids,
    which the other twins take, failed in torch's index_add_ without the pattern or a fix.
    Oracle for the small ids: PyG's layers on the same ids as int64."""
    ours, theirs = _randomized_pair("graph")
    x, batch = _graphs(seed=2)
    for nodes in (x[:, None, :].expand(12, 3, 5), x[:, :1]):
        with pytest.raises(RuntimeError, match=r"input shape \(12, " + ", ".join(map(str, nodes.shape[1:]))):
            ours(nodes, batch[:-1])
    ours_instance, theirs_instance = _randomized_pair("instance")
    for ids in (batch.short(), batch.to(torch.uint8)):
        torch.testing.assert_close(ours(x, ids, 6), theirs(x, batch, 6))
        torch.testing.assert_close(ours_instance(x, ids, 6), theirs_instance(x, batch, 6))


def test_one_node_without_a_batch_vector_is_refused_in_training_as_pyg_refuses_it():
    x = torch.randn(1, 5)
    for track in (False, True):
        ours = geometric.InstanceNorm(5, track_running_stats=track)
        theirs = pyg_norm.InstanceNorm(5, track_running_stats=track)
        with pytest.raises(ValueError) as expected:
            theirs(x)
        with pytest.raises(ValueError, match="more than 1 spatial element") as caught:
            ours(x)
        assert str(caught.value) == str(expected.value)
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict())  # running statistics untouched


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_torch_func_transforms_of_each_twin_give_pygs_jacobians_tangents_and_parameter_gradients(name):
    """jacrev and jvp in the nodes, grad in the parameters through functional_call (the
    running statistics of instance norm are handed in as buffers, which it updates)."""
    from torch.func import functional_call, grad, jacrev, jvp

    x, batch = _graphs(seed=3)
    tangent = torch.randn_like(x)
    found = []
    for layer in _randomized_pair(name):
        def call(params, nodes, layer=layer):
            buffers = {key: b.clone() for key, b in layer.named_buffers()}
            return functional_call(layer, (params, buffers), (nodes, batch, 6))

        params = {key: p.detach() for key, p in layer.named_parameters()}
        found.append((jacrev(call, argnums=1)(params, x), jvp(lambda nodes: call(params, nodes), (x,), (tangent,)),
                      grad(lambda p: call(p, x).pow(3).sum())(params)))
    torch.testing.assert_close(found[0], found[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["instance", "layer_graph", "graph"])
def test_bfloat16_nodes_with_float32_parameters_give_pygs_dtype_and_values(name):
    """Norms kept in float32 in a bfloat16 model: PyG's ``out * weight + bias`` promotes."""
    x, batch = _graphs(seed=2)
    ours, theirs = _LAYERS[name](geometric), _LAYERS[name](pyg_norm)
    theirs.load_state_dict(ours.state_dict())
    nodes = x.to(torch.bfloat16)
    expected = theirs(nodes, batch, 6)
    y = ours(nodes, batch, 6)
    assert y.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=0.05, rtol=0.02)  # PyG's statistics are bfloat16's


class _Model(torch.nn.Module):
    """Instance, layer and graph norm of a batch of 6 graphs, from ``norms``' classes."""

    def __init__(self, norms):
        super().__init__()
        self.instance, self.layer, self.graph_norm = norms.InstanceNorm(5), norms.LayerNorm(5), norms.GraphNorm(5)

    def forward(self, x, batch):
        return self.graph_norm(self.layer(self.instance(x, batch, 6), batch, 6), batch, 6)


def _more_graphs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 6, (30,), generator=g).sort().values


def test_a_model_of_twins_exports_with_a_dynamic_node_count_as_pygs_does():
    ours, theirs = _Model(geometric).double().eval(), _Model(pyg_norm).double().eval()
    theirs.load_state_dict(ours.state_dict())
    x, batch = _graphs(seed=3)
    nodes = torch.export.Dim("nodes", min=2)
    exported = torch.export.export(ours, (x, batch), dynamic_shapes=({0: nodes}, {0: nodes})).module()
    for inputs in ((x, batch), _more_graphs()):
        torch.testing.assert_close(exported(*inputs), theirs(*inputs))


@pytest.mark.parametrize("name", ["instance", "layer_graph", "graph"])
def test_compiled_with_fullgraph_a_twin_without_a_batch_size_is_one_graph_as_pygs_layer_is(name):
    """torch.compile(fullgraph=True, dynamic=True) of a twin called without ``batch_size``
    (PyG's models pass none unless asked), on 2, 3 and 4 graphs: one graph, PyG's outputs and
    node gradients, as PyG's own layer compiles; the check for ids batched by vmap, a call
    Dynamo cannot trace, refused the graph ("Attempted to call function marked as skipped"),
    and the fake kernel compared the count read from the ids with -1, a guard on data."""
    from torch._dynamo.testing import CompileCounter

    ours, theirs = _randomized_pair(name)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(7)
    for graphs in (2, 3, 4):
        x = torch.randn(3 * graphs, 5, generator=g, dtype=torch.float64)
        batch = torch.arange(3 * graphs) % graphs
        results = []
        for layer in (compiled, theirs):
            nodes = x.clone().requires_grad_()
            y = layer(nodes, batch)
            y.backward(torch.ones_like(y).cumsum(0))
            results.append((y.detach(), nodes.grad))
        torch.testing.assert_close(results[0], results[1])
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["InstanceNorm", "GraphNorm"])
def test_compiled_with_fullgraph_a_wide_twin_without_a_batch_size_checks_no_made_up_graph_count(name):
    """The same compile on 512 channels: the count read from the ids has no value while
    tracing, and the fake kernel checked the size of the statistics with torch's made-up
    hint for it (8193 graphs), refusing 7 nodes as "statistics would hold 4194816 values"."""
    from torch._dynamo.testing import CompileCounter

    ours, theirs = getattr(geometric, name)(512), getattr(pyg_norm, name)(512)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(8)
    for nodes, graphs in ((7, 2), (9, 3)):
        x, batch = torch.randn(nodes, 512, generator=g), torch.arange(nodes) % graphs
        torch.testing.assert_close(compiled(x, batch), theirs(x, batch))
    assert counter.frame_count == 1


def test_a_model_of_twins_exports_with_a_dynamic_graph_count_as_pygs_does():
    """torch.export with the number of graphs (``batch_size``) as ``Dim.DYNAMIC`` beside a
    dynamic node count, as PyG's layers export; the twins read it with int(), which
    specialized it ("You marked L['size'] as dynamic but your code specialized it")."""
    class Model(torch.nn.Module):
        def __init__(self, norms):
            super().__init__()
            self.instance, self.layer, self.graph_norm = norms.InstanceNorm(5), norms.LayerNorm(5), norms.GraphNorm(5)

        def forward(self, x, batch, size: int):
            return self.graph_norm(self.layer(self.instance(x, batch, size), batch, size), batch, size)

    ours, theirs = Model(geometric).double().eval(), Model(pyg_norm).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    x, batch = _graphs(seed=3)
    nodes = torch.export.Dim("nodes", min=2)
    exported = torch.export.export(ours, (x, batch, 6),
                                   dynamic_shapes=({0: nodes}, {0: nodes}, torch.export.Dim.DYNAMIC)).module()
    more, ids = _more_graphs()
    for inputs in ((x, batch, 6), (more, ids, 9)):
        torch.testing.assert_close(exported(*inputs), theirs(*inputs))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_traced_model_of_twins_saves_loads_and_freezes_with_pygs_outputs_at_another_node_count():
    """torch.jit.trace, then torch.jit.save and load, and torch.jit.freeze in evaluation, as
    PyG's own layers trace; the traced graph held a Python call into the kernels, which
    torch.jit.save refused ("Could not export Python function call '_Eager'")."""
    ours, theirs = _Model(geometric).double(), _Model(pyg_norm).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    x, batch = _graphs(seed=3)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(ours, (x, batch)), buffer)
    loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    frozen = torch.jit.freeze(torch.jit.trace(ours.eval(), (x, batch)))
    for inputs in ((x, batch), _more_graphs()):
        torch.testing.assert_close(loaded(*inputs), theirs(*inputs))
        torch.testing.assert_close(frozen(*inputs), theirs(*inputs))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_a_model_of_twins_exports_to_onnx_and_onnxruntime_gives_pygs_outputs_at_another_node_count(dynamo, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    skip_without_dynamo_exporter(dynamo)
    ours, theirs = _Model(geometric).eval(), _Model(pyg_norm).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    x, batch = _graphs(seed=3)
    path = str(tmp_path / "model.onnx")
    dynamic = (dict(dynamic_shapes=({0: torch.export.Dim("nodes", min=2)},) * 2) if dynamo else
               dict(dynamic_axes={"x": {0: "nodes"}, "batch": {0: "nodes"}}))
    torch.onnx.export(ours, (x.float(), batch), path, dynamo=dynamo, input_names=["x", "batch"], **dynamic)
    session = onnxruntime.InferenceSession(path)
    for nodes, ids in ((x, batch), _more_graphs()):
        (got,) = session.run(None, {"x": nodes.float().numpy(), "batch": ids.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), theirs(nodes.float(), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_fx_traces_a_model_holding_a_twin_into_one_leaf_call_with_pygs_outputs(name):
    """PyG's layers trace through their scatter code; a twin is one ``call_module`` leaf
    (with its batch vector and size), and the traced model gives PyG's outputs and buffers."""
    class Model(torch.nn.Module):
        def __init__(self, norms):
            super().__init__()
            self.lin, self.norm = torch.nn.Linear(5, 5), _LAYERS[name](norms)

        def forward(self, x, batch):
            return self.norm(self.lin(x), batch, 6)

    ours, theirs = Model(geometric).double(), Model(pyg_norm).double()
    theirs.load_state_dict(ours.state_dict())
    traced = torch.fx.symbolic_trace(ours)
    assert [node.target for node in traced.graph.nodes if node.op == "call_module"] == ["lin", "norm"]
    x, batch = _graphs(seed=5)
    for train in (True, False):
        traced.train(train)
        theirs.train(train)
        torch.testing.assert_close(traced(x, batch), theirs(x, batch))
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(traced.state_dict()[key], value.detach(), msg=key)


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_fx_traces_a_twin_as_the_root_module_through_pygs_definitions_with_pygs_outputs(name):
    ours, theirs = _randomized_pair(name)
    x, batch = _graphs(seed=6)
    for train in (True, False):  # fx records the mode's branch, as it does in PyG's layers
        ours.train(train)
        theirs.train(train)
        try:
            torch.fx.symbolic_trace(copy.deepcopy(theirs))  # (PyG assigns proxies to its buffers while traced)
        except Exception as error:  # PyG's evaluation with running statistics does not trace: nor does the twin
            with pytest.raises(type(error)):
                torch.fx.symbolic_trace(ours)
            continue
        traced = torch.fx.symbolic_trace(ours)  # takes the batch vector and size, as PyG's traced graph does
        torch.testing.assert_close(traced(x, batch, 6), theirs(x, batch, 6))
        expected = theirs.state_dict()  # (PyG's own traced graph keeps running statistics as constants)
        for key, value in traced.state_dict().items():  # the buffers the graph reads: num_batches_tracked is not
            torch.testing.assert_close(value, expected[key].detach(), msg=key)


@pytest.mark.parametrize("norm, kwargs", [("instance_norm", dict(affine=True, track_running_stats=True)),
                                          ("layer_norm", {}), ("layer_norm", dict(mode="node")), ("graph_norm", {})],
                         ids=["instance", "layer_graph", "layer_node", "graph"])
def test_convert_turns_a_pyg_models_norms_into_twins_that_train_as_pygs(norm, kwargs):
    """PyG's GIN built with ``norm="..."`` holds PyG's own classes: ``normlab.torch.convert``
    replaces each with its twin, without a warning, keeping the Parameter objects (an
    optimizer built before keeps training the model), and SGD steps on batches with graphs of
    one and of no nodes give the unconverted model's outputs, parameters and running statistics."""
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn.models import GIN

    import normlab.torch as nt

    torch.manual_seed(0)
    theirs = GIN(5, 8, 2, out_channels=3, norm=norm, norm_kwargs=kwargs).double()
    ours = copy.deepcopy(theirs)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.05) for model in (ours, theirs)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nt.convert(ours) is ours
    assert {type(m) for m in ours.norms[:-1]} == {getattr(geometric, type(theirs.norms[0]).__name__)}
    g = torch.Generator().manual_seed(1)
    for sizes in ((5, 1, 9, 0), (3, 1, 1)):
        data = Batch.from_data_list([Data(x=torch.randn(n, 5, generator=g, dtype=torch.float64) * 2 + 1,
                                          edge_index=torch.randint(0, max(n, 1), (2, 2 * n), generator=g))
                                     for n in sizes])
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            y = model(data.x, data.edge_index, batch=data.batch, batch_size=data.num_graphs)
            y.pow(2).mean().backward()
            optimizer.step()
            model.y = y
        torch.testing.assert_close(ours.y, theirs.y)
        for key, value in theirs.state_dict().items():  # parameters after the step, running statistics
            torch.testing.assert_close(ours.state_dict()[key], value.detach(), msg=key)


def test_convert_takes_a_pyg_model_with_lazy_input_channels_and_it_computes_as_the_original():
    """``GraphSAGE(-1, ...)`` (and ``GCN``, ``GAT``: PyG's lazy ``Linear(-1, ...)``, as
    ``to_hetero`` models are built) holds parameters whose shape its first forward infers:
    convert raised torch's "Can't access the shape of an uninitialized parameter" from the
    layer-norm probe of each such Linear. Their norms are now converted, the Linears left
    for their first forward, which gives the original's outputs."""
    from torch_geometric.nn.models import GraphSAGE

    import normlab.torch as nt

    torch.manual_seed(0)
    theirs = GraphSAGE(-1, 8, 2, out_channels=3, norm="graph_norm")
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nt.convert(ours) is ours
    assert type(ours.norms[0]) is geometric.GraphNorm
    x, batch = _graphs(seed=6)
    edges = torch.randint(0, 12, (2, 24), generator=torch.Generator().manual_seed(6))
    outputs = []
    for model in (ours, theirs):
        torch.manual_seed(1)  # (the lazy Linears draw their initial weights at the first call)
        outputs.append(model(x.float(), edges, batch=batch, batch_size=6))
    torch.testing.assert_close(*outputs)


def test_instance_norm_twin_in_evaluation_refuses_a_bad_batch_vector_as_in_training():
    """With running statistics in evaluation the twin needs no ids, but PyG's InstanceNorm
    still indexes with them and refuses a bad batch vector (shorter, negative, out of range,
    two-dimensional, float): the twin refuses each with the errors it raises in training."""
    x, batch = _graphs(seed=7)
    ours = geometric.InstanceNorm(5, affine=True, track_running_stats=True).double().eval()
    theirs = pyg_norm.InstanceNorm(5, affine=True, track_running_stats=True).double().eval()
    bad = {"shorter": (batch[:-1], None), "negative id": (batch - 1, None), "id >= batch_size": (batch, 4),
           "two-dimensional": (batch[:, None], None)}
    for what, call in bad.items():
        with pytest.raises((RuntimeError, IndexError)):
            theirs(x, *call)
        with pytest.raises(RuntimeError, match=r"input shape \(12, 5\)") as caught:
            ours(x, *call)
        assert isinstance(caught.value, ValueError), what
    with pytest.raises(RuntimeError):
        theirs(x, batch.double())
    with pytest.raises(TypeError, match="integer tensor"):
        ours(x, batch.double())
    torch.testing.assert_close(ours(x, batch, 6), theirs(x, batch, 6))


def test_instance_norm_twin_without_a_batch_vector_on_no_nodes_keeps_its_running_statistics_as_pyg_does():
    """No nodes and no batch vector in training (PyG's F.instance_norm on (1, C, 0)): an
    empty output and running statistics left as they are, where the twin decayed them by
    the momentum toward a variance of 0."""
    theirs = pyg_norm.InstanceNorm(4, affine=True, track_running_stats=True)
    ours = geometric.InstanceNorm(4, affine=True, track_running_stats=True)
    with torch.no_grad():
        for tensor in (*theirs.parameters(), theirs.running_mean, theirs.running_var):
            tensor.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(0, 4)
    y, expected = ours(x), theirs(x)
    assert y.shape == expected.shape == (0, 4) and y.dtype == expected.dtype
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_shape_propagation_under_fake_tensor_mode_gives_pygs_output_and_gradient_metadata(name, training):
    """FakeTensorMode (shape propagation) through each twin, with a batch vector (and its
    size: PyG's layers read the largest id otherwise) and without: the output and the node
    gradient have PyG's type, shape and dtype, where GraphNorm, and InstanceNorm in
    evaluation, read the ids' values (none to read) and raised. (Without a batch vector PyG's
    InstanceNorm in training returns a transposed view; the twin a contiguous tensor.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, batch = _graphs(seed=8)
    for args in ((batch, 6), ()):
        found = []
        for layer in _randomized_pair(name):
            layer.train(training)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                nodes = mode.from_tensor(x).requires_grad_()
                y = layer(nodes, *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
                y.sum().backward()
            found.append((type(y), y.shape, y.dtype, nodes.grad.shape))
        assert found[0] == found[1], args


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_compiled_with_dynamic_shapes_a_twin_is_one_graph_across_graph_counts_as_pygs_layer_is(name):
    """torch.compile(dynamic=True) with batches of 3, 4 and 5 graphs (PyG's DataLoader's
    ``batch_size=`` varies, at the last batch): one graph, as PyG's own layer compiles,
    and PyG's outputs and node gradients; the masked op's fake kernel read the number of
    graphs as an int, so each new count recompiled (past eight, torch runs it eagerly)."""
    from torch._dynamo.testing import CompileCounter

    ours, theirs = _randomized_pair(name)

    class Holder(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x, batch, size: int):
            return self.norm(x, batch, size)

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(Holder(ours), backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    for graphs in (3, 4, 5):
        x = torch.randn(4 * graphs, 5, generator=g, dtype=torch.float64)
        batch = torch.randint(0, graphs, (4 * graphs,), generator=g).sort().values
        grads = []
        for layer in (compiled, theirs):
            nodes = x.clone().requires_grad_()
            y = layer(nodes, batch, graphs)
            y.backward(torch.ones_like(y).cumsum(0))
            grads.append((y.detach(), nodes.grad))
        torch.testing.assert_close(grads[0], grads[1])
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_a_compiled_twin_is_not_compiled_again_after_an_import_as_pygs_layer_is_not(name):
    """A module imported between two calls of a compiled model (the first backward imports
    some, a user's code others) left PyG's compiled layer as it was but compiled the twin
    again: Dynamo guarded the number of modules in ``sys.modules``, which the twin's check
    for an ONNX export read."""
    import sys
    import types

    from torch._dynamo.testing import CompileCounter

    x, batch = _graphs(seed=8)
    counts = []
    for layer in _randomized_pair(name):
        counter = CompileCounter()
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend=counter, dynamic=True)
        compiled(x, batch, 6)
        name_ = f"_normlab_module_imported_between_calls_{len(counts)}"
        sys.modules[name_] = types.ModuleType(name_)
        try:
            compiled(x, batch, 6)
        finally:
            del sys.modules[name_]
        counts.append(counter.frame_count)
    assert counts[0] == counts[1] == 1


@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm", "graph_layer_norm", "instance_norm", "graph_norm"])
def test_a_reversible_gnn_of_converted_norms_trains_as_pygs_which_frees_and_refills_its_activations(norm):
    """PyG's reversible GNN (``GroupAddRev``, its ``rev_gnn`` example: norm, ReLU, conv per
    group) frees each layer's input and output with ``untyped_storage().resize_(0)`` and
    refills them in backward. A twin read its input through ``Tensor.numpy()``, which marks
    the storage non-resizable for good, so the backward of the converted model raised
    "Trying to resize storage that is not resizable" (the torch.nn LayerNorm of PyG's
    example); it now gives the unconverted model's output, gradients and running statistics."""
    from torch_geometric.nn import GroupAddRev, SAGEConv

    import normlab.torch as nt

    make = {"layer_norm": lambda: torch.nn.LayerNorm(4), "batch_norm": lambda: torch.nn.BatchNorm1d(4),
            "graph_layer_norm": lambda: pyg_norm.LayerNorm(4),
            "instance_norm": lambda: pyg_norm.InstanceNorm(4, affine=True, track_running_stats=True),
            "graph_norm": lambda: pyg_norm.GraphNorm(4)}[norm]

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.conv = make(), SAGEConv(4, 4)

        def reset_parameters(self):
            self.conv.reset_parameters()

        def forward(self, x, edge_index, batch):
            x = self.norm(x) if norm in ("layer_norm", "batch_norm") else self.norm(x, batch)
            return self.conv(x.relu(), edge_index)

    torch.manual_seed(0)
    theirs = torch.nn.ModuleList(GroupAddRev(Block(), num_groups=2) for _ in range(2)).double()
    ours = copy.deepcopy(theirs)
    nt.convert(ours)
    g = torch.Generator().manual_seed(9)
    batch = torch.randint(0, 40, (600,), generator=g).sort().values  # (large enough for the kernels' paths)
    x = torch.randn(600, 8, generator=g, dtype=torch.float64) * 2 + 1  # 8 channels: two groups of 4
    edges = torch.randint(0, 600, (2, 1800), generator=g)
    results = []
    for model in (ours, theirs):
        nodes = x.clone().requires_grad_()
        h = nodes
        for layer in model:
            h = layer(h, edges, batch)
        out = h.detach().clone()  # (its memory is freed in backward)
        try:
            h.pow(2).sum().backward()
        except RuntimeError as error:  # (a long traceback would show tensors whose memory is freed)
            pytest.fail(f"{type(error).__name__}: {error}", pytrace=False)
        results.append((out, nodes.grad, [p.grad for p in model.parameters()],
                        {k: v.detach() for k, v in model.state_dict().items()}))
    (y, grad, grads, state), (y_ref, grad_ref, grads_ref, state_ref) = results
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad, grad_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    for key, value in state_ref.items():
        torch.testing.assert_close(state[key], value, msg=key)


@pytest.mark.parametrize("record", ["script", "trace"])
@pytest.mark.parametrize("name", ["instance", "layer_graph", "graph"])
def test_a_scripted_or_traced_twin_on_an_int32_batch_vector_gives_the_gradients_of_int64_ids(name, record):
    """The eager twins take int32 batch vectors (PyG's loaders can be told to give them);
    their TorchScript forwards, which TorchScript and jit.trace record, scatter as PyG does,
    and torch's scatter_add differentiates int32 ids to zero gradients: the scripted or
    traced twin gave x gradients without the statistics' terms (PyG's own layers do the
    same). They are now those of PyG's layers on int64 ids."""
    ours, theirs = _randomized_pair(name)
    x, batch = _graphs(seed=10)
    ids = batch.int()
    if record == "script":
        recorded = torch.jit.script(ours)
    else:
        recorded = torch.jit.trace(ours, (x, ids), check_trace=False)
    grads = []
    for module, vector in ((recorded, ids), (theirs, batch)):
        nodes = x.clone().requires_grad_()
        y = module(nodes, vector)
        (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        grads.append(nodes.grad)
    torch.testing.assert_close(*grads)
