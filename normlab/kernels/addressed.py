"""The serial row kernels and batch norm's column kernels on raw addresses: the torch twins' small calls.

A small layer or RMS norm's call is mostly Python: a NumPy view of each tensor costs
more than the kernel, and an output made by NumPy comes back to torch through
``torch.from_numpy``, whose storage cannot be resized (tools that free and refill memory
with ``resize_``, such as PyG's reversible ``GroupAddRev``, then fail on it). So the twins
allocate the output (and the gradients) with torch and hand the kernels its address and
the input's (``Tensor.data_ptr()``, a few times cheaper than a view); the arrays are built
here, in compiled code, and handed to the same serial kernel, which computes the same bits.

The addresses must be of C-contiguous memory of ``rows·n`` elements of the kernel's dtype,
aligned to it, alive for the call: the caller holds the tensors.
"""

from __future__ import annotations

import numpy as np
from numba import carray
from numba.core import types as numba_types
from numba.extending import intrinsic

from normlab.kernels import columns
from normlab.kernels._jit import helper
from normlab.kernels.rows import CANCELLATION, row_backward, row_forward, row_forward32  # noqa: F401 (the column callers pass it)
from normlab.kernels.rows_backward import row_backward32


@intrinsic
def _pointer(typingctx, address, kind):
    """The integer ``address`` as a pointer to values of ``kind`` (LLVM's ``inttoptr``): a
    NumPy scalar type (``np.float32``), or an array, whose dtype it takes."""
    if not isinstance(address, numba_types.Integer):
        return None
    if isinstance(kind, numba_types.NumberClass):
        dtype = kind.instance_type
    elif isinstance(kind, numba_types.Array):
        dtype = kind.dtype
    else:
        return None
    signature = numba_types.CPointer(dtype)(address, kind)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


_serial32 = row_forward32.serial
_serial64 = row_forward.serial


@helper
def row_forward32_at(x_address, y_address, rows, n, weight, bias, param_row_stride, param_inner, rms, eps, stats):
    """``row_forward32``'s serial kernel on the float32 rows at ``x_address``, its output
    written at ``y_address``; ``stats`` is the (3, rows) float64 mean, var and rstd."""
    plain = (np.intp(1), np.intp(0), np.intp(0))  # strided.PLAIN_ROWS, typed as a Python tuple of ints is
    x = carray(_pointer(x_address, np.float32), (rows, n))
    y = carray(_pointer(y_address, np.float32), (rows, n))
    _serial32(x, plain, y, plain, n, weight, bias, param_row_stride, param_inner, rms, eps, False,
              stats[0], stats[1], stats[2])


@helper
def row_forward_at(x_address, y_address, rows, n, weight, bias, param_row_stride, param_inner, rms, eps, stats):
    """As :func:`row_forward32_at`, for float64 rows (``row_forward``'s serial kernel)."""
    plain = (np.intp(1), np.intp(0), np.intp(0))
    x = carray(_pointer(x_address, np.float64), (rows, n))
    y = carray(_pointer(y_address, np.float64), (rows, n))
    _serial64(x, plain, y, plain, n, weight, bias, param_row_stride, param_inner, rms, eps, False,
              stats[0], stats[1], stats[2])


_backward32 = row_backward32.serial
_backward64 = row_backward.serial


@helper
def row_backward32_at(grad_y_address, one_value, x_address, grad_x_address, grad_weight_address, grad_bias_address,
                      weight, mean, rstd, rows, n, param_row_stride, param_inner, rms):
    """``kernels.fast.FastBackward``'s call on the float32 rows at these addresses, for a
    plan of one chunk of rows (``kernels.row_chunks``) whose weight table is the weight
    reshaped (``FastForward.direct_params``): ``grad_x`` written at ``grad_x_address``, the
    weight and bias gradients (float64 sums rounded once to float32) at theirs where not 0.
    ``one_value``: the output gradient is one value expanded (a ``.sum()`` loss's), read at
    ``grad_y_address``. ``mean`` and ``rstd``: the forward's float64 (rows,) statistics
    (``mean`` any such array for RMS, which reads zeros). The float32 kernel's ``redo``
    reruns the call in float64, as ``FastBackward`` does."""
    plain = (np.intp(1), np.intp(0), np.intp(0))
    if one_value:
        grad_y = np.full((rows, n), carray(_pointer(grad_y_address, np.float32), 1)[0])
    else:
        grad_y = carray(_pointer(grad_y_address, np.float32), (rows, n))
    x = carray(_pointer(x_address, np.float32), (rows, n))
    grad_x = carray(_pointer(grad_x_address, np.float32), (rows, n))
    mean_rows = np.zeros(rows) if rms else mean
    parts = np.zeros((2, 1, weight.shape[0], weight.shape[1]))
    redo = np.zeros(1, np.bool_)
    _backward32(grad_y, plain, x, plain, n, weight, param_row_stride, param_inner, rms, 0.0, True, mean_rows, rstd,
                rows, grad_x, plain, parts[0], parts[1], redo)
    if redo[0]:  # gradients past float32's range: the float64 kernel's, grad_x rounded to float32
        parts = np.zeros((2, 1, weight.shape[0], weight.shape[1]))
        grad_x64 = np.empty((rows, n))
        _backward64(grad_y.astype(np.float64), plain, x.astype(np.float64), plain, n, weight.astype(np.float64),
                    param_row_stride, param_inner, rms, 0.0, True, mean_rows, rstd, rows, grad_x64, plain, parts[0],
                    parts[1])
        for r in range(rows):
            for i in range(n):
                grad_x[r, i] = np.float32(grad_x64[r, i])
    size = weight.shape[0] * weight.shape[1]
    for part, address in ((0, grad_weight_address), (1, grad_bias_address)):
        if address:
            gradient, sums = carray(_pointer(address, np.float32), size), parts[part, 0].reshape(size)
            for i in range(size):
                gradient[i] = np.float32(sums[i])


