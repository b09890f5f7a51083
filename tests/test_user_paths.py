"""Three new users following the README and then leaving its path: a speech/NLP user with
padded batches (masks), a graph-network user with PyG, a diffusion/LLM user with the
fused blocks. Oracles: torch's own functions on the data with the padding removed,
torch_geometric's original classes, torch autograd and gradcheck on composites."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
F = torch.nn.functional

import normlab  # noqa: E402
import normlab.torch as nt  # noqa: E402


def padding_mask(lengths, steps):
    """(batch, steps): True on the real frames of each padded sequence."""
    return torch.arange(steps) < torch.as_tensor(lengths)[:, None]


# -- masks on padded batches ---------------------------------------------------------


@pytest.mark.slow
def test_a_masked_layer_norm_compiles_with_dynamic_shapes_and_normalizes_each_real_frame_as_torch_does():
    """``torch.compile(dynamic=True, fullgraph=True)`` of a twin called with ``mask=``: one
    graph across batch sizes and lengths, each real frame normalized as ``F.layer_norm``
    normalizes it alone, and no warning about normlab's caches."""
    torch.manual_seed(0)
    norm = nt.LayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, mask: norm(x, mask=mask), fullgraph=True, dynamic=True)
    for lengths, steps in (([7, 2, 0], 7), ([5, 5, 1, 3, 4], 5)):
        x = torch.randn(len(lengths), steps, 6) * 3 + 2
        valid = padding_mask(lengths, steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = compiled(x, valid[:, :, None])
        assert not [w for w in caught if "lru_cache" in str(w.message)]
        torch.testing.assert_close(y[valid], F.layer_norm(x[valid], (6,), norm.weight, norm.bias))


padded_batches = st.lists(st.integers(0, 7), min_size=1, max_size=5).flatmap(
    lambda lengths: st.tuples(st.just(lengths), st.integers(max(max(lengths), 1), 8), st.integers(1, 4)))


@given(padded_batches, st.integers(0, 2**31 - 1))
def test_a_masked_batch_norm_on_a_padded_batch_equals_batch_norm_on_the_real_frames_alone(batch, seed):
    """NumPy API, ``"[b t] c"`` with a padding mask: outputs and input gradients of the real
    frames are ``F.batch_norm``'s (training) on those frames with the padding removed, and
    a padded frame's input gets no gradient when its output gets none."""
    lengths, steps, channels = batch
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(lengths), steps, channels)) * 3 + 2
    valid = padding_mask(lengths, steps).numpy()
    grad_y = rng.standard_normal(x.shape) * valid[:, :, None]
    y = normlab.normalize(x, "[b t] c", mask=valid[:, :, None])
    grad_x, _, _ = normlab.normalize_backward(grad_y, x, "[b t] c", mask=valid[:, :, None])
    frames = torch.tensor(x[valid], requires_grad=True)
    if len(frames) < 2:  # (torch refuses one frame in training)
        assert len(frames) or not y.any()  # nothing counted: exactly 0 (the bias)
        return
    expected = F.batch_norm(frames, None, None, training=True)
    expected.backward(torch.tensor(grad_y[valid]))
    torch.testing.assert_close(torch.tensor(y[valid]), expected.detach())
    torch.testing.assert_close(torch.tensor(grad_x[valid]), frames.grad)
    assert not grad_x[~valid].any()


@given(padded_batches, st.integers(0, 2**31 - 1))
def test_a_masked_layer_norm_twin_normalizes_each_real_frame_and_each_sequence_alone(batch, seed):
    """torch twins with ``mask=``: ``LayerNorm`` over channels gives each real frame
    ``F.layer_norm``'s output; ``InstanceNorm1d`` over time gives each sequence the
    statistics of its real frames alone (``F.instance_norm`` of the cut sequence), and an
    all-padding sequence exactly its bias."""
    lengths, steps, channels = batch
    torch.manual_seed(seed)
    x = torch.randn(len(lengths), steps, channels, dtype=torch.float64) * 3 + 2
    valid = padding_mask(lengths, steps)
    layer = nt.LayerNorm(channels, dtype=torch.float64)
    torch.testing.assert_close(layer(x, mask=valid[:, :, None])[valid], F.layer_norm(x[valid], (channels,)))
    instance = nt.InstanceNorm1d(channels, affine=True, dtype=torch.float64)
    with torch.no_grad():
        instance.bias.uniform_(-1, 1)
    if 1 in lengths:  # torch refuses a sequence of one frame in training, and so does the twin
        with pytest.raises(ValueError, match="more than 1 counted value"):
            instance(x.transpose(1, 2), mask=valid[:, None, :])
        return
    y = instance(x.transpose(1, 2), mask=valid[:, None, :])  # (B, C, T), a strided view
    for sequence, length in enumerate(lengths):
        if length == 0:
            torch.testing.assert_close(y[sequence], instance.bias[:, None].expand(channels, steps))
        else:
            cut = x[sequence:sequence + 1, :length].transpose(1, 2)
            expected = F.instance_norm(cut, weight=instance.weight, bias=instance.bias)
            torch.testing.assert_close(y[sequence:sequence + 1, :, :length], expected)


