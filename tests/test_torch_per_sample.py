"""Per-sample gradients on converted models, as differential privacy computes them:
torch's ExpandedWeights (``call_for_per_sample_grads``, Opacus' ``grad_sample_mode="ew"``)
and Opacus. Oracles: torch.nn's modules under the same call, a Python loop of one
sample's gradients at a time, and Opacus' own verdict on torch.nn's models."""

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils._per_sample_grad import call_for_per_sample_grads  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.mirrored_norms import TimmRmsNorm2d  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")  # (Opacus, for tests)

class ConvNeXtLayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first layer norm, as torchvision writes it (convert makes it LayerNorm2d)."""

    def forward(self, x):
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                        self.eps).permute(0, 3, 1, 2)


# torch.nn norms whose functions ExpandedWeights computes per-sample gradients for, and an input shape
EXPANDED = {
    "LayerNorm": (lambda: nn.LayerNorm(6), (5, 4, 6)),
    "LayerNorm over two axes": (lambda: nn.LayerNorm([4, 6]), (5, 4, 6)),
    "LayerNorm without bias": (lambda: nn.LayerNorm(6, bias=False), (5, 6)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3)),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(4, affine=True), (5, 4, 7)),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(4, affine=True), (5, 4, 3, 3)),
    "InstanceNorm3d": (lambda: nn.InstanceNorm3d(4, affine=True), (5, 4, 2, 3, 3)),
    "ConvNeXt's LayerNorm2d": (lambda: ConvNeXtLayerNorm2d(4), (5, 4, 3, 3)),
}


def _perturbed(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return module


@pytest.mark.parametrize("name", list(EXPANDED))
def test_expanded_weights_give_a_twin_the_per_sample_gradients_of_torch_nn_and_of_a_loop(name):
    make, shape = EXPANDED[name]
    reference = _perturbed(make())
    twin = nt.convert(copy.deepcopy(reference))
    assert type(twin).__module__ == "normlab.torch"
    torch.manual_seed(2)
    x, probe = torch.randn(shape), torch.randn(shape)
    outputs, per_sample = [], []
    for module in (reference, twin):
        y = call_for_per_sample_grads(module)(x)
        (y * probe).sum().backward()
        outputs.append(y)
        per_sample.append([parameter.grad_sample for parameter in module.parameters()])
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad((reference(x[i:i + 1]) * probe[i:i + 1]).sum(), list(reference.parameters()))
        for i in range(shape[0])))]
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(per_sample[1], per_sample[0])
    torch.testing.assert_close(per_sample[1], looped)


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm1d(4), lambda: nn.RMSNorm(4)], ids=["BatchNorm1d", "RMSNorm"])
def test_expanded_weights_refuse_a_twin_as_they_refuse_its_torch_nn_class_in_torch_s_words(make):
    reference = make()
    twin = nt.convert(copy.deepcopy(reference))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError) as expected:
        call_for_per_sample_grads(reference)(x)
    with pytest.raises(RuntimeError) as got:
        call_for_per_sample_grads(twin)(x)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("make, shape", [(lambda: nt.LayerNorm(6), (5, 4, 3, 6)), (lambda: nt.LayerNorm2d(4), (5, 4, 3, 3))],
                         ids=["LayerNorm", "LayerNorm2d"])
def test_a_twin_looks_for_expanded_weights_only_where_a_parameter_is_not_a_plain_tensor(make, shape, monkeypatch):
    """Dynamo's import (so normlab.torch's) brings ExpandedWeight's module with it: a check run
    on every call wherever that module is imported would cost each twin call four Python calls.
    Plain parameters (every call outside per-sample gradients) skip it; ExpandedWeights take it."""
    import sys

    from normlab.torch import modules, paths

    assert paths.EXPANDED_WEIGHTS_MODULE in sys.modules  # (by Dynamo's import, and this file's)
    looked = []
    monkeypatch.setattr(modules, "_holds_expanded_weights",
                        lambda module: looked.append(module) or paths._holds_expanded_weights(module))
    twin = make()
    x = torch.randn(shape)
    twin(x).sum().backward()
    with torch.no_grad():
        twin(x)
    assert looked == []
    reference = copy.deepcopy(twin)
    call_for_per_sample_grads(twin)(x).sum().backward()
    assert looked  # and the per-sample gradients are torch.nn's (the tests above)
    assert twin.weight.grad_sample.shape == (5,) + tuple(reference.weight.shape)


def test_expanded_weights_give_fused_add_layer_norm_the_per_sample_gradients_of_layer_norm_of_the_sum():
    """Its composite, ``F.layer_norm(x + residual)``, is a function ExpandedWeights know."""
    reference = _perturbed(nn.LayerNorm(6))
    block = _perturbed(nt.FusedAddLayerNorm(6))
    torch.manual_seed(2)
    x, residual, probe = torch.randn(5, 4, 6), torch.randn(5, 4, 6), torch.randn(5, 4, 6)
    y, total = call_for_per_sample_grads(block)(x, residual)
    (y * probe).sum().backward()
    expected = call_for_per_sample_grads(reference)(x + residual)
    (expected * probe).sum().backward()
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad((reference(x[i:i + 1] + residual[i:i + 1]) * probe[i:i + 1]).sum(),
                            list(reference.parameters())) for i in range(len(x))))]
    torch.testing.assert_close((y, total), (expected, x + residual))
    torch.testing.assert_close([parameter.grad_sample for parameter in block.parameters()], looped)


# normlab modules, and the inputs of a call, that no torch function ExpandedWeights know computes
NOT_EXPANDED = {
    "Norm": (lambda: nt.Norm("b [c]", params="c", c=6), lambda x: ((x,), {})),
    "Norm with running statistics": (lambda: nt.Norm("b t [c]", params="c", c=6, track_running_stats=True),
                                     lambda x: ((x,), {})),
    "FusedAddRMSNorm": (lambda: nt.FusedAddRMSNorm(6), lambda x: ((x, x.flip(0)), {})),
    "FusedAddRMSNorm of one input": (lambda: nt.FusedAddRMSNorm(6), lambda x: ((x,), {})),
    "GatedRMSNorm": (lambda: nt.GatedRMSNorm(6, group_size=3), lambda x: ((x,), {"z": x.flip(0)})),
    "LayerNorm with mask=": (lambda: nt.LayerNorm(6), lambda x: ((x,), {"mask": x > 0})),
    "Norm with segment_ids=": (lambda: nt.Norm("b [t] c", params="c", c=6),
                               lambda x: ((x,), {"segment_ids": torch.tensor([0, 0, 1, 1])})),
}


@pytest.mark.parametrize("name", list(NOT_EXPANDED))
def test_expanded_weights_refuse_a_module_they_cannot_compute_naming_it_and_the_modes_that_can(name):
    """Their own error names a function inside normlab (``__get__``, ``numel``) that the user never called."""
    make, inputs = NOT_EXPANDED[name]
    module = make()
    args, kwargs = inputs(torch.randn(5, 4, 6))
    with pytest.raises(RuntimeError) as refused:
        call_for_per_sample_grads(module, batch_size=5)(*args, **kwargs)
    message = str(refused.value)
    assert message.startswith(type(module).__name__ + " ")
    assert "ExpandedWeights" in message and 'grad_sample_mode="hooks"' in message


@pytest.mark.parametrize("make", [lambda: nt.BatchNorm1d(4), lambda: nt.SyncBatchNorm(4)],
                         ids=["BatchNorm1d", "SyncBatchNorm"])
def test_expanded_weights_refuse_a_batch_norm_given_a_mask_without_sending_it_to_a_mode_that_refuses_it_too(make):
    """Opacus' other modes refuse a batch norm (the tests below): the error says how to replace it."""
    module = make()
    with pytest.raises(RuntimeError) as refused:
        call_for_per_sample_grads(module)(torch.randn(3, 4, 5), torch.ones(3, 1, 5, dtype=torch.bool))
    message = str(refused.value)
    assert message.startswith(type(module).__name__ + " with mask= ") and "ModuleValidator.fix" in message
    assert "grad_sample_mode=\"hooks\"" not in message


