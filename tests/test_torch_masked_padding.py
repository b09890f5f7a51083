"""Padded sequences with ``mask=`` in the normlab.torch modules, as torch users batch
them, against torch's own functions run on the data with the padding removed (the
oracle): counted outputs, input and parameter gradients, running statistics, then
evaluation. A hypothesis property over lengths (all-padding samples included), plus the
layouts users pass (non-contiguous, channels_last) and masks that do not fit."""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import normlab  # noqa: E402
import normlab.torch as nt  # noqa: E402
from normlab import functional  # noqa: E402
from normlab.errors import NormlabError  # noqa: E402

F = torch.nn.functional
CHANNELS = 3


def _padded(lengths, seed, time):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), CHANNELS, time, generator=g, dtype=torch.float64) * 3 + 2
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    mask = (torch.arange(time)[None, :] < torch.tensor(lengths)[:, None])[:, None, :]
    # padding as users leave it: garbage, outputs there carry no loss
    x = torch.where(mask, x, 1e4)
    return x, torch.where(mask, grad, 0.0), mask


def _randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def _check_batch_norm(x, grad, mask, lengths):
    ours = _randomized(nt.BatchNorm1d(CHANNELS, momentum=0.3)).double()
    theirs = torch.nn.BatchNorm1d(CHANNELS, momentum=0.3).double()
    theirs.load_state_dict(ours.state_dict())
    xa = x.clone().requires_grad_()
    y = ours(xa, mask=mask)
    (y * grad).sum().backward()
    parts = [x[b, :, :n].T for b, n in enumerate(lengths)]  # (n, C) rows of the counted positions
    xb = torch.cat(parts).clone().requires_grad_()
    ref = theirs(xb)
    (ref * torch.cat([grad[b, :, :n].T for b, n in enumerate(lengths)])).sum().backward()
    torch.testing.assert_close(torch.cat([y[b, :, :n].T for b, n in enumerate(lengths)]), ref)
    torch.testing.assert_close(torch.cat([xa.grad[b, :, :n].T for b, n in enumerate(lengths)]), xb.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x, mask=mask), theirs(x))


def _check_instance_norm(x, grad, mask, lengths):
    ours = _randomized(nt.InstanceNorm1d(CHANNELS, affine=True, track_running_stats=True, momentum=0.3)).double()
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    theirs = torch.nn.InstanceNorm1d(CHANNELS, affine=True, track_running_stats=True, momentum=0.3).double()
    theirs.load_state_dict(ours.state_dict())
    xa = x.clone().requires_grad_()
    y = ours(xa, mask=mask)
    (y * grad).sum().backward()
    means, variances, loss = [], [], 0
    for b, n in enumerate(lengths):
        if n == 0:  # all padding: no statistics of its own, exactly bias
            assert torch.equal(y[b].detach(), ours.bias.detach()[:, None].expand(CHANNELS, x.shape[2]))
            continue
        part = x[b:b + 1, :, :n].clone().requires_grad_()
        mean, var = torch.zeros(CHANNELS, dtype=x.dtype), torch.ones(CHANNELS, dtype=x.dtype)
        ref = F.instance_norm(part, mean, var, theirs.weight, theirs.bias, use_input_stats=True, momentum=1.0)
        means.append(mean)
        variances.append(var)
        torch.testing.assert_close(y[b:b + 1, :, :n], ref)
        loss = loss + (ref * grad[b:b + 1, :, :n]).sum()
        gx, = torch.autograd.grad((ref * grad[b:b + 1, :, :n]).sum(), part, retain_graph=True)
        torch.testing.assert_close(xa.grad[b:b + 1, :, :n], gx)
    if means:  # torch's update with the batch's statistics: the mean over the samples
        loss.backward()
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        with torch.no_grad():
            theirs.running_mean.mul_(0.7).add_(0.3 * torch.stack(means).mean(0))
            theirs.running_var.mul_(0.7).add_(0.3 * torch.stack(variances).mean(0))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x, mask=mask), theirs(x))


