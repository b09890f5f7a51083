"""Recipe probes: which casting recipe, if any, reproduces a model family's own norm
module bit for bit (transformers' RMS norms, their gated and weight-less kinds, and the
layer norms computed in float32), found by running the module's forward on probe inputs
in float32, bfloat16 and mixed weight/input dtypes and comparing with each recipe of
:mod:`normlab.torch.casting` to the bit. :func:`normlab.torch.convert` turns a module that
one recipe reproduces into the normlab module running that recipe.

Probes run on copies with random parameters, through ``type(m).forward`` (no hooks), and
leave the module, its state and the global random generator untouched.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from normlab.torch.casting import (CASTINGS, CHANNELS_FIRST_RMS_CASTINGS, LAYER_NORM_CASTINGS, UNWEIGHTED_CASTINGS,
                                   channels_first_rms_norm_recipe, layer_norm_recipe, rms_norm_recipe,
                                   unweighted_rms_norm_recipe)
from normlab.torch.thread_warnings import ignored_in_this_thread, torch_once_warnings_unspent


def _probe_copy(module: nn.Module, tensors: dict) -> nn.Module:
    """A shallow copy of ``module`` holding clones of ``tensors`` as its parameters and buffers."""
    copy = type(module).__new__(type(module))
    copy.__dict__.update(module.__dict__)
    copy._parameters = {k: None if v is None else v.clone() for k, v in tensors["parameters"].items()}
    copy._buffers = {k: None if v is None else v.clone() for k, v in tensors["buffers"].items()}
    return copy


def _on_cpu(probe: Callable) -> Callable:
    """Run a probe on CPU tensors whatever the default device (a model built and converted
    inside ``with torch.device("meta")`` has meta parameters, on which no probe computes),
    and outside ``torch.inference_mode()``, whose tensors no probe of a gradient can take:
    the same decisions whatever the caller's mode. Warnings the probed forward gives on
    the probe's dtype mixes (torch's "Mismatch dtype between input and weight" from
    diffusers' ``Krea2RMSNorm``) are not the model's and are kept from the caller, without
    using up torch's once-per-process warnings: the model's own call with that mix still
    gets its warning, as it does unconverted. The warnings are kept from this thread's
    caller alone (:mod:`normlab.torch.thread_warnings`): a thread that trains meanwhile
    keeps its own."""

    @functools.wraps(probe)
    def on_cpu(*args, **kwargs):
        with (torch.device("cpu"), torch.inference_mode(False), torch_once_warnings_unspent(),
              ignored_in_this_thread()):
            return probe(*args, **kwargs)

    return on_cpu


def _weight_and_eps(module: nn.Module, with_bias: bool = False,
                    weight_name: str = "weight") -> tuple[Optional[Tensor], Optional[float]]:
    """``(weight, eps)`` of a module whose one parameter is a 1-D ``weight`` (``with_bias``:
    whose two are a 1-D ``weight`` and a ``bias`` of its shape, as diffusers' ``RMSNorm(...,
    bias=True)``; ``weight_name``: the weight's name, ``"gamma"`` for Stable Audio 3's), with
    no buffers or children and a numeric ``variance_epsilon`` or ``eps`` (as transformers' RMS
    norms have); ``(None, None)`` otherwise."""
    weight, bias = module._parameters.get(weight_name), module._parameters.get("bias")
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (set(module._parameters) != ({weight_name, "bias"} if with_bias else {weight_name}) or weight is None
            or weight.dim() != 1 or (with_bias and (bias is None or bias.shape != weight.shape))
            or len(module._buffers) or list(module.children()) or not isinstance(eps, (int, float))
            or isinstance(eps, bool)):
        return None, None
    return weight, eps


# (input dtype, weight dtype) pairs a recipe must reproduce bit for bit
_PROBE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                 (torch.float32, torch.bfloat16)]


def _probe_outputs(module: nn.Module, parameters: dict, *inputs: Tensor) -> Optional[list]:
    """``type(module).forward`` on a copy holding ``parameters``, for each pair of
    :data:`_PROBE_DTYPES` (inputs cast to the first, the parameters to the second); None
    where a forward raises."""
    outputs = []
    for x_dtype, w_dtype in _PROBE_DTYPES:
        probe = _probe_copy(module, {"parameters": {k: None if p is None else p.to(w_dtype)
                                                    for k, p in parameters.items()}, "buffers": {}})
        try:
            with torch.no_grad():
                outputs.append(type(module).forward(probe, *(t.to(x_dtype) for t in inputs)))
        except Exception:
            return None
    return outputs


@_on_cpu
def _rms_recipe(module: nn.Module, with_bias: bool = False, weight_name: str = "weight") -> Optional[dict]:
    """``{"normalized_shape", "eps", "casting", "weight_offset", ...}`` when ``module`` is an
    RMS norm with one 1-D weight whose forward matches a casting recipe bit for bit in
    float32, bfloat16 and mixed weight/input dtypes; None otherwise. ``with_bias``: an RMS
    norm with a weight and a bias, whose forward matches a recipe followed by ``+ bias``
    (:class:`~normlab.torch.recipe_norms.BiasedRMSNorm`). ``weight_name``: the weight's name
    (:class:`~normlab.torch.recipe_norms.GammaRMSNorm`'s ``"gamma"``)."""
    weight, eps = _weight_and_eps(module, with_bias, weight_name)
    if weight is None:
        return None
    generator = torch.Generator().manual_seed(0)
    size = weight.shape[0]
    probe_weight = torch.randn(size, generator=generator) * 0.5
    probe_bias = torch.randn(size, generator=generator) if with_bias else None
    x = torch.randn(4, size, generator=generator)
    x = x * torch.tensor([[1.0], [math.sqrt(eps) + 1e-3], [10.0], [1.0]]) + torch.tensor([[0.0], [0.0], [0.0], [3.0]])
    parameters = {weight_name: probe_weight, **({"bias": probe_bias} if with_bias else {})}
    outputs = _probe_outputs(module, parameters, x)
    if outputs is None:
        return None

    def recipe(x: Tensor, w_dtype: torch.dtype, casting: str, offset: float) -> Tensor:
        y = rms_norm_recipe(x, probe_weight.to(w_dtype), eps, casting, offset)
        return y if probe_bias is None else y + probe_bias.to(w_dtype)

    def probed(w_dtype: torch.dtype) -> Callable:
        probe = _probe_copy(module, {"parameters": {k: p.to(w_dtype) for k, p in parameters.items()}, "buffers": {}})
        return lambda x: type(module).forward(probe, x)

    matches = []
    for casting in CASTINGS:
        for offset in (0.0, 1.0):
            with torch.no_grad():
                expected = [recipe(x.to(x_dtype), w_dtype, casting, offset) for x_dtype, w_dtype in _PROBE_DTYPES]
            if _all_equal(outputs, expected):
                matches.append((casting, offset))
    if len(matches) > 1:  # ("gemma" and "mochi" give one output: their bfloat16 input gradients differ)
        matches = [(casting, offset) for casting, offset in matches if _same_input_gradient(
            probed(torch.bfloat16),
            lambda x, casting=casting, offset=offset: recipe(x, torch.bfloat16, casting, offset),
            x.to(torch.bfloat16))] or matches
    if len(matches) > 1:  # ("gemma" and "gemma3n" give one bfloat16 gradient: their float32 ones differ)
        matches = [(casting, offset) for casting, offset in matches if _same_input_gradient(
            probed(torch.float32),
            lambda x, casting=casting, offset=offset: recipe(x, torch.float32, casting, offset),
            x)] or matches
    if not matches:
        return None
    casting, offset = matches[0]
    return {"normalized_shape": (size,), "eps": float(eps), "elementwise_affine": True, "casting": casting,
            "weight_offset": offset}


def _all_equal(outputs: list, expected: list) -> bool:
    """Each output a tensor of its expected dtype and shape, equal to the bit."""
    return all(isinstance(a, Tensor) and a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e)
               for a, e in zip(outputs, expected))