def _cnn(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return _perturbed(nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)))


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(2, 8), lambda: nn.LayerNorm([8, 6, 6]),
                                  lambda: nn.InstanceNorm2d(8, affine=True)], ids=["GroupNorm", "LayerNorm",
                                                                                  "InstanceNorm2d"])
def test_an_opacus_step_with_expanded_weights_moves_a_converted_model_as_torch_nn_s(norm):
    """Opacus' ``grad_sample_mode="ew"``: per-sample gradients clipped (to a norm they all
    exceed) and summed, without noise, then one SGD step."""
    opacus = pytest.importorskip("opacus")
    reference = _cnn(norm())
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    stepped = []
    for model in (copy.deepcopy(reference), nt.convert(copy.deepcopy(reference))):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        private, optimizer, _ = opacus.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
            grad_sample_mode="ew", poisson_sampling=False)
        nn.functional.cross_entropy(private(x), y).backward()
        optimizer.step()
        stepped.append([parameter.detach() for parameter in model.parameters()])
    assert type(model[1]).__module__ == "normlab.torch"  # (the last model: the converted one)
    torch.testing.assert_close(stepped[1], stepped[0])


# norms whose outputs mix the samples of a batch, or which keep running statistics, that
# Opacus' ModuleValidator flags in torch.nn's models, each after a CNN's first convolution
OPACUS_FLAGGED = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(8),
    "BatchNorm2d without running statistics": lambda: nn.BatchNorm2d(8, track_running_stats=False),
    "BatchNorm2d with momentum=None": lambda: nn.BatchNorm2d(8, momentum=None),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(8),
    "InstanceNorm2d with running statistics": lambda: nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
}