def _check_group_norm(x, grad, mask, lengths):
    ours = _randomized(nt.GroupNorm(CHANNELS, CHANNELS)).double()
    xa = x.clone().requires_grad_()
    y = ours(xa, mask=mask)
    (y * grad).sum().backward()
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        part = x[b:b + 1, :, :n].clone().requires_grad_()
        ref = F.group_norm(part, CHANNELS, ours.weight, ours.bias)
        torch.testing.assert_close(y[b:b + 1, :, :n], ref)
        gx, = torch.autograd.grad((ref * grad[b:b + 1, :, :n]).sum(), part)
        torch.testing.assert_close(xa.grad[b:b + 1, :, :n], gx)


def _check_layer_norm(x, grad, mask, lengths):
    """Tokens as rows, (B, T, C): a padded token's row is masked out entirely, so it gives bias."""
    ours = _randomized(nt.LayerNorm(CHANNELS)).double()
    tokens, token_mask = x.transpose(1, 2), mask.transpose(1, 2)  # non-contiguous, as users transpose
    y = ours(tokens, mask=token_mask)
    counted = token_mask[..., 0]
    torch.testing.assert_close(y[counted], F.layer_norm(tokens[counted], (CHANNELS,), ours.weight, ours.bias))
    assert torch.equal(y[~counted].detach(), ours.bias.detach().expand(int((~counted).sum()), CHANNELS))


_CHECKS = {"batch": _check_batch_norm, "instance": _check_instance_norm, "group": _check_group_norm,
           "layer": _check_layer_norm}


@pytest.mark.parametrize("kind", sorted(_CHECKS))
@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_padded_sequences_normalize_as_torch_on_the_unpadded_data_in_training_and_evaluation(kind, lengths, seed):
    if kind == "batch" and sum(lengths) < 2:
        lengths = lengths + [2]  # torch's rule: more than one value per channel when training
    if kind in ("instance", "group"):
        lengths = [n if n != 1 else 2 for n in lengths]  # (torch refuses one value per group)
    x, grad, mask = _padded(lengths, seed, time=7)
    _CHECKS[kind](x, grad, mask, lengths)


_CHECKPOINTED = {
    "BatchNorm1d": lambda momentum: (nt.BatchNorm1d(CHANNELS, momentum=momentum),
                                     torch.nn.BatchNorm1d(CHANNELS, momentum=momentum)),
    "InstanceNorm1d": lambda momentum: (nt.InstanceNorm1d(CHANNELS, momentum=momentum, track_running_stats=True),
                                        torch.nn.InstanceNorm1d(CHANNELS, momentum=momentum,
                                                                track_running_stats=True)),
    "Norm": lambda momentum: (nt.Norm("[b] c [t]", "c", c=CHANNELS, momentum=momentum, track_running_stats=True),
                              torch.nn.BatchNorm1d(CHANNELS, momentum=momentum)),
}


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("name", sorted(_CHECKPOINTED))
def test_a_checkpointed_block_ending_in_a_masked_norm_updates_running_statistics_as_torch_nn(name, momentum):
    """torch.utils.checkpoint recomputes the forward in backward, up to the last tensor saved
    for it. torch.nn's norms update their running statistics inside the op, before it saves,
    so the recomputation updates them again; the masked twins updated them after the op, so
    a block ending in one counted each batch twice but moved the statistics once (with
    momentum=None no longer the cumulative average). torch's instance norm copies its
    statistics back after its batch norm saves: once, as the twin does."""
    from torch.utils.checkpoint import checkpoint

    ours, theirs = (module.double() for module in _CHECKPOINTED[name](momentum))
    g = torch.Generator().manual_seed(7)
    # (instance norm: one length per batch, so that torch takes the unpadded batch at once)
    for lengths in ([6, 3, 4], [2, 6, 5], [4, 4, 6]) if name != "InstanceNorm1d" else ([4] * 3, [2] * 3, [5] * 3):
        x = torch.randn(3, CHANNELS, 6, generator=g, dtype=torch.float64)
        mask = (torch.arange(6) < torch.tensor(lengths)[:, None])[:, None, :]
        y = checkpoint(lambda a: ours(torch.relu(a), mask=mask), x.clone().requires_grad_(), use_reentrant=False)
        y.sum().backward()
        unpadded = (x[:, :, :lengths[0]] if name == "InstanceNorm1d" else
                    torch.cat([x[b, :, :n] for b, n in enumerate(lengths)], 1)[None])  # (counted positions as rows)
        checkpoint(lambda a: theirs(torch.relu(a)), unpadded.clone().requires_grad_(),
                   use_reentrant=False).sum().backward()
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())

