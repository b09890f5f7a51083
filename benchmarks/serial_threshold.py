"""Where a threaded kernel call starts to pay: threaded time over serial time, per size.

For each pool that can run normlab's threaded calls (torch's OpenMP pool, which
``normlab.torch`` uses, and normlab's own pool of sleeping workers, which the NumPy API
uses without torch), times normlab.torch's modules on float32 inputs of 2^14 to 2^21
elements with every kernel call forced threaded, then forced serial,
the two taking turns in rounds (median of each). Below 1: the threaded call is faster.
The serial thresholds in ``normlab.kernels.threads`` come from this table.

    python benchmarks/serial_threshold.py [--rounds 5] [--pool torch|normlab]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse
import statistics

import torch

import normlab.torch as nt  # threaded calls run on torch's OpenMP pool, where torch has one
from normlab.bench import positive_int, seconds_of
from normlab.kernels import threads

SIZES = range(14, 21)
NEVER, ALWAYS = 1 << 62, 0


def _cases(elements: int) -> dict:
    """normlab.torch's modules as a model calls them: forward without gradients, and
    forward+backward."""
    g = torch.Generator().manual_seed(0)
    long_rows, short_rows = torch.randn(elements // 1024, 1024, generator=g), torch.randn(elements // 64, 64, generator=g)
    images = torch.randn(elements // 4096, 64, 8, 8, generator=g)
    layer, short_layer = nt.LayerNorm(1024), nt.LayerNorm(64)
    batch, group = nt.BatchNorm2d(64), nt.GroupNorm(8, 64)
    leaf, grad = long_rows.clone().requires_grad_(), torch.randn(long_rows.shape, generator=g)
    short_leaf, short_grad = short_rows.clone().requires_grad_(), torch.randn(short_rows.shape, generator=g)
    image_leaf, image_grad = images.clone().requires_grad_(), torch.randn(images.shape, generator=g)

    def no_grad(module, x):
        def call():
            with torch.no_grad():
                module(x)
        return call

    return {
        "LayerNorm(1024) fwd": no_grad(layer, long_rows),
        "LayerNorm(64) fwd": no_grad(short_layer, short_rows),
        "LayerNorm(1024) fwd+bwd": lambda: torch.autograd.grad(layer(leaf), [leaf, *layer.parameters()], grad),
        "LayerNorm(64) fwd+bwd": lambda: torch.autograd.grad(short_layer(short_leaf), [short_leaf,
                                                                               *short_layer.parameters()], short_grad),
        "BatchNorm2d(64) train fwd+bwd": lambda: torch.autograd.grad(batch(image_leaf), [image_leaf], image_grad),
        "GroupNorm(8, 64) fwd": no_grad(group, images),
    }


def _median(call, calls: int = 30) -> float:
    call()
    return statistics.median(seconds_of(call) for _ in range(calls))


def measure(rounds: int, pools=("torch", "normlab")) -> dict:
    """{(pool, case): {exponent: threaded / serial}}."""
    table: dict = {}
    for pool in pools:
        threads.share_torch_pool(pool == "torch")
        name = threads.describe().split("(", 1)[1].rstrip(")")
        if pool == "torch" and name != "torch OpenMP pool":
            continue  # torch here does not run on GNU OpenMP
        for exponent in SIZES:
            for case, call in _cases(1 << exponent).items():
                seconds = {"threaded": [], "serial": []}
                for _ in range(rounds):
                    for mode, below in (("threaded", ALWAYS), ("serial", NEVER)):
                        threads.REGION_SERIAL_BELOW = threads.POOL_SERIAL_BELOW = below
                        seconds[mode].append(_median(call))
                table.setdefault((name, case), {})[exponent] = \
                    statistics.median(seconds["threaded"]) / statistics.median(seconds["serial"])
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--pool", choices=("torch", "normlab"), help="measure one pool only")
    args = parser.parse_args(argv)
    region, pool = threads.REGION_SERIAL_BELOW, threads.POOL_SERIAL_BELOW
    try:
        table = measure(args.rounds, (args.pool,) if args.pool else ("torch", "normlab"))
    finally:
        threads.REGION_SERIAL_BELOW, threads.POOL_SERIAL_BELOW = region, pool
    print(f"threaded time over serial time, {threads.for_call()} threads (below 1: threads pay)")
    print("| pool | case | " + " | ".join(f"2^{e}" for e in SIZES) + " |")
    print("|---|---|" + "---|" * len(SIZES))
    for (name, case), ratios in table.items():
        print(f"| {name} | {case} | " + " | ".join(f"{ratios[e]:.2f}" for e in SIZES) + " |")
    return 0


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