def _verdict(errors) -> list:
    return [(type(error), str(error)) for error in errors]


def _torch_nn_class(module: nn.Module) -> type:
    """The torch.nn class a module is or stands for (a twin: the one it subclasses)."""
    return next(cls for cls in type(module).__mro__ if cls.__module__.startswith("torch.nn"))


@pytest.mark.parametrize("name", list(OPACUS_FLAGGED))
def test_opacus_validates_and_fixes_a_converted_model_as_it_does_torch_nn_s(name):
    """``ModuleValidator.validate`` names the same faults, ``fix`` makes the same layers
    (``GroupNorm``, or ``InstanceNorm`` with ``replace_bn_with_in=True``, which it refuses
    for SyncBatchNorm), and ``make_private`` refuses the model, in every mode."""
    opacus = pytest.importorskip("opacus")
    from opacus.validators import ModuleValidator

    reference = _cnn(OPACUS_FLAGGED[name]())
    twin = nt.convert(copy.deepcopy(reference))
    assert type(twin[1]).__module__ == "normlab.torch"
    expected = _verdict(ModuleValidator.validate(reference))
    assert expected and _verdict(ModuleValidator.validate(twin)) == expected
    for options in ({}, {"num_groups": 4}, {"replace_bn_with_in": True}):
        fixed = []
        for model in (reference, twin):
            try:
                fixed.append([(_torch_nn_class(m), m.extra_repr())
                              for m in ModuleValidator.fix(model, **options).modules()])
            except (opacus.validators.errors.UnsupportedModuleError, TypeError) as error:
                fixed.append(_verdict([error]))  # (Opacus' instance norm fixer takes no num_groups)
        assert fixed[1] == fixed[0]
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    for mode in ("hooks", "functorch", "ew", "ghost"):
        refusals = []
        for model in (copy.deepcopy(reference), copy.deepcopy(twin)):
            with pytest.raises(opacus.validators.errors.UnsupportedModuleError) as refused:
                opacus.PrivacyEngine().make_private(
                    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                    noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, criterion=nn.CrossEntropyLoss())
            refusals.append(_verdict(refused.value.args[0]))
        assert refusals[1] == refusals[0]


