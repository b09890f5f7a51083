"""Measure what the first call costs when Numba compiles: a cold on-disk cache, then a warm one.

    python benchmarks/compile_cost.py

Runs each scenario in a fresh interpreter with NUMBA_CACHE_DIR pointing at an empty
temporary folder, so nothing compiled earlier is reused.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one

import os
import subprocess
import tempfile

SCENARIOS = {
    "layer norm fwd, float32": "normlab.normalize(np.ones((4, 64), np.float32), 'b [d]')",
    "layer norm fwd, float32, threaded": "normlab.normalize(np.ones((2048, 512), np.float32), 'b [d]')",
    "batch norm fwd, float32, threaded": "normlab.normalize(np.ones((64, 8, 32, 32), np.float32), '[b] c [h w]')",
    "layer norm fwd+bwd, float32, threaded": (
        "x = np.ones((2048, 512), np.float32); "
        "normlab.normalize_backward(x, x, 'b [d]', weight=np.ones(512, np.float32), params='d')"
    ),
    "LayerNorm fwd, float32, threaded, on torch's pool": (
        "import normlab.torch; normlab.torch.LayerNorm(512)(torch.ones(2048, 512))"
    ),
}
SETUP = "import torch; torch.set_grad_enabled(False)"  # before the clock: torch's own import is not normlab's cost
PROGRAM = """
import time, numpy as np
{setup}
start = time.perf_counter()
import normlab
{call}
first = time.perf_counter() - start
start = time.perf_counter()
{call}
print(f"{{first:.2f}} {{time.perf_counter() - start:.6f}}")
"""


def first_call_seconds(call: str, cache_dir: str) -> tuple[float, float]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=str(REPO))
    program = PROGRAM.format(call=call, setup=SETUP if "torch" in call else "")
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    first, second = result.stdout.split()
    return float(first), float(second)


def main() -> None:
    print(f"{'scenario':40} {'cold cache':>11} {'warm cache':>11} {'second call':>12}")
    for name, call in SCENARIOS.items():
        with tempfile.TemporaryDirectory() as cache_dir:
            cold, _ = first_call_seconds(call, cache_dir)
            warm, again = first_call_seconds(call, cache_dir)
        print(f"{name:40} {cold:10.2f}s {warm:10.2f}s {again * 1e3:8.2f}ms")


if __name__ == "__main__":
    from normlab.bench import run_script

    run_script(main)
