"""SyncBatchNorm on any ``torch.distributed`` backend (gloo on CPU too)."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from normlab.errors import InputError
from normlab.torch.compute import (_average_factor, _batch_norm_forward, _channel_shape, _dtypes_refused,
                                   _statistics_update, _torch_batch_norm, _update_running)
from normlab.torch.masked import _affine
from normlab.torch.masked_modules import _check_mask, masked_forward
from normlab.torch.modules import _BatchNormForward, _fx_call_module, _refuse_mask_on_plain_state, _state_restored
from normlab.torch.ops import _grads_of
from normlab.torch.paths import _LOW_PRECISION, _choose_path
from normlab.torch.spec import parametrizations_computed, torch_layout

if torch.distributed.is_available():
    # before any process group: torch.distributed.nn's functions take group.WORLD as a default
    # argument, and imported after init_process_group (Dynamo imports them, and
    # DistributedDataParallel's constructor and torch.compile import Dynamo) they kept that group
    # and its gloo threads past destroy_process_group into interpreter shutdown, where a rank
    # aborted ("terminate called without an active exception"); imported here they take None
    import torch.distributed.nn  # noqa: F401


def _merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s parallel merge of per-rank (count, mean, M2) rows into the totals:
    ``mean = Σ nᵣ·meanᵣ / n`` and ``M2 = Σ M2ᵣ + nᵣ·(meanᵣ − mean)²``: exact for unequal counts.

    >>> c, m, v = _merge_moments(torch.tensor([[1.], [3.]]), torch.tensor([[0.], [4.]]), torch.tensor([[0.], [0.]]))
    >>> c.item(), m.item(), v.item()
    (4.0, 3.0, 12.0)
    """
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return total, mean, m2


def _split_mean(mean: Tensor, compute: torch.dtype, shape) -> tuple[Tensor, Tensor]:
    """The float64 ``mean`` as a high and a low part in ``compute``: ``(x − high) − low``
    keeps its digits where float32 data lie far from 0 (|mean|/std = 1e6), where
    ``x − float32(mean)`` would be off by half a float32 step of the mean."""
    high = mean.to(compute)
    low = (mean - high.to(mean.dtype)).to(compute)
    return high.reshape(shape), low.reshape(shape)


def _synced_backward(ctx, grad_y: Tensor, x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor],
                     mean_parts: tuple[Tensor, Tensor], rstd: Tensor, count, need_weight: bool) -> tuple:
    """``(grad_x, grad_weight, grad_bias)`` of batch norm over every rank of ``ctx.group``:
    ``grad_x = rstd·w·(g − m·(ΣΣg + x̂·ΣΣg·x̂)/count)``, the two per-channel sums taken
    over every element and every rank (one all-reduce), ``m`` the mask (1 without one; a
    masked-out output depends on the counted inputs, so the sums run over it too) and
    ``count`` the counted elements over the ranks (a number, or per channel). The
    parameter gradients stay local: DistributedDataParallel averages them, as with torch's."""
    shape = _channel_shape(x)
    dims = [0] + list(range(2, x.dim()))
    high, low = mean_parts  # (see _split_mean)
    g = grad_y.to(rstd.dtype)
    x_hat = ((x.to(rstd.dtype) - high) - low) * rstd
    summed = x_hat
    if mask is not None:
        # an uncounted NaN or Inf (garbage in the padding) enters no sum: 0·NaN would poison the
        # channel on every rank (normlab.masked); its own gradient stays g·w·rstd
        mask = mask.expand(x.shape)
        summed = torch.where(mask | torch.isfinite(x_hat), x_hat, 0)
    sum_dy = g.sum(dims)
    sum_dy_xhat = (g * summed).sum(dims)
    packed = torch.cat([sum_dy, sum_dy_xhat])
    torch.distributed.all_reduce(packed, group=ctx.group)
    total_dy, total_dy_xhat = packed.chunk(2)
    correction = (total_dy.reshape(shape) + x_hat * total_dy_xhat.reshape(shape)) / count
    if mask is not None:
        correction = torch.where(mask, correction, 0)
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype).reshape(shape)
    grad_x = scale * (g - correction)
    grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and need_weight else None
    grad_b = sum_dy.to(weight.dtype if weight is not None else x.dtype) if ctx.has_bias else None
    return grad_x.to(x.dtype), grad_w, grad_b


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks of ``group`` as a differentiable operation: its gradient is
    the sum of the ranks' gradients, itself differentiable (each rank's loss is its own,
    as with DistributedDataParallel)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total, group=group)
        # a copy out: gloo's work holds ``total`` until its worker thread next takes the GIL, and
        # as this node's output it would lead to ``ctx.group``, keeping the group and its threads
        # alive past the caller's return into interpreter shutdown, where the worker aborted
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


