"""One table of named norms: each as a normlab pattern, as a normlab.functional call and as
its PyTorch counterpart (the oracle). Parity tests iterate over it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from normlab import functional as NF


@dataclass(frozen=True)
class NamedNorm:
    name: str
    shape: tuple[int, ...]
    pattern: str
    params: str | None
    torch_fn: Callable  # (x, weight, bias, eps) -> y, all torch tensors
    numpy_fn: Callable  # (x, weight, bias, eps) -> y through normlab.functional
    sizes: dict = field(default_factory=dict)
    rms: bool = False
    param_shape: tuple[int, ...] = ()
    has_bias: bool = True


def _torch_batch_norm(x, w, b, eps):
    import torch.nn.functional as F

    return F.batch_norm(x, None, None, w, b, training=True, eps=eps)


def _torch_channels_last_batch_norm(x, w, b, eps):
    import torch.nn.functional as F

    moved = x.movedim(-1, 1)
    return F.batch_norm(moved, None, None, w, b, training=True, eps=eps).movedim(1, -1)


def _torch_layer_norm(k):
    def run(x, w, b, eps):
        import torch.nn.functional as F

        return F.layer_norm(x, x.shape[-k:], w, b, eps)

    return run


def _torch_group_norm(groups):
    def run(x, w, b, eps):
        import torch.nn.functional as F

        return F.group_norm(x, groups, w, b, eps)

    return run


def _torch_instance_norm(x, w, b, eps):
    import torch.nn.functional as F

    return F.instance_norm(x, weight=w, bias=b, eps=eps)


def _torch_rms_norm(x, w, b, eps):
    import torch.nn.functional as F

    return F.rms_norm(x, x.shape[-1:], w, eps)


def _np_batch_norm(axis=1):
    def run(x, w, b, eps):
        return NF.batch_norm(x, None, None, w, b, training=True, eps=eps, axis=axis)

    return run


NAMED_NORMS = [
    NamedNorm("batch norm 1-D", (8, 5), "[b] c", "c", _torch_batch_norm, _np_batch_norm(), param_shape=(5,)),
    NamedNorm("batch norm 1-D with length", (6, 5, 7), "[b] c [l]", "c", _torch_batch_norm, _np_batch_norm(),
              param_shape=(5,)),
    NamedNorm("batch norm 2-D", (4, 3, 5, 6), "[b] c [h w]", "c", _torch_batch_norm, _np_batch_norm(),
              param_shape=(3,)),
    NamedNorm("batch norm 3-D", (2, 3, 4, 3, 5), "[b] c [d h w]", "c", _torch_batch_norm, _np_batch_norm(),
              param_shape=(3,)),
    NamedNorm("batch norm channels-last", (4, 5, 6, 3), "[b h w] c", "c", _torch_channels_last_batch_norm,
              _np_batch_norm(axis=-1), param_shape=(3,)),
    NamedNorm("layer norm NLP", (4, 6, 10), "b t [d]", "d", _torch_layer_norm(1),
              lambda x, w, b, eps: NF.layer_norm(x, 10, w, b, eps), param_shape=(10,)),
    NamedNorm("layer norm vision", (3, 4, 5, 6), "b [c h w]", "c h w", _torch_layer_norm(3),
              lambda x, w, b, eps: NF.layer_norm(x, (4, 5, 6), w, b, eps), param_shape=(4, 5, 6)),
    NamedNorm("layer norm vision per channel", (3, 4, 5, 6), "b [c h w]", "c", _torch_group_norm(1),
              lambda x, w, b, eps: NF.group_norm(x, 1, w, b, eps), param_shape=(4,)),
    NamedNorm("instance norm", (3, 4, 5, 6), "b c [h w]", "c", _torch_instance_norm,
              lambda x, w, b, eps: NF.instance_norm(x, weight=w, bias=b, eps=eps), param_shape=(4,)),
    NamedNorm("group norm", (3, 8, 5, 6), "b (g [c]) [h w]", "(g c)", _torch_group_norm(4),
              lambda x, w, b, eps: NF.group_norm(x, 4, w, b, eps), sizes={"g": 4}, param_shape=(8,)),
    NamedNorm("RMS norm", (4, 6, 10), "b t [d]", "d", _torch_rms_norm,
              lambda x, w, b, eps: NF.rms_norm(x, 10, w, eps), rms=True, param_shape=(10,), has_bias=False),
]


def random_inputs(case: NamedNorm, dtype, seed: int = 0):
    """Input, weight, bias (None for RMS) and an output gradient, with a nonzero mean."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(case.shape) * 2 + 0.5).astype(dtype)
    weight = (rng.standard_normal(case.param_shape) + 1).astype(dtype)
    bias = rng.standard_normal(case.param_shape).astype(dtype) if case.has_bias else None
    grad_y = rng.standard_normal(case.shape).astype(dtype)
    return x, weight, bias, grad_y
