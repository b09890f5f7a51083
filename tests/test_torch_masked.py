"""``mask=`` in the normlab.torch modules and normlab.functional, against torch's own
modules run on the data with the padding removed (outputs at the counted positions,
parameter gradients, running statistics)."""

import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from normlab import functional  # noqa: E402


def _padded(batch=3, channels=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, generator=g, dtype=torch.float64) * 2 + 1
    lengths = torch.tensor([length, length - 3, 4][:batch])
    mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, :]
    return x, mask, lengths


def _gathered(x, mask):
    """The counted positions of every sample side by side: (1, C, total)."""
    return x.permute(1, 0, 2)[:, mask[:, 0, :]].unsqueeze(0)


def test_masked_batch_norm_equals_torch_batch_norm_on_the_unpadded_data():
    x, mask, _ = _padded()
    ours, theirs = nt.BatchNorm1d(4).double(), torch.nn.BatchNorm1d(4).double()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    for _ in range(2):
        y = ours(x, mask=mask)
        ref = theirs(_gathered(x, mask))
        torch.testing.assert_close(_gathered(y, mask), ref)
        (_gathered(y, mask) * ref.detach()).sum().backward()
        (ref * ref.detach()).sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    ours.eval()
    torch.testing.assert_close(ours(x, mask=mask), theirs.eval()(x))  # evaluation: running statistics


def test_masked_group_and_instance_norm_equal_torch_on_each_samples_unpadded_part():
    x, mask, lengths = _padded(seed=1)
    group, instance = nt.GroupNorm(2, 4).double(), nt.InstanceNorm1d(4, affine=True).double()
    y_group, y_instance = group(x, mask=mask), instance(x, mask=mask)
    for b, n in enumerate(lengths.tolist()):
        part = x[b:b + 1, :, :n]
        torch.testing.assert_close(y_group[b:b + 1, :, :n], torch.nn.functional.group_norm(part, 2, eps=1e-5))
        torch.testing.assert_close(y_instance[b:b + 1, :, :n], torch.nn.functional.instance_norm(part, eps=1e-5))


def test_masked_instance_norm_running_stats_follow_torch_on_one_unpadded_sample():
    x, mask, lengths = _padded(batch=2, seed=2)
    ours, theirs = nt.InstanceNorm1d(4, track_running_stats=True).double(), \
        torch.nn.InstanceNorm1d(4, track_running_stats=True).double()
    n = int(lengths[1])
    ours(x[1:2], mask=mask[1:2])
    theirs(x[1:2, :, :n])
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_masked_layer_and_rms_norm_equal_torch_on_each_rows_counted_elements():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 8, generator=g) < 0.6
    mask[:, 0] = True
    for ours, theirs in ((nt.LayerNorm(8, elementwise_affine=False), torch.nn.functional.layer_norm),
                         (nt.RMSNorm(8, elementwise_affine=False, eps=1e-6), torch.nn.functional.rms_norm)):
        y = ours.double()(x, mask=mask)
        kwargs = {"eps": 1e-6} if theirs is torch.nn.functional.rms_norm else {}
        loss, ref_loss = 0, 0
        for r in range(5):
            row = x[r][mask[r]]
            ref = theirs(row, (row.numel(),), **kwargs)
            torch.testing.assert_close(y[r][mask[r]], ref)
            loss = loss + (y[r][mask[r]] * ref.detach()).sum()
            ref_loss = ref_loss + (ref * ref.detach()).sum()
        gx, gref = torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref_loss, x)[0]
        torch.testing.assert_close(gx[mask], gref[mask])



