"""Drop-in twins of PyG's norm layers (``torch_geometric.nn.norm``) on normlab's segment
kernels: ``InstanceNorm``, ``LayerNorm`` (``mode="graph"`` and ``"node"``), ``GraphNorm``
and ``BatchNorm``. Same constructor arguments, ``forward(x, batch=None, batch_size=None)``,
running-statistics conventions and ``state_dict`` keys; they need torch only, not PyG.

PyG computes per-graph statistics with scatter operations and differentiates through
them; here a batch vector is ``segment_ids`` of :func:`normlab.torch.masked.normalize_masked`:
one fused pass forward and one backward, sorted batch vectors (PyG's own) without a copy.

>>> x, batch = torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 1])
>>> InstanceNorm(3)(x, batch).shape
torch.Size([5, 3])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from normlab.torch import geometric_script as script
from normlab.torch.compute import _apply_stats, _dtypes_refused, _needs_grad, _statistics_update, normalize
from normlab.torch.masked import (_count, _run_masked, check_segment_ids, normalize_masked,
                                  vmapped_ids_need_a_count)
from normlab.torch.paths import _LOW_PRECISION, _exporting_to_onnx, _profiler, profile_name
from normlab.torch.modules import BatchNorm1d
from normlab.torch.ops import _vmapped
from normlab.torch.spec import Spec

__all__ = ["InstanceNorm", "LayerNorm", "GraphNorm", "BatchNorm"]


def _batch_size(batch: Tensor, batch_size: Optional[int]) -> int:
    # (not while compiling: Dynamo cannot trace the check, and would refuse a fullgraph for it)
    if batch_size is None and not torch.compiler.is_compiling() and _vmapped(batch):
        raise RuntimeError(vmapped_ids_need_a_count("batch_size"))
    return int(batch.max()) + 1 if batch_size is None else _count(batch_size)


def _recorded() -> bool:
    """True where the call is recorded into a graph that holds no normlab op: either ONNX
    exporter, and ``torch.jit.trace``, whose graph ``torch.jit.save`` and ``torch.jit.freeze``
    refuse with a Python call into the kernels in it. The twins then record PyG's definitions
    in torch operations (``_script_forward``), as PyG's own layers trace."""
    return torch.jit.is_tracing() or _exporting_to_onnx()


def _fx_leaf(module: nn.Module, x, batch, batch_size) -> "torch.fx.Proxy":
    """Under ``torch.fx.symbolic_trace``: one ``call_module`` leaf with the batch vector and
    batch size (the kernels cannot take proxies); the traced graph then runs the twin as it
    is. The root module is traced through, as fx traces PyG's own layer: PyG's definitions
    in torch operations (``_script_forward``, what TorchScript compiles)."""
    path = x.tracer.path_of_module(module)
    if not path:
        return module._script_forward(x, batch, batch_size)
    return x.tracer.create_proxy("call_module", path, (x, batch, batch_size), {})


def _not_nodes_by(x: Tensor, channels: int) -> bool:
    """Whether ``x`` is not nodes × ``channels``: PyG's norms, plain torch operations, take
    (n, 1) nodes where torch's broadcasting does (each channel's weight scaling the one
    channel), and raise torch's errors for the rest."""
    return x.dim() != 2 or x.shape[1] != channels


def _promoted(x: Tensor, weight: Optional[Tensor]) -> Tensor:
    """x in the dtype that PyG's ``out * weight + bias`` gives (torch's type promotion:
    bfloat16 nodes and float32 parameters give float32; integer nodes, which PyG divides by
    the node counts, the default float dtype)."""
    if not (x.is_floating_point() or x.is_complex()):
        x = x.to(torch.get_default_dtype())
    return x if weight is None or weight.dtype == x.dtype else x.to(torch.promote_types(x.dtype, weight.dtype))


