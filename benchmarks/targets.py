"""Check issue 3's speed targets against one measurement of the shared case table.

    python benchmarks/targets.py [--quick] [--repeats N]

Prints each target, the measured value and whether it is met. Timings, never a test.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import argparse

from normlab import bench

# (case name, mode, engine compared, the required ratio of the other engine's time to normlab's)
TARGETS = (
    ("layer norm", "fwd", "torch", 1.25),
    ("layer norm", "fwd", "onnxruntime", 1.0),
    ("layer norm", "fwd+bwd", "torch", 1.25),
    ("RMS norm", "fwd", "torch", 2.0),
    ("batch norm", "fwd+bwd", "torch", 1.5),
    ("group norm g=32", "fwd+bwd", "torch", 1.25),
    ("small layer norm", "fwd", "torch", 1 / 1.5),
)
COPY_SHARE_TARGET = ("layer norm", "fwd out=", 0.70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    bench.passive_openmp()
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
    main()
