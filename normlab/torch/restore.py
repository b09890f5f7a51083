"""unconvert(): a converted model's twins back to the classes they were converted from.

For the tools that find layers by their exact class and keep their tables where normlab
cannot add to them. FX graph mode quantization (``prepare_fx``, ``prepare_qat_fx``,
``convert_fx``, ``fuse_fx``) builds its patterns afresh on every call from a backend
configuration that names torch.nn's classes: a twin matches none, so it would be left in
float, its batch norm unfolded (each twin warns of it as ``prepare_fx`` or ``fuse_fx`` traces it). ``unconvert(model)`` first gives those tools
torch.nn's classes, holding the same Parameter and buffer objects, attributes and hooks.

Each twin of a torch.nn class becomes that class, except an :class:`~normlab.torch.RMSNorm`
with a casting recipe or ``weight_offset``, which torch.nn.RMSNorm does not compute; a norm
that :func:`~normlab.torch.convert` converted from a transformers or diffusers model's own
class (``LlamaRMSNorm``, a gated norm, diffusers' ``RMSNorm``, ...) becomes that class again,
and so do the decoder layers that ``convert(model, fuse=True)`` fused and their fused norms
(their own forward again, and the model's ``_no_split_modules`` naming them as before); a twin
of PyG's ``InstanceNorm``, ``LayerNorm`` or ``GraphNorm`` becomes PyG's class (PyG imported
then, where one is found). The rest (``Norm``, ``LayerNorm2d``, the fused blocks made by hand,
``normlab.torch.geometric.BatchNorm``, the PyG twins where PyG is not installed) stay, and one
warning lists them.
"""

from __future__ import annotations

import importlib
import warnings

from torch import nn
from torch.nn.utils import parametrize

from normlab.torch.conversion import _InitAsOriginal, _PYG_TWINS, _TWINS, _first_names, twin_of
from normlab.torch.fused import FusedAddRMSNorm
from normlab.torch.modules import RMSNorm

__all__ = ["unconvert"]

_TORCH_CLASSES = {twin: torch_class for torch_class, twin in _TWINS.items()}
# what the twins keep beside torch.nn's attributes: the spec, the per-shape caches
# (``_normlab_*``), the class a transformers norm was converted from and what convert recorded of
# the original (conversion.record_original), the RMS recipe
_TWIN_STATE = ("_spec", "_spec_source", "_original_class", "_original_state", "casting", "weight_offset")
# what a FusedAddRMSNorm holds beside them that the norm it was fused from did not (where it
# carries no record of that norm: made by an earlier normlab)
_FUSED_STATE = ("hidden_size", "_block", "_block_shape")


def unconvert(model: nn.Module) -> nn.Module:
    """Replace every twin in ``model`` (in place) with the class it was converted from, or
    with its torch.nn class; returns the model (the restored module itself when ``model`` is
    one twin). Parameters, buffers, attributes and hooks are kept, the same objects, so an
    optimizer built on the converted model keeps training the restored one.

    >>> from normlab.torch import convert
    >>> model = convert(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
    >>> weight = model[1].weight
    >>> model = unconvert(model)
    >>> type(model[1]) is torch.nn.LayerNorm, model[1].weight is weight
    (True, True)
    """
    left: list[str] = []
    fused_names = {type(m).__name__: m._unfused_class.__name__ for m in model.modules()
                   if getattr(type(m), "_unfused_class", None) is not None}
    restored = _unconvert(model, "", left, {})
    if fused_names:
        _split_as_before(restored, fused_names)
    for module in restored.modules():
        init = module.__dict__.get("_init_weights")
        if isinstance(init, _InitAsOriginal) and not any("_original_class" in m.__dict__ for m in module.modules()):
            del module.__dict__["_init_weights"]  # (convert's stand-in: no converted norm left to initialize)
    if left:
        warnings.warn(f"normlab.torch.unconvert left {len(left)} module(s) as they are, which have no class of "
                      f"torch.nn or of the model to go back to: {_first_names(left)}", stacklevel=2)
    return restored