def _variance(rstd: Tensor, eps: float) -> Tensor:
    """The biased variance back from rstd (float64), 0 where a graph has no nodes (rstd 0)."""
    return torch.where(rstd > 0, rstd.pow(-2) - eps, 0).clamp_min(0)


class InstanceNorm(nn.modules.instancenorm._InstanceNorm):
    r"""Twin of ``torch_geometric.nn.norm.InstanceNorm``: each graph's nodes standardized
    per channel (pattern ``"[n] c"`` with the batch vector as segment ids).

    Running statistics as PyG keeps them: the mean over the graphs of each graph's mean and
    of its unbiased variance (``n − 1`` clamped to 1), momentum weighting the new batch.
    """

    # what torch's profiler lists its call on the kernels as, beside PyG's aten::instance_norm
    _profile_name = "normlab::instance_norm"

    def __init__(self, in_channels: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device: Optional[torch.device] = None):
        super().__init__(in_channels, eps, momentum, affine, track_running_stats, device=device)

    def forward(self, x: Tensor, batch: Optional[Tensor] = None, batch_size: Optional[int] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x, batch, batch_size)
        return self._normlab_forward(x, batch, batch_size)

    def _script_forward(self, x: Tensor, batch: Optional[Tensor], batch_size: Optional[int]) -> Tensor:
        return script.instance_norm(x, batch, batch_size, self.running_mean, self.running_var, self.weight,
                                    self.bias, self.training, self.track_running_stats, self.momentum, self.eps)

    @torch.jit.unused
    def _normlab_forward(self, x: Tensor, batch: Optional[Tensor], batch_size: Optional[int]) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x, batch, batch_size)
        if _recorded() or _not_nodes_by(x, self.num_features):
            # (recorded: plain torch ops; nodes of another shape: PyG's own, as _not_nodes_by says)
            return self._script_forward(x, batch, batch_size)
        use_input_stats = self.training or not self.track_running_stats
        if batch is None:
            running_mean, running_var = self.running_mean, self.running_var  # (buffers: each read is a call)
            refused = not x.is_floating_point() or _dtypes_refused(x, self.weight, self.bias, running_mean,
                                                                  running_var)
            weight, bias = self.weight, self.bias
            if (not use_input_stats and x.dim() == 2 and x.numel() > 0 and not refused and 0.0 < self.eps < math.inf
                    and self.momentum is not None and running_mean is not None and running_var is not None
                    and x.shape[1] == running_mean.numel() == running_var.numel()
                    and not _needs_grad(running_mean, running_var)
                    and not (not torch.compiler.is_compiling() and x.is_inference() and _needs_grad(x, weight, bias))):
                # the running statistics subtracted first, as the torch.nn twins in evaluation: torch's op
                # folds them into x·α + β, which cancels in float32 far from zero; x's dtype, as torch's. The
                # rest is torch's op, in its words: other shapes, eps <= 0, a momentum of None (PyG's TypeError, in
                # evaluation too), an inference tensor where autograd records the call (torch's op saves it and raises)
                if _needs_grad(weight, bias):  # (torch's op saves a copy: an optimizer step before backward is allowed)
                    weight, bias = (None if t is None else t.clone() for t in (weight, bias))
                return _apply_stats(x, running_mean, running_var, weight, bias, self.eps, (1, -1))
            if (not use_input_stats or x.numel() == 0 or refused or self.momentum is None
                    or _needs_grad(running_mean, running_var)):
                # PyG's own call: torch's dtype rules (half-precision nodes stay half; a mix torch refuses raises),
                # no nodes leave the running statistics as they are, a momentum of None raises its TypeError,
                # and running statistics that require grad (functional_call may hand them in) its RuntimeError
                return torch.nn.functional.instance_norm(
                    x.t().unsqueeze(0), self.running_mean, self.running_var, self.weight, self.bias, use_input_stats,
                    self.momentum, self.eps).squeeze(0).t()
            # PyG runs F.instance_norm on (1, C, nodes) here, which refuses a single node
            torch.nn.functional._verify_spatial_size(torch.Size((1, x.shape[-1], x.shape[0])))
            spec = Spec.build("[n] c", None if self.weight is None else "c")
            y, mean, rstd, count = _run_masked(x, spec, self.weight, self.bias, self.eps, module=self)
            if self.running_mean is not None:  # F.instance_norm's update: in place, n/(n − 1)
                n = x.shape[0]
                with _statistics_update():  # (the statistics need no detach: normalize_masked's carry no graph)
                    # (in the buffers' dtype, as torch's op: half-precision nodes update float32 statistics)
                    var = _variance(rstd.reshape(-1), self.eps) * (n / max(n - 1, 1))
                    self.running_mean.mul_(1 - self.momentum).add_(
                        self.momentum * mean.reshape(-1).to(self.running_mean.dtype))
                    self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.to(self.running_var.dtype))
            return y
        batch_size = _batch_size(batch, batch_size)
        if not (x.is_floating_point() or x.is_complex()):
            x = x.to(torch.get_default_dtype())  # (as PyG's statistics, divided by the node counts, and its update)
        if not use_input_stats:
            check_segment_ids(x, "[n] c", batch, batch_size)  # (unused here, but PyG's indexing refuses bad ids)
            return _apply_running(self, x)

        def update(mean: Tensor, rstd: Tensor, count: Tensor) -> None:
            # (before anything is saved for backward, as PyG updates before its output: a checkpoint's
            # recomputation updates again, as there)
            if self.running_mean is not None or self.running_var is not None:
                with _statistics_update():  # (as above)
                    momentum = self.momentum
                    if self.running_mean is not None:
                        self.running_mean = (1 - momentum) * self.running_mean + momentum * mean.mean(0).to(x.dtype)
                    if self.running_var is not None:
                        unbiased = _variance(rstd, self.eps) * count / (count - 1).clamp_min(1)
                        self.running_var = (1 - momentum) * self.running_var + momentum * unbiased.mean(0).to(
                            x.dtype)

        spec = Spec.build("[n] c", None if self.weight is None else "c")
        return _run_masked(_promoted(x, self.weight), spec, self.weight, self.bias, self.eps, segment_ids=batch,
                           num_segments=batch_size, then=update, module=self).y

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.num_features})"


