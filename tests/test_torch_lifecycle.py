"""A converted model through its lifecycle, as users take torch.nn's norms through it:
parametrizations, state changed between calls, checkpoints and module utilities. Oracle:
the torch.nn module with the same state, run on the same inputs (outputs, gradients,
running statistics and exception types)."""

import copy
import math
import re

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import normlab.torch as nt  # noqa: E402
from normlab.torch import spec  # noqa: E402

# (id, torch.nn original, input shape)
NORMS = [
    ("batch_norm_1d", lambda: nn.BatchNorm1d(4), (6, 4)),
    ("batch_norm_2d", lambda: nn.BatchNorm2d(4), (3, 4, 5, 5)),
    ("batch_norm_3d", lambda: nn.BatchNorm3d(4), (2, 4, 3, 3, 3)),
    ("layer_norm", lambda: nn.LayerNorm(8), (3, 5, 8)),
    ("rms_norm", lambda: nn.RMSNorm(8), (3, 5, 8)),
    ("group_norm", lambda: nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    ("instance_norm_2d", lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 5)),
]
IDS = [case[0] for case in NORMS]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def pair(factory):
    """A torch.nn norm with random parameters, and its converted twin (a deep copy)."""
    torch.manual_seed(0)
    original = factory()
    with torch.no_grad():
        for param in original.parameters():
            param.uniform_(0.5, 1.5)
    return original, nt.convert(copy.deepcopy(original))


def inputs(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2 + 1


def assert_same_state(twin, original):
    for (key, value), (expected_key, expected) in zip(twin.state_dict().items(), original.state_dict().items()):
        assert key == expected_key
        torch.testing.assert_close(value, expected, **TOLERANCE, msg=key)


class _Square(nn.Module):
    def forward(self, weight):
        return weight * weight


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, factory, shape", NORMS, ids=IDS)
def test_a_parametrized_weight_is_the_one_the_twin_normalizes_with(name, factory, shape, training):
    """``register_parametrization`` replaces the weight Parameter by a computed property
    (after the twin has run, with its caches built): every call, with and without
    gradients, uses the weight as the parametrization computes it, as torch.nn does."""
    original, twin = pair(factory)
    x = inputs(shape)
    for module in (original, twin):
        module.train(training)
        module(x)
        parametrize.register_parametrization(module, "weight", _Square())
    for step in range(2):
        x_original, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, actual = original(x_original), twin(x_twin)
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        expected.square().sum().backward()
        actual.square().sum().backward()
        torch.testing.assert_close(x_twin.grad, x_original.grad, rtol=1e-4, atol=1e-4)
        for (key, param), (_, expected_param) in zip(twin.named_parameters(), original.named_parameters()):
            torch.testing.assert_close(param.grad, expected_param.grad, rtol=1e-4, atol=1e-3, msg=key)
        with torch.no_grad():
            for module in (original, twin):
                module.parametrizations.weight.original.add_(0.25 * (step + 1))
                module(x)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), original(x), **TOLERANCE)
    assert_same_state(twin, original)


class _DropConnect(nn.Module):
    """A parametrization that draws random numbers on every call (in evaluation too) and
    counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, value):
        self.calls += 1
        return F.dropout(value, 0.25, training=True)


@pytest.mark.parametrize("path", ["auto", "native"])  # native: torch's own op, as on CUDA
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, factory, shape", NORMS, ids=IDS)
def test_a_parametrization_runs_once_a_call_as_in_torch_nn(name, factory, shape, training, path):
    """torch.nn's forward computes each parametrized tensor once a call: a parametrization
    that draws random numbers (DropConnect on the weight and bias) or counts its calls
    runs as often on the twin, so outputs, gradients, running statistics and the random
    stream after the calls are torch.nn's."""
    original, twin = pair(factory)
    results = []
    for module in (original, twin):
        module.train(training)
        for tensor_name in ("weight", "bias"):
            if getattr(module, tensor_name, None) is not None:  # (RMSNorm has no bias)
                parametrize.register_parametrization(module, tensor_name, _DropConnect())
        torch.manual_seed(2)
        outputs = []
        with nt.use_path(path):
            for grad in (True, False):
                x = inputs(shape).requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    y = module(x)
                if grad:
                    y.square().sum().backward()
                outputs += [y.detach(), x.grad]
        calls = [p.calls for p in module.modules() if isinstance(p, _DropConnect)]
        results.append((outputs, [p.grad for p in module.parameters()], calls, torch.rand(2),
                        dict(module.state_dict())))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)


