"""Everyday PyTorch training and inference recipes around converted models: autocast,
activation checkpointing and offloading, saved tensors changed in place, per-sample
gradients, checkpoints loaded both ways, weight averaging, permuted inputs and the
errors torch raises. Oracle: the same recipe on torch.nn's own modules (same seed, same
inputs), compared on outputs and their layout, gradients, running statistics and
exception types."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from torch import nn  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.twins import randomized_pair  # noqa: E402

D = torch.float64


def _converted_pair(build):
    """``(reference, converted)``: a torch.nn model and its converted deep copy."""
    torch.manual_seed(0)
    reference = build()
    return reference, nt.convert(copy.deepcopy(reference))


def _assert_same_state(reference, twin, **tolerance):
    expected, got = reference.state_dict(), twin.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tolerance, msg=name)


def _assert_same_grads(reference, twin, **tolerance):
    for (name, p), q in zip(reference.named_parameters(), twin.parameters()):
        assert (q.grad is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **tolerance, msg=name)


def _weighted_sum(y):
    """A loss whose gradient differs per element (a plain sum has a zero gradient through a norm)."""
    return (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()


# (torch.nn class, constructor arguments, input shape): each twin's kernel path with gradients
TWINS = [
    ("LayerNorm", (6,), (4, 3, 6)),  # the cached row path
    ("RMSNorm", (6,), (4, 3, 6)),
    ("GroupNorm", (2, 4), (3, 4, 5)),
    ("BatchNorm1d", (4,), (5, 4, 3)),  # batch norm's training kernels
    ("InstanceNorm1d", (4, 1e-5, 0.1, True, True), (3, 4, 5)),  # the custom op's eager path
]


@pytest.mark.parametrize("cls_name, args, shape", TWINS)
@pytest.mark.parametrize("training", [True, False])
def test_allow_mutation_on_saved_tensors_gives_the_gradients_of_the_forward_values_as_torch_nn(
        cls_name, args, shape, training):
    """Inside ``torch.autograd.graph.allow_mutation_on_saved_tensors`` a tensor saved for
    backward may change in place (an optimizer step on the weight, an in-place residual
    on the input); autograd keeps a copy, and the gradient is that of the forward's values."""
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, D)
    x0 = torch.randn(shape, dtype=D)
    results = []
    for module in (reference.train(training), twin.train(training)):
        x = x0.clone().requires_grad_()
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            hidden = x * 1.0
            y = module(hidden)
            hidden.mul_(3.0)
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(2.0)
            _weighted_sum(y).backward()
        results.append((y.detach(), x.grad, [p.grad for p in module.parameters()]))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_of_integer_or_complex_input_raises_or_computes_as_torch_nn(dtype, eps):
    """Token ids fed to a norm by mistake: torch's own exception type (no machine epsilon
    of an integer dtype to look up); complex input computes, as in torch.nn."""
    x = (torch.arange(12) % 3 + 1).reshape(3, 4).to(dtype)
    reference, twin = nn.RMSNorm(4, eps=eps), nt.RMSNorm(4, eps=eps)
    try:
        expected = reference(x)
    except Exception as error:  # noqa: BLE001 (whatever torch raises, the twin must raise)
        with pytest.raises(type(error)):
            twin(x)
    else:
        torch.testing.assert_close(twin(x), expected)


