"""torch.nn.functional-style norms on NumPy arrays, as thin presets over patterns.

Each function builds a pattern and calls the one engine. Running statistics follow
PyTorch and are updated **in place**:

* momentum weights the *new* batch: ``running = (1 − momentum)·running + momentum·batch``
  (ONNX, Keras and Flax call ``1 − momentum`` their momentum);
* ``running_var`` stores the *unbiased* batch variance (``n/(n − 1)`` times the biased
  one that normalizes), as PyTorch does; ``unbiased=False`` stores the biased one, as
  ONNX, Keras and Flax do.

They take what ``torch.nn.functional`` takes and compute it as torch does: any eps
(``rstd = 1/sqrt(var + eps)``, NaN where that is negative; only ``batch_norm`` refuses
eps <= 0 in training and eps < 0 otherwise, as torch does), any momentum, empty inputs
and zero-size batches (an empty output; the running statistics stay as they are, but for
``instance_norm`` on zero instances, which makes them NaN, as torch does). Mixed dtypes
are refused where torch refuses them (:func:`_check_param_dtypes`).
"""

from __future__ import annotations

import math
import operator

import numpy as np

from normlab import core
from normlab.errors import InputError, ParamsError, ShapeError
from normlab.masked import MaskedStats, _mask_view
from normlab.plan import make_plan
from normlab.reference import Stats

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]


def _input(x, what: str) -> np.ndarray:
    """``x`` as an array; a masked array with masked elements is refused (see :func:`core.reject_masked`)."""
    if isinstance(x, np.ma.MaskedArray):  # the message is built only when needed (np.shape of a ragged list raises)
        core.reject_masked(x, "x", f"{what}, input shape {np.shape(x)}")
    return core.read_array(x, "x", what)  # a ragged list; a tensor that requires grad: an InputError


def _names(ndim: int) -> list[str]:
    return [f"a{i}" for i in range(ndim)]


def _pattern(names: list[str], reduced: set[int]) -> str:
    """Join axis names, bracketing runs of reduced ones: ``[a0] a1 [a2 a3]``."""
    parts, run = [], []
    for i, name in enumerate(names):
        if i in reduced:
            run.append(name)
            continue
        if run:
            parts.append("[" + " ".join(run) + "]")
            run = []
        parts.append(name)
    if run:
        parts.append("[" + " ".join(run) + "]")
    return " ".join(parts)


def _flag(value, name: str, what: str, x: np.ndarray) -> bool:
    """``value`` as a bool: True, False, NumPy's bools or the ints 0 and 1 (a string such as
    "False" is truthy, and an array ambiguous: torch refuses both)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    shown = f"an array of shape {np.shape(value)}" if np.ndim(value) else repr(value)
    raise InputError(f"{what}: {name} must be True or False, got {shown} for input shape {x.shape}; "
                     f"pass {name}=True or {name}=False")


def _channel_axis(x: np.ndarray, axis: int, what: str) -> int:
    if x.ndim < 2:
        raise ShapeError(f"{what} needs an input with a batch and a channel axis, got shape {x.shape}")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise InputError(f"{what}: axis must be an int, got {axis!r} for input shape {x.shape}; pick one of "
                         f"1..{x.ndim - 1} (or -1 for channels-last)") from None
    if not -x.ndim <= axis < x.ndim or axis % x.ndim == 0:
        raise ShapeError(
            f"{what}: axis={axis} is not a channel axis of input shape {x.shape}; "
            f"pick one of 1..{x.ndim - 1} (or -1 for channels-last); axis 0 is the batch"
        )
    return axis % x.ndim


def _per_channel(param, channels: int):
    """A batch norm weight or bias as torch reads it: an array of ``channels`` elements in any
    shape (``(C, 1)`` too) is the vector of them; anything else is checked as given."""
    if isinstance(param, np.ndarray) and param.ndim != 1 and param.size == channels:
        return param.reshape(channels)
    return param


def _check_channel_params(what: str, x: np.ndarray, channels: int, weight, bias, num_groups: int = 0) -> None:
    """torch's rule for a per-channel weight and bias, said in its terms (the pattern built
    below names axes the caller never wrote, and its params are not the caller's to change)."""
    for name, param in (("weight", weight), ("bias", bias)):
        try:
            shape = (channels,) if param is None else tuple(np.shape(param))
        except ValueError:  # a ragged list: the engine says it cannot be read as an array
            continue
        if shape != (channels,):
            # ONNX GroupNormalization before opset 21 takes one scale and bias per group
            per_group = (f" (one per group, as ONNX GroupNormalization-18 takes it: pass np.repeat({name}, "
                         f"{channels // num_groups}))" if num_groups and shape == (num_groups,) else "")
            raise ParamsError(f"{what}: {name} has shape {shape}, but the input has {channels} channels (input "
                              f"shape {x.shape}); pass a {name} of shape ({channels},), one value per "
                              f"channel{per_group}")