MIXES = [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.bfloat16, torch.float32),
         (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("mix", MIXES, ids=lambda mix: f"{str(mix[0])[6:]}_input_{str(mix[1])[6:]}_params")
@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d"])
def test_a_mask_that_counts_everything_gives_torch_nns_dtype_and_values_or_its_error_for_a_dtype_mix(name, mix):
    """Parameters in another dtype than the input: with ``mask=`` counting every element, a
    twin gives what torch.nn's module gives without a mask (float32 input beside bfloat16
    RMSNorm weights computes), or raises torch's exception type where torch refuses the
    mix ("mixed dtype"), never a TypeError from inside normlab."""
    x_dtype, param_dtype = mix
    make = {"LayerNorm": lambda m: m.LayerNorm(4), "GroupNorm": lambda m: m.GroupNorm(2, 4),
            "RMSNorm": lambda m: m.RMSNorm(4), "BatchNorm1d": lambda m: m.BatchNorm1d(4)}[name]
    torch.manual_seed(0)
    theirs = make(torch.nn).to(param_dtype)
    with torch.no_grad():
        for param in theirs.parameters():
            param.uniform_(0.5, 1.5)
    ours = make(nt).to(param_dtype)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(3, 4, 5) * 2 + 1).to(x_dtype)
    if name in ("LayerNorm", "RMSNorm"):
        x = x.transpose(1, 2)
    everything = torch.ones(x.shape, dtype=torch.bool)
    try:
        expected = theirs(x)
    except RuntimeError as error:
        with pytest.raises(type(error)):
            ours(x, mask=everything)
        return
    y = ours(x, mask=everything)
    assert y.dtype == expected.dtype
    close = {} if torch.finfo(x_dtype).bits > 16 else dict(atol=0.02, rtol=0.02)
    torch.testing.assert_close(y, expected, **close)


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1)], ids=["1d", "1d_length_1", "2d"])
def test_a_batch_norm_without_running_statistics_refuses_one_value_per_channel_in_evaluation_as_torch_does(shape):
    """Without running statistics a batch norm uses the batch's even in ``eval()``, and torch
    refuses one value per channel there as in training (a ValueError); the twin normalized
    it to exactly its bias."""
    make = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    x = torch.randn(shape)
    with pytest.raises(ValueError) as expected:
        getattr(torch.nn, make)(4, track_running_stats=False).eval()(x)
    with pytest.raises(ValueError, match="more than 1 value per channel") as caught:
        getattr(nt, make)(4, track_running_stats=False).eval()(x)
    assert str(caught.value).lower().startswith(str(expected.value).lower()[:40])


def test_a_masked_batch_norm_without_running_statistics_refuses_one_counted_value_in_evaluation():
    """The same rule on the counted elements: torch.nn refuses the batch with the padding
    removed (one value per channel), so the twin refuses it with the padding masked out."""
    x = torch.randn(2, 4, 3)
    mask = torch.zeros(2, 1, 3, dtype=torch.bool)
    mask[1, 0, 2] = True  # one counted position: one value per channel
    with pytest.raises(ValueError):
        torch.nn.BatchNorm1d(4, track_running_stats=False).eval()(x[1:, :, 2:])
    with pytest.raises(ValueError, match="more than 1 counted value per channel"):
        nt.BatchNorm1d(4, track_running_stats=False).eval()(x, mask=mask)
    mask[0, 0, 0] = True  # two counted values per channel: torch normalizes them, and so does the twin
    expected = torch.nn.BatchNorm1d(4, track_running_stats=False).eval()(torch.stack([x[0, :, 0], x[1, :, 2]]))
    y = nt.BatchNorm1d(4, track_running_stats=False).eval()(x, mask=mask)
    torch.testing.assert_close(torch.stack([y[0, :, 0], y[1, :, 2]]), expected)