@pytest.mark.parametrize("pattern, params, sizes, torch_norm", [
    ("[b h w] c", "c", {"c": 8}, lambda: nn.BatchNorm2d(8)),
    ("[b] c [h w]", "c", {"c": 8}, lambda: nn.BatchNorm2d(8, track_running_stats=False)),
    ("b (g [c]) [h w]", "(g c)", {"g": 2, "c": 4}, lambda: nn.GroupNorm(2, 8)),
    ("b c [h w]", "c", {"c": 8}, lambda: nn.InstanceNorm2d(8, affine=True)),
])
def test_opacus_flags_a_norm_pattern_as_it_flags_the_torch_nn_norm_it_writes(pattern, params, sizes, torch_norm):
    pytest.importorskip("opacus")
    from opacus.validators import ModuleValidator

    expected = [type(error) for error in ModuleValidator.validate(_cnn(torch_norm()))]
    norm = nt.Norm(pattern, params=params, **sizes)
    errors = ModuleValidator.validate(_cnn(norm))
    assert [type(error) for error in errors] == expected
    assert all(pattern in str(error) for error in errors)


@pytest.mark.parametrize("first", ["normlab.torch", "opacus"])
def test_opacus_flags_a_converted_batch_norm_whichever_is_imported_first(first):
    """A model built and converted before Opacus is imported (a notebook's order), and
    Opacus imported before normlab.torch: a fresh interpreter each."""
    import subprocess
    import sys

    pytest.importorskip("opacus")
    build = "model = nt.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))"
    # converted before opacus is imported, after a look-up of it (as availability checks make)
    imports = ["import importlib.util, torch, normlab.torch as nt", "assert importlib.util.find_spec('opacus')", build,
               "import opacus"]
    if first == "opacus":
        imports = ["import torch, opacus", "import normlab.torch as nt", build]
    script = "\n".join(imports + ["from opacus.validators import ModuleValidator",
                                  "print(type(model[1]).__module__, len(ModuleValidator.validate(model)), "
                                  "type(ModuleValidator.fix(model)[1]).__name__)"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["normlab.torch", "1", "GroupNorm"]


def test_normlab_torch_imports_where_opacus_is_blocked_as_not_installed():
    """``sys.modules["opacus"] = None`` makes an import of opacus fail, as where it is not
    installed (test suites block packages so)."""
    import subprocess
    import sys

    script = "import sys; sys.modules['opacus'] = None; import normlab.torch; print('imported')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["imported"], done.stderr


@pytest.mark.parametrize("first", ["normlab.torch", "opacus"])
def test_an_opacus_whose_tables_moved_still_imports_and_normlab_says_what_it_could_not_do(first):
    """Filling Opacus' tables runs inside the user's ``import opacus`` (or ``import
    normlab.torch``): an Opacus whose internals moved (here: ``ModuleValidator.VALIDATORS``
    gone) must still import, with a warning, and torch.nn's verdicts stay Opacus' own."""
    import subprocess
    import sys

    pytest.importorskip("opacus")
    move = "from opacus.validators import module_validator as m; del m.ModuleValidator.VALIDATORS"
    if first == "opacus":
        imports = ["import warnings, torch, opacus", move, "with warnings.catch_warnings(record=True) as seen:",
                   "    warnings.simplefilter('always')", "    import normlab.torch"]
    else:  # the tables move while opacus imports (a stand-in for a release without them)
        imports = ["import warnings, torch, normlab.torch", "import normlab.torch.opacus_tables as t",
                   "fill = t._fill_tables", "t._fill_tables = lambda: (exec(" + repr(move) + "), fill())",
                   "with warnings.catch_warnings(record=True) as seen:", "    warnings.simplefilter('always')",
                   "    import opacus"]
    script = "\n".join(imports + ["print([str(w.message).split(' (')[0] for w in seen if w.category is RuntimeWarning])"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "normlab could not add its modules to Opacus' tables" in done.stdout


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # (torch's, at Opacus' first layer)
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("norm", [
    lambda: nn.LayerNorm([8, 6, 6]), lambda: nn.GroupNorm(2, 8), lambda: nn.InstanceNorm2d(8, affine=True),
    lambda: nn.RMSNorm([8, 6, 6]), lambda: TimmRmsNorm2d(8),
    lambda: pytest.importorskip("diffusers.models.normalization").RMSNorm(6, 1e-5, bias=True),
], ids=["LayerNorm", "GroupNorm", "InstanceNorm2d", "RMSNorm", "timm_RmsNorm2d", "diffusers_RMSNorm_with_a_bias"])
def test_opacus_per_sample_gradients_of_a_converted_model_are_a_loop_s_of_one_sample_at_a_time(norm, mode):
    """``GradSampleModule``: Opacus finds no grad sampler for the twins and computes their
    per-sample gradients with torch.func (``force_functorch``: every layer's)."""
    opacus = pytest.importorskip("opacus")
    reference = _cnn(norm())
    twin = nt.convert(copy.deepcopy(reference))
    torch.manual_seed(3)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad(nn.functional.cross_entropy(reference(x[i:i + 1]), y[i:i + 1], reduction="sum"),
                            list(reference.parameters())) for i in range(len(x))))]
    sampled = opacus.GradSampleModule(twin, loss_reduction="sum", force_functorch=mode == "functorch")
    nn.functional.cross_entropy(sampled(x), y, reduction="sum").backward()
    assert type(twin[1]).__module__ == "normlab.torch"
    torch.testing.assert_close([parameter.grad_sample for parameter in twin.parameters()], looped)


class _TwoInputs(nn.Module):
    """A projection, a block of two inputs (the residual or the gate: the model's input),
    and a head, as a decoder layer or Mamba2's mixer calls them: by position."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.projection, self.block, self.head = nn.Linear(8, 8), block, nn.Linear(8, 3)

    def forward(self, x):
        out = self.block(self.projection(x), x)
        return self.head(out[0] if isinstance(out, tuple) else out).sum(1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("block", [lambda: nt.FusedAddRMSNorm(8, eps=1e-6), lambda: nt.FusedAddLayerNorm(8),
                                   lambda: nt.GatedRMSNorm(8, group_size=4),
                                   lambda: nt.GatedRMSNorm(8, group_size=4, norm_before_gate=False)],
                         ids=["FusedAddRMSNorm", "FusedAddLayerNorm", "GatedRMSNorm", "GatedRMSNorm gating first"])
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients_of_a_block_of_two_inputs_are_a_loop_s(block, mode):
    """Opacus' own fallback (``force_functorch``: every layer's) recomputes a layer from its
    first input alone."""
    opacus = pytest.importorskip("opacus")
    model = _perturbed(_TwoInputs(block()))
    torch.manual_seed(3)
    x, y = torch.randn(5, 3, 8), torch.randint(0, 3, (5,))
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"),
                            list(model.parameters())) for i in range(len(x))))]
    sampled = opacus.GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
    nn.functional.cross_entropy(sampled(x), y, reduction="sum").backward()
    torch.testing.assert_close([parameter.grad_sample for parameter in model.parameters()], looped)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm([8, 6, 6]), lambda: nn.GroupNorm(2, 8),
                                  lambda: nn.InstanceNorm2d(8, affine=True), lambda: nn.RMSNorm([8, 6, 6])],
                         ids=["LayerNorm", "GroupNorm", "InstanceNorm2d", "RMSNorm"])
def test_a_model_converted_after_make_private_trains_as_the_unconverted_one(norm):
    """convert() keeps each layer's hooks, Opacus' among them: its per-sample gradients
    then meet the twin at the first backward."""
    opacus = pytest.importorskip("opacus")
    reference = _cnn(norm())
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    stepped = []
    for converted in (False, True):
        model = copy.deepcopy(reference)
        private, optimizer, _ = opacus.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False)
        if converted:
            nt.convert(private)
            assert type(model[1]).__module__ == "normlab.torch"
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(private(x), y).backward()
            optimizer.step()
        stepped.append([parameter.detach() for parameter in model.parameters()])
    torch.testing.assert_close(stepped[1], stepped[0])


def _mask(x):
    return x[..., :1] > -0.5  # (each sample's own; it broadcasts over the channels)


_IDS = [0, 1, 1]  # segment ids along Norm("b [t] c")'s t, shared by the samples
# a normlab module and a call of it on (the projection's output h, the model's input x), with
# an input passed by keyword, after a None, or broadcast from a leading size of 1
CALLS = {
    "FusedAddRMSNorm residual=": (lambda: nt.FusedAddRMSNorm(8), lambda m, h, x: m(h, residual=x)),
    "FusedAddLayerNorm residual=": (lambda: nt.FusedAddLayerNorm(8), lambda m, h, x: m(h, residual=x)),
    "GatedRMSNorm z=": (lambda: nt.GatedRMSNorm(8, group_size=4), lambda m, h, x: m(h, z=x)),
    "GatedRMSNorm gate=": (lambda: nt.GatedRMSNorm(8, group_size=4, norm_before_gate=False),
                           lambda m, h, x: m(h, gate=x)),
    "FusedAddRMSNorm x=, residual=": (lambda: nt.FusedAddRMSNorm(8), lambda m, h, x: m(x=h, residual=x)),
    "FusedAddRMSNorm residual of leading size 1": (
        lambda: nt.FusedAddRMSNorm(8), lambda m, h, x: m(h, torch.linspace(-1, 1, 24).reshape(1, 3, 8))),
    "LayerNorm mask=": (lambda: nt.LayerNorm(8), lambda m, h, x: m(h, mask=_mask(x))),
    "RMSNorm mask=": (lambda: nt.RMSNorm(8), lambda m, h, x: m(h, mask=_mask(x))),
    "BiasedRMSNorm mask=": (lambda: nt.BiasedRMSNorm(8, casting="t5"), lambda m, h, x: m(h, mask=_mask(x))),
    "GammaRMSNorm mask=": (lambda: nt.GammaRMSNorm(8, casting="gemma"), lambda m, h, x: m(h, mask=_mask(x))),
    "Norm mask=": (lambda: nt.Norm("b [t] c", params="c", c=8), lambda m, h, x: m(h, mask=_mask(x))),
    "Norm segment_ids=": (lambda: nt.Norm("b [t] c", params="c", c=8),
                          lambda m, h, x: m(h, segment_ids=torch.tensor(_IDS), num_segments=2)),
    "Norm segment_ids after mask None": (lambda: nt.Norm("b [t] c", params="c", c=8),
                                         lambda m, h, x: m(h, None, torch.tensor(_IDS))),
}


class _Called(nn.Module):
    """A projection, a normlab module called as ``call(module, h, x)``, and a head."""

    def __init__(self, module: nn.Module, call) -> None:
        super().__init__()
        self.projection, self.module, self.head, self.call = nn.Linear(8, 8), module, nn.Linear(8, 3), call

    def forward(self, x):
        out = self.call(self.module, self.projection(x), x)
        return self.head(out[0] if isinstance(out, tuple) else out).sum(1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("name", list(CALLS))
def test_opacus_per_sample_gradients_see_inputs_passed_by_keyword_or_after_a_none(name, mode):
    """Opacus' forward hook records positional inputs alone (each must be a tensor), and
    reads the batch size off the last: normlab's modules hand it the whole call."""
    opacus = pytest.importorskip("opacus")
    make, call = CALLS[name]
    model = _perturbed(_Called(make(), call))
    torch.manual_seed(3)
    x, y = torch.randn(5, 3, 8), torch.randint(0, 3, (5,))
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        for i in range(len(x))))]
    sampled = opacus.GradSampleModule(model, force_functorch=mode == "functorch")
    nn.functional.cross_entropy(sampled(x), y).backward()
    torch.testing.assert_close([parameter.grad_sample for parameter in model.parameters()], looped)


