"""normlab.torch modules against torch.nn as the oracle: outputs, input and parameter
gradients and running statistics over several training steps, on every path."""

import copy
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import normlab.torch as nt  # noqa: E402
from normlab.torch import conversion, ops, paths  # noqa: E402
from normlab.errors import NormlabError, PatternSyntaxError  # noqa: E402

STEPS = 3

# (id, torch.nn module factory, input shape): one table drives the parity tests
CASES = [
    ("batch_norm_1d", lambda: torch.nn.BatchNorm1d(5), (6, 5)),
    ("batch_norm_1d_cumulative", lambda: torch.nn.BatchNorm1d(4, momentum=None), (6, 4, 3)),
    ("batch_norm_2d", lambda: torch.nn.BatchNorm2d(3), (4, 3, 5, 5)),
    ("batch_norm_2d_no_affine", lambda: torch.nn.BatchNorm2d(3, affine=False), (4, 3, 5, 5)),
    ("batch_norm_2d_untracked", lambda: torch.nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 5, 5)),
    ("batch_norm_3d", lambda: torch.nn.BatchNorm3d(2, momentum=0.3), (3, 2, 3, 3, 3)),
    ("layer_norm_2_axes", lambda: torch.nn.LayerNorm((4, 5)), (3, 4, 5)),
    ("layer_norm_no_bias", lambda: torch.nn.LayerNorm(6, bias=False), (2, 3, 6)),
    ("layer_norm_no_affine", lambda: torch.nn.LayerNorm(6, elementwise_affine=False), (4, 6)),
    ("group_norm", lambda: torch.nn.GroupNorm(2, 6), (3, 6, 4, 4)),
    ("group_norm_2d_input_no_affine", lambda: torch.nn.GroupNorm(3, 6, affine=False), (3, 6)),
    ("instance_norm_1d", lambda: torch.nn.InstanceNorm1d(3), (2, 3, 7)),
    ("instance_norm_2d_tracked", lambda: torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
     (2, 3, 5, 5)),
    ("instance_norm_3d_affine", lambda: torch.nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 3)),
    ("rms_norm", lambda: torch.nn.RMSNorm(6), (4, 6)),
    ("rms_norm_2_axes_eps", lambda: torch.nn.RMSNorm((3, 4), eps=1e-6), (2, 3, 4)),
    ("sync_batch_norm_one_process", lambda: torch.nn.SyncBatchNorm(3), (4, 3, 5)),
]
IDS = [case[0] for case in CASES]
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def twins(factory, dtype):
    """A torch.nn module with random affine parameters and its normlab twin, built by
    loading the torch module's state_dict (the load under test)."""
    torch.manual_seed(0)
    reference = factory().to(dtype)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_()
    twin_class = conversion._TWINS[type(reference)]
    twin = copy.deepcopy(reference)  # same constructor arguments
    twin.__class__ = twin_class
    twin._init_spec()
    twin.load_state_dict(reference.state_dict())
    return reference, twin


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