def _composite_synced(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor],
                      eps: float, group) -> Tensor:
    """The synced forward in torch operations, the ranks' sums taken by :class:`_AllReduceSum`
    (running statistics left alone): what a backward under ``create_graph=True`` (a gradient
    penalty, a hessian) differentiates, so that the gradient carries a graph over the ranks."""
    compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    dims, shape = [0] + list(range(2, x.dim())), _channel_shape(x)
    xc = x.to(compute)
    if mask is None:
        counted = None
        count = xc.new_full((x.shape[1],), x.numel() // x.shape[1] if x.shape[1] else 0)
    else:
        counted = mask.expand(x.shape)
        count = counted.sum(dims).to(compute)
        xc = torch.where(counted, xc, 0)  # (padding may hold NaN: kept out of the statistics' graph)
    total_count, total_x = _AllReduceSum.apply(torch.cat([count, xc.sum(dims)]), group).chunk(2)
    mean = total_x / total_count.clamp_min(1)
    squares = (xc - mean.reshape(shape)).square()
    if counted is not None:
        squares = torch.where(counted, squares, 0)
    var = _AllReduceSum.apply(squares.sum(dims), group) / total_count.clamp_min(1)
    rstd = torch.where(total_count > 0, torch.rsqrt(var + eps), 0)
    mean, rstd = mean.reshape(shape), rstd.reshape(shape)
    w = None if weight is None else weight.to(compute).reshape(shape)
    b = None if bias is None else bias.to(compute).reshape(shape)
    x_full = x.to(compute)
    if counted is None:
        return _affine((x_full - mean) * rstd, w, b).to(x.dtype)
    with torch.no_grad():  # (see normlab.torch.masked._composite)
        dead = (total_count == 0).reshape(shape)
        confined = ~counted & ~torch.isfinite((x_full - mean) * rstd) & ~dead
    x_hat = (torch.where(dead | confined, 0, x_full) - mean) * rstd
    garbage = _affine((x_full - mean.detach()) * rstd.detach(), None if w is None else w.detach(), b)
    return torch.where(confined, garbage, _affine(x_hat, w, b)).to(x.dtype)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm whose statistics and gradient sums span every rank of ``group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, factor, group, world_size):
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // channels if channels else 0
        compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        xc = x.to(compute)
        if count:
            # the mean summed in float64: var_mean's would be rounded to float32
            var, mean = torch.var(xc, dim=dims, correction=0), xc.sum(dims, dtype=torch.float64) / count
        else:
            var = mean = xc.new_zeros(channels)
        local = torch.stack([torch.full_like(mean, count, dtype=torch.float64), mean.to(torch.float64),
                             var.to(torch.float64) * count])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, local, group=group)
        stacked = torch.stack(gathered)  # (ranks, 3, channels)
        total, mean, m2 = _merge_moments(stacked[:, 0], stacked[:, 1], stacked[:, 2])
        total_count = int(total[0].item()) if channels else 0
        if module.training and total_count == 1:  # (the unbiased variance of one value is 0/0)
            raise InputError(f"SyncBatchNorm: expected more than 1 value per channel when training, got 1 over the "
                             f"{world_size} ranks of the process group (input size {tuple(x.shape)} on this rank); "
                             "use larger batches or call .eval()")
        var = m2 / total_count
        if module.training and module.track_running_stats and module.running_mean is not None:
            _update_running(module, mean, var, total_count, factor)
        rstd = torch.rsqrt(var + module.eps)
        shape = _channel_shape(x)
        (high, low), rstd_c = _split_mean(mean, compute, shape), rstd.to(compute).reshape(shape)
        y = ((xc - high) - low) * rstd_c
        if weight is not None:
            y = y * weight.to(compute).reshape(shape)
        if bias is not None:
            y = y + bias.to(compute).reshape(shape)
        ctx.save_for_backward(x, weight, bias, high, low, rstd_c)
        ctx.total_count, ctx.group, ctx.has_bias, ctx.eps = total_count, group, bias is not None, module.eps
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, high, low, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: autograd of the composite, over the ranks
            grads = _grads_of(lambda x, weight, bias: _composite_synced(x, weight, bias, None, ctx.eps, ctx.group),
                              (x, weight, bias), ctx.needs_input_grad, grad_y)
            return (*grads, None, None, None, None)
        grad_x, grad_w, grad_b = _synced_backward(ctx, grad_y, x, None, weight, (high, low), rstd, ctx.total_count,
                                                  ctx.needs_input_grad[1])
        return grad_x, grad_w, grad_b, None, None, None, None