def _apply_running(module, x: Tensor) -> Tensor:
    out = (x - module.running_mean.view(1, -1)) / (module.running_var.view(1, -1) + module.eps).sqrt()
    if module.weight is not None and module.bias is not None:
        out = out * module.weight.view(1, -1) + module.bias.view(1, -1)
    return out


class LayerNorm(nn.Module):
    r"""Twin of ``torch_geometric.nn.norm.LayerNorm``. ``mode="graph"``: each graph's
    nodes and channels share one mean and variance (pattern ``"[n c]"`` with the batch
    vector as segment ids); ``mode="node"``: each node over its channels (``"... [c]"``).
    As in PyG, ``mode="graph"`` without a batch vector divides by ``std + eps``."""

    def __init__(self, in_channels: int, eps: float = 1e-5, affine: bool = True, mode: str = "graph",
                 device: Optional[torch.device] = None):
        super().__init__()
        self.in_channels = in_channels
        self.eps = eps
        self.affine = affine
        self.mode = mode
        if affine:
            self.weight = nn.Parameter(torch.empty(in_channels, device=device))
            self.bias = nn.Parameter(torch.empty(in_channels, device=device))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, batch: Optional[Tensor] = None, batch_size: Optional[int] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x, batch, batch_size)
        return self._normlab_forward(x, batch, batch_size)

    def _script_forward(self, x: Tensor, batch: Optional[Tensor], batch_size: Optional[int]) -> Tensor:
        return script.layer_norm(x, batch, batch_size, self.weight, self.bias, self.in_channels, self.mode,
                                 self.eps)

    @torch.jit.unused
    def _normlab_forward(self, x: Tensor, batch: Optional[Tensor], batch_size: Optional[int],
                         _named: bool = False) -> Tensor:
        if not _named and not torch.compiler.is_compiling() and _profiler._is_profiler_enabled:
            # (compilation first: a compiled graph that read the profiler's flag would be compiled again when one
            # starts) the kernels' range named as torch.nn's op, beside torch.nn.LayerNorm's aten::layer_norm
            with profile_name("normlab::layer_norm"):
                return self._normlab_forward(x, batch, batch_size, True)
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x, batch, batch_size)
        if _recorded() or (self.mode == "graph" and batch is not None and _not_nodes_by(x, self.in_channels)):
            return self._script_forward(x, batch, batch_size)  # (as InstanceNorm's)
        if self.mode == "graph":
            if batch is None:
                # PyG's definition with its mean in two passes, as the kernels take theirs: a first mean
                # (no gradient: the result does not depend on it) off the nodes, then the mean of the
                # rest, so a graph far from zero loses no digits to the rounded mean
                x = x - x.mean().detach()
                x = x - x.mean()
                out = x / (x.std(unbiased=False) + self.eps)
                if self.weight is not None and self.bias is not None:
                    out = out * self.weight + self.bias
                return out
            return normalize_masked(_promoted(x, self.weight), "[n c]", weight=self.weight, bias=self.bias,
                                    params=None if self.weight is None else "c", eps=self.eps, segment_ids=batch,
                                    num_segments=_batch_size(batch, batch_size)).y
        if self.mode == "node":
            if (x.dim() == 0 or x.shape[-1] != self.in_channels or x.dtype in _LOW_PRECISION
                    or _dtypes_refused(x, self.weight, self.bias)):
                # PyG's own call, which raises torch's error (wrong width, a dtype mix torch refuses)
                # and gives half input torch's kernel's bits, as the torch.nn twins do
                return torch.nn.functional.layer_norm(x, (self.in_channels,), self.weight, self.bias, self.eps)
            return normalize(x, "... [c]", weight=self.weight, bias=self.bias,
                             params=None if self.weight is None else "c", eps=self.eps)
        raise ValueError(f"Unknownn normalization mode: {self.mode}")  # PyG's message, typo and all

    def __repr__(self):
        return f"{self.__class__.__name__}({self.in_channels}, affine={self.affine}, mode={self.mode})"