def train_and_compare(reference, twin, shape, dtype, steps=STEPS, skip_buffers=()):
    for step in range(steps):
        x = (torch.randn(shape, dtype=dtype) * 3 + 1).requires_grad_()
        x_twin = x.detach().clone().requires_grad_()
        grad_y = torch.randn(shape, dtype=dtype)
        y, y_twin = reference(x), twin(x_twin)
        assert_close(y_twin, y, dtype, f"output at step {step}")
        (y * grad_y).sum().backward()
        (y_twin * grad_y).sum().backward()
        assert_close(x_twin.grad, x.grad, dtype, f"input grad at step {step}")
    for (name, expected), (twin_name, actual) in zip(reference.named_parameters(), twin.named_parameters()):
        assert name == twin_name
        assert_close(actual.grad, expected.grad, dtype, f"{name} grad")
    for (name, expected), (twin_name, actual) in zip(reference.state_dict().items(), twin.state_dict().items()):
        assert name == twin_name
        if name not in skip_buffers:
            assert_close(actual, expected, dtype, f"{name} after {steps} steps")
    reference.eval()
    twin.eval()
    x = torch.randn(shape, dtype=dtype)
    assert_close(twin(x), reference(x), dtype, "output in eval mode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("factory, shape", [case[1:] for case in CASES], ids=IDS)
def test_module_matches_torch_nn_over_training_steps_on_the_kernel_path(factory, shape, dtype):
    reference, twin = twins(factory, dtype)
    with nt.use_path("kernel"):
        train_and_compare(reference, twin, shape, dtype)


@pytest.mark.parametrize("path", ["native", "composite"])
@pytest.mark.parametrize("factory, shape", [case[1:] for case in CASES], ids=IDS)
def test_module_matches_torch_nn_on_the_forced_native_and_composite_paths(factory, shape, path):
    reference, twin = twins(factory, torch.float64)
    with nt.use_path(path):
        train_and_compare(reference, twin, shape, torch.float64)


def test_auto_path_sends_cpu_float32_to_the_kernel_and_bfloat16_to_torch():
    assert paths._choose_path(torch.ones(2, dtype=torch.float32), has_native=True) == "kernel"
    assert paths._choose_path(torch.ones(2, dtype=torch.bfloat16), has_native=True) == "native"
    assert paths._choose_path(torch.ones(2, dtype=torch.bfloat16), has_native=False) == "composite"
    with nt.use_path("native"):
        assert paths._choose_path(torch.ones(2), has_native=False) == "composite"


@pytest.mark.parametrize("path", ["auto", "composite", "kernel"])
def test_bfloat16_input_is_computed_in_float32_and_cast_back(path):
    reference = torch.nn.LayerNorm(64)
    twin = nt.LayerNorm(64)
    x = torch.randn(8, 64).bfloat16()
    with nt.use_path(path):
        y = twin(x)
    assert y.dtype == torch.bfloat16
    expected = reference(x.float()).bfloat16()
    torch.testing.assert_close(y, expected, atol=1e-2, rtol=1e-2)


def test_the_unknown_path_name_is_refused():
    with pytest.raises(NormlabError, match="path must be one of"):
        with nt.use_path("fast"):
            pass


@pytest.mark.parametrize("factory, shape", [case[1:] for case in CASES], ids=IDS)
def test_state_dict_loads_from_normlab_into_torch_nn(factory, shape):
    reference, twin = twins(factory, torch.float32)
    twin.train()
    twin(torch.randn(shape) * 2 + 3)  # move the running statistics away from torch's
    fresh = factory()
    fresh.load_state_dict(twin.state_dict())
    assert list(fresh.state_dict()) == list(twin.state_dict())
    for name, value in twin.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_modules_keep_torch_constructor_defaults_repr_and_isinstance():
    pairs = [(nt.BatchNorm2d(8), torch.nn.BatchNorm2d(8)), (nt.LayerNorm(8), torch.nn.LayerNorm(8)),
             (nt.GroupNorm(2, 8), torch.nn.GroupNorm(2, 8)), (nt.InstanceNorm2d(8), torch.nn.InstanceNorm2d(8)),
             (nt.RMSNorm(8), torch.nn.RMSNorm(8)), (nt.SyncBatchNorm(8), torch.nn.SyncBatchNorm(8))]
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        if type(theirs) is torch.nn.SyncBatchNorm:  # DistributedDataParallel refuses its subclasses on CPU
            assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
            assert not isinstance(ours, torch.nn.SyncBatchNorm)
        else:
            assert isinstance(ours, type(theirs))


def test_reset_parameters_restores_unit_weight_zero_bias_and_fresh_running_stats():
    module = nt.BatchNorm2d(3)
    with torch.no_grad():
        module.weight.fill_(5)
    module(torch.randn(4, 3, 2, 2) + 7)
    module.reset_parameters()
    assert torch.equal(module.weight, torch.ones(3)) and torch.equal(module.running_mean, torch.zeros(3))
    assert module.num_batches_tracked.item() == 0


def test_num_batches_tracked_counts_training_steps_only():
    module = nt.BatchNorm1d(2)
    for _ in range(3):
        module(torch.randn(4, 2))
    module.eval()
    module(torch.randn(4, 2))
    assert module.num_batches_tracked.item() == 3


def test_batch_norm_refuses_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nt.BatchNorm1d(3)(torch.randn(1, 3))


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1), (2, 4), (1, 4, 2)])
@pytest.mark.parametrize("grad", [False, True])
def test_group_norm_with_one_value_in_all_fails_and_otherwise_computes_as_torch(shape, grad):
    x = torch.randn(shape, requires_grad=grad)
    try:
        expected = torch.nn.GroupNorm(4, 4)(x)
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error))):
            nt.GroupNorm(4, 4)(x)
        return
    # (groups of one value: normlab gives exact zeros, torch (x − mean)·rsqrt(eps) with its
    # float32 mean's rounding, up to about 2e-5 here)
    torch.testing.assert_close(nt.GroupNorm(4, 4)(x), expected, rtol=0, atol=1e-4)


def test_unbatched_input_to_instance_norm_matches_torch():
    x = torch.randn(3, 7)
    torch.testing.assert_close(nt.InstanceNorm1d(3)(x), torch.nn.InstanceNorm1d(3)(x))


