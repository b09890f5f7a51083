"""The one place Numba options live.

Every kernel is a plain Python function decorated with :func:`kernel`; helpers called from
kernels use :func:`helper`. Numba compiles a function on its first call, and this module
(which imports Numba) is itself imported only when a kernel is first needed, so
``import normlab`` needs NumPy alone and a kernel never used never compiles.

Options, and why:

* a serial variant (``prange`` runs as ``range``) for inputs too small to repay waking
  threads and for calls that get one thread, and a threaded variant whose ``prange`` loops
  are shared out by claims among the caller and normlab's pool
  (:mod:`normlab.kernels._claims`). The pool and the thread count of each call are
  decided in :mod:`normlab.kernels.threads`.
* ``cache=True``: compiled code is written next to the source and reused across processes.
* no ``fastmath`` in kernels: its ``nnan``/``ninf`` flags let LLVM assume no NaN or Inf,
  which breaks NaN isolation, and ``contract`` changes roundings of the elementwise math.
* the one exception, :func:`reduction`: the float64 sums alone get ``reassoc``, so that LLVM
  may split them into SIMD lanes (about 3x faster; without it every add waits for the
  previous one). The order of addition is then fixed by the compiled code instead of the
  source: the same on every run and every thread count on one machine, possibly different
  in the last bits on a CPU with other vector widths. Exact sums (a constant group, a
  symmetric group) are exact in any order, so the exact-zero claims hold.
* ``error_model="numpy"``: 1/0 gives inf as in NumPy instead of raising inside a kernel.

Numba's on-disk cache is keyed on each kernel's own source file: after editing a helper
in another module (``sums.py``), delete the ``*.nbi``/``*.nbc`` files under
``normlab/kernels/__pycache__`` or the kernels keep the old helper. (The rewriting of
threaded variants in ``_claims.py`` puts a digest of itself in their names, so a change
there compiles them anew.)
"""

from __future__ import annotations

import functools
import types

import numba
from llvmlite import ir
from numba.core import cgutils
from numba.core import types as numba_types
from numba.extending import intrinsic

from normlab.kernels import threads
from normlab.kernels._claims import claiming

NUMBA_OPTIONS = {"cache": True, "fastmath": False, "error_model": "numpy", "nogil": True}
REDUCTION_FASTMATH = {"reassoc"}  # only reordering of adds: no nnan/ninf, no contract


def _renamed(fn, suffix: str):
    """A copy of ``fn`` under another qualname, so that its on-disk cache file is its own
    (Numba names cache files after the qualname, not after the compile flags)."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    return copy


class Kernel:
    """A kernel with a serial and a threaded variant of one source, each compiled on first
    call. The threaded variant is the source with its ``prange`` loops shared out by
    claims (:mod:`normlab.kernels._claims`), run on normlab's own pool
    (:func:`normlab.kernels.threads.run`); Numba's ``parallel=True`` variant is kept for
    comparison only (``threads.use_numba_layer``)."""

    def __init__(self, fn):
        self.py_func = fn
        self.serial = numba.njit(parallel=False, **NUMBA_OPTIONS)(_renamed(fn, "_serial"))
        self._claims = None  # (the threaded variant, its loops): built on first use
        self._parallel = None
        functools.update_wrapper(self, fn)

    def _claimed_variant(self) -> tuple:
        # rewriting the source for claims takes about 25 ms a kernel: on first use, not at
        # import (two threads may both build it; either result is the same)
        if self._claims is None:
            claimed, loops = claiming(self.py_func)
            self._claims = (numba.njit(**NUMBA_OPTIONS)(claimed), loops)
        return self._claims

    @property
    def claimed(self):
        """The threaded variant: the source with its ``prange`` loops shared out by claims."""
        return self._claimed_variant()[0]

    @property
    def loops(self):
        return self._claimed_variant()[1]

    @property
    def parallel(self):
        """Numba's own threaded variant (``parallel=True``), built when first asked for."""
        if self._parallel is None:
            self._parallel = numba.njit(parallel=True, **NUMBA_OPTIONS)(self.py_func)
        return self._parallel

    def __call__(self, *args, serial: bool = False):
        count = 1 if serial else threads.for_call()
        if count == 1:
            return self.serial(*args)
        if threads.numba_layer is not None:
            with threads.parallel_lock, threads.at_most(count):  # Numba's pools: one caller at a time
                return self.parallel(*args)
        claimed, loops = self._claimed_variant()
        return threads.run(claimed, self.serial, args, loops, count)


