"""Threaded kernel calls on torch's own OpenMP pool.

Where torch runs its intra-op work on GNU OpenMP (``libgomp``, as its Linux CPU wheels
do), a threaded normlab call can run on the very threads torch uses: the kernel's claimed
variant (:mod:`normlab.kernels._claims`) is started with ``GOMP_parallel``, the entry
point of an ``omp parallel`` region, on the libgomp that torch loaded. The calling
thread and torch's workers then run it as they run torch's own ops: no second pool
competes for the cores, torch's workers are usually still spinning from the last op (a
region costs about 1.5 µs to start, against 50-100 µs to wake a sleeping thread), and
``torch.set_num_threads`` holds because each call asks for the count it was given.

A region's threads run native code only, so the call reaches the kernel through a Numba
``cfunc`` that takes one pointer: :func:`pack` (compiled once per combination of argument
types, and cached on disk) writes each argument into a block of int64 words (a type code
per argument, then each array's data pointer and shape, each scalar's bits), and
:func:`_entry` finds, for each kernel and set of type codes, a ``cfunc`` that reads them
back and calls the claimed kernel: generated as a small module, compiled once and
cached on disk like the kernels. Arguments without a code (arrays that are not
C-contiguous, None) or an entry that does not compile send the call to normlab's own
pool instead.

A child forked from a process that has used GNU OpenMP cannot use it (the parent's
threads are not in the child; torch's own ops hang there): :mod:`normlab.kernels.threads`
stops using this module in such a child.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import importlib.util
import os
import sys
import tempfile
from typing import Optional

import numba
import numpy as np
from llvmlite import ir
from numba import carray
from numba.core import types
from numba.extending import intrinsic, overload
from numba.np import numpy_support

from normlab.kernels._claims import LINE, claims_array

WORDS = 1024  # one call's block of words: type codes, then values (a kernel has at most ~40 arguments)
_ARRAY, _INT, _FLOAT, _BOOL, _TUPLE = 1, 2, 3, 4, 5


def _library_path() -> Optional[str]:
    """The GNU OpenMP library that torch loaded, or None (torch not imported, built on
    another threading runtime, or not on Linux)."""
    torch = sys.modules.get("torch")
    if torch is None or not sys.platform.startswith("linux"):
        return None
    try:
        if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "libgomp" in line}
    except (OSError, AttributeError, RuntimeError):
        return None
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    bundled = [path for path in glob.glob(os.path.join(torch_lib, "libgomp*.so*")) if os.path.realpath(path) in
               {os.path.realpath(p) for p in loaded}]
    if bundled:
        return bundled[0]
    return next(iter(loaded)) if len(loaded) == 1 else None  # a torch linked to the system's libgomp


def region_starter():
    """``GOMP_parallel(fn, data, num_threads, flags)`` of torch's libgomp, or None."""
    path = _library_path()
    if path is None:
        return None
    try:
        start = ctypes.CDLL(path).GOMP_parallel  # the loaded library: dlopen returns its handle
    except (OSError, AttributeError):
        return None
    start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    start.restype = None
    return start


# ---- packing the arguments (compiled code, called through Numba's dispatcher) ---------------


@intrinsic
def _data_address(typingctx, array):
    """An array's data pointer as an int64."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.int64(array), codegen


@intrinsic
def _float_bits(typingctx, value):
    """A float64's bits as an int64."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(value), codegen


