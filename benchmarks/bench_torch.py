"""normlab.torch against torch.nn, forward+backward, CPU float32, in one process.

Prints the median of several runs of each case and the speed-up (torch.nn time over
normlab time; above 1 is faster). The speed targets: LayerNorm on (8192, 4096) ≥ 1.25×,
BatchNorm2d training on (64, 64, 56, 56) ≥ 1.5×. The last row times a tiny input, where
the wrapper's per-call overhead dominates.

    python benchmarks/bench_torch.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import normlab.torch as nt
from normlab.bench import positive_int


@dataclass(frozen=True)
class Case:
    name: str
    make_torch: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    target: float | None  # the speed-up normlab aims for (see the README's Speed section)


CASES = [
    Case("LayerNorm(4096) fwd+bwd", lambda: torch.nn.LayerNorm(4096), (8192, 4096), 1.25),
    Case("BatchNorm2d(64) train fwd+bwd", lambda: torch.nn.BatchNorm2d(64), (64, 64, 56, 56), 1.5),
    Case("LayerNorm(64) fwd+bwd, overhead", lambda: torch.nn.LayerNorm(64), (8, 64), None),
]


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward and backward (after one warm-up call)."""
    def step():
        x.grad = None
        module(x).backward(grad_y)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, "
          f"median of {args.repeats} runs")
    print(f"{'case':<34} {'shape':<18} {'torch.nn ms':>12} {'normlab ms':>11} {'speed-up':>9} {'target':>7}")
    for case in CASES:
        torch.manual_seed(0)
        reference = case.make_torch()
        twin = nt.convert(case.make_torch())
        x = torch.randn(case.shape, requires_grad=True)
        grad_y = torch.randn(case.shape)
        repeats = args.repeats if x.numel() > 1e5 else 200 * args.repeats
        torch_s = time_fwd_bwd(reference, x, grad_y, repeats)
        normlab_s = time_fwd_bwd(twin, x, grad_y, repeats)
        target = f"{case.target:.2f}x" if case.target else ""
        print(f"{case.name:<34} {str(case.shape):<18} {torch_s * 1e3:>12.3f} {normlab_s * 1e3:>11.3f} "
              f"{torch_s / normlab_s:>8.2f}x {target:>7}")


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