def _running(buffer, name: str, x: np.ndarray, channels: int, what: str, updated: bool = False):
    """Check a running-statistics buffer; ``updated``: it is written in place, so it must be
    writeable (checked before anything is written: both buffers move, or neither)."""
    if buffer is None:
        return None
    if not isinstance(buffer, np.ndarray) or not core.is_float(buffer.dtype):
        got = f"dtype {buffer.dtype}" if isinstance(buffer, np.ndarray) else type(buffer).__name__
        raise InputError(f"{what}: {name} must be a float NumPy array (it is updated in place), got {got} for input "
                         f"shape {x.shape}; pass np.asarray({name}, np.float32) (or the input's float dtype)")
    if updated and not buffer.flags.writeable:
        raise InputError(f"{what}: {name} is read-only, and training updates it in place; pass a writeable "
                         f"array (np.array({name})), or None to keep no running statistics")
    if buffer.shape != (channels,):
        raise ShapeError(f"{what}: {name} has shape {buffer.shape}, expected ({channels},) for the {channels} "
                         f"channels of input shape {x.shape}; pass one value per channel")
    return buffer


def _given_pair(running_mean, running_var) -> str:
    """Which running statistics were given, for a message: "neither", "running_mean alone"..."""
    given = [name for name, value in (("running_mean", running_mean), ("running_var", running_var))
             if value is not None]
    return f"{given[0]} alone" if len(given) == 1 else "neither"


def _check_param_dtypes(what: str, x: np.ndarray, **params) -> None:
    """torch's rule on CPU for a norm's parameters (weight and bias, and batch_norm's running
    statistics): one dtype for them all, the input's, or float32 beside float16 or bfloat16
    input; torch raises "mixed dtype (CPU)" otherwise. Only arrays state a dtype: a list or
    a number has none of its own and is read in the input's."""
    given = {name: core.native_dtype(np.asarray(value).dtype) for name, value in params.items()
             if isinstance(value, (np.ndarray, np.generic))}
    if not given:
        return
    x_dtype = core.result_dtype(x, what)
    allowed = [x_dtype]
    if x_dtype == np.float16 or core.is_bfloat16(x_dtype):
        allowed.append(np.dtype(np.float32))
    dtypes = set(given.values())
    if len(dtypes) == 1 and dtypes.pop() in allowed:
        return
    bad = next((name for name, dtype in given.items() if dtype != x_dtype), next(iter(given)))
    listed = ", ".join(f"{name} is {dtype}" for name, dtype in given.items())
    rule = (" and ".join(given) + " must have the input's dtype" + (" or float32" if len(allowed) > 1 else "")
            + (", all the same" if len(given) > 1 else ""))
    # integer input is read as float64, so x.dtype would be the wrong cast to suggest
    as_read = x_dtype == core.native_dtype(x.dtype)
    read = f"{x_dtype} (shape {x.shape})" if as_read else f"{x.dtype} (read as {x_dtype}; shape {x.shape})"
    target = "x.dtype" if as_read else f"np.{x_dtype}"
    raise ParamsError(f"{what}: the input is {read} and {listed}; torch.nn.functional.{what} "
                      f"refuses mixed dtypes on CPU: {rule}; pass {bad}.astype({target})")