def _transposed(shape):
    """A tensor of ``shape`` whose last two axes are stored swapped (a conv's (N, C, L)
    output transposed to (N, L, C) before a LayerNorm, or back before a BatchNorm1d)."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=D).transpose(-1, -2)


LAYOUTS = {
    "transposed": _transposed,
    "channels_last": lambda shape: torch.randn(shape, dtype=D).contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda shape: torch.randn(shape, dtype=D).contiguous(memory_format=torch.channels_last_3d),
    "permuted": lambda shape: torch.randn(shape[2], shape[3], shape[0], shape[1], dtype=D).permute(2, 3, 0, 1),
}
LAYOUT_CASES = [  # (torch.nn class, constructor arguments, input shape, layout)
    ("LayerNorm", (6,), (2, 5, 6), "transposed"),
    ("LayerNorm", ((3, 4),), (2, 5, 3, 4), "channels_last"),
    ("RMSNorm", (6,), (2, 5, 6), "transposed"),
    ("InstanceNorm2d", (4, 1e-5, 0.1, True, True), (2, 4, 3, 5), "channels_last"),
    ("InstanceNorm1d", (4,), (2, 4, 6), "transposed"),
    ("GroupNorm", (2, 4), (2, 4, 6), "transposed"),
    ("GroupNorm", (2, 4), (2, 4, 3, 5), "channels_last"),
    ("GroupNorm", (2, 4), (2, 4, 2, 3, 2), "channels_last_3d"),
    ("BatchNorm1d", (4,), (3, 4, 6), "transposed"),
    ("BatchNorm2d", (4,), (2, 4, 3, 5), "channels_last"),
    ("BatchNorm2d", (4,), (2, 4, 3, 5), "permuted"),
    ("BatchNorm3d", (4,), (2, 4, 2, 3, 2), "channels_last_3d"),
]


@pytest.mark.parametrize("cls_name, args, shape, layout", LAYOUT_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_a_permuted_input_gives_torch_nn_s_output_layout_values_and_gradients(cls_name, args, shape, layout,
                                                                             training):
    """torch.nn's CPU norms return a contiguous output for a transposed or permuted input
    (batch and group norm keep channels_last), so code that follows them with ``.view``
    works; the twins lay out their output the same way."""
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, D)
    x0 = LAYOUTS[layout](shape)
    results = []
    for module in (reference.train(training), twin.train(training)):
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        y = module(x)
        _weighted_sum(y).backward()
        results.append((y, x.grad))
    (expected, expected_grad), (y, grad) = results
    assert y.stride() == expected.stride()  # (so y.view(-1) works where torch.nn's does)
    torch.testing.assert_close(y, expected)
    assert grad.stride() == expected_grad.stride()
    torch.testing.assert_close(grad, expected_grad)
    _assert_same_grads(reference, twin)
    _assert_same_state(reference, twin)


@pytest.mark.parametrize("change, cls_name, args, shape", [
    (change, *twin) for twin in TWINS for change in ("input", "weight", "bias")
    if not (change == "bias" and twin[0] == "RMSNorm")])  # (torch.nn.RMSNorm has no bias)
def test_an_in_place_change_before_backward_trains_or_raises_as_in_torch_nn(cls_name, args, shape, change):
    """Only the norm's parameters train (the input, a frozen embedding's output, needs no
    gradient), and the input, the weight or the bias changes in place before backward (an
    in-place residual, an optimizer step, on the bias alone in bias-only fine-tuning):
    torch.nn.RMSNorm saves neither input nor weight and trains; the other norms save both
    and raise autograd's RuntimeError; the layer norm saves its bias too, the group, batch
    and instance norms do not and train on."""
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, D)
    x0 = torch.randn(shape, dtype=D)
    results = []
    for module in (reference, twin):
        x = x0.clone()
        y = module(x)
        with torch.no_grad():
            {"input": x, "weight": module.weight, "bias": getattr(module, "bias", None)}[change].mul_(3.0)
        try:
            _weighted_sum(y).backward()
        except RuntimeError as error:
            results.append(type(error))
        else:
            results.append((y.detach(), [p.grad for p in module.parameters()]))
    if isinstance(results[0], type):
        assert results[1] is results[0]
    else:
        torch.testing.assert_close(results[1], results[0])


def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False),
                         nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Flatten(),
                         nn.Linear(64, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 8), nn.RMSNorm(8),
                         nn.Linear(8, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_a_cpu_autocast_step_gives_torch_nn_s_dtypes_outputs_gradients_and_statistics(dtype, training):
    """``torch.autocast("cpu")`` around a converted model: each norm gets what autocast
    hands torch.nn's (a low-precision conv or linear output, or float32 where autocast
    upcasts), and its output has torch.nn's dtype."""
    reference, twin = _converted_pair(_small_cnn)
    x0 = torch.randn(4, 3, 6, 6)
    results = []
    for model in (reference.train(training), twin.train(training)):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
            loss = y.float().square().mean()
        loss.backward()
        results.append((y, x.grad))
    (expected, expected_grad), (y, grad) = results
    assert y.dtype == expected.dtype and grad.dtype == expected_grad.dtype
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad, expected_grad, atol=2e-2, rtol=2e-2)
    _assert_same_grads(reference, twin, atol=2e-2, rtol=5e-2)
    _assert_same_state(reference, twin, atol=1e-2, rtol=1e-2)