def test_batched_gradients_and_double_backward_through_masked_twins_are_torch_autograds_per_vector():
    """(Where the running statistics are updated moved into the masked op's forward; its
    backward must still hand each input, weight and bias their own gradient.)"""
    g = torch.Generator().manual_seed(8)
    x, _, mask = _padded([5, 2, 7], seed=8, time=7)
    for module in (nt.BatchNorm1d(CHANNELS).double(), nt.GroupNorm(1, CHANNELS).double()):
        inputs = (x.clone().requires_grad_(), module.weight, module.bias)
        y = module(inputs[0], mask=mask)
        vectors = torch.randn(3, *y.shape, generator=g, dtype=torch.float64)
        batched = torch.autograd.grad(y, inputs, vectors, is_grads_batched=True, retain_graph=True)
        for k, vector in enumerate(vectors):
            for got, expected in zip(batched, torch.autograd.grad(y, inputs, vector, retain_graph=True)):
                torch.testing.assert_close(got[k], expected)
        torch.autograd.gradgradcheck(lambda a, w, b: module(a, mask=mask), inputs)


def test_a_channels_last_batch_with_a_position_mask_equals_the_contiguous_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, CHANNELS, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 1, 5, 6, generator=g) < 0.7
    plain, last = nt.BatchNorm2d(CHANNELS).double(), nt.BatchNorm2d(CHANNELS).double()
    y = plain(x, mask=mask)
    y_last = last(x.to(memory_format=torch.channels_last), mask=mask.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_last, y)
    torch.testing.assert_close(last.state_dict(), plain.state_dict())



def _layer_norm_2d(x, module):  # torchvision's and timm's LayerNorm2d: permute, layer_norm, permute back
    return F.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, module.weight, module.bias,
                        module.eps).permute(0, 3, 1, 2)


_CHANNELS_LAST = {"BatchNorm2d": lambda: (nt.BatchNorm2d(CHANNELS), torch.nn.BatchNorm2d(CHANNELS)),
                  "SyncBatchNorm": lambda: (nt.SyncBatchNorm(CHANNELS), torch.nn.BatchNorm2d(CHANNELS)),
                  "GroupNorm": lambda: (nt.GroupNorm(1, CHANNELS), torch.nn.GroupNorm(1, CHANNELS)),
                  "InstanceNorm2d": lambda: (nt.InstanceNorm2d(CHANNELS, track_running_stats=True),
                                             torch.nn.InstanceNorm2d(CHANNELS, track_running_stats=True)),
                  "LayerNorm2d": lambda: (nt.LayerNorm2d(CHANNELS), None)}