def _update(buffer, batch_value, momentum: float, where=None) -> None:
    """The momentum update in place, in float64 and rounded once to the buffer's dtype (torch
    accumulates it in a wider type too: in the buffer's own, a float16 one drifted by up to
    hundreds of units where the two terms cancel); entries where ``where`` is False keep their value."""
    if buffer is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # past the dtype's range: ±inf or NaN, as in torch
            updated = momentum * batch_value + (1.0 - momentum) * buffer.astype(np.float64)
            np.copyto(buffer, updated, where=True if where is None else where)


def _update_instance(buffer: np.ndarray, per_instance, n: int, batch: int, momentum: float,
                     counted: np.ndarray | None = None) -> None:
    """torch's instance-norm update: batch norm's on each instance's copy of ``buffer``
    (none where the instances are empty, ``n == 0``), then the average over the batch,
    which is NaN for a batch of zero instances, as in torch. With ``counted`` (masks), the
    average over the instances with something counted; none: the buffer is kept."""
    copies = np.broadcast_to(buffer.astype(np.float64), (batch, buffer.size))
    with np.errstate(over="ignore", invalid="ignore"):  # past the buffer dtype's range: ±inf, as in torch
        if n:
            copies = (1.0 - momentum) * copies + momentum * per_instance.reshape(batch, buffer.size)
        if counted is not None:
            counted = counted.reshape(batch, buffer.size)
            instances = counted.sum(axis=0)
            average = np.where(counted, copies, 0.0).sum(axis=0) / np.maximum(instances, 1)
            buffer[...] = np.where(instances > 0, average, buffer)
            return
        buffer[...] = copies.mean(axis=0) if batch else np.nan


def _check_running_pair(running_mean, running_var, what: str, x: np.ndarray) -> None:
    """torch's rule when the batch statistics move the running ones: both buffers or neither
    (torch returns an empty input before it checks)."""
    if x.size and (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        raise InputError(f"{what}: running_mean and running_var must both be given or both be None, as torch "
                         f"requires; got {given} and no {missing} for input shape {x.shape}; pass both to keep "
                         "running statistics, or neither")


def _check_momentum(momentum, what: str) -> float:
    """Any real number, as torch takes it (momentum outside [0, 1] extrapolates)."""
    if momentum is None or isinstance(momentum, (str, bytes)):
        raise InputError(f"{what}: momentum must be a number, got {momentum!r}; running statistics move as "
                         "running = (1 - momentum)·running + momentum·batch (torch's default is 0.1)")
    try:
        return float(momentum)
    except (TypeError, ValueError, OverflowError) as err:
        raise InputError(f"{what}: momentum must be a number, got {momentum!r}; torch's default is 0.1") from err


def _check_eps(eps, what: str, x: np.ndarray) -> float:
    message = f"{what}: eps must be a float, got {eps!r} for input shape {x.shape}; torch's default is 1e-5"
    if isinstance(eps, (str, bytes)):  # float("1e-5") would take it; torch does not
        raise InputError(message)
    try:
        return float(eps)
    except (TypeError, ValueError, OverflowError) as err:
        raise InputError(message) from err


def _normalize_with_stats(x, pattern: str, *, eps: float, weight=None, bias=None, params=None, rms=False,
                          **sizes):
    """:func:`normlab.core.normalize_with_stats` for any eps, as torch computes
    ``rstd = 1/sqrt(var + eps)``. The engine takes eps in [0, ∞); for any other eps
    (negative, infinite or NaN) it computes the statistics with eps=0 and applies the rstd
    of that formula (NaN where ``var + eps < 0``, as in torch).

    >>> y, stats = _normalize_with_stats(np.array([[1., 3.]]), "b [f]", eps=-0.5)
    >>> y.round(4).tolist(), stats.rstd.round(4).tolist()
    ([[-1.4142, 1.4142]], [[1.4142]])
    """
    if 0.0 <= eps < math.inf:
        return core.normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params, eps=eps, rms=rms,
                                         **sizes)
    with np.errstate(divide="ignore", invalid="ignore"):
        _, stats = core.normalize_with_stats(x, pattern, eps=0.0, rms=rms, **sizes)
        rstd = 1.0 / np.sqrt(stats.var + eps)
        count = getattr(stats, "count", None)
        if count is not None:  # masked: a group with nothing counted keeps rstd 0 (exactly bias)
            rstd = np.where(count > 0, rstd, 0.0)
        y = core.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=0.0, rms=rms,
                           mean=stats.mean, rstd=rstd, **sizes)
    if count is not None:  # the counts travel on: running statistics need them
        return y, MaskedStats(stats.mean, stats.var, rstd, count)
    return y, Stats(stats.mean, stats.var, rstd)