@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16 weight", "f32 weight"])
@pytest.mark.parametrize("casting", ["llama", "gemma", "t5", "none", "imagegpt"])
def test_a_masked_rms_norm_with_a_casting_recipe_rounds_and_types_its_tokens_as_without_the_mask(casting,
                                                                                                 weight_dtype):
    """mask= ignored the recipe: bfloat16 tokens with a float32 weight came back bfloat16
    ("llama": float32 without a mask), and a quarter of the counted values rounded one
    bfloat16 unit away. Oracle: the unmasked call on the kernels (x̂ in float32, then the
    recipe's casts), which the mask leaves as it is on whole tokens."""
    from normlab.torch import use_path

    g = torch.Generator().manual_seed(11)
    ours = nt.RMSNorm(64, casting=casting, weight_offset=1.0 if casting == "gemma" else 0.0)
    with torch.no_grad():
        ours.weight.normal_(generator=g)
    ours = ours.to(weight_dtype)
    x = torch.randn(3, 9, 64, generator=g).bfloat16()
    mask = (torch.arange(9) < torch.tensor([9, 4, 0])[:, None])[..., None]  # (B, T, 1): padded tokens
    y = ours(x, mask=mask)
    with use_path("kernel"):
        expected = ours(x)
    assert y.dtype == expected.dtype
    counted = mask[..., 0]
    got, want = y[counted].double(), expected[counted].double()
    assert ((got - want).abs() > 1e-6 * want.abs()).double().mean() < 0.02  # (a float32 unit may flip a rounding)
    assert not y[~counted].any()



def _normalized_under(route, x, **kwargs):
    from torch.autograd import forward_ad

    from normlab.torch.masked import normalize_masked

    if route == "vmap":  # (one sample: x and its mask)
        return torch.func.vmap(lambda a, m: normalize_masked(a, "c [t]", mask=m).y)(x[None], kwargs["mask"][None])
    if route == "forward AD":
        with forward_ad.dual_level():
            return normalize_masked(forward_ad.make_dual(x, torch.ones_like(x)), "c [t]", **kwargs)
    if route == "bfloat16 weight":
        return normalize_masked(x, "c [t]", weight=torch.ones(4, dtype=torch.bfloat16), params="c", **kwargs)
    if route == "meta":
        return normalize_masked(x.to("meta"), "c [t]", **{k: v.to("meta") for k, v in kwargs.items()})
    return normalize_masked(x, "c [t]", **kwargs)


@pytest.mark.parametrize("route", ["vmap", "forward AD", "bfloat16 weight", "meta"])
def test_a_mask_or_ids_that_do_not_fit_are_refused_in_eagers_words_off_the_kernels(route):
    """The composite (transforms, other devices, parameters NumPy cannot read) let torch's
    broadcast refuse: "The expanded size of the tensor (4) must match the existing size (7)",
    without the pattern, where the kernels name the pattern, the shapes and a fix."""
    x = torch.randn(4, 7)
    misfits = [{"mask": torch.ones(7, 1, dtype=torch.bool)}]
    if route not in ("vmap", "meta"):  # (ids on meta: their largest cannot be read)
        misfits.append({"segment_ids": torch.zeros(5, dtype=torch.long)})
    for kwargs in misfits:
        with pytest.raises(RuntimeError) as eager:
            _normalized_under("kernels", x, **kwargs)
        with pytest.raises(RuntimeError, match=re.escape(str(eager.value))):
            _normalized_under(route, x, **kwargs)

def test_norm_with_segments_and_a_mask_equals_batch_norm_on_each_segments_counted_rows():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    ids = torch.tensor([1, 0, 0, 2, 1, 1, 0, 2, 2, 1, 0, 2])
    mask = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)[:, None]
    norm = nt.Norm("[n] c", params="c", c=3, track_running_stats=True, momentum=1.0).double()
    y = norm(x, mask=mask, segment_ids=ids)
    means, variances = [], []
    for s in range(3):
        rows = (ids == s) & mask[:, 0]
        ref = torch.nn.functional.batch_norm(x[rows], None, None, training=True)
        torch.testing.assert_close(y[rows], ref)
        means.append(x[rows].mean(0))
        variances.append(x[rows].var(0))
    # running statistics: the segments' own statistics averaged (momentum 1 keeps the batch's)
    torch.testing.assert_close(norm.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack(variances).mean(0))


def test_functional_batch_norm_with_a_mask_updates_running_stats_as_torch_on_the_unpadded_data():
    x, mask, _ = _padded(seed=5)
    rm, rv = np.zeros(4), np.ones(4)
    y = functional.batch_norm(x.numpy(), rm, rv, training=True, mask=mask.numpy())
    trm, trv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ref = torch.nn.functional.batch_norm(_gathered(x, mask), trm, trv, training=True)
    np.testing.assert_allclose(_gathered(torch.from_numpy(y), mask).numpy(), ref.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)


