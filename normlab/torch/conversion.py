"""convert(): swap a model's norm layers for their normlab twins.

A layer is converted when normlab can compute what it computes:

* torch.nn's norm classes, and their subclasses whose ``forward`` is torch.nn's own (a
  subclass redefining a method or property that forward reads, a ``_check_input_dim`` or a
  ``weight`` property, is left alone);
* subclasses with a ``forward`` of their own (timm's ``LayerNorm``, ``GroupNorm``, ...) that
  takes the input alone, when that forward gives torch.nn's numbers on probe inputs, or
  timm's ``LayerNormFp32``'s on float32 parameters (ESMFold2's layer norm, with or without a
  bias, which keeps them in float32 and raises on others), as :class:`~normlab.torch.recipe_norms.Float32LayerNorm` (one
  taking more, such as a padding mask, is left alone), and subclasses of ``nn.LayerNorm``
  that normalize the channels of ``(N, C, H, W)`` input (torchvision's and timm's ConvNeXt
  ``LayerNorm2d``), which become :class:`LayerNorm2d`;
* RMS norms of other libraries (transformers' ``LlamaRMSNorm``, ``GemmaRMSNorm``,
  ``T5LayerNorm`` and the many copies of them): a module with one 1-D ``weight`` and an
  ``eps`` or ``variance_epsilon`` whose forward reproduces one casting recipe
  (:mod:`normlab.torch.casting`) bit for bit on probe inputs in float32 and bfloat16
  becomes :class:`RMSNorm` with that recipe; one with a ``bias`` of its weight's shape too,
  whose forward reproduces a recipe followed by ``+ bias`` (diffusers' ``RMSNorm(...,
  bias=True)``), :class:`~normlab.torch.recipe_norms.BiasedRMSNorm`; one whose weight is named
  ``gamma`` (diffusers' ``StableAudio3RMSNorm``, in float32 or in the input's dtype),
  :class:`~normlab.torch.recipe_norms.GammaRMSNorm`;
* layer norms that compute in float32 (transformers' ``CohereLayerNorm``, also with its
  per-head QK-norm weight of shape ``(heads, head_dim)``, the parameter-less
  ``OlmoLayerNorm``, and ``DebertaLayerNorm``): a module with no parameters but a ``weight``
  and ``bias`` of one shape (or none and a one-axis ``normalized_shape``), with no buffers
  or children, whose forward reproduces one layer norm recipe bit for bit on probe inputs
  in float32 and bfloat16 (with its ``eps``, or the one its outputs show when it has no
  such attribute) becomes :class:`~normlab.torch.recipe_norms.RecipeLayerNorm`;
* RMS norms without a weight over the last axis, whatever its size (transformers'
  ``Llama4TextL2Norm``, ``DeepseekV4UnweightedRMSNorm``, ``FalconMambaWeightlessRMSNorm``;
  LTX-2's ``PerChannelRMSNorm`` and ``LTX2AudioPixelNorm`` over the channels, the axis their
  ``channel_dim`` or ``dim`` names, the first with the ``channel_dim`` argument it ignores):
  a module with no parameters, no buffers but ones outside its ``state_dict``, and an
  ``eps`` or ``variance_epsilon``, whose forward reproduces one recipe bit for bit in
  float32 and bfloat16 on two sizes, becomes
  :class:`~normlab.torch.recipe_norms.UnweightedRMSNorm`;
* RMS norms over the channels of ``(N, C, H, W)`` input (timm's ``RmsNorm2d`` and
  ``RmsNorm2dFp32``): a module with one 1-D ``weight`` (or one registered as None), no
  buffers or children and an ``eps``, whose forward reproduces a channels-first recipe bit
  for bit on probe inputs in float32 and bfloat16 becomes
  :class:`~normlab.torch.recipe_norms.RMSNorm2d`;
* subclasses of ``nn.GroupNorm`` that normalize each frame of ``(N, C, T, H, W)`` input on its
  own (diffusers' ``MiniMaxH3VideoGroupNorm``), found on float64 probes:
  :class:`~normlab.torch.recipe_norms.PerFrameGroupNorm`, a
  :class:`~normlab.torch.modules.Norm` with pattern ``"b (g [c]) t [h w]"`` whose output is
  contiguous on any input layout, as the original's;
* subclasses of ``nn.LayerNorm`` that normalize the last axis alone and then apply a weight
  and bias per head, of shape ``(heads, head_dim)`` (transformers' ``ChameleonLayerNorm``),
  found on float64 probes: :class:`~normlab.torch.recipe_norms.PerHeadLayerNorm`, a
  :class:`~normlab.torch.modules.Norm` with pattern ``"... h [d]"``;
* layer norms of each head of ``(batch, sequence, heads, head_dim)`` input that return the heads
  merged and then apply a weight (and a bias) over them (transformers'
  ``xLSTMMultiHeadLayerNorm``), found on float64 probes and bit for bit in half precision:
  :class:`~normlab.torch.recipe_norms.MultiHeadLayerNorm`, a
  :class:`~normlab.torch.modules.Norm` with pattern ``"b s h [d]"``;
* layer norms over the channels of ``(N, C, H, W)`` input that are no ``nn.LayerNorm``
  (transformers' ``VitDetLayerNorm``): a ``weight``, ``bias`` and ``normalized_shape`` of
  ``(C,)`` and a forward that gives torch's numbers on float64 probes become
  :class:`~normlab.torch.modules.ChannelsFirstLayerNorm` (``LayerNorm2d``'s computation, and
  no ``nn.LayerNorm`` either: code choosing layers by ``isinstance`` treats it as the original);
* gated RMS norms (transformers' ``MambaRMSNormGated``, ``FalconH1RMSNormGated``,
  ``Qwen3NextRMSNormGated``, ``BailingHybridRMSNormGated``): a module like those above
  whose forward takes a gate, ``forward(x, gate)``, and reproduces
  :class:`~normlab.torch.fused.GatedRMSNorm` with one casting recipe and gate activation
  bit for bit, per group of its ``group_size`` (or ``n_groups``), becomes that module; one
  taking a second argument that no recipe reproduces is left alone, never an
  :class:`RMSNorm` whose second argument is a mask;
* ``LazyBatchNorm*`` and ``LazyInstanceNorm*``: once their first forward (the twin's, mask=
  too) has inferred the channels, torch turns them into the normlab twin instead of
  torch.nn's class;
* PyG's ``InstanceNorm``, ``LayerNorm`` and ``GraphNorm`` (the classes themselves, found by
  name without importing PyG): their twins in :mod:`normlab.torch.geometric`.

Probes run on copies with random float64 parameters, through ``type(m).forward`` (no hooks),
and leave the module, its state and the global random generator untouched; the probes for
recipes (bit for bit in float32 and bfloat16) live in :mod:`normlab.torch.recipe_probes`.
"""

