"""``normlab bench``: normlab against PyTorch, ONNX Runtime and naive NumPy.

One table of cases (:data:`CASES`) drives the command and the scripts in ``benchmarks/``.
Every engine gets fresh output arrays on every call (``out=`` only where a case says so),
and the median of ``--repeats`` timed calls, taken in rounds in which the engines take
turns, each round after a warm-up call (the first round after two: the first call compiles
the kernels, the second builds the repeated-call fast path).
It runs in the environment the user has: no thread or wait-policy variable is set for
the measurement (normlab's own kernels use its own pool of sleeping workers). "copy bw" is the case's
essential traffic (read x, write y; forward+backward adds read x and grad_y, write
grad_x) over the time, as a share of the bandwidth that
``np.copyto`` reaches on the same array. Heavy imports (torch, onnxruntime, rich,
matplotlib) happen inside :func:`run`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

HELP = "time normlab against PyTorch, ONNX Runtime and NumPy"
EPS = 1e-5


@dataclass(frozen=True)
class BenchCase:
    """One row of the table: a norm, its input shape (full and ``--quick``) and what is timed.

    ``mode`` is ``"fwd"``, ``"fwd+bwd"``, ``"eval"`` (batch norm with given statistics)
    or ``"fwd out="`` (normlab writes into a preallocated output).
    """

    name: str
    norm: str  # layer, rms, batch, batch_last, group, instance
    mode: str
    shape: tuple[int, ...]
    quick_shape: tuple[int, ...]
    sizes: dict = field(default_factory=dict)

    @property
    def pattern(self) -> str:
        return {
            "layer": "b [d]",
            "rms": "b [d]",
            "batch": "[n] c [h w]",
            "batch_last": "[n h w] c",
            "group": "n (g [c]) [h w]",
            "instance": "n c [h w]",
        }[self.norm]

    @property
    def params(self) -> str:
        return {"layer": "d", "rms": "d", "group": "(g c)"}.get(self.norm, "c")

    @property
    def traffic(self) -> int:
        """Arrays of x's size that must cross memory at least once."""
        return 5 if self.mode == "fwd+bwd" else 2


CASES: tuple[BenchCase, ...] = (
    BenchCase("layer norm", "layer", "fwd", (8192, 4096), (1024, 1024)),
    BenchCase("layer norm", "layer", "fwd out=", (8192, 4096), (1024, 1024)),
    BenchCase("layer norm", "layer", "fwd+bwd", (8192, 4096), (1024, 1024)),
    BenchCase("RMS norm", "rms", "fwd", (8192, 4096), (1024, 1024)),
    BenchCase("batch norm", "batch", "fwd", (64, 64, 56, 56), (8, 64, 28, 28)),
    BenchCase("batch norm", "batch", "fwd+bwd", (64, 64, 56, 56), (8, 64, 28, 28)),
    BenchCase("batch norm", "batch", "eval", (64, 64, 56, 56), (8, 64, 28, 28)),
    BenchCase("batch norm NHWC", "batch_last", "fwd", (64, 56, 56, 64), (8, 28, 28, 64)),
    BenchCase("group norm g=32", "group", "fwd+bwd", (64, 64, 56, 56), (8, 64, 28, 28), {"g": 32}),
    BenchCase("instance norm", "instance", "fwd", (64, 64, 56, 56), (8, 64, 28, 28)),
    BenchCase("small layer norm", "layer", "fwd", (256, 1024), (256, 1024)),
    BenchCase("tiny layer norm", "layer", "fwd", (1, 768), (1, 768)),
)


@dataclass
class Inputs:
    """The arrays of one case, shared by every engine."""

    x: np.ndarray
    grad_y: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray  # per channel, for eval
    var: np.ndarray


def make_inputs(case: BenchCase, shape) -> Inputs:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    channels = shape[-1] if case.norm in ("layer", "rms", "batch_last") else shape[1]
    return Inputs(
        x=x,
        grad_y=rng.standard_normal(shape, dtype=np.float32),
        weight=rng.uniform(0.5, 1.5, channels).astype(np.float32),
        bias=rng.standard_normal(channels).astype(np.float32),
        mean=rng.standard_normal(channels).astype(np.float32) * 0.1,
        var=rng.uniform(0.5, 1.5, channels).astype(np.float32),
    )