def _unconvert(module: nn.Module, name: str, left: list, done: dict) -> nn.Module:
    if id(module) in done:  # (a module held in several places: one restored module in all of them)
        return done[id(module)]
    original = _original_of(module)
    if original is not None:
        restored = twin_of(module, original)
        record = module.__dict__.get("_original_state")  # (what convert recorded of the original)
        added = record["added"] if record is not None else _FUSED_STATE if isinstance(module, FusedAddRMSNorm) else ()
        for key in [key for key in restored.__dict__
                    if key in _TWIN_STATE or key in added or key.startswith("_normlab")]:
            del restored.__dict__[key]
        if record is not None:
            for key, value in record["dropped"].items():
                restored.__dict__.setdefault(key, value)
            for table, names in ((restored._parameters, record["parameters"]), (restored._buffers, record["buffers"])):
                for key in [key for key, value in table.items() if value is None and key not in names]:
                    del table[key]  # (the twin's ``bias = None`` where the original registered none)
        if "variance_epsilon" in restored.__dict__:  # (the original's name for eps, which may have changed since)
            restored.__dict__["variance_epsilon"] = module.eps
    else:
        restored = module
        cls = _class_of(module)
        unfused = getattr(cls, "_unfused_class", None)  # (a decoder layer convert(model, fuse=True) fused)
        if unfused is not None:
            norms = [child for child in module.children() if isinstance(child, FusedAddRMSNorm)]
            if cls is type(module) and all(_original_of(norm) is not None for norm in norms):
                module.__class__ = unfused  # (its own forward again; its norms become their classes below)
            else:  # (its fused forward calls norm(x, residual), which only its FusedAddRMSNorms take)
                left.append(f"{name or '<model>'} ({cls.__name__})")
                done.update((id(norm), norm) for norm in norms)
        elif cls.__module__.startswith("normlab."):
            left.append(f"{name or '<model>'} ({cls.__name__})")
        for child_name, child in list(module._modules.items()):
            if child is not None:
                replacement = _unconvert(child, f"{name}.{child_name}" if name else child_name, left, done)
                if replacement is not child:
                    module.add_module(child_name, replacement)
    done[id(module)] = restored
    return restored


def _split_as_before(model: nn.Module, fused_names: dict) -> None:
    """The ``_no_split_modules`` that convert(model, fuse=True) rewrote to name the fused
    layers' classes name their own classes again, where no fused layer of that class is left."""
    present = {type(module).__name__ for module in model.modules()}
    for module in model.modules():
        names = module.__dict__.get("_no_split_modules")
        if not isinstance(names, (list, tuple, set)) or not set(fused_names) & set(names):
            continue
        kept = []
        for name in names:
            name = fused_names[name] if name in fused_names and name not in present else name
            if name not in kept:
                kept.append(name)
        module._no_split_modules = type(names)(kept)


def _class_of(module: nn.Module) -> type:
    """The module's class, before torch.nn.utils.parametrize made a subclass of it."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _original_of(module: nn.Module):
    """The class ``module`` becomes, or None to leave it."""
    cls = _class_of(module)
    if cls is FusedAddRMSNorm:
        # (the class of the norm that convert(model, fuse=True) fused, recorded inside a transformers model)
        return module.__dict__.get("_original_class")
    recorded = module.__dict__.get("_original_class")
    if recorded is not None:
        return recorded
    if cls is RMSNorm and (getattr(module, "casting", None) is not None or getattr(module, "weight_offset", 0.0)):
        return None  # (a recipe torch.nn.RMSNorm does not compute)
    if cls.__module__ == "normlab.torch.geometric":
        return _pyg_class(cls)
    return _TORCH_CLASSES.get(cls)


def _pyg_class(cls: type):
    """PyG's class that a twin of :mod:`normlab.torch.geometric` was converted from (the one
    of its name), or None where PyG is not installed or convert makes no such twin."""
    for full_name, twin_name in _PYG_TWINS.items():
        if twin_name == cls.__name__:
            module_name, _, class_name = full_name.rpartition(".")
            try:
                return getattr(importlib.import_module(module_name), class_name)
            except ImportError:
                return None
    return None
