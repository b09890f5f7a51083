"""torch.ao's eager-mode module fusion and quantization for the twins: both find their
entries by exact type, so each of torch's entries that names a norm class gains one
naming normlab's twin.

The fuser hands torch's own fuser a torch.nn batch norm sharing the twin's parameters and
buffers, so ``fuse_modules(model, [["conv", "bn"]])`` folds a converted model's batch norm
into its convolution exactly as it does torch.nn's (QAT's ``ConvBn2d`` included). In
``prepare`` and ``convert`` (post-training static quantization) a twin is observed and
becomes the quantized module its torch.nn class becomes (``torch.ao.nn.quantized.BatchNorm2d``,
``LayerNorm``, ``GroupNorm``, ``InstanceNorm*d``), which reads its attributes as the
original's.
"""

from __future__ import annotations

from torch import nn

from normlab.torch.conversion import rebind_hooks
from normlab.torch.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d,
                                   InstanceNorm3d, LayerNorm)

_TORCH_CLASSES = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}
# the twins that compute what their torch.nn class computes (LayerNorm2d does not: not nn.LayerNorm's)
_QUANTIZABLE = {**_TORCH_CLASSES, LayerNorm: nn.LayerNorm, GroupNorm: nn.GroupNorm, InstanceNorm1d: nn.InstanceNorm1d,
                InstanceNorm2d: nn.InstanceNorm2d, InstanceNorm3d: nn.InstanceNorm3d}


def as_torch(module: nn.Module) -> nn.Module:
    """``module`` as its torch.nn class, sharing its Parameter and buffer objects (other
    modules come back as they are).

    >>> bn = BatchNorm2d(3)
    >>> type(as_torch(bn)) is nn.BatchNorm2d, as_torch(bn).weight is bn.weight
    (True, True)
    """
    cls = _TORCH_CLASSES.get(type(module))
    if cls is None:
        return module
    original = cls.__new__(cls)
    original.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(original, name, type(getattr(module, name))(getattr(module, name)))
    del original.__dict__["_spec"]
    return original


def _with_torch_modules(fuser):
    def fuse(is_qat, *modules):
        originals = [as_torch(m) for m in modules]
        fused = fuser(is_qat, *originals)
        kept = {id(m) for m in fused.modules()}
        for module, original in zip(modules, originals):
            # the twin is replaced now: where the fused module keeps the torch.nn batch norm (QAT's
            # ConvBn2d), its hooks go with it; folded in evaluation, it is gone, and the twin (which a
            # caller may still hold) keeps them
            if original is not module and id(original) in kept:
                rebind_hooks(module, original)
        return fused

    return fuse


def register_fusers() -> None:
    """Add the twins to torch.ao's table of fusers (idempotent)."""
    from torch.ao.quantization import fuser_method_mappings

    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    twins = {torch_class: twin for twin, torch_class in _TORCH_CLASSES.items()}
    for ops, fuser in list(table.items()):
        if any(op in twins for op in ops):
            table.setdefault(tuple(twins.get(op, op) for op in ops), _with_torch_modules(fuser))


def register_quantized_twins() -> None:
    """Give each twin its torch.nn class's quantized module in torch.ao's table for
    post-training static quantization (idempotent); ``prepare`` attaches observers to the
    classes of that table."""
    from torch.ao.quantization import quantization_mappings

    table = quantization_mappings.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS
    for twin, torch_class in _QUANTIZABLE.items():
        if torch_class in table:
            table.setdefault(twin, table[torch_class])
