"""The layer-norm backward kernel alone against torch's: normlab's cached backward call
(``kernels.fast.FastBackward``, what ``normlab.torch.LayerNorm`` runs in ``backward``, gradient
allocation included) and ``torch.ops.aten.native_layer_norm_backward`` (what
``torch.nn.LayerNorm`` runs), on the same float32 rows, statistics and weights, both
computing grad_x, grad_weight and grad_bias; the two take turns in rounds (median of each).

This leaves out what a module call adds around its kernel (``torch.autograd.Function``'s
machinery, which torch's own op does not cross): ``normlab bench --sweep`` counts it.
Above 1: normlab's kernel is faster.

    python benchmarks/row_backward.py [--rounds 11] [--threads 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse
import statistics
import time

import torch
import torch.nn as nn

from normlab.bench import positive_int
from normlab.torch import convert

SHAPES = [(1024, 64), (256, 256), (64, 1024), (1024, 768), (16, 8192), (4096, 1024)]


def _calls(rows: int, n: int) -> dict:
    """normlab's and torch's backward on one (rows, n) input."""
    g = torch.Generator().manual_seed(0)
    x, grad_y = torch.randn(rows, n, generator=g) * 2 + 1, torch.randn(rows, n, generator=g)
    weight, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], weight, bias, 1e-5)
    module = convert(nn.LayerNorm(n))
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    module(x.clone().requires_grad_())  # builds the cached forward and backward for this shape
    call = next(c for c in module._normlab_fast.values() if c is not None)
    tables = call.params.of(module.weight, module.bias)
    x_np, grad_np = x.numpy(), grad_y.numpy()
    _, our_mean, our_rstd = call.forward.run(x_np, *tables, 1e-5, True)
    return {"normlab": lambda: call.backward(grad_np, x_np, tables[0], our_mean, our_rstd, True),
            "torch": lambda: torch.ops.aten.native_layer_norm_backward(grad_y, x, [n], mean, rstd, weight, bias,
                                                                        [True, True, True])}


def measure(rounds: int) -> dict:
    """{shape: {engine: median seconds}}."""
    table = {}
    for rows, n in SHAPES:
        calls = _calls(rows, n)
        repeats = max(3, (1 << 21) // (rows * n))
        times = {engine: [] for engine in calls}
        for _ in range(rounds):
            for engine, call in calls.items():
                call()
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                times[engine].append((time.perf_counter() - start) / repeats)
        table[(rows, n)] = {engine: statistics.median(values) for engine, values in times.items()}
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=11)
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads (normlab follows it); default: torch's")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = measure(args.rounds)
    print(f"layer norm backward kernels, float32, {torch.get_num_threads()} threads (above 1: normlab faster)")
    print("| shape | normlab µs | torch µs | torch / normlab |")
    print("|---|---|---|---|")
    for (rows, n), times in table.items():
        ours, theirs = times["normlab"] * 1e6, times["torch"] * 1e6
        print(f"| {rows}×{n} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f} |")
    return 0


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