from __future__ import annotations

import inspect
import math
import pickle
import re
import sys
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from normlab.torch.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, ChannelsFirstLayerNorm, GroupNorm,
                                   InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, LayerNorm2d, Norm,
                                   RMSNorm)
from normlab.torch.recipe_probes import (_channels_first_rms_recipe, _computes_in_float32_on_float32_parameters,
                                         _computes_in_half_as, _gated_recipe,
                                         _ignores_its_channel_dim, _layer_norm_recipe, _on_cpu, _probe_copy,
                                         _rms_recipe, _takes_a_second_input, _unweighted_rms_recipe)
from normlab.torch.sync import SyncBatchNorm

_TWINS = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm, nn.RMSNorm: RMSNorm,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
_NORM_BASES = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# PyG's norms, by their full names (PyG is not imported): their twins in normlab.torch.geometric
# (PyG's BatchNorm and DiffGroupNorm hold a torch.nn.BatchNorm1d, which is converted itself)
_PYG_TWINS = {f"torch_geometric.nn.norm.{module}.{name}": name for module, name in (
    ("instance_norm", "InstanceNorm"), ("layer_norm", "LayerNorm"), ("graph_norm", "GraphNorm"))}
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
    rebind_hooks(module, twin)
    init = getattr(twin, "_init_spec", None) or getattr(twin, "_init_block", None)  # (the fused blocks' name)
    if init is not None:  # (the PyG twins keep no spec)
        init()
    if parametrize.is_parametrized(module):
        # torch.nn.utils.parametrize made module's class a subclass with one property per
        # parametrized tensor (weight computed from parametrizations.weight.original): give
        # the twin the same, or it would compute without them
        parametrize._inject_new_class(twin)
        for tensor_name in module.parametrizations:
            parametrize._inject_property(twin, tensor_name)
    return twin


def rebind_hooks(module: nn.Module, replacement: nn.Module) -> None:
    """Hooks that torch binds to their module (``register_load_state_dict_pre_hook`` keeps a
    weak reference to it and passes it to the hook) bound to ``replacement``, which holds
    ``module``'s hook dicts: once ``module`` is gone, such a hook raises torch's "hook of a
    dead Module" in ``load_state_dict``, ``copy.deepcopy`` and pickling. Replaced in the same
    dicts, which the hooks' handles remove them from."""
    for name, hooks in vars(replacement).items():
        if name.startswith("_") and "hooks" in name and isinstance(hooks, dict):
            for key, hook in list(hooks.items()):
                if getattr(hook, "with_module", False) and hook.module() is module:  # (torch's _WrappedHook)
                    hooks[key] = type(hook)(hook.hook, replacement)


def record_original(original: nn.Module, twin: nn.Module) -> None:
    """Write on ``twin`` what :func:`~normlab.torch.unconvert` needs to give back exactly the
    ``original`` it was made from: the attributes the twin added (``normalized_shape``,
    ``eps`` beside LLaMA's ``variance_epsilon``, ...), those it lacks (a fused norm is built
    afresh: transformers' ``_is_hf_initialized``), and the names of the original's parameters
    and buffers (a twin registers ``bias = None`` where the original has no such entry)."""
    before = dict(original.__dict__)
    earlier = before.pop("_original_state", None)
    parameters, buffers = tuple(original._parameters), tuple(original._buffers)
    if earlier is not None:  # (``original`` is itself a twin: what it was made from)
        for key in earlier["added"]:
            before.pop(key, None)
        before.update(earlier["dropped"])
        parameters, buffers = earlier["parameters"], earlier["buffers"]
    twin.__dict__["_original_state"] = {
        "added": tuple(key for key in twin.__dict__ if key not in before),
        "dropped": {key: value for key, value in before.items() if key not in twin.__dict__},
        "parameters": parameters, "buffers": buffers}