@pytest.mark.parametrize("mix", MIXES, ids=lambda mix: f"{str(mix[0])[6:]}_input_{str(mix[1])[6:]}_params")
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "all_true_mask"])
def test_convnexts_layer_norm_2d_gives_torchvisions_dtype_and_values_or_its_error_for_a_dtype_mix(mix, masked):
    """``LayerNorm2d`` against torchvision's (mirrored from its source): ``F.layer_norm``
    on the permuted input, which refuses the dtype mixes torch refuses ("mixed dtype")."""
    from tests.mirrored_norms import TorchvisionLayerNorm2d

    x_dtype, param_dtype = mix
    torch.manual_seed(0)
    theirs = TorchvisionLayerNorm2d(4).to(param_dtype)
    with torch.no_grad():
        for param in theirs.parameters():
            param.uniform_(0.5, 1.5)
    ours = nt.LayerNorm2d(4, eps=1e-5).to(param_dtype)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(2, 4, 3, 5) * 2 + 1).to(x_dtype)
    kwargs = {"mask": torch.ones(2, 1, 3, 5, dtype=torch.bool)} if masked else {}
    try:
        expected = theirs(x)
    except RuntimeError as error:
        with pytest.raises(type(error), match="mixed dtype"):
            ours(x, **kwargs)
        return
    y = ours(x, **kwargs)
    assert y.dtype == expected.dtype
    close = {} if torch.finfo(x_dtype).bits > 16 else dict(atol=0.02, rtol=0.02)
    torch.testing.assert_close(y, expected, **close)


# -- fused blocks ------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True, "2"])
def test_a_gated_norm_with_a_group_size_that_is_not_a_positive_int_is_refused_when_built(group_size):
    """A bad ``group_size`` fails at construction with a ValueError naming it, not with a
    ZeroDivisionError, or a pattern error at the first forward pass."""
    with pytest.raises(ValueError, match="group_size"):
        nt.GatedRMSNorm(6, group_size=group_size)


def explain_stages(capsys, *args) -> list[str]:
    from normlab.cli import main

    assert main(["explain", *args, "--no-color"]) == 0
    return capsys.readouterr().out.split("fused block")[1].splitlines()[1:]


def test_explaining_the_rms_preset_with_a_residual_describes_an_rms_norm_of_the_sum(capsys):
    """The ``rms`` preset is torch.nn.RMSNorm's ``s / sqrt(mean(s²) + eps)``: no mean, no
    variance, in the stage lines as in the header above them."""
    stages = " ".join(explain_stages(capsys, "rms", "--shape", "2,2,3", "--residual"))
    assert "mean(s²) of s over [d]" in stages and "x̂ = s · rstd" in stages
    assert "variance" not in stages and "− mean" not in stages


def test_explaining_a_block_with_a_weight_offset_shows_where_gemmas_one_plus_weight_enters(capsys):
    """``--weight-offset 1`` is GemmaRMSNorm's ``x̂ · (1 + weight)``: a stage shows it."""
    stages = explain_stages(capsys, "b t [d]", "--shape", "2,2,3", "--rms", "--residual", "--weight-offset", "1")
    assert any("x̂ · (1 + w)" in line for line in stages), stages


# -- PyG twins -----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_an_instance_norm_without_a_batch_vector_gives_pygs_dtype_values_and_errors(dtype, training):
    """PyG's InstanceNorm without a batch vector is ``F.instance_norm``: half-precision nodes
    beside float32 parameters and running statistics stay half precision, and float64
    nodes beside them are refused ("mixed dtype"), as torch refuses them."""
    pyg_norm = pytest.importorskip("torch_geometric.nn.norm")
    from normlab.torch import geometric

    torch.manual_seed(0)
    theirs = pyg_norm.InstanceNorm(4, affine=True, track_running_stats=True)
    ours = geometric.InstanceNorm(4, affine=True, track_running_stats=True)
    with torch.no_grad():
        for tensor in (*theirs.parameters(), *theirs.buffers()):
            tensor.uniform_(0.5, 1.5) if tensor.is_floating_point() else None
    ours.load_state_dict(theirs.state_dict())
    nodes = torch.randn(6, 4).to(dtype)
    try:
        expected = theirs.train(training)(nodes)
    except RuntimeError as error:
        with pytest.raises(type(error), match="mixed dtype"):
            ours.train(training)(nodes)
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict())  # running statistics untouched
        return
    y = ours.train(training)(nodes)
    assert y.dtype == expected.dtype
    close = dict(atol=0.01, rtol=0.01)  # (PyG's statistics are of half precision)
    torch.testing.assert_close(y, expected, **close)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), **close)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("nodes", [(6, 5, torch.float32), (6, 4, torch.float64), (6, 4, torch.bfloat16), (4,)],
                         ids=["wrong_channels", "float64_nodes", "bfloat16_nodes", "one_dimensional"])
