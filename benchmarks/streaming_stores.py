"""Where non-temporal output stores pay: each streamed kernel compiled twice, streaming
always and never, timed in turns on the same arrays (median of each), per output size.

A non-temporal store writes a whole 64-byte line to memory without first reading it
into the cache. For an output far past the last-level cache that saves a third of an
output pass's traffic; for one that fits, it sends to memory what the next operation
would have found in cache. ``normlab.kernels.rows.STREAM_ELEMENTS`` and
``columns.COLUMN_STREAM_ELEMENTS`` come from this table. Above 1: the streamed copy is faster. Threaded runs use normlab's own pool (no
torch in this process), one thread per core.

    python benchmarks/streaming_stores.py [--rounds 7] [--sizes 4,8,16,32,128]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse
import statistics
import time
import types

import numpy as np

from normlab.bench import positive_int
from normlab.kernels import columns, rows, rows_backward, strided, threads
from normlab.kernels._jit import kernel

ALWAYS, NEVER = 0, 1 << 62


def _copies(kern, module) -> dict:
    """``kern`` compiled with STREAM_ELEMENTS at ALWAYS and at NEVER (its own names, so
    its own cache files)."""
    made = {}
    for label, value in (("plain", NEVER), ("streamed", ALWAYS)):
        fn = kern.py_func
        namespace = dict(fn.__globals__, STREAM_ELEMENTS=value, COLUMN_STREAM_ELEMENTS=value)
        copy = types.FunctionType(fn.__code__, namespace, f"{fn.__name__}_bench_{label}", fn.__defaults__,
                                  fn.__closure__)
        copy.__qualname__ = f"{fn.__qualname__}_bench_{label}"
        copy.__module__ = module.__name__
        made[label] = kernel(copy)
    return made


def _cases(mib: int) -> dict:
    """name -> (kernel copies, argument builder) for an output of ``mib`` MiB float32."""
    rng = np.random.default_rng(0)
    elements = mib << 18
    n = 4096
    x = rng.standard_normal((elements // n, n)).astype(np.float32) + 3
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.random((1, n)).astype(np.float32)
    b = rng.random((1, n)).astype(np.float32)
    y = np.empty_like(x)
    count = len(x)
    plain = strided.PLAIN_ROWS

    def forward_args():
        stats = (np.empty(count), np.empty(count), np.empty(count))
        return (x, plain, y, plain, n, w, b, 1, 1, False, 1e-5, False, *stats)

    chunk = 64

    def backward_args():
        parts = np.zeros((2, -(-count // chunk), 1, n))
        return (g, plain, x, plain, n, w, 1, 1, False, 1e-5, False, np.empty(count), np.empty(count), chunk, y,
                plain, parts[0], parts[1], np.zeros(parts.shape[1], np.bool_))

    images = x.reshape(16, 64, -1)
    image_out = y.reshape(images.shape)
    mean, rstd = images.mean(axis=(0, 2), dtype=np.float64), 1 / images.std(axis=(0, 2), dtype=np.float64)
    ones, zeros = np.ones(64), np.zeros(64)
    hi = mean.astype(np.float32)
    lo = (mean - hi).astype(np.float32)

    def apply_args():
        return (images, image_out, ones, zeros, mean, rstd)

    def eval_args():
        return (images, image_out, hi, lo, rstd.astype(np.float32), zeros.astype(np.float32))

    return {
        "layer norm fwd (rows of 4096)": (_copies(rows.row_forward32, rows), forward_args),
        "layer norm bwd (rows of 4096)": (_copies(rows_backward.row_backward32, rows_backward), backward_args),
        "batch norm train apply (NCHW)": (_copies(columns.channels_first_apply32, columns), apply_args),
        "batch norm eval (NCHW)": (_copies(columns.channels_first_scale_shift, columns), eval_args),
    }


def _sizes(text: str) -> list[int]:
    """An argparse type: comma-separated sizes in MiB, each at least 1."""
    return [positive_int(size) for size in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--sizes", type=_sizes, default="4,8,16,32,128", help="output sizes in MiB, comma-separated")
    args = parser.parse_args(argv)
    print(markdown(measure(args.sizes, args.rounds), args.sizes))


def measure(sizes: list[int], rounds: int) -> dict:
    """{(kernel, threaded): {MiB: plain time / streamed time}}."""
    table: dict = {}
    for mib in sizes:
        for name, (copies, build) in _cases(mib).items():
            for threaded in (False, True):
                times = {label: [] for label in copies}
                for label, copy in copies.items():  # compile and warm up
                    copy(*build(), serial=not threaded)
                repeats = max(1, 256 // mib)
                for _ in range(rounds):
                    for label, copy in copies.items():
                        arguments = [build() for _ in range(repeats)]
                        start = time.perf_counter()
                        for each in arguments:
                            copy(*each, serial=not threaded)
                        times[label].append((time.perf_counter() - start) / repeats)
                plain, streamed = (statistics.median(times[k]) for k in ("plain", "streamed"))
                table.setdefault((name, threaded), {})[mib] = plain / streamed
    return table


def markdown(table: dict, sizes: list[int]) -> str:
    """The table as the README carries it; threaded rows give the threads they ran on."""
    lines = ["| kernel | threads | " + " | ".join(f"{mib} MiB" for mib in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for (name, threaded), cells in table.items():
        count = threads.for_call() if threaded else 1
        lines.append(f"| {name} | {count} | " + " | ".join(f"{cells[mib]:.2f}" for mib in sizes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
