"""More new users leaving the README's path: a graph-network user with PyG (low-precision
nodes in a float32 model), a speech/NLP user with padded batches, a NumPy user coming from
Flax/Haiku. Oracles: torch_geometric's original classes in float64, torch.nn on the
unpadded sequences one by one, float64 NumPy formulas from the definition."""

import importlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normlab  # noqa: E402
import normlab.torch as nt  # noqa: E402

# -- PyG: GraphNorm on low-precision nodes -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_norm_on_low_precision_nodes_with_float32_parameters_is_float32_accurate(dtype):
    """bfloat16 nodes into a GraphNorm kept in float32 give a float32 output (PyG's
    promotion); its per-graph mean must not be summed in bfloat16 (PyG's own rounding,
    two digits lost), but agree with PyG's GraphNorm run in float64 on the same nodes,
    values and gradients, to float32's accuracy, on a large graph and a one-node graph."""
    pyg_norm = pytest.importorskip("torch_geometric.nn.norm")
    from normlab.torch import geometric

    g = torch.Generator().manual_seed(0)
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([1500, 1, 7]))
    nodes = (torch.randn(batch.numel(), 8, generator=g) * 2 + 5).to(dtype)
    ours = geometric.GraphNorm(8)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5, generator=g)
    theirs = pyg_norm.GraphNorm(8).double()
    theirs.load_state_dict(ours.state_dict())
    x = nodes.detach().requires_grad_()
    x64 = nodes.double().requires_grad_()
    y, expected = ours(x, batch, 3), theirs(x64, batch, 3)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, atol=2e-5, rtol=1e-5)
    seed = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(seed.float())
    expected.backward(seed)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=2e-3, rtol=1e-4)
    # the node gradient is low precision itself: within its dtype's rounding of the oracle
    torch.testing.assert_close(x.grad.double(), x64.grad.to(dtype).double(), atol=1e-2, rtol=1e-2)


# -- NumPy: normlab.functional's errors for shapes torch refuses -------------------------


@pytest.mark.parametrize("function, name", [("layer_norm", "weight"), ("layer_norm", "bias"), ("rms_norm", "weight")])
@pytest.mark.parametrize("shape", [(6,), (1, 5), (5, 1), ()])
def test_a_parameter_whose_shape_is_not_normalized_shape_is_refused_as_torch_refuses_it(function, name, shape):
    """torch.nn.functional refuses a weight or bias of any shape but normalized_shape (the
    oracle: its call raises); normlab.functional says so in those terms, a ValueError
    naming both shapes, not an error about a pattern the caller never wrote. (rms_norm
    takes no bias.)"""
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    param = np.ones(shape, np.float32)
    with pytest.raises(RuntimeError):
        getattr(torch.nn.functional, function)(torch.from_numpy(x), (5,), **{name: torch.from_numpy(param)})
    with pytest.raises(normlab.errors.ParamsError) as caught:
        getattr(normlab.functional, function)(x, (5,), **{name: param})
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert f"{name} has shape {shape}" in message and "normalized_shape is (5,)" in message
    assert "(2, 5)" in message and "params" not in message