class _InitAsOriginal:
    """A transformers model's ``_init_weights`` (which ``init_weights()`` runs, as after
    building on the meta device and ``to_empty``) that initializes a converted norm as its
    original class: transformers picks a norm's init by its class (Qwen3-Next zeroes the
    ``1 + weight`` of its ``Qwen3NextRMSNorm`` by ``isinstance``, where the twin, an
    ``RMSNorm`` by name, would get ones), so the model's own ``_init_weights`` gets a
    stand-in of that class that holds the twin's parameter and buffer tables, and writes
    into them."""

    def __init__(self, model: nn.Module):
        # (weak: the model holds this in its __dict__, and a cycle would keep its parameters
        # alive after `del model` until Python's cyclic collector runs)
        self.model = weakref.ref(model)

    def __call__(self, module: nn.Module):
        original = getattr(module, "_original_class", None)
        if original is not None:
            stand_in = original.__new__(original)
            stand_in.__dict__.update(module.__dict__)
            module = stand_in
        model = self.model()
        return type(model)._init_weights(model, module)

    def __reduce__(self):
        # (pickle and copy.deepcopy, which take no weak reference: the saved or copied model's own)
        return type(self), (self.model(),)


def _named_class(cls: type) -> Optional[type]:
    """``cls``, to record on its twin, where pickle finds it by name; None for a class made at
    run time (parametrize's; its first base is named) or defined in a function, which would
    make ``torch.save(model)`` of the converted model fail where it worked before."""
    try:
        pickle.dumps(cls)
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    return cls


def _keep_original_init(model: nn.Module) -> None:
    """Give the transformers models in ``model`` an :class:`_InitAsOriginal`, where a norm
    converted from another class lies among their modules, and drop the original class from
    the twins outside them and outside diffusers models (whose norms unconvert gives their
    own classes back): nothing reads it there, and a class of a script's ``__main__`` would
    make ``torch.load`` of the saved model fail in any other process."""
    modeling = sys.modules.get("transformers.modeling_utils")  # (not imported: no transformers model)
    diffusers_modeling = sys.modules.get("diffusers.models.modeling_utils")
    recorded, transformers_models, library_models = [], [], []
    for module in model.modules():  # (one walk of a model of many layers, where it is one transformers model)
        if "_original_class" in module.__dict__:
            recorded.append(module)
        if modeling is not None and isinstance(module, modeling.PreTrainedModel):
            transformers_models.append(module)
            library_models.append(module)
        elif diffusers_modeling is not None and isinstance(module, diffusers_modeling.ModelMixin):
            library_models.append(module)
    if not recorded:
        return
    for module in transformers_models:
        if "_init_weights" not in module.__dict__:
            module._init_weights = _InitAsOriginal(module)
    if library_models and library_models[0] is model:
        return  # (every twin lies in it)
    read = set()
    for module in library_models:
        if id(module) not in read:  # (a model inside another: read already)
            read.update(map(id, module.modules()))
    for module in recorded:
        if id(module) not in read:
            del module.__dict__["_original_class"]