def test_a_mask_of_the_wrong_kind_fails_with_torch_exceptions():
    x, mask, _ = _padded()
    with pytest.raises(TypeError, match="bool"):
        nt.BatchNorm1d(4)(x.float(), mask=mask.int())
    with pytest.raises(ValueError, match="does not broadcast"):
        nt.BatchNorm1d(4)(x.float(), mask=mask[:, :, :3])
    one_counted = torch.zeros_like(mask)
    one_counted[0, 0, 0] = True  # one value per channel: torch refuses it in training
    with pytest.raises(ValueError, match="more than 1 counted value"):
        nt.BatchNorm1d(4)(x.float(), mask=one_counted)



@pytest.mark.parametrize("build", [
    lambda: torch.nn.BatchNorm2d(4, affine=False, track_running_stats=False),
    lambda: torch.nn.SyncBatchNorm(4, affine=False, track_running_stats=False),
    lambda: torch.nn.InstanceNorm2d(4),
    lambda: torch.nn.LayerNorm([2, 2], elementwise_affine=False),
    lambda: torch.nn.GroupNorm(2, 4, affine=False),
    lambda: torch.nn.RMSNorm([2, 2], elementwise_affine=False),
], ids=["BatchNorm2d", "SyncBatchNorm", "InstanceNorm2d", "LayerNorm", "GroupNorm", "RMSNorm"])
def test_an_integer_input_with_a_mask_raises_torchs_error_as_without_one(build):
    """torch.nn's kernels refuse an integer input ("not implemented for 'Long'"); a twin
    without parameters or running statistics computed an integer output from the masked
    statistics (RMSNorm raised torch.finfo's TypeError)."""
    x = torch.randint(0, 5, (3, 4, 2, 2))
    reference = build()
    with pytest.raises(NotImplementedError) as expected:
        reference(x)
    with pytest.raises(NotImplementedError, match=re.escape(str(expected.value))):
        nt.convert(reference)(x, mask=torch.ones(3, 1, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_norm_and_normalize_masked_refuse_an_integer_input_with_a_mask_as_without_one(dtype):
    """Without a mask, Norm and normalize raise torch's RuntimeError (var_mean refuses the
    input); with one they returned the input's dtype of made-up values (uint8: 255 for -1)."""
    from normlab.torch.masked import normalize_masked

    x = torch.randint(0, 2, (3, 4, 2)).to(dtype)
    mask = torch.ones(3, 1, 2, dtype=torch.bool)
    for norm in (nt.Norm("b c [t]"), nt.Norm("[b] c [t]", "c", c=4, track_running_stats=True)):
        with pytest.raises(RuntimeError):
            norm(x)
        with pytest.raises(RuntimeError, match=f"got {dtype}; pass x.float"):
            norm(x, mask=mask)
        assert norm.running_mean is None or norm.running_mean.eq(0).all()
    with pytest.raises(RuntimeError, match=re.escape("pattern 'b c [t]', input shape (3, 4, 2)")):
        normalize_masked(x, "b c [t]", mask=mask)


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm"])
def test_functional_norms_refuse_a_wrong_mask_in_evaluation_as_in_training_and_as_the_twins_do(name):
    """With running statistics the mask is unused, but a mask that training refuses is
    refused here too (the torch twins check it in eval()): it used to pass silently."""
    x, mask, _ = _padded()
    rm, rv = np.zeros(4), np.ones(4)
    call = {"batch_norm": lambda m: functional.batch_norm(x.numpy(), rm, rv, training=False, mask=m),
            "instance_norm": lambda m: functional.instance_norm(x.numpy(), rm, rv, use_input_stats=False, mask=m)}[name]
    module = (nt.BatchNorm1d(4) if name == "batch_norm" else nt.InstanceNorm1d(4, track_running_stats=True)).eval()
    np.testing.assert_array_equal(call(mask.numpy()), call(None))  # a right mask changes nothing
    for wrong in (mask[:, :, :3], mask[:, 0, :]):
        with pytest.raises(RuntimeError):
            module(x, mask=wrong)
        with pytest.raises(ValueError, match=r"pattern '.*', input shape \(3, 4, 9\): mask of shape .* does not broadcast.*pass a mask of shape \(3, 4, 9\)"):
            call(wrong.numpy())
    with pytest.raises(ValueError, match="mask has dtype int64.*mask != 0"):
        call(mask.numpy().astype(np.int64))

def test_masked_batch_norm_channel_counted_nowhere_gives_bias_and_keeps_its_running_stats():
    x, mask, _ = _padded()
    mask = mask.expand(-1, 4, -1).clone()
    mask[:, 2, :] = False  # channel 2: nothing counted, as SyncBatchNorm allows on its ranks
    ours, theirs = nt.BatchNorm1d(4).double(), torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        ours.running_mean.fill_(0.5)
        ours.running_var.fill_(2.0)
    kept = [0, 1, 3]
    theirs.load_state_dict({k: v[kept] if v.dim() else v for k, v in ours.state_dict().items()})
    y = ours(x, mask=mask)
    assert torch.equal(y[:, 2, :], ours.bias[2].detach().expand(3, 9))  # exactly bias (Flax's empty group)
    ref = theirs(_gathered(x[:, kept], mask[:, :1]))  # torch on the other channels' counted positions
    torch.testing.assert_close(_gathered(y[:, kept], mask[:, :1]), ref)
    assert ours.running_mean[2].item() == 0.5 and ours.running_var[2].item() == 2.0
    torch.testing.assert_close(ours.running_mean[kept], theirs.running_mean)
    torch.testing.assert_close(ours.running_var[kept], theirs.running_var)
    single = mask.clone()
    single[0, 2, 0] = True  # one counted value: torch's rule refuses it
    with pytest.raises(ValueError, match="more than 1 counted value"):
        ours(x, mask=single)


HUGE_IDS = torch.tensor([0, 5, 5, 10**12])  # raw ids (node or file numbers), never compacted


@pytest.mark.parametrize("route", ["kernels", "functorch", "complex", "Norm"])
def test_a_segment_id_of_a_trillion_is_refused_on_every_route_saying_how_to_compact_the_ids(route):
    """The NumPy API's refusal, on the torch routes too: the composite ones (functorch's
    transforms, complex input, other devices) would allocate statistics for every id up to
    the largest, and the kernel route advised passing the very num_segments it had used."""
    from normlab.torch.masked import normalize_masked

    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError) as error:
        if route == "functorch":
            torch.func.grad(lambda t: normalize_masked(t, "[n] c", segment_ids=HUGE_IDS).y.sum())(x)
        elif route == "Norm":
            nt.Norm("[n] c")(x, segment_ids=HUGE_IDS)
        else:
            normalize_masked(x.to(torch.complex128) if route == "complex" else x, "[n] c", segment_ids=HUGE_IDS)
    message = str(error.value)
    assert "'[n] c'" in message and "(4, 3)" in message and str(10**12) in message
    assert "torch.unique(segment_ids, return_inverse=True)[1]" in message and "num_segments=" not in message


def test_the_compacted_ids_the_torch_error_suggests_give_batch_norm_of_each_segment():
    x = torch.randn(6, 3, dtype=torch.float64)
    ids = torch.tensor([7, 7, 10**12, 7, 10**12, 10**12])
    compact = torch.unique(ids, return_inverse=True)[1]
    y = nt.Norm("[n] c")(x, segment_ids=compact)
    for segment in (7, 10**12):
        rows = ids == segment
        torch.testing.assert_close(y[rows], torch.nn.functional.batch_norm(x[rows], None, None, training=True))


def test_normalize_masked_result_names_its_fields_with_the_statistics_torch_gives_the_unpadded_rows():
    from normlab.torch.masked import normalize_masked

    x, mask, lengths = _padded()
    result = normalize_masked(x, "b c [t]", mask=mask)
    y, mean, rstd, count = result
    assert result.y is y and result.mean is mean and result.rstd is rstd and result.count is count
    for b in range(x.shape[0]):
        kept = x[b, :, :lengths[b]]
        var, ref_mean = torch.var_mean(kept, dim=-1, correction=0)
        torch.testing.assert_close(result.mean[b].reshape(-1), ref_mean)
        torch.testing.assert_close(result.rstd[b].reshape(-1), torch.rsqrt(var + 1e-5))
        assert (result.count[b] == lengths[b]).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls_name, args", [("BatchNorm1d", (4,)), ("InstanceNorm1d", (4, 1e-5, 0.1, True, True)),
                                             ("GroupNorm", (2, 4)), ("LayerNorm", (9,))],
                         ids=["BatchNorm1d", "InstanceNorm1d", "GroupNorm", "LayerNorm"])
