"""Whole converted models are saved, loaded and copied as torch.nn models are:
``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy`` after the model has run,
when the twins hold compiled calls and NumPy views between calls. Oracle: the torch.nn
modules with the same state, run on the same inputs (outputs, gradients and running
statistics)."""

import copy
import io

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402

_MODELS = {
    "LayerNorm": lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)),
    "RMSNorm": lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RMSNorm(8)),
    "GroupNorm": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GroupNorm(2, 8)),
    "BatchNorm2d": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8)),
    "InstanceNorm2d": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1),
                                                  torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
}


def _input(name):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, 8, generator=g) if name in ("LayerNorm", "RMSNorm") \
        else torch.randn(4, 3, 5, 5, generator=g) * 2 + 1


def _step(model, x):
    """A training step's forward and backward, and a call without gradients."""
    model.train()
    model(x.clone().requires_grad_()).sum().backward()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        return model(x)


def _save_and_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("how", ["torch.save", "copy.deepcopy"])
def test_a_converted_model_that_has_run_saves_loads_and_trains_on_as_torch_nn(name, how):
    torch.manual_seed(0)
    reference = _MODELS[name]()
    model = nt.convert(copy.deepcopy(reference))
    x = _input(name)
    _step(reference, x)
    _step(model, x)  # the twins now hold their caches
    again = _save_and_load(model) if how == "torch.save" else copy.deepcopy(model)
    reference_again = _save_and_load(reference) if how == "torch.save" else copy.deepcopy(reference)
    expected, actual = _step(reference_again, x), _step(again, x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for (key, value), (_, expected_value) in zip(again.state_dict().items(), reference_again.state_dict().items()):
        torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-6, msg=key)
    for param, expected_param in zip(again.parameters(), reference_again.parameters()):
        torch.testing.assert_close(param.grad, expected_param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build, inputs", [
    (lambda: nt.FusedAddRMSNorm(8), lambda g: (torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g))),
    (lambda: nt.GatedRMSNorm(8, group_size=4),
     lambda g: (torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g))),
    (lambda: nt.Norm("b t [d]", params="d", d=8), lambda g: (torch.randn(2, 3, 8, generator=g),)),
])
def test_normlabs_own_modules_save_and_load_after_running(build, inputs):
    """No torch.nn class to compare with: the loaded module must give the saved one's
    output, whose own correctness the other tests check."""
    module = build()
    args = inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        module(*args)
    out = module(*[a.clone().requires_grad_() for a in args])
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    loaded = _save_and_load(module)
    expected, actual = module(*args), loaded(*args)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_layer_norm_parametrized_then_converted_saves_once_its_parametrization_is_removed():
    # torch.nn.utils.parametrize makes the module's class at run time, which pickle cannot find
    from torch.nn.utils import parametrize

    model = _MODELS["LayerNorm"]()
    parametrize.register_parametrization(model[1], "weight", torch.nn.Identity())
    nt.convert(model)
    parametrize.remove_parametrizations(model[1], "weight")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = _input("LayerNorm")
    assert type(loaded[1]) is nt.LayerNorm and torch.equal(loaded(x), model(x))


class _LlamaRMSNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm, as users copy it into their own code."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def _converted_saves_and_loads_with_the_original_s_outputs(model, forget=lambda: None):
    """Convert ``model``, save it, ``forget`` what another process would not hold, load it."""
    x = _input("RMSNorm")
    expected = model(x)
    nt.convert(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    forget()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[1]) is nt.RMSNorm
    torch.testing.assert_close(loaded(x), expected)


def test_a_model_whose_rms_norm_class_is_defined_in_a_function_saves_once_converted():
    # a user's own RMSNorm, written in a function as in a notebook or a test: the model holding it
    # cannot be pickled, the converted model (a normlab RMSNorm in its place) can, and loads
    class RMSNorm(_LlamaRMSNorm):
        pass

    _converted_saves_and_loads_with_the_original_s_outputs(torch.nn.Sequential(torch.nn.Linear(8, 8), RMSNorm(8)))


def test_a_model_converted_in_a_script_loads_where_the_script_s_norm_class_is_not_defined(monkeypatch):
    """A script (its ``__main__``) defines its own RMS norm, converts a model and saves it; a
    serving process without that class loads it, as before a2bddd8, which recorded the class
    on each twin for transformers' init: torch.load then failed looking the class up."""
    import sys
    import types

    script = types.ModuleType("normlab_test_script")
    script.LlamaRMSNorm = type("LlamaRMSNorm", (_LlamaRMSNorm,), {"__module__": script.__name__})
    monkeypatch.setitem(sys.modules, script.__name__, script)
    _converted_saves_and_loads_with_the_original_s_outputs(
        torch.nn.Sequential(torch.nn.Linear(8, 8), script.LlamaRMSNorm(8)),
        forget=lambda: monkeypatch.delitem(sys.modules, script.__name__))  # (as in another process)


@pytest.mark.parametrize("metadata", ["version 1", "none"])
def test_a_batch_norm_checkpoint_from_before_num_batches_tracked_loads_into_norm_as_into_torch_nn(metadata):
    """torch.nn's batch norms load a checkpoint of state-dict version 1 (or without
    metadata), which has no num_batches_tracked, counting 0 batches; Norm with a batch norm
    pattern raised 'Missing key(s) in state_dict: "num_batches_tracked"'. Oracle:
    torch.nn.BatchNorm2d with the same checkpoint, momentum=None (the cumulative average,
    which reads the count)."""
    source = torch.nn.BatchNorm2d(4)
    x = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1
    source(x)
    old = source.state_dict()
    del old["num_batches_tracked"]
    if metadata == "none":
        del old._metadata
    else:
        old._metadata[""]["version"] = 1
    reference = torch.nn.BatchNorm2d(4, momentum=None)
    norm = nt.Norm("[b] c [h w]", params="c", c=4, momentum=None, track_running_stats=True)
    reference.load_state_dict(old)
    norm.load_state_dict(old)
    for step in range(2):
        torch.testing.assert_close(norm(x * (step + 2)), reference(x * (step + 2)))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[key], value, msg=key)
    norm.eval(), reference.eval()
    torch.testing.assert_close(norm(x), reference(x))
