"""Kernels shared by threads that claim work: the ``prange`` loops rewritten as claimed chunks.

A kernel's threaded variant is its own source with every top-level ``prange`` loop
rewritten (see :func:`claiming`): the loop's index range is cut into chunks fixed by the
range alone, and the chunks into one contiguous home range per thread. Each thread takes
the next unclaimed chunk of its own home (an atomic counter per home), then of the
others' homes, until none is left, then waits until every chunk of the loop is done
before going on to the next loop. A thread's home is its place in the order of arrival
(the caller first, as a rule), so a repeated call on the same arrays gives each thread
the same rows as last time, still in its core's cache; a thread that starts late finds
its home taken by the others. The calling thread runs the same function as the pool's
workers, so a call costs no more than its work when the workers are slow to wake, and
each index is computed by the same code whichever thread claims it: the bits do not
depend on the thread count.

    for r in prange(rows):             me = arrival order (once per call)
        body(r)                  →     for each home h, own home first:
                                           while True:
                                               k = claim(home h)          # next chunk
                                               if k >= end of home h: break
                                               for r in chunk k: body(r)
                                               claim(done)                # one more done
                                       wait(done, count)                  # all done (spin, then yield)

Statements between the loops run on every thread; in normlab's kernels they only read
arguments and fill local variables. The counters live in ``claims`` (see
:func:`claims_array`), each on its own cache line.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import types

import numpy as np
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


LINE = 8  # int64 counters per cache line: each counter on a line of its own
MAX_HOMES = 64

_ARRIVAL = "_normlab_me = _normlab_fetch_add(claims, 0) % claims[{homes_at}]"

_LOOP = """
_n{p} = {count}
_step{p} = max(1, (_n{p} + {chunks} - 1) // {chunks})
_count{p} = (_n{p} + _step{p} - 1) // _step{p}
_homes{p} = claims[{homes_at}]
_base{p} = {line} * (2 + {p} * (_homes{p} + 1))
for _visit{p} in range(_homes{p}):
    _home{p} = (_normlab_me + _visit{p}) % _homes{p}
    _start{p} = _home{p} * _count{p} // _homes{p}
    _stop{p} = (_home{p} + 1) * _count{p} // _homes{p}
    while True:
        _k{p} = _start{p} + _normlab_fetch_add(claims, _base{p} + {line} * (1 + _home{p}))
        if _k{p} >= _stop{p}:
            break
        for {target} in range(_k{p} * _step{p}, min(_n{p}, (_k{p} + 1) * _step{p})):
            pass
        _normlab_fetch_add(claims, _base{p})
_spins{p} = 0
while _normlab_load(claims, _base{p}) < _count{p}:
    _spins{p} += 1
    if _spins{p} % {spins} == 0:
        _normlab_sched_yield()
"""


_TEMPLATE_DIGEST = hashlib.sha256((_ARRIVAL + _LOOP + repr((CHUNKS_PER_LOOP, SPINS_BEFORE_YIELD, LINE))).encode()).hexdigest()[:8]


def claims_array(loops: int, threads: int) -> np.ndarray:
    """The ``claims`` of one threaded call of a kernel with ``loops`` claimed loops on
    ``threads`` threads: zeroed counters, and the number of homes."""
    homes = max(1, min(threads, MAX_HOMES))
    claims = np.zeros(LINE * (2 + loops * (homes + 1)), np.int64)
    claims[LINE] = homes
    return claims


def _is_prange(node) -> bool:
    return (isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and isinstance(node.iter.func, ast.Name)
            and node.iter.func.id == "prange")


def claiming(fn) -> tuple[types.FunctionType, int]:
    """``(function, loops)``: ``fn`` with its top-level ``prange`` loops claimed in chunks,
    taking one more argument, ``claims``: :func:`claims_array`, one array shared by every
    thread that runs the call."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    function = tree.body[0]
    function.decorator_list = []
    function.name = fn.__name__ + "_claimed"
    function.args.args.append(ast.arg("claims"))
    nested = [node for statement in function.body if not _is_prange(statement)
              for node in ast.walk(statement) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "prange"]
    if nested:
        raise TypeError(f"{fn.__qualname__}: prange must be a top-level loop of a kernel to be shared by threads")
    body, loops = [ast.parse(_ARRIVAL.format(homes_at=LINE)).body[0]], 0
    for statement in function.body:
        if not _is_prange(statement):
            body.append(statement)
            continue
        (count,) = statement.iter.args
        rewritten = ast.parse(_LOOP.format(p=loops, count=ast.unparse(count), chunks=CHUNKS_PER_LOOP,
                                           target=ast.unparse(statement.target), spins=SPINS_BEFORE_YIELD,
                                           homes_at=LINE, line=LINE)).body
        claim_loop = rewritten[5].body[3]  # the while loop that claims chunks of one home
        claim_loop.body[2].body = statement.body  # the chunk's for loop runs the original body
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
    # the rewriting is part of the compiled code, but Numba's cache follows the kernel's own
    # file only: a digest of the templates in the name keeps a changed rewriting from
    # loading code cached under the old one
    claimed.__qualname__ = fn.__qualname__ + "_claimed_" + _TEMPLATE_DIGEST
    claimed.__module__ = fn.__module__
    return claimed, loops
