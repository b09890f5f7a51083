"""Patterns and layouts: a module's pattern, its plan facts per input shape, and the
zero-copy views between tensors and the engine."""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize

from normlab.errors import ParamsError, ShapeError
from normlab import notation
from normlab.notation import parse_params, parse_pattern
from normlab.plan import epsilon_fix, make_plan, onnx_fix, size_given_as


def _traced(checked, cached, text):
    """``checked(text)`` (a parser that checks its argument, then calls ``cached``, an
    ``lru_cache``-d function); while Dynamo traces (the functional API under
    ``torch.compile``), the function under the cache, which Dynamo would trace anyway,
    but with a warning to the user that it ignores the cache."""
    if isinstance(text, str) and torch.compiler.is_compiling():
        return cached.__wrapped__(text)
    return checked(text)


# the masked keywords, which land among the axis sizes of normalize and of Norm's constructor
_MASKED_FIXES = dict.fromkeys(
    ("mask", "segment_ids", "num_segments", "segment_axis"),
    "a mask or segments are no axis size: pass them to normlab.torch.masked.normalize_masked(x, pattern, "
    "mask=..., segment_ids=...).y (it returns y, mean, rstd and count) or to a module's forward, "
    "Norm(pattern)(x, mask=...); ")


@dataclass(frozen=True)
class DimSpec:
    """One input axis of a pattern, as plain tuples: its factors' names, whether each is
    reduced and their sizes where given (None: inferred from the input)."""

    names: tuple[str, ...]
    reduced: tuple[bool, ...]
    sizes: tuple[Optional[int], ...]
    is_ellipsis: bool = False