def convert(model: nn.Module, fuse: bool = False) -> nn.Module:
    """Replace every normalization layer of ``model`` (in place) that normlab can compute
    with its normlab twin, keeping parameters and buffers (the same objects, so device,
    dtype and an optimizer built on them too) and ``state_dict`` keys. Returns the model
    (the twin itself when ``model`` is one norm layer).

    Converted: torch.nn's norm classes and their subclasses that compute what torch.nn
    does; ConvNeXt's ``LayerNorm2d`` (torchvision, timm) as :class:`LayerNorm2d`;
    transformers' RMS norms (LLaMA, Mistral, Qwen, Gemma, T5, ...) as :class:`RMSNorm` with
    their casting recipe; their RMS norms without a weight (Llama 4, DeepSeek-V4, FalconMamba)
    as :class:`~normlab.torch.recipe_norms.UnweightedRMSNorm`; the layer norms Cohere, OLMo and
    DeBERTa compute in float32 as :class:`~normlab.torch.recipe_norms.RecipeLayerNorm`; VitDet's
    channels-first layer norm as :class:`~normlab.torch.modules.ChannelsFirstLayerNorm`; their gated
    RMS norms (Mamba2, FalconH1, Qwen3-Next, Bailing-Hybrid) as
    :class:`~normlab.torch.fused.GatedRMSNorm`; uninitialized lazy norms at their first forward
    (which itself runs torch's); PyG's ``InstanceNorm``, ``LayerNorm`` and ``GraphNorm`` as their
    :mod:`normlab.torch.geometric` twins. A subclass of a torch.nn norm whose forward computes
    something else, and any module named ``...Norm...`` (or ``..._norm``) that normlab does not
    recognize, is left alone, and one warning lists them. A converted subclass becomes the plain
    twin, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: its attributes carry over,
    its methods do not.

    The probes run once per call for each distinct norm (class, plain attributes, parameter
    shapes), not once per copy: a model's many copies of one norm cost one probe.

    ``fuse=True`` also fuses the residual adds of LLaMA-style pre-norm decoder layers, and
    of Gemma2/Gemma3's layers with a norm on each side of attention and MLP, into their RMS
    norms (:mod:`normlab.torch.fuse`); outputs and ``state_dict`` stay the same. A model
    holding no such layer (a diffusers model, a vision model, BERT, OLMo2's post-norm
    layers) is converted as without it, with a warning that nothing was fused.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> x = torch.randn(3, 4)
    >>> expected = model(x)
    >>> torch.allclose(convert(model)(x), expected, atol=1e-6), type(model[1]).__name__
    (True, 'LayerNorm')
    """
    held = _sharded_parameters(model)  # (one walk, for the fusing and the conversion)
    if fuse:
        from normlab.torch.fuse import FUSED_STRUCTURES, fuse_decoder_layers
        if not fuse_decoder_layers(model, held).found:
            warnings.warn(f"normlab.torch.convert(fuse=True) fused no layer of {type(model).__name__}, because it "
                          f"holds none that fuse=True rewrites ({FUSED_STRUCTURES}); its norms were converted as "
                          "convert(model) converts them: call that, without fuse=True, for this model", stacklevel=2)
    left_alone: dict[str, list[str]] = {}
    probed = {_SHARDED: held}  # (and the probes' outcomes: cached for this call only)
    converted = _convert(model, "", left_alone, {}, probed)
    _keep_original_init(converted)
    hooked = left_alone.pop(_HOOKED, None)
    sharded = left_alone.pop(_SHARDED, None)
    if left_alone:
        warnings.warn(f"normlab.torch.convert left {sum(map(len, left_alone.values()))} norm layer(s) unconverted, "
                      f"because their forward computes something no normlab module does: {_listed(left_alone)}",
                      stacklevel=2)
    if hooked:
        shown = _first_names(hooked)
        warnings.warn(f"normlab.torch.convert left {len(hooked)} norm layer(s) unconverted, because their forward is "
                      "replaced on the instance (as accelerate's hooks, with device_map or offloading, replace it), "
                      f"and that forward calls the original's code: {shown}; convert the model before adding such "
                      "hooks", stacklevel=2)
    if sharded:
        shown = _first_names(sharded)
        warnings.warn(f"normlab.torch.convert left {len(sharded)} norm layer(s) unconverted, because FSDP "
                      "(fully_shard) holds their parameters and swaps them on these modules around each call, which "
                      f"a twin in their place would not see: {shown}; convert the model before fully_shard",
                      stacklevel=2)
    return converted


_HOOKED = "<forward replaced on the instance>"
_SHARDED = "<parameters held by fully_shard>"


def _sharded_parameters(model: nn.Module) -> frozenset:
    """The ids of the parameters that FSDP2 (``fully_shard``) holds in ``model``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (not imported: nothing is sharded, and no import costs)
    if fsdp is None or not torch.distributed.is_initialized():
        # (transformers imports fsdp; fully_shard needs a process group, and without one no walk is spent)
        return frozenset()
    return frozenset(id(p) for module in model.modules() if isinstance(module, fsdp.FSDPModule)
                     for p in module.parameters())


def _listed(left_alone: dict) -> str:
    return "; ".join(f"{cls} ({_first_names(names)})" for cls, names in left_alone.items())


def _first_names(names: list) -> str:
    """The first three of the layers a warning names, then "...": ``"a, b, c, ..."``."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _convert(module: nn.Module, name: str, left_alone: dict, done: dict, probed: dict) -> nn.Module:
    """``module`` converted; ``done`` maps the id of each module seen to its result, so a
    module the model holds in several places (shared layers) becomes one twin there too."""
    if id(module) in done:
        return done[id(module)]
    replacement = _replacement(module, name or "<model>", left_alone, probed)
    if replacement is None:
        for child_name, child in list(module._modules.items()):  # (named_children() skips a repeated child)
            if child is None:
                continue
            converted = _convert(child, f"{name}.{child_name}" if name else child_name, left_alone, done, probed)
            if converted is not child:
                module.add_module(child_name, converted)
    elif replacement is not module:
        record_original(module, replacement)
    done[id(module)] = module if replacement is None else replacement
    return done[id(module)]


