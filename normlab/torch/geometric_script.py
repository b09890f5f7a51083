"""The forwards that ``torch.jit.script`` compiles for :mod:`normlab.torch.geometric`'s
twins: PyG's own definitions in plain torch operations (``scatter_add`` for its scatter),
because TorchScript cannot call normlab's kernels, and what ONNX export records (ONNX has no normlab
op). Eager calls never come here."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _counts(x: Tensor, batch: Tensor, batch_size: int) -> Tensor:
    """Nodes per graph as a column of x's dtype, at least 1 (PyG's ``degree(...).clamp_(min=1)``)."""
    ones = torch.ones(batch.shape, dtype=x.dtype, device=x.device)
    return torch.zeros(batch_size, dtype=x.dtype, device=x.device).scatter_add(0, batch, ones).clamp(min=1).view(-1, 1)


def _segment_sum(x: Tensor, batch: Tensor, batch_size: int) -> Tensor:
    # (scatter_add, as PyG's scatter: ONNX export takes it; index_add with repeated ids it
    # refuses, or exports wrong in place. Its ids in int64: torch's scatter_add differentiates
    # int32 ids to zero gradients, where the eager twins take them)
    index = batch.long().view(-1, 1).expand(x.shape)
    return torch.zeros((batch_size, x.size(1)), dtype=x.dtype, device=x.device).scatter_add(0, index, x)


def _size(batch: Tensor, batch_size: Optional[int]) -> int:
    return int(batch.max()) + 1 if batch_size is None else batch_size


def instance_norm(x: Tensor, batch: Optional[Tensor], batch_size: Optional[int], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                  track_running_stats: bool, momentum: float, eps: float) -> Tensor:
    """PyG's InstanceNorm; the running statistics are updated in place."""
    use_input_stats = training or not track_running_stats
    if batch is None:
        out = F.instance_norm(x.t().unsqueeze(0), running_mean, running_var, weight, bias, use_input_stats, momentum,
                              eps)
        return out.squeeze(0).t()
    size = _size(batch, batch_size)
    if use_input_stats:
        norm = _counts(x, batch, size)
        mean = _segment_sum(x, batch, size) / norm
        x = x - mean.index_select(0, batch)
        var = _segment_sum(x * x, batch, size)
        unbiased_var = var / (norm - 1).clamp_(min=1)
        var = var / norm
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean.detach().mean(0))
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(momentum * unbiased_var.detach().mean(0))
    else:
        assert running_mean is not None and running_var is not None
        x = x - running_mean.view(1, -1)
        var = running_var.view(1, -1).expand(size, -1)
    out = x / (var + eps).sqrt().index_select(0, batch)
    if weight is not None and bias is not None:
        out = out * weight.view(1, -1) + bias.view(1, -1)
    return out


def layer_norm(x: Tensor, batch: Optional[Tensor], batch_size: Optional[int], weight: Optional[Tensor],
               bias: Optional[Tensor], in_channels: int, mode: str, eps: float) -> Tensor:
    """PyG's LayerNorm, both modes."""
    if mode == "graph":
        if batch is None:
            x = x - x.mean()
            out = x / (x.std(unbiased=False) + eps)
        else:
            size = _size(batch, batch_size)
            norm = _counts(x, batch, size) * x.size(-1)
            mean = _segment_sum(x, batch, size).sum(dim=-1, keepdim=True) / norm
            x = x - mean.index_select(0, batch)
            var = _segment_sum(x * x, batch, size).sum(dim=-1, keepdim=True) / norm
            out = x / (var + eps).sqrt().index_select(0, batch)
        if weight is not None and bias is not None:
            out = out * weight + bias
        return out
    if mode == "node":
        return F.layer_norm(x, (in_channels,), weight, bias, eps)
    raise ValueError(f"Unknownn normalization mode: {mode}")


def graph_norm(x: Tensor, batch: Optional[Tensor], batch_size: Optional[int], weight: Tensor, bias: Tensor,
               mean_scale: Tensor, eps: float) -> Tensor:
    """PyG's GraphNorm."""
    if batch is None:
        batch = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        batch_size = 1
    size = _size(batch, batch_size)
    norm = _counts(x, batch, size)
    mean = _segment_sum(x, batch, size) / norm
    out = x - mean.index_select(0, batch) * mean_scale
    var = _segment_sum(out.pow(2), batch, size) / norm
    std = (var + eps).sqrt().index_select(0, batch)
    return weight * out / std + bias
