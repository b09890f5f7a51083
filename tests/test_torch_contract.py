"""torch's input contract, driven by PyTorch's own test inputs: every OpInfo sample of
``torch.nn.functional``'s norms and every ModuleInfo sample of the ``torch.nn`` norm
modules (CPU, float32 and float64; the lazy modules aside).

* The drop-in modules against ``torch.nn`` built with the same arguments: outputs,
  running statistics, and the gradients of the input and the parameters.
* ``normlab.functional`` on the NumPy arrays against ``torch.nn.functional``: outputs and
  the running statistics it updates in place.

Where torch computes, normlab must compute the same; where torch raises, the modules
raise the same exception type and ``normlab.functional`` a ``normlab.errors`` error.
Zero-size batches, empty inputs, any eps and any momentum are among the samples.
"""

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (in the test extra)")

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

# importing torch.testing._internal freezes torch.backends' flags for the whole process (its
# common_utils calls torch.backends.disable_global_flags()), and pytest imports this module in
# every worker while collecting: code in other tests that sets a flag, as Opacus' embedding grad
# sampler sets torch.backends.cudnn.deterministic, then raised "not allowed to set
# torch.backends.cudnn flags after disable_global_flags". Thaw them again: no public call does, and
# torch.backends is a wrapper module, so the flag is set where disable_global_flags reads it.
torch.backends.disable_global_flags.__globals__["__allow_nonbracketed_mutation_flag"] = True

import normlab.functional as nf  # noqa: E402
import normlab.torch as nt  # noqa: E402
from normlab.errors import NormlabError  # noqa: E402

DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-10)}

OP_NAMES = ["nn.functional.batch_norm", "nn.functional.layer_norm", "nn.functional.group_norm",
            "nn.functional.instance_norm", "nn.functional.rms_norm"]
OPS = {op.name: op for op in op_db if op.name in OP_NAMES and op.variant_test_name == ""}
MODULES = {info.module_cls.__name__: info for info in module_db
           if info.module_cls.__name__ in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
                                           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm")}


@dataclass
class Tally:
    """What one test saw: inputs torch computed, those normlab refused, and mismatches."""

    computed: int = 0
    refused: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)

    def check(self, what: str):
        assert self.computed > 0, f"{what}: no sample was computed"
        assert not self.refused, (f"{what}: {len(self.refused)} of {self.computed} inputs torch computes were "
                                  "refused:\n" + "\n".join(self.refused))
        assert not self.mismatched, f"{what}: " + "\n".join(self.mismatched)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_describe(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _clone(value):
    """A fresh copy of a sample's argument: tensors keep requires_grad, as leaves."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _run(call: Callable):
    """``(result, None)`` or ``(None, exception)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call(), None
    except Exception as error:  # noqa: BLE001 (the type is what is compared)
        return None, error


def _close(actual, expected, dtype, what: str, tally: Tally) -> None:
    try:
        torch.testing.assert_close(actual, expected, **TOLERANCE[dtype], equal_nan=True)
    except AssertionError as error:
        tally.mismatched.append(f"{what}: {error}")


# ---------------------------------------------------------------------------------------
# The drop-in modules against torch.nn


def _leaves(args) -> list:
    found = []
    for value in args:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_leaves(value))
    return found


def _forward_and_grads(module, args, kwargs, training: bool):
    module.train(training)
    args, kwargs = _clone(args), _clone(kwargs)
    y = module(*args, **kwargs)
    inputs = _leaves(args) + [p for p in module.parameters() if p.requires_grad]
    grads = ()
    if y.requires_grad and inputs:
        grad_y = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(y, inputs, grad_y, allow_unused=True, materialize_grads=True)
    return y.detach(), grads


def compare_twin(build: Callable, args, kwargs, training: bool, dtype, what: str, tally: Tally) -> None:
    """``build(torch.nn)`` and ``build(normlab.torch)``: torch's module and normlab's twin
    from the same constructor call and state. Run both on the same input and tally."""
    reference, error = _run(lambda: build(torch.nn))
    twin, twin_error = _run(lambda: build(nt))
    if error is None and twin_error is None:
        expected, error = _run(lambda: _forward_and_grads(reference, args, kwargs, training))
        actual, twin_error = _run(lambda: _forward_and_grads(twin, args, kwargs, training))
    if error is not None:  # torch refuses: normlab must refuse with the same type
        if not isinstance(twin_error, type(error)):
            tally.mismatched.append(f"{what}: torch raises {type(error).__name__} ({error}), normlab gives "
                                    f"{twin_error!r}")
        return
    tally.computed += 1
    if twin_error is not None:
        tally.refused.append(f"{what}: {type(twin_error).__name__}: {twin_error}")
        return
    _close(actual[0], expected[0], dtype, f"{what}: output", tally)
    for index, (got, want) in enumerate(zip(actual[1], expected[1])):
        _close(got, want, dtype, f"{what}: gradient {index}", tally)
    for (name, got), (_, want) in zip(twin.state_dict().items(), reference.state_dict().items()):
        _close(got, want, dtype, f"{what}: {name}", tally)