class _MaskedSyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with a mask, statistics and gradient sums over every rank of ``group``:
    each rank's per-channel ``(count, mean, M2)`` come from its counted elements, merged
    count-weighted; every element is normalized (:mod:`normlab.masked`'s semantics), and a
    channel with nothing counted on any rank gives exactly ``bias``."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, module, factor, group, world_size):
        dims = [0] + list(range(2, x.dim()))
        compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        xc = x.to(compute)
        counted_here = mask.expand(x.shape)
        x64 = x.to(torch.float64)
        count = counted_here.sum(dims, dtype=torch.float64)
        # where, not a product with the mask: padding may hold inf or NaN, and 0·inf is NaN
        mean = torch.where(counted_here, x64, 0).sum(dims) / count.clamp_min(1)
        shape = _channel_shape(x)
        m2 = torch.where(counted_here, (x64 - mean.reshape(shape)).square(), 0).sum(dims)
        local = torch.stack([count, mean, m2])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, local, group=group)
        stacked = torch.stack(gathered)  # (ranks, 3, channels)
        total, mean, m2 = _merge_moments(stacked[:, 0], stacked[:, 1], stacked[:, 2])
        if module.training and bool((total == 1).any()):
            raise ValueError(f"SyncBatchNorm: expected more than 1 counted value per channel when training, got "
                             f"input size {tuple(x.shape)} with 1 counted in a channel over all ranks; count more "
                             "elements in the mask or call .eval()")
        counted = total > 0
        var = m2 / total.clamp_min(1)
        if module.training and module.track_running_stats and module.running_mean is not None:
            running_mean, running_var = module.running_mean, module.running_var
            # (a channel with nothing counted keeps its running statistics)
            with torch.no_grad(), _statistics_update(running_mean, running_var):
                unbiased = var * total / (total - 1).clamp_min(1)
                keep = 1 - factor * counted.to(torch.float64)
                step = factor * counted.to(torch.float64)
                running_mean.copy_(running_mean * keep.to(running_mean.dtype) + (step * mean).to(running_mean.dtype))
                running_var.copy_(running_var * keep.to(running_var.dtype) + (step * unbiased).to(running_var.dtype))
        # nothing counted: mean = rstd = 0, so x̂ = 0 and y = bias exactly
        rstd = torch.where(counted, torch.rsqrt(var + module.eps), 0)
        mean = torch.where(counted, mean, 0)
        (high, low), rstd_c = _split_mean(mean, compute, shape), rstd.to(compute).reshape(shape)
        y = ((xc - high) - low) * rstd_c
        if weight is not None:
            y = y * weight.to(compute).reshape(shape)
        if bias is not None:
            y = y + bias.to(compute).reshape(shape)
        ctx.save_for_backward(x, mask, weight, bias, high, low, rstd_c, total.to(compute))
        ctx.group, ctx.has_bias, ctx.eps = group, bias is not None, module.eps
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, weight, bias, high, low, rstd, total = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: autograd of the composite, over the ranks
            grads = _grads_of(lambda x, weight, bias: _composite_synced(x, weight, bias, mask, ctx.eps, ctx.group),
                              (x, weight, bias), [ctx.needs_input_grad[i] for i in (0, 2, 3)], grad_y)
            return grads[0], None, grads[1], grads[2], None, None, None, None
        count = total.clamp_min(1).reshape(_channel_shape(x))
        grad_x, grad_w, grad_b = _synced_backward(ctx, grad_y, x, mask, weight, (high, low), rstd, count,
                                                  ctx.needs_input_grad[2])
        return grad_x, None, grad_w, grad_b, None, None, None, None


_SYNCED_EAGERLY: list = []


def _synced_eagerly():
    """``SyncBatchNorm._synced_forward``, and ``torch.compiler.disable`` of it once Dynamo is
    loaded: before that no frame can be compiled, and making the disabled function imports
    Dynamo (1.4 s of ``import normlab.torch`` as a decorator, paid by every worker process)."""
    if not (torch.compiler.is_compiling() or "torch._dynamo" in sys.modules):
        return SyncBatchNorm._synced_forward
    if not _SYNCED_EAGERLY:
        _SYNCED_EAGERLY.append(torch.compiler.disable(SyncBatchNorm._synced_forward))
    return _SYNCED_EAGERLY[0]


