"""convert(): swap a model's norm layers for their normlab twins.

A layer is converted when normlab can compute what it computes:

* torch.nn's norm classes, and their subclasses whose ``forward`` is torch.nn's own;
* subclasses with a ``forward`` of their own (timm's ``LayerNorm``, ``GroupNorm``, ...) when
  that forward gives torch.nn's numbers on probe inputs, and subclasses of ``nn.LayerNorm``
  that normalize the channels of ``(N, C, H, W)`` input (torchvision's and timm's ConvNeXt
  ``LayerNorm2d``), which become :class:`LayerNorm2d`;
* RMS norms of other libraries (transformers' ``LlamaRMSNorm``, ``GemmaRMSNorm``,
  ``T5LayerNorm`` and the many copies of them): a module with one 1-D ``weight`` and an
  ``eps`` or ``variance_epsilon`` whose forward reproduces one casting recipe
  (:mod:`normlab.torch.casting`) bit for bit on probe inputs in float32 and bfloat16
  becomes :class:`RMSNorm` with that recipe;
* layer norms that compute in float32 and cast back (transformers' ``CohereLayerNorm``,
  also with its per-head QK-norm weight of shape ``(heads, head_dim)``, and the
  parameter-less ``OlmoLayerNorm``): a module with no parameters but a ``weight``
  and ``bias`` of one shape (or none and a one-axis ``normalized_shape``), with no buffers
  or children, whose forward reproduces one layer norm recipe bit for bit on probe inputs
  in float32 and bfloat16 (with its ``eps``, or the one its outputs show when it has no
  such attribute) becomes :class:`~normlab.torch.recipe_norms.RecipeLayerNorm`;
* gated RMS norms (transformers' ``MambaRMSNormGated``, ``FalconH1RMSNormGated``): a module
  like those above whose forward takes a gate, ``forward(x, gate)``, and reproduces
  :class:`~normlab.torch.fused.GatedRMSNorm` with one casting recipe bit for bit, per group
  of its ``group_size`` (or ``n_groups``), becomes that module; one taking a second
  argument that no recipe reproduces is left alone, never an :class:`RMSNorm` whose
  second argument is a mask;
* ``LazyBatchNorm*`` and ``LazyInstanceNorm*``: once their first forward has inferred the
  channels, torch turns them into the normlab twin instead of torch.nn's class.

Probes run on copies with random float64 parameters, through ``type(m).forward`` (no hooks),
and leave the module, its state and the global random generator untouched.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from normlab.torch.casting import CASTINGS, LAYER_NORM_CASTINGS, layer_norm_recipe, rms_norm_recipe
from normlab.torch.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                                   InstanceNorm2d, InstanceNorm3d, LayerNorm, LayerNorm2d, RMSNorm)
from normlab.torch.sync import SyncBatchNorm

_TWINS = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm, nn.RMSNorm: RMSNorm,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
_NORM_BASES = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_PROBE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float64 probes: a forward in float32 passes, another formula not


def twin_of(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A ``cls`` instance holding ``module``'s attributes (hooks included) and
    ``attributes``, sharing its Parameter and buffer objects (so an optimizer built on
    the old model keeps working)."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(twin, name, type(getattr(module, name))(getattr(module, name)))
    if cls is SyncBatchNorm and not hasattr(twin, "process_group"):
        twin.process_group = None
    twin.__dict__.update(attributes)
    (twin._init_spec if hasattr(twin, "_init_spec") else twin._init_block)()  # (the fused blocks' name)
    if parametrize.is_parametrized(module):
        # torch.nn.utils.parametrize made module's class a subclass with one property per
        # parametrized tensor (weight computed from parametrizations.weight.original): give
        # the twin the same, or it would compute without them
        parametrize._inject_new_class(twin)
        for tensor_name in module.parametrizations:
            parametrize._inject_property(twin, tensor_name)
    return twin


def convert(model: nn.Module, fuse: bool = False) -> nn.Module:
    """Replace every normalization layer of ``model`` (in place) that normlab can compute
    with its normlab twin, keeping parameters and buffers (the same objects, so device,
    dtype and an optimizer built on them too) and ``state_dict`` keys. Returns the model
    (the twin itself when ``model`` is one norm layer).

    Converted: torch.nn's norm classes and their subclasses that compute what torch.nn
    does; ConvNeXt's ``LayerNorm2d`` (torchvision, timm) as :class:`LayerNorm2d`;
    transformers' RMS norms (LLaMA, Mistral, Qwen, Gemma, T5, ...) as :class:`RMSNorm` with
    their casting recipe; the layer norms Cohere and OLMo compute in float32 as
    :class:`~normlab.torch.recipe_norms.RecipeLayerNorm`; their gated RMS norms (Mamba2, FalconH1) as
    :class:`~normlab.torch.fused.GatedRMSNorm`; uninitialized lazy norms at their first forward (which itself
    runs torch's). A subclass of a torch.nn norm whose forward computes something else,
    and any module named ``...Norm...`` that normlab does not recognize, is left alone, and
    one warning lists them. A converted subclass becomes the plain twin, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: its attributes carry over, its
    methods do not.

    ``fuse=True`` also fuses the residual adds of LLaMA-style pre-norm decoder layers, and
    of Gemma2/Gemma3's layers with a norm on each side of attention and MLP, into their RMS
    norms (:mod:`normlab.torch.fuse`); outputs and ``state_dict`` stay the same.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> x = torch.randn(3, 4)
    >>> expected = model(x)
    >>> torch.allclose(convert(model)(x), expected, atol=1e-6), type(model[1]).__name__
    (True, 'LayerNorm')
    """
    if fuse:
        from normlab.torch.fuse import fuse_decoder_layers
        fuse_decoder_layers(model)
    left_alone: dict[str, list[str]] = {}
    converted = _convert(model, "", left_alone, {})
    if left_alone:
        listed = "; ".join(f"{cls} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                           for cls, names in left_alone.items())
        warnings.warn(f"normlab.torch.convert left {sum(map(len, left_alone.values()))} norm layer(s) unconverted, "
                      f"because their forward computes something no normlab module does: {listed}", stacklevel=2)
    return converted


def _convert(module: nn.Module, name: str, left_alone: dict, done: dict) -> nn.Module:
    """``module`` converted; ``done`` maps the id of each module seen to its result, so a
    module the model holds in several places (shared layers) becomes one twin there too."""
    if id(module) in done:
        return done[id(module)]
    replacement = _replacement(module, name or "<model>", left_alone)
    if replacement is None:
        for child_name, child in list(module._modules.items()):  # (named_children() skips a repeated child)
            if child is None:
                continue
            converted = _convert(child, f"{name}.{child_name}" if name else child_name, left_alone, done)
            if converted is not child:
                module.add_module(child_name, converted)
    done[id(module)] = module if replacement is None else replacement
    return done[id(module)]


def _replacement(module: nn.Module, name: str, left_alone: dict) -> Optional[nn.Module]:
    """The twin of ``module``, or None to leave it (and look at its children)."""
    cls = type(module)
    if any(c.__module__.startswith("normlab.") for c in cls.__mro__):
        return None
    if cls in _TWINS:
        return twin_of(module, _TWINS[cls])
    if isinstance(module, LazyModuleMixin) and isinstance(module, _NormBase):
        return _convert_lazy(module)
    base = next((c for c in cls.__mro__ if c in _TWINS), None)
    if base is not None:
        if cls.forward is base.forward or _computes_like(module, base.forward, _probe_shapes(module, base)):
            return twin_of(module, _TWINS[base])
        if base is nn.LayerNorm and len(module.normalized_shape) == 1 and _computes_like(
                module, _channels_first_layer_norm, [(2, module.normalized_shape[0], 3, 2)]):
            return twin_of(module, LayerNorm2d)
    elif not isinstance(module, _NORM_BASES):
        if cls.__module__.startswith("torch."):
            return None
        if _takes_a_second_input(module):
            recipe = _gated_recipe(module)
            if recipe is not None:
                from normlab.torch.fused import GatedRMSNorm

                return twin_of(module, GatedRMSNorm, **recipe)
        else:
            recipe = _rms_recipe(module)
            if recipe is not None:
                return twin_of(module, RMSNorm, **recipe)
            recipe = _layer_norm_recipe(module)
            if recipe is not None:
                from normlab.torch.recipe_norms import RecipeLayerNorm

                return twin_of(module, RecipeLayerNorm, **recipe)
        if not (re.search(r"Norm(?!al)", cls.__name__) and not list(module.children())):
            return None
    left_alone.setdefault(cls.__name__, []).append(name)
    return module


def _convert_lazy(module: nn.Module) -> nn.Module:
    """A lazy norm stays lazy: torch swaps its class for ``cls_to_become`` when the first
    forward has inferred the channels; point that at the normlab twin."""
    twin = _TWINS.get(module.cls_to_become)
    if twin is not None:
        module.cls_to_become = twin
        twin._init_spec(module)  # the attributes the twin's forward needs, set before the swap
    return module


# ---------------------------------------------------------------------------------------
# Probes: does a forward of their own compute what a normlab module does?


def _probe_shapes(module: nn.Module, base: type) -> list[tuple[int, ...]]:
    if issubclass(base, (nn.LayerNorm, nn.RMSNorm)):
        return [(3, 2, *module.normalized_shape)]
    if base is nn.GroupNorm:
        return [(3, module.num_channels, 4)]
    channels = module.num_features
    return {nn.BatchNorm1d: [(4, channels), (4, channels, 3)], nn.BatchNorm2d: [(4, channels, 3, 2)],
            nn.BatchNorm3d: [(3, channels, 2, 2, 2)], nn.InstanceNorm1d: [(2, channels, 5)],
            nn.InstanceNorm2d: [(2, channels, 3, 3)], nn.InstanceNorm3d: [(2, channels, 2, 2, 2)]}.get(base, [])


def _channels_first_layer_norm(module: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, module.weight, module.bias,
                        module.eps).permute(0, 3, 1, 2)


def _probe_copy(module: nn.Module, tensors: dict) -> nn.Module:
    """A shallow copy of ``module`` holding clones of ``tensors`` as its parameters and buffers."""
    copy = type(module).__new__(type(module))
    copy.__dict__.update(module.__dict__)
    copy._parameters = {k: None if v is None else v.clone() for k, v in tensors["parameters"].items()}
    copy._buffers = {k: None if v is None else v.clone() for k, v in tensors["buffers"].items()}
    return copy


def _on_cpu(probe: Callable) -> Callable:
    """Run a probe on CPU tensors whatever the default device: a model built and converted
    inside ``with torch.device("meta")`` has meta parameters, on which no probe computes."""

    @functools.wraps(probe)
    def on_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return probe(*args, **kwargs)

    return on_cpu


@_on_cpu
def _computes_like(module: nn.Module, reference: Callable, shapes: list) -> bool:
    """``type(module).forward`` gives ``reference``'s output and state on float64 probes with
    random parameters and running statistics, in training and evaluation mode."""
    if not shapes:
        return False
    generator = torch.Generator().manual_seed(0)

    def random_like(t: Optional[Tensor], positive: bool = False) -> Optional[Tensor]:
        if t is None or not t.is_floating_point():
            return None if t is None else t.detach().clone()
        values = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        return values.abs() + 0.5 if positive else values

    tensors = {"parameters": {k: random_like(v) for k, v in module._parameters.items()},
               "buffers": {k: random_like(v, positive="var" in k) for k, v in module._buffers.items()}}
    eps = getattr(module, "eps", None) or 1e-5
    for shape in shapes:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) + 0.5
        for scale in (1.0, math.sqrt(eps)):  # the second makes eps matter as much as the data
            for training in (True, False):
                ours, theirs = _probe_copy(module, tensors), _probe_copy(module, tensors)
                ours.training = theirs.training = training
                try:
                    with torch.no_grad():
                        actual, expected = type(module).forward(ours, x * scale), reference(theirs, x * scale)
                except Exception:  # a forward that cannot take the probe is not recognized
                    return False
                if not _same(actual, expected, **_PROBE_TOLERANCE):
                    return False
                for key, value in theirs._buffers.items():
                    if value is not None and not _same(ours._buffers.get(key), value, **_PROBE_TOLERANCE):
                        return False
    return True


def _same(actual, expected, **tolerance) -> bool:
    return (isinstance(actual, Tensor) and isinstance(expected, Tensor) and actual.shape == expected.shape
            and actual.dtype == expected.dtype and torch.allclose(actual, expected, equal_nan=True, **tolerance))


def _weight_and_eps(module: nn.Module) -> tuple[Optional[Tensor], Optional[float]]:
    """``(weight, eps)`` of a module whose one parameter is a 1-D ``weight``, with no
    buffers or children and a numeric ``variance_epsilon`` or ``eps`` (as transformers'
    RMS norms have); ``(None, None)`` otherwise."""
    weight = module._parameters.get("weight")
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (set(module._parameters) != {"weight"} or weight is None or weight.dim() != 1 or len(module._buffers)
            or list(module.children()) or not isinstance(eps, (int, float)) or isinstance(eps, bool)):
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
def _rms_recipe(module: nn.Module) -> Optional[dict]:
    """``{"normalized_shape", "eps", "casting", "weight_offset", ...}`` when ``module`` is an
    RMS norm with one 1-D weight whose forward matches a casting recipe bit for bit in
    float32, bfloat16 and mixed weight/input dtypes; None otherwise."""
    weight, eps = _weight_and_eps(module)
    if weight is None:
        return None
    generator = torch.Generator().manual_seed(0)
    size = weight.shape[0]
    probe_weight = torch.randn(size, generator=generator) * 0.5
    x = torch.randn(4, size, generator=generator)
    x = x * torch.tensor([[1.0], [math.sqrt(eps) + 1e-3], [10.0], [1.0]]) + torch.tensor([[0.0], [0.0], [0.0], [3.0]])
    outputs = _probe_outputs(module, {"weight": probe_weight}, x)
    if outputs is None:
        return None
    for casting in CASTINGS:
        for offset in (0.0, 1.0):
            with torch.no_grad():
                expected = [rms_norm_recipe(x.to(x_dtype), probe_weight.to(w_dtype), eps, casting, offset)
                            for x_dtype, w_dtype in _PROBE_DTYPES]
            if all(isinstance(a, Tensor) and a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e)
                   for a, e in zip(outputs, expected)):
                return {"normalized_shape": (size,), "eps": float(eps), "elementwise_affine": True,
                        "casting": casting, "weight_offset": offset}
    return None


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
    for group_size in _group_sizes(module, size):
        for norm_before_gate in (before,) if isinstance(before, bool) else (False, True):
            for casting in ("llama", "gemma"):
                block = Block("... (g [c])", "(g c)", sizes=(("c", group_size),), eps=float(eps), rms=True,
                              norm_before_gate=norm_before_gate, casting=casting)
                with torch.no_grad():
                    expected = [_composite(x.to(x_dtype), None, gate.to(x_dtype), probe_weight.to(w_dtype), None,
                                           None, None, block) for x_dtype, w_dtype in _PROBE_DTYPES]
                if all(isinstance(a, Tensor) and a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e)
                       for a, e in zip(outputs, expected)):
                    return {"hidden_size": size, "eps": float(eps), "group_size": group_size,
                            "norm_before_gate": norm_before_gate, "gate_activation": "silu", "casting": casting}
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
            if all(isinstance(a, Tensor) and a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e)
                   for a, e in zip(outputs, expected)):
                return {"hidden_size": shape, "eps": eps, "casting": casting, "elementwise_affine": weight is not None}
    return None