@pytest.mark.parametrize("function", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(3, 4), ()])
def test_an_empty_normalized_shape_is_refused_as_torch_refuses_it_with_a_fix_that_differs_from_the_call(function,
                                                                                                          shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with pytest.raises(RuntimeError, match="at least 1-dimensional"):
        getattr(torch.nn.functional, function)(torch.from_numpy(x), ())
    with pytest.raises(normlab.errors.ShapeError) as caught:
        getattr(normlab.functional, function)(x, ())
    message = str(caught.value)
    assert "names no axis" in message and str(shape) in message
    assert "normalized_shape=()" not in message
    if shape:
        # the fix it suggests works and is torch's layer norm over the last axis
        y = getattr(normlab.functional, function)(x, (4,))
        expected = getattr(torch.nn.functional, function)(torch.from_numpy(x), (4,))
        torch.testing.assert_close(torch.from_numpy(np.asarray(y)), expected)


@pytest.mark.parametrize("name", ["epsilon", "variance_epsilon"])
def test_epsilon_named_as_onnx_keras_and_flax_name_it_is_pointed_to_eps_not_told_to_drop_it(name):
    # ONNX, Keras and Flax call it epsilon (transformers variance_epsilon); the message said
    # "use one of b, d, or drop it", and dropping it runs with eps=1e-5
    x = np.ones((2, 3), np.float32)
    calls = [lambda: normlab.normalize(x, "b [d]", **{name: 1e-3}),
             lambda: normlab.normalize_backward(x, x, "b [d]", **{name: 1e-3}),
             lambda: nt.Norm("b [d]", **{name: 1e-3}),
             lambda: nt.normalize(torch.from_numpy(x), "b [d]", **{name: 1e-3})]
    for call in calls:
        with pytest.raises(normlab.errors.ShapeError) as caught:
            call()
        message = str(caught.value)
        assert f"{name}=0.001 names no axis" in message and "pass eps=0.001" in message
        assert "drop it" not in message and "use one of" not in message


@pytest.mark.parametrize("keyword", ["mask", "segment_ids"])
@pytest.mark.parametrize("call", ["normalize", "Norm"])
def test_a_mask_given_to_normalize_or_norms_constructor_is_pointed_to_where_masks_go_not_printed(call, keyword):
    # nt.normalize has no mask= (the NumPy API's normalize has one): the mask landed among
    # the axis sizes, and the message printed the whole tensor and said "use one of b, t, d"
    x = torch.randn(3, 5, 4)
    mask = torch.arange(5)[None, :, None] < torch.tensor([5, 2, 0])[:, None, None]
    value = mask if keyword == "mask" else torch.tensor([0, 0, 1])
    with pytest.raises(normlab.errors.ShapeError) as caught:
        if call == "normalize":
            nt.normalize(x, "b t [d]", **{keyword: value})
        else:
            nt.Norm("b t [d]", **{keyword: value})
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400
    assert "normlab.torch.masked.normalize_masked(x, pattern, mask=" in message and "Norm(pattern)(x, mask=" in message
    # the fix it names, run as written (it returned a tuple, (y, mean, rstd, count), where the
    # message promised a drop-in call): each real token normalized as torch's layer norm of
    # that token, padding exactly 0
    importlib.import_module("normlab.torch.masked")
    call = re.search(r"(normlab\.torch\.masked\.normalize_masked\(x, pattern, mask=)\.\.\., segment_ids=\.\.\.\)(\.\w+)?",
                     message)
    y = eval(call.group(1) + "mask)" + (call.group(2) or ""), {"normlab": normlab},
             {"x": x, "pattern": "b t [d]", "mask": mask})
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y[mask[..., 0]], torch.nn.functional.layer_norm(x[mask[..., 0]], (4,)))
    assert torch.equal(y[~mask[..., 0]], torch.zeros(int((~mask).sum()), 4))


_F = torch.nn.functional


@pytest.mark.parametrize("name, keywords, torch_norm", [
    ("batch", {}, lambda x: _F.batch_norm(x, None, None, training=True)),
    ("BatchNorm2d", {}, lambda x: _F.batch_norm(x, None, None, training=True)),
    ("LayerNorm", {}, lambda x: _F.layer_norm(x, x.shape[-1:])),
    # ConvNeXt's (torchvision's and timm's): torch's layer norm over the channels, channels-last
    ("LayerNorm2d", {}, lambda x: _F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)),
    ("LayerNorm2dFp32", {}, lambda x: _F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)),
    ("instance_norm", {}, lambda x: _F.instance_norm(x)),
    ("group", {"g": 2}, lambda x: _F.group_norm(x, 2)),
    ("RMSNorm", {"rms": True}, lambda x: _F.rms_norm(x, x.shape[-1:], eps=1e-5)),
])
def test_a_norms_name_given_as_the_pattern_is_answered_with_its_pattern_which_computes_it(name, keywords, torch_norm):
    # it was told "no axis is reduced: put the axes that share statistics in [ ], e.g. 'b [d]'",
    # and 'b [d]' is the wrong rank and, for batch norm, the wrong norm
    x = np.random.default_rng(5).standard_normal((3, 4, 5, 2))
    with pytest.raises(normlab.errors.PatternSyntaxError) as caught:
        normlab.normalize(x, name)
    message = str(caught.value)
    assert f"{name!r} names a norm" in message and "e.g. 'b [d]'" not in message
    pattern = re.search(r"is '([^']+)'", message).group(1)
    torch.testing.assert_close(torch.from_numpy(normlab.normalize(x, pattern, **keywords)), torch_norm(torch.from_numpy(x)))


