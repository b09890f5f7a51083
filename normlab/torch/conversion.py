"""convert(): swap a model's torch.nn norm layers for their normlab twins."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from normlab import core
from normlab.errors import InputError, ParamsError, ShapeError
from normlab.notation import parse_params, parse_pattern
from normlab.plan import make_plan
from normlab.torch.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                                   InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)
from normlab.torch.sync import SyncBatchNorm

_TWINS = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm, nn.RMSNorm: RMSNorm,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}


def twin_of(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance holding ``module``'s attributes, sharing its Parameter and buffer
    objects (so an optimizer built on the old model keeps working)."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(twin, name, type(getattr(module, name))(getattr(module, name)))
    if cls is SyncBatchNorm and not hasattr(twin, "process_group"):
        twin.process_group = None
    twin._init_spec()
    return twin


def convert(model: nn.Module, fuse: bool = False) -> nn.Module:
    """Replace every ``torch.nn`` normalization layer of ``model`` (in place) with its
    normlab twin, keeping parameters and buffers (same objects, so device and dtype too).
    Returns the model (the twin itself when ``model`` is one norm layer).

    ``fuse=True`` also fuses the residual adds of LLaMA-style pre-norm decoder layers into
    their RMS norms (:mod:`normlab.torch.fuse`); outputs and ``state_dict`` stay the same.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> x = torch.randn(3, 4)
    >>> expected = model(x)
    >>> torch.allclose(convert(model)(x), expected, atol=1e-6), type(model[1]).__name__
    (True, 'LayerNorm')
    """
    if fuse:
        from normlab.torch.fuse import fuse_decoder_layers; fuse_decoder_layers(model)  # noqa: E702
    cls = _TWINS.get(type(model))
    if cls is not None:
        return twin_of(model, cls)
    for name, child in model.named_children():
        converted = convert(child)
        if converted is not child:
            model.add_module(name, converted)
    return model
