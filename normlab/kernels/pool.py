"""Recycled memory for large outputs, as ONNX Runtime's arena recycles its own.

A fresh 128 MB array costs the operating system about 4 ms of page zeroing when it is
first written: a third of a layer norm at memory bandwidth. So large outputs are carved
from a few kept buffers. A buffer is handed out again only when nothing refers to it any
more: NumPy points every view (and ``torch.from_numpy``, a memoryview, ...) at the buffer
that owns the memory, so its reference count shows whether any result is still alive. A
live result is never overwritten.

``NORMLAB_OUTPUT_POOL=0`` turns recycling off; :func:`release` drops the kept buffers.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np

MIN_BYTES = 8 << 20  # below this, page zeroing is cheap next to the kernel
MAX_BUFFERS = 4
MAX_TOTAL_BYTES = 1 << 30

_buffers: list[np.ndarray] = []
_lock = threading.Lock()
# references to a kept buffer that is otherwise unused: the list, the loop variable and
# getrefcount's own argument
_UNUSED_REFCOUNT = 3


def enabled() -> bool:
    return os.environ.get("NORMLAB_OUTPUT_POOL", "1") != "0"


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Like ``np.empty(shape, dtype)``; large arrays reuse memory no live array refers to.

    >>> a = empty((1024, 4096), np.float32); address = a.ctypes.data
    >>> b = empty((1024, 4096), np.float32)      # a is alive: b gets other memory
    >>> b.ctypes.data != address
    True
    >>> del a
    >>> empty((1024, 4096), np.float32).ctypes.data == address   # a's memory, recycled
    True
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or not enabled():
        return np.empty(shape, dtype)
    with _lock:
        spare = buffer = None
        for buffer in _buffers:
            if sys.getrefcount(buffer) == _UNUSED_REFCOUNT:
                if buffer.nbytes == nbytes:
                    return buffer.view(dtype).reshape(shape)
                spare = buffer
        del buffer
        if spare is not None and (len(_buffers) >= MAX_BUFFERS or _total() + nbytes > MAX_TOTAL_BYTES):
            _buffers.remove(spare)  # an unused buffer of another size makes room
        del spare
        if len(_buffers) >= MAX_BUFFERS or _total() + nbytes > MAX_TOTAL_BYTES:
            return np.empty(shape, dtype)
        buffer = np.empty(nbytes, np.uint8)
        _buffers.append(buffer)
        return buffer.view(dtype).reshape(shape)


def _total() -> int:
    return sum(b.nbytes for b in _buffers)


def release() -> None:
    """Drop the kept buffers (results still alive keep their own memory)."""
    with _lock:
        _buffers.clear()
