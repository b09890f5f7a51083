"""The serial row forward and batch norm's column kernels on raw addresses: the torch twins' small calls.

A small layer or RMS norm's call is mostly Python: a NumPy view of each tensor costs
more than the kernel, and an output made by NumPy comes back to torch through
``torch.from_numpy``, whose storage cannot be resized (tools that free and refill memory
with ``resize_``, such as PyG's reversible ``GroupAddRev``, then fail on it). So the twins
allocate the output with torch and hand the kernels its address and the input's
(``Tensor.data_ptr()``, a few times cheaper than a view); the arrays are built here, in
compiled code, and handed to the same serial kernel, which computes the same bits.

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
from normlab.kernels.rows import CANCELLATION, row_forward, row_forward32  # noqa: F401 (the column callers pass it)


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
