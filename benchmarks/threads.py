"""normlab.torch next to torch's own thread pool: training loops that alternate torch ops
(convolutions, matrix products, the optimizer) with normlab's norms, against the same
models with torch.nn's norms, in one process and in the default environment.

Prints milliseconds per training step (median over interleaved rounds: in each round
each variant runs its steps back to back, after one warm-up step) and the ratio torch.nn
time over normlab time (above 1: normlab is faster).

    python benchmarks/threads.py [--rounds 5] [--steps 8] [--threads N] [--pool NAME]

``--threads N`` calls ``torch.set_num_threads(N)`` first (normlab follows it);
``--pool`` chooses where normlab's threaded calls run, to compare the choices: ``torch``
(the default: torch's own OpenMP pool, as OpenMP regions), ``normlab`` (normlab's own pool
of sleeping workers, what the NumPy API uses without torch) or one of Numba's threading
layers (``omp``, ``workqueue``, ``tbb``).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from normlab.bench import positive_int


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.AvgPool2d(4), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(512, 1024), nn.LayerNorm(1024), nn.GELU(),
        nn.Linear(1024, 1024), nn.LayerNorm(1024), nn.GELU(),
        nn.Linear(1024, 10))


MODELS = (
    # norm inputs of 2^20 (CNN) and 2^19 (MLP) elements: large enough for threaded kernels
    Model("CNN, BatchNorm2d + GroupNorm", _cnn, (32, 3, 32, 32), 10),
    Model("MLP, LayerNorm", _mlp, (512, 512), 10),
)


def _step(model: nn.Module, optimizer, x, target) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()


def measure(model_case: Model, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per training step of torch.nn and the converted twin."""
    from normlab.torch import convert

    torch.manual_seed(0)
    reference = model_case.build()
    variants = {"torch.nn": reference, "normlab": convert(copy.deepcopy(reference))}
    x = torch.randn(model_case.input_shape)
    target = torch.randint(0, model_case.classes, (model_case.input_shape[0],))
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in variants.items()}
    timed: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            _step(model, optimizers[name], x, target)  # warm-up: both pools awake, as mid-epoch
            for _ in range(steps):
                start = time.perf_counter()
                _step(model, optimizers[name], x, target)
                timed[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in timed.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=8)
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads(N) first")
    parser.add_argument("--pool", choices=("torch", "normlab", "omp", "workqueue", "tbb"), default="torch",
                        help="torch's OpenMP pool (default), normlab's own pool or one of Numba's threading layers")
    args = parser.parse_args(argv)
    from normlab.kernels import threads

    if args.pool == "normlab":
        threads.share_torch_pool(False)
    elif args.pool != "torch":
        threads.use_numba_layer(args.pool)  # before any threaded call starts a pool
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [(case, measure(case, args.rounds, args.steps)) for case in MODELS]
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"normlab threads {threads.describe()}")
    print("| model | torch.nn ms/step | normlab ms/step | torch.nn / normlab |")
    print("|---|---|---|---|")
    for case, seconds in rows:
        print(f"| {case.name} | {seconds['torch.nn'] * 1e3:.2f} | {seconds['normlab'] * 1e3:.2f} | "
              f"{seconds['torch.nn'] / seconds['normlab']:.2f}× |")
    return 0


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
