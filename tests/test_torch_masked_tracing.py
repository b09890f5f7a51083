"""``mask=`` through the graph tools torch users put models in: ``torch.fx`` records each
twin as one leaf call that keeps its mask, ``torch.export`` traces a training step (the
counted-values check is data-dependent, so it stays eager-only), and ``torch.jit.script``
compiles ConvNeXt's LayerNorm2d twin as torchvision's original does (mirrored from source
in tests/mirrored_norms.py) and refuses a mask (it compiles torch.nn's forward, which has
none) rather than ignore it. The eager masked results are themselves checked against torch
on unpadded data in test_torch_masked_padding.py."""

import copy
import re
import warnings

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import TorchvisionLayerNorm2d  # noqa: E402
from tests.prerequisites import skip_without_dynamo_exporter  # noqa: E402

_MAKERS = {
    "BatchNorm2d": lambda: nt.BatchNorm2d(3),
    "InstanceNorm2d": lambda: nt.InstanceNorm2d(3, affine=True, track_running_stats=True),
    "GroupNorm": lambda: nt.GroupNorm(1, 3),
    "LayerNorm2d": lambda: nt.LayerNorm2d(3),
    "SyncBatchNorm": lambda: nt.SyncBatchNorm(3),
    "Norm": lambda: nt.Norm("[b] c [h w]", params="c", c=3, track_running_stats=True),
}


class _Masked(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 3, 1), make()

    def forward(self, x, mask):
        return self.norm(self.conv(x), mask=mask)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 5, 5, generator=g), torch.rand(4, 1, 5, 5, generator=g) < 0.7


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_fx_records_the_masked_twin_as_one_leaf_call_that_keeps_its_mask(name):
    model = _Masked(_MAKERS[name])
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    calls = [node for node in traced.graph.nodes if node.op == "call_module" and node.target == "norm"]
    assert len(calls) == 1 and "mask" in calls[0].kwargs
    x, mask = _inputs()
    torch.testing.assert_close(traced(x, mask), model(x, mask))
    torch.testing.assert_close(traced.state_dict(), model.state_dict())


@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "Norm"])
def test_export_traces_a_masked_training_step_with_dynamic_batch_and_width(name):
    """Exported on one batch size and width, run on another: the graph stays dynamic."""
    model = _Masked(_MAKERS[name])
    x, mask = _inputs(1)
    batch, width = torch.export.Dim("batch", min=2), torch.export.Dim("width", min=2)
    dynamic = ({0: batch, 3: width}, {0: batch, 3: width})
    exported = torch.export.export(copy.deepcopy(model), (x, mask), dynamic_shapes=dynamic).module()
    g = torch.Generator().manual_seed(3)
    other, other_mask = torch.randn(6, 3, 5, 8, generator=g), torch.rand(6, 1, 5, 8, generator=g) < 0.7
    for inputs in ((x, mask), (other, other_mask)):
        torch.testing.assert_close(exported(*inputs), model(*inputs))
        for key, value in model.state_dict().items():
            torch.testing.assert_close(exported.state_dict()[key], value, msg=key)



class _SegmentedMasked(torch.nn.Module):
    def forward(self, x, mask, ids):
        from normlab.torch.masked import normalize_masked

        return normalize_masked(x, "b c [t]", mask=mask, segment_ids=ids, num_segments=2).y