def _check_values(n: int, x: np.ndarray, pattern: str, what: str, values: str, fix: str) -> None:
    """torch's rule in training: one value per group cannot train; zero values can (an
    empty output)."""
    if n == 1:
        raise InputError(f"{what}: expected more than 1 {values} when training, got input shape "
                         f"{x.shape} (pattern {pattern!r}); {fix}")


def _check_unused_mask(mask, pattern: str, x: np.ndarray) -> None:
    """Refuse a mask that training would refuse (dtype, shape) where the running statistics
    make it unused, as the torch twins do in evaluation: a wrong mask fails before training."""
    if mask is not None:
        _mask_view(mask, make_plan(pattern, x.shape))


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, axis=1, unbiased=True, mask=None):
    """Batch norm: each channel is standardized over the batch and every other axis.

    Pattern ``"[a0] a1 [a2 ...]"`` for ``axis=1``; ``axis=-1`` is channels-last
    (``"[a0 a1 a2] a3"``). In training it uses the batch statistics and updates
    ``running_mean``/``running_var`` in place (see the module docstring); otherwise it
    normalizes with them.

    >>> x = np.array([[4., 3., 2.], [3., 3., 2.], [2., 2., 2.]])
    >>> rm, rv = np.zeros(3), np.ones(3)
    >>> batch_norm(x, rm, rv, training=True)[:, 0].round(4).tolist()
    [1.2247, 0.0, -1.2247]
    >>> rm.round(4).tolist(), rv.round(4).tolist()      # 0.9·old + 0.1·batch, unbiased var
    ([0.3, 0.2667, 0.2], [1.0, 0.9333, 0.9])

    ``mask`` (boolean, broadcasts to x) marks the elements that count: the statistics, and
    the running ones, come from them alone (the unbiased variance with each channel's
    count); every element is normalized. A channel with nothing counted gives exactly
    ``bias`` (0 without one) and keeps its running statistics, as torch.nn does with an
    empty batch and the torch modules do with ``mask=``; one counted value is refused in
    training. The other functions take ``mask`` alike.

    >>> x = np.array([[1., 5.], [3., 7.]])
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> batch_norm(x, rm, rv, bias=np.array([0.5, 0.5]), training=True,
    ...            mask=np.array([[True, False], [True, False]])).round(4).tolist()
    [[-0.5, 0.5], [1.5, 0.5]]
    >>> rm.tolist(), rv.tolist()                        # channel 1: nothing counted, kept
    ([0.2, 0.0], [1.1, 1.0])
    """
    what = "batch_norm"
    x = _input(x, what)
    training = _flag(training, "training", what, x)
    eps = _check_eps(eps, what, x)
    momentum = _check_momentum(momentum, what)  # (torch refuses a non-number in evaluation too)
    if eps < 0 or training and eps <= 0:  # torch's rule (a NaN eps passes it)
        raise InputError(f"batch_norm: eps must be positive{' in training' if training else ' or zero'}, as "
                         f"torch requires, got eps={eps} for input shape {x.shape}; torch's default is 1e-5")
    if x.ndim == 1 and x.size == 0:  # torch takes an empty 1-D input and returns it
        return np.empty(0, core.result_dtype(x, "[a0]"))
    channel = _channel_axis(x, axis, what)
    names = _names(x.ndim)
    pattern = _pattern(names, set(range(x.ndim)) - {channel})
    channels = x.shape[channel]
    weight, bias = _per_channel(weight, channels), _per_channel(bias, channels)
    running_mean = _running(running_mean, "running_mean", x, channels, what, updated=training)
    running_var = _running(running_var, "running_var", x, channels, what, updated=training)
    if x.size:  # torch returns an empty input before it looks at the dtypes
        _check_channel_params(what, x, channels, weight, bias)
        _check_param_dtypes(what, x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    params = names[channel]
    if training:
        n = math.prod(x.shape) // channels if channels else 0
        if mask is not None and n:
            # the engine's checks of the mask (dtype, shape), before counting with it
            full = _mask_view(mask, make_plan(pattern, x.shape)).reshape(x.shape)
            per_channel = full.sum(axis=tuple(i for i in range(x.ndim) if i != channel))
            # torch.nn's rule on the batch with the padding removed: one value per channel
            # cannot train; none can (torch.nn takes an empty batch), as the torch twins' mask=
            if (per_channel == 1).any():
                raise InputError(f"{what}: expected more than 1 counted value per channel when training, got 1 in "
                                 f"input shape {x.shape} (pattern {pattern!r}); count more or training=False")
        else:
            _check_values(n, x, pattern, what, "value per channel", "use a larger batch or training=False")
        _check_running_pair(running_mean, running_var, what, x)
        y, stats = _normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params, eps=eps, mask=mask)
        if n:  # an empty batch leaves the running statistics as they are
            var = stats.var.reshape(channels)
            has_values = None
            if mask is not None:  # and so does a channel with nothing counted
                n = stats.count.reshape(channels)
                has_values = n > 0
            _update(running_mean, stats.mean.reshape(channels), momentum, has_values)
            with np.errstate(divide="ignore", invalid="ignore"):  # (n = 0 is not written back)
                _update(running_var, var * (n / (n - 1) if unbiased else 1.0), momentum, has_values)
        return y
    if running_mean is None or running_var is None:
        if not x.size:  # torch returns an empty input before it asks for the running statistics
            return np.empty(x.shape, core.result_dtype(x, pattern))
        raise InputError(f"batch_norm: running_mean and running_var are needed when training=False, got "
                         f"{_given_pair(running_mean, running_var)} for input shape {x.shape}; pass both, or "
                         "training=True to normalize with the batch's statistics")
    _check_unused_mask(mask, pattern, x)
    with np.errstate(invalid="ignore", divide="ignore"):  # as torch: NaN or inf where var + eps <= 0
        rstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    # the given rstd carries eps (any float): the engine's own eps is unused
    return core.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=0.0,
                          mean=running_mean, rstd=rstd)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, mask=None):
    """Layer norm over the trailing ``normalized_shape`` axes, with elementwise affine
    parameters of that shape, as ``torch.nn.functional.layer_norm``.

    >>> layer_norm(np.array([[4., 3., 2.]]), 3).round(4).tolist()
    [[1.2247, 0.0, -1.2247]]
    """
    return _trailing(x, normalized_shape, weight, bias, eps, rms=False, what="layer_norm", mask=mask)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, mask=None):
    """RMS norm over the trailing ``normalized_shape`` axes, as ``torch.nn.functional.rms_norm``.

    ``eps=None`` uses the machine epsilon of the compute dtype, as torch does: float32's
    for float16 and float32 input, float64's for float64.

    >>> rms_norm(np.array([[3., 4.]]), 2, eps=0.0).round(4).tolist()
    [[0.8485, 1.1314]]
    """
    x = _input(x, "rms_norm")
    if eps is None:
        compute = np.float64 if core.result_dtype(x, "rms_norm") == np.float64 else np.float32
        eps = float(np.finfo(compute).eps)
    return _trailing(x, normalized_shape, weight, None, eps, rms=True, what="rms_norm", mask=mask)


