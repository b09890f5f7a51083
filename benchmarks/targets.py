"""Check normlab's speed targets against one measurement of the shared case table.

    python benchmarks/targets.py [--quick] [--repeats N]

The targets say what the fused kernels are for: a clear lead over PyTorch's CPU kernels
on large layer, RMS, batch and group norm (normalization is memory-bound, and PyTorch
leaves much of the bandwidth unused), at least parity with ONNX Runtime's fused layer
norm, an ``out=`` forward close to what ``np.copyto`` moves, and no large loss on a
small, in-cache layer norm, where per-call overhead dominates.

Prints each target, the measured value and whether it is met. Timings, never a test.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse

from normlab import bench

# (case name, mode, engine compared, the required ratio of the other engine's time to normlab's);
# the README's Speed section states the layer and RMS norm forward targets
TARGETS = (
    ("layer norm", "fwd", "torch", 3.0),  # a clear lead on the most common norm
    ("layer norm", "fwd", "onnxruntime", 1.1),  # ahead of the best fused CPU layer norm we know
    ("layer norm", "fwd+bwd", "torch", 1.25),  # training, not just inference
    ("RMS norm", "fwd", "torch", 2.0),  # PyTorch's CPU rms_norm is not fused at all
    ("RMS norm", "fwd", "onnxruntime", 1.1),
    ("batch norm", "fwd+bwd", "torch", 1.5),  # training batch norm: one pass over memory for the statistics
    ("group norm g=32", "fwd+bwd", "torch", 1.25),
    ("small layer norm", "fwd", "torch", 1 / 1.5),  # in cache: at most 1.5x PyTorch's time
)
# the out= forward reads x and writes y once: it should move at least 70% of np.copyto's bandwidth
COPY_SHARE_TARGET = ("layer norm", "fwd out=", 0.70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=bench.positive_int, default=bench.DEFAULT_REPEATS)
    args = parser.parse_args()
    wanted = {(name, mode) for name, mode, _, _ in TARGETS} | {COPY_SHARE_TARGET[:2]}
    cases = [c for c in bench.CASES if (c.name, c.mode) in wanted]
    rows = {(r.case.name, r.case.mode): r for r in bench.measure(cases, args.quick, args.repeats)}
    for name, mode, engine, needed in TARGETS:
        seconds = rows[(name, mode)].seconds
        if seconds[engine] is None:
            print(f"{name} {mode} vs {engine}: not measured ({engine} missing)")
            continue
        ratio = seconds[engine] / seconds["normlab"]
        print(f"{name} {mode} vs {engine}: {ratio:.2f}x (target {needed:.2f}x) {'met' if ratio >= needed else 'MISSED'}")
    name, mode, needed = COPY_SHARE_TARGET
    share = rows[(name, mode)].copy_share
    print(f"{name} {mode}: {share:.0%} of np.copyto bandwidth (target {needed:.0%}) {'met' if share >= needed else 'MISSED'}")


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