@intrinsic
def _bits_float(typingctx, bits):
    """The float64 whose bits are the int64 ``bits``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


@intrinsic
def _pointer(typingctx, address, dtype):
    """The int64 ``address`` as a pointer to ``dtype`` (a NumPy dtype class), for ``carray``."""
    target = dtype.dtype if isinstance(dtype, types.DTypeSpec) else dtype
    signature = types.CPointer(target)(address, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@intrinsic
def _void_address(typingctx, pointer):
    """A ``voidptr`` as an int64."""

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(pointer), codegen


def type_code(numba_type) -> int:
    """The code of an argument type, or 0 where a call cannot be packed. Codes are a
    function of the type alone: ``kind | value << 4``."""
    if isinstance(numba_type, types.Array):
        if numba_type.layout != "C" or numba_type.ndim > 8:
            return 0
        return _ARRAY | numpy_support.as_dtype(numba_type.dtype).num << 4 | numba_type.ndim << 12
    if isinstance(numba_type, types.Boolean):
        return _BOOL
    if isinstance(numba_type, (types.Integer, types.Float)):  # the scalar's own type comes back
        return (_FLOAT if isinstance(numba_type, types.Float) else _INT) | numpy_support.as_dtype(numba_type).num << 4
    if isinstance(numba_type, types.UniTuple) and isinstance(numba_type.dtype, types.Integer):
        return _TUPLE | numba_type.count << 4
    return 0


def _store(words, at, value):
    """Write ``value`` into ``words`` from ``at``; the index after it."""


@overload(_store, jit_options={"cache": True})
def _store_compiled(words, at, value):
    if isinstance(value, types.Array):
        ndim = value.ndim

        def store_array(words, at, value):
            words[at] = _data_address(value)
            for d in range(ndim):
                words[at + 1 + d] = value.shape[d]
            return at + 1 + ndim

        return store_array
    if isinstance(value, types.Float):
        def store_float(words, at, value):
            words[at] = _float_bits(np.float64(value))
            return at + 1

        return store_float
    if isinstance(value, (types.Integer, types.Boolean)):
        def store_int(words, at, value):
            words[at] = np.int64(value)
            return at + 1

        return store_int
    if isinstance(value, types.UniTuple):
        count = value.count

        def store_tuple(words, at, value):
            for i in range(count):
                words[at + i] = value[i]
            return at + count

        return store_tuple

    def store_nothing(words, at, value):  # a type without a code: pack returns -1 before storing
        return at

    return store_nothing


def _width(numba_type) -> int:
    """Words that :func:`_store` writes for a value of this type."""
    if isinstance(numba_type, types.Array):
        return 1 + numba_type.ndim
    return numba_type.count if isinstance(numba_type, types.UniTuple) else 1


def _codes(arguments):
    """``(codes, words)``: the arguments' type codes (a tuple of int64 values), and how
    many words the codes and values take."""


@overload(_codes, jit_options={"cache": True})
def _codes_compiled(arguments):
    codes = tuple(type_code(t) for t in arguments.types)
    size = len(codes) + sum(_width(t) for t in arguments.types)
    return lambda arguments: (codes, size)


def _store_all(words, at, arguments):
    """:func:`_store` each of a tuple's items in turn; the index after the last."""


@overload(_store_all)
def _store_all_compiled(words, at, arguments):
    source = "def store_all(words, at, arguments):\n" + "".join(
        f"    at = _store(words, at, arguments[{i}])\n" for i in range(len(arguments.types))) + "    return at\n"
    namespace = {"_store": _store}
    exec(source, namespace)  # noqa: S102 - one statement per item of the tuple
    return namespace["store_all"]


@numba.njit(cache=True)
def pack(words, *arguments):
    """Type codes of ``arguments`` in ``words[:len]``, then the values; -1 where one has no
    code (a non-contiguous array), else the number of words used."""
    codes, size = _codes(arguments)
    if size > words.shape[0]:
        return -1
    for i in range(len(codes)):
        words[i] = codes[i]
        if codes[i] == 0:
            return -1
    return _store_all(words, len(codes), arguments)


# ---- entries: one cfunc per kernel and type codes, built in this process ---------------


def _entry_source(codes: tuple[int, ...]) -> str:
    """Source of ``entry(p)``: read the arguments packed under ``codes`` back from the
    words at ``p`` and call ``claimed`` with them."""
    lines = ["def entry(p):", f"    w = carray(_pointer(_void_address(p), np.int64), ({WORDS},))"]
    at = len(codes)
    names = []
    for i, code in enumerate(codes):
        kind, value = code & 15, code >> 4
        name = f"a{i}"
        if kind == _ARRAY:
            ndim, dtype = value >> 8, _DTYPES[value & 255]
            shape = ", ".join(f"w[{at + 1 + d}]" for d in range(ndim)) + ("," if ndim == 1 else "")
            lines.append(f"    {name} = carray(_pointer(w[{at}], np.{dtype.type.__name__}), ({shape}))")
            at += 1 + ndim
        elif kind == _FLOAT:
            lines.append(f"    {name} = np.{_DTYPES[value].type.__name__}(_bits_float(w[{at}]))")
            at += 1
        elif kind == _BOOL:
            lines.append(f"    {name} = w[{at}] != 0")
            at += 1
        elif kind == _INT:
            lines.append(f"    {name} = np.{_DTYPES[value].type.__name__}(w[{at}])")
            at += 1
        else:
            lines.append(f"    {name} = (" + "".join(f"w[{at + j}], " for j in range(value)) + ")")
            at += value
        names.append(name)
    lines.append(f"    claimed({', '.join(names)})")
    return "\n".join(lines)