# -- Norm(pattern) with segments or masks, tracking running statistics -----------------


@pytest.mark.parametrize("empty", ["a gap in the ids", "trailing slots", "an all-padding sequence"])
def test_a_norm_tracking_running_statistics_skips_empty_groups_as_the_twins_do(empty):
    """A batch of graphs with an empty slot (ids with a gap, or num_segments past the last
    id), or a padded batch with an all-padding sequence, trains a ``Norm`` that tracks
    running statistics: the empty group gives exactly zero (no bias here) and stays out of
    the running average. Oracle: torch's instance norm on each non-empty group alone, and
    the running statistics from the definition in float64 (the momentum update of the mean
    over the non-empty groups of their means and unbiased variances)."""
    g = torch.Generator().manual_seed(0)
    if empty == "an all-padding sequence":
        x = torch.randn(4, 3, 6, generator=g) * 2 + 1
        lengths = torch.tensor([6, 0, 4, 2])
        mask = (torch.arange(6) < lengths[:, None])[:, None, :]
        norm = nt.Norm("b c [t]", track_running_stats=True, running_axes="c", c=3)
        y = norm(x, mask=mask)
        groups = [x[i, :, :n].T for i, n in enumerate(lengths.tolist()) if n]  # (frames, channels)
        outputs = [y[i, :, :n].T for i, n in enumerate(lengths.tolist()) if n]
        assert torch.equal(y[1], torch.zeros_like(y[1]))
    else:
        ids = torch.tensor([0, 0, 0, 3, 3, 1, 1, 1, 1]) if empty == "a gap in the ids" else \
            torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
        x = torch.randn(ids.numel(), 3, generator=g) * 2 + 1
        norm = nt.Norm("[n] c", track_running_stats=True, running_axes="c", c=3)
        y = norm(x, segment_ids=ids, num_segments=None if empty == "a gap in the ids" else 6)
        groups = [x[ids == s] for s in ids.unique()]
        outputs = [y[ids == s] for s in ids.unique()]
    for nodes, out in zip(groups, outputs):
        expected = torch.nn.functional.instance_norm(nodes.T[None].double())[0].T
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    means = torch.stack([nodes.double().mean(0) for nodes in groups]).mean(0)
    variances = torch.stack([nodes.double().var(0, unbiased=True) for nodes in groups]).mean(0)
    torch.testing.assert_close(norm.running_mean.double(), 0.1 * means, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(norm.running_var.double(), 0.9 + 0.1 * variances, atol=1e-6, rtol=1e-6)


def test_a_one_node_segment_in_training_is_refused_with_a_fix_that_speaks_of_segments():
    norm = nt.Norm("[n] c", track_running_stats=True, running_axes="c", c=3)
    with pytest.raises(ValueError, match="more than 1 counted value.*every non-empty segment"):
        norm(torch.randn(4, 3), segment_ids=torch.tensor([0, 0, 0, 1]))


# -- NumPy: num_segments that cannot be a count -------------------------------------------


@pytest.mark.parametrize("nodes", [0, 4])
def test_a_negative_num_segments_is_a_shape_error_naming_the_pattern_and_shape_even_with_no_ids(nodes):
    """An empty batch (no nodes, no ids) with num_segments=-1 raised NumPy's 'zero-size
    array to reduction' from inside the check; now normlab's error, as with ids. The
    oracle for refusing it: NumPy cannot allocate a negative count of statistics."""
    with pytest.raises(ValueError):
        np.zeros((-1, 3))
    x = np.ones((nodes, 3), np.float32)
    ids = np.zeros(nodes, np.int64)
    with pytest.raises(normlab.errors.ShapeError, match=r"'\[n\] c', input shape \(%d, 3\).*num_segments=-1" % nodes):
        normlab.normalize(x, "[n] c", segment_ids=ids, num_segments=-1)


def test_a_float_num_segments_is_an_input_error_naming_the_pattern_and_shape():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(normlab.errors.InputError, match=r"'\[n\] c', input shape \(4, 3\).*got 2\.0"):
        normlab.normalize(x, "[n] c", segment_ids=np.array([0, 0, 1, 1]), num_segments=2.0)
    # an integer of any NumPy type is a count
    y = normlab.normalize(x, "[n] c", segment_ids=np.array([0, 0, 1, 1]), num_segments=np.int32(2))
    assert np.array_equal(y, np.zeros_like(x))  # constant groups: exact zeros