def _replacement(module: nn.Module, name: str, left_alone: dict, probed: dict) -> Optional[nn.Module]:
    """The twin of ``module``, or None to leave it (and look at its children); ``probed``
    caches what :func:`_decision` found per :func:`_probe_key`, and holds the ids of the
    parameters that fully_shard holds (``_SHARDED``)."""
    cls = type(module)
    if any(c.__module__.startswith("normlab.") for c in cls.__mro__):
        return None
    if "forward" in module.__dict__ and (isinstance(module, _NORM_BASES) or _normalizes_itself(module)):
        # a twin would copy that forward and run the original's code: nothing converted
        left_alone.setdefault(_HOOKED, []).append(f"{name} ({cls.__name__})")
        return module
    if (probed[_SHARDED] and any(id(p) in probed[_SHARDED] for p in module._parameters.values())
            and (isinstance(module, _NORM_BASES) or _normalizes_itself(module))):
        left_alone.setdefault(_SHARDED, []).append(f"{name} ({cls.__name__})")
        return module
    if cls in _TWINS:
        return twin_of(module, _TWINS[cls])
    pyg_twin = _PYG_TWINS.get(f"{cls.__module__}.{cls.__qualname__}")
    if pyg_twin is not None:
        from normlab.torch import geometric

        return twin_of(module, getattr(geometric, pyg_twin))
    if isinstance(module, LazyModuleMixin) and isinstance(module, _NormBase):
        return _convert_lazy(module)
    if cls.__module__.startswith("torch.") and not isinstance(module, _NORM_BASES):
        return None  # (Linear, Dropout, ...: no key to build)
    if any(is_lazy(t) for t in (*module._parameters.values(), *module._buffers.values())):
        # shapes that only its first forward infers (PyG's Linear(-1, ...)): nothing to probe
        if _normalizes_itself(module):
            left_alone.setdefault(cls.__name__, []).append(name)
            return module
        return None
    key = _probe_key(module)
    decision = probed.get(key, _UNSEEN) if key is not None else _UNSEEN
    if decision is _UNSEEN:
        decision = _decision(module)
        if key is not None:
            probed[key] = decision
    if decision is _LEFT_ALONE:
        left_alone.setdefault(cls.__name__, []).append(name)
        return module
    if decision is None:
        return None
    original = _named_class(cls.__bases__[0] if parametrize.is_parametrized(module) else cls)
    return twin_of(module, decision[0], **decision[1], **({} if original is None else {"_original_class": original}))


_UNSEEN, _LEFT_ALONE = object(), object()


def _decision(module: nn.Module):
    """``(twin class, attributes)`` for a module that normlab computes, ``_LEFT_ALONE`` for a
    norm it does not, None for any other module (whose children are looked at)."""
    cls = type(module)
    base = next((c for c in cls.__mro__ if c in _TWINS), None)
    if base is not None:
        if _redefines_what_forward_reads(module, base):
            return _LEFT_ALONE  # (the twin's class has torch.nn's, which its forward reads too)
        if cls.forward is not base.forward and _takes_more_than_the_input(cls):
            return _LEFT_ALONE  # (its callers may pass what the twin cannot take: a second input would be its mask)
        from normlab.torch.recipe_norms import (Float32LayerNorm, Float32LayerNorm2d, WrittenOutLayerNorm,
                                                written_out_layer_norm)

        if cls.forward is base.forward or _computes_like(module, base.forward, _probe_shapes(module, base)):
            if cls.forward is not base.forward and base is nn.LayerNorm:
                shape = _probe_shapes(module, base)[0]
                if _computes_in_float32(module, shape):
                    return Float32LayerNorm, {}  # (timm's LayerNormFp32: torch.nn's numbers in float64 only)
                if not _computes_in_half_as(module, base.forward, shape):
                    # (PocketTTS's flow-head norm, written out: another rounding and dtype in half precision)
                    written_out = lambda norm, x: written_out_layer_norm(  # noqa: E731
                        x, norm.weight, norm.bias, norm.eps, norm.elementwise_affine)
                    return ((WrittenOutLayerNorm, {}) if _computes_in_half_as(module, written_out, shape)
                            else _LEFT_ALONE)
            return _TWINS[base], {}
        if base is nn.GroupNorm and _computes_like(module, _per_frame_group_norm, [(2, module.num_channels, 3, 2, 2)]):
            # (diffusers' MiniMaxH3VideoGroupNorm: each frame of (N, C, T, H, W) on its own)
            from normlab.torch.recipe_norms import PerFrameGroupNorm

            return PerFrameGroupNorm, _attributes_of(PerFrameGroupNorm(
                module.num_groups, module.num_channels, eps=module.eps,
                affine=module._parameters.get("weight") is not None or module._parameters.get("bias") is not None,
                device="meta"))
        if base is nn.LayerNorm and _is_per_head_layer_norm(module):
            from normlab.torch.recipe_norms import PerHeadLayerNorm

            heads, head_dim = module.weight.shape  # (transformers' ChameleonLayerNorm)
            return PerHeadLayerNorm, _attributes_of(PerHeadLayerNorm(heads, head_dim, eps=module.eps, device="meta"))
        if base is nn.LayerNorm and len(module.normalized_shape) == 1:
            channels_first = (2, module.normalized_shape[0], 3, 2)
            if _computes_like(module, _channels_first_layer_norm, [channels_first]):
                return (Float32LayerNorm2d if _computes_in_float32(module, channels_first) else LayerNorm2d), {}
        if base is nn.LayerNorm and _computes_in_float32_on_float32_parameters(module, _probe_shapes(module, base)[0]):
            return Float32LayerNorm, {}  # (ESMFold2's: its float32 parameters alone, as the model keeps them)
        return _LEFT_ALONE
    if isinstance(module, _NORM_BASES):
        return _LEFT_ALONE
    if cls.__module__.startswith("torch."):
        return None
    if _takes_a_second_input(module):
        recipe = _gated_recipe(module)
        if recipe is not None:
            from normlab.torch.fused import GatedRMSNorm

            return GatedRMSNorm, recipe
        if _ignores_its_channel_dim(module):  # (LTX-2's PerChannelRMSNorm: its second argument goes unread)
            recipe = _unweighted_rms_recipe(module)
            if recipe is not None:
                from normlab.torch.recipe_norms import UnweightedRMSNorm

                return UnweightedRMSNorm, recipe
    else:
        from normlab.torch.recipe_norms import (BiasedRMSNorm, GammaRMSNorm, RecipeLayerNorm, RMSNorm2d,
                                                UnweightedRMSNorm)

        for twin, probe in ((RMSNorm, _rms_recipe), (BiasedRMSNorm, _biased_rms_recipe),
                            (GammaRMSNorm, _gamma_rms_recipe),
                            (RecipeLayerNorm, _layer_norm_recipe), (UnweightedRMSNorm, _unweighted_rms_recipe),
                            (RMSNorm2d, _channels_first_rms_recipe)):
            recipe = probe(module)
            if recipe is not None:
                return twin, recipe
        if _is_channels_first_layer_norm(module):
            return ChannelsFirstLayerNorm, {}  # (no nn.LayerNorm, as the original is none)
        merged_heads = _multi_head_layer_norm_attributes(module)  # (transformers' xLSTMMultiHeadLayerNorm)
        if merged_heads is not None:
            from normlab.torch.recipe_norms import MultiHeadLayerNorm

            return MultiHeadLayerNorm, merged_heads
    return _LEFT_ALONE if _normalizes_itself(module) else None