def test_a_mask_under_fake_tensor_mode_propagates_torch_nn_s_shapes(cls_name, args, training):
    """Shape propagation under FakeTensorMode with mask=: the output and the input gradient
    have the metadata of torch.nn's module on the same fake input (a mask changes values
    only), where the check on the counts per channel has no values to read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    found = []
    for module_class in (getattr(torch.nn, cls_name), getattr(nt, cls_name)):
        with FakeTensorMode():
            module = module_class(*args).train(training)
            x, mask, _ = _padded()
            x = x.float().requires_grad_()
            y = module(x, mask=mask) if module_class.__module__.startswith("normlab") else module(x)
            y.sum().backward()
            found.append((type(y), y.shape, y.dtype, y.stride(), x.grad.shape))
    assert found[1] == found[0]


def test_a_masked_call_asks_once_whether_it_is_traced_and_walks_no_pattern_for_sizes_it_lacks(monkeypatch):
    """A small masked call's per-call work: torch.jit.is_tracing was asked twice (the second
    answer implied by the first), and make_plan listed the pattern's axis names for sizes
    that a batch norm's pattern does not have."""
    import sys

    from normlab import notation

    asked, walked = [], []
    is_tracing, names = torch.jit.is_tracing, notation.Pattern.names
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: asked.append(
        sys._getframe(1).f_code.co_filename.endswith("masked.py")) or is_tracing())
    monkeypatch.setattr(notation.Pattern, "names", property(lambda self: walked.append(
        sys._getframe(1).f_code.co_filename.endswith("plan.py")) or names.fget(self)))
    norm, x = nt.BatchNorm1d(4), torch.randn(3, 4, 5)
    mask = torch.ones(3, 1, 5, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(2):  # (the first call of a shape fills the caches)
            asked.clear(), walked.clear()
            norm(x, mask=mask)
    assert asked.count(True) == 1 and not any(walked)


# NumPy API checks the twins never need, each once a call on every mask= forward and backward:
# the refusal of an np.ma mask or segment ids with masked elements (the twins hand NumPy plain
# arrays), and of long double parameters and statistics (d1bb24f; they hand float32 or float64);
# and the check of running statistics that require grad (6388e2f), which a layer norm has none of
_NOT_ON_THE_TWINS_PATH = [("_refuse_masked_elements", torch.float64), ("readable_dtype", torch.float32),
                          ("readable_dtype", torch.float64), ("_needs_grad", torch.float32)]


@pytest.mark.parametrize("check, dtype", _NOT_ON_THE_TWINS_PATH, ids=lambda v: str(v))
def test_a_masked_twin_call_does_not_enter_the_numpy_api_checks_it_never_needs(check, dtype):
    """A cost on the per-call path for inputs the twins never pass. Oracle:
    torch.nn.functional.layer_norm of the counted rows (each row's mask all True or False)."""
    import sys

    ours = nt.LayerNorm(8).to(dtype)
    x = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])[..., None].expand(2, 3, 8)
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == check:
            entered.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        y = ours(x, mask=mask)
        y[mask].sum().backward()
    finally:
        sys.setprofile(None)
    assert entered == []
    expected = torch.nn.functional.layer_norm(x.detach(), (8,), ours.weight, ours.bias)
    torch.testing.assert_close(y[mask], expected[mask])