class _CalledAlongTheTime(nn.Module):
    """:class:`_Called` on inputs (time, batch, channels), as Opacus' ``batch_first=False`` reads them."""

    def __init__(self, module: nn.Module, call) -> None:
        super().__init__()
        self.projection, self.module, self.head, self.call = nn.Linear(8, 8), module, nn.Linear(8, 3), call

    def forward(self, x):
        out = self.call(self.module, self.projection(x), x)
        return self.head(out[0] if isinstance(out, tuple) else out).sum(0)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("name", ["FusedAddRMSNorm residual=", "GatedRMSNorm z=", "LayerNorm mask=", "RMSNorm mask="])
def test_opacus_per_sample_gradients_see_inputs_passed_by_keyword_where_the_batch_is_the_second_axis(name, mode):
    """``batch_first=False``: Opacus moves the batch to the front of its copy of the first input."""
    opacus = pytest.importorskip("opacus")
    make, call = CALLS[name]
    model = _perturbed(_CalledAlongTheTime(make(), call))
    torch.manual_seed(3)
    x, y = torch.randn(3, 5, 8), torch.randint(0, 3, (5,))
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad(nn.functional.cross_entropy(model(x[:, i:i + 1]), y[i:i + 1]), list(model.parameters()))
        for i in range(x.shape[1])))]
    sampled = opacus.GradSampleModule(model, batch_first=False, force_functorch=mode == "functorch")
    nn.functional.cross_entropy(sampled(x), y).backward()
    torch.testing.assert_close([parameter.grad_sample for parameter in model.parameters()], looped)