# "Norm" but not "Normal..."; also a lowercase "norm" ending a word (diffusers' WanRMS_norm,
# QwenImageRMS_norm, transformers' AutoformerLayernorm), not "Unnormed" or "Polynormer"
_NORM_NAME = re.compile(r"Norm(?!al)|norm(?![a-z])")


def _biased_rms_recipe(module: nn.Module) -> Optional[dict]:
    return _rms_recipe(module, with_bias=True)


def _gamma_rms_recipe(module: nn.Module) -> Optional[dict]:
    return _rms_recipe(module, weight_name="gamma")


def _named_like_a_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_BASES) or _NORM_NAME.search(type(module).__name__) is not None


def _normalizes_itself(module: nn.Module) -> bool:
    """Whether a layer named like a norm computes a norm itself: it has no parts, or it holds
    parameters, buffers or an ``eps`` of its own and none of its parts is named like a norm
    (PyG's ``HeteroBatchNorm``, whose part is an aggregation; diffusers' ``AdaGroupNorm``, whose
    part is the ``Linear`` of its modulation and whose forward calls ``F.group_norm`` with its
    ``eps``). A block whose parameters all lie in its parts (``AdaLayerNormZero``, Wav2Vec2's
    ``NoLayerNormConvLayer``, RoBERTa-PreLayerNorm's layers) is looked into instead."""
    if _NORM_NAME.search(type(module).__name__) is None:
        return False
    if next(module.children(), None) is None:
        return True
    own_eps = isinstance(getattr(module, "eps", None), float)
    return bool(module._parameters or module._buffers or own_eps) and not any(
        _named_like_a_norm(part) for part in module.modules() if part is not module)


@_on_cpu
def _computes_in_float32(module: nn.Module, shape: tuple) -> bool:
    """Whether ``type(module).forward`` computes bfloat16 and float16 input, and parameters
    of another dtype than the input, by upcasting everything to float32 and casting its
    output back to the input's dtype once (timm's ``LayerNormFp32`` and ``LayerNorm2dFp32``,
    diffusers' ``FP32LayerNorm``): on a probe of ``shape``, each such call gives, to the bit,
    its own float32 output and input gradient on the upcast values. The gradient tells a
    norm without parameters from torch's own half-precision layer norm, whose forward
    rounds the same way in bfloat16 but whose backward does not."""
    generator = torch.Generator().manual_seed(0)
    parameters = {name: None if p is None else torch.randn(p.shape, generator=generator) * 0.5 + 1
                  for name, p in module._parameters.items()}
    x = torch.randn(shape, generator=generator) * 2 + 1
    grad = torch.randn(shape, generator=generator)

    def forward(x_dtype, w_dtype, upcast: bool) -> Optional[tuple[Tensor, Tensor]]:
        """The forward on the probe's values rounded to these dtypes (and then upcast), and
        the gradient of its input."""
        def rounded(t: Tensor, dtype) -> Tensor:
            return t.to(dtype).float() if upcast else t.to(dtype)

        tensors = {"parameters": {k: None if p is None else rounded(p, w_dtype) for k, p in parameters.items()},
                   "buffers": {}}
        try:
            with torch.inference_mode(False), torch.enable_grad():
                probe = rounded(x, x_dtype).requires_grad_()
                output = type(module).forward(_probe_copy(module, tensors), probe)
                output.backward(rounded(grad, x_dtype))
            return output.detach(), probe.grad
        except Exception:  # (one that raises on a dtype mix does not upcast)
            return None

    mixes = ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
             (torch.float32, torch.bfloat16))
    for x_dtype, w_dtype in mixes if any(p is not None for p in parameters.values()) else mixes[:2]:
        low, high = forward(x_dtype, w_dtype, upcast=False), forward(x_dtype, w_dtype, upcast=True)
        if not (low is not None and high is not None and all(
                isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == x_dtype and torch.equal(a, b.to(x_dtype))
                for a, b in zip(low, high))):
            return False
    return True