@pytest.mark.parametrize("name", sorted(_CHANNELS_LAST))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_masked_channels_last_batch_keeps_torch_nns_output_layout_in_training_and_evaluation(name, training):
    """mask= gave a contiguous output for channels_last input in training (channels_last in
    evaluation), where torch.nn keeps channels_last (contiguous for instance norm): a
    y.permute(0, 2, 3, 1).view(...) that works on torch.nn's output failed on the twin's."""
    ours, theirs = _CHANNELS_LAST[name]()
    ours.train(training)
    x = torch.randn(2, CHANNELS, 4, 5).to(memory_format=torch.channels_last)
    mask = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    expected = _layer_norm_2d(x, ours) if theirs is None else theirs.train(training)(x)
    y = ours(x, mask=mask)
    assert y.stride() == expected.stride() == ours(x).stride()


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_norm_with_a_mask_or_segments_keeps_the_layout_its_unmasked_forward_gives(layout, training):
    """Norm keeps a permuted input's layout; with mask= or segment_ids= it gave a contiguous
    output, except in evaluation with running statistics, so the layout flipped with eval()."""
    if layout == "transposed":
        x = torch.randn(3, 5, CHANNELS).transpose(1, 2)
        norm = nt.Norm("[b] c [t]", "c", c=CHANNELS, track_running_stats=True)
        mask = torch.rand(3, 1, 5, generator=torch.Generator().manual_seed(2)) < 0.7
    else:
        x = torch.randn(3, CHANNELS, 4, 5).to(memory_format=torch.channels_last)
        norm = nt.Norm("b c [h w]", "c", c=CHANNELS)
        mask = torch.rand(3, 1, 4, 5, generator=torch.Generator().manual_seed(2)) < 0.7
    norm.train(training)
    plain = norm(x)
    assert norm(x, mask=mask).stride() == plain.stride() == x.stride()
    ids = torch.arange(3 if layout == "transposed" else 4) % 2  # along the first bracketed axis
    assert norm(x, segment_ids=ids).stride() == plain.stride()


def test_norm_with_a_mask_on_a_transposed_input_compiles_into_one_graph_with_the_eager_layout():
    """Keeping the layout must not break torch.compile(fullgraph=True): sorting the strides
    to find the permutation did ("sort with non-constant keys")."""
    x = torch.randn(3, 5, CHANNELS).transpose(1, 2)
    mask = torch.rand(3, 1, 5, generator=torch.Generator().manual_seed(5)) < 0.7
    norm = nt.Norm("[b] c [t]", "c", c=CHANNELS)
    compiled = torch.compile(norm, fullgraph=True, backend="eager")(x, mask=mask)  # (dynamo: where it broke)
    torch.testing.assert_close(compiled, norm(x, mask=mask))
    assert compiled.stride() == norm(x).stride()

def test_a_mask_that_does_not_fit_fails_as_torch_shape_errors_do_naming_pattern_and_shape():
    x = torch.randn(2, CHANNELS, 5)
    before = x.clone()
    for module in (nt.BatchNorm1d(CHANNELS), nt.InstanceNorm1d(CHANNELS), nt.GroupNorm(1, CHANNELS),
                   nt.LayerNorm(5)):
        for mask in (torch.ones(2, 1, 4, dtype=torch.bool),  # wrong length
                     torch.ones(3, 2, CHANNELS, 5, dtype=torch.bool)):  # broadcasts, but to a larger shape
            with pytest.raises(RuntimeError, match=r"pattern '.*', input shape \(2, 3, 5\)") as caught:
                module(x, mask=mask)
            assert isinstance(caught.value, ValueError)
        with pytest.raises(TypeError, match="bool"):
            module(x, mask=torch.ones(2, 1, 5, dtype=torch.uint8))
    with pytest.raises(RuntimeError):  # torch's type for input without the channels
        torch.nn.GroupNorm(1, CHANNELS)(x[0])
    with pytest.raises(RuntimeError, match=r"expected input of shape \(N, 3, \*\), but got input of shape \(3, 5\)"):
        nt.GroupNorm(1, CHANNELS)(x[0], mask=torch.ones(5, dtype=torch.bool))
    assert torch.equal(x, before)