# --- engines: each returns a zero-argument callable, or None when it does not apply ----------

def normlab_call(case: BenchCase, data: Inputs):
    import normlab

    kwargs = dict(weight=data.weight, params=case.params, **case.sizes)
    pattern = case.pattern
    if case.mode == "eval":
        rstd = 1.0 / np.sqrt(data.var.astype(np.float64) + EPS)
        return lambda: normlab.normalize(data.x, pattern, bias=data.bias, mean=data.mean, rstd=rstd, **kwargs)
    bias = None if case.norm == "rms" else data.bias
    rms = case.norm == "rms"
    if case.mode == "fwd out=":
        out = np.empty_like(data.x)
        return lambda: normlab.normalize(data.x, pattern, bias=bias, rms=rms, out=out, **kwargs)
    if case.mode == "fwd":
        return lambda: normlab.normalize(data.x, pattern, bias=bias, rms=rms, **kwargs)

    def forward_backward():
        y, mean, rstd = normlab.normalize(data.x, pattern, bias=bias, rms=rms, return_stats=True, **kwargs)
        return y, normlab.normalize_backward(data.grad_y, data.x, pattern, rms=rms, mean=mean, rstd=rstd, **kwargs)

    return forward_backward


def torch_call(case: BenchCase, data: Inputs):
    try:
        import torch
    except ImportError:
        return None
    F = torch.nn.functional
    x = torch.from_numpy(data.x)
    if case.norm == "batch_last":  # the same NHWC memory, seen by torch as NCHW channels_last
        x = x.permute(0, 3, 1, 2)
    w, b = torch.from_numpy(data.weight), torch.from_numpy(data.bias)
    d = data.x.shape[-1]
    forward = {
        "layer": lambda x, w, b: F.layer_norm(x, (d,), w, b, EPS),
        "rms": lambda x, w, b: F.rms_norm(x, (d,), w, EPS),
        "batch": lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, EPS),
        "batch_last": lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, EPS),
        "group": lambda x, w, b: F.group_norm(x, case.sizes.get("g", 1), w, b, EPS),
        "instance": lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS),
    }[case.norm]
    if case.mode == "eval":
        mean, var = torch.from_numpy(data.mean), torch.from_numpy(data.var)
        return lambda: F.batch_norm(x, mean, var, w, b, False, 0.1, EPS)
    if case.mode in ("fwd", "fwd out="):
        def run():
            with torch.no_grad():
                return forward(x, w, b)

        return run
    grad_y = torch.from_numpy(data.grad_y)
    x_leaf, w_leaf, b_leaf = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()

    def forward_backward():
        y = forward(x_leaf, w_leaf, b_leaf)
        return torch.autograd.grad(y, (x_leaf, w_leaf, b_leaf), grad_y)

    return forward_backward