def test_a_contiguous_masked_call_lays_out_its_output_in_two_calls():
    """Where the masked output keeps its layout (a contiguous input, every twin but
    LayerNorm2d), the layout step asks two things of the call (the module's channels-last
    rule, the input's contiguity); 62ae607 made it ask functorch's state too, first, on
    every mask= call. Oracle for the values: F.layer_norm of the fully counted input."""
    import sys

    ours = nt.LayerNorm(8)
    x = torch.randn(2, 3, 8)
    made = []

    def profile(frame, event, arg):
        if event == "c_call" and frame.f_code.co_name == "_unmasked_layout":
            made.append(getattr(arg, "__name__", arg))

    sys.setprofile(profile)
    try:
        y = ours(x, mask=torch.ones(2, 3, 8, dtype=torch.bool))
    finally:
        sys.setprofile(None)
    assert len(made) == 2, made
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,), ours.weight, ours.bias))


@pytest.mark.parametrize("name, shape", [("InstanceNorm1d", (4, 3, 5)), ("InstanceNorm2d", (2, 3, 4, 5))])
def test_an_instance_norm_untracked_after_construction_updates_its_statistics_in_evaluation_with_a_mask_too(name,
                                                                                                           shape):
    """An instance norm built with running statistics and then set track_running_stats=False
    normalizes each instance in evaluation, and torch.nn's forward still hands it the running
    statistics, which torch's instance_norm updates; the unmasked twin did so, the mask= call
    (all True: the same statistics) left them as they were."""
    torch.manual_seed(0)
    reference = getattr(torch.nn, name)(3, affine=True, track_running_stats=True)
    twin = getattr(nt, name)(3, affine=True, track_running_stats=True)
    for module in (reference, twin):
        module.track_running_stats = False
        module.eval()
    x = torch.randn(shape) * 2 + 1
    expected = reference(x)
    torch.testing.assert_close(twin(x, mask=torch.ones(shape, dtype=torch.bool)), expected)
    torch.testing.assert_close(twin.running_mean, reference.running_mean)
    torch.testing.assert_close(twin.running_var, reference.running_var)


