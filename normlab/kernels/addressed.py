"""The serial row forward on raw addresses: the torch twins' small calls.

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

from normlab.kernels._jit import helper
from normlab.kernels.rows import row_forward, row_forward32


@intrinsic
def _pointer(typingctx, address, dtype):
    """The integer ``address`` as a pointer to ``dtype`` values (LLVM's ``inttoptr``)."""
    if not isinstance(address, numba_types.Integer) or not isinstance(dtype, numba_types.NumberClass):
        return None
    pointer = numba_types.CPointer(dtype.instance_type)
    signature = pointer(address, dtype)

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