def _set_weight(module):
    module.weight = nn.Parameter(torch.linspace(0.5, 2.0, module.weight.numel()).reshape(module.weight.shape))


def _write_weight_data(module):
    module.weight.data = torch.linspace(2.0, 0.5, module.weight.numel()).reshape(module.weight.shape)


def _write_running_mean_data(module):
    module.running_mean.data = torch.linspace(-1.0, 1.0, module.running_mean.numel())


def _set_running_none(module):
    module.running_mean = module.running_var = None


# changes users make to a module that has already run: (id, change, applies to the module)
CHANGES = [
    ("reset_parameters", lambda m: m.reset_parameters(), lambda m: True),
    ("reset_running_stats", lambda m: m.reset_running_stats(), lambda m: hasattr(m, "reset_running_stats")),
    ("eps", lambda m: setattr(m, "eps", 0.5), lambda m: True),
    ("momentum", lambda m: setattr(m, "momentum", 0.5), lambda m: hasattr(m, "momentum")),
    ("momentum_none", lambda m: setattr(m, "momentum", None), lambda m: hasattr(m, "momentum")),
    ("new_weight", _set_weight, lambda m: getattr(m, "weight", None) is not None),
    ("weight_data", _write_weight_data, lambda m: getattr(m, "weight", None) is not None),
    ("no_bias", lambda m: setattr(m, "bias", None), lambda m: getattr(m, "bias", None) is not None),
    ("running_mean_data", _write_running_mean_data, lambda m: getattr(m, "running_mean", None) is not None),
    ("track_running_stats_off", lambda m: setattr(m, "track_running_stats", False),
     lambda m: getattr(m, "running_mean", None) is not None),
    ("running_stats_none", _set_running_none, lambda m: getattr(m, "running_mean", None) is not None),
    ("running_var_none", lambda m: setattr(m, "running_var", None),
     lambda m: getattr(m, "running_mean", None) is not None),
    ("num_groups", lambda m: setattr(m, "num_groups", 4), lambda m: hasattr(m, "num_groups")),
    ("num_groups_not_dividing", lambda m: setattr(m, "num_groups", 3), lambda m: hasattr(m, "num_groups")),
]


def _outcome(module, x, grad):
    """The output (and the input's gradient), or the exception's type."""
    x = x.clone().requires_grad_(grad)
    try:
        with torch.set_grad_enabled(grad):
            y = module(x)
            if grad:
                y.square().sum().backward()
    except Exception as error:  # noqa: BLE001 (the type is the outcome)
        return type(error)
    return y.detach(), x.grad


@pytest.mark.parametrize("name, factory, shape, apply", [
    pytest.param(name, factory, shape, apply, id=f"{name}-{change}")
    for name, factory, shape in NORMS for change, apply, applies in CHANGES
    if applies(factory()) and name != "batch_norm_3d"])  # (batch_norm_2d's code path)
def test_a_change_after_calls_gives_torch_nn_outputs_state_and_errors(name, factory, shape, apply):
    """A change made between calls (when the twin holds its caches) is seen by the next
    calls as torch.nn sees it, in training and evaluation, with and without gradients:
    the same output, input gradient and running statistics, or the same exception type."""
    for training in (True, False):
        for grad in (False, True):
            original, twin = pair(factory)
            x = inputs(shape)
            for module in (original, twin):
                module.train(training)
                _outcome(module, x, grad)
                apply(module)
            for seed in (2, 3):
                x = inputs(shape, seed) * 0.3
                expected, actual = _outcome(original, x, grad), _outcome(twin, x, grad)
                if isinstance(expected, type):
                    assert actual is expected, (training, grad)
                    continue
                torch.testing.assert_close(actual[0], expected[0], **TOLERANCE, msg=f"{training=} {grad=}")
                torch.testing.assert_close(actual[1], expected[1], rtol=1e-4, atol=1e-4)
                assert_same_state(twin, original)