@dataclass(frozen=True)
class Spec:
    """What one module normalizes: the pattern, the axes weight spans, the axis sizes
    (``"g=32"`` text, so the custom op can take it) and RMS or not, plus the parsed pattern
    as plain tuples (``dims``, ``param_items``) that torch.compile can trace through."""

    pattern: str
    params: Optional[str]
    sizes: str = ""
    rms: bool = False
    dims: tuple[DimSpec, ...] = ()
    param_items: tuple[tuple[str, ...], ...] = ()

    @staticmethod
    def build(pattern: str, params: Optional[str] = None, rms: bool = False, /, **sizes: int) -> "Spec":
        """Check the pattern and params now, so a bad one fails at construction time.
        (Positional arguments first: an axis may be named ``pattern``, ``params`` or ``rms``.)"""
        parsed = _traced(parse_pattern, notation._parse_pattern, pattern)
        items = _traced(parse_params, notation._parse_params, params) if params is not None else ()
        for item in items:
            for name in item:
                if name not in parsed.names:
                    raise ParamsError(f"params {params!r} names axis {name!r}, which pattern {pattern!r} "
                                      f"does not have: name axes from {', '.join(parsed.names)}")
        for name, value in sizes.items():
            if name not in parsed.names:
                fix = (epsilon_fix(name, value) or onnx_fix(parsed, name, value)
                       or _MASKED_FIXES.get(name, "") + f"use one of {', '.join(parsed.names)}")
                raise ShapeError(f"pattern {pattern!r}: size {size_given_as(name, value)} names no axis of the "
                                 f"pattern; {fix}")
        dims = tuple(
            DimSpec((), (dim.reduced,), (), is_ellipsis=True) if dim.is_ellipsis else
            DimSpec(tuple(a.name for a in dim.factors), tuple(a.reduced for a in dim.factors),
                    tuple(sizes.get(a.name) for a in dim.factors))
            for dim in parsed.dims)
        return Spec(pattern, params, _sizes_text(sizes), rms, dims, tuple(items))

    @property
    def size_dict(self) -> dict:
        return _sizes_dict(self.sizes)

    def plan(self, shape) -> "PlanFacts":
        """The plan's facts the torch code needs, for an input of ``shape``: plain integer
        arithmetic on the shape, so torch.compile traces it (dynamic shapes included).
        In eager mode :func:`normlab.make_plan` checks the shape first, for its errors."""
        if not torch.compiler.is_compiling():
            make_plan(self.pattern, tuple(shape), self.params, sizes=self.size_dict)
        names, axis_sizes, reduced = [], [], []
        ellipsis_rank = len(shape) - (len(self.dims) - 1)
        index = 0
        for dim in self.dims:
            if dim.is_ellipsis:
                for k in range(ellipsis_rank):
                    names.append(f"_ellipsis{k}")
                    axis_sizes.append(shape[index])
                    reduced.append(dim.reduced[0])
                    index += 1
                continue
            size = shape[index]
            index += 1
            known = 1
            for factor_size in dim.sizes:
                if factor_size is not None:
                    known *= factor_size
            for name, factor_reduced, factor_size in zip(dim.names, dim.reduced, dim.sizes):
                names.append(name)
                axis_sizes.append(size if len(dim.names) == 1 else factor_size if factor_size is not None
                                  else size // known)
                reduced.append(factor_reduced)
        lookup = {name: i for i, name in enumerate(names)}
        param_axes = [lookup[name] for item in self.param_items for name in item]
        group_size = 1
        for i, is_reduced in enumerate(reduced):
            if is_reduced:
                group_size *= axis_sizes[i]
        param_shape = []
        for item in self.param_items:
            size = 1
            for name in item:
                size *= axis_sizes[lookup[name]]
            param_shape.append(size)
        return PlanFacts(
            tuple(names), tuple(axis_sizes), tuple(reduced), tuple(i for i, r in enumerate(reduced) if r), group_size,
            tuple(axis_sizes[a] for a in param_axes),
            tuple(sorted(range(len(param_axes)), key=lambda k: param_axes[k])),
            tuple(s if i in param_axes else 1 for i, s in enumerate(axis_sizes)), tuple(param_shape))


class PlanFacts(NamedTuple):
    """What the torch-side code needs from a :class:`normlab.plan.Plan`, as plain tuples."""

    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]
    reduced: tuple[bool, ...]
    reduced_axes: tuple[int, ...]
    group_size: int
    param_split_shape: tuple[int, ...]  # weight split into its axes, in params order
    param_order: tuple[int, ...]  # the permutation that puts those axes in pattern order
    param_broadcast_shape: tuple[int, ...]
    param_shape: tuple[int, ...]


def _sizes_text(sizes: dict) -> str:
    return ",".join(f"{name}={int(value)}" for name, value in sorted(sizes.items()))


@functools.lru_cache(maxsize=256)
def _sizes_items(text: str) -> tuple:
    if not text:
        return ()
    return tuple((name, int(value)) for name, value in (item.split("=") for item in text.split(",")))


def _sizes_dict(text: str) -> dict:
    return dict(_traced(_sizes_items, _sizes_items, text))


