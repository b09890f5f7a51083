"""``normlab demo``: two examples worked by hand, normalized by the library and checked out loud.

Batch norm and layer norm are usually taught by hand on two tiny tensors, predicting what
must happen ("the middle one must be 0", "these two must be equal", "all equal → all 0").
The demo runs the same examples through normlab, shows each grouping and result, checks
every prediction against the output's bits, and writes the HTML page of the 3-D example.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

HELP = "walk through batch norm and layer norm on two tiny tensors worked by hand, every claim checked"

DEFAULT_PAGE = "normlab-demo.html"

NOTE_2D = np.array([[4.0, 3.0, 2.0], [3.0, 3.0, 2.0], [2.0, 2.0, 2.0]], dtype=np.float32)
NOTE_3D = np.array(
    [[[1.0, 4.0, 7.0], [0.0, 2.0, 4.0]], [[1.0, 3.0, 6.0], [2.0, 3.0, 1.0]]], dtype=np.float32
)


@dataclass(frozen=True)
class Step:
    """One norm applied to one of the examples, and what it does, in words."""

    preset: str
    meaning: str


@dataclass(frozen=True)
class Example:
    """One of the hand-worked tensors and the norms it is walked through."""

    title: str
    data: np.ndarray
    steps: tuple[Step, ...]


EXAMPLES = (
    Example("2-D, dims (batch, feature)", NOTE_2D, (
        Step("batch", "each feature across the batch"),
        Step("layer", "each sample on its own"),
    )),
    Example("3-D, dims (batch, feature, h*w); the feature is the channel c", NOTE_3D, (
        Step("batch", "each channel across both samples and all positions"),
        Step("layer-vision", "each sample, all channels and positions"),
        Step("layer", "each token (b0's feature 0, then b0's feature 1, …)"),
    )),
)

# What the hand-worked solution draws for the 2-D batch norm; the numbers are printed beside it.
NOTE_PREDICTION_2D = "[[x1, a, 0], [0, a, 0], [-x1, b, 0]]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--html PATH`` for the page (default ``normlab-demo.html`` here), ``--no-color``."""
    from normlab.explain.cli import page_file

    parser.add_argument("--html", metavar="PATH", default=DEFAULT_PAGE, type=page_file,
                        help=f"where to write the page of the 3-D example (default {DEFAULT_PAGE})")
    parser.add_argument("--no-color", dest="demo_no_color", action="store_true", help="plain text output")


def run(args: argparse.Namespace) -> int:
    """Print the walk-through, write the page; exit 0 when every claim holds, 1 otherwise."""
    from pathlib import Path

    from rich.markup import escape

    from normlab.explain.html import write_page
    from normlab.explain.model import all_views, explain_array, observations
    from normlab.explain.terminal import make_console, render_observations, render_view

    page = write_page(args.html, all_views(NOTE_3D, explain_array(NOTE_3D, "batch")), "batch",
                      title="normlab demo · the 3-D example")
    console = make_console(no_color=getattr(args, "no_color", False) or getattr(args, "demo_no_color", False))
    console.rule("[bold]normlab demo[/]: batch norm vs layer norm, by hand and by normlab")
    console.print("Every norm subtracts a mean and divides by a std; they differ only in [italic]which[/] elements\n"
                  "share them. In a pattern, the axes in \\[ ] share. Same letter, same colour = same group.")
    held = total = 0
    for number, example in enumerate(EXAMPLES, start=1):
        console.print()
        console.rule(f"[bold cyan]{number} · {escape(example.title)}", align="left")
        for step in example.steps:
            view = explain_array(example.data, step.preset)
            console.print()
            found = observations(view)
            render_view(console, view, legend=False, show_observations=False, meaning=step.meaning)
            if example.data is NOTE_2D and step.preset == "batch":
                console.print(f"  [dim]worked by hand: {escape(NOTE_PREDICTION_2D)}; normlab agrees:[/]")
            render_observations(console, found)
            held += sum(item.holds for item in found)
            total += len(found)
    console.print()
    console.rule("[bold]result", align="left")
    verdict = "[bold green]✓[/]" if held == total else "[bold red]✗[/]"
    console.print(f"{verdict} {held} of {total} claims hold, bit for bit: exact zeros, equal outputs, exact opposites.")
    url = Path(page).resolve().as_uri()
    console.print(f"[bold]page:[/] open {escape(url)}")
    console.print("      the 3-D example as the GroupNorm paper's cube; hover a cell to light up its group,\n"
                  "      switch among batch, layer, instance, group and RMS norm")
    console.print("[dim]next: normlab explain group --shape 2,4,3 g=2 --html groups.html[/]")
    return 0 if held == total else 1