def _trailing(x, normalized_shape, weight, bias, eps, rms: bool, what: str, mask=None):
    x = _input(x, what)
    shape = _normalized_shape(normalized_shape, what, x)
    k = len(shape)
    if k == 0:  # torch refuses it too; suggesting () back, or x.shape[-1:] of a 0-d input, would not help
        fix = f"pass e.g. normalized_shape={x.shape[-1:]}" if x.ndim else "a 0-d input has no axis to normalize over"
        raise ShapeError(f"{what}: normalized_shape () names no axis, got input shape {x.shape}; it needs at least "
                         f"one trailing axis: {fix}")
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != tuple(int(s) for s in shape):
        # (a 0-d input's trailing sizes are (), which the check above refuses: no normalized_shape fits it)
        fix = (f"pass normalized_shape={tuple(x.shape[-k:])}" if x.ndim else
               f"a 0-d input has no axis to normalize over; pass an input whose last sizes are {shape}")
        raise ShapeError(f"{what}: normalized_shape {shape} must equal the last {k} sizes of the input, "
                         f"got input shape {x.shape}; {fix}")
    for name, param in (("weight", weight), ("bias", bias)):
        # torch's rule, said in torch's terms (the pattern below names axes the caller never wrote)
        if param is not None and getattr(param, "shape", shape) != shape:
            raise ParamsError(f"{what}: {name} has shape {tuple(param.shape)}, but normalized_shape is {shape} "
                              f"(input shape {x.shape}); pass a {name} of shape {shape}")
    if not rms:  # torch's rms_norm takes a weight of any dtype
        _check_param_dtypes(what, x, weight=weight, bias=bias)
    names = _names(k)
    pattern = "... [" + " ".join(names) + "]"
    params = " ".join(names) if weight is not None or bias is not None else None
    return _normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params, eps=_check_eps(eps, what, x),
                                 rms=rms, mask=mask)[0]