def onnx_call(case: BenchCase, data: Inputs):
    """ONNX Runtime's fused operator for forward cases (None when missing or unsupported)."""
    if case.mode not in ("fwd", "eval") or case.norm in ("batch", "batch_last") and case.mode != "eval":
        return None  # ONNX Runtime's inference BatchNormalization has no training mode
    try:
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    shape = list(data.x.shape)
    inits = [numpy_helper.from_array(data.weight, "w"), numpy_helper.from_array(data.bias, "b")]
    if case.norm == "layer":
        node, opset = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=EPS), 17
    elif case.norm == "rms":
        inits = inits[:1]
        node, opset = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=EPS), 23
    elif case.norm == "instance":
        node, opset = helper.make_node("InstanceNormalization", ["x", "w", "b"], ["y"], epsilon=EPS), 17
    elif case.norm == "batch":
        inits += [numpy_helper.from_array(data.mean, "m"), numpy_helper.from_array(data.var, "v")]
        node, opset = helper.make_node("BatchNormalization", ["x", "w", "b", "m", "v"], ["y"], epsilon=EPS), 15
    else:
        return None
    graph = helper.make_graph([node], case.norm, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {"x": data.x}
        session.run(None, feed)
    except Exception:  # an operator this ONNX Runtime build lacks: leave the cell empty
        return None
    return lambda: session.run(None, feed)


def numpy_call(case: BenchCase, data: Inputs):
    """Naive NumPy: the textbook formula with reductions over the reduced axes, in float32."""
    x, gy = data.x, data.grad_y
    if case.norm in ("layer", "rms"):
        axes, pshape = (-1,), (1, -1)
    elif case.norm == "batch":
        axes, pshape = (0, 2, 3), (1, -1, 1, 1)
    elif case.norm == "batch_last":
        axes, pshape = (0, 1, 2), (1, 1, 1, -1)
    elif case.norm == "instance":
        axes, pshape = (2, 3), (1, -1, 1, 1)
    else:  # group: view (n, g, c/g, h, w)
        g = case.sizes["g"]
        x = x.reshape(x.shape[0], g, -1, *x.shape[2:])
        gy = gy.reshape(x.shape)
        axes, pshape = (2, 3, 4), (1, g, -1, 1, 1)
    w, b = data.weight.reshape(pshape), data.bias.reshape(pshape)
    outside = tuple(i for i in range(x.ndim) if pshape[i] == 1)
    if case.mode == "eval":
        m, r = data.mean.reshape(pshape), 1 / np.sqrt(data.var.reshape(pshape) + EPS)
        return lambda: (x - m) * r * w + b
    if case.norm == "rms":
        return lambda: x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + EPS) * w

    def forward():
        mean = x.mean(axis=axes, keepdims=True)
        rstd = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + EPS)
        return (x - mean) * rstd * w + b, mean, rstd

    if case.mode != "fwd+bwd":
        return lambda: forward()[0]

    def forward_backward():
        y, mean, rstd = forward()
        x_hat = (x - mean) * rstd
        g_scaled = gy * w
        grad_x = rstd * (g_scaled - g_scaled.mean(axis=axes, keepdims=True)
                         - x_hat * (g_scaled * x_hat).mean(axis=axes, keepdims=True))
        return y, grad_x, (gy * x_hat).sum(axis=outside), gy.sum(axis=outside)

    return forward_backward


ENGINES = {"normlab": normlab_call, "torch": torch_call, "onnxruntime": onnx_call, "numpy": numpy_call}


# --- timing ------------------------------------------------------------------------------------

def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Row:
    """A measured case: median seconds per engine (None where it does not apply)."""

    case: BenchCase
    shape: tuple[int, ...]
    seconds: dict
    copy_share: float


ROUNDS = 3  # engines take turns this many times per case
# the first call compiles, the second builds normlab's repeated-call fast path (about 5x a
# steady call): neither is timed, or a run of 1-2 repeats (--quick) reports them
FIRST_WARM_UPS = 2
SETTLE_SECONDS = 0.02  # a pause after each engine's turn (see timed_rounds)
ONNX_SETTLE_SECONDS = 0.15  # ONNX Runtime's workers spin 20-100 ms after a run


def settle(engine: str) -> None:
    """The untimed pause after an engine's turn: thread pools that spin after a call
    (ONNX Runtime's workers spin 20-100 ms after a run, PyTorch's OpenMP workers less) go
    quiet before the next engine starts, so none runs on cores another's pool still holds."""
    time.sleep(ONNX_SETTLE_SECONDS if engine == "onnxruntime" else SETTLE_SECONDS)


def timed_rounds(calls: dict, repeats: int, announce=None) -> dict[str, list[float]]:
    """``repeats`` timed calls of every engine in ``calls`` (None: left out), split into
    up to :data:`ROUNDS` rounds in which the engines take turns, each after a warm-up call,
    the first after :data:`FIRST_WARM_UPS`. ``announce(engine)`` is called as each engine's
    last round starts."""
    timed = {engine: [] for engine in calls}
    rounds = min(ROUNDS, repeats)
    for index in range(rounds):
        count = repeats // rounds + (index < repeats % rounds)
        for engine, call in calls.items():
            if announce and index == rounds - 1:
                announce(engine)
            if call is not None:
                for _ in range(FIRST_WARM_UPS if index == 0 else 1):
                    call()
                timed[engine].extend(seconds_of(call) for _ in range(count))
                settle(engine)
    return timed


