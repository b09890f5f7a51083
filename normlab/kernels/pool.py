"""Recycled memory for large outputs, as ONNX Runtime's arena recycles its own.

A fresh 128 MB array costs the operating system about 4 ms of page zeroing when it is
first written: a third of a layer norm at memory bandwidth. So large outputs are carved
from a few kept buffers.

**When a buffer may be reused.** Each handed-out result gets its own small owner object,
and the result's memory is exported through the owner's ``__array_interface__``: the
result's ``.base`` is the owner. Everything that can reach the memory holds the owner:
NumPy views, slices, reshapes and transposes (their ``.base`` chain ends at the result),
``torch.from_numpy`` and ``torch.from_dlpack`` tensors, ``np.from_dlpack`` arrays,
memoryviews and other buffer exports, ``np.ctypeslib.as_ctypes`` arrays (each keeps the
result alive, and the result keeps its owner). The pool keeps only a weak reference to
the owner, and a buffer is handed out again only after its owner's weak reference is
dead. Python guarantees that an object reachable through a strong reference is alive,
on every implementation and build (free-threaded ones included), so a result that is
still held is never overwritten. (A raw address taken with ``.ctypes.data`` or
``.data_ptr()`` holds nothing; keep the array too, as with any NumPy array.)

``NORMLAB_OUTPUT_POOL=0`` turns recycling off; :func:`release` drops the kept buffers.

**Memory not recycled** (below the threshold, or none free) is ``np.empty``'s, or, within
:func:`fresh_memory_from`, its caller's: the torch front end has torch allocate it, so
that its outputs are tensors whose storage resizes, as torch.nn's do.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np

MIN_BYTES = 8 << 20  # below this, page zeroing is cheap next to the kernel
# Calls that make several outputs at once (the fused blocks: y and x + r, ∂x and ∂z) recycle
# from glibc's mmap threshold: below 8 MB their outputs, freed together after each call,
# leave a free top of the heap past glibc's trim threshold, which then returns it to the
# system, and the next call pays the page faults again: 1.3-1.7 ms instead of 0.2 for
# FusedAddRMSNorm's forward on 128×4096 float32 in a loop (2-core AMD EPYC VM)
MULTI_OUTPUT_MIN_BYTES = 128 << 10
# glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): an allocation of this
# size or more is mapped fresh from the system every time, however often one was freed, so a
# copy that torch makes of it pays its page faults on every call
FRESH_PAGES_FROM = 32 << 20
MAX_BUFFERS = 8
MAX_TOTAL_BYTES = 1 << 30


@dataclass(frozen=True)
class _Slot:
    buffer: np.ndarray
    address: int
    owner: weakref.ref | None  # dead once nothing holds the result carved from ``buffer``

    @property
    def free(self) -> bool:
        return self.owner is None or self.owner() is None


class _Owner:
    """Exports one result's memory (a whole kept buffer, seen with the result's shape
    and dtype) and holds the buffer, so the memory outlives :func:`release`."""

    __slots__ = ("buffer", "__array_interface__", "__weakref__")

    def __init__(self, slot: _Slot, shape: tuple[int, ...], dtype: np.dtype):
        self.buffer = slot.buffer
        self.__array_interface__ = {"data": (slot.address, False), "shape": shape, "typestr": dtype.str,
                                    "descr": dtype.descr, "version": 3}


_slots: list[_Slot] = []
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("NORMLAB_OUTPUT_POOL", "1") != "0"


def empty(shape: tuple[int, ...], dtype, min_bytes: int | None = None) -> np.ndarray:
    """Like ``np.empty(shape, dtype)``; arrays of ``min_bytes`` (default :data:`MIN_BYTES`)
    and more reuse memory that no live result holds.

    >>> a = empty((1024, 4096), np.float32); address = a.ctypes.data
    >>> b = empty((1024, 4096), np.float32)      # a is alive: b gets other memory
    >>> b.ctypes.data != address
    True
    >>> del a
    >>> empty((1024, 4096), np.float32).ctypes.data == address   # a's memory, recycled
    True
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < (MIN_BYTES if min_bytes is None else min_bytes) or not enabled():
        # (inlined, as below: the fused blocks' small calls make three outputs a step)
        return np.empty(shape, dtype) if _local.allocate is None else _local.allocate(shape, dtype)
    with _lock:
        index = _take(nbytes)
        if index is None:
            return np.empty(shape, dtype) if _local.allocate is None else _local.allocate(shape, dtype)
        slot = _slots[index]
        owner = _Owner(slot, shape, dtype)
        _slots[index] = _Slot(slot.buffer, slot.address, weakref.ref(owner))
    return np.asarray(owner)  # its .base is the owner


class _Local(threading.local):
    allocate = None  # this thread's fresh_memory_from (a class default: no getattr call to read it)


_local = _Local()


class fresh_memory_from:
    """Within, on this thread, :func:`empty` takes the memory it does not recycle from
    ``allocate(shape, dtype)`` (an array like ``np.empty``'s) instead of ``np.empty``.
    (A class, not a generator: the torch twins' backward passes enter it on every call.)

    >>> with fresh_memory_from(np.zeros):
    ...     empty((2,), np.float64).tolist()
    [0.0, 0.0]
    """

    __slots__ = ("allocate", "previous")

    def __init__(self, allocate):
        self.allocate = allocate

    def __enter__(self):
        self.previous = _local.allocate
        _local.allocate = self.allocate

    def __exit__(self, *_):
        _local.allocate = self.previous


def _take(nbytes: int) -> int | None:
    """The index of a free kept buffer of exactly ``nbytes`` (allocating one, and dropping
    a free one of another size to make room, when needed), or None when the pool is full
    of live results. Called with the lock held."""
    spare = None
    for index, slot in enumerate(_slots):
        if slot.free:
            if slot.buffer.nbytes == nbytes:
                return index
            spare = index
    if spare is not None and _full(nbytes):
        del _slots[spare]  # by position: a free buffer of another size makes room
    if _full(nbytes):
        return None
    buffer = np.empty(nbytes, np.uint8)
    _slots.append(_Slot(buffer, buffer.ctypes.data, None))
    return len(_slots) - 1


def _full(nbytes: int) -> bool:
    return len(_slots) >= MAX_BUFFERS or _total() + nbytes > MAX_TOTAL_BYTES


def _total() -> int:
    return sum(slot.buffer.nbytes for slot in _slots)


def release() -> None:
    """Drop the kept buffers (results still alive keep their own memory)."""
    with _lock:
        _slots.clear()


def _after_fork_in_child() -> None:
    # a thread of the parent may have held the lock at the fork; no thread holds it here
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
