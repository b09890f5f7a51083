"""Kernels shared by threads that claim work: the ``prange`` loops rewritten as claimed chunks.

A kernel's threaded variant is its own source with every top-level ``prange`` loop
rewritten (see :func:`claiming`): the loop's index range is cut into chunks fixed by the
range alone, and each thread that runs the function takes the next unclaimed chunk
(an atomic counter) until none is left, then waits until every chunk of the loop is done
before going on to the next loop. The calling thread runs the same function as the
pool's workers, so a call costs no more than its work when the workers are slow to wake,
and each index is computed by the same code whichever thread claims it: the bits do not
depend on the thread count.

    for r in prange(rows):             n = rows; step = ...; count = ...
        body(r)                  →     while True:
                                           k = claim(claims, 0)        # next chunk
                                           if k >= count: break
                                           for r in range(k·step, min(n, (k+1)·step)):
                                               body(r)
                                           claim(claims, 1)            # one more done
                                       wait(claims, 1, count)          # all done (spin, then yield)

Statements between the loops run on every thread; in normlab's kernels they only read
arguments and fill local variables.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

from llvmlite import ir
from numba.core import types as numba_types
from numba.extending import intrinsic

CHUNKS_PER_LOOP = 64  # claims per loop: enough to balance threads that start late
SPINS_BEFORE_YIELD = 2000  # a waiting thread then gives its core to the one it waits for

# libc's sched_yield, linked by name (a ctypes pointer would keep the kernels from caching)
_sched_yield = numba_types.ExternalFunction("sched_yield", numba_types.int32())


@intrinsic
def _fetch_add(typingctx, counters, index):
    """``counters[index] += 1`` atomically; the value before."""
    signature = numba_types.int64(counters, index)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", builder.gep(data, [args[1]]), ir.IntType(64)(1), "seq_cst")

    return signature, codegen


@intrinsic
def _load(typingctx, counters, index):
    """``counters[index]``, read atomically (never hoisted out of a waiting loop)."""
    signature = numba_types.int64(counters, index)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load_atomic(builder.gep(data, [args[1]]), "seq_cst", 8)

    return signature, codegen


_LOOP = """
_n{p} = {count}
_step{p} = max(1, (_n{p} + {chunks} - 1) // {chunks})
_count{p} = (_n{p} + _step{p} - 1) // _step{p}
while True:
    _k{p} = _normlab_fetch_add(claims, {claimed})
    if _k{p} >= _count{p}:
        break
    for {target} in range(_k{p} * _step{p}, min(_n{p}, (_k{p} + 1) * _step{p})):
        pass
    _normlab_fetch_add(claims, {done})
_spins{p} = 0
while _normlab_load(claims, {done}) < _count{p}:
    _spins{p} += 1
    if _spins{p} % {spins} == 0:
        _normlab_sched_yield()
"""


def _is_prange(node) -> bool:
    return (isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and isinstance(node.iter.func, ast.Name)
            and node.iter.func.id == "prange")


def claiming(fn) -> tuple[types.FunctionType, int]:
    """``(function, loops)``: ``fn`` with its top-level ``prange`` loops claimed in chunks,
    taking one more argument, ``claims``: int64 zeros of length ``2 * loops``, one array
    shared by every thread that runs the call."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    function = tree.body[0]
    function.decorator_list = []
    function.name = fn.__name__ + "_claimed"
    function.args.args.append(ast.arg("claims"))
    nested = [node for statement in function.body if not _is_prange(statement)
              for node in ast.walk(statement) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "prange"]
    if nested:
        raise TypeError(f"{fn.__qualname__}: prange must be a top-level loop of a kernel to be shared by threads")
    body, loops = [], 0
    for statement in function.body:
        if not _is_prange(statement):
            body.append(statement)
            continue
        (count,) = statement.iter.args
        rewritten = ast.parse(_LOOP.format(p=loops, count=ast.unparse(count), chunks=CHUNKS_PER_LOOP,
                                           target=ast.unparse(statement.target), claimed=2 * loops, spins=SPINS_BEFORE_YIELD,
                                           done=2 * loops + 1)).body
        rewritten[3].body[2].body = statement.body  # the chunk's for loop runs the original body
        body.extend(rewritten)
        loops += 1
    function.body = body
    source = ast.unparse(ast.fix_missing_locations(tree))
    code = compile(ast.increment_lineno(ast.parse(source), fn.__code__.co_firstlineno - 1),
                   fn.__code__.co_filename, "exec")
    namespace: dict = {}
    fn.__globals__.setdefault("_normlab_fetch_add", _fetch_add)
    fn.__globals__.setdefault("_normlab_load", _load)
    fn.__globals__.setdefault("_normlab_sched_yield", _sched_yield)
    exec(code, fn.__globals__, namespace)  # noqa: S102 - the kernel's own source, rewritten
    claimed = namespace[function.name]
    claimed.__qualname__ = fn.__qualname__ + "_claimed"
    claimed.__module__ = fn.__module__
    return claimed, loops
