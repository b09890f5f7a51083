"""``normlab bench``: the benchmark table (filled in by the kernels work)."""

from __future__ import annotations

import argparse

HELP = "time normlab against PyTorch, ONNX Runtime and NumPy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options yet."""


def run(args: argparse.Namespace) -> int:
    print("normlab bench: not implemented yet")
    return 1