_FAILING_BATCH_NORM_CALLS = [("BatchNorm2d, 4 channels of 8", lambda **kw: torch.nn.BatchNorm2d(8, **kw), (2, 4, 3, 3)),
                             ("BatchNorm1d, 4 channels of 8", lambda **kw: torch.nn.BatchNorm1d(8, **kw), (2, 4, 5)),
                             ("BatchNorm3d, 4 channels of 8", lambda **kw: torch.nn.BatchNorm3d(8, **kw),
                              (2, 4, 1, 2, 2)),
                             ("BatchNorm2d, 3 axes", lambda **kw: torch.nn.BatchNorm2d(8, **kw), (2, 8, 3)),
                             ("BatchNorm1d, one value a channel", lambda **kw: torch.nn.BatchNorm1d(8, **kw), (1, 8))]
_BATCH_NORM_SETTINGS = {"momentum=0.1": {}, "momentum=None": {"momentum": None},
                        "track_running_stats=False": {"track_running_stats": False}, "affine=False": {"affine": False}}


@pytest.mark.parametrize("settings", list(_BATCH_NORM_SETTINGS))
@pytest.mark.parametrize("name, make, shape", _FAILING_BATCH_NORM_CALLS, ids=[c[0] for c in _FAILING_BATCH_NORM_CALLS])
def test_a_masked_batch_norm_call_that_fails_leaves_the_state_torch_nns_call_leaves(name, make, shape, settings):
    """A masked batch norm given the wrong channel count raised before it counted the batch:
    BatchNorm2d(8) on (2, 4, 3, 3) with mask= left num_batches_tracked at 0, where torch.nn's
    (and the twin without a mask) count it before their op refuses the channels. Every
    buffer and parameter after a failing call with an all-True mask is torch.nn's after its
    call without one. Oracle: torch.nn's module, its error type and its state."""
    reference = make(**_BATCH_NORM_SETTINGS[settings])
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with pytest.raises((RuntimeError, ValueError)) as expected:
        reference(x)
    with pytest.raises(type(expected.value)):
        twin(x, mask=torch.ones(shape, dtype=torch.bool))
    theirs, ours = reference.state_dict(), twin.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("groups, channels, shape", [(2, 8, (2, 6, 5)), (2, 8, (3, 4, 5, 5)), (3, 9, (2, 6, 4))],
                         ids=["6 channels of 8", "4 channels of 8, 2d", "6 channels of 9"])
