"""``normlab bench --sweep``: normlab.torch's modules against torch.nn over rows × features.

Layer norm, RMS norm and batch norm (training and evaluation) on float32 inputs of
shape (rows, features), forward and forward+backward, each timed against torch.nn in
eager mode, the same torch.nn function under ``torch.compile`` (dynamic shapes, compiled
once per norm) and ONNX Runtime's fused operator (forward only). Every cell
counts the whole module call, per-call overhead included. Engines take turns in
:data:`ROUNDS` rounds per cell, each round a warm-up call (the first round
:data:`~normlab.bench.FIRST_WARM_UPS`) and then calls for about
:data:`ROUND_SECONDS`; a cell's time is the median over its calls. The tables print
the ratio competitor time / normlab time (above 1: normlab is faster); ``--plot``
saves them as heatmaps.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from normlab.bench import FIRST_WARM_UPS, settle

EPS = 1e-5
ROUNDS = 5
ROUND_SECONDS = 0.04
ROWS = (1, 64, 1024, 32768)
FEATURES = (64, 1024, 8192, 65536)
QUICK_ROWS = (1, 64, 1024)
QUICK_FEATURES = (64, 1024, 4096)
MAX_ELEMENTS = 1 << 25  # 128 MB of float32 per array: larger cells are left out
NORMS = ("layer", "rms", "batch", "batch eval")
MODES = ("fwd", "fwd+bwd")
COMPETITORS = ("eager", "compile", "onnxruntime")


@dataclass(frozen=True)
class Cell:
    """One measured cell: seconds per engine (None where the engine does not apply)."""

    norm: str
    mode: str
    rows: int
    features: int
    seconds: dict

    def ratio(self, competitor: str):
        mine, theirs = self.seconds.get("normlab"), self.seconds.get(competitor)
        return None if mine is None or theirs is None else theirs / mine


def _modules(norm: str, features: int):
    """(torch.nn module, normlab twin with the same state)."""
    import torch

    import normlab.torch as nt

    if norm == "layer":
        pair = torch.nn.LayerNorm(features, eps=EPS), nt.LayerNorm(features, eps=EPS)
    elif norm == "rms":
        pair = torch.nn.RMSNorm(features, eps=EPS), nt.RMSNorm(features, eps=EPS)
    else:
        pair = torch.nn.BatchNorm1d(features, eps=EPS), nt.BatchNorm1d(features, eps=EPS)
    reference, twin = pair
    with torch.no_grad():
        if reference.weight is not None:
            reference.weight.uniform_(0.5, 1.5)
        if getattr(reference, "bias", None) is not None:
            reference.bias.uniform_(-0.5, 0.5)
        if norm == "batch eval":
            reference.running_mean.uniform_(-0.1, 0.1)
            reference.running_var.uniform_(0.5, 1.5)
    twin.load_state_dict(reference.state_dict())
    if norm == "batch eval":
        reference.eval()
        twin.eval()
    return reference, twin


def _module_call(module, x, grad_y, mode: str):
    import torch

    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return module(x)

        return forward
    leaf = x.clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def forward_backward():
        y = module(leaf)
        return torch.autograd.grad(y, [leaf] + params, grad_y)

    return forward_backward


def _functional(norm: str):
    """torch.nn's computation of ``norm`` as a function of (x, *tensors): what torch.compile
    compiles once per norm (a module per feature count would recompile per module)."""
    import torch.nn.functional as F

    if norm == "layer":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    if norm == "rms":
        return lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)
    training = norm == "batch"
    return lambda x, w, b, mean, var: F.batch_norm(x, mean, var, w, b, training, 0.1, EPS)


class _Bound:
    """A compiled function bound to one module's tensors, called like the module."""

    def __init__(self, function, module, norm: str):
        self.function, self.module = function, module
        tensors = [module.weight] if norm == "rms" else [module.weight, module.bias]
        if norm.startswith("batch"):
            tensors += [module.running_mean, module.running_var]
        self.tensors = tensors

    def __call__(self, x):
        return self.function(x, *self.tensors)

    def parameters(self):
        return self.module.parameters()