class GraphNorm(nn.Module):
    r"""Twin of ``torch_geometric.nn.norm.GraphNorm``: ``x − α·mean`` per graph and channel
    (a learnable ``mean_scale`` α), then divided by the root mean square of that, per graph
    and channel: an RMS norm with the batch vector as segment ids."""

    def __init__(self, in_channels: int, eps: float = 1e-5, device: Optional[torch.device] = None):
        super().__init__()
        self.in_channels = in_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(in_channels, device=device))
        self.bias = nn.Parameter(torch.empty(in_channels, device=device))
        self.mean_scale = nn.Parameter(torch.empty(in_channels, device=device))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_scale)

    def forward(self, x: Tensor, batch: Optional[Tensor] = None, batch_size: Optional[int] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x, batch, batch_size)
        return self._normlab_forward(x, batch, batch_size)

    def _script_forward(self, x: Tensor, batch: Optional[Tensor], batch_size: Optional[int]) -> Tensor:
        return script.graph_norm(x, batch, batch_size, self.weight, self.bias, self.mean_scale, self.eps)

    @torch.jit.unused
    def _normlab_forward(self, x: Tensor, batch: Optional[Tensor], batch_size: Optional[int],
                         _named: bool = False) -> Tensor:
        if not _named and not torch.compiler.is_compiling() and _profiler._is_profiler_enabled:
            with profile_name("normlab::graph_norm"):  # (as LayerNorm's; torch.nn has no graph norm)
                return self._normlab_forward(x, batch, batch_size, True)
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x, batch, batch_size)
        if _recorded():
            return self._script_forward(x, batch, batch_size)
        if batch is None:
            batch = x.new_zeros(x.size(0), dtype=torch.long)
            batch_size = 1
        batch_size = _batch_size(batch, batch_size)
        # the mean below runs before normalize_masked checks the batch vector: check it first, against
        # the nodes' own shape (which the error repeats), and index with it as the other twins take it
        check_segment_ids(x, "[n] ...", batch, batch_size)
        batch = batch.long()
        # PyG's broadcasting takes nodes of any shape (n, ..., c) and (n,), one column per feature,
        # and stretches a single column (n, 1) across the parameters' channels
        if x.dim() > 1:
            features = torch.broadcast_shapes(x.shape[1:], self.weight.shape)
            x = x.expand(x.shape[0], *features)
        else:
            features = (1,)
        shape = x.shape
        x = x.reshape(shape[0], math.prod(features))
        weight, bias, mean_scale = (torch.broadcast_to(p, features).reshape(-1)
                                    for p in (self.weight, self.bias, self.mean_scale))
        # PyG's output dtype, but the mean and the centering in at least float32: PyG sums
        # bfloat16/float16 nodes in their own dtype, which costs float32 outputs two digits
        dtype = x.dtype
        for p in (mean_scale, weight, bias):
            dtype = torch.promote_types(dtype, p.dtype)
        acc = torch.promote_types(dtype, torch.float32)
        xs = x.to(acc)
        # (counted in int64 into batch_size slots: a shape known without the ids' values, as in shape propagation)
        ones = torch.ones(batch.shape, dtype=torch.long, device=batch.device)
        counts = ones.new_zeros(batch_size).index_add(0, batch, ones).clamp_min(1).to(acc).unsqueeze(1)

        def graph_mean(t: Tensor) -> Tensor:
            return t.new_zeros(batch_size, t.size(1)).index_add(0, batch, t) / counts

        # the mean in two passes, as the kernels take their statistics: a first mean (no gradient:
        # x − α·mean does not depend on it) off the nodes, then the mean of the rest, so a graph
        # far from zero loses no digits to a float32 sum; x − α·mean = (x − m) + (1 − α)·m − α·rest
        rough = graph_mean(xs.detach())
        centered = xs - rough.index_select(0, batch)
        scale = mean_scale.to(acc)
        out = centered + ((1 - scale) * rough - scale * graph_mean(centered)).index_select(0, batch)
        return normalize_masked(out, "[n] c", weight=weight.to(acc), bias=bias.to(acc), params="c", eps=self.eps,
                                rms=True, segment_ids=batch, num_segments=batch_size).y.to(dtype).reshape(shape)

    def __repr__(self):
        return f"{self.__class__.__name__}({self.in_channels})"


class BatchNorm(nn.Module):
    r"""Twin of ``torch_geometric.nn.norm.BatchNorm``: normlab's :class:`BatchNorm1d` as
    ``self.module`` (so the ``state_dict`` keys are PyG's ``module.*``)."""

    def __init__(self, in_channels: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, allow_single_element: bool = False,
                 device: Optional[torch.device] = None):
        super().__init__()
        if allow_single_element and not track_running_stats:
            raise ValueError("'allow_single_element' requires 'track_running_stats' to be set to `True`")
        self.module = BatchNorm1d(in_channels, eps, momentum, affine, track_running_stats, device=device)
        self.in_channels = in_channels
        self.allow_single_element = allow_single_element

    def reset_running_stats(self):
        self.module.reset_running_stats()

    def reset_parameters(self):
        self.module.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if self.allow_single_element and x.size(0) <= 1:
            return torch.nn.functional.batch_norm(x, self.module.running_mean, self.module.running_var,
                                                  self.module.weight, self.module.bias, False, 0.0, self.module.eps)
        return self.module(x)

    def __repr__(self):
        return f"{self.__class__.__name__}({self.module.extra_repr()})"