def test_a_masked_group_norm_without_parameters_takes_any_channels_its_groups_divide(groups, channels, shape):
    """GroupNorm(2, 8, affine=False) computes an input of 6 channels (groups of 3) in
    torch.nn, whose forward reads num_channels only through the weight; with mask= the twin
    refused it ("normalizes 8 channels on axis 1"). It now normalizes it, each group's
    statistics from its counted elements. Oracle: torch.nn's module on the counted
    positions alone, and on the whole input for an all-True mask."""
    reference = torch.nn.GroupNorm(groups, channels, affine=False)
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(shape, dtype=torch.bool)
    torch.testing.assert_close(twin(x, mask=mask), reference(x))
    mask[..., -1] = False
    torch.testing.assert_close(twin(x, mask=mask)[..., :-1], reference(x[..., :-1]))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make, shape", [(lambda: torch.nn.BatchNorm1d(8), (2, 0)),
                                         (lambda: torch.nn.BatchNorm2d(8), (2, 0, 2, 2)),
                                         (lambda: torch.nn.BatchNorm2d(8, momentum=None), (3, 0, 1, 1))],
                         ids=["BatchNorm1d, (2, 0)", "BatchNorm2d, (2, 0, 2, 2)", "BatchNorm2d momentum=None"])
def test_a_masked_batch_norm_takes_an_empty_input_of_other_channels_as_torch_nn_does(make, shape, training):
    """A batch norm given an empty input of other channels than its own (zero here) with
    mask= raised "normalizes 8 channels", where torch.nn's module (and the twin without a
    mask) returns the empty output and counts the batch in training. Oracle: torch.nn's
    module, its output and its state after the call."""
    reference = make().train(training)
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape)
    expected = reference(x)
    got = twin(x, mask=torch.ones(shape, dtype=torch.bool))
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.stride() == expected.stride()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=0, atol=0, equal_nan=True)


def _call_and_backward(module, x, **mask):
    """What a call and an empty backward leave: the output, or the error's type and words; the
    input's and parameters' gradients; every buffer and parameter."""
    x = x.clone().requires_grad_()
    try:
        y = module(x, **mask)
        y.sum().backward()
    except (RuntimeError, ValueError, IndexError) as error:
        return error, None, None, None
    grads = {name: p.grad for name, p in module.named_parameters()}
    return y.detach(), x.grad, grads, module.state_dict()


_EMPTY_CALLS = [(name, args, shape) for name, args, shapes in [
    ("BatchNorm1d", (8,), [(0, 4), (0, 4, 3), (0, 8, 3), (2, 4, 0)]),
    ("BatchNorm2d", (8,), [(0, 4, 2, 2), (0, 8, 2, 2), (0, 4, 0, 2)]),
    ("BatchNorm3d", (8,), [(0, 4, 2, 2, 2)]),
    ("InstanceNorm1d", (8, 1e-5, 0.1, True, True), [(0, 4, 3), (0, 8, 3)]),
    ("InstanceNorm2d", (8, 1e-5, 0.1, True, True), [(0, 4, 2, 2), (0, 8, 2, 2)]),
    ("InstanceNorm3d", (8,), [(0, 8, 2, 2, 2)]),
    ("GroupNorm", (2, 8), [(0, 4, 2, 2), (0, 3, 2), (0, 8, 2, 2)]),
    ("LayerNorm", (8,), [(0, 4), (0, 3, 8)]),
    ("RMSNorm", (8,), [(0, 4), (3, 0, 8)])] for shape in shapes]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, args, shape", _EMPTY_CALLS, ids=[f"{n}{s}" for n, _, s in _EMPTY_CALLS])