def measure(cases, quick: bool, repeats: int, progress=None) -> list[Row]:
    """Time every engine on every case; ``progress(description)`` is called once per
    case and engine, as that engine's last round starts.

    The repeats of each case are split into up to :data:`ROUNDS` rounds; in each round
    every engine, then ``np.copyto`` on the same array, runs a warm-up call (two in the first
    round, see :data:`FIRST_WARM_UPS`) and its
    share of the timed calls back to back. The median is over all of an engine's timed
    calls. Rounds spread each engine over the case's whole time, so a neighbour's load
    that comes and goes shifts all engines alike instead of one. (Taking turns call by
    call looks fairer still but is not: the OpenMP pools of Numba and PyTorch keep
    spinning after a call and steal each other's cores; a pause after each engine's turn,
    :data:`SETTLE_SECONDS`, lets them go quiet, and the warm-up call absorbs the rest.)
    """
    rows = []
    for case in cases:
        shape = case.quick_shape if quick else case.shape
        data = make_inputs(case, shape)
        calls = {engine: build(case, data) for engine, build in ENGINES.items()}
        copy_target = np.empty_like(data.x)
        calls["copy"] = lambda: np.copyto(copy_target, data.x)
        timed = timed_rounds(calls, repeats, progress and (lambda engine: engine in ENGINES and progress(
            f"{case.name} {case.mode}: {engine}")))
        seconds = {engine: statistics.median(timed[engine]) if timed[engine] else None for engine in ENGINES}
        copy_bandwidth = 2 * data.x.nbytes / statistics.median(timed["copy"])
        share = case.traffic * data.x.nbytes / seconds["normlab"] / copy_bandwidth
        rows.append(Row(case, shape, seconds, share))
    return rows


def _ms(value) -> str:
    return "–" if value is None else f"{value * 1e3:.3f}" if value < 1e-3 else f"{value * 1e3:.2f}"


def _ratio(other, mine) -> str:
    return "–" if other is None else f"{other / mine:.2f}×"


def table_rows(rows: list[Row]) -> list[list[str]]:
    """The table as text cells: case, shape, the four times (ms), speedups, copy share."""
    cells = []
    for row in rows:
        s = row.seconds
        cells.append([
            f"{row.case.name} {row.case.mode}", "×".join(map(str, row.shape)),
            _ms(s["normlab"]), _ms(s["torch"]), _ms(s["onnxruntime"]), _ms(s["numpy"]),
            _ratio(s["torch"], s["normlab"]), _ratio(s["onnxruntime"], s["normlab"]), _ratio(s["numpy"], s["normlab"]),
            f"{row.copy_share:.0%}",
        ])
    return cells


HEADERS = ["case", "shape", "normlab ms", "torch ms", "onnxrt ms", "numpy ms", "vs torch", "vs onnxrt",
           "vs numpy", "copy bw"]


def markdown(rows: list[Row]) -> str:
    """The table in Markdown, as the README carries it."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Fail with an install hint when matplotlib, which ``--plot`` needs, does not import."""
    from normlab.errors import InputError

    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise InputError(f"--plot needs matplotlib, which does not import here ({err}); install it with "
                         "pip install matplotlib (or pip install \"normlab[bench]\"), or leave out --plot") from None


def require_modules(what: str, names, instead: str) -> None:
    """Fail with an install hint when a module that ``what`` needs (torch, transformers,
    torch_geometric) does not import: before the run, not as a traceback in the middle of it."""
    import importlib

    from normlab.errors import InputError

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise InputError(f"{what}: {name} does not import here ({err}); install it with "
                             f"pip install {name}, or {instead}") from None


def require_plot(path: str) -> None:
    """Check ``--plot`` before the run, not after minutes of it: matplotlib imports, it
    can write the file's format, and the file's folder exists and is writable."""
    import os
    from pathlib import Path

    from normlab.errors import InputError

    require_matplotlib()
    from matplotlib.figure import Figure

    target = Path(path)
    formats = Figure().canvas.get_supported_filetypes()
    suffix = target.suffix[1:].lower()
    if suffix and suffix not in formats:
        raise InputError(f"--plot {path!r}: matplotlib cannot write .{suffix} files; end the name with one of "
                         f"{', '.join('.' + f for f in sorted(formats))}, e.g. speed.png")
    folder = target.parent
    if target.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        why = "it is a folder" if target.is_dir() else f"the folder {str(folder)!r} is missing or not writable"
        raise InputError(f"cannot save the plot to {path!r}: {why}; pass --plot with a writable path")


