"""``normlab explain``: which elements share statistics, for a pattern or a preset, on your data.

    normlab explain batch --data '[[4,3,2],[3,3,2],[2,2,2]]'
    normlab explain "b (g [c]) [s]" --shape 2,4,3 --seed 1 g=2 --html groups.html
"""

from __future__ import annotations

import argparse
import math
import re

from normlab.errors import NormlabError, PatternSyntaxError

HELP = "show which elements share statistics for a pattern or preset, in the terminal or as an HTML page"

MAX_CLAIMS_SHOWN = 12  # a screenful; the page lists every claim

PRESET_HELP = "batch, layer, layer-vision, instance, group (g= or a default that divides C), rms"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """PATTERN, the data (``--data`` or ``--shape``), ``--html`` and ``name=size`` sizes."""
    parser.add_argument("pattern", metavar="PATTERN", nargs="?", default=None,
                        help=f"a pattern such as '[b] f' or a preset: {PRESET_HELP}")
    parser.add_argument("sizes", metavar="name=size", nargs="*", help="sizes of composed axes, e.g. g=2")
    parser.add_argument("--data", metavar="JSON", help="the tensor as nested JSON lists, e.g. '[[4,3,2],[3,3,2]]'")
    parser.add_argument("--mask", metavar="JSON", help="0/1 or true/false lists shaped like the data, or broadcastable "
                        "to it (e.g. '[[1],[0]]', one per row): only the 1s count toward the statistics (the 0s are "
                        "still normalized, drawn greyed)")
    parser.add_argument("--segments", metavar="JSON", help="ids along the first bracketed axis, e.g. '[0,0,1]': "
                        "each id its own group (coloured apart)")
    parser.add_argument("--shape", metavar="2,3,4", help="draw random small integers of this shape instead")
    parser.add_argument("--seed", metavar="N", default="0",
                        help="seed for --shape, and for a random residual (seed + 1) or gate (seed + 2) (default 0)")
    parser.add_argument("--rms", action="store_true", help="divide by the root mean square, no mean (RMS norm)")
    parser.add_argument("--residual", action="store_true", help="fused block: normalize s = x + r, r random small "
                        "integers (seed + 1) unless --residual-data gives it")
    parser.add_argument("--residual-data", metavar="JSON", help="fused block: the residual r as nested JSON lists "
                        "shaped like the data (or broadcasting to it); implies --residual")
    parser.add_argument("--gate", metavar="ACT", choices=("silu", "sigmoid", "gelu"),
                        help="fused block: multiply by ACT(z) (silu, sigmoid or gelu) after the norm")
    parser.add_argument("--gate-first", action="store_true", help="gate before the statistics (Mamba2's block): "
                        "the norm then runs on h = x · ACT(z), z random integers -3 to 3 (seed + 2) unless "
                        "--gate-data gives it")
    parser.add_argument("--gate-data", metavar="JSON", help="fused block: the gate z as nested JSON lists shaped "
                        "like the data (or broadcasting to it); needs --gate ACT")
    parser.add_argument("--modulation", metavar="AXES", help="fused block: scale and shift over AXES, e.g. 'b d'")
    parser.add_argument("--weight-offset", metavar="O", type=float, default=0.0,
                        help="fused block: a stage multiplying by the weight plus O (1: Gemma's x̂ · (1 + w))")
    parser.add_argument("--html", metavar="FILE", type=page_file, help="also write a self-contained HTML page to FILE")
    parser.add_argument("--no-color", dest="explain_no_color", action="store_true", help="plain text output")
    _allow_sizes_after_options(parser)
    # a negative number in scientific notation (--weight-offset -1e-8) is a value, not an
    # option (argparse itself takes only the -1 and -0.5 forms, 3.10 to 3.13.0 alike)
    parser._negative_number_matcher = _NEGATIVE_NUMBER


_NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def page_file(name: str) -> str:
    """``--html FILE`` (explain's and the demo's): an empty name (``--html ''``) is refused as
    argparse refuses a bad value, where explain would have written nothing and said nothing,
    and the demo would have said it cannot write to '.'."""
    if not name:
        raise argparse.ArgumentTypeError("needs a file name, e.g. --html explain.html")
    return name


def _allow_sizes_after_options(parser: argparse.ArgumentParser) -> None:
    """Let ``name=size`` follow the options (``--shape 2,4,3 g=2``), as the usage line shows.

    Plain argparse hands every positional out at the first run of them, so a size after an
    option would be rejected; intermixed parsing collects them wherever they stand.
    """
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        parser.parse_known_args = plain  # the intermixed parser calls the plain one twice
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args

    parser.parse_known_args = parse_known_args