def test_an_empty_input_with_a_mask_gives_what_torch_nn_gives(name, args, shape, training, affine):
    """BatchNorm2d(8) on an empty batch of 4 channels, (0, 4, 2, 2), returns an empty output
    in torch.nn (its op returns before it reads the channels), as the twin without a mask
    does; with mask= the twin refused it as the wrong channel count. With nothing to count,
    a masked call gives what torch.nn gives: the output, the error (type and words first),
    the gradients of the empty backward, every buffer (num_batches_tracked). Oracle:
    torch.nn's module on the same input (an all-True mask is no mask)."""
    make = getattr(torch.nn, name)
    if name.startswith(("BatchNorm", "Group")):
        reference = make(*args, affine=affine)
    elif name.startswith("Instance"):
        reference = make(*args[:3], affine, *args[4:]) if len(args) > 1 else make(*args, affine=affine)
    else:
        reference = make(*args, elementwise_affine=affine)
    reference.train(training)
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(shape)
    theirs = _call_and_backward(reference, x)
    ours = _call_and_backward(twin, x, mask=torch.ones(shape, dtype=torch.bool))
    if isinstance(theirs[0], Exception):
        assert isinstance(ours[0], type(theirs[0])) and str(ours[0]).startswith(str(theirs[0])), ours[0]
        return
    assert not isinstance(ours[0], Exception), ours[0]
    y, grad, param_grads, state = ours
    assert y.shape == theirs[0].shape and y.dtype == theirs[0].dtype and torch.equal(y, theirs[0])
    assert torch.equal(grad, theirs[1])
    assert param_grads.keys() == theirs[2].keys()
    for key, expected in theirs[2].items():
        assert (param_grads[key] is None) == (expected is None), key
        assert expected is None or torch.equal(param_grads[key], expected), key
    assert list(state) == list(theirs[3])
    for key, expected in theirs[3].items():  # (an instance norm's over no samples: NaN, in torch.nn's too)
        torch.testing.assert_close(state[key], expected, rtol=0, atol=0, equal_nan=True, msg=key)


_SEGMENTED_CALLS = {
    "eager": lambda norm, x, kw: norm(x, **kw),
    "with grad": lambda norm, x, kw: norm(x.requires_grad_(), **kw),
    "bfloat16": lambda norm, x, kw: norm(x.bfloat16(), **kw),
    "normalize_masked": lambda norm, x, kw: nt.masked.normalize_masked(x, "[n] c", **kw),
    "vmap": lambda norm, x, kw: torch.func.vmap(lambda v: norm(v, **kw, num_segments=3))(x[None]),
    "jit.trace": lambda norm, x, kw: torch.jit.trace(lambda v: norm(v, **kw), (x,)),
    "compiled": lambda norm, x, kw: torch.compile(lambda v: norm(v, **kw), backend="eager")(x),
}


_NOT_STR_AXES = {"int": 0, "0-d array": np.array("n"), "two names": np.array(["n", "c"])}


@pytest.mark.parametrize("axis_name, call", [(axis, call) for axis in _NOT_STR_AXES for call in _SEGMENTED_CALLS
                                             if call != "compiled" or axis != "two names"])
def test_a_segment_axis_that_is_not_a_str_is_torchs_type_error_naming_the_pattern_and_the_axes(axis_name, call):
    # normlab.masked refuses it with an InputError (a ValueError), which reached the twin's
    # caller as it was: neither torch's TypeError for an argument of the wrong type nor the
    # RuntimeError an int used to raise as "not a bracketed axis"; under torch.compile the op's
    # schema refused it in other words
    if call == "compiled":
        torch._dynamo.reset()
    axis = _NOT_STR_AXES[axis_name]
    norm = nt.Norm("[n] c", affine=False)
    kw = dict(segment_ids=torch.tensor([0, 0, 1, 1, 1, 2]), segment_axis=axis)
    with pytest.raises(TypeError) as info:
        _SEGMENTED_CALLS[call](norm, torch.randn(6, 4), kw)
    for words in ("segment_axis", "as a str", "pass one of 'n'", "'[n] c'", "(6, 4)"):
        assert words in str(info.value)