def test_a_node_mode_layer_norm_takes_and_refuses_the_inputs_pygs_does(nodes, affine):
    """PyG's ``LayerNorm(mode="node")`` is ``F.layer_norm`` over ``in_channels``: the twin gives
    its dtype and values, or raises its exception type (nodes of the wrong width, float64
    nodes beside float32 parameters), where it computed or raised a ValueError."""
    pyg_norm = pytest.importorskip("torch_geometric.nn.norm")
    from normlab.torch import geometric

    torch.manual_seed(0)
    theirs = pyg_norm.LayerNorm(4, affine=affine, mode="node")
    ours = geometric.LayerNorm(4, affine=affine, mode="node")
    x = torch.randn(nodes[:-1]).to(nodes[-1]) if len(nodes) > 1 else torch.randn(nodes)
    try:
        expected = theirs(x)
    except RuntimeError as error:
        with pytest.raises(type(error)):
            ours(x)
        return
    y = ours(x)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("name", ["GraphNorm", "InstanceNorm", "LayerNorm"])
def test_a_gin_stack_on_an_int32_batch_of_unsorted_graphs_with_an_empty_one_trains_as_pygs_with_int64_ids(name):
    """A real PyG model: GINConv layers with the twin between them, on a ``Batch`` whose
    batch vector is int32 and unsorted and whose last graph is empty (``batch_size=`` given).
    Outputs and every gradient are those of the same model with PyG's class on int64 ids
    (PyG's own int32 path is not the oracle: its scatter backward misreads int32 ids)."""
    pyg = pytest.importorskip("torch_geometric")
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn import GINConv

    from normlab.torch import geometric

    def model(norms):
        torch.manual_seed(0)
        convs = torch.nn.ModuleList(GINConv(torch.nn.Linear(6, 6)) for _ in range(2))
        return convs, torch.nn.ModuleList(getattr(norms, name)(6) for _ in range(2))

    def run(convs, norms, x, edges, batch, size):
        for conv, norm in zip(convs, norms):
            x = norm(conv(x, edges), batch, size).relu()
        return x

    torch.manual_seed(1)
    graphs = [Data(x=torch.randn(n, 6) * 2 + 1, edge_index=torch.randint(0, max(n, 1), (2, 2 * n)))
              for n in (4, 1, 6, 0)]
    data = Batch.from_data_list(graphs)
    order = torch.randperm(data.num_nodes)  # nodes unsorted by graph: relabel the edges to match
    x, batch = data.x[order], data.batch[order]
    edges = torch.argsort(order)[data.edge_index]
    results = []
    for norms, ids in ((pyg.nn.norm, batch), (geometric, batch.int())):
        convs, layers = model(norms)
        nodes = x.clone().requires_grad_()
        y = run(convs, layers, nodes, edges, ids, data.num_graphs)
        y.pow(2).sum().backward()
        results.append((y, nodes.grad, [p.grad for p in (*convs.parameters(), *layers.parameters())]))
    (y_pyg, grad_pyg, params_pyg), (y, grad, params) = results
    torch.testing.assert_close(y, y_pyg)
    torch.testing.assert_close(grad, grad_pyg)
    for ours, theirs in zip(params, params_pyg):
        torch.testing.assert_close(ours, theirs)


def test_a_fused_block_reads_its_recipe_attributes_on_every_call_as_its_repr_shows_them():
    """Setting ``casting`` and ``weight_offset`` on a built ``FusedAddRMSNorm`` (its repr
    shows them at once) makes it transformers' ``GemmaRMSNorm`` on ``x + r``, bit for bit in
    bfloat16; ``group_size`` and ``norm_before_gate`` set on a ``GatedRMSNorm`` give
    mamba_ssm's gated-norm formula with them (written out here in float64)."""
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    torch.manual_seed(0)
    block = nt.FusedAddRMSNorm(8, eps=1e-6).to(torch.bfloat16)
    x, residual = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    block(x, residual)  # built and run with the llama recipe first
    reference = gemma.GemmaRMSNorm(8, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        reference.weight.uniform_(-0.5, 0.5)
        block.weight.copy_(reference.weight)
    block.casting, block.weight_offset = "gemma", 1.0
    torch.testing.assert_close(block(x, residual)[0], reference(x + residual), atol=0, rtol=0)

    gated = nt.GatedRMSNorm(8, group_size=8).double()
    x, z = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    gated(x, z)

    def rms_norm_in_groups_of_4(h):
        h = h.unflatten(-1, (2, 4))
        return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + gated.eps)).flatten(-2) * gated.weight

    gated.group_size = 4
    torch.testing.assert_close(gated(x, z), rms_norm_in_groups_of_4(x) * F.silu(z))
    gated.norm_before_gate = False
    torch.testing.assert_close(gated(x, z), rms_norm_in_groups_of_4(x * F.silu(z)))