@helper
def row_backward_at(grad_y_address, one_value, x_address, grad_x_address, grad_weight_address, grad_bias_address,
                    weight, mean, rstd, rows, n, param_row_stride, param_inner, rms):
    """As :func:`row_backward32_at`, for float64 rows (``rows.row_backward``'s serial kernel)."""
    plain = (np.intp(1), np.intp(0), np.intp(0))
    if one_value:
        grad_y = np.full((rows, n), carray(_pointer(grad_y_address, np.float64), 1)[0])
    else:
        grad_y = carray(_pointer(grad_y_address, np.float64), (rows, n))
    x = carray(_pointer(x_address, np.float64), (rows, n))
    grad_x = carray(_pointer(grad_x_address, np.float64), (rows, n))
    mean_rows = np.zeros(rows) if rms else mean
    parts = np.zeros((2, 1, weight.shape[0], weight.shape[1]))
    _backward64(grad_y, plain, x, plain, n, weight, param_row_stride, param_inner, rms, 0.0, True, mean_rows, rstd,
                rows, grad_x, plain, parts[0], parts[1])
    size = weight.shape[0] * weight.shape[1]
    for part, address in ((0, grad_weight_address), (1, grad_bias_address)):
        if address:
            gradient, sums = carray(_pointer(address, np.float64), size), parts[part, 0].reshape(size)
            for i in range(size):
                gradient[i] = sums[i]


_first_stats, _last_stats = columns.channels_first_stats.serial, columns.channels_last_stats.serial
_first_apply, _last_apply = columns.channels_first_apply.serial, columns.channels_last_apply.serial
_first_apply32, _last_apply32 = columns.channels_first_apply32.serial, columns.channels_last_apply32.serial
_first_backward, _last_backward = columns.channels_first_backward.serial, columns.channels_last_backward.serial


@helper
def column_forward32_at(x_address, y_address, outer, channels, inner, witness, weight, bias, rms, eps, cancellation,
                        group_rows, block_channels, outer_chunk, mean, var, rstd):
    """``kernels.column_forward`` (batch norm's training forward, statistics computed) with
    its serial kernels, on the float32 (outer, C, inner) values at ``x_address`` (``inner``
    1: channels last), the output written at ``y_address``; ``witness``: any float32 array."""
    if inner == 1:
        x2 = carray(_pointer(x_address, witness), (outer, channels))
        y2 = carray(_pointer(y_address, witness), (outer, channels))
        _last_stats(x2, rms, eps, cancellation, group_rows, block_channels,
                    np.empty((4, -(-outer // group_rows), channels)), mean, var, rstd)
        _last_apply32(x2, y2, weight, bias, mean, rstd, group_rows, block_channels)
        return
    x = carray(_pointer(x_address, witness), (outer, channels, inner))
    y = carray(_pointer(y_address, witness), (outer, channels, inner))
    _first_stats(x, rms, eps, cancellation, outer_chunk, np.empty((4, -(-outer // outer_chunk), channels)), mean, var,
                 rstd)
    _first_apply32(x, y, weight, bias, mean, rstd)


@helper
def column_forward_at(x_address, y_address, outer, channels, inner, witness, weight, bias, rms, eps, cancellation,
                      group_rows, block_channels, outer_chunk, mean, var, rstd):
    """As :func:`column_forward32_at`, for float64 values (``witness``: a float64 array)."""
    if inner == 1:
        x2 = carray(_pointer(x_address, witness), (outer, channels))
        y2 = carray(_pointer(y_address, witness), (outer, channels))
        _last_stats(x2, rms, eps, cancellation, group_rows, block_channels,
                    np.empty((4, -(-outer // group_rows), channels)), mean, var, rstd)
        _last_apply(x2, y2, weight, bias, mean, rstd, group_rows, block_channels)
        return
    x = carray(_pointer(x_address, witness), (outer, channels, inner))
    y = carray(_pointer(y_address, witness), (outer, channels, inner))
    _first_stats(x, rms, eps, cancellation, outer_chunk, np.empty((4, -(-outer // outer_chunk), channels)), mean, var,
                 rstd)
    _first_apply(x, y, weight, bias, mean, rstd)


@helper
def column_backward_at(grad_y_address, x_address, grad_x_address, outer, channels, inner, witness, weight, rms, mean,
                       rstd, group_rows, block_channels, outer_chunk, grad_weight, grad_bias):
    """``kernels.column_backward`` with given statistics and its serial kernels, on the
    (outer, C, inner) values at these addresses, of ``witness``'s dtype."""
    if inner == 1:
        g2 = carray(_pointer(grad_y_address, witness), (outer, channels))
        x2 = carray(_pointer(x_address, witness), (outer, channels))
        gx2 = carray(_pointer(grad_x_address, witness), (outer, channels))
        _last_backward(g2, x2, weight, mean, rstd, rms, group_rows, block_channels,
                       np.empty((4, -(-outer // group_rows), channels)), gx2, grad_weight, grad_bias)
        return
    g = carray(_pointer(grad_y_address, witness), (outer, channels, inner))
    x = carray(_pointer(x_address, witness), (outer, channels, inner))
    gx = carray(_pointer(grad_x_address, witness), (outer, channels, inner))
    chunks = -(-outer // outer_chunk)
    _first_backward(g, x, weight, mean, rstd, rms, outer_chunk, np.empty((chunks, channels)),
                    np.empty((chunks, channels)), gx, grad_weight, grad_bias)
