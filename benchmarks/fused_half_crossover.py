"""Where the bfloat16 kernels of the fused RMS blocks start to pay: the recipe's torch
operations' time over the kernels' time, per size (above 1: the kernels are faster).

Times ``FusedAddRMSNorm`` (llama recipe) and ``GatedRMSNorm`` (8 groups, gemma recipe)
on CPU bfloat16 rows of 1024 features, 2^12 to 2^24 elements, forward without gradients
and forward+backward, with the kernels forced on and forced off, taking turns in rounds
(median of each). ``normlab.torch.fused.HALF_KERNELS_FROM`` (forward+backward) and
``HALF_FORWARD_KERNELS_FROM`` (a forward alone) come from this table.

First the script frees one large block, as any process that has run a model has: glibc
then serves freed memory of these sizes again instead of handing it back to the system
after each call, and torch's operations run at their steady speed. (In a fresh process
their temporaries fault their pages in on every call, and the kernels look better.)

    python benchmarks/fused_half_crossover.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from normlab.bench import seconds_of
from normlab.torch.fused import FusedAddRMSNorm, GatedRMSNorm

blocks = sys.modules["normlab.torch.fused"]
SIZES = range(12, 25, 2)
FEATURES = 1024
NEVER, ALWAYS = 1 << 62, 0


def _cases(elements: int) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (elements // FEATURES, FEATURES)
    x, other, grad = (torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(3))
    leaf, other_leaf = x.clone().requires_grad_(), other.clone().requires_grad_()
    add = FusedAddRMSNorm(FEATURES).to(torch.bfloat16)
    gated = GatedRMSNorm(FEATURES, group_size=FEATURES // 8).to(torch.bfloat16)

    def no_grad(module):
        def call():
            with torch.no_grad():
                module(x, other)
        return call

    def both(module):
        def call():
            out = module(leaf, other_leaf)
            outputs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outputs, [grad] * len(outputs))
        return call

    return {"add + RMS fwd": no_grad(add), "add + RMS fwd+bwd": both(add),
            "gated RMS fwd": no_grad(gated), "gated RMS fwd+bwd": both(gated)}


def _median(call, calls: int) -> float:
    call()
    return statistics.median(seconds_of(call) for _ in range(calls))


def measure(rounds: int) -> dict:
    """{case: {exponent: ops / kernels}}."""
    table: dict = {}
    for exponent in SIZES:
        calls = max(5, min(100, (1 << 22) >> exponent))
        for case, call in _cases(1 << exponent).items():
            seconds = {"kernels": [], "ops": []}
            for _ in range(rounds):
                for mode, start in (("kernels", ALWAYS), ("ops", NEVER)):
                    blocks.HALF_KERNELS_FROM = blocks.HALF_FORWARD_KERNELS_FROM = start
                    seconds[mode].append(_median(call, calls))
            table.setdefault(case, {})[exponent] = statistics.median(seconds["ops"]) / statistics.median(
                seconds["kernels"])
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    start = blocks.HALF_KERNELS_FROM, blocks.HALF_FORWARD_KERNELS_FROM
    freed = torch.empty(64 << 20, dtype=torch.uint8)  # see the docstring
    del freed
    try:
        table = measure(args.rounds)
    finally:
        blocks.HALF_KERNELS_FROM, blocks.HALF_FORWARD_KERNELS_FROM = start
    print(f"recipe operations' time over the bfloat16 kernels' time, rows of {FEATURES} (above 1: kernels pay)")
    print("| case | " + " | ".join(f"2^{e}" for e in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for case, ratios in table.items():
        print(f"| {case} | " + " | ".join(f"{ratios[e]:.2f}" for e in SIZES) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