def _unweighted_eps(module: nn.Module) -> Optional[float]:
    """The ``eps`` (or ``variance_epsilon``) of a module that may be an RMS norm without a
    weight: no parameters, no children, no buffers but ones left out of its ``state_dict``
    (FalconMamba keeps an unused weight of ones there); None otherwise."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (any(p is not None for p in module._parameters.values()) or list(module.children())
            or set(module._buffers) - module._non_persistent_buffers_set
            or not isinstance(eps, (int, float)) or isinstance(eps, bool)):
        return None
    return float(eps)


def _normalized_dims(module: nn.Module) -> list[int]:
    """The axes an RMS norm without a weight may normalize: the last, and the one its ``dim``
    or ``channel_dim`` names (LTX-2's channels-first norms: 1)."""
    named = [getattr(module, name, None) for name in ("dim", "channel_dim")]
    return list(dict.fromkeys([-1, *(d for d in named if isinstance(d, int) and not isinstance(d, bool))]))


@_on_cpu
def _unweighted_rms_recipe(module: nn.Module) -> Optional[dict]:
    """``{"eps", "casting", "normalized_dim"}`` of an RMS norm without a weight over the last
    axis (or the one its ``dim`` or ``channel_dim`` names), whatever its size, whose forward
    matches one of :data:`~normlab.torch.casting.UNWEIGHTED_CASTINGS` bit for bit in float32
    and bfloat16 on two shapes (run without its buffers: a forward that reads them is not
    one), and where several do, the one that also gives its bfloat16 input gradient; None
    otherwise."""
    eps = _unweighted_eps(module)
    if eps is None:
        return None
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for shape in [(4, 16), (2, 4, 7)]:
        x = torch.randn(shape, generator=generator)  # a row scaled where eps counts as much as the data
        rows = torch.tensor([1.0, math.sqrt(eps) + 1e-3, 10.0, 1.0]).reshape(-1, 1)
        inputs.append((x.reshape(4, -1) * rows + torch.tensor([0.0, 0.0, 0.0, 3.0]).reshape(-1, 1)).reshape(shape))
    probes = [x.to(dtype) for x in inputs for dtype in (torch.float32, torch.bfloat16)]
    # (parameters registered as None stay: timm's RmsNorm(..., affine=False) reads its weight, None)
    probe = _probe_copy(module, {"parameters": dict(module._parameters), "buffers": {}})
    try:
        with torch.no_grad():
            outputs = [type(module).forward(probe, x) for x in probes]
    except Exception:
        return None
    for dim in _normalized_dims(module):
        try:
            with torch.no_grad():
                matches = [casting for casting in UNWEIGHTED_CASTINGS if _all_equal(
                    outputs, [unweighted_rms_norm_recipe(x, eps, casting, dim) for x in probes])]
        except IndexError:  # (an axis the probes lack: a dim that names no axis)
            continue
        if len(matches) > 1:  # ("llama" and "diffusers" give one output: their bfloat16 input gradients differ)
            same_gradient = [casting for casting in matches if _same_input_gradient(
                lambda x: type(module).forward(probe, x),
                lambda x, casting=casting: unweighted_rms_norm_recipe(x, eps, casting, dim), probes[1])]
            matches = same_gradient or matches
        if len(matches) > 1:  # ("llama" and "gemma3n" give one bfloat16 gradient: their float32 ones differ)
            matches = [casting for casting in matches if _same_input_gradient(
                lambda x: type(module).forward(probe, x),
                lambda x, casting=casting: unweighted_rms_norm_recipe(x, eps, casting, dim), probes[0])] or matches
        if matches:
            return {"eps": eps, "casting": matches[0], "normalized_dim": dim}
    return None


@_on_cpu
def _ignores_its_channel_dim(module: nn.Module) -> bool:
    """Whether ``type(module).forward`` is ``forward(x, channel_dim=None)`` and gives the same
    output whatever ``channel_dim`` it is passed (LTX-2's ``PerChannelRMSNorm``, which reads
    its own attribute instead): :class:`~normlab.torch.recipe_norms.UnweightedRMSNorm` takes
    and ignores it so."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    if len(parameters) != 2 or parameters[1].name != "channel_dim" or parameters[1].default is not None:
        return False
    probe = _probe_copy(module, {"parameters": dict(module._parameters), "buffers": {}})
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected = type(module).forward(probe, x)
            return all(_all_equal([type(module).forward(probe, x, dim)], [expected]) for dim in (0, 1, 2, 3, -1))
    except Exception:
        return False


@_on_cpu
def _channels_first_rms_recipe(module: nn.Module) -> Optional[dict]:
    """The :class:`~normlab.torch.recipe_norms.RMSNorm2d` attributes (``normalized_shape``,
    eps, affine, casting) of an RMS norm over the channels of ``(N, C, H, W)`` input (timm's
    ``RmsNorm2d``, ``RmsNorm2dFp32``): a module with no parameter but a 1-D ``weight`` (or
    one registered as None beside a one-axis ``normalized_shape``), no buffers or children
    and a numeric ``eps``, whose forward matches one of
    :data:`~normlab.torch.casting.CHANNELS_FIRST_RMS_CASTINGS` bit for bit in float32,
    bfloat16 and mixed weight/input dtypes; None otherwise."""
    weight, eps = module._parameters.get("weight"), getattr(module, "eps", None)
    shape = tuple(weight.shape) if weight is not None else getattr(module, "normalized_shape", None)
    if (set(module._parameters) != {"weight"} or (weight is not None and weight.dim() != 1) or len(module._buffers)
            or list(module.children()) or not isinstance(eps, (int, float)) or isinstance(eps, bool)
            or not isinstance(shape, (tuple, list)) or len(shape) != 1 or not isinstance(shape[0], int)
            or shape[0] < 2):  # (one channel: the last axis of (N, C) input too, where the probe cannot tell)
        return None
    channels = shape[0]
    generator = torch.Generator().manual_seed(0)
    probe_weight = None if weight is None else torch.randn(channels, generator=generator) * 0.5 + 1.0
    x = torch.randn(4, channels, 3, 2, generator=generator)  # a sample scaled where eps counts as much as the data
    x = x * torch.tensor([1.0, math.sqrt(eps) + 1e-3, 10.0, 1.0]).reshape(4, 1, 1, 1) + torch.tensor(
        [0.0, 0.0, 0.0, 3.0]).reshape(4, 1, 1, 1)
    outputs = _probe_outputs(module, {"weight": probe_weight}, x)
    if outputs is None:
        return None
    for casting in CHANNELS_FIRST_RMS_CASTINGS:
        with torch.no_grad():
            expected = [channels_first_rms_norm_recipe(x.to(x_dtype), None if weight is None else
                                                       probe_weight.to(w_dtype), float(eps), casting)
                        for x_dtype, w_dtype in _PROBE_DTYPES]
        if _all_equal(outputs, expected):
            return {"normalized_shape": (channels,), "eps": float(eps), "elementwise_affine": weight is not None,
                    "casting": casting}
    return None


def _same_input_gradient(forward: Callable, recipe: Callable, x: Tensor) -> bool:
    """Whether ``forward`` and ``recipe`` give ``x`` one gradient to the bit, for a random
    output gradient."""
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    gradients = []
    for function in (forward, recipe):
        leaf = x.detach().clone().requires_grad_()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                function(leaf).backward(grad)
        except Exception:
            return False
        gradients.append(leaf.grad)
    return _all_equal(gradients[:1], gradients[1:])


def _takes_a_second_input(module: nn.Module) -> bool:
    """Whether ``type(module).forward`` takes a second positional input (a gate): such a
    module is never an :class:`RMSNorm`, whose second argument is a mask."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    return sum(p.kind in positional for p in parameters) > 1


def _group_sizes(module: nn.Module, size: int) -> list[int]:
    """The group sizes a gated norm names: its ``group_size``, or ``size // n_groups``, or one group."""
    group_size, n_groups = getattr(module, "group_size", None), getattr(module, "n_groups", None)
    candidates = [group_size, size // n_groups if isinstance(n_groups, int) and n_groups > 0 else None, size]
    return [c for c in dict.fromkeys(candidates)
            if isinstance(c, int) and not isinstance(c, bool) and 0 < c <= size and size % c == 0]


@_on_cpu
def _gated_recipe(module: nn.Module) -> Optional[dict]:
    """The :class:`~normlab.torch.fused.GatedRMSNorm` attributes (group size, gate position,
    casting) whose torch composite gives ``type(module).forward(x, gate)`` bit for bit in
    float32, bfloat16 and mixed weight/input dtypes; None when none does."""
    from normlab.fused import GATE_ACTIVATIONS
    from normlab.torch.fused import Block, _composite

    weight, eps = _weight_and_eps(module)
    if weight is None:
        return None
    generator = torch.Generator().manual_seed(0)
    size = weight.shape[0]
    probe_weight = torch.randn(size, generator=generator) * 0.5 + 1.0
    x = torch.randn(2, 3, size, generator=generator) * 2.0
    gate = torch.randn(2, 3, size, generator=generator) * 2.0
    outputs = _probe_outputs(module, {"weight": probe_weight}, x, gate)
    if outputs is None:
        return None
    before = getattr(module, "norm_before_gate", None)
    named = getattr(module, "activation", None)  # (transformers' ACT2FN name, where the class keeps one)
    activations = [named] if named in GATE_ACTIVATIONS else list(GATE_ACTIVATIONS)
    for group_size in _group_sizes(module, size):
        for norm_before_gate in (before,) if isinstance(before, bool) else (False, True):
            for activation in activations:
                for casting in ("llama", "gemma", "qwen3_next"):
                    block = Block("... (g [c])", "(g c)", sizes=(("c", group_size),), eps=float(eps), rms=True,
                                  norm_before_gate=norm_before_gate, gate_activation=activation, casting=casting)
                    with torch.no_grad():
                        expected = [_composite(x.to(x_dtype), None, gate.to(x_dtype), probe_weight.to(w_dtype),
                                               None, None, None, block) for x_dtype, w_dtype in _PROBE_DTYPES]
                    if _all_equal(outputs, expected):
                        return {"hidden_size": size, "eps": float(eps), "group_size": group_size,
                                "norm_before_gate": norm_before_gate, "gate_activation": activation,
                                "casting": casting}
    return None


def _layer_norm_shape(module: nn.Module) -> Optional[tuple[int, ...]]:
    """The shape of the parameters of a module that may be a layer norm over the last axis:
    no parameters but a ``weight`` and ``bias`` of one shape ``(..., d)``, or none at all
    and a one-axis ``normalized_shape``; no buffers or children. None otherwise."""
    parameters = module._parameters
    if not set(parameters) <= {"weight", "bias"} or len(module._buffers) or list(module.children()):
        return None
    shapes = {tuple(p.shape) for p in parameters.values() if p is not None}
    if len(shapes) == 1:
        shape = shapes.pop()
        return shape if shape and all(shape) else None
    normalized_shape = getattr(module, "normalized_shape", None)
    if shapes or not isinstance(normalized_shape, (tuple, list)) or len(normalized_shape) != 1:
        return None
    size = normalized_shape[0]
    return (size,) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _eps_candidates(module: nn.Module, shape: tuple, parameters: dict) -> list[float]:
    """The module's ``eps`` or ``variance_epsilon``; without one (OLMo writes it into its
    forward), zero, then the one its outputs show, rounded to more and more digits. On a
    row of ±a (mean 0, variance a²·v) a layer norm gives a / sqrt(a²·v + eps); a second
    try with a²·v near the first estimate makes eps count as much as the data."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        return [float(eps)]
    if eps is not None:
        return []
    probe = _probe_copy(module, {"parameters": {k: None if p is None else torch.ones(shape) if k == "weight"
                                                else torch.zeros(shape) for k, p in parameters.items()},
                                 "buffers": {}})
    signs = torch.tensor([(-1.0) ** i for i in range(shape[-1] // 2 * 2)] + [0.0] * (shape[-1] % 2))
    v = float(signs.pow(2).mean())
    estimate, a = None, 1e-3
    for _ in range(2):
        try:
            with torch.no_grad():
                y = float(type(module).forward(probe, (a * signs).expand(shape).to(torch.float32)).flatten()[0])
        except Exception:
            return []
        if not math.isfinite(y) or y <= 0:
            return []
        estimate = (a / y) ** 2 - a * a * v
        if estimate <= 0:
            break
        a = math.sqrt(estimate / v)
    rounded = [float(f"{estimate:.{digits}g}") for digits in range(1, 7)] if estimate and estimate > 0 else []
    return list(dict.fromkeys([0.0] + rounded))  # (zero first: an estimate of 6e-20 is rounding)


@_on_cpu
def _layer_norm_recipe(module: nn.Module) -> Optional[dict]:
    """The :class:`~normlab.torch.recipe_norms.RecipeLayerNorm` attributes (shape, eps,
    casting) of a layer norm over the last axis whose forward matches one of
    :data:`~normlab.torch.casting.LAYER_NORM_CASTINGS` bit for bit in float32, bfloat16
    and mixed weight/input dtypes; None otherwise."""
    shape = _layer_norm_shape(module)
    if shape is None:
        return None
    generator = torch.Generator().manual_seed(0)
    parameters = {name: None if p is None else torch.randn(shape, generator=generator) * 0.5 + (name == "weight")
                  for name, p in module._parameters.items()}
    candidates = _eps_candidates(module, shape, parameters)
    if not candidates:
        return None
    rows = (4,) + (1,) * len(shape)
    x = torch.randn((4, *shape), generator=generator)  # a row scaled where eps counts as much as the data
    x = x * torch.tensor([1.0, math.sqrt(max(candidates)) + 1e-3, 10.0, 1.0]).reshape(rows) + torch.tensor(
        [0.0, 0.0, 0.0, 3.0]).reshape(rows)
    outputs = _probe_outputs(module, parameters, x)
    if outputs is None:
        return None
    weight, bias = parameters.get("weight"), parameters.get("bias")
    for eps in candidates:
        for casting in LAYER_NORM_CASTINGS:
            if casting == "olmo" and len(shape) > 1:
                continue  # F.layer_norm takes the normalized axes' parameters only
            with torch.no_grad():
                expected = [layer_norm_recipe(x.to(x_dtype), None if weight is None else weight.to(w_dtype),
                                              None if bias is None else bias.to(w_dtype), eps, casting)
                            for x_dtype, w_dtype in _PROBE_DTYPES]
            if _all_equal(outputs, expected):
                return {"hidden_size": shape, "eps": eps, "casting": casting, "elementwise_affine": weight is not None}
    return None



@_on_cpu
def _computes_in_half_as(module: nn.Module, reference: Callable, shape: tuple) -> bool:
    """Whether ``type(module).forward`` gives ``reference``'s output (dtype and bits) and input
    gradient, or raises where it raises, on bfloat16 and float16 probes of ``shape`` with
    parameters of the input's dtype, and on bfloat16 input beside float32 parameters: float64
    probes (:func:`_computes_like`) do not see where a forward rounds, nor the dtype it
    returns."""
    generator = torch.Generator().manual_seed(0)
    parameters = {name: None if p is None else torch.randn(p.shape, generator=generator) * 0.5 + 1
                  for name, p in module._parameters.items()}
    x = torch.randn(shape, generator=generator) * 2 + 1
    grad = torch.randn(shape, generator=generator)

    def run(forward, x_dtype, w_dtype):
        tensors = {"parameters": {k: None if p is None else p.to(w_dtype) for k, p in parameters.items()},
                   "buffers": {}}
        try:
            with torch.enable_grad():
                probe = x.to(x_dtype).requires_grad_()
                output = forward(_probe_copy(module, tensors), probe)
                # (an output of the input's elements in another shape: xLSTM's norm merges its heads)
                output.backward(grad.reshape(output.shape).to(output.dtype))
            return output.detach(), probe.grad
        except Exception as error:  # (compared by type: both must refuse)
            return type(error)

    for x_dtype, w_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                             (torch.bfloat16, torch.float32)):
        ours, theirs = run(type(module).forward, x_dtype, w_dtype), run(reference, x_dtype, w_dtype)
        if isinstance(ours, type) or isinstance(theirs, type):
            if ours is not theirs:
                return False
        elif not all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ours, theirs)):
            return False
    return True


@_on_cpu
def _computes_in_float32_on_float32_parameters(module: nn.Module, shape: tuple) -> bool:
    """Whether a layer norm whose parameters are kept in float32 (ESMFold2's
    ``EsmFold2LayerNorm``: ``F.layer_norm`` on the input cast to float32, with its own
    parameters uncast, which raises "mixed dtype" on parameters of any other dtype) computes
    as :class:`~normlab.torch.recipe_norms.Float32LayerNorm`: on float32 parameters, with
    float32, bfloat16, float16 and float64 input, ``type(module).forward`` gives
    :func:`~normlab.torch.recipe_norms.float32_layer_norm`'s output (dtype and bits) and
    gradients (input and parameters) to the bit; on bfloat16, float16 and float64 parameters
    it raises (where the twin computes, upcasting them) or gives those bits too."""
    from normlab.torch.recipe_norms import float32_layer_norm

    generator = torch.Generator().manual_seed(0)
    parameters = {name: None if p is None else torch.randn(p.shape, generator=generator) * 0.5 + 1
                  for name, p in module._parameters.items()}
    if set(parameters) != {"weight", "bias"} or parameters["weight"] is None:
        return False  # (a bias may be off: ESMFold2's adaptive norm conditions on one built with bias=False)
    x = torch.randn(shape, generator=generator) * 2 + 1
    grad = torch.randn(shape, generator=generator)

    def run(forward, x_dtype, w_dtype):
        copy = _probe_copy(module, {"parameters": {}, "buffers": {}})
        copy._parameters = {k: None if p is None else p.to(w_dtype).requires_grad_()  # (leaves: their grads)
                            for k, p in parameters.items()}
        try:
            with torch.inference_mode(False), torch.enable_grad():
                probe = x.to(x_dtype, copy=True).requires_grad_()  # (a copy: x itself stays a plain tensor)
                output = forward(copy, probe)
                output.backward(grad.to(output.dtype))
        except Exception:
            return None
        return [output.detach(), probe.grad,
                *(copy._parameters[k].grad for k in sorted(parameters) if copy._parameters[k] is not None)]

    def reference(copy, probe):
        return float32_layer_norm(probe, list(copy.normalized_shape), copy.weight, copy.bias, copy.eps)

    for x_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for w_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            ours = run(type(module).forward, x_dtype, w_dtype)
            if ours is None and w_dtype != torch.float32:
                continue  # (parameters it keeps in float32: the twin upcasts others instead of raising)
            theirs = run(reference, x_dtype, w_dtype)
            if ours is None or theirs is None or not _all_equal(ours, theirs):
                return False
    return True