def test_export_refuses_a_mask_or_ids_that_do_not_fit_while_tracing_in_eagers_words():
    """The op's fake kernel took any mask and ids: torch.export recorded a mask of shape
    (3, 7, 1) for input (3, 4, 7), or 5 ids for 7 positions, and the program failed on its
    first run with a ShapeError that ``except RuntimeError`` missed (eager raises one it catches)."""
    x, mask, ids = torch.randn(3, 4, 7), torch.ones(3, 1, 7, dtype=torch.bool), torch.zeros(7, dtype=torch.long)
    for inputs in ((x, torch.ones(3, 7, 1, dtype=torch.bool), ids), (x, mask, torch.zeros(5, dtype=torch.long))):
        with pytest.raises(RuntimeError) as eager:
            _SegmentedMasked()(*inputs)
        with pytest.raises(RuntimeError, match=re.escape(str(eager.value))):
            torch.export.export(_SegmentedMasked(), inputs)
    # ids beyond num_segments: only the values tell, so the compiled graph's run refuses, as eager does
    beyond = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(RuntimeError) as eager:
        _SegmentedMasked()(x, mask, beyond)
    compiled = torch.compile(_SegmentedMasked(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, mask, ids), _SegmentedMasked()(x, mask, ids))
    with pytest.raises(RuntimeError, match=re.escape(str(eager.value))):
        compiled(x, mask, beyond)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_jit_trace_refuses_a_mask_that_does_not_fit_in_eagers_words(name):
    # under torch.jit.trace the sizes are traced tensors: the message gave "input shape
    # (tensor(4), tensor(3), ...)" where eager gives "(4, 3, ...)"
    x, mask = torch.randn(4, 3, 5, 5), torch.ones(4, 1, 6, 5, dtype=torch.bool)
    with pytest.raises(ValueError) as eager:
        _Masked(_MAKERS[name])(x, mask)
    with pytest.raises(ValueError) as traced:
        torch.jit.trace(_Masked(_MAKERS[name]), (x, mask), check_trace=False)
    assert str(traced.value) == str(eager.value) and "(4, 3, 5, 5)" in str(eager.value)