@functools.lru_cache(maxsize=256)
def _dim_texts(pattern: str, ndim: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The pattern as one text per input axis (the ellipsis spelled out as axes
    ``_ellipsis0 ...``) and how many expanded axes each input axis becomes."""
    parsed = parse_pattern(pattern)
    ellipsis_rank = ndim - (len(parsed.dims) - 1) if parsed.has_ellipsis else 0
    texts, counts = [], []
    for dim in parsed.dims:
        if dim.is_ellipsis:
            for k in range(ellipsis_rank):
                texts.append(f"[_ellipsis{k}]" if dim.reduced else f"_ellipsis{k}")
                counts.append(1)
        elif dim.composed:
            if dim.reduced:
                texts.append("[(" + " ".join(a.name for a in dim.factors) + ")]")
            else:
                texts.append("(" + " ".join(f"[{a.name}]" if a.reduced else a.name for a in dim.factors) + ")")
            counts.append(len(dim.factors))
        else:
            axis = dim.factors[0]
            texts.append(f"[{axis.name}]" if axis.reduced else axis.name)
            counts.append(1)
    return tuple(texts), tuple(counts)


@dataclass(frozen=True)
class Layout:
    """How a dense tensor is seen by the NumPy engine: ``x.permute(perm)`` is C-contiguous
    and ``pattern`` names its axes; ``stats_order`` takes the statistics from that
    order back to the pattern's (None when no permutation is needed)."""

    perm: Optional[tuple[int, ...]]
    pattern: str
    stats_order: Optional[tuple[int, ...]] = None
    expanded_order: Optional[tuple[int, ...]] = None


@functools.lru_cache(maxsize=1024)
def _layout(pattern: str, perm: Optional[tuple[int, ...]], ndim: int) -> Layout:
    if perm is None:
        return Layout(None, pattern)
    texts, counts = _dim_texts(pattern, ndim)
    offsets = np.cumsum((0,) + counts)
    expanded = [int(a) for p in perm for a in range(offsets[p], offsets[p] + counts[p])]
    return Layout(perm, " ".join(texts[p] for p in perm), tuple(int(i) for i in np.argsort(expanded)),
                  tuple(expanded))


def _dense_perm(x: Tensor, keep_gaps: bool = False) -> tuple[Tensor, Optional[tuple[int, ...]]]:
    """``(x, perm)`` with ``x.permute(perm)`` C-contiguous (channels_last: (0, 2, 3, 1));
    perm None for a contiguous tensor. Only a tensor with gaps or overlaps is copied, and
    with ``keep_gaps`` not even that: it comes back as it is, with perm None, for the
    engine to read where it lies (the row kernels read a slice of a packed projection so)
    or to copy."""
    if x.is_contiguous():
        return x, None
    perm = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    if x.permute(perm).is_contiguous():
        return x, perm
    return (x if keep_gaps else x.contiguous()), None


def _has_gaps(x: Tensor) -> bool:
    """True for a tensor that is no permutation of a contiguous one (a slice, a strided view)."""
    return _dense_perm(x, keep_gaps=True)[1] is None and not x.is_contiguous()


# torch.nn.RMSNorm's eps=None, per input dtype: the machine epsilon of the dtype torch computes
# in (its opmath type), float32's for bfloat16 and float16 input, which its kernels upcast
_RMS_DEFAULT_EPS = {dtype: torch.finfo(torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype).eps
                    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


def sizes(shape) -> tuple:
    """``shape`` as a tuple of Python ints for an error message: compiled with dynamic shapes a
    size is a symbol, which prints as ``s31`` where ``operator.index`` gives Dynamo its value,
    and under ``torch.jit.trace`` a traced tensor, which prints as ``tensor(2)``.

    >>> sizes(torch.zeros(2, 3).shape)
    (2, 3)
    """
    return tuple(map(operator.index, shape))


def rms_default_eps(dtype: torch.dtype) -> float:
    """The eps that ``torch.nn.RMSNorm(eps=None)`` uses for input of ``dtype``: the machine
    epsilon of the dtype it computes in, not the input's own (bfloat16's is 0.0078, which
    would swamp the mean square of activations of size 0.1).

    >>> rms_default_eps(torch.bfloat16) == torch.finfo(torch.float32).eps
    True
    """
    eps = _RMS_DEFAULT_EPS.get(dtype)
    return eps if eps is not None else torch.finfo(dtype).eps


def torch_layout(x: Tensor, keeps_channels_last: bool = False) -> Tensor:
    """``x`` laid out as torch.nn's CPU norms lay out their output: contiguous, except that
    batch, group and RMS norm (``keeps_channels_last``) keep channels_last (4-D) and
    channels_last_3d (5-D) input so. A transposed or otherwise permuted input is copied, as
    torch.nn copies it, so that the output's strides are torch.nn's (a ``.view`` that works on
    torch.nn's output works on the twin's).

    >>> torch_layout(torch.zeros(2, 3, 4).transpose(1, 2)).stride()
    (12, 3, 1)
    """
    if x.layout is not torch.strided or x.is_contiguous():
        return x
    if torch._C._are_functorch_transforms_active():
        # (a vmapped tensor answers is_contiguous for the default format alone; torch's ops,
        # which run under the transforms, lay out their output themselves)
        return x
    if keeps_channels_last and ((x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
                                or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))):
        return x
    return x.contiguous()


def elementwise_layout(y: Tensor, x: Tensor) -> Tensor:
    """``y`` (of ``x``'s shape) laid out as torch's elementwise operations lay out their
    result for ``x``: in ``x``'s order of strides, dense (a transposed input gives a
    transposed output, a slice a dense one in its order), as VitDet's layer norm, a mean and
    elementwise operations, lays out its output. Copied only where it is laid out otherwise.

    >>> x = torch.zeros(2, 3, 5, 4).transpose(2, 3)
    >>> elementwise_layout(torch.zeros(2, 3, 4, 5), x).stride() == (x * 1).stride()
    True
    """
    shape, stride = tuple(x.shape), tuple(x.stride())
    try:
        strides = _elementwise_strides(shape, stride)
    except TypeError:  # symbolic sizes (torch.export's dynamic shapes) hash not: computed without the cache
        strides = _elementwise_strides.__wrapped__(shape, stride)
    if all(n == 1 or a == b for n, a, b in zip(y.shape, y.stride(), strides)):
        return y
    if torch._C._are_functorch_transforms_active():
        # (a vmapped tensor's strides are not its memory's, and an unbatched empty tensor cannot
        # be copied into: torch's ops, which run under the transforms, lay out their output)
        return y
    return torch.empty_strided(y.shape, strides, dtype=y.dtype, device=y.device).copy_(y)


@functools.lru_cache(maxsize=64)
def _elementwise_strides(shape: tuple, stride: tuple) -> tuple:
    # torch decides on the meta device as on the CPU (the strides of axes of one element aside,
    # which address no other element and which the devices set apart)
    x = torch.empty_strided(shape, stride, device="meta")
    weight = torch.empty(shape[1], device="meta")[:, None, None]
    mean = x.mean(1, keepdim=True)
    centered = x - mean
    return (weight * (centered / torch.sqrt(centered.pow(2).mean(1, keepdim=True))) + weight).stride()


def _empty_like_dense(x: Tensor, perm) -> Tensor:
    """An uninitialized tensor with ``x``'s shape and dense strides (``x.permute(perm)`` in
    C order): torch allocates it, as torch.nn's outputs (its storage resizes), except from
    ``pool.MIN_BYTES`` on, where it is carved from normlab's recycled output memory:
    ``torch.empty`` would hand the kernel fresh 4 KB pages, whose first-touch faults cost
    more than the normalization itself on large tensors."""
    from normlab.kernels import pool

    if x.dtype not in _NUMPY_DTYPES:
        return torch.empty_like(x)
    shape = tuple(x.shape) if perm is None else tuple(x.shape[p] for p in perm)
    if x.numel() * x.element_size() < pool.MIN_BYTES or not pool.enabled():  # (read now, as pool.empty reads them)
        if perm is None:
            return torch.empty(shape, dtype=x.dtype)
        # (not torch's permute of a C-order tensor: a view; see below)
        dense = torch.empty(shape, dtype=x.dtype).stride()
        inverse = _inverse(perm)
        return torch.empty_strided(tuple(x.shape), tuple(dense[i] for i in inverse), dtype=x.dtype)
    array = pool.empty(shape, _NUMPY_DTYPES[x.dtype])
    # the strides come from NumPy, not torch's permute: an output that is a view of a tensor made
    # inside an autograd Function may not be modified in place (a ReLU(inplace=True) after the norm)
    return torch.from_numpy(array if perm is None else array.transpose(_inverse(perm)))


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_TORCH_DTYPES = {np.dtype(numpy_dtype): dtype for dtype, numpy_dtype in _NUMPY_DTYPES.items()}


class TorchOutputs:
    """Fresh memory for the kernels' outputs allocated by torch, as an allocator for
    :func:`normlab.kernels.pool.fresh_memory_from`; :meth:`tensor` gives an output back as a
    tensor on that memory, whose storage resizes as torch.nn's outputs' do (a
    ``torch.from_numpy`` tensor's never does; tools such as PyG's ``GroupAddRev`` free and
    refill outputs and gradients with ``resize_``).

    >>> from normlab.kernels import pool
    >>> outputs = TorchOutputs()
    >>> with pool.fresh_memory_from(outputs):
    ...     y = pool.empty((2, 3), np.float32)
    >>> outputs.tensor(y.T).untyped_storage().resizable()
    True
    """

    __slots__ = ("tensors",)

    def __init__(self):
        self.tensors: list[Tensor] = []

    def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        torch_dtype = _TORCH_DTYPES.get(np.dtype(dtype))
        if torch_dtype is None or math.prod(shape) == 0:  # (no memory to share: tensor() makes an empty one)
            return np.empty(shape, dtype)
        t = torch.empty(shape, dtype=torch_dtype)
        self.tensors.append(t)
        return array_view(t)

    def tensor(self, array: np.ndarray) -> Tensor:
        """``array`` as a tensor: on the memory torch allocated for it where it lies there
        (a tensor of its own, not a view, which autograd would keep from changing in place);
        ``torch.from_numpy(array)`` where it lies in normlab's recycled memory; else a copy
        torch allocates (:func:`owned_tensor`)."""
        address = array.__array_interface__["data"][0]
        for t in self.tensors:
            start = t.data_ptr()
            if start <= address < start + t.nbytes and _TORCH_DTYPES.get(array.dtype) is t.dtype:
                itemsize = array.itemsize
                strides = tuple(step // itemsize for step in array.strides)
                if array.shape == t.shape and strides == t.stride():
                    return t
                return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset() + (address - start) // itemsize,
                                           array.shape, strides)
        if array.size == 0:
            return torch.empty(array.shape, dtype=_TORCH_DTYPES.get(array.dtype) or torch.from_numpy(array).dtype)
        if not _recycled(array):
            # (memory the engine made without the allocator, as NumPy's product with a weight over
            # the reduced axes: a copy torch allocates, whose storage resizes as torch.nn's outputs')
            return torch.from_numpy(array).clone()
        return torch.from_numpy(array)


def owned_tensor(array: Optional[np.ndarray]) -> Optional[Tensor]:
    """``array`` copied into a contiguous tensor torch allocates (a parameter's gradient, whose
    storage then resizes as torch.nn's do; ``torch.from_numpy``'s never does), or None."""
    return None if array is None else torch.tensor(np.ascontiguousarray(array))  # (torch.tensor keeps strides)


def _recycled(array: np.ndarray) -> bool:
    """Whether ``array`` lies in normlab's recycled output memory (``kernels.pool``), which
    is handed to torch as it is (not resizable; the README says why)."""
    from normlab.kernels import pool

    base = array
    while base is not None:
        if isinstance(base, pool._Owner):
            return True
        base = getattr(base, "base", None)
    return False


def _engine_view(t: Tensor, perm) -> np.ndarray:
    t = t.detach()
    return array_view(t if perm is None else t.permute(perm))


class _TensorMemory:
    """A tensor's memory as NumPy reads it (``__array_interface__``); the array keeps it
    as its base, and so keeps the tensor's storage alive. (The route where NumPy cannot
    import a DLPack capsule: see :func:`array_view`.)"""

    __slots__ = ("tensor", "__array_interface__")


class _DLPackExport:
    """Hands NumPy's ``from_dlpack`` a capsule already made (``__dlpack__``): NumPy asks
    an object, not a capsule. The array keeps the capsule as its base, and the capsule
    the tensor, and so the tensor's storage."""

    __slots__ = ("capsule",)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        return self.capsule


_TYPESTR = {dtype: np.dtype(numpy_dtype).str for dtype, numpy_dtype in
            ((torch.float16, np.float16), (torch.float32, np.float32), (torch.float64, np.float64),
             (torch.int16, np.int16))}


def array_view(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """A NumPy view of a CPU tensor's memory that leaves its storage resizable (None stays
    None), for the kernels to read inputs, gradients and parameters. ``Tensor.numpy()`` marks
    the storage non-resizable for good, and tools free and refill memory with ``resize_``,
    which then raises: FSDP2 (``fully_shard``) its unsharded parameters around each forward
    and backward, PyG's reversible GNNs (``GroupAddRev``) their layers' inputs and outputs.
    Such memory may move between calls: a view kept that long is checked with
    :func:`tensor_layout` first.

    The view comes from a versioned DLPack capsule (writeable, as ``.numpy()``'s is), which
    NumPy reads in C; an ``__array_interface__`` dict, which NumPy looks up and parses anew
    on each call (its type string too), cost a small training step's three views (x, then
    the gradient and x) most of 10 µs more than ``.numpy()``. It stays for a NumPy before
    2.1, which imports no versioned capsule.

    >>> w = torch.ones(3, requires_grad=True)
    >>> array_view(w)[1] = 2.0
    >>> w.detach(), w.untyped_storage().resizable()
    (tensor([1., 2., 1.]), True)
    """
    if t is None:
        return None
    if type(t) is not Tensor or t.requires_grad:  # (a Parameter or subclass; or its graph kept with the view)
        t = t.detach()
    if t.is_neg():  # (a negative-bit view, z.conj().imag, holds the values' opposites, which DLPack ignores)
        t = t.resolve_neg()
    if t.dtype not in _TYPESTR or type(t) is not Tensor or not t.is_cpu or t.numel() == 0:
        if t.numel() == 0 and t.dtype in _TYPESTR and type(t) is Tensor and t.is_cpu:
            # (an empty tensor has no memory to share: an empty array of its shape, .numpy()'s very
            # strides, without .numpy()'s mark, which would leave its storage non-resizable for good)
            return np.empty(t.shape, _TYPESTR[t.dtype])
        return t.numpy()  # (which raises where NumPy cannot read the tensor)
    if t.data_ptr() == t.storage_offset() * t.element_size():  # (its storage's memory at address 0: freed)
        refuse_unallocated(t)
    if _dlpack_capsule is not None:
        export = _DLPackExport()
        try:
            export.capsule = _dlpack_capsule(t)
            return np.from_dlpack(export)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass  # (a device NumPy does not take, pinned memory: the interface below reads any CPU address)
    return _interface_view(t)


# Addresses below this are no allocation's (Linux maps nothing under vm.mmap_min_addr, 64 KiB
# by default). A tensor whose storage was freed (untyped_storage().resize_(0)) has for its
# address its storage offset in bytes (from address 0), so the addressed kernels leave every
# input below it to array_view, which refuses freed ones in torch's words. (A view of freed
# storage from 64 KiB on still reaches them: a check of every call's storage costs more.)
LOWEST_ADDRESS = 1 << 16


def refuse_unallocated(x: Tensor) -> None:
    """Raise torch's RuntimeError for an input that has elements but no memory (its storage
    freed by ``untyped_storage().resize_(0)``, as PyG's ``GroupAddRev`` frees tensors until
    their backward refills them), in torch's words, as torch.nn's layer and group norms raise
    it, then the fix: the kernels, handed its address, would read address 0."""
    fix = (f" (a tensor of shape {tuple(x.shape)} whose storage holds {x.untyped_storage().nbytes()} bytes: "
           "it was freed, as by untyped_storage().resize_(0); refill its storage, or pass another tensor)")
    try:
        torch.nn.functional.layer_norm(x.detach(), x.shape[-1:])  # (torch's check of the memory, its words)
    except RuntimeError as error:
        raise RuntimeError(f"{error.args[0]}{fix}" if error.args and isinstance(error.args[0], str) else fix) \
            from None
    raise RuntimeError(f"The tensor has a non-zero number of elements, but its data is not allocated yet.{fix}")


def _interface_view(t: Tensor) -> np.ndarray:
    """:func:`array_view`'s view through ``__array_interface__``, for a NumPy or torch
    without versioned DLPack capsules."""
    memory = _TensorMemory()
    memory.tensor = t
    # (a torch.Size is the tuple NumPy reads; no strides entry: C order, as parameters and most inputs are)
    memory.__array_interface__ = interface = {"data": (t.data_ptr(), False), "shape": t.shape,
                                              "typestr": _TYPESTR[t.dtype], "version": 3}
    if not t.is_contiguous():
        interface["strides"] = tuple(map(t.itemsize.__mul__, t.stride()))
    return np.asarray(memory)


def _versioned_dlpack():
    """torch's maker of versioned DLPack capsules where NumPy imports them as a
    writeable view of the tensor's memory (NumPy 2.1 and later), else None. An
    unversioned capsule would give a read-only array, another type to the compiled kernels.
    (``Tensor.__dlpack__(max_version=(1, 0))`` calls the same maker, after Python checks
    for streams and devices that cost more than the view.)"""
    make = getattr(torch._C, "_to_dlpack_versioned", None)
    if make is None:
        return None
    probe = torch.zeros(2)
    export = _DLPackExport()
    try:
        export.capsule = make(probe)
        array = np.from_dlpack(export)
    except (AttributeError, BufferError, RuntimeError, TypeError, ValueError):
        return None
    if not array.flags.writeable or array.ctypes.data != probe.data_ptr():
        return None
    return make


_dlpack_capsule = _versioned_dlpack()


param_view = array_view  # (the name the parameters' call sites read)


def _inverse(perm):
    return tuple(int(i) for i in np.argsort(perm))


class ModuleCache(dict):
    """What a module keeps between calls in its ``__dict__``: compiled calls, parameter
    tables, NumPy views of its buffers, all tied to this process and these tensors. It
    pickles and deep-copies as an empty cache, so that ``torch.save(model)`` and
    ``copy.deepcopy(model)`` work after a call (a compiled kernel does not pickle), and the
    loaded or copied module builds its own.

    >>> import pickle
    >>> cache = ModuleCache(key=object())
    >>> pickle.loads(pickle.dumps(cache))
    {}
    """

    __slots__ = ()

    def __reduce__(self):
        return ModuleCache, ()


class Unscriptable:
    """Mixin of normlab's modules with no torch.nn forward (:class:`Norm`, the fused
    blocks): ``torch.jit.script`` raises :func:`unscriptable`'s RuntimeError, which says
    what compiles them instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(unscriptable(self))


def unscriptable(module) -> str:
    """Why torch.jit.script cannot compile ``module``, a normlab module with no torch.nn
    forward, and what compiles it instead."""
    return (f"torch.jit.script cannot compile normlab's {type(module).__name__}: no torch.nn class computes it, and "
            "its forward runs the NumPy kernels; use torch.compile, torch.export or torch.jit.trace (which record "
            "its torch operations), or script a model whose norms are twins of torch.nn classes")


def refuse_non_tensor(module, value, name: str, position: int) -> None:
    """torch's TypeError, in its words, for an argument that is not a tensor (a list, a
    NumPy array, a number), which torch.nn's norms refuse so, before any attribute of it
    is read (None passes: an optional argument left out).

    >>> refuse_non_tensor(torch.nn.Identity(), [1.0], "x", 1)
    Traceback (most recent call last):
    TypeError: Identity.forward(): argument 'x' (position 1) must be Tensor, not list
    """
    if value is not None and not isinstance(value, Tensor):
        kind = type(value)
        shown = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{type(module).__name__}.forward(): argument {name!r} (position {position}) must be Tensor, "
                        f"not {shown}")


def tensor_layout(t: Tensor) -> tuple:
    """Where and how a tensor's elements lie: what a write of ``.data`` may change under
    the same Python object (the version counter records none of it), and what a NumPy
    view of its memory kept between calls depends on."""
    return t.data_ptr(), t.dtype, t.shape, t.stride()


def module_cache(module, name: str) -> ModuleCache:
    """The module's cache called ``name``, made on first use."""
    cache = module.__dict__.get(name)
    if cache is None:
        cache = module.__dict__[name] = ModuleCache()
    return cache


_ABSENT = object()


def affine_parameters(module, with_bias: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The module's ``(weight, bias)`` (bias None unless ``with_bias``), read where
    nn.Module keeps them (its ``__getattr__`` costs a microsecond a name), or through the
    attribute where a parametrization (``torch.nn.utils.parametrize``) has replaced the
    Parameter by a computed property, or the module has none (RMSNorm has no bias)."""
    parameters = module._parameters
    weight = parameters.get("weight", _ABSENT)
    if weight is _ABSENT:
        weight = getattr(module, "weight", None)
    if not with_bias:
        return weight, None
    bias = parameters.get("bias", _ABSENT)
    if bias is _ABSENT:
        bias = getattr(module, "bias", None)
    return weight, bias


def parametrizations_computed(module):
    """For a module with ``torch.nn.utils.parametrize`` parametrizations: a stand-in of its
    class before them, sharing its state, holding each parametrized tensor computed once
    (where the original lies: ``_parameters`` or ``_buffers``); None for any other module
    and under ``torch.compile``. torch.nn's forward computes each parametrized tensor once
    a call, where a twin reads ``weight`` and ``bias`` at several places (its checks, a
    path tried and left): a parametrization that draws random numbers (weight noise,
    DropConnect) or keeps state would run again at each. The stand-in leaves out the
    module's caches (``_normlab_*``), which it would fill with the tensors of this call.

    >>> from torch.nn.utils import parametrize
    >>> norm = torch.nn.LayerNorm(2)
    >>> _ = parametrize.register_parametrization(norm, "weight", torch.nn.Softplus())
    >>> stand_in = parametrizations_computed(norm)
    >>> type(stand_in).__name__, [round(v, 4) for v in stand_in.weight.tolist()]
    ('LayerNorm', [1.3133, 1.3133])
    >>> parametrizations_computed(torch.nn.LayerNorm(2)) is None
    True
    """
    parametrizations = module._modules.get("parametrizations")
    if parametrizations is None or torch.compiler.is_compiling():
        return None
    cls = parametrize.type_before_parametrizations(module)
    stand_in = cls.__new__(cls)
    stand_in.__dict__.update((key, value) for key, value in module.__dict__.items() if not key.startswith("_normlab_"))
    stand_in._modules = {key: value for key, value in module._modules.items() if key != "parametrizations"}
    stand_in._parameters, stand_in._buffers = dict(module._parameters), dict(module._buffers)
    for name, originals in parametrizations.items():
        table = stand_in._parameters if any(True for _ in originals.parameters(recurse=False)) else stand_in._buffers
        table[name] = getattr(module, name)
    return stand_in


def module_buffer(module, name: str):
    """``getattr(module, name, None)`` for a buffer (``running_mean``), read where nn.Module
    keeps it, or through the attribute where a parametrization computes it."""
    value = module._buffers.get(name, _ABSENT)
    return getattr(module, name, None) if value is _ABSENT else value
