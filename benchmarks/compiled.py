"""torch.compile (Inductor) on a converted model against torch.nn compiled: a small CNN's
training step and a small transformer block's training step and evaluation.

    python benchmarks/compiled.py [--rounds 15]

Prints the median time per step of each engine, taken in interleaved rounds in one
process, and the ratio torch.nn / normlab (above 1: normlab faster). Under torch.compile
the twins take torch's own forward, so Inductor fuses around the norms as it does for
torch.nn; the column "kernel op" forces normlab's custom op instead (opaque to Inductor),
as every compiled model ran before.
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

import torch
from torch import nn

import normlab.torch as nt
from normlab.bench import positive_int


def cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 16), nn.MaxPool2d(2), *block(16, 32), *block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class Block(nn.Module):
    """A pre-norm transformer block: attention and MLP, each behind a LayerNorm."""

    def __init__(self, dim=128, heads=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def train_step(model, optimizer, x):
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()


def eval_step(model, _optimizer, x):
    with torch.no_grad():
        model(x)


def measure(name, build, x, step, rounds):
    torch.manual_seed(0)
    original = build()
    engines = {
        "torch.nn": original,
        "normlab": nt.convert(copy.deepcopy(original)),
        "kernel op": nt.convert(copy.deepcopy(original)),
    }
    paths = {"torch.nn": "auto", "normlab": "auto", "kernel op": "kernel"}
    torch._dynamo.reset()  # each case starts with an empty cache: no engine falls back for lack of room
    torch._dynamo.utils.counters.clear()  # and counts its own graphs (reset() keeps the counters)
    compiled, optimizers = {}, {}
    for key, model in engines.items():
        model.train(step is train_step)
        compiled[key] = torch.compile(model)
        optimizers[key] = torch.optim.SGD(model.parameters(), lr=1e-3)
        with nt.use_path(paths[key]):
            for _ in range(3):  # compile and warm up
                step(compiled[key], optimizers[key], x)
    times = {key: [] for key in engines}
    for _ in range(rounds):
        for key in engines:  # interleaved: a neighbour's load shifts every engine alike
            with nt.use_path(paths[key]):
                start = time.perf_counter()
                step(compiled[key], optimizers[key], x)
                times[key].append(time.perf_counter() - start)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    print(f"| {name} | {median['torch.nn']:.2f} | {median['normlab']:.2f} | "
          f"{median['torch.nn'] / median['normlab']:.2f} | {median['torch.nn'] / median['kernel op']:.2f} | {graphs} |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=15)
    rounds = parser.parse_args().rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {rounds} interleaved rounds")
    torch._dynamo.config.cache_size_limit = 64  # three engines share nn.Sequential.forward's cache
    print("| compiled | torch.nn ms | normlab ms | ratio | ratio, kernel op forced | graphs |")
    print("|---|---|---|---|---|---|")
    measure("CNN train step, 16×3×32×32", cnn, torch.randn(16, 3, 32, 32), train_step, rounds)
    measure("CNN eval, 16×3×32×32", cnn, torch.randn(16, 3, 32, 32), eval_step, rounds)
    measure("transformer block train step, 8×64×128", Block, torch.randn(8, 64, 128), train_step, rounds)
    measure("transformer block eval, 8×64×128", Block, torch.randn(8, 64, 128), eval_step, rounds)


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