class _LogitsOf(nn.Module):
    """A causal LM's logits from its token ids (Opacus hands the model the batch alone)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("how", ["ghost clipping", "make_private_with_epsilon"])
def test_a_converted_llama_with_fused_blocks_trains_privately_as_transformers_own(how):
    """``convert(fuse=True)`` gives each decoder layer FusedAddRMSNorm blocks; Opacus'
    ghost clipping (``grad_sample_mode="ghost"``, per-sample losses over the tokens) and
    ``make_private_with_epsilon`` (noise from the same seed) then step it as the original."""
    opacus = pytest.importorskip("opacus")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    reference = _perturbed(transformers.LlamaForCausalLM(config).double())
    converted = nt.convert(copy.deepcopy(reference), fuse=True)
    assert any(type(module) is nt.FusedAddRMSNorm for module in converted.modules())
    ids, targets = torch.randint(0, 64, (6, 8)), torch.randint(0, 64, (6, 8))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, targets), batch_size=6)
    stepped = []
    for model in (reference, converted):
        model = _LogitsOf(copy.deepcopy(model))
        engine, optimizer = opacus.PrivacyEngine(), torch.optim.SGD(model.parameters(), lr=1.0)
        if how == "ghost clipping":
            private, optimizer, criterion, _ = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
                grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(), poisson_sampling=False)
            loss = criterion(private(ids).reshape(-1, 64), targets.reshape(-1), shape=(6, 8, 64))
        else:
            private, optimizer, _ = engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, data_loader=loader, target_epsilon=3.0, target_delta=1e-5,
                epochs=2, max_grad_norm=0.05, poisson_sampling=False)
            loss = nn.functional.cross_entropy(private(ids).reshape(-1, 64), targets.reshape(-1))
        loss.backward()
        torch.manual_seed(7)  # (the noise)
        optimizer.step()
        stepped.append([parameter.detach() for parameter in model.parameters()])
    torch.testing.assert_close(stepped[1], stepped[0])
    assert not all(torch.equal(a, b) for a, b in zip(stepped[0], _LogitsOf(reference).parameters()))


class _HalfProjection(nn.Module):
    """A bfloat16 projection into an RMS norm of LLaMA's recipe (float32 weight, float32
    output), given a mask by keyword, and a float32 head."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.projection, self.norm, self.head = nn.Linear(8, 8).to(torch.bfloat16), norm, nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.projection(x.to(torch.bfloat16)), mask=_mask(x))).sum(1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients_of_a_norm_whose_output_dtype_is_not_its_input_s_are_a_loop_s(mode):
    """Opacus' functorch mode casts its record of the first input to the gradient's dtype
    (here bfloat16 to float32) before it recomputes the layer."""
    opacus = pytest.importorskip("opacus")
    model = _perturbed(_HalfProjection(nt.RMSNorm(8, casting="llama")))
    torch.manual_seed(3)
    x, y = torch.randn(5, 3, 8), torch.randint(0, 3, (5,))
    assert model.norm(model.projection(x.to(torch.bfloat16))).dtype == torch.float32
    parameters = list(model.norm.parameters()) + list(model.head.parameters())  # (float32)
    looped = [torch.stack(grads) for grads in zip(*(
        torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), parameters)
        for i in range(len(x))))]
    sampled = opacus.GradSampleModule(model, force_functorch=mode == "functorch")
    nn.functional.cross_entropy(sampled(x), y).backward()
    torch.testing.assert_close([parameter.grad_sample for parameter in parameters], looped)