_DTYPES = {np.dtype(t).num: np.dtype(t) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                                                  np.int8, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


_entries: dict = {}

_ENTRY_MODULE = '''"""One kernel's OpenMP entry, generated by normlab.kernels.openmp (do not edit)."""
import numpy as np
from numba import carray, cfunc, types

from normlab.kernels.openmp import _bits_float, _pointer, _void_address
from {module} import {name} as _kernel

claimed = _kernel.claimed


@cfunc(types.void(types.voidptr), cache=True)
'''


@functools.lru_cache(maxsize=1)
def _kernels_fingerprint() -> str:
    """Size and modification time of every kernel source file: part of each entry file's
    name, so that entries compiled from older kernels (Numba's cache of a function does
    not follow the functions it calls into other files) are never loaded."""
    folder = os.path.dirname(os.path.abspath(__file__))
    stats = [(name, os.stat(os.path.join(folder, name))) for name in sorted(os.listdir(folder)) if name.endswith(".py")]
    return repr([(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats])


def _entry_directories():
    yield os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__", "openmp_entries")
    yield os.path.join(tempfile.gettempdir(), f"normlab-openmp-entries-{getattr(os, 'getuid', lambda: 0)()}")


def _cached_entry(claimed, codes: tuple[int, ...]):
    """The entry as a file-backed ``cfunc(cache=True)``: compiled once, then loaded from
    Numba's cache by later processes. None where the kernel is not one of normlab's (not
    importable by name) or no directory takes the file."""
    module, name = claimed.py_func.__module__, claimed.py_func.__name__.removesuffix("_claimed")
    if not module.startswith("normlab.kernels."):
        return None
    source = _ENTRY_MODULE.format(module=module, name=name) + _entry_source(codes) + "\n"
    digest = hashlib.sha256((_kernels_fingerprint() + source).encode()).hexdigest()[:24]
    for directory in _entry_directories():
        path = os.path.join(directory, f"entry_{digest}.py")
        try:
            if not os.path.exists(path):
                os.makedirs(directory, exist_ok=True)
                partial = f"{path}.{os.getpid()}.partial"
                with open(partial, "w") as file:
                    file.write(source)
                os.replace(partial, path)  # whole or absent, whoever writes it
            name = f"normlab_openmp_entry_{digest}"
            spec = importlib.util.spec_from_file_location(name, path)
            loaded = sys.modules[name] = importlib.util.module_from_spec(spec)  # Numba's cache imports it by name
            spec.loader.exec_module(loaded)
            return loaded.entry
        except OSError:
            continue
    return None


def _entry(claimed, codes: tuple[int, ...]) -> int:
    """The address of the cfunc that calls ``claimed`` with arguments packed under
    ``codes``, or 0 where it does not compile (the call then goes to normlab's pool)."""
    key = (claimed, codes)
    entry = _entries.get(key, False)
    if entry is False:
        try:
            entry = _cached_entry(claimed, codes)
            if entry is None:
                namespace = {"carray": carray, "np": np, "_pointer": _pointer, "_void_address": _void_address,
                             "_bits_float": _bits_float, "claimed": claimed}
                exec(_entry_source(codes), namespace)  # noqa: S102 - generated from the type codes above
                entry = numba.cfunc(types.void(types.voidptr))(namespace["entry"])  # keeps its code alive
        except Exception:  # noqa: BLE001 - a combination of types the cfunc cannot take: the pool runs it
            entry = None
        _entries[key] = entry
    return 0 if entry is None else entry.address


class Regions:
    """Threaded calls as OpenMP regions of torch's libgomp; one call at a time (the
    caller holds ``threads.parallel_lock``), so one block of words serves them all."""

    def __init__(self, start):
        self.start = start
        self.words = np.zeros(WORDS, np.int64)
        self.address = self.words.ctypes.data
        # per (loops, threads): a claims array, zeroed again before each call (the region
        # has ended, every thread with it, when start returns), and its number of homes
        self.claims: dict = {}
        # per (kernel, its arguments' type codes as bytes): the entry's address (0: none)
        self.entries: dict = {}

    def run(self, claimed, args: tuple, loops: int, count: int) -> bool:
        """Run ``claimed(*args, claims)`` on ``count`` threads; False (and nothing run)
        where the arguments cannot be packed."""
        kept = self.claims.get((loops, count))
        if kept is None:
            claims = claims_array(loops, count)
            kept = self.claims[loops, count] = (claims, int(claims[LINE]))
        else:
            claims, homes = kept
            claims.fill(0)
            claims[LINE] = homes
        claims = kept[0]
        if pack(self.words, *args, claims) < 0:
            return False
        codes = self.words[:len(args) + 1]
        address = self.entries.get((claimed, codes.tobytes()))
        if address is None:
            address = self.entries[claimed, codes.tobytes()] = _entry(claimed, tuple(codes.tolist()))
        if not address:
            return False
        self.start(address, self.address, count, 0)
        return True