def _randomized(module):
    """Parameters and running statistics away from their initial ones, so they matter."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return module


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_twins_compute_every_module_info_sample_as_torch_nn(name, dtype):
    info = MODULES[name]
    tally = Tally()
    for training in (True, False):
        for sample in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                              training=training):
            constructor, forward = sample.constructor_input, sample.forward_input
            build = lambda nn: _randomized(  # noqa: E731
                getattr(nn, name)(*constructor.args, **constructor.kwargs).to(dtype))
            compare_twin(build, forward.args, forward.kwargs, training, dtype,
                         f"{name}({_describe(constructor.args)}, {constructor.kwargs}) "
                         f"{'train' if training else 'eval'} on {_describe(forward.args)} [{sample.desc}]", tally)
    if info.module_error_inputs_func is not None:
        for error_input in info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                                          training=True):
            sample = error_input.module_error_input
            constructor, forward = sample.constructor_input, sample.forward_input
            build = lambda nn: getattr(nn, name)(*constructor.args, **constructor.kwargs).to(dtype)  # noqa: E731
            args = forward.args if forward is not None else (torch.randn(2, 2, dtype=dtype),)
            kwargs = forward.kwargs if forward is not None else {}
            compare_twin(build, args, kwargs, True, dtype, f"{name} error input {constructor.kwargs}", tally)
    tally.check(name)


# ---------------------------------------------------------------------------------------
# The functional samples: as modules (against torch.nn) and as normlab.functional (NumPy)


def _bind(function, sample) -> dict:
    arguments = inspect.signature(function).bind(sample.input, *sample.args, **sample.kwargs)
    arguments.apply_defaults()
    return dict(arguments.arguments)


def _load(module, arguments: dict):
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = arguments.get(name)
            if value is not None and getattr(module, name, None) is not None:
                getattr(module, name).copy_(value)
    return module


_BY_RANK = {"nn.functional.batch_norm": {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"},
            "nn.functional.instance_norm": {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}}


def _module_call(op_name: str, a: dict):
    """The torch.nn module that computes what the functional call computes, built from its
    arguments, and whether it runs in training: ``(build, training)``; None where no
    module does (a bias without a weight, a 1-D batch norm input, ...)."""
    x, weight, bias = a["input"], a.get("weight"), a.get("bias")
    if weight is None and bias is not None:
        return None
    affine = dict(dtype=x.dtype)
    if op_name == "nn.functional.rms_norm":
        return (lambda nn: _load(nn.RMSNorm(a["normalized_shape"], a["eps"], weight is not None, **affine), a),
                True)
    affine["bias"] = bias is not None
    if op_name == "nn.functional.layer_norm":
        return (lambda nn: _load(nn.LayerNorm(a["normalized_shape"], a["eps"], weight is not None, **affine), a),
                True)
    if op_name == "nn.functional.group_norm":
        channels = x.shape[1] if x.dim() >= 2 else 0
        return (lambda nn: _load(nn.GroupNorm(a["num_groups"], channels, a["eps"], weight is not None, **affine),
                                 a), True)
    tracked = a["running_mean"] is not None
    training = a["training"] if op_name == "nn.functional.batch_norm" else a["use_input_stats"]
    name = _BY_RANK[op_name].get(x.dim())
    if name is None or tracked != (a["running_var"] is not None) or not training and not tracked:
        return None
    return (lambda nn: _load(getattr(nn, name)(x.shape[1], a["eps"], a["momentum"], weight is not None, tracked,
                                               **affine), a), training)


def _numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().numpy().copy()
    return value


_NUMPY_FUNCTIONS = {"nn.functional.batch_norm": nf.batch_norm, "nn.functional.layer_norm": nf.layer_norm,
                    "nn.functional.group_norm": nf.group_norm, "nn.functional.instance_norm": nf.instance_norm,
                    "nn.functional.rms_norm": nf.rms_norm}
_RUNNING = ("running_mean", "running_var")


def _only_newer_torch_refuses(op_name: str, x, error) -> bool:
    """Whether torch refused a group norm of no channels or no positions, as 2.14 does
    ("Expected number of channels/HxW to be greater than 0") where 2.13 gives an empty
    output, which normlab.functional keeps (README)."""
    return (op_name == "nn.functional.group_norm" and isinstance(error, RuntimeError) and x.dim() >= 2
            and 0 in x.shape[1:] and "to be greater than 0" in str(error))


def compare_functional(op_name: str, function: Callable, sample, dtype, what: str, tally: Tally,
                       expect_error: Optional[type] = None) -> None:
    """normlab.functional on the sample's NumPy arrays against torch.nn.functional."""
    arguments = _bind(function, sample)
    torch_arguments = {k: _clone(v) for k, v in arguments.items()}
    expected, error = _run(lambda: function(**torch_arguments))
    numpy_arguments = {("x" if k == "input" else k): _numpy(v) for k, v in arguments.items()}
    actual, numpy_error = _run(lambda: _NUMPY_FUNCTIONS[op_name](**numpy_arguments))
    if _only_newer_torch_refuses(op_name, arguments["input"], error):  # normlab.functional keeps 2.13's answer
        if numpy_error is not None:
            tally.mismatched.append(f"{what}: normlab.functional raises {numpy_error!r}, not torch 2.13's empty output")
        else:
            _close(torch.from_numpy(np.asarray(actual)), torch.empty_like(arguments["input"]).detach(), dtype,
                   f"{what}: normlab.functional output (torch 2.13's)", tally)
        return
    if error is not None:
        assert expect_error is None or isinstance(error, expect_error), f"{what}: torch raised {error!r}"
        if not isinstance(numpy_error, NormlabError):
            tally.mismatched.append(f"{what}: torch raises {type(error).__name__} ({error}); normlab.functional "
                                    f"gives {numpy_error!r}, not a normlab.errors error")
        return
    tally.computed += 1
    if numpy_error is not None:
        tally.refused.append(f"{what} (normlab.functional): {type(numpy_error).__name__}: {numpy_error}")
        return
    _close(torch.from_numpy(np.asarray(actual)), expected.detach(), dtype, f"{what}: normlab.functional output",
           tally)
    for name in _RUNNING:
        if torch_arguments.get(name) is not None:
            _close(torch.from_numpy(numpy_arguments[name]), torch_arguments[name], dtype,
                   f"{what}: normlab.functional {name}", tally)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_functional_and_module_twins_compute_every_op_info_sample_as_torch(op_name, dtype):
    op = OPS[op_name]
    function = op.op
    tally = Tally()
    for sample in op.reference_inputs("cpu", dtype, requires_grad=True):
        arguments = _bind(function, sample)
        what = f"{op_name}({_describe(sample.input)}, {_describe(sample.args)}, {_describe(sample.kwargs)})"
        compare_functional(op_name, function, sample, dtype, what, tally)
        module_call = _module_call(op_name, arguments)
        if module_call is not None:
            build, training = module_call
            compare_twin(build, (arguments["input"],), {}, training, dtype, f"{what} as a module", tally)
    if op.error_inputs_func is not None:
        for error_input in op.error_inputs("cpu"):
            sample = error_input.sample_input
            what = f"{op_name} error input ({_describe(sample.input)}, {_describe(sample.args)})"
            compare_functional(op_name, function, sample, dtype, what, tally, expect_error=error_input.error_type)
    tally.check(op_name)