def plot(rows: list[Row], path: str) -> None:
    """A bar chart of normlab's speedup over each engine, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [f"{r.case.name}\n{r.case.mode}" for r in rows]
    others = ["torch", "onnxruntime", "numpy"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    width = 0.8 / len(others)
    for k, engine in enumerate(others):
        ratios = [(r.seconds[engine] / r.seconds["normlab"]) if r.seconds[engine] else 0.0 for r in rows]
        ax.bar(np.arange(len(rows)) + (k - 1) * width, ratios, width, label=f"vs {engine}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speedup of normlab (×)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}×"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEFAULT_REPEATS = 9  # three rounds of three timed calls
QUICK_REPEATS = 2


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--repeats 0`` would time nothing).

    >>> positive_int("3")
    3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def some_text(example: str):
    """An argparse type for an option whose empty value (``--plot ''``, ``--case "$UNSET"``)
    would be taken silently: no plot at all, or every case.

    >>> some_text("--plot speed.png")("a.png")
    'a.png'
    """
    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"needs a value, e.g. {example}; got {text!r}")
        return text

    return check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``normlab bench``."""
    parser.add_argument("--quick", action="store_true", help=f"small shapes and {QUICK_REPEATS} repeats: a smoke test")
    parser.add_argument("--repeats", type=positive_int, default=None, metavar="N",
                        help=f"timed calls per cell, at least 1 (default {DEFAULT_REPEATS}, quick {QUICK_REPEATS})")
    parser.add_argument("--case", action="append", default=None, metavar="TEXT", type=some_text('--case "layer norm"'),
                        help="only cases whose name and mode contain TEXT (repeatable)")
    parser.add_argument("--plot", metavar="FILE.png", default=None, type=some_text("--plot speed.png"),
                        help="save a bar chart of the speedups")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--sweep", action="store_true",
                        help="normlab.torch's layer, RMS and batch norm modules against torch.nn eager, "
                             "torch.compile and ONNX Runtime over rows x features; --plot saves heatmaps")
    parser.add_argument("--no-compile", action="store_true", help="with --sweep: leave out torch.compile")
    parser.add_argument("--no-color", dest="bench_no_color", action="store_true", help="plain text output")


def run_script(main) -> None:
    """Run a script of ``benchmarks/`` and exit with ``main()``'s status; a reader that stops
    early (``python benchmarks/models.py | head -3``) ends it quietly with status 1, as rich
    ends the ``normlab`` command, not in a BrokenPipeError traceback."""
    import os
    import sys

    status = 1
    try:
        try:
            status = main()
        except SystemExit as exit_:  # argparse's errors: their status, once what was printed is out
            status = exit_.code
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit fails too)
        status = status or 1
    raise SystemExit(status)


def make_console(args: argparse.Namespace):
    """The console the tables go to: plain with ``--no-color`` (before or after ``bench``),
    and 160 columns wide when piped into a file, so that no table folds to 80."""
    from rich.console import Console

    from normlab.cli import spell_before_layout

    console = Console(no_color=getattr(args, "no_color", False) or getattr(args, "bench_no_color", False))
    console = console if console.is_terminal else Console(no_color=True, width=160)
    spell_before_layout(console)
    return console


def select(filters) -> tuple[BenchCase, ...]:
    if not filters:
        return CASES
    return tuple(c for c in CASES if any(f.lower() in f"{c.name} {c.mode}".lower() for f in filters))


# Markdown goes out as it is: no markup, no highlighting, and no wrapping at the
# terminal's width, which would cut a table's rows in two
AS_TEXT = dict(markup=False, highlight=False, soft_wrap=True)


def _print_fused(console, rows, repeats: int, as_markdown: bool) -> None:
    from rich.table import Table

    from normlab import bench_fused

    if as_markdown:
        console.print(bench_fused.markdown(rows), **AS_TEXT)
        return
    table = Table(title=f"fused blocks, median of {repeats} runs, float32 (bf16: bfloat16)")
    for header in bench_fused.HEADERS:
        table.add_column(header, justify="left" if header in ("case", "shape") else "right")
    for cells in bench_fused.table_rows(rows):
        table.add_row(*cells)
    console.print(table)