def one_line(err: NormlabError) -> str:
    """The error on one line; a pattern error names the character its caret pointed at.

    >>> one_line(PatternSyntaxError("b [c", 2, "'[' is never closed"))
    "'[' is never closed (in pattern 'b [c' at character 3: '[c')"
    """
    if isinstance(err, PatternSyntaxError):
        message = str(err).splitlines()[0]
        rest = err.pattern[err.position:]
        return f"{message} (in {err.subject} {err.pattern!r} at character {err.position + 1}: {rest!r})"
    return " ".join(str(err).split())


def load_input(args: argparse.Namespace):
    """The tensor to explain, from ``--data`` or ``--shape``/``--seed``."""
    from normlab.explain.model import parse_data, parse_shape, random_input

    if (args.data is None) == (args.shape is None):
        raise NormlabError("give the data with exactly one of --data '[[4,3,2],[3,3,2]]' or --shape 2,3,4")
    seed = _seed(args)  # read with --data too: the residual and the gate are drawn from it
    if args.data is not None:
        return parse_data(args.data), None
    return random_input(parse_shape(args.shape), seed), f"random integers 0 to 9, seed {seed}"


def _seed(args: argparse.Namespace) -> int:
    try:
        seed = int(args.seed)
    except ValueError:
        seed = -1
    if seed < 0:  # NumPy's generators take no negative seed
        raise NormlabError(f"--seed {args.seed!r} is not an integer >= 0; pass e.g. --seed 1")
    return seed


def load_residual(args: argparse.Namespace, x):
    """The residual ``r`` for ``--residual``: ``--residual-data`` broadcast to the data's
    shape, or random small integers drawn with the next seed; and where it came from."""
    from normlab.explain.model import random_input

    if args.residual_data is None:
        seed = _seed(args) + 1
        return random_input(x.shape, seed), f"random integers 0 to 9, seed {seed}"
    return _broadcast_data(args.residual_data, "--residual-data", x.shape), None


def load_gate(args: argparse.Namespace, shape):
    """The gate ``z`` for ``--gate-first``: ``--gate-data`` broadcast to the data's shape, or
    random integers from -3 to 3 (where the activations bend) drawn with the seed after the
    residual's; and where it came from."""
    import numpy as np

    if args.gate_data is None:
        seed = _seed(args) + 2
        z = np.random.default_rng(seed).integers(-3, 4, size=shape).astype(np.float32)
        return z, f"random integers -3 to 3, seed {seed}"
    return _broadcast_data(args.gate_data, "--gate-data", shape), None


def _residual_sum(x, residual):
    """``s = x + r`` in the data's float32; a sum of finite values beyond float32's range is
    refused, as parse_data refuses such values (the page would draw inf and a NaN group)."""
    import numpy as np

    with np.errstate(over="ignore"):
        total = x + residual
    overflowed = np.isinf(total) & np.isfinite(x) & np.isfinite(residual)
    if overflowed.any():
        at = tuple(int(i) for i in np.argwhere(overflowed)[0])
        raise NormlabError(f"x + r at {list(at)} is {float(x[at]):g} + {float(residual[at]):g}, beyond float32's "
                           f"range (explain computes in it, as the demo does); scale the data or the residual down")
    return total


def _broadcast_data(text: str, option: str, shape):
    import numpy as np

    from normlab.explain.model import parse_data

    values = parse_data(text, option)
    try:
        return np.broadcast_to(values, shape).copy()
    except ValueError:
        raise NormlabError(f"{option} of shape {values.shape} does not broadcast to the data's shape {shape}; "
                           "give it the data's shape or size-1 axes") from None


GETTING_STARTED = f"""\
normlab explain: name a PATTERN or a preset ({PRESET_HELP}), and the data, e.g.
  normlab explain batch --data '[[4,3,2],[3,3,2],[2,2,2]]'
  normlab explain "b (g [c]) [h w]" --shape 2,4,2,2 g=2
normlab explain --help lists every option."""


def run(args: argparse.Namespace) -> int:
    """Explain the pattern on the data; exit code 0, or a one-line error (exit 2) on bad input."""
    if args.pattern is None:
        import sys

        print(GETTING_STARTED, file=sys.stderr)
        return 2
    try:
        return _explain(args)
    except NormlabError as err:
        # the command line sizes every axis as name=size, those named like normalize's keywords too
        raise NormlabError(re.sub(r"sizes=\{'(\w+)': ([^}]*)\}", r"\1=\2", one_line(err))) from None