def test_weight_averaging_with_ema_buffers_and_update_bn_gives_torch_nn_s_models():
    """Stochastic weight averaging (``torch.optim.swa_utils``): an EMA copy that averages
    the buffers too, run in evaluation and training, and ``update_bn``, which resets the
    running statistics and recomputes them as a cumulative average (momentum=None)."""
    from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

    reference, twin = _converted_pair(_small_cnn)
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    results = []
    for model in (reference, twin):
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        averaged = AveragedModel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = SWALR(optimizer, swa_lr=0.05)
        outputs = []
        for x in batches:
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update_parameters(model)
            averaged.update_parameters(model)
            schedule.step()
            outputs += [ema.eval()(batches[0]), ema.train()(batches[1])]
        update_bn(batches, averaged)
        outputs.append(averaged.eval()(batches[2]))
        results.append((outputs, averaged.state_dict(), ema.state_dict()))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


class _ChannelsLastBatchNorm(nn.Module):
    """torch.nn's batch norm over the channels of an ``(N, H, W, C)`` map: what
    ``Norm("[b h w] c")`` computes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _norm_cnn(norm_library):
    """A CNN whose batch norms are ``Norm`` patterns (normlab) or the torch.nn modules
    computing the same (torch), with an instance norm with running statistics, which
    torch's update_bn leaves alone, and a twin BatchNorm1d beside them."""
    channels_first = (nt.Norm("[b] c [h w]", params="c", c=8, track_running_stats=True) if norm_library == "normlab"
                      else nn.BatchNorm2d(8))
    channels_last = (nt.Norm("[b h w] c", params="c", c=8, track_running_stats=True) if norm_library == "normlab"
                     else _ChannelsLastBatchNorm(8))
    instance = (nt.Norm("b c [h w]", params="c", c=8, track_running_stats=True) if norm_library == "normlab"
                else nn.InstanceNorm2d(8, affine=True, track_running_stats=True))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), channels_first, nn.ReLU(), nn.Conv2d(8, 8, 3), instance,
                         nn.ReLU(), nn.Conv2d(8, 8, 1).to(memory_format=torch.channels_last),
                         Permute((0, 2, 3, 1)), channels_last, nn.Flatten(), nn.Linear(128, 4), nt.BatchNorm1d(4))


class Permute(nn.Module):
    def __init__(self, order) -> None:
        super().__init__()
        self.order = order

    def forward(self, x):
        return x.permute(*self.order)