class SyncBatchNorm(_BatchNormForward, nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on any ``torch.distributed`` backend: gloo on CPU
    (torch's own is CUDA-only) and NCCL on GPU.

    In training with more than one rank (on CUDA: torch's own fused SyncBatchNorm unless
    :func:`use_path` forces ``"composite"``), each rank all-gathers the per-channel
    ``(count, mean, M2)`` and merges them count-weighted (exact for unequal batch sizes);
    the backward pass all-reduces the two per-channel sums Σdy and Σdy·x̂, so the input
    gradient is the concatenated batch's. The weight and bias gradients stay local to each
    rank, as with torch's: wrap the model in ``DistributedDataParallel``, which averages
    them. Running statistics equal BatchNorm's on the concatenated batch. Otherwise it is
    batch norm (any rank ≥ 2). Use it as torch's::

        model = SyncBatchNorm.convert_sync_batchnorm(model)   # after dist.init_process_group
        model = torch.nn.parallel.DistributedDataParallel(model)

    The constructor, attributes (``process_group`` too) and ``state_dict`` keys are
    torch's, but the class derives from torch's ``_BatchNorm``, not from
    ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses every subclass of that
    on CPU. So ``isinstance(m, torch.nn.SyncBatchNorm)`` is False;
    ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` holds.

    >>> SyncBatchNorm(3)(torch.randn(4, 3, 2)).shape   # no process group: batch norm
    torch.Size([4, 3, 2])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group
        self._init_spec()

    # torch.nn.SyncBatchNorm's input checks, with its messages
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def __prepare_scriptable__(self):
        # torch.nn.SyncBatchNorm cannot be scripted either (TorchScript cannot compile its
        # torch.distributed calls) and raises a RuntimeError; this one says what to do
        raise RuntimeError("torch.jit.script cannot compile SyncBatchNorm (torch.nn.SyncBatchNorm neither): its "
                           "forward calls torch.distributed; use torch.compile or torch.jit.trace, which record its "
                           "torch operations")

    def _world_size(self) -> int:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        group = self.process_group or torch.distributed.group.WORLD
        # -1 on a rank outside process_group: it normalizes its own batch, as torch's does
        return max(torch.distributed.get_world_size(group), 1)

    def _refused(self, input: Tensor) -> bool:
        """An input, or parameters and running statistics beside it (those a training step
        passes to torch's batch norm), that torch's refuses: an integer, bool or complex input
        ("not implemented for 'Long'"), another channel count, or a mix of dtypes its CPU
        kernels refuse ("mixed dtype (CPU)")."""
        channels = input.shape[1]
        tensors = (self.weight, self.bias) + ((self.running_mean, self.running_var) if self.track_running_stats else ())
        return (not input.is_floating_point() or any(t is not None and t.numel() != channels for t in tensors)
                or _dtypes_refused(input, *tensors))

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask`` (bool, broadcasts to the input): the elements that count toward the
        statistics, on this rank; the counts merge over the ranks. Every element is
        normalized; a channel with nothing counted on any rank gives exactly ``bias``."""
        if isinstance(input, torch.fx.Proxy):  # one leaf call, as fx records torch's SyncBatchNorm
            return _fx_call_module(self, input, mask=mask)
        if getattr(self, "_spec", 0) is None and not _state_restored(self):  # (state deleted: torch's error)
            if mask is not None and _refuse_mask_on_plain_state(self):
                return masked_forward(self, input, mask)
            return _torch_batch_norm(self, input)
        stand_in = parametrizations_computed(self)
        if stand_in is not None:  # (each parametrized tensor computed once, as torch.nn's forward does)
            return stand_in.forward(input, mask)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if self.training and self.track_running_stats and self._buffers.get("num_batches_tracked") is None:
            # (set to None, or never made: track_running_stats turned on after construction) torch's
            # asserts there, where BatchNorm's leaves the count alone
            return nn.SyncBatchNorm.forward(self, input)
        world_size = self._world_size() if self.training else 1
        if world_size > 1 and self._refused(input):
            # torch's batch norm raises its error, before any collective and any running update
            return _torch_batch_norm(self, input)
        if mask is not None:
            if world_size == 1:
                return masked_forward(self, input, mask)
            _check_mask(self, input, mask)
            return _synced_eagerly()(self, input, mask, world_size)
        if world_size == 1:
            path = _choose_path(input, has_native=True)
            if path == "native":  # torch's SyncBatchNorm is batch norm with one rank
                return _torch_batch_norm(self, input)
            return _batch_norm_forward(self, input)
        if _choose_path(input, has_native=input.is_cuda) == "native":
            # torch's fused CUDA kernels (also count-weighted); gloo on CPU has no native op
            return nn.SyncBatchNorm.forward(self, input)
        return _synced_eagerly()(self, input, mask, world_size)

    # Eager under torch.compile too, through _synced_eagerly (its .item() is a graph break anyway):
    # Dynamo traced the forward's frames after that break, and Inductor compiled the
    # running-statistics update with momentum=None's 1/num_batches_tracked as a dynamic float
    # into a wrong one from the third step on (in torch alone, buf.mul_(1 - f).add_(mean,
    # alpha=f) swaps the weights there)
    def _synced_forward(self, input: Tensor, mask: Optional[Tensor], world_size: int) -> Tensor:
        # torch.nn's output layout (its SyncBatchNorm copies the input too): the elementwise
        # math below would keep a transposed input's strides, where torch.nn's .view works
        input = torch_layout(input, keeps_channels_last=True)
        factor = _average_factor(self)
        group = self.process_group or torch.distributed.group.WORLD
        if mask is None:
            return _SyncBatchNormFunction.apply(input, self.weight, self.bias, self, factor, group, world_size)
        return _MaskedSyncBatchNormFunction.apply(input, mask, self.weight, self.bias, self, factor, group,
                                                  world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch norm layer (torch's or normlab's, SyncBatchNorm too: it takes
        ``process_group``, as torch's conversion rescopes its own) with a normlab
        SyncBatchNorm sharing its parameters and buffers; a lazy one that has not run yet
        becomes one at its first forward, once that has inferred the channels. A batch norm
        whose parameters FSDP (``fully_shard``) holds is left alone, with a warning, as
        :func:`normlab.torch.convert` leaves it: convert before ``fully_shard``."""
        from normlab.torch.conversion import _first_names, _sharded_parameters  # (conversion imports this module)

        sharded, left_alone = _sharded_parameters(module), []
        converted = cls._converted(module, process_group, sharded, left_alone, "")
        if left_alone:
            shown = _first_names(left_alone)
            # (torch's conversion moves the sharded parameters into a module FSDP's hooks never
            # see: "got mixed torch.Tensor and DTensor" at the next forward)
            warnings.warn(f"SyncBatchNorm.convert_sync_batchnorm left {len(left_alone)} batch norm layer(s) "
                          "unconverted, because FSDP (fully_shard) holds their parameters and swaps them on these "
                          f"modules around each call, which a SyncBatchNorm in their place would not see: {shown}; "
                          "convert the model before fully_shard", stacklevel=2)
        return converted

    @classmethod
    def _converted(cls, module: nn.Module, process_group, sharded: frozenset, left_alone: list,
                   name: str) -> nn.Module:
        # (a lazy norm without parameters or buffers is lazy too: torch's hook still runs at its first forward)
        lazy_norm = isinstance(module, nn.modules.batchnorm._LazyNormBase)
        if isinstance(module, LazyModuleMixin) and (module.has_uninitialized_params() or lazy_norm):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if isinstance(module, nn.modules.batchnorm._LazyNormBase):
                    # torch calls the forward of the class a module has as the call begins and swaps
                    # in cls_to_become inside it: so that the first forward, too, is synced
                    module.__class__ = LazySyncBatchNorm
                module.cls_to_become, module.process_group = cls, process_group
                cls._init_spec(module)
            return module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if any(id(p) in sharded for p in module._parameters.values()):
                left_alone.append(f"{name or '<model>'} ({type(module).__name__})")
                return module
            from normlab.torch.conversion import twin_of  # conversion imports this module

            twin = twin_of(module, cls)
            twin.process_group = process_group
            return twin
        for child_name, child in module.named_children():
            converted = cls._converted(child, process_group, sharded, left_alone,
                                       f"{name}.{child_name}" if name else child_name)
            if converted is not child:
                module.add_module(child_name, converted)
        return module


class LazySyncBatchNorm(nn.modules.batchnorm._LazyNormBase, SyncBatchNorm):
    """A lazy batch norm that :meth:`SyncBatchNorm.convert_sync_batchnorm` met before its
    first forward: that forward infers the channels (torch's lazy hook, which then makes the
    module its ``cls_to_become``, SyncBatchNorm) and normalizes over the ranks, as every later
    one does."""

    cls_to_become = SyncBatchNorm

    def initialize_parameters(self, input: Tensor, mask: Optional[Tensor] = None) -> None:
        # (torch's lazy hook hands it the forward's arguments: mask= too, which the channels ignore)
        super().initialize_parameters(input)
