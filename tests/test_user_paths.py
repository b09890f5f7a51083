"""Three new users following the README and then leaving its path: a speech/NLP user with
padded batches (masks), a graph-network user with PyG, a diffusion/LLM user with the
fused blocks. Oracles: torch's own functions on the data with the padding removed,
torch_geometric's original classes, torch autograd and gradcheck on composites."""

import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_an_evaluating_instance_norm_without_a_batch_vector_gives_pygs_dtype_values_and_errors(dtype):
    """PyG's InstanceNorm without a batch vector is ``F.instance_norm`` on the running
    statistics: half-precision nodes beside float32 statistics stay half precision, and
    float64 nodes beside them are refused ("mixed dtype"), as torch refuses them."""
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
        expected = theirs.eval()(nodes)
    except RuntimeError as error:
        with pytest.raises(type(error), match="mixed dtype"):
            ours.eval()(nodes)
        return
    y = ours.eval()(nodes)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected)