@pytest.mark.parametrize("train_after", [True, False], ids=["in_training", "in_eval"])
def test_update_bn_recomputes_the_running_statistics_of_norm_batch_norms_as_torch_s_does_of_torch_nn_s(train_after):
    """SWA with ``Norm`` batch norms: ``torch.optim.swa_utils.update_bn`` finds batch norms
    by ``isinstance(module, _BatchNorm)`` and passes over a ``Norm("[b] c [h w]")`` (its
    running statistics stay the averaged model's stale ones); ``normlab.torch.update_bn``
    recomputes them too. Oracle: torch's update_bn on the same model with torch.nn's
    batch norms, same weights, same batches (and its instance norm left alone, as a
    ``Norm`` whose statistics do not span the batch is)."""
    from torch.optim.swa_utils import AveragedModel, update_bn

    torch.manual_seed(0)
    reference = _norm_cnn("torch").double()
    model = _norm_cnn("normlab").double()
    model.load_state_dict({key.replace(".norm.", "."): value for key, value in reference.state_dict().items()})
    batches = [torch.randn(5, 3, 6, 6, dtype=D) * 3 + 1 for _ in range(4)]
    averaged = []
    for network in (reference, model):
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
        swa = AveragedModel(network)
        for x in batches:
            network(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            swa.update_parameters(network)
        swa.train(train_after)
        averaged.append(swa)
    update_bn([(x, None) for x in batches[:3]], averaged[0])
    stale = {name: buffer.clone() for name, buffer in averaged[1].named_buffers()}
    nt.update_bn([(x, None) for x in batches[:3]], averaged[1])
    expected = {key.replace(".norm.", "."): value for key, value in averaged[0].state_dict().items()}
    got = averaged[1].state_dict()
    assert list(got) == list(expected)
    for name in expected:
        if name != "module.4.num_batches_tracked":  # (torch's instance norms never count their batches)
            torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-9, msg=name)
    assert not torch.equal(stale["module.1.running_mean"], got["module.1.running_mean"])
    assert averaged[1].training == train_after and averaged[1].module[8].momentum == 0.1
    torch.testing.assert_close(averaged[1].eval()(batches[3]), averaged[0].eval()(batches[3]), rtol=1e-9, atol=1e-9)


def test_a_load_state_dict_pre_hook_registered_before_convert_sees_the_twin_in_loads_and_copies():
    """``register_load_state_dict_pre_hook`` keeps a weak reference to its module and hands
    it to the hook: on the converted model that is the twin (the torch.nn layer it replaced
    is gone), so ``load_state_dict``, ``copy.deepcopy`` and ``AveragedModel`` work as on
    torch.nn's model, each hook seeing the layer that loads."""
    import gc

    from torch.optim.swa_utils import AveragedModel

    seen = []

    def hooked():
        model = _small_cnn()
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
                module.register_load_state_dict_pre_hook(lambda m, state, prefix, *_: seen.append((prefix, m)))
        return model

    reference, twin = _converted_pair(hooked)
    gc.collect()  # (the replaced torch.nn layers)
    loaded = []
    for model in (reference, twin):
        seen.clear()
        model.load_state_dict(model.state_dict())
        assert all(module is model.get_submodule(prefix[:-1]) for prefix, module in seen)
        loaded.append([prefix for prefix, _ in seen])
        copied = copy.deepcopy(model)
        copied.load_state_dict(model.state_dict())
        AveragedModel(model).update_parameters(model)
    assert loaded[1] == loaded[0] and len(loaded[0]) == 6


def _freeze_batch_norms(model):
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval().requires_grad_(False)
    return model


FINE_TUNING = {  # what a fine-tuning script does to the model before its training steps
    "frozen batch norms": _freeze_batch_norms,
    "bfloat16 weights": lambda model: model.to(torch.bfloat16),
    "channels_last": lambda model: model.to(memory_format=torch.channels_last),
    "float64": lambda model: model.double(),
}


@pytest.mark.parametrize("recipe", list(FINE_TUNING))
def test_a_fine_tuning_loop_gives_torch_nn_s_weights_statistics_and_outputs(recipe):
    """Three SGD steps with gradient clipping and accumulation (``zero_grad(set_to_none=False)``
    every second step) after the recipe's change to the converted model, then evaluation."""
    reference, twin = _converted_pair(_small_cnn)
    low = recipe == "bfloat16 weights"
    results = []
    for model in (reference, twin):
        model = FINE_TUNING[recipe](model.train())
        dtype = next(model.parameters()).dtype
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(2)
        for step in range(4):
            x = torch.randn(4, 3, 6, 6, dtype=dtype)
            if recipe == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            model(x).float().square().mean().backward()
            if step % 2:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
        results.append((model.eval()(torch.ones(2, 3, 6, 6, dtype=dtype)), model.state_dict()))
    tolerance = {"atol": 5e-2, "rtol": 5e-2} if low else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(results[1], results[0], **tolerance)


