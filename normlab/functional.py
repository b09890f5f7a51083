"""torch.nn.functional-style norms on NumPy arrays, as thin presets over patterns.

Each function builds a pattern and calls the one engine. Running statistics follow
PyTorch and are updated **in place**:

* momentum weights the *new* batch: ``running = (1 − momentum)·running + momentum·batch``
  (Keras and Flax call ``1 − momentum`` their momentum);
* ``running_var`` stores the *unbiased* batch variance (``n/(n − 1)`` times the biased
  one that normalizes), as PyTorch does; ``unbiased=False`` stores the biased one, as
  ONNX, Keras and Flax do.
"""

from __future__ import annotations

import numpy as np

from normlab import core
from normlab.errors import InputError, ShapeError

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]


def _input(x, what: str) -> np.ndarray:
    """``x`` as an array; a masked array with masked elements is refused (see :func:`core.reject_masked`)."""
    core.reject_masked(x, "x", f"{what}, input shape {np.shape(x)}")
    return np.asarray(x)


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


def _channel_axis(x: np.ndarray, axis: int, what: str) -> int:
    if x.ndim < 2:
        raise ShapeError(f"{what} needs an input with a batch and a channel axis, got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim or axis % x.ndim == 0:
        raise ShapeError(
            f"{what}: axis={axis} is not a channel axis of input shape {x.shape}; "
            f"pick one of 1..{x.ndim - 1} (or -1 for channels-last); axis 0 is the batch"
        )
    return axis % x.ndim


def _running(buffer, name: str, channels: int, what: str):
    if buffer is None:
        return None
    if not isinstance(buffer, np.ndarray) or buffer.dtype.kind != "f":
        raise InputError(f"{what}: {name} must be a float NumPy array (it is updated in place)")
    if buffer.shape != (channels,):
        raise ShapeError(f"{what}: {name} has shape {buffer.shape}, expected ({channels},) for the channels")
    return buffer


def _update(buffer, batch_value, momentum: float) -> None:
    if buffer is not None:
        buffer *= 1.0 - momentum
        buffer += (momentum * batch_value).astype(buffer.dtype)


def _check_momentum(momentum, what: str) -> float:
    if momentum is None or not 0.0 <= float(momentum) <= 1.0:
        raise InputError(f"{what}: momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, axis=1, unbiased=True):
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
    """
    what = "batch_norm"
    x = _input(x, what)
    channel = _channel_axis(x, axis, what)
    names = _names(x.ndim)
    pattern = _pattern(names, set(range(x.ndim)) - {channel})
    channels = x.shape[channel]
    running_mean = _running(running_mean, "running_mean", channels, what)
    running_var = _running(running_var, "running_var", channels, what)
    params = names[channel]
    if training:
        n = x.size // channels if channels else 0
        if n <= 1:
            raise InputError(
                f"batch_norm: expected more than 1 value per channel when training, got input shape {x.shape} "
                f"(pattern {pattern!r}); use a larger batch or training=False"
            )
        momentum = _check_momentum(momentum, what)
        y, stats = core.normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params, eps=eps)
        var = stats.var.reshape(channels)
        _update(running_mean, stats.mean.reshape(channels), momentum)
        _update(running_var, var * (n / (n - 1) if unbiased else 1.0), momentum)
        return y
    if running_mean is None or running_var is None:
        raise InputError("batch_norm: running_mean and running_var are needed when training=False")
    rstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    return core.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=eps,
                          mean=running_mean, rstd=rstd)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm over the trailing ``normalized_shape`` axes, with elementwise affine
    parameters of that shape, as ``torch.nn.functional.layer_norm``.

    >>> layer_norm(np.array([[4., 3., 2.]]), 3).round(4).tolist()
    [[1.2247, 0.0, -1.2247]]
    """
    return _trailing(x, normalized_shape, weight, bias, eps, rms=False, what="layer_norm")


def rms_norm(x, normalized_shape, weight=None, eps=None):
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
    return _trailing(x, normalized_shape, weight, None, eps, rms=True, what="rms_norm")


def _trailing(x, normalized_shape, weight, bias, eps, rms: bool, what: str):
    x = _input(x, what)
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or tuple(x.shape[x.ndim - k:]) != tuple(int(s) for s in shape):
        raise ShapeError(
            f"{what}: normalized_shape {shape} must equal the last {k} sizes of the input, "
            f"got input shape {x.shape}; pass normalized_shape={tuple(x.shape[-k:]) if k else x.shape[-1:]}"
        )
    names = _names(k)
    pattern = "... [" + " ".join(names) + "]"
    params = " ".join(names) if weight is not None or bias is not None else None
    return core.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=eps, rms=rms)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1):
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
        raise InputError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    if x.shape[channel] % num_groups:
        raise ShapeError(
            f"group_norm: num_groups={num_groups} must divide the {x.shape[channel]} channels of input shape "
            f"{x.shape}; pick a divisor of {x.shape[channel]}"
        )
    parts = []
    for i in range(x.ndim):
        if i == 0:
            parts.append("n")
        elif i == channel:
            parts.append("(g [c])")
        else:
            parts.append(f"[s{i}]")
    params = "(g c)" if weight is not None or bias is not None else None
    return core.normalize(x, " ".join(parts), weight=weight, bias=bias, params=params, eps=eps, g=int(num_groups))


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
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
    if x.ndim < 3:
        raise ShapeError(f"instance_norm needs (batch, channel, positions...), got input shape {x.shape}")
    names = _names(x.ndim)
    pattern = _pattern(names, set(range(2, x.ndim)))
    batch, channels = x.shape[:2]
    running_mean = _running(running_mean, "running_mean", channels, what)
    running_var = _running(running_var, "running_var", channels, what)
    params = names[1] if weight is not None or bias is not None else None
    if use_input_stats:
        n = int(np.prod(x.shape[2:]))
        if n <= 1:
            raise InputError(
                f"instance_norm: expected more than 1 spatial element when training, got input shape {x.shape} "
                f"(pattern {pattern!r})"
            )
        y, stats = core.normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params, eps=eps)
        if running_mean is not None or running_var is not None:
            momentum = _check_momentum(momentum, what)
            var = stats.var.reshape(batch, channels)
            _update(running_mean, stats.mean.reshape(batch, channels).mean(axis=0), momentum)
            _update(running_var, (var * n / (n - 1)).mean(axis=0), momentum)
        return y
    if running_mean is None or running_var is None:
        raise InputError("instance_norm: running_mean and running_var are needed when use_input_stats=False")
    mean = np.broadcast_to(running_mean.astype(np.float64), (batch, channels))
    rstd = np.broadcast_to(1.0 / np.sqrt(running_var.astype(np.float64) + eps), (batch, channels))
    return core.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=eps, mean=mean, rstd=rstd)