# ---------------------------------------------------------------------------------------
# The edges beyond the samples: zero-size batches and positions, eps < 0 with running
# statistics, momentum outside [0, 1], and the generic Norm


EDGE_MODULES = [
    ("BatchNorm1d(3)", (0, 3)), ("BatchNorm1d(3)", (0, 3, 4)), ("BatchNorm1d(3)", (4, 3, 0)),
    ("BatchNorm1d(3, momentum=None)", (0, 3)), ("BatchNorm2d(3, momentum=-0.5)", (4, 3, 2, 2)),
    ("BatchNorm3d(2, momentum=1.5)", (0, 2, 1, 2, 2)),
    ("InstanceNorm1d(3, affine=True, track_running_stats=True)", (2, 3, 0)),
    ("InstanceNorm1d(3, track_running_stats=True)", (0, 3, 4)),
    ("InstanceNorm2d(3, eps=-0.5, momentum=-1.0, affine=True, track_running_stats=True)", (4, 3, 2, 3)),
    ("GroupNorm(1, 3)", (0, 3)), ("GroupNorm(3, 3, eps=-0.2)", (2, 3, 4)), ("LayerNorm([3, 0])", (2, 3, 0)),
    ("LayerNorm(4, eps=float('inf'))", (3, 4)), ("RMSNorm(3, eps=-0.5)", (4, 3)), ("RMSNorm(3)", (0, 3)),
    ("GroupNorm(2, 4)", (2, 4, 0)), ("GroupNorm(1, 0)", (2, 0, 3)),  # torch 2.14 refuses these, 2.13 computes them
]