@pytest.mark.parametrize("path", ["kernel", "composite"])
def test_channels_last_input_gives_channels_last_output_and_grad_equal_to_torch(path):
    x = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    grad_y = torch.randn(4, 6, 5, 5)
    for make in (lambda: torch.nn.BatchNorm2d(6), lambda: torch.nn.GroupNorm(3, 6)):
        reference = make()
        twin = nt.convert(copy.deepcopy(reference))
        with nt.use_path(path):
            y = twin(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        expected = reference(x)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
        (grad_x,) = torch.autograd.grad((y * grad_y).sum(), x)
        (expected_grad_x,) = torch.autograd.grad((expected * grad_y).sum(), x)
        torch.testing.assert_close(grad_x, expected_grad_x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["train", "train_serial", "eval"])
def test_kernel_path_writes_into_the_output_without_copying_a_contiguous_input(monkeypatch, case):
    seen = {}
    size = 5
    if case == "train":  # batch norm in training calls the column kernels directly, above the serial size on views
        from normlab import kernels

        original = kernels.column_forward
        size = 224  # (4·3·224·224 values: above kernels.threads.serial_below on either pool; below the 8 MB pool)

        def spy(x, y, *args):
            seen["x"], seen["out"] = x.ctypes.data, y.ctypes.data
            assert x.flags.c_contiguous
            return original(x, y, *args)

        monkeypatch.setattr(kernels, "column_forward", spy)
    elif case == "train_serial":  # below it, on the tensors' addresses (normlab.kernels.addressed)
        from normlab.kernels import addressed

        original = addressed.column_forward32_at

        def spy(x_address, y_address, *args):
            seen["x"], seen["out"] = x_address, y_address
            return original(x_address, y_address, *args)

        monkeypatch.setattr(addressed, "column_forward32_at", spy)
    else:
        original = ops.core.normalize_with_stats

        def spy(x, *args, **kwargs):
            seen["x"], seen["out"] = x.ctypes.data, kwargs["out"].ctypes.data
            assert x.flags.c_contiguous
            return original(x, *args, **kwargs)

        monkeypatch.setattr(ops.core, "normalize_with_stats", spy)
    x = torch.randn(4, 3, size, size).to(memory_format=torch.channels_last)
    twin = nt.BatchNorm2d(3) if case != "eval" else nt.GroupNorm(3, 3)  # (its weight needs a gradient: the full path)
    y = twin(x)
    assert seen["x"] == x.data_ptr()  # a view, not a copy
    assert seen["out"] == y.data_ptr()


class TestGenericNorm:
    def test_batch_norm_pattern_with_running_stats_equals_batch_norm_2d(self):
        reference = torch.nn.BatchNorm2d(4, momentum=None)
        norm = nt.Norm("[b] c [h w]", params="c", c=4, momentum=None, track_running_stats=True)
        with torch.no_grad():
            reference.weight.normal_()
        norm.load_state_dict(reference.state_dict())
        train_and_compare(reference, norm, (5, 4, 3, 3), torch.float32)

    def test_channels_last_pattern_equals_batch_norm_on_the_permuted_input(self):
        norm = nt.Norm("[b h w] c", params="c", c=4, track_running_stats=True)
        reference = torch.nn.BatchNorm2d(4)
        x = torch.randn(3, 5, 5, 4)
        torch.testing.assert_close(norm(x), reference(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        torch.testing.assert_close(norm.running_var, reference.running_var)

    def test_instance_pattern_averages_running_stats_over_the_batch_as_instance_norm(self):
        norm = nt.Norm("b c [l]", params="c", c=3, track_running_stats=True)
        reference = torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
        # torch's instance norm never counts batches; Norm counts them as batch norm does
        train_and_compare(reference, norm, (4, 3, 6), torch.float32, skip_buffers=("num_batches_tracked",))
        assert norm.num_batches_tracked.item() == STEPS

    @pytest.mark.parametrize("path", ["kernel", "composite", "masked"])
    def test_rms_running_statistics_keep_the_batch_mean_square_without_a_bessel_factor(self, path):
        # no mean is estimated, so the mean square is E[x²]'s unbiased estimate as it is;
        # n/(n − 1) made evaluation on the training batch differ (by sqrt(2) at n = 2)
        norm = nt.Norm("[b] c", params="c", c=3, rms=True, track_running_stats=True, momentum=1.0)
        x = torch.randn(2, 3) + 1
        with nt.use_path("kernel" if path == "masked" else path):
            y = norm(x, mask=torch.ones(2, 1, dtype=torch.bool)) if path == "masked" else norm(x)
            torch.testing.assert_close(norm.running_var, x.square().mean(0))
            norm.eval()
            torch.testing.assert_close(norm(x), y)

    def test_group_norm_with_one_group_equals_layer_norm_with_per_channel_parameters(self):
        x = torch.randn(2, 4, 3, 3)
        norm = nt.Norm("b [c h w]", params="c", c=4)
        torch.testing.assert_close(norm(x), nt.GroupNorm(1, 4)(x))

    @pytest.mark.parametrize("path", ["kernel", "composite"])
    def test_per_group_parameters_give_the_same_output_on_both_paths(self, path):
        norm = nt.Norm("b (g [c]) [h w]", params="g", g=2)
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([2.0, -1.0]))
        x = torch.randn(2, 4, 3, 3)
        with nt.use_path(path):
            y = norm(x)
        expected = torch.nn.functional.group_norm(x, 2) * torch.tensor([2.0, 2.0, -1.0, -1.0]).view(1, 4, 1, 1)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)

    def test_a_bad_pattern_fails_at_construction_with_a_caret(self):
        with pytest.raises(PatternSyntaxError, match=r"\^"):
            nt.Norm("b (g [c) [h w]", params="c")

    def test_params_naming_a_missing_axis_fail_at_construction(self):
        with pytest.raises(NormlabError, match="'d'"):
            nt.Norm("b [c]", params="d", d=3)

    def test_params_without_sizes_fail_at_construction_and_say_which(self):
        with pytest.raises(NormlabError, match="c=..."):
            nt.Norm("[b] c", params="c")

    def test_running_axes_must_be_kept_axes(self):
        with pytest.raises(NormlabError, match="running_axes"):
            nt.Norm("[b] c", params="c", c=3, track_running_stats=True, running_axes="b")

    def test_reset_parameters_and_extra_repr_name_the_pattern(self):
        norm = nt.Norm("[b] c", params="c", c=3, track_running_stats=True)
        norm(torch.randn(4, 3) + 2)
        norm.reset_parameters()
        assert torch.equal(norm.running_mean, torch.zeros(3)) and norm.num_batches_tracked.item() == 0
        assert "'[b] c'" in repr(norm) and "c=3" in repr(norm)


def test_import_normlab_does_not_import_torch():
    code = "import sys, normlab; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=__file__.rsplit("/tests/", 1)[0]).returncode == 0


@pytest.mark.parametrize("layout", ["channels_last_layer_norm", "channels_last_rms_norm", "transposed",
                                    "strided_slice"])
def test_permuted_and_strided_inputs_match_torch_in_values_and_output_strides(layout):
    torch.manual_seed(0)
    if layout == "channels_last_layer_norm":
        reference, x = torch.nn.LayerNorm((4, 5)), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    elif layout == "channels_last_rms_norm":  # (torch's rms_norm keeps channels_last, its layer_norm does not)
        reference, x = torch.nn.RMSNorm((4, 5)), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        reference, x = torch.nn.LayerNorm(5), torch.randn(5, 4).t()
    else:
        reference, x = torch.nn.InstanceNorm1d(6, affine=True), torch.randn(4, 6, 10)[:, :, ::2]
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_()
    twin = nt.convert(copy.deepcopy(reference))
    x.requires_grad_()
    grad_y = torch.randn(x.shape)
    y = twin(x)
    expected = reference(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    assert y.stride() == expected.stride()  # (torch.nn's layer and instance norms return contiguous outputs)
    assert twin(x, mask=torch.ones(x.shape, dtype=torch.bool)).stride() == expected.stride()  # (mask= as without)
    (grad_x,) = torch.autograd.grad((y * grad_y).sum(), x)
    (expected_grad_x,) = torch.autograd.grad((expected * grad_y).sum(), x)
    torch.testing.assert_close(grad_x, expected_grad_x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", ["auto", "composite"])
@pytest.mark.parametrize("twin_class", [nt.LayerNorm2d])
def test_channels_first_layer_norm_of_a_permuted_input_gives_an_output_that_views_as_torchvisions(twin_class, path):
    # a feature map with its spatial axes swapped (x.rot90(1, (2, 3)) is one): torchvision's
    # LayerNorm2d, which permutes around torch's layer norm, gives a channels_last output
    # (ChannelsFirstLayerNorm's originals compute elementwise and keep the input's order of
    # strides, as VitDet's: see test_a_converted_vitdet_layer_norm_lays_out_its_output_...)
    from tests.mirrored_norms import TorchvisionLayerNorm2d

    torch.manual_seed(0)
    reference = TorchvisionLayerNorm2d(4, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    twin = twin_class(4)
    twin.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 5, 3).transpose(2, 3)
    with nt.use_path(path):
        y = twin(x)
    expected = reference(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y.view(2, 4, 15), expected.view(2, 4, 15), atol=1e-5, rtol=1e-4)


def _channels_first_originals():
    """ConvNeXt-style channels-first layer norms (torchvision's, mirrored; transformers'
    ConvNeXt and SAM ones where transformers imports), each with random affine parameters."""
    from tests.mirrored_norms import TorchvisionLayerNorm2d

    originals = {"torchvision": lambda: TorchvisionLayerNorm2d(4, eps=1e-6)}
    try:
        from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
        from transformers.models.sam.modeling_sam import SamLayerNorm
    except ImportError:
        return originals
    originals["convnext"] = lambda: ConvNextLayerNorm(4, data_format="channels_first")
    originals["sam"] = lambda: SamLayerNorm(4, data_format="channels_first")
    return originals


@pytest.mark.parametrize("path", ["auto", "composite"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("original", ["torchvision", "convnext", "sam"])
def test_converted_layer_norm_2d_lays_out_its_output_and_gradients_as_the_original(original, layout, path):
    """The originals permute to channels-last, call torch's layer norm and permute back, so
    their output is channels_last for any input: ``y.permute(0, 2, 3, 1).view(N, H * W, C)``
    (tokens for a transformer stage, as SAM's and Mask2Former's necks take them) works on it.
    The twin gave a contiguous input a contiguous output, on which that view raises."""
    originals = _channels_first_originals()
    if original not in originals:
        pytest.skip("transformers does not import")
    torch.manual_seed(0)
    reference = originals[original]()
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    twin = nt.convert(torch.nn.Sequential(copy.deepcopy(reference)))[0]
    assert isinstance(twin, nt.LayerNorm2d)
    x = torch.randn(2, 4, 5, 3)
    x = {"contiguous": x, "channels_last": x.to(memory_format=torch.channels_last),
         "transposed": x.transpose(2, 3)}[layout]
    grad_y = torch.randn(x.shape)
    x_twin, x_ref = (x.detach().clone(memory_format=torch.preserve_format).requires_grad_() for _ in range(2))
    with nt.use_path(path):
        y = twin(x_twin)
        masked = twin(x.detach(), mask=torch.ones(2, 1, *x.shape[2:], dtype=torch.bool))
    expected = reference(x_ref)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    assert y.stride() == expected.stride() == masked.stride()
    n, c, h, w = y.shape
    torch.testing.assert_close(y.permute(0, 2, 3, 1).view(n, h * w, c), expected.permute(0, 2, 3, 1).view(n, h * w, c),
                               atol=1e-5, rtol=1e-4)
    (y * grad_y).sum().backward()
    (expected * grad_y).sum().backward()
    torch.testing.assert_close(x_twin.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    assert x_twin.grad.stride() == x_ref.grad.stride()


@pytest.mark.parametrize("name", ["eps", "pattern", "params", "rms", "sizes", "x", "mask"])
def test_axes_named_like_arguments_are_sized_through_a_sizes_mapping(name):
    """``sizes={name: g}`` sizes an axis named like an argument of Norm, of
    normlab.torch.normalize or of normalize_masked, which a keyword cannot. Oracle:
    torch.nn.functional.group_norm (the pattern is a group norm with g groups) and torch
    autograd on it."""
    from normlab.torch.masked import normalize_masked

    pattern = f"b ({name} [c]) [s]"
    x = torch.randn(3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    weight = torch.rand(6, dtype=torch.float64) + 0.5
    want = torch.nn.functional.group_norm(x, 2, weight, None)
    norm = nt.Norm(pattern, params=f"({name} c)", sizes={name: 2}, c=3, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.zero_()
    leaf = x.clone().requires_grad_()
    torch.testing.assert_close(norm(leaf), want)
    reference = x.clone().requires_grad_()
    grad_y = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(norm(leaf), leaf, grad_y)[0],
                               torch.autograd.grad(torch.nn.functional.group_norm(reference, 2, weight, None),
                                                   reference, grad_y)[0])
    assert (f"sizes={{'{name}': 2, 'c': 3}}" if name in ("eps", "pattern", "params", "rms", "sizes")
            else f"{name}=2, c=3") in repr(norm)  # a keyword where one could pass it
    torch.testing.assert_close(nt.normalize(x, pattern, sizes={name: 2}),
                               torch.nn.functional.group_norm(x, 2))
    torch.testing.assert_close(normalize_masked(x, pattern, sizes={name: 2}, mask=torch.ones_like(x, dtype=torch.bool)).y,
                               torch.nn.functional.group_norm(x, 2))
    with pytest.raises(ValueError, match="given both in sizes= and as a keyword"):
        nt.Norm("b (g [c])", sizes={"g": 2}, g=2)


@pytest.mark.parametrize("factory", [
    lambda: nt.Norm("b (g [c])", params="(g c)", g=2, c=4),
    lambda: nt.FusedAddRMSNorm(8),
    lambda: nt.FusedAddLayerNorm(8),
    lambda: nt.AdaLayerNorm(8),
], ids=["Norm", "FusedAddRMSNorm", "FusedAddLayerNorm", "AdaLayerNorm"])
def test_scripting_a_module_with_no_torch_nn_forward_says_what_compiles_it_instead(factory):
    """torch.jit.script compiles a twin through torch.nn's forward; these modules have
    none, and scripting them, alone or inside a model, raises torch's RuntimeError naming
    the module and the tools that do compile it (torch's own error pointed at a try
    block or at keyword-only arguments)."""
    module = factory()
    for target in (module, torch.nn.Sequential(torch.nn.Identity(), module)):
        with pytest.raises(RuntimeError, match=f"cannot compile normlab's {type(module).__name__}.*torch.compile"):
            torch.jit.script(target)


@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm_without_bias"])
def test_norm_with_a_weight_and_no_bias_builds_and_gives_torch_nn_s_outputs_and_state_dict(kind):
    """``rms=True`` (a weight, no bias, as RMSNorm) and ``bias=False``: the weight alone, and
    ``bias`` None, as in torch.nn; QK-norm's per-head pattern on heads of a packed qkv."""
    torch.manual_seed(0)
    if kind == "rms_norm":
        ours, theirs = nt.Norm("b t h [d]", params="d", d=8, rms=True, eps=1e-6), torch.nn.RMSNorm(8, eps=1e-6)
    else:
        ours, theirs = nt.Norm("b t h [d]", params="d", d=8, bias=False), torch.nn.LayerNorm(8, bias=False)
    assert ours.bias is None
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    q = torch.randn(2, 5, 3, 3, 8)[:, :, 0]  # the q heads of a packed (b, t, 3, h, d) projection
    torch.testing.assert_close(ours(q), theirs(q))


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_an_empty_normalized_shape_constructs_as_in_torch_nn_and_fails_at_forward_with_its_error(name):
    ours, theirs = getattr(nt, name)(()), getattr(torch.nn, name)(())
    assert repr(ours) == repr(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError) as expected:
        theirs(x)
    for kwargs in ({}, {"mask": torch.ones(2, 3, dtype=torch.bool)}):
        with pytest.raises(type(expected.value), match="normalized_shape"):
            ours(x, **kwargs)


def _groups_pruned(nn):
    """A GroupNorm whose channels were pruned to a count its groups do not divide."""
    norm = nn.GroupNorm(4, 8)
    norm.num_channels, norm.weight, norm.bias = 6, torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.zeros(6))
    return norm


# (id, module built from torch.nn or normlab.torch, training, bad input) for every twin
BAD_INPUTS = [
    ("batch_norm_1d_one_value", lambda nn: nn.BatchNorm1d(4), True, (1, 4)),
    ("batch_norm_1d_one_value_3d", lambda nn: nn.BatchNorm1d(4), True, (1, 4, 1)),
    ("batch_norm_2d_one_value", lambda nn: nn.BatchNorm2d(4), True, (1, 4, 1, 1)),
    ("batch_norm_3d_one_value", lambda nn: nn.BatchNorm3d(4), True, (1, 4, 1, 1, 1)),
    ("batch_norm_one_value_eval_without_running_stats", lambda nn: nn.BatchNorm2d(4, track_running_stats=False),
     False, (1, 4, 1, 1)),
    ("batch_norm_wrong_channels", lambda nn: nn.BatchNorm2d(4), True, (2, 3, 2, 2)),
    ("batch_norm_wrong_ndim", lambda nn: nn.BatchNorm2d(4), True, (2, 4, 2)),
    ("instance_norm_one_position", lambda nn: nn.InstanceNorm1d(4), True, (2, 4, 1)),
    ("instance_norm_wrong_channels", lambda nn: nn.InstanceNorm1d(4, affine=True), True, (2, 3, 5)),
    ("instance_norm_wrong_ndim", lambda nn: nn.InstanceNorm2d(4), True, (4, 3)),
    ("group_norm_wrong_channels", lambda nn: nn.GroupNorm(2, 4), True, (2, 6, 3)),
    ("group_norm_channels_not_divisible", lambda nn: nn.GroupNorm(2, 4), True, (2, 3, 3)),
    ("group_norm_groups_pruned_not_dividing", _groups_pruned, True, (2, 6, 3)),
    ("group_norm_wrong_ndim", lambda nn: nn.GroupNorm(2, 4), True, (4,)),
    ("layer_norm_wrong_shape", lambda nn: nn.LayerNorm((3, 4)), True, (2, 4, 3)),
    ("layer_norm_too_few_axes", lambda nn: nn.LayerNorm((3, 4)), True, (4,)),
    ("rms_norm_wrong_shape", lambda nn: nn.RMSNorm(4), True, (2, 5)),
]


@pytest.mark.parametrize("build, training, shape", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_every_twin_refuses_a_bad_input_with_torch_nn_s_own_exception_type_and_state(build, training, shape):
    """Drop-in twins raise torch.nn's own exception type (not a subclass of it: code written
    for torch.nn may test the type, or catch a RuntimeError where torch raises one), and
    leave the running statistics and batch counter as torch.nn leaves them. A batch norm
    with one value per channel in training raised normlab's InputError."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    outcomes = []
    for library in (torch.nn, nt):
        module = build(library).train(training)
        with pytest.raises(Exception) as raised:
            module(x)
        outcomes.append((type(raised.value), {k: v.clone() for k, v in module.state_dict().items()}))
    (twin_type, twin_state), (torch_type, torch_state) = outcomes[1], outcomes[0]
    assert twin_type is torch_type
    torch.testing.assert_close(twin_state, torch_state)


WRONG_CHANNELS = [
    ("BatchNorm1d", lambda nn: nn.BatchNorm1d(8), (3, 5)),
    ("BatchNorm1d, channels last", lambda nn: nn.BatchNorm1d(8), (3, 5, 8)),
    ("BatchNorm2d", lambda nn: nn.BatchNorm2d(8), (2, 4, 3, 3)),
    ("BatchNorm2d, evaluation", lambda nn: nn.BatchNorm2d(8).eval(), (2, 4, 3, 3)),
    ("BatchNorm2d, no running statistics", lambda nn: nn.BatchNorm2d(8, track_running_stats=False), (2, 4, 3, 3)),
    ("BatchNorm3d", lambda nn: nn.BatchNorm3d(8), (2, 4, 2, 3, 3)),
    ("SyncBatchNorm", lambda nn: nn.SyncBatchNorm(8), (2, 4, 3, 3)),
    # (torch counts an instance norm's running statistics per sample and channel: "should contain 8 elements not 16")
    ("InstanceNorm1d, running statistics", lambda nn: nn.InstanceNorm1d(8, track_running_stats=True), (2, 4, 3)),
    ("InstanceNorm2d, running statistics, evaluation",
     lambda nn: nn.InstanceNorm2d(8, track_running_stats=True).eval(), (2, 4, 3, 3)),
]


@pytest.mark.parametrize("build, shape", [case[1:] for case in WRONG_CHANNELS], ids=[c[0] for c in WRONG_CHANNELS])
def test_a_batch_norm_given_the_wrong_channel_count_says_which_shape_it_expected_and_how_to_fix_it(build, shape):
    """torch.nn's batch norm says only "running_mean should contain 4 elements not 8", which
    names neither shape (and reads as if the running mean were wrong; an instance norm's
    with running statistics counts them per sample: "8 elements not 16"); the twin raises the
    same exception type with torch's words first, then the shape it expected, the input's,
    and what to change. Oracle: torch.nn's module on the same input (type and message)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception) as expected:
        build(torch.nn)(x)
    with pytest.raises(Exception) as raised:
        build(nt)(x)
    assert type(raised.value) is type(expected.value) is RuntimeError
    message = str(raised.value)
    assert message.startswith(str(expected.value)), message
    assert f"expected input of shape {(shape[0], 8, *shape[2:])}" in message, message
    assert f"got input of shape {shape}" in message and "pass 8 channels on axis 1" in message, message
    assert ("x.movedim(-1, 1)" in message) == (shape[-1] == 8), message


@pytest.mark.parametrize("name", ["momentum", "affine", "track_running_stats", "eps"])
def test_a_wrong_or_missing_size_of_an_axis_named_like_an_argument_of_norm_is_asked_for_in_sizes(name):
    """The hint said "pass momentum=6" (or "e.g. affine=..."), which sets Norm's own argument."""
    x = torch.ones(2, 6)
    with pytest.raises(ValueError, match=re.escape(f"pass sizes={{{name!r}: 6}}")):
        nt.Norm(f"b [{name}]", sizes={name: 5}, affine=False)(x)
    with pytest.raises(ValueError, match=re.escape(f"e.g. sizes={{{name!r}: ...}}")):
        nt.Norm(f"b ({name} [c])", affine=False)(x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_converted_vitdet_layer_norm_with_a_mask_lays_out_its_output_as_the_original(layout):
    """VitDet's channels-first layer norm (elementwise torch operations) keeps a
    channels_last input's layout, and so does its converted ChannelsFirstLayerNorm; given
    mask= (all True: the same statistics) the twin gave a contiguous output instead."""
    VitDetLayerNorm = pytest.importorskip("transformers.models.vitdet.modeling_vitdet").VitDetLayerNorm
    torch.manual_seed(0)
    original = VitDetLayerNorm(4)
    with torch.no_grad():
        original.weight.normal_()
        original.bias.normal_()
    twin = nt.convert(torch.nn.Sequential(copy.deepcopy(original)))[0]
    assert isinstance(twin, nt.ChannelsFirstLayerNorm)
    x = torch.randn(2, 4, 5, 3)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    expected = original(x)
    for y in (twin(x), twin(x, mask=torch.ones(2, 1, 5, 3, dtype=torch.bool))):
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert y.stride() == expected.stride()


@pytest.mark.parametrize("original", ["torchvision", "convnext"])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_a_converted_layer_norm_2d_with_its_parameter_deleted_raises_as_the_original_with_mask_too(original, name):
    """``del norm.bias`` on a converted LayerNorm2d: the original's forward reads the attribute
    and raises AttributeError, and so did the twin without mask=; with mask= it read the
    bias with a default of None and normalized without it, silently."""
    originals = _channels_first_originals()
    if original not in originals:
        pytest.skip("transformers is not importable")
    reference = originals[original]()
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(2, 4, 3, 3)
    for module in (reference, twin):
        module(x)
        delattr(module, name)
    with pytest.raises(AttributeError, match=name) as theirs:
        reference(x)
    with pytest.raises(theirs.type, match=name):
        twin(x)
    with pytest.raises(theirs.type, match=name):
        twin(x, mask=torch.rand(2, 1, 3, 3) > 0.5)


def _strided_input(draw, channels: int) -> "torch.Tensor":
    """A (N, C, H, W) tensor laid out in any order, possibly sliced (gaps) or expanded (a
    stride of 0), possibly channels_last: the layouts a model hands a norm."""
    from hypothesis import strategies as st

    shape = [draw(st.integers(1, 3)), channels, draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    order = draw(st.permutations(range(4)))
    steps = [draw(st.sampled_from([1, 1, 2])) for _ in range(4)]
    memory = torch.randn([shape[axis] * steps[axis] for axis in order], dtype=torch.float64)
    x = memory.permute([order.index(axis) for axis in range(4)])[tuple(slice(None, None, s) for s in steps)]
    expanded = draw(st.sampled_from([None, None, None, 0, 2, 3]))
    if expanded is not None:
        x = x.narrow(expanded, 0, 1).expand(shape)
    if draw(st.booleans()) and expanded is None and steps == [1, 1, 1, 1]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _strides_agree(got: "torch.Tensor", expected: "torch.Tensor") -> bool:
    # (an axis of one element addresses no other: torch's devices set its stride apart)
    return all(size == 1 or a == b for size, a, b in zip(expected.shape, got.stride(), expected.stride()))


@pytest.mark.slow  # (about 10 s on one core: hypothesis' examples, each with autograd)
def test_a_converted_vitdet_layer_norm_lays_out_its_output_as_the_original_for_any_input_layout():
    """VitDet's channels-first layer norm is a mean and elementwise torch operations, which
    keep the input's order of strides (a transposed input gives a transposed output, a
    slice a dense one in its order); the converted ChannelsFirstLayerNorm gave a contiguous
    output for every such input but channels_last, with mask= too, and on torch's path
    (use_path("native"), as on GPUs) a channels_last one for every input. Values, gradients
    and strides against the original, on every path."""
    VitDetLayerNorm = pytest.importorskip("transformers.models.vitdet.modeling_vitdet").VitDetLayerNorm
    from hypothesis import given
    from hypothesis import strategies as st

    torch.manual_seed(0)
    original = VitDetLayerNorm(3).double()
    with torch.no_grad():
        original.weight.normal_()
        original.bias.normal_()
    twin = nt.convert(torch.nn.Sequential(copy.deepcopy(original)))[0]
    assert isinstance(twin, nt.ChannelsFirstLayerNorm)

    @given(data=st.data(), masked=st.booleans(), grad=st.booleans(),
           path=st.sampled_from(["auto", "kernel", "composite", "native"]))
    def check(data, masked, grad, path):
        x = _strided_input(data.draw, 3)
        x_ref, x_twin = (x.detach().requires_grad_(grad) for _ in range(2))
        expected = original(x_ref)
        mask = torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.bool) if masked else None
        with nt.use_path(path):
            y = twin(x_twin, mask=mask)
        assert _strides_agree(y, expected), (tuple(x.shape), x.stride(), y.stride(), expected.stride())
        torch.testing.assert_close(y, expected)
        if grad:
            grad_y = torch.randn_like(expected)
            torch.testing.assert_close(torch.autograd.grad(y, x_twin, grad_y)[0],
                                       torch.autograd.grad(expected, x_ref, grad_y)[0])

    check()


def test_a_contiguous_input_to_a_channels_first_layer_norm_is_asked_its_layout_once():
    """7e59fdc asked a contiguous input whether it is contiguous, then handed it to
    torch_layout, which asked again: a C call more on every call of a converted VitDet layer
    norm. Oracle for the values: torch's layer norm over the permuted channels."""
    torch.manual_seed(0)
    norm = nt.ChannelsFirstLayerNorm(3)
    x = torch.randn(2, 3, 4, 5)
    called = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "torch_layout":
            called.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        y = norm(x)
    finally:
        sys.setprofile(None)
    assert called == []
    want = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (3,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, want.permute(0, 3, 1, 2))


def test_star_import_gives_every_class_normlab_torch_names_as_its_own():
    """``from normlab.torch import *`` gave every public module but WrittenOutLayerNorm, which
    convert() puts in place of hand-written layer norms and whose pickles name it
    normlab.torch.WrittenOutLayerNorm."""
    names = {"__name__": "star"}
    exec("from normlab.torch import *", names)
    public = {name for name, value in vars(nt).items()
              if not name.startswith("_") and getattr(value, "__module__", None) == "normlab.torch"}
    assert public - set(names) == set()
