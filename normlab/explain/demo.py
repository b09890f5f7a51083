"""``normlab demo``: the note's examples, normalized and checked out loud."""

from __future__ import annotations

import argparse

import numpy as np

from normlab.core import normalize

HELP = "walk through the note's examples: batch norm and layer norm on tiny tensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``normlab demo`` takes no arguments of its own yet."""


NOTE_2D = np.array([[4.0, 3.0, 2.0], [3.0, 3.0, 2.0], [2.0, 2.0, 2.0]], dtype=np.float32)
NOTE_3D = np.array(
    [[[1.0, 4.0, 7.0], [0.0, 2.0, 4.0]], [[1.0, 3.0, 6.0], [2.0, 3.0, 1.0]]], dtype=np.float32
)

# (title, pattern, what it means) for each example of the note
DEMO_CASES = {
    "2-D (batch, feature)": (
        NOTE_2D,
        [
            ("batch norm", "[b] f", "each feature is standardized across the batch"),
            ("layer norm", "b [f]", "each sample is standardized across its features"),
        ],
    ),
    "3-D (batch, feature, h*w)": (
        NOTE_3D,
        [
            ("batch norm", "[b] f [s]", "each feature pools the batch and all positions"),
            ("layer norm, vision", "b [f s]", "each sample pools all features and positions"),
            ("layer norm, NLP", "b t [d]", "each token's vector is standardized alone"),
        ],
    ),
}


def _print_array(console, label: str, array: np.ndarray) -> None:
    text = np.array2string(array, precision=4, suppress_small=False, floatmode="maxprec_equal")
    console.print(f"[bold]{label}[/bold]")
    console.print(text, highlight=False)


def _claims(x: np.ndarray, y: np.ndarray, groups: np.ndarray):
    """Observations in the note's spirit, checked on the actual numbers."""
    for group in np.unique(groups):
        members = groups == group
        values, outputs = x[members], y[members]
        if np.all(values == values[0]):
            yield bool(np.all(outputs == 0)), f"group {values.tolist()}: all values equal, so all become exactly 0"
            continue
        mean = values.astype(np.float64).mean()
        for value in np.unique(values):
            if value == mean:
                ok = bool(np.all(outputs[values == value] == 0))
                yield ok, f"group {values.tolist()}: {value:g} is the mean, so it becomes exactly 0"
            if np.count_nonzero(values == value) > 1:
                same = outputs[values == value]
                yield bool(np.all(same == same[0])), f"group {values.tolist()}: the {value:g}s share a group, so their outputs are equal"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(no_color=getattr(args, "no_color", False) or None)
    console.rule("[bold]normlab demo: batch norm and layer norm on the note's tensors")
    console.print("Every norm subtracts a mean and divides by a standard deviation; "
                  "they differ only in which elements share them. [ ] marks the axes that do.\n")
    from normlab.plan import make_plan

    for title, (x, cases) in DEMO_CASES.items():
        console.rule(f"[bold cyan]{title}")
        _print_array(console, f"input, shape {x.shape}", x)
        for name, pattern, meaning in cases:
            y = normalize(x, pattern)
            groups = make_plan(pattern, x.shape).group_ids()
            console.print(f"\n[bold green]{name}[/bold green]  pattern [yellow]{escape(repr(pattern))}[/yellow]: {meaning}")
            _print_array(console, "group of each element", groups)
            _print_array(console, "normalized", y)
            for ok, claim in _claims(x, y, groups):
                mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
                console.print(f"  {mark} {escape(claim)}")
    return 0
