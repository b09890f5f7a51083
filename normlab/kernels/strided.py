"""How arrays reach the row kernels: as 2-D (rows, n) arrays, or flat with a row layout.

A C-contiguous array is its ``(rows, n)`` reshape. A strided array whose rows are
contiguous and evenly spaced in at most two levels (a slice of columns; the heads of q
and k sliced from a packed qkv projection, rows ``(b·t, h)`` spaced ``(3·h·d, d)``) is
read where it lies: a flat 1-D view of its memory and a layout ``(per, outer_stride,
per_stride)`` that ``rows.row_at`` reads row ``r`` through. Anything else is copied.
"""

from __future__ import annotations

import numpy as np

PLAIN_ROWS = (1, 0, 0)  # the layout argument beside a 2-D (rows, n) array, which ignores it


def row_layout(array: np.ndarray, n: int, *, disjoint: bool = False):
    """``(rows, layout)`` that the row kernels read ``array`` through as rows of length ``n``
    (``rows.row_at``): a C-contiguous array as its ``(rows, n)`` reshape; a strided one as
    a flat 1-D contiguous view of the memory from its first element to its last, with
    ``layout = (per, outer_stride, per_stride)`` in elements. None when the rows are not
    contiguous, not evenly spaced in at most two levels, or (with ``disjoint``, for an
    output) overlap one another; the caller then copies.

    >>> qkv = np.zeros((2, 5, 3 * 4 * 8), np.float32)     # (b, t, 3·h·d), h=4 heads of d=8
    >>> q = qkv[..., :32].reshape(2, 5, 4, 8)              # a strided view, no copy
    >>> flat, layout = row_layout(q, 8)
    >>> layout, np.shares_memory(flat, qkv)
    ((4, 96, 8), True)
    """
    if array.flags.c_contiguous:
        return array.reshape(-1, n), PLAIN_ROWS
    item = array.itemsize
    dims = [(size, stride) for size, stride in zip(array.shape, array.strides) if size != 1]
    expected, product = item, 1
    while product < n and dims:  # the row: trailing axes of product n, unit-stride contiguous
        size, stride = dims.pop()
        if stride != expected:
            return None
        expected *= size
        product *= size
    if product != n:
        return None
    levels: list[tuple[int, int]] = []  # the rows' (size, stride in elements), outermost first
    for size, stride in dims:
        if stride < 0 or stride % item:
            return None
        stride //= item
        if levels and levels[-1][1] == stride * size:  # adjacent axes that read as one
            levels[-1] = (levels[-1][0] * size, stride)
        else:
            levels.append((size, stride))
    if len(levels) > 2 or (disjoint and not _disjoint_rows(levels, n)):
        return None
    levels = [(1, 0)] * (2 - len(levels)) + levels
    (outer, outer_stride), (per, per_stride) = levels
    span = (outer - 1) * outer_stride + (per - 1) * per_stride + n
    flat = np.lib.stride_tricks.as_strided(array, (span,), (item,))
    return flat, (per, outer_stride, per_stride)


def _disjoint_rows(levels, n: int) -> bool:
    """Whether rows of length ``n`` at the offsets the levels span never share an element
    (each level's stride clears everything the finer levels cover)."""
    extent = n
    for size, stride in sorted(levels, key=lambda level: level[1]):
        if stride < extent:
            return False
        extent += (size - 1) * stride
    return True


def split(array: np.ndarray, sizes: tuple[int, ...]):
    """``array`` reshaped to ``sizes`` as a view (splitting axes never needs a copy)."""
    return array.reshape(sizes)  # not reshape(copy=False): NumPy before 2.1 refuses that keyword


def rows_of(array: np.ndarray, n: int, dtype) -> tuple:
    """``(rows, layout)`` of ``array`` for the row kernels: read where it lies when
    :func:`row_layout` finds its rows, else a contiguous copy in ``dtype``."""
    found = row_layout(array, n) if array.dtype == dtype else None
    if found is None:
        found = (np.ascontiguousarray(array, dtype=dtype).reshape(-1, n), PLAIN_ROWS)
    return found


def one_kind(*operands) -> tuple:
    """The operands of a row kernel all 2-D or all flat: Numba compiles a kernel once per
    combination of kinds, so one strided (flat) operand makes the 2-D ones flat too."""
    if all(rows.ndim == 2 for rows, _ in operands):
        return operands
    return tuple((rows, layout) if rows.ndim == 1 else (rows.reshape(-1), (1, rows.shape[1], 0))
                 for rows, layout in operands)