# what torch.nn's norm forwards read on the module: its state, and the methods they call
# (which ranks they take, where the channels are, how an unbatched input is normalized)
_FORWARD_READS = ("weight", "bias", "eps", "momentum", "training", "track_running_stats", "running_mean",
                  "running_var", "num_batches_tracked", "normalized_shape", "elementwise_affine", "affine",
                  "num_features", "num_groups", "num_channels", "_check_input_dim", "_check_non_zero_input_channels",
                  "_get_no_batch_dim", "_handle_no_batch_input", "_apply_instance_norm")


def _redefines_what_forward_reads(module: nn.Module, base: type) -> bool:
    """Whether ``type(module)`` defines, below ``base``, a method or property that torch.nn's
    forward reads on the module (a ``_check_input_dim`` that takes another rank, a
    ``weight`` computed from another parameter, an ``eps`` property): the twin's class has
    torch.nn's instead, and would compute otherwise, or refuse, on inputs no probe can
    foresee. The properties of ``torch.nn.utils.parametrize`` are not counted: the twin
    gets them too (:func:`twin_of`)."""
    parametrized = set(module.parametrizations) if parametrize.is_parametrized(module) else ()
    for cls in type(module).__mro__:
        if cls is base:
            return False
        if any(name not in parametrized and hasattr(vars(cls).get(name), "__get__") for name in _FORWARD_READS):
            return True  # (a plain class value is harmless: torch.nn's __init__ shadows it on the instance)
    return False


def _takes_more_than_the_input(cls: type) -> bool:
    """Whether ``cls.forward`` takes anything besides the input (transformers'
    ``PeAudioMaskedGroupNorm`` takes a ``padding_mask``, ``Emu3VQVAEGroupNorm`` a
    ``quant_states`` passed by position): the twins' forward takes the input and a ``mask``."""
    try:
        return len(inspect.signature(cls.forward).parameters) > 2  # (self, input)
    except (TypeError, ValueError):
        return True


_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}


def _probe_key(module: nn.Module) -> Optional[tuple]:
    """What the probes' outcome for a module without children depends on: its class, its
    own plain attributes (eps, sizes, names, flags), and the names, shapes, dtypes and
    devices of its parameters and buffers (the probes replace their values with random
    ones). None, so that it is probed on its own, where an attribute is anything else (a
    forward might read an object in ways no key captures) or it has children. A model's
    many copies of one norm are then probed once: the probes take about a millisecond each.
    """
    if module._modules:
        return None
    attributes = []
    for name, value in module.__dict__.items():
        if name not in _MODULE_INTERNALS:
            plain = _plain(value)
            if plain is None:
                return None
            attributes.append((name, plain))
    tensors = tuple((kind, name, None if t is None else (tuple(t.shape), t.dtype, t.device.type))
                    for kind, table in (("parameter", module._parameters), ("buffer", module._buffers))
                    for name, t in table.items())
    return (type(module), tuple(sorted(attributes, key=lambda item: item[0])), tensors,
            tuple(sorted(module._non_persistent_buffers_set)))


def _plain(value) -> Optional[tuple]:
    """``value`` tagged with its type when it is a number, string, dtype, None, or a tuple or
    list of those; None otherwise."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return type(value), value
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(item) for item in value)
        return None if any(item is None for item in items) else (type(value), items)
    return None


def _convert_lazy(module: nn.Module) -> nn.Module:
    """A lazy norm stays lazy: torch swaps its class for ``cls_to_become`` when the first
    forward has inferred the channels; point that at the normlab twin. torch's own lazy
    classes become their :class:`_LazyTwin`, so that the first forward, which is the class's
    as the call begins, is the twin's too (``mask=`` included)."""
    twin = _TWINS.get(module.cls_to_become)
    if twin is not None:
        module.cls_to_become = twin
        twin._init_spec(module)  # the attributes the twin's forward needs, set before the swap
        module.__class__ = _LAZY_TWINS.get(type(module), type(module))
    return module


class _LazyTwin:
    """Mixin of a torch lazy norm that :func:`convert` met before its first forward: that
    forward is the twin's, and torch's lazy hook, which infers the channels, then makes the
    module its ``cls_to_become``, the twin. Only the forward: with the twin among its bases,
    ``isinstance(m, nn.BatchNorm2d)`` would hold of the uninitialized module (torch's lazy
    class is no ``nn.BatchNorm2d``), and a model's init loop would touch its parameters."""

    def forward(self, *args, **kwargs):
        # (bound as the call begins; by the time it runs, the hook has made the module the twin)
        if type(self) is self.cls_to_become:
            return self.cls_to_become.forward(self, *args, **kwargs)
        return super().forward(*args, **kwargs)  # (called without the hook: torch's, and its error)

    def initialize_parameters(self, input: Tensor, mask: Optional[Tensor] = None) -> None:
        # (torch's lazy hook hands it the forward's arguments: mask= too, which the channels ignore)
        super().initialize_parameters(input)


# one class per torch lazy norm, named as torch's and found here by pickle
_LAZY_TWINS = {lazy: type(lazy.__name__, (_LazyTwin, lazy), {"__module__": __name__})
               for lazy in (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d, nn.LazyInstanceNorm1d,
                            nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d)}