def _explain(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from normlab.explain.html import write_page
    from normlab.explain.model import all_views, explain_array, float32_note, parse_mask, parse_segments, parse_sizes
    from normlab.explain.terminal import make_console, render_view

    _refuse_a_split_pattern(args)
    sizes = parse_sizes(args.sizes)
    x, origin = load_input(args)
    args.residual = args.residual or args.residual_data is not None
    residual, residual_origin = load_residual(args, x) if args.residual else (None, None)
    # after the residual add every stage sees the sum, rounded to the data's float32 as the
    # block rounds it to x's dtype: the statistics, the output and the page are of s = x + r
    data = x if residual is None else _residual_sum(x, residual)
    if args.gate_data is not None and not args.gate:
        raise NormlabError("--gate-data needs --gate ACT (silu, sigmoid or gelu)")
    # a gate before the statistics: they, the output and the page are of h = s · φ(z), in
    # float64 as the block computes it
    gate, gate_origin = load_gate(args, x.shape) if args.gate and args.gate_first else (None, None)
    if gate is None and args.gate_data is not None:  # a gate after the norm draws no z, but z must still be one
        load_gate(args, x.shape)
    source, gated = data, "s" if residual is not None else "x"  # what the gate multiplies
    if gate is not None:
        from normlab.fused import activation

        data = source * activation(args.gate, gate)[0] + 0.0  # (+ 0.0: no -0 drawn where s is 0)
    mask = None if args.mask is None else parse_mask(args.mask)
    segments = None if args.segments is None else parse_segments(args.segments)
    view = explain_array(data, args.pattern, sizes, rms=args.rms, mask=mask, segments=segments)
    block = _fused_stages(args, view)
    note = None if args.data is None else float32_note(args.data, x)  # 16777217 is drawn 16777216
    page = None
    if args.html:  # written first, so that a bad path fails before anything is printed
        from normlab.explain.pipeline import pipeline_svg

        on = f"h = {gated} · φ(z)" if gate is not None else "s = x + r" if residual is not None else None
        title = f"normlab explain · {view.pattern}" + (f" on {on}" if on else "")
        page = write_page(args.html, all_views(data, view), view.key, title=title,
                          pipeline=pipeline_svg(block) if block else "", note=note or "")
    console = make_console(no_color=args.no_color or args.explain_no_color)
    shape = "×".join(str(s) for s in x.shape)
    console.print(f"[bold]normlab explain[/]  tensor {shape}" + (f" ({escape(origin)})" if origin else ""))
    if note:
        console.print(f"[dim]{escape(note)}[/]")
    if residual is not None:
        from normlab.explain.terminal import render_residual

        render_residual(console, x, residual, residual_origin)
    if gate is not None:
        from normlab.explain.terminal import render_gate

        render_gate(console, source, gate, data, args.gate, gated, gate_origin)
    render_view(console, view, limit=MAX_CLAIMS_SHOWN)
    if block:
        from normlab.explain.pipeline import stage_lines

        console.print("\n[bold]fused block[/], one stage per line:")
        for line in stage_lines(block):
            console.print(escape(line))
    if page is not None:
        console.print(f"\n[bold]page:[/] {escape(str(page))}  (open it in a browser; hover a cell, switch the norm)")
    else:
        console.print("\n[dim]add --html explain.html to draw it, with batch, layer, instance, group and RMS norm side by side[/]")
    return 0


def _refuse_a_split_pattern(args: argparse.Namespace) -> None:
    """An unquoted pattern reaches us split at its spaces (``[b] f`` as PATTERN '[b]' and a
    size 'f'): say to quote it, spelled out, rather than that 'f' is no name=size."""
    import shlex

    loose = [item for item in args.sizes if "=" not in item]
    pattern = " ".join([args.pattern, *loose])
    if loose and "[" in pattern:
        raise NormlabError(f"{loose[0]!r} is not name=size: the shell split the pattern at its spaces; quote it, "
                           f"as in normlab explain {shlex.quote(pattern)} ...")


def _fused_stages(args: argparse.Namespace, view):
    """The fused block's stages when an option asks for one (else an empty tuple)."""
    from normlab.explain.pipeline import stages

    # (an empty --modulation '' is no modulation left out: normalize(modulation="") refuses it, so does explain)
    if not (args.residual or args.gate or args.gate_first or args.modulation is not None or args.weight_offset):
        return ()
    if not math.isfinite(args.weight_offset):  # normalize(weight_offset=) refuses it too
        raise NormlabError(f"--weight-offset must be a finite number, got {args.weight_offset}; pass e.g. "
                           "--weight-offset 1 (Gemma's 1 + weight)")
    if args.gate_first and not args.gate:
        raise NormlabError("--gate-first needs --gate ACT (silu, sigmoid or gelu)")
    if args.modulation is not None:
        from normlab.fused import _modulation_plan

        # with the view's sizes (the group preset's own g among them); names the axes, or says
        # why not in normalize(modulation=)'s words
        _modulation_plan(view.pattern, view.plan, args.modulation, view.sizes)
    return stages(view.pattern, rms=view.rms, residual=args.residual, gate=args.gate,
                  norm_before_gate=not args.gate_first, weight_offset=args.weight_offset,
                  modulation=args.modulation)