def _print_masked(console, rows, repeats: int, as_markdown: bool) -> None:
    from normlab import bench_masked

    if as_markdown:
        console.print(bench_masked.markdown(rows), **AS_TEXT)
        return
    from rich.table import Table

    table = Table(title=f"masks and segments: median of {repeats} interleaved runs, float32, fwd+bwd")
    for header in bench_masked.HEADERS:
        table.add_column(header, justify="left" if header in ("case", "shape", "competitor") else "right")
    for cells in bench_masked.table_rows(rows):
        table.add_row(*cells)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    """Measure, print the table (and save the plot)."""
    from rich.progress import Progress
    from rich.table import Table

    from normlab.errors import InputError

    if getattr(args, "sweep", False):
        return run_sweep(args)
    if args.no_compile:  # an option that would do nothing here: say so rather than ignore it
        raise InputError("--no-compile leaves torch.compile out of --sweep only (the table and its fused and masked "
                         "groups run as they are); add --sweep or leave out --no-compile")
    from normlab import bench_fused, bench_masked

    cases = select(args.case)
    fused_cases = bench_fused.select(args.case)  # the fused group runs when asked for by name
    masked_cases = bench_masked.selected(args.case)  # so does the masked group
    if not cases and not fused_cases and not masked_cases:
        raise InputError(f"no benchmark case matches {args.case}; cases: "
                         + ", ".join([f"{c.name} {c.mode}" for c in CASES] + ["fused (the fused-block group)",
                                                                              "masked (masks and segments)"]))
    if fused_cases:
        require_modules("--case fused", sorted({n for c in fused_cases for n in c.needs}),
                        "leave out the fused cases")
    if masked_cases:
        require_modules("--case masked", sorted({n for c in masked_cases for n in c.needs}),
                        "leave out the masked cases")
    if args.plot and not cases:  # the chart is of the regular table; the groups print tables only
        raise InputError(f"--plot draws the speedups of the regular cases, and --case {' '.join(args.case)!r} selects "
                         "none of them (only the fused or masked group, which have no chart); leave out --plot or "
                         "add a --case of the regular table")
    if args.plot:
        require_plot(args.plot)  # before the run, not after minutes of it
    repeats = args.repeats if args.repeats is not None else QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    console = make_console(args)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=len(cases) * len(ENGINES)
                            + len(fused_cases) * len(bench_fused.ENGINES))

        def advance(description):
            bar.update(task, description=description)
            bar.advance(task)

        rows = measure(cases, args.quick, repeats, advance)
        fused_rows = bench_fused.measure(fused_cases, args.quick, repeats, advance)
    if fused_rows:
        _print_fused(console, fused_rows, repeats, args.markdown)
    if masked_cases:
        _print_masked(console, bench_masked.measure(masked_cases, args.quick, repeats), repeats, args.markdown)
    if not rows:
        return 0
    if args.markdown:
        console.print(markdown(rows), **AS_TEXT)
    else:
        table = Table(title=f"median of {repeats} runs, float32")
        for header in HEADERS:
            table.add_column(header, justify="left" if header in ("case", "shape") else "right")
        for cells in table_rows(rows):
            table.add_row(*cells)
        console.print(table)
    if args.plot:
        plot(rows, args.plot)
        console.print(f"saved {args.plot}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """``--sweep``: time the grid, print one ratio table per norm and mode (and save heatmaps)."""
    from rich.progress import Progress
    from rich.table import Table

    from normlab import sweep
    from normlab.errors import InputError

    ignored = [option for option, value in (("--case", args.case), ("--repeats", args.repeats)) if value is not None]
    if ignored:  # the sweep times its own grid, each cell for a fixed time
        raise InputError(f"{' and '.join(ignored)}: not used by --sweep, which times its own grid for a fixed time "
                         f"per cell; leave out {' and '.join(ignored)}")
    require_modules("--sweep", ["torch"], "leave out --sweep")
    if args.plot:
        require_plot(args.plot)
    console = make_console(args)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("sweeping", total=None)
        cells = sweep.measure(quick=args.quick, compile=not args.no_compile,
                              progress=lambda text: bar.update(task, description=text))
    if args.markdown:
        console.print(sweep.markdown(cells), **AS_TEXT)
    else:
        for title, header, body in sweep.ratio_tables(cells):
            table = Table(title=f"{title}: torch eager / torch.compile / ONNX Runtime time over normlab's, float32")
            for column in header:
                table.add_column(column, justify="right")
            for line in body:
                table.add_row(*line)
            console.print(table)
    if args.plot:
        sweep.plot(cells, args.plot)
        console.print(f"saved {args.plot}")
    return 0