# (id, normlab module, torch.nn module it starts as, input shape); the fused blocks take a residual
FRESH = [
    ("batch_norm_2d", lambda: nt.BatchNorm2d(4), lambda: nn.BatchNorm2d(4), (3, 4, 5, 5)),
    ("layer_norm", lambda: nt.LayerNorm(8), lambda: nn.LayerNorm(8), (3, 5, 8)),
    ("rms_norm", lambda: nt.RMSNorm(8), lambda: nn.RMSNorm(8), (3, 5, 8)),
    ("group_norm", lambda: nt.GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    ("instance_norm_2d", lambda: nt.InstanceNorm2d(4, affine=True, track_running_stats=True),
     lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 5)),
    ("norm", lambda: nt.Norm("b t [d]", params="d", d=8), lambda: nn.LayerNorm(8), (3, 5, 8)),
    ("fused_add_rms_norm", lambda: nt.FusedAddRMSNorm(8), lambda: nn.RMSNorm(8, eps=1e-6), (3, 5, 8)),
    ("fused_add_rms_norm_offset", lambda: nt.FusedAddRMSNorm(8, weight_offset=1.0), lambda: nn.RMSNorm(8, eps=1e-6),
     (3, 5, 8)),
    ("fused_add_layer_norm", lambda: nt.FusedAddLayerNorm(8), lambda: nn.LayerNorm(8), (3, 5, 8)),
    ("gated_rms_norm", lambda: nt.GatedRMSNorm(8), lambda: nn.RMSNorm(8, eps=1e-5), (3, 5, 8)),
]


@pytest.mark.parametrize("name, build, build_torch, shape", FRESH, ids=[case[0] for case in FRESH])
def test_a_module_built_on_the_meta_device_materializes_as_torch_nn(name, build, build_torch, shape):
    """The meta-device recipe of large-model code (FSDP, torchtitan): build under
    ``torch.device("meta")``, ``to_empty``, then ``reset_parameters()`` on every module
    that has one. The result computes what a torch.nn module built on the CPU does."""
    with torch.device("meta"):
        module = nn.Sequential(build())
    module.to_empty(device="cpu")
    for child in module.modules():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()
    original = build_torch()
    x, residual = inputs(shape), inputs(shape, seed=2)
    if name.startswith("fused"):
        actual, expected = module[0](x, residual)[0], original(x + residual)
    else:
        actual, expected = module(x), original(x)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    if not name.startswith(("fused", "gated")):  # (their state has other names than torch.nn's)
        assert_same_state(module[0], original)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name, factory, shape", NORMS, ids=IDS)