class _Speech(torch.nn.Module):
    """A padded speech encoder's norms, the mask made from the lengths inside the model
    (each utterance longer than one frame: the instance norm, as torch.nn's, refuses one)."""

    def __init__(self):
        super().__init__()
        self.batch, self.group = nt.BatchNorm1d(4), nt.GroupNorm(2, 4)
        self.instance, self.layer = nt.InstanceNorm1d(4, affine=True), nt.LayerNorm(4)

    def forward(self, x, lengths):
        mask = torch.arange(x.shape[-1]) < lengths[:, None]
        positions = mask[:, None, :]
        h = self.instance(self.group(self.batch(x, mask=positions), mask=positions), mask=positions)
        return self.layer(h.transpose(1, 2), mask=mask[:, :, None])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_jit_trace_records_a_masked_training_step_that_runs_at_another_batch_and_length():
    """The masked batch norms update their running statistics inside their op's forward
    (so that checkpointing recomputes the update): traced in training they raised
    "unordered_map::at", as torch.jit.trace cannot record operations there."""
    g = torch.Generator().manual_seed(6)
    model = _Speech().train()
    reference = copy.deepcopy(model)
    x, lengths = torch.randn(2, 4, 7, generator=g), torch.tensor([7, 3])
    traced = torch.jit.trace(model, (x, lengths), check_trace=False)
    reference(x, lengths)  # (tracing ran one step)
    other = torch.randn(3, 4, 11, generator=g), torch.tensor([11, 2, 6])
    torch.testing.assert_close(traced(*other), reference(*other))
    torch.testing.assert_close(dict(traced.state_dict()), reference.state_dict())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_traced_masked_model_saves_loads_and_runs_at_another_batch_and_length(training, tmp_path):
    """torch.jit.trace recorded each mask= as a Python call into the kernels (warning that
    converting a tensor to a NumPy array might make the trace incorrect), so torch.jit.save
    refused the traced model: "Could not export Python function call '_Eager'"."""
    g = torch.Generator().manual_seed(10)
    model = _Speech().train(training)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(generator=g)
        model.batch.running_var.uniform_(0.5, 2, generator=g)
    x, lengths = torch.randn(2, 4, 7, generator=g), torch.tensor([7, 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(copy.deepcopy(model), (x, lengths), check_trace=False)
    assert not [w for w in caught if "NumPy" in str(w.message)]
    torch.jit.save(traced, str(tmp_path / "speech.pt"))
    loaded = torch.jit.load(str(tmp_path / "speech.pt"))
    model(x, lengths)  # (tracing ran one step)
    other = torch.randn(3, 4, 11, generator=g), torch.tensor([11, 2, 6])
    torch.testing.assert_close(loaded(*other), model(*other))
    torch.testing.assert_close(dict(loaded.state_dict()), model.state_dict())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["BatchNorm1d", "Norm", "Norm without a mask"])
def test_a_traced_masked_batch_norm_counts_each_batch_it_runs_as_torch_nns_traced_batch_norm_does(name):
    """The masked path (and Norm's) counted the batch in num_batches_tracked through NumPy,
    which torch.jit.trace does not record: the traced model stayed at its tracing's count."""
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nt.BatchNorm1d(4) if name == "BatchNorm1d" else nt.Norm("[b] c [t]", "c", c=4,
                                                                                 track_running_stats=True)

        def forward(self, x, mask):
            return self.norm(x) if name == "Norm without a mask" else self.norm(x, mask=mask)

    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(3, 1, 5, dtype=torch.bool)
    ours = torch.jit.trace(Masked(), (x, mask), check_trace=False)
    theirs = torch.jit.trace(torch.nn.BatchNorm1d(4), (x,), check_trace=False)
    for _ in range(2):
        ours(x, mask)
        theirs(x)
    assert int(ours.norm.num_batches_tracked) == int(theirs.num_batches_tracked) == 3


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_a_masked_model_exports_to_onnx_and_onnxruntime_gives_its_outputs_at_another_batch_and_length(dynamo,
                                                                                                    tmp_path):
    """mask= failed to export (the TorchScript exporter: "Couldn't export operator
    aten::lift_fresh"; dynamo: a ConversionError on the normlab op ONNX does not have)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    skip_without_dynamo_exporter(dynamo)
    model = _Speech().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        model.batch.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(4)
    x, lengths = torch.randn(2, 4, 7, generator=g), torch.tensor([7, 3])
    path = str(tmp_path / "masked.onnx")
    dynamic = (dict(dynamic_shapes=({0: torch.export.Dim("b", min=2), 2: torch.export.Dim("t", min=2)},
                                    {0: torch.export.Dim("b", min=2)})) if dynamo else
               dict(dynamic_axes={"x": {0: "b", 2: "t"}, "lengths": {0: "b"}}))
    torch.onnx.export(model, (x, lengths), path, dynamo=dynamo, input_names=["x", "lengths"], **dynamic)
    session = onnxruntime.InferenceSession(path)
    for inputs in ((x, lengths), (torch.randn(3, 4, 11, generator=g), torch.tensor([11, 2, 6]))):
        (got,) = session.run(None, {"x": inputs[0].numpy(), "lengths": inputs[1].numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(*inputs), rtol=1e-5, atol=1e-5)

def test_scripted_layer_norm_2d_twin_equals_torchvisions_scripted_original():
    ours, theirs = nt.LayerNorm2d(3), TorchvisionLayerNorm2d(3, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still used
        scripted, reference = torch.jit.script(ours), torch.jit.script(theirs)
    x, _ = _inputs(2)
    torch.testing.assert_close(scripted(x), reference(x))
    torch.testing.assert_close(scripted(x), ours(x))


_SCRIPTABLE = {
    "BatchNorm2d": (lambda: nt.BatchNorm2d(3), lambda: torch.nn.BatchNorm2d(3)),
    "InstanceNorm2d": (lambda: nt.InstanceNorm2d(3, affine=True), lambda: torch.nn.InstanceNorm2d(3, affine=True)),
    "GroupNorm": (lambda: nt.GroupNorm(1, 3), lambda: torch.nn.GroupNorm(1, 3)),
    "LayerNorm": (lambda: nt.LayerNorm([5, 5]), lambda: torch.nn.LayerNorm([5, 5])),
    "RMSNorm": (lambda: nt.RMSNorm([5]), lambda: torch.nn.RMSNorm([5])),
    "LayerNorm2d": (lambda: nt.LayerNorm2d(3), lambda: TorchvisionLayerNorm2d(3, eps=1e-6)),
}


@pytest.mark.parametrize("name", sorted(_SCRIPTABLE))
def test_a_scripted_twin_refuses_a_mask_instead_of_counting_every_element(name):
    ours, theirs = (make() for make in _SCRIPTABLE[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still used
        scripted, reference = torch.jit.script(ours), torch.jit.script(theirs)
    x, mask = _inputs(4)
    torch.testing.assert_close(scripted(x), reference(x))  # without a mask: torch.nn's forward
    with pytest.raises(torch.jit.Error, match="mask= does not run under torch.jit.script"):
        scripted(x, mask)


@pytest.mark.parametrize("grouping", ["mask", "segment_ids"])
def test_inductor_compiled_masked_norm_gives_eager_gradients_with_params_in_another_order(grouping):
    """params="w c" spans (w, c) of a "b c [h w]" input: the engine's weight and bias
    gradients come back transposed, where the masked backward op's fake kernel states
    contiguous ones, and Inductor asserted it ("expected size 4==4, stride 1==6 at dim=0")."""
    g = torch.Generator().manual_seed(7)
    norm = nt.Norm("b c [h w]", params="w c", c=3, w=4)
    x = torch.randn(2, 3, 2, 4, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 3, 2, 4, generator=g)
    keywords = ({"mask": torch.rand(2, 1, 2, 4, generator=g) > 0.3} if grouping == "mask"
                else {"segment_ids": torch.tensor([0, 1]), "num_segments": 2, "segment_axis": "h"})
    inputs = (x, norm.weight, norm.bias)
    expected = torch.autograd.grad(norm(x, **keywords), inputs, grad_y)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: norm(x, **keywords), fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(x), inputs, grad_y), expected)


@pytest.mark.parametrize("call", ["normalize_masked", "Norm"])
def test_compiled_with_fullgraph_segment_ids_without_their_count_are_one_graph(call):
    """torch.compile(fullgraph=True, dynamic=True) with ``segment_ids`` and no
    ``num_segments`` (read from the ids, max + 1), on 2, 3 and 4 segments: one graph and the
    eager outputs; the check for ids batched by vmap, a call Dynamo cannot trace, refused the
    graph ("Attempted to call function marked as skipped")."""
    from torch._dynamo.testing import CompileCounter

    from normlab.torch.masked import normalize_masked

    norm = nt.Norm("[n] c")

    def function(x, ids):
        return normalize_masked(x, "[n] c", segment_ids=ids).y if call == "normalize_masked" else norm(
            x, segment_ids=ids)

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(function, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(8)
    for segments in (2, 3, 4):
        x = torch.randn(3 * segments, 5, generator=g, dtype=torch.float64)
        ids = torch.arange(3 * segments) % segments
        torch.testing.assert_close(compiled(x, ids), function(x, ids))
    assert counter.frame_count == 1


def _segment_norm_loop(x, ids, weight, bias, eps=1e-5):
    """``"[n] c"`` with segment ids (each graph's nodes, per channel, as PyG's InstanceNorm),
    in a Python loop over the segments."""
    y = torch.empty_like(x)
    for s in ids.unique():
        rows = ids == s
        part = x[rows]
        y[rows] = (part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + eps) * weight + bias
    return y


class _Segmented(torch.nn.Module):
    def __init__(self, track_running_stats: bool):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4, dtype=torch.float64)
        self.norm = nt.Norm("[n] c", params="c", c=4, track_running_stats=track_running_stats, dtype=torch.float64)

    def forward(self, x, ids):
        return self.norm(self.linear(x), segment_ids=ids)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("track_running_stats", [False, True], ids=["batch_statistics", "running_statistics"])
def test_a_traced_model_with_segment_ids_saves_loads_and_freezes_with_the_loops_outputs_at_other_counts(
        track_running_stats, tmp_path):
    """torch.jit.trace recorded Norm's segment_ids= (and normalize_masked's) as a Python
    call into the kernels, which the traced graph ran but torch.jit.save and torch.jit.freeze
    refused ("Could not export Python function call '_Eager'"); it now records torch
    operations that take another number of nodes and of segments, as PyG's traced layers do."""
    g = torch.Generator().manual_seed(11)
    model = _Segmented(track_running_stats).train()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5, generator=g)
        model.norm.bias.normal_(generator=g)
    x, ids = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    traced = torch.jit.trace(copy.deepcopy(model), (x, ids), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "segments.pt"))
    loaded = torch.jit.load(str(tmp_path / "segments.pt"))
    with torch.no_grad():
        running = [model.norm.running_mean.clone(), model.norm.running_var.clone()] if track_running_stats else None
        if running is not None:  # (the trace ran one step: torch's update, by hand, over the segments' means)
            h = model.linear(x)
            means = torch.stack([h[ids == s].mean(0) for s in range(3)])
            variances = torch.stack([h[ids == s].var(0) for s in range(3)])
            running = [0.9 * running[0] + 0.1 * means.mean(0), 0.9 * running[1] + 0.1 * variances.mean(0)]
    for count, nodes in ((3, 7), (5, 12), (2, 9)):
        x = torch.randn(nodes, 3, generator=g, dtype=torch.float64, requires_grad=True)
        ids = torch.sort(torch.cat([torch.arange(count).repeat(2),  # (two nodes at least: torch's rule in training)
                                    torch.randint(count, (nodes - 2 * count,), generator=g)]))[0]
        y = loaded(x, ids)
        h = model.linear(x)
        expected = _segment_norm_loop(h, ids, model.norm.weight, model.norm.bias)
        torch.testing.assert_close(y, expected)
        grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(y, x, grad_y)[0], torch.autograd.grad(expected, x, grad_y)[0])
        if running is not None:
            with torch.no_grad():
                means = torch.stack([h[ids == s].mean(0) for s in range(count)])
                variances = torch.stack([h[ids == s].var(0) for s in range(count)])
                running = [0.9 * running[0] + 0.1 * means.mean(0), 0.9 * running[1] + 0.1 * variances.mean(0)]
            torch.testing.assert_close(loaded.norm.running_mean, running[0])
            torch.testing.assert_close(loaded.norm.running_var, running[1])
    if not track_running_stats:  # (in evaluation the running statistics normalize, with no segments)
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model).eval(), (x, ids), check_trace=False))
        x, ids = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
        with torch.no_grad():
            expected = _segment_norm_loop(model.linear(x), ids, model.norm.weight, model.norm.bias)
        torch.testing.assert_close(frozen(x, ids), expected)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_a_traced_normalize_masked_with_segment_ids_saves_and_runs_at_another_length_and_count(tmp_path):
    """The functional form, segments along a reduced axis of several, with a mask: torch's
    reductions over each segment's counted elements, in a loop, are the oracle."""
    from normlab.torch.masked import normalize_masked

    def segmented(x, ids, mask):
        return normalize_masked(x, "b [t] c", segment_ids=ids, mask=mask).y

    def loop(x, ids, mask):
        y = torch.empty_like(x)
        for s in ids.unique():
            part, counted = x[:, ids == s], mask[:, ids == s].expand(-1, -1, x.shape[2])
            count = counted.sum(1, keepdim=True)
            mean = torch.where(counted, part, 0).sum(1, keepdim=True) / count
            var = torch.where(counted, (part - mean) ** 2, 0).sum(1, keepdim=True) / count
            y[:, ids == s] = (part - mean) / torch.sqrt(var + 1e-5)
        return y

    g = torch.Generator().manual_seed(12)

    def inputs(batch, length, count):
        ids = torch.sort(torch.cat([torch.arange(count), torch.randint(count, (length - count,), generator=g)]))[0]
        mask = torch.rand(batch, length, 1, generator=g) < 0.8
        mask[:, torch.searchsorted(ids, torch.arange(count))] = True  # (each segment's first element counts)
        return torch.randn(batch, length, 3, generator=g, dtype=torch.float64), ids, mask

    example = inputs(2, 8, 3)
    torch.jit.save(torch.jit.trace(segmented, example, check_trace=False), str(tmp_path / "segmented.pt"))
    loaded = torch.jit.load(str(tmp_path / "segmented.pt"))
    for batch, length, count in ((2, 8, 3), (3, 13, 5), (1, 6, 2)):
        x, ids, mask = inputs(batch, length, count)
        torch.testing.assert_close(loaded(x, ids, mask), loop(x, ids, mask))