FORWARD_ONLY = {("InstanceNorm1d(3, track_running_stats=True)", (0, 3, 4))}  # torch's backward crashes there


@pytest.mark.parametrize("path", ["auto", "kernel", "composite"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_twins_compute_empty_inputs_and_any_eps_and_momentum_as_torch_nn(training, path):
    tally = Tally()
    with nt.use_path(path):  # "auto" gives an empty input to torch's op; forced paths compute it themselves
        for dtype in DTYPES:
            for constructor, shape in EDGE_MODULES:
                x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2)) * 2
                build = lambda nn: _randomized(eval(constructor, {"float": float}, vars(nn)).to(dtype))  # noqa
                x.requires_grad_((constructor, shape) not in FORWARD_ONLY)
                compare_twin(build, (x,), {}, training, dtype, f"{constructor} on {shape}", tally)
    tally.check("edge inputs")


def test_norm_with_any_eps_and_momentum_keeps_instance_norms_running_statistics():
    # var + eps < 0 in some instances: NaN there, as torch gives
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.3
    reference = torch.nn.InstanceNorm1d(3, eps=-0.05, momentum=1.5, affine=True, track_running_stats=True).double()
    norm = nt.Norm("b c [t]", params="c", c=3, eps=-0.05, momentum=1.5, track_running_stats=True,
                   dtype=torch.float64)
    expected, actual = reference(x), norm(x)
    assert expected.isnan().any() and not expected.isnan().all()
    torch.testing.assert_close(actual, expected, equal_nan=True)
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    torch.testing.assert_close(norm.running_var, reference.running_var)


EDGE_FUNCTIONAL = [
    ("nn.functional.batch_norm", (0, 3), dict(training=True, running=True)),
    ("nn.functional.batch_norm", (4, 3, 0), dict(training=True, running=True)),
    ("nn.functional.batch_norm", (0,), dict(training=True, running=True)),
    ("nn.functional.batch_norm", (0,), dict(training=False, running=True)),
    ("nn.functional.batch_norm", (5, 3), dict(training=True, running=True, momentum=2.5)),
    ("nn.functional.batch_norm", (5, 3), dict(training=True, running=True, eps=0.0)),
    ("nn.functional.batch_norm", (5, 3), dict(training=False, running=True, eps=-1e-3)),
    ("nn.functional.batch_norm", (5, 3), dict(training=True, running=True, eps=float("nan"))),
    ("nn.functional.instance_norm", (2, 3, 0), dict(running=True)),
    ("nn.functional.instance_norm", (0, 3, 4), dict(running=True)),
    ("nn.functional.instance_norm", (4, 3, 6), dict(running=True, momentum=-0.7, eps=-0.4)),
    ("nn.functional.instance_norm", (4, 3, 6), dict(running=True, use_input_stats=False, eps=-0.4)),
    ("nn.functional.layer_norm", (0, 4), dict(normalized_shape=(4,))),
    ("nn.functional.layer_norm", (3, 4), dict(normalized_shape=(4,), eps=float("inf"))),
    ("nn.functional.group_norm", (2, 4, 0), dict(num_groups=2, eps=-0.5)),
    ("nn.functional.rms_norm", (3, 4), dict(normalized_shape=(4,), eps=-0.3)),
]


def test_functional_computes_empty_inputs_and_any_eps_and_momentum_as_torch():
    from torch.testing._internal.opinfo.core import SampleInput

    tally = Tally()
    for dtype in DTYPES:
        for op_name, shape, options in EDGE_FUNCTIONAL:
            options = dict(options)
            generator = torch.Generator().manual_seed(3)
            x = torch.randn(shape, dtype=dtype, generator=generator) * 0.5
            channels = shape[1] if len(shape) > 1 else 0
            if options.pop("running", False):
                options["running_mean"] = torch.randn(channels, dtype=dtype, generator=generator)
                options["running_var"] = torch.rand(channels, dtype=dtype, generator=generator) + 0.5
            sample = SampleInput(x, kwargs=options)
            compare_functional(op_name, OPS[op_name].op, sample, dtype, f"{op_name}{shape} {options}", tally)
    tally.check("edge inputs")