FUSED = {  # block, and its definition in torch.nn.functional on (x + residual, *parameters)
    "FusedAddRMSNorm": (lambda: nt.FusedAddRMSNorm(6, eps=1e-6),
                        lambda total, weight: torch.nn.functional.rms_norm(total, (6,), weight, 1e-6)),
    "FusedAddLayerNorm": (lambda: nt.FusedAddLayerNorm(6),
                          lambda total, weight, bias: torch.nn.functional.layer_norm(total, (6,), weight, bias)),
}


@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fused_block_under_allow_mutation_on_saved_tensors_gives_the_gradients_of_its_definition(name, dtype):
    """The fused residual add and norm, its parameters changed in place between forward
    and backward inside ``allow_mutation_on_saved_tensors``: the gradients of the forward's
    values, as its definition in torch.nn.functional gives them."""
    build, definition = FUSED[name]
    torch.manual_seed(0)
    block = build().to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.uniform_(0.5, 1.5)
    x0, residual0 = torch.randn(4, 6, dtype=dtype), torch.randn(4, 6, dtype=dtype)
    copies = [p.detach().clone().requires_grad_() for p in block.parameters()]  # (before the block's change)
    results = []
    for fused in (True, False):
        x, residual = x0.clone().requires_grad_(), residual0.clone().requires_grad_()
        params = list(block.parameters()) if fused else copies
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            if fused:
                y, total = block(x, residual)
            else:
                total = x + residual
                y = definition(total, *params)
            with torch.no_grad():
                for p in params:
                    p.mul_(2.0)
            (_weighted_sum(y) + _weighted_sum(total)).backward()
        results.append((y.detach(), total.detach(), x.grad, residual.grad, [p.grad for p in params]))
    torch.testing.assert_close(results[0], results[1])


def test_the_recipes_spelled_out_for_torchscript_know_the_castings_their_tables_list():
    """rms_norm_recipe, layer_norm_recipe and unweighted_rms_norm_recipe write the names of
    CASTINGS, LAYER_NORM_CASTINGS, UNWEIGHTED_CASTINGS and _CAST_AFTER_WEIGHT out as literals
    (TorchScript compiles no membership in a global tuple): each must accept every name its
    table lists, refuse others naming exactly those, and rms_norm_recipe must cast after the
    weight where apply_recipe_scale, which reads _CAST_AFTER_WEIGHT, does."""
    from normlab.torch import casting

    x = torch.randn(2, 4, dtype=torch.bfloat16)
    weight = torch.rand(4) + 0.5
    calls = [(casting.CASTINGS, lambda name: casting.rms_norm_recipe(x, weight, 1e-6, name)),
             (casting.LAYER_NORM_CASTINGS, lambda name: casting.layer_norm_recipe(x, weight, None, 1e-6, name)),
             (casting.UNWEIGHTED_CASTINGS, lambda name: casting.unweighted_rms_norm_recipe(x, 1e-6, name))]
    for names, call in calls:
        for name in names:
            call(name)
        with pytest.raises(ValueError) as caught:
            call("unknown")
        assert str(caught.value).split("use one of ")[1].split(", ") == list(names)
    for name in casting.CASTINGS:
        normalized = casting.rms_normalize(x.float(), [-1], 1e-6)
        assert (casting.rms_norm_recipe(x, weight, 1e-6, name).dtype
                == casting.apply_recipe_scale(x, normalized, weight, name).dtype), name