# (a twin, an input, a mask of the wrong shape or type, or an input of the wrong channels beside a mask)
_MISFIT_MASKS = [
    ("LayerNorm, a mask of other positions", lambda: nt.LayerNorm(8), (2, 5, 8), (2, 4, 1), torch.bool),
    ("BatchNorm2d, a mask of other positions", lambda: nt.BatchNorm2d(4), (2, 4, 3, 3), (2, 4, 2, 3), torch.bool),
    ("Norm, a mask with an axis more", lambda: nt.Norm("b t [d]", d=8), (2, 5, 8), (3, 2, 5, 1), torch.bool),
    ("GroupNorm, 4 channels of 8", lambda: nt.GroupNorm(2, 8), (2, 4, 3), (2, 4, 3), torch.bool),
    ("InstanceNorm1d, 4 channels of 8", lambda: nt.InstanceNorm1d(8, affine=True), (2, 4, 3), (2, 4, 3), torch.bool),
    ("BatchNorm2d, 4 channels of 8", lambda: nt.BatchNorm2d(8), (2, 4, 3, 3), (2, 1, 3, 3), torch.bool),
    ("LayerNorm, 4 features of 8", lambda: nt.LayerNorm(8), (2, 5, 4), (2, 5, 1), torch.bool),
    ("LayerNorm, a float mask", lambda: nt.LayerNorm(8), (2, 5, 8), (2, 5, 1), torch.float32),
]


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("name, make, shape, mask_shape, dtype", _MISFIT_MASKS, ids=[c[0] for c in _MISFIT_MASKS])
def test_a_misfit_mask_compiled_with_fullgraph_raises_what_torch_compile_raises_for_torch_nns_refusal_with_the_message(
        name, make, shape, mask_shape, dtype, dynamic):
    """A mask that does not fit, under ``torch.compile(dynamic=True, fullgraph=True)``, gave
    Dynamo's "Unsupported: missing sq_concat" (it could not add the message's formatted
    strings), where eager gives the twin's error naming both shapes; and the channel misfits
    beside a mask named the sizes as Dynamo's symbols ("(s31, s64, 1)"). Compiled, the error
    is now the one torch.compile raises for torch.nn's own refusal in Python (a BatchNorm2d
    given 3D input), holding the twin's eager error, shapes and fix word for word, torch.nn's
    words for the input first (a group or instance norm's channels beside a mask gave the
    twin's sentence alone); without fullgraph, the eager error's type. Oracle: torch.compile
    on torch.nn's BatchNorm2d, and the eager error, whose first words are torch.nn's."""
    torch._dynamo.reset()
    with pytest.raises(Exception) as theirs:
        torch.compile(torch.nn.BatchNorm2d(4), dynamic=dynamic, fullgraph=True, backend="eager")(torch.randn(2, 4, 3))
    assert "expected 4D input (got 3D input)" in str(theirs.value)
    twin = make()
    x, mask = torch.randn(shape), torch.ones(mask_shape, dtype=dtype)
    with pytest.raises(Exception) as eager:
        twin(x, mask=mask)
    for fullgraph in (True, False):
        torch._dynamo.reset()
        with pytest.raises(type(theirs.value) if fullgraph else type(eager.value)) as compiled:
            torch.compile(twin, dynamic=dynamic, fullgraph=fullgraph, backend="eager")(x, mask=mask)
        assert str(eager.value) in str(compiled.value), (fullgraph, str(compiled.value))