def test_bfloat16_parameters_with_full_precision_input_compute_as_torch_nn(name, factory, shape, x_dtype):
    """A model cast to bfloat16 that is fed float32 or float64 (NumPy has no bfloat16 for the
    kernels to read the parameters with): torch.nn.RMSNorm computes, and the twin gives its
    output and gradients; where torch.nn refuses the mix ("mixed dtype (CPU)"), the twin
    raises the same error."""
    original, twin = pair(factory)
    for module in (original, twin):
        module.to(torch.bfloat16).train()
    x = inputs(shape).to(x_dtype)
    x_original, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        expected = original(x_original)
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match=re.escape(str(error))):
            twin(x_twin)
        return
    actual = twin(x_twin)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    expected.square().sum().backward()
    actual.square().sum().backward()
    torch.testing.assert_close(x_twin.grad, x_original.grad, rtol=1e-4, atol=1e-4)
    for (key, param), (_, expected_param) in zip(twin.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(param.grad, expected_param.grad.to(param.dtype), msg=key)


MIXED = [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float32, torch.bfloat16),
         (torch.float32, torch.float16), (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
@pytest.mark.parametrize("param_dtype, x_dtype", MIXED, ids=[f"{p}-{x}".replace("torch.", "") for p, x in MIXED])
@pytest.mark.parametrize("name, factory, shape", NORMS, ids=IDS)
def test_parameters_of_another_dtype_than_the_input_fail_or_compute_as_torch_nn(name, factory, shape, param_dtype,
                                                                               x_dtype, mode):
    """torch's CPU norm kernels take parameters of the input's dtype, or float32 ones beside
    a bfloat16 or float16 input, and raise "mixed dtype (CPU)" otherwise: the twin raises
    the same error where torch.nn does, and computes its output where it computes."""
    original, twin = pair(factory)
    for module in (original, twin):
        module.to(param_dtype).train(mode == "train")
    x = inputs(shape).to(x_dtype)
    with torch.set_grad_enabled(mode != "no_grad"):
        try:
            expected = original(x.clone().requires_grad_(mode != "no_grad"))
        except RuntimeError as error:
            with pytest.raises(RuntimeError, match=re.escape(str(error))):
                twin(x.clone().requires_grad_(mode != "no_grad"))
            return
        actual = twin(x.clone().requires_grad_(mode != "no_grad"))
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2)


class _Quantizable(nn.Module):
    """Eager-mode quantization's model shape: stubs around the layers."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.conv, self.bn, self.bn_alone = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.layer_norm, self.group_norm, self.instance_norm = nn.LayerNorm(6), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4)

    def forward(self, x):
        x = self.bn_alone(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.instance_norm(self.group_norm(self.layer_norm(x))))


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="needs the fbgemm engine")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # (torch.ao's own, about itself)
@pytest.mark.parametrize("qat", [False, True], ids=["post_training", "qat"])
def test_eager_mode_quantization_quantizes_the_twins_as_torch_nn(qat):
    """torch.ao.quantization's ``prepare``/``prepare_qat`` and ``convert`` find their modules
    by exact type: a converted model is observed, fused and quantized as the torch.nn one
    (the same quantized modules, the same outputs)."""
    from torch.ao import quantization

    torch.manual_seed(0)
    original = _Quantizable()
    original(inputs((4, 3, 8, 8)))  # running statistics to fold
    twin = nt.convert(copy.deepcopy(original))
    quantized = []
    for model in (original, twin):
        model.train(qat)
        model.qconfig = (quantization.get_default_qat_qconfig if qat else quantization.get_default_qconfig)("fbgemm")
        fuse = quantization.fuse_modules_qat if qat else quantization.fuse_modules
        model = (quantization.prepare_qat if qat else quantization.prepare)(fuse(model, [["conv", "bn"]]))
        for seed in range(3):
            model(inputs((4, 3, 8, 8), seed))
        quantized.append(quantization.convert(model.eval()))
    expected, actual = quantized
    assert [type(m) for m in actual.children()] == [type(m) for m in expected.children()]
    x = inputs((2, 3, 8, 8), seed=5)
    torch.testing.assert_close(actual(x), expected(x), rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True], ids=["bfloat16_x", "autocast"])
@pytest.mark.parametrize("fused, unfused", [
    (lambda: nt.FusedAddRMSNorm(8), lambda: nn.RMSNorm(8, eps=1e-6)),
    (lambda: nt.FusedAddLayerNorm(8), lambda: nn.LayerNorm(8)),
], ids=["rms_norm", "layer_norm"])
def test_a_fused_add_of_a_bfloat16_x_to_a_float32_residual_normalizes_their_float32_sum(fused, unfused, autocast):
    """Under CPU autocast a projection's output is bfloat16 while the residual stream stays
    float32: ``norm(x + residual)`` then normalizes a float32 sum and gives float32, as
    torch.nn's norm after the add does."""
    torch.manual_seed(0)
    block, norm, projection = fused(), unfused(), nn.Linear(8, 8)
    residual = inputs((2, 3, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x = projection(residual) if autocast else inputs((2, 3, 8), seed=2).bfloat16()
        actual, total = block(x, residual)
        expected = norm(x + residual)
    assert x.dtype == torch.bfloat16
    torch.testing.assert_close(total, x + residual)
    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("fused, unfused, residual", [
    (lambda: nt.FusedAddRMSNorm(8), lambda: nn.RMSNorm(8, eps=1e-6), True),
    (lambda: nt.FusedAddLayerNorm(8), lambda: nn.LayerNorm(8), True),
    (lambda: nt.GatedRMSNorm(8), lambda: nn.RMSNorm(8, eps=1e-5), False),
], ids=["fused_add_rms_norm", "fused_add_layer_norm", "gated_rms_norm"])
def test_an_eps_set_after_calls_is_the_one_a_fused_block_normalizes_with(fused, unfused, residual):
    """``module.eps = ...`` on a block that has run (small inputs, where eps matters) takes
    effect on the next call, as it does on torch.nn's norm of the sum."""
    block, norm = fused(), unfused()
    x, other = inputs((2, 3, 8)) * 1e-2, inputs((2, 3, 8), seed=2) * 1e-2
    block(x, other) if residual else block(x)
    for eps in (0.1, 1e-3):
        block.eps = norm.eps = eps
        x_block, x_norm = x.clone().requires_grad_(), x.clone().requires_grad_()
        actual = block(x_block, other)[0] if residual else block(x_block)
        expected = norm(x_norm + other) if residual else norm(x_norm)
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        actual.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(x_block.grad, x_norm.grad, rtol=1e-4, atol=1e-4)


class _LlamaRMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm``, as its source writes it."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _ChannelsLayerNorm(nn.LayerNorm):
    """torchvision's ConvNeXt ``LayerNorm2d``: layer norm over the channels of (N, C, H, W)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _OwnForwardLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm``: a subclass with a forward of its own that computes torch.nn's."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@pytest.mark.parametrize("build, shape, twin", [
    (lambda: _LlamaRMSNorm(8), (3, 5, 8), "RMSNorm"),
    (lambda: _ChannelsLayerNorm(4), (3, 4, 5, 5), "LayerNorm2d"),
    (lambda: _OwnForwardLayerNorm(8), (3, 5, 8), "LayerNorm"),
], ids=["llama_rms_norm", "convnext_layer_norm_2d", "own_forward_layer_norm"])
def test_convert_inside_a_meta_device_block_recognizes_what_it_does_on_the_cpu(build, shape, twin):
    """``convert`` called where the model is built, inside ``with torch.device("meta")``:
    the norms its probes recognize become twins (the probes computed on meta tensors and
    crashed), and once materialized the model computes what the original does."""
    torch.manual_seed(0)
    original = nn.Sequential(build())
    with torch.no_grad():
        for param in original.parameters():
            param.uniform_(0.5, 1.5)
    with torch.device("meta"):
        model = nt.convert(nn.Sequential(build()))
    assert type(model[0]).__name__ == twin and type(model[0]).__module__ == "normlab.torch"
    model.to_empty(device="cpu")
    model.load_state_dict(original.state_dict())
    x = inputs(shape)
    torch.testing.assert_close(model(x), original(x), **TOLERANCE)


@pytest.mark.parametrize("name, factory, shape", NORMS, ids=IDS)
def test_a_parameter_of_another_shape_set_after_calls_meets_torch_nn_error_or_output(name, factory, shape):
    """``module.weight = nn.Parameter(...)`` (or bias) of another shape than the module's:
    torch.nn raises its RuntimeError, or computes where its op takes the shape (a batch
    norm's weight of C elements in a column); the twin does the same (a batch norm's
    kernels read a weight of one element past its end, others raised ValueError or
    Numba's TypingError)."""
    _, probe = pair(factory)
    size = probe.weight.numel()
    for name_of, new_shape in (("weight", (1,)), ("weight", (size, 1)), ("bias", (size + 1,))):
        if getattr(probe, name_of, None) is None:
            continue
        for training in (True, False):
            original, twin = pair(factory)
            x = inputs(shape)
            for module in (original, twin):
                module.train(training)
                _outcome(module, x, grad=False)
                setattr(module, name_of, nn.Parameter(torch.linspace(0.5, 1.5, math.prod(new_shape)).reshape(new_shape)))
            for grad in (False, True):
                expected, actual = _outcome(original, x, grad), _outcome(twin, x, grad)
                if isinstance(expected, type):
                    assert actual is expected, (name_of, new_shape, training, grad)
                    continue
                torch.testing.assert_close(actual[0], expected[0], **TOLERANCE)
                torch.testing.assert_close(actual[1], expected[1], rtol=1e-4, atol=1e-4)
                assert_same_state(twin, original)


@pytest.mark.parametrize("training, track", [(True, False), (True, True), (False, True)])
def test_instance_norm_parameters_changed_in_place_before_backward_give_torch_nn_gradients(training, track):
    """A GAN's discriminator step before the generator's backward through it: torch.nn's
    instance norm reads its parameters through ``weight.repeat(batch)``, so autograd keeps
    the forward's values and allows the change; the twin gives the same gradients."""
    original, twin = pair(lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=track))
    x = inputs((2, 4, 5, 5))
    grads = []
    for module in (original, twin):
        module.train(training)
        x_leaf = x.clone().requires_grad_()
        y = module(x_leaf)
        with torch.no_grad():
            module.weight.mul_(2)
            module.bias.add_(1)
        (y * inputs(y.shape, seed=2)).sum().backward()
        grads.append((x_leaf.grad, module.weight.grad, module.bias.grad))
    for actual, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


_LARGE = [  # (shapes past the size where the kernels take over from torch's operations)
    ("batch_norm_1d", lambda: nn.BatchNorm1d(64), (512, 64)),
    ("batch_norm_2d", lambda: nn.BatchNorm2d(16), (8, 16, 32, 32)),
    ("layer_norm", lambda: nn.LayerNorm(256), (64, 256)),
    ("rms_norm", lambda: nn.RMSNorm(256), (64, 256)),
    ("group_norm", lambda: nn.GroupNorm(4, 16), (8, 16, 32, 32)),
    ("instance_norm_2d", lambda: nn.InstanceNorm2d(16, affine=True, track_running_stats=True), (8, 16, 32, 32)),
]


@pytest.mark.parametrize("make, shape", [case[1:] for case in _LARGE], ids=[case[0] for case in _LARGE])
@pytest.mark.parametrize("how", ["train", "no_grad", "eval"])
@pytest.mark.parametrize("route", ["dlpack", "array_interface"])
def test_a_twin_leaves_the_storage_of_its_input_and_gradient_resizable_as_torch_nn_does(make, shape, how, route,
                                                                                         monkeypatch):
    """Tools free and refill activations with ``untyped_storage().resize_`` (PyG's
    reversible GNNs, GroupAddRev, their layers' inputs and outputs): torch.nn's norms leave
    the storage of their input and of the incoming gradient resizable, and so do the twins;
    they read them through ``Tensor.numpy()``, which marks the storage non-resizable for
    good, and the next ``resize_`` raised "Trying to resize storage that is not resizable".
    Both of array_view's routes: a versioned DLPack capsule, and ``__array_interface__``
    where NumPy (before 2.1) imports none."""
    if route == "array_interface":
        monkeypatch.setattr(spec, "_dlpack_capsule", None)
    original = make()
    for module in (original, nt.convert(copy.deepcopy(original))):
        module.train(how != "eval")
        x = torch.randn(shape)
        if how == "train":
            x.requires_grad_()
            grad = torch.randn(shape)
            module(x).backward(grad)
            assert grad.untyped_storage().resizable(), type(module)
        else:
            with torch.no_grad():
                module(x)
        assert x.untyped_storage().resizable(), type(module)
        x.untyped_storage().resize_(0)  # (what the tools do)
