"""Train a small CNN on synthetic data twice: with torch.nn norms, then converted to normlab.

Both runs start from the same weights and see the same batches, so their loss curves
agree to rounding. Prints both curves and the time per epoch; exits with status 1 if the
curves disagree beyond the dtype's tolerance. In float32 the two engines round each step
differently (by ~1e-7) and training amplifies that a few-fold per epoch: they agree to
about 3e-3 after five epochs (the check allows 1e-2); in float64 to about 1e-15 (the check
allows 1e-8).

    python examples/train_cnn.py                    # float32, about 10 s
    python examples/train_cnn.py --dtype float64    # agreement to about 1e-15
    python examples/train_cnn.py --quick            # a few seconds (the smoke test runs this)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from normlab.torch import convert

LOSS_TOLERANCE = {"float32": 1e-2, "float64": 1e-8}  # relative; see the module docstring
CLASSES = 10


def make_model(channels: int = 16) -> nn.Module:
    """Conv blocks with the three common norms: batch norm, group norm and layer norm."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2), nn.GroupNorm(4, 2 * channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.LayerNorm(2 * channels * 16), nn.Linear(2 * channels * 16, CLASSES),
    )


def synthetic_data(samples: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images labelled by a fixed random linear teacher (learnable, not trivial)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(samples, 3, size, size, generator=generator)
    teacher = torch.randn(3 * size * size, CLASSES, generator=generator)
    labels = (images.flatten(1) @ teacher).argmax(1)
    return images, labels


def train(model: nn.Module, images, labels, epochs: int, batch_size: int) -> tuple[list[float], list[float]]:
    """SGD with momentum; returns the mean loss and the wall time of each epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(1)  # the same batch order for both runs
    losses, seconds = [], []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        start, total = time.perf_counter(), 0.0
        for first in range(0, len(images), batch_size):
            batch = order[first:first + batch_size]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        seconds.append(time.perf_counter() - start)
        losses.append(total / len(images))
    return losses, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run for smoke tests")
    parser.add_argument("--dtype", choices=sorted(LOSS_TOLERANCE), default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    samples, size, epochs = (256, 16, 2) if args.quick else (2048, 16, 5)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # same arithmetic order in both runs, and fair timings on a shared machine
    images, labels = synthetic_data(samples, size)
    images = images.to(dtype)
    initial = make_model().to(dtype)

    torch_losses, torch_seconds = train(copy.deepcopy(initial), images, labels, epochs, batch_size=64)
    normlab_losses, normlab_seconds = train(convert(copy.deepcopy(initial)), images, labels, epochs, batch_size=64)

    print(f"{'epoch':>5}  {'torch.nn loss':>14}  {'normlab loss':>14}  {'torch.nn s':>10}  {'normlab s':>10}")
    for epoch, row in enumerate(zip(torch_losses, normlab_losses, torch_seconds, normlab_seconds), start=1):
        print(f"{epoch:>5}  {row[0]:>14.6f}  {row[1]:>14.6f}  {row[2]:>10.3f}  {row[3]:>10.3f}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(torch_losses, normlab_losses))
    tolerance = LOSS_TOLERANCE[args.dtype]
    agree = worst <= tolerance
    print(f"largest relative loss difference: {worst:.2e} ({'agree' if agree else 'DISAGREE'}, "
          f"{args.dtype} tolerance {tolerance:g})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