def kernel(fn) -> Kernel:
    """Decorate a kernel: threaded by default, ``serial=True`` for the single-threaded variant."""
    return Kernel(fn)


def helper(fn):
    """Decorate a helper that kernels call (LLVM inlines it into them)."""
    return numba.njit(**NUMBA_OPTIONS)(fn)


def inline_helper(fn):
    """As :func:`helper`, inlined by Numba before LLVM sees it: for a per-row helper too
    large for LLVM's inliner, whose call would cost more than a short row's work."""
    return numba.njit(inline="always", **NUMBA_OPTIONS)(fn)


def reduction(fn):
    """Decorate a summing helper: as :func:`helper`, with ``reassoc`` so that it vectorizes."""
    return numba.njit(**dict(NUMBA_OPTIONS, fastmath=REDUCTION_FASTMATH))(fn)


@intrinsic
def _prefetch_address(typingctx, array, index):
    """``llvm.prefetch`` of ``array[index]`` for reading, kept in all cache levels."""
    signature = numba_types.void(array, index)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_pointer)
        builder.call(function, [address, int32(0), int32(3), int32(1)])  # read, high locality, data cache
        return context.get_dummy_value()

    return signature, codegen


@helper
def prefetch(values):
    """Ask for a contiguous 1-D array's cache lines ahead of use. The backward row kernels
    call it on the next row before working on the current one, so that the next row
    streams in while the current one's passes run from cache. At most the first 64 KB: a
    longer row does not stay in cache between passes anyway. (The forward row kernels
    no longer do: on a 2-core AMD EPYC the hardware prefetcher kept up alone, and the
    prefetches cost 3-4% on layer norm 8192×4096 and 23% on RMS norm.)"""
    step = max(1, 64 // values.itemsize)
    for i in range(0, min(values.shape[0], 65536 // values.itemsize), step):
        _prefetch_address(values, i)


# ---------------------------------------------------------------------------------------
# Streaming (non-temporal) output stores

STREAM_LANES = 16  # float32 elements per non-temporal store: one 64-byte cache line


@intrinsic
def data_address(typingctx, array):
    """The address of an array's first element, as an integer, with nothing else done
    (``array.ctypes.data`` may take and drop a reference to the array's memory, atomic
    operations, which wait for pending non-temporal stores)."""
    if not isinstance(array, numba_types.Array):
        return None
    signature = numba_types.intp(array)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(numba_types.intp))

    return signature, codegen


def _float32_arrays(*arrays) -> bool:
    return all(isinstance(a, numba_types.Array) and a.ndim == 1 and a.dtype == numba_types.float32 for a in arrays)


def all_float32(*types_) -> bool:
    """True where every Numba type given is float32 (scalars, or arrays' dtypes)."""
    return all(t == numba_types.float32 for t in types_)


def _float32_vector(builder, array_struct, index, lanes: int):
    """``lanes`` float32 values of a 1-D array from ``index`` on (any alignment)."""
    vector = ir.VectorType(ir.FloatType(), lanes)
    address = builder.bitcast(builder.gep(array_struct.data, [index]), vector.as_pointer())
    return builder.load(address, align=4)


def _splat(builder, value, lanes: int):
    vector = ir.VectorType(ir.FloatType(), lanes)
    undefined = ir.Constant(vector, ir.Undefined)
    first = builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, undefined, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _store_streaming(builder, vector, array_struct, index) -> None:
    """A non-temporal store of ``vector`` (one 64-byte line) at ``array[index]``, which the
    caller has aligned to 64 bytes: the line goes to memory without first being read into
    the cache (no read-for-ownership), a third of the traffic of an output pass saved."""
    address = builder.bitcast(builder.gep(array_struct.data, [index]), vector.type.as_pointer())
    store = builder.store(vector, address, align=64)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


def _normalized_line(builder, x, hi, lo, rs, weight, bias):
    """``((x − hi) − lo)·rs·weight + bias`` on vectors, operation by operation as the scalar
    loops in :func:`normlab.kernels.rows.apply_row` round them (no fused multiply-add,
    no reordering: the same bits)."""
    return builder.fadd(builder.fmul(builder.fmul(builder.fsub(builder.fsub(x, hi), lo), rs), weight), bias)


@intrinsic
def stream_affine_line(typingctx, x, y, weight, bias, index, hi, lo, rs):
    """``y[i:i+16] = ((x[i:i+16] − hi) − lo)·rs·weight[i:i+16] + bias[i:i+16]`` for float32
    1-D arrays and scalars, stored non-temporally; ``y[i]`` must be 64-byte aligned."""
    if not _float32_arrays(x, y, weight, bias) or not all_float32(hi, lo, rs):
        return None
    signature = numba_types.void(x, y, weight, bias, index, hi, lo, rs)

    def codegen(context, builder, sig, args):
        x_a, y_a, w_a, b_a = (context.make_array(sig.args[k])(context, builder, args[k]) for k in range(4))
        i = args[4]
        lanes = STREAM_LANES
        line = _normalized_line(builder, _float32_vector(builder, x_a, i, lanes), _splat(builder, args[5], lanes),
                                _splat(builder, args[6], lanes), _splat(builder, args[7], lanes),
                                _float32_vector(builder, w_a, i, lanes), _float32_vector(builder, b_a, i, lanes))
        _store_streaming(builder, line, y_a, i)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def stream_scaled_line(typingctx, x, y, index, hi, lo, rs, weight, bias):
    """As :func:`stream_affine_line` with one weight and one bias (scalars) for the line."""
    if not _float32_arrays(x, y) or not all_float32(hi, lo, rs, weight, bias):
        return None
    signature = numba_types.void(x, y, index, hi, lo, rs, weight, bias)

    def codegen(context, builder, sig, args):
        x_a, y_a = (context.make_array(sig.args[k])(context, builder, args[k]) for k in range(2))
        lanes = STREAM_LANES
        splats = [_splat(builder, value, lanes) for value in args[3:8]]
        line = _normalized_line(builder, _float32_vector(builder, x_a, args[2], lanes), *splats)
        _store_streaming(builder, line, y_a, args[2])
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def stream_gradient_line(typingctx, g, x, w, gx, acc_w, acc_b, index, hi, lo, rs, proj, mean_gw):
    """One line of the float32 row backward with one weight per element, as the scalar
    loop of ``rows_backward.row_backward32`` rounds it: ``x̂ = ((x − hi) − lo)·rs``,
    ``gx = ((g·w − x̂·proj) − mean_gw)·rs`` stored non-temporally (``gx[i]`` 64-byte
    aligned), and ``acc_w += g·x̂``, ``acc_b += g`` stored as usual."""
    if not _float32_arrays(g, x, w, gx, acc_w, acc_b) or not all_float32(hi, lo, rs, proj, mean_gw):
        return None
    signature = numba_types.void(g, x, w, gx, acc_w, acc_b, index, hi, lo, rs, proj, mean_gw)

    def codegen(context, builder, sig, args):
        g_a, x_a, w_a, gx_a, aw_a, ab_a = (context.make_array(sig.args[k])(context, builder, args[k]) for k in range(6))
        i = args[6]
        lanes = STREAM_LANES
        hi_v, lo_v, rs_v, proj_v, mean_v = (_splat(builder, value, lanes) for value in args[7:12])
        gy = _float32_vector(builder, g_a, i, lanes)
        x_hat = builder.fmul(builder.fsub(builder.fsub(_float32_vector(builder, x_a, i, lanes), hi_v), lo_v), rs_v)
        weighted = builder.fmul(gy, _float32_vector(builder, w_a, i, lanes))
        gx = builder.fmul(builder.fsub(builder.fsub(weighted, builder.fmul(x_hat, proj_v)), mean_v), rs_v)
        _store_streaming(builder, gx, gx_a, i)
        vector = ir.VectorType(ir.FloatType(), lanes).as_pointer()
        for accumulator, term in ((aw_a, builder.fmul(gy, x_hat)), (ab_a, gy)):
            address = builder.bitcast(builder.gep(accumulator.data, [i]), vector)
            builder.store(builder.fadd(builder.load(address, align=4), term), address, align=4)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def store_fence(typingctx):
    """A full memory fence (``mfence`` on x86, ``dmb`` on ARM): the streamed lines, which
    ordinary stores do not order, are written before anything the thread does next."""
    signature = numba_types.void()

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return signature, codegen