def _normalized_shape(normalized_shape, what: str, x: np.ndarray) -> tuple[int, ...]:
    """A sequence of ints, as torch takes it, or an int, as torch.nn.LayerNorm takes it
    (a string would split into its characters, a float would not index)."""
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        if np.ndim(normalized_shape) == 0:
            return (operator.index(normalized_shape),)
        return tuple(operator.index(s) for s in normalized_shape)
    except TypeError:
        raise InputError(f"{what}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r} "
                         f"for input shape {x.shape}; pass e.g. normalized_shape={tuple(x.shape[-1:])}") from None


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, mask=None):
    """Group norm: each sample's channels are split into ``num_groups`` groups, each
    standardized over its channels and all positions, as ``torch.nn.functional.group_norm``.

    Pattern ``"a0 (g [c]) [a2 ...]"``; weight and bias are per channel (``params="(g c)"``).

    >>> x = np.arange(8.).reshape(1, 4, 2)
    >>> group_norm(x, 2)[0, :2].round(4).tolist()
    [[-1.3416, -0.4472], [0.4472, 1.3416]]
    """
    what = "group_norm"
    x = _input(x, what)
    channel = _channel_axis(x, axis, what)
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise InputError(f"group_norm: num_groups must be a positive int, got {num_groups!r} for input shape "
                         f"{x.shape}; pass a divisor of the {x.shape[channel]} channels")
    if x.shape[channel] % num_groups:
        raise ShapeError(
            f"group_norm: num_groups={num_groups} must divide the {x.shape[channel]} channels of input shape "
            f"{x.shape}; pick a divisor of {x.shape[channel]}"
        )
    _check_channel_params(what, x, x.shape[channel], weight, bias, num_groups=int(num_groups))
    _check_param_dtypes(what, x, weight=weight, bias=bias)
    parts = []
    for i in range(x.ndim):
        if i == 0:
            parts.append("n")
        elif i == channel:
            parts.append("(g [c])")
        else:
            parts.append(f"[s{i}]")
    pattern = " ".join(parts)
    if mask is None:  # torch's rule (F.group_norm's batch check), as the torch twin keeps it: not one value in all
        _check_values(x.size // num_groups, x, pattern, what, "value per channel",
                      "torch refuses a single sample whose groups hold one value each; pass a smaller num_groups "
                      "or more than one sample")
    params = "(g c)" if weight is not None or bias is not None else None
    return _normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params,
                                 eps=_check_eps(eps, what, x), g=int(num_groups), mask=mask)[0]


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, mask=None):
    """Instance norm: each (sample, channel) is standardized over its positions, as
    ``torch.nn.functional.instance_norm``. Pattern ``"a0 a1 [a2 ...]"``.

    With ``use_input_stats`` the running statistics (if given) move towards the batch
    mean of the per-instance mean and unbiased variance, as in torch; otherwise they
    normalize.

    >>> instance_norm(np.array([[[1., 4., 7.], [0., 2., 4.]]]))[0].round(4).tolist()
    [[-1.2247, 0.0, 1.2247], [-1.2247, 0.0, 1.2247]]
    """
    what = "instance_norm"
    x = _input(x, what)
    use_input_stats = _flag(use_input_stats, "use_input_stats", what, x)
    momentum = _check_momentum(momentum, what)  # (torch refuses a non-number without running statistics too)
    if x.ndim < 3:
        raise ShapeError(f"instance_norm needs (batch, channel, positions...), got input shape {x.shape}")
    names = _names(x.ndim)
    pattern = _pattern(names, set(range(2, x.ndim)))
    batch, channels = x.shape[:2]
    running_mean = _running(running_mean, "running_mean", x, channels, what, updated=use_input_stats)
    running_var = _running(running_var, "running_var", x, channels, what, updated=use_input_stats)
    _check_channel_params(what, x, channels, weight, bias)
    _check_param_dtypes(what, x, weight=weight, bias=bias)  # torch takes running statistics of any dtype here
    params = names[1] if weight is not None or bias is not None else None
    eps = _check_eps(eps, what, x)
    if use_input_stats:
        n = math.prod(x.shape[2:])
        _check_values(n, x, pattern, what, "spatial element", "use more positions or use_input_stats=False")
        _check_running_pair(running_mean, running_var, what, x)
        y, stats = _normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params, eps=eps, mask=mask)
        if mask is not None and (stats.count == 1).any():
            # torch's rule on each instance with its padding removed (none counted is no error, as in batch_norm)
            raise InputError(f"{what}: expected more than 1 counted spatial element per instance when training, "
                             f"got 1 in input shape {x.shape} (pattern {pattern!r}); count more or "
                             "use_input_stats=False")
        if running_mean is not None or running_var is not None:
            if mask is not None:  # each instance's own count (at least 2 for an unbiased variance)
                count = np.maximum(stats.count, 2)
                unbiased_var = stats.var * (count / (count - 1))
            else:
                unbiased_var = stats.var * (n / (n - 1)) if n else None
            per_instance = ((running_mean, stats.mean), (running_var, unbiased_var))
            counted = None if mask is None else stats.count > 0  # an all-padding instance has no statistics
            for buffer, value in per_instance:
                if buffer is not None:
                    _update_instance(buffer, value, n, batch, momentum, counted)
        return y
    if running_mean is None or running_var is None:
        raise InputError(f"instance_norm: running_mean and running_var are needed when use_input_stats=False, got "
                         f"{_given_pair(running_mean, running_var)} for input shape {x.shape}; pass both, or "
                         "use_input_stats=True to normalize with each instance's statistics")
    _check_unused_mask(mask, pattern, x)
    mean = np.broadcast_to(running_mean.astype(np.float64), (batch, channels))
    with np.errstate(invalid="ignore", divide="ignore"):  # as torch: NaN or inf where var + eps <= 0
        rstd = np.broadcast_to(1.0 / np.sqrt(running_var.astype(np.float64) + eps), (batch, channels))
    # the given rstd carries eps (any float): the engine's own eps is unused
    return core.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=0.0, mean=mean, rstd=rstd)