globals().update((lazy.__name__, cls) for lazy, cls in _LAZY_TWINS.items())


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


def _is_channels_first_layer_norm(module: nn.Module) -> bool:
    """A layer norm over the channels of ``(N, C, H, W)`` input that is no ``nn.LayerNorm``
    (transformers' ``VitDetLayerNorm``): a ``weight`` and ``bias`` of shape ``(C,)``, a
    ``normalized_shape`` of ``(C,)`` and an ``eps``, no buffers or children, and a forward
    that gives torch's channels-first layer norm on float64 probes (to float tolerance:
    its own operation sequence may round otherwise)."""
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    shape, eps = getattr(module, "normalized_shape", None), getattr(module, "eps", None)
    if (set(module._parameters) != {"weight", "bias"} or weight is None or bias is None or weight.dim() != 1
            or bias.shape != weight.shape or not isinstance(shape, tuple) or shape != tuple(weight.shape)
            or module._buffers or list(module.children()) or not isinstance(eps, float)):
        return False
    return _computes_like(module, _channels_first_layer_norm, [(2, shape[0], 3, 2)])


def _per_frame_group_norm(module: nn.Module, x: Tensor) -> Tensor:
    """Group norm of each frame of ``(N, C, T, H, W)`` input on its own: the time axis folded
    into the batch, as diffusers' ``MiniMaxH3VideoGroupNorm`` folds it."""
    n, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(n * t, c, h, w)
    y = F.group_norm(frames, module.num_groups, module.weight, module.bias, module.eps)
    return y.reshape(n, t, c, h, w).transpose(1, 2).contiguous()


def _attributes_of(built: nn.Module) -> dict:
    return {key: value for key, value in built.__dict__.items() if key not in _MODULE_INTERNALS}


def _is_per_head_layer_norm(module: nn.Module) -> bool:
    """An ``nn.LayerNorm`` normalizing the last axis alone, ``normalized_shape`` ``(D,)``,
    with a weight and bias of shape ``(H, D)``, one per head, multiplied and added after
    torch's layer norm (transformers' ``ChameleonLayerNorm``), on float64 probes."""
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    shape = getattr(module, "normalized_shape", None)
    if (set(module._parameters) != {"weight", "bias"} or weight is None or bias is None or weight.dim() != 2
            or bias.shape != weight.shape or shape != tuple(weight.shape[-1:]) or module._buffers):
        return False
    return _computes_like(module, _per_head_layer_norm, [(3, *weight.shape), (2, 3, *weight.shape)])


def _per_head_layer_norm(module: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], None, None, module.eps) * module.weight + module.bias


def _multi_head_layer_norm_attributes(module: nn.Module) -> Optional[dict]:
    """The :class:`~normlab.torch.recipe_norms.MultiHeadLayerNorm` attributes of a layer norm
    of each head of ``(batch, sequence, heads, head_dim)`` input that returns the heads merged
    and then applies a weight (and a bias) over the merged axis (transformers'
    ``xLSTMMultiHeadLayerNorm``): int ``num_heads`` and ``head_dim``, a float ``eps``, a 1-D
    weight of ``num_heads · head_dim`` (and a bias of its shape, or None), no buffers or children; found on float64 probes, and
    bit for bit in half precision with the reductions in float32 or in the input's dtype
    (its ``force_float32_reductions``, tried first). None for any other module."""
    from normlab.torch.recipe_norms import MultiHeadLayerNorm, multi_head_layer_norm

    heads, head_dim, eps = (getattr(module, name, None) for name in ("num_heads", "head_dim", "eps"))
    weight, bias = module._parameters.get("weight"), getattr(module, "bias", None)  # (xLSTM's: a plain None)
    if (not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (heads, head_dim))
            or not isinstance(eps, float) or set(module._parameters) - {"bias"} != {"weight"} or weight is None
            or (bias is not None and module._parameters.get("bias") is not bias)
            or tuple(weight.shape) != (heads * head_dim,) or (bias is not None and bias.shape != weight.shape)
            or module._buffers or module._modules):
        return None
    shape = (2, 3, heads, head_dim)
    if not _computes_like(module, _merged_heads_layer_norm, [shape]):
        return None
    stated = getattr(module, "force_float32_reductions", True)
    for in_float32 in dict.fromkeys((bool(stated), True, False)):
        recipe = lambda norm, x: multi_head_layer_norm(x, norm.weight, norm.bias, norm.eps, in_float32)  # noqa: E731
        if _computes_in_half_as(module, recipe, shape):
            return _attributes_of(MultiHeadLayerNorm(heads, head_dim, eps, use_bias=bias is not None,
                                                     force_float32_reductions=in_float32, device="meta"))
    return None


def _merged_heads_layer_norm(module: nn.Module, x: Tensor) -> Tensor:
    y = F.layer_norm(x, x.shape[-1:], None, None, module.eps).reshape(*x.shape[:-2], -1) * module.weight
    return y if module.bias is None else y + module.bias


def _channels_first_layer_norm(module: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, module.weight, module.bias,
                        module.eps).permute(0, 3, 1, 2)


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