@pytest.mark.parametrize("call, layout", [
    ("LayerNorm", "tokens"), ("RMSNorm", "tokens"), ("GroupNorm", "channels"), ("InstanceNorm1d", "channels"),
    ("normalize_masked", "tokens"), ("numpy", "tokens"), ("numpy", "channels"),
])
def test_a_batch_by_time_padding_mask_is_told_the_indexing_that_fits_it_and_that_indexing_gives_torchs_norm(call,
                                                                                                          layout):
    # a (batch, time) attention mask beside (batch, time, features) or (batch, channels, time)
    # was told "give it the input's shape or size-1 axes", not where they go
    lengths = [7, 4, 2]
    tokens = layout == "tokens"
    x = torch.randn(3, 7, 4, dtype=torch.float64) if tokens else torch.randn(3, 4, 7, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    if call == "numpy":
        def run(m):
            pattern = "b t [d]" if tokens else "b c [t]"
            return torch.from_numpy(normlab.normalize(x.numpy(), pattern, mask=m.numpy()))
    elif call == "normalize_masked":
        from normlab.torch.masked import normalize_masked

        def run(m):
            return normalize_masked(x, "b t [d]", mask=m)[0]
    else:
        module = getattr(nt, call)(*((2, 4) if call == "GroupNorm" else (4,))).double()
        run = lambda m: module(x, mask=m)  # noqa: E731
    with pytest.raises(NormlabError) as caught:
        run(mask)
    index = re.search(r": (mask\[[^\]]*\]) \(size-1 axes for those it lacks\)", str(caught.value)).group(1)
    assert index == ("mask[..., None]" if tokens else "mask[:, None, :]")
    y = run(eval(index, {"mask": mask}))
    for b, n in enumerate(lengths):  # each sequence as torch's norm of it alone
        alone = x[b:b + 1, :n] if tokens else x[b:b + 1, :, :n]
        want = {"tokens": lambda a: (F.rms_norm(a, (4,), eps=None) if call == "RMSNorm" else F.layer_norm(a, (4,))),
                "channels": lambda a: (F.group_norm(a, 2) if call == "GroupNorm" else F.instance_norm(a))}[layout](alone)
        torch.testing.assert_close(y[b:b + 1, :n] if tokens else y[b:b + 1, :, :n], want)


def test_functional_instance_norm_leaves_an_all_padding_sample_out_of_the_running_statistics():
    x, _, mask = _padded([6, 0, 4], seed=3, time=7)
    running_mean, running_var = torch.full((CHANNELS,), 0.5, dtype=torch.float64), torch.full((CHANNELS,), 2.0,
                                                                                               dtype=torch.float64)
    rm, rv = running_mean.numpy().copy(), running_var.numpy().copy()
    functional.instance_norm(x.numpy(), rm, rv, use_input_stats=True, momentum=0.3, mask=mask.numpy())
    means, variances = [], []
    for b, n in ((0, 6), (2, 4)):  # torch on each real sample alone (momentum 1 keeps its statistics)
        mean, var = torch.zeros(CHANNELS, dtype=x.dtype), torch.ones(CHANNELS, dtype=x.dtype)
        F.instance_norm(x[b:b + 1, :, :n], mean, var, use_input_stats=True, momentum=1.0)
        means.append(mean)
        variances.append(var)
    torch.testing.assert_close(torch.from_numpy(rm), 0.7 * running_mean + 0.3 * torch.stack(means).mean(0))
    torch.testing.assert_close(torch.from_numpy(rv), 0.7 * running_var + 0.3 * torch.stack(variances).mean(0))


@pytest.mark.parametrize("track", [False, True])
def test_a_masked_instance_norm_refuses_a_sample_with_one_real_frame_as_torch_refuses_it_unpadded(track):
    # the masked instance norms took one counted frame, where torch.nn refuses one spatial element
    x, _, mask = _padded([6, 1, 0], seed=4, time=7)
    kwargs = dict(affine=True, track_running_stats=track)
    with pytest.raises(ValueError, match="more than 1 spatial element"):  # the oracle, on the unpadded sample
        torch.nn.InstanceNorm1d(CHANNELS, **kwargs).double()(x[1:2, :, :1])
    ours = nt.InstanceNorm1d(CHANNELS, **kwargs).double()
    before = [buffer.clone() for buffer in ours.buffers()]
    with pytest.raises(ValueError, match="more than 1 counted value"):
        ours(x, mask=mask)
    assert all(torch.equal(old, buffer) for old, buffer in zip(before, ours.buffers()))
    running = [np.zeros(CHANNELS), np.ones(CHANNELS)] if track else [None, None]
    with pytest.raises(NormlabError, match="more than 1 counted spatial element"):
        functional.instance_norm(x.numpy(), *running, mask=mask.numpy())
    assert not track or (running[0].tolist(), running[1].tolist()) == ([0.0] * CHANNELS, [1.0] * CHANNELS)
    # two real frames train, and an all-padding sample is no error (torch takes an empty one)
    x, _, mask = _padded([6, 2, 0], seed=4, time=7)
    assert ours(x, mask=mask).shape == functional.instance_norm(x.numpy(), *running, mask=mask.numpy()).shape


def test_masked_norm_under_vmap_and_forward_ad_keeps_the_numerics_contract():
    """Transforms run the torch composite, not the kernels: still float64 statistics,
    within 1e-4 of the float64 definition at |mean|/std = 1e6, and exact zeros for a
    constant group (float32 sums of the raw values were off by whole standard deviations)."""
    from torch.autograd import forward_ad
    from torch.func import vmap

    from normlab.torch.masked import normalize_masked

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 4, CHANNELS, 300, generator=g, dtype=torch.float64) + 1e6).float()
    x[1, :, 0] = 0.1  # channel 0 of the second batch: constant
    mask = torch.rand(2, 4, 1, 300, generator=g) < 0.7
    expected = torch.empty(x.shape, dtype=torch.float64)
    for b in range(2):
        for c in range(CHANNELS):
            values, counted = x[b, :, c].double(), mask[b, :, 0]
            mean, var = values[counted].mean(), values[counted].var(unbiased=False)
            expected[b, :, c] = (values - mean) / torch.sqrt(var + 1e-5)
    y = vmap(lambda a, m: normalize_masked(a, "[b] c [t]", mask=m).y)(x, mask)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=0)
    assert torch.equal(y[1, :, 0], torch.zeros_like(y[1, :, 0]))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x[0], torch.ones_like(x[0]))
        primal = forward_ad.unpack_dual(normalize_masked(dual, "[b] c [t]", mask=mask[0]).y).primal
    torch.testing.assert_close(primal.double(), expected[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["BatchNorm1d", "GroupNorm", "LayerNorm", "RMSNorm"])
def test_bfloat16_input_with_float32_parameters_keeps_torch_nns_dtype_under_transforms_too(name):
    """Mixed precision (float32 parameters, bfloat16 activations): torch.nn gives bfloat16,
    and so must the composite that vmap, forward AD and other devices than the CPU run (it
    gave float32, which the next bfloat16 layer refuses)."""
    from torch.autograd import forward_ad
    from torch.func import vmap

    # (no running statistics: vmap refuses their in-place update, as with torch.nn)
    make = {"BatchNorm1d": lambda m: m.BatchNorm1d(CHANNELS, track_running_stats=False),
            "GroupNorm": lambda m: m.GroupNorm(1, CHANNELS), "LayerNorm": lambda m: m.LayerNorm(7),
            "RMSNorm": lambda m: m.RMSNorm(7)}[name]
    ours, theirs = make(nt), make(torch.nn)
    x, _, mask = _padded([7, 4, 0, 5], seed=2, time=7)
    x = x.bfloat16()
    eager = ours(x, mask=mask)
    assert eager.dtype == theirs(x).dtype == torch.bfloat16
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, torch.ones_like(x)), mask=mask))
    per_sample = vmap(lambda sample, counted: ours(sample[None], mask=counted[None])[0])(x[:2], mask[:2])
    for y in (tangent.primal, tangent.tangent, per_sample):
        assert y.dtype == torch.bfloat16
    torch.testing.assert_close(tangent.primal, eager, atol=1e-2, rtol=1e-2)
