"""Where the kernels of the fused RMS blocks start to pay: the recipe's torch operations'
time over the kernels' time, per size (above 1: the kernels are faster).

Times ``FusedAddRMSNorm`` (llama recipe) and ``GatedRMSNorm`` (8 groups, gemma recipe)
on CPU rows of 1024 features, 2^12 to 2^24 elements, with the kernels forced on and
forced off, taking turns in rounds (median of each).

* ``--dtype bfloat16`` (the default): forward without gradients and forward+backward.
  ``normlab.torch.fused.HALF_KERNELS_FROM`` (forward+backward) and
  ``HALF_FORWARD_KERNELS_FROM`` (a forward alone) come from this table.
* ``--dtype float32``: forward without gradients, where the blocks may run torch's
  operations. ``normlab.torch.paths.SMALL_FORWARD_BELOW`` (add + RMS) comes from this
  table; the gated norm keeps the kernels at every size (its operations won only from
  2^15 to 2^16 elements, by up to 1.5x, and lost by 4-6x from 2^17 to 2^19 on a 2-core AMD EPYC).

First the script frees one large block, as any process that has run a model has: glibc
then serves freed memory of these sizes again instead of handing it back to the system
after each call, and torch's operations run at their steady speed. (In a fresh process
their temporaries fault their pages in on every call, and the kernels look better.)

    python benchmarks/fused_half_crossover.py [--rounds 5] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse
import statistics

import torch

from normlab.bench import positive_int, seconds_of
from normlab.torch import paths
from normlab.torch.fused import FusedAddRMSNorm, GatedRMSNorm

blocks = sys.modules["normlab.torch.fused"]
SIZES = range(12, 25, 2)
FEATURES = 1024
NEVER, ALWAYS = 1 << 62, 0


def _cases(elements: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (elements // FEATURES, FEATURES)
    x, other, grad = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    leaf, other_leaf = x.clone().requires_grad_(), other.clone().requires_grad_()
    add = FusedAddRMSNorm(FEATURES).to(dtype)
    gated = GatedRMSNorm(FEATURES, group_size=FEATURES // 8).to(dtype)

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

    def gated_float(ops: bool):
        def call():
            with torch.no_grad():
                if ops:  # (the recipe's operations, which the block runs where no kernel can)
                    blocks._composite(x, None, other, gated.weight, None, None, None, blocks._block_of(gated))
                else:
                    gated(x, other)
        return call

    # {case: (the kernels' call, the operations' call)}: one call both ways where _force switches it
    if dtype != torch.bfloat16:  # (with gradients, float32 always takes the kernels)
        return {"add + RMS fwd": (no_grad(add),) * 2, "gated RMS fwd": (gated_float(False), gated_float(True))}
    return {"add + RMS fwd": (no_grad(add),) * 2, "add + RMS fwd+bwd": (both(add),) * 2,
            "gated RMS fwd": (no_grad(gated),) * 2, "gated RMS fwd+bwd": (both(gated),) * 2}


def _force(mode: str, dtype: torch.dtype) -> None:
    """Every call on the kernels (``"kernels"``) or on torch's operations (``"ops"``)."""
    if dtype == torch.bfloat16:
        blocks.HALF_KERNELS_FROM = blocks.HALF_FORWARD_KERNELS_FROM = ALWAYS if mode == "kernels" else NEVER
    else:
        paths.SMALL_FORWARD_BELOW = NEVER if mode == "ops" else ALWAYS


def _median(call, calls: int) -> float:
    call()
    return statistics.median(seconds_of(call) for _ in range(calls))


def measure(rounds: int, dtype: torch.dtype) -> dict:
    """{case: {exponent: ops / kernels}}."""
    table: dict = {}
    for exponent in SIZES:
        calls = max(5, min(100, (1 << 22) >> exponent))
        for case, pair in _cases(1 << exponent, dtype).items():
            seconds = {"kernels": [], "ops": []}
            for _ in range(rounds):
                for mode in ("kernels", "ops"):
                    _force(mode, dtype)
                    seconds[mode].append(_median(pair[mode == "ops"], calls))
            table.setdefault(case, {})[exponent] = statistics.median(seconds["ops"]) / statistics.median(
                seconds["kernels"])
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    start = blocks.HALF_KERNELS_FROM, blocks.HALF_FORWARD_KERNELS_FROM, paths.SMALL_FORWARD_BELOW
    freed = torch.empty(64 << 20, dtype=torch.uint8)  # see the docstring
    del freed
    try:
        table = measure(args.rounds, dtype)
    finally:
        blocks.HALF_KERNELS_FROM, blocks.HALF_FORWARD_KERNELS_FROM, paths.SMALL_FORWARD_BELOW = start
    print(f"recipe operations' time over the {args.dtype} kernels' time, rows of {FEATURES} (above 1: kernels pay)")
    print("| case | " + " | ".join(f"2^{e}" for e in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for case, ratios in table.items():
        print(f"| {case} | " + " | ".join(f"{ratios[e]:.2f}" for e in SIZES) + " |")
    return 0


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