def _onnx_call(norm: str, reference, x: np.ndarray):
    """ONNX Runtime's fused operator, forward only; None where it has none."""
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    weight = reference.weight.detach().numpy()
    inits = [numpy_helper.from_array(weight, "w")]
    if norm == "layer":
        inits.append(numpy_helper.from_array(reference.bias.detach().numpy(), "b"))
        node, opset = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=EPS), 17
    elif norm == "rms":
        node, opset = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=EPS), 23
    elif norm == "batch eval":
        inits += [numpy_helper.from_array(t.detach().numpy(), name) for t, name in
                  ((reference.bias, "b"), (reference.running_mean, "m"), (reference.running_var, "v"))]
        node, opset = helper.make_node("BatchNormalization", ["x", "w", "b", "m", "v"], ["y"], epsilon=EPS), 15
    else:
        return None  # ONNX Runtime's BatchNormalization has no training mode
    shape = list(x.shape)
    graph = helper.make_graph([node], norm.replace(" ", "_"),
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {"x": x}
        session.run(None, feed)
    except Exception:  # an operator this ONNX Runtime build lacks: leave the cell empty
        return None
    return lambda: session.run(None, feed)


def _time_cell(calls: dict) -> dict:
    """Median seconds per engine, the engines taking turns in rounds."""
    timed = {name: [] for name in calls}
    for index in range(ROUNDS):
        for name, call in calls.items():
            if call is None:
                continue
            # warm-up: also absorbs the other engine's thread pool still spinning; the first
            # round's takes FIRST_WARM_UPS calls, as normlab bench's (a module's second call
            # builds its fast path)
            for _ in range(FIRST_WARM_UPS - 1 if index == 0 else 0):
                call()
            start = time.perf_counter()
            call()
            warm = time.perf_counter() - start
            for _ in range(max(1, min(200, int(ROUND_SECONDS / max(warm, 1e-7))))):
                start = time.perf_counter()
                call()
                timed[name].append(time.perf_counter() - start)
            settle(name)  # untimed (see normlab.bench.settle)
    return {name: statistics.median(values) if values else None for name, values in timed.items()}


def measure(quick: bool = False, compile: bool = True, norms=NORMS, progress=None) -> list[Cell]:
    """Time every (norm, mode, rows, features) cell; ``progress(text)`` once per cell."""
    import torch

    rows_grid, features_grid = (QUICK_ROWS, QUICK_FEATURES) if quick else (ROWS, FEATURES)
    rng = np.random.default_rng(0)
    cells = []
    for norm in norms:
        for mode in MODES:
            if norm == "batch eval" and mode == "fwd+bwd":
                continue
            if compile:
                torch._dynamo.reset()  # a fresh cache per norm and mode: grad mode and shapes add entries
                # parameters' shapes are guarded statically: one entry per feature count
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(features_grid))
            compiled = torch.compile(_functional(norm), dynamic=True) if compile else None
            for features in features_grid:
                for rows in rows_grid:
                    if progress:
                        progress(f"{norm} {mode} {rows}×{features}")
                    if rows * features > MAX_ELEMENTS or (norm == "batch" and rows == 1):
                        continue  # too large, or batch statistics of one value per channel
                    x_np = rng.standard_normal((rows, features), dtype=np.float32)
                    x, grad_y = torch.from_numpy(x_np), torch.randn(rows, features)
                    reference, twin = _modules(norm, features)
                    calls = {"normlab": _module_call(twin, x, grad_y, mode),
                             "eager": _module_call(reference, x, grad_y, mode)}
                    if compiled is not None:
                        calls["compile"] = _compiled_or_none(_module_call(_Bound(compiled, reference, norm), x, grad_y,
                                                                          mode))
                    calls["onnxruntime"] = _onnx_call(norm, reference, x_np) if mode == "fwd" else None
                    cells.append(Cell(norm, mode, rows, features, _time_cell(calls)))
    return cells


def _compiled_or_none(call):
    """The compiled call after its first (compiling) run, or None if compilation fails here."""
    try:
        call()
    except Exception:
        return None
    return call


def ratio_tables(cells: list[Cell]) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per (norm, mode): rows down, features across, each cell
    ``eager / compile / onnxruntime`` ratios (competitor time over normlab's)."""
    tables = []
    for norm in NORMS:
        for mode in MODES:
            mine = [c for c in cells if c.norm == norm and c.mode == mode]
            if not mine:
                continue
            rows = sorted({c.rows for c in mine})
            features = sorted({c.features for c in mine})
            lookup = {(c.rows, c.features): c for c in mine}
            body = []
            for r in rows:
                line = [str(r)]
                for f in features:
                    cell = lookup.get((r, f))
                    line.append("–" if cell is None else " / ".join(
                        "–" if cell.ratio(k) is None else f"{cell.ratio(k):.2f}" for k in COMPETITORS))
                body.append(line)
            tables.append((f"{norm} {mode}", ["rows \\ features"] + [str(f) for f in features], body))
    return tables


def markdown(cells: list[Cell]) -> str:
    parts = []
    for title, header, body in ratio_tables(cells):
        parts.append(f"**{title}** (torch eager / torch.compile / ONNX Runtime time over normlab's)\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts += ["| " + " | ".join(line) + " |" for line in body]
        parts.append("")
    return "\n".join(parts)


def plot(cells: list[Cell], path: str) -> None:
    """Heatmaps of log2(competitor time / normlab time): one row per norm and mode, one
    column per competitor that ran (none for torch.compile under ``--no-compile``, nor for
    ONNX Runtime where it is missing); blue cells are normlab ahead, red behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, m) for n in NORMS for m in MODES if any(c.norm == n and c.mode == m for c in cells)]
    competitors = [k for k in COMPETITORS if any(c.ratio(k) is not None for c in cells)]
    fig, axes = plt.subplots(len(panels), len(competitors), figsize=(4.2 * len(competitors), 3.2 * len(panels)),
                             squeeze=False)
    for i, (norm, mode) in enumerate(panels):
        mine = [c for c in cells if c.norm == norm and c.mode == mode]
        rows = sorted({c.rows for c in mine})
        features = sorted({c.features for c in mine})
        for j, competitor in enumerate(competitors):
            grid = np.full((len(rows), len(features)), np.nan)
            for c in mine:
                ratio = c.ratio(competitor)
                if ratio is not None:
                    grid[rows.index(c.rows), features.index(c.features)] = ratio
            ax = axes[i][j]
            ax.imshow(np.log2(grid), cmap="RdBu", vmin=-2, vmax=2, origin="lower")
            for (r, f), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(f, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(features)), [str(f) for f in features], fontsize=7)
            ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
            ax.set_title(f"{norm} {mode}: vs {competitor}", fontsize=8)
            ax.set_xlabel("features", fontsize=7)
            ax.set_ylabel("rows", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
