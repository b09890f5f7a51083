"""The terminal view: the tensor laid out as one writes it by hand, each element coloured by its
statistics group, the group of each element and the normalized result beside it, a legend,
and the observations with ✓ or ✗. Plain text when there is no terminal or colour is off."""

from __future__ import annotations

import os
import string

import numpy as np

from normlab.explain.model import NormView, Observation, format_output, format_value, observations

__all__ = ["make_console", "group_label", "render_view", "render_observations", "tensor_lines"]

# Named colours that read on dark and light backgrounds alike, in an order where
# neighbouring groups differ in hue.
PALETTE = ("bright_red", "bright_green", "dodger_blue1", "yellow", "magenta", "cyan",
           "dark_orange", "spring_green2", "orchid", "gold1", "deep_sky_blue1", "salmon1")
_LETTERS = string.ascii_uppercase + string.ascii_lowercase


def make_console(no_color: bool = False, **kwargs):
    """A rich console; with ``no_color`` (or ``NO_COLOR`` set) it writes no escape codes at all.

    Rich already writes plain text when stdout is not a terminal; ``NO_COLOR`` alone would
    only drop colours and keep bold, so colour off means no styles here.
    """
    from rich.console import Console

    plain = no_color or bool(os.environ.get("NO_COLOR"))
    if plain:
        kwargs.setdefault("color_system", None)
    console = Console(highlight=False, **kwargs)
    if not console.is_terminal and "width" not in kwargs:
        # files and pipes get rich's default 80 columns; the side-by-side layout needs a bit more
        console = Console(highlight=False, width=110, **kwargs)
    from normlab.cli import spell_before_layout

    spell_before_layout(console)
    return console


def group_label(group: int, num_groups: int) -> str:
    """A short name for a group: letters A, B, … while they last, numbers beyond.

    >>> group_label(0, 3), group_label(27, 52), group_label(60, 100)
    ('A', 'b', '60')
    """
    if num_groups <= len(_LETTERS):
        return _LETTERS[group]
    return str(group)


def group_style(group: int) -> str:
    return f"bold {PALETTE[group % len(PALETTE)]}"


def tensor_lines(shape: tuple[int, ...], cell, per_line: int | None = None) -> list:
    """Lay out an array of ``shape`` as nested lists, NumPy style, one innermost row per line
    (folded after every ``per_line`` elements, the rest indented under the row's first).

    ``cell(flat_index)`` returns the rich Text for one element (already padded).

    >>> from rich.text import Text
    >>> [line.plain for line in tensor_lines((2, 2), lambda i: Text(str(i)))]
    ['[[0, 1],', ' [2, 3]]']
    >>> [line.plain for line in tensor_lines((1, 5), lambda i: Text(str(i)), per_line=2)]
    ['[[0, 1,', '  2, 3,', '  4]]']
    """
    from rich.text import Text

    def block(prefix: tuple[int, ...]) -> list:
        depth = len(prefix)
        if depth == len(shape) - 1:
            count = shape[-1]
            step = per_line or count
            lines = []
            for start in range(0, count, step):
                line = Text("[" if start == 0 else " ")
                for k in range(start, min(start + step, count)):
                    line.append_text(cell(int(np.ravel_multi_index(prefix + (k,), shape))))
                    if k < count - 1:
                        line.append(", " if k < start + step - 1 else ",")
                lines.append(line)
            lines[-1].append("]")
            return lines
        lines = []
        for i in range(shape[depth]):
            sub = block(prefix + (i,))
            for j, line in enumerate(sub):
                opener = "[" if i == 0 and j == 0 else " "
                lines.append(Text(opener) + line)
            if i < shape[depth] - 1:
                lines[-1].append(",")
                if len(shape) - depth >= 4:  # a blank line between 3-D blocks; 2-D blocks stay close
                    lines.append(Text(""))
            else:
                lines[-1].append("]")
        return lines

    return block(())


def _per_line(console, rank: int, cell_width: int) -> int:
    """How many cells of ``cell_width`` fit on one line of the console, brackets and commas included."""
    return max(1, (console.width - 2 * rank + 1) // (cell_width + 2))


def _column(view: NormView, title: str, texts: list[str]):
    """One tensor whose element ``i`` reads ``texts[i]``, coloured by its group, for
    :func:`_print_tensors`: its title, its cells' width and how to lay it out."""
    from rich.text import Text

    counted = None if view.counted is None else view.counted.ravel()
    if counted is not None:  # excluded elements: in parentheses (plain text) and dimmed
        texts = [t if counted[i] else f"({t})" for i, t in enumerate(texts)]
    width = max(len(t) for t in texts)
    groups = view.groups.ravel()

    def style(i):
        return "dim" if counted is not None and not counted[i] else group_style(groups[i])

    return title, width, lambda per_line: Text("\n").join(
        tensor_lines(view.x.shape, lambda i: Text(texts[i].rjust(width), style=style(i)), per_line))


def _print_tensors(console, rank: int, columns) -> None:
    """Print laid-out tensors side by side under their titles, or, where the side by side
    would not fit the console (its folded rows would no longer line up), one under another,
    each folded to the console's width. ``columns``: ``(title, cell_width, lay_out)`` with
    ``lay_out(per_line)`` the tensor's Text."""
    from rich.table import Table

    from rich.cells import cell_len

    blocks = [lay_out(None) for _, _, lay_out in columns]
    padding = 3
    widest = [max(cell_len(line) for line in block.plain.split("\n")) for block in blocks]
    if sum(widest) + padding * (len(blocks) - 1) <= console.width:
        side = Table.grid(padding=(0, padding))
        for _ in columns:
            side.add_column()
        side.add_row(*(f"[dim]{title}[/]" for title, _, _ in columns))
        side.add_row(*blocks)
        console.print(side)
        return
    for title, cell_width, lay_out in columns:
        console.print(f"[dim]{title}[/]")
        console.print(lay_out(_per_line(console, rank, cell_width)))


def render_residual(console, x: np.ndarray, r: np.ndarray, origin: str | None = None) -> None:
    """Print the residual add of a fused block: x | r | s = x + r, side by side (the norm
    below then runs on s)."""
    from rich.markup import escape

    _side_by_side(console, [("x", x), ("residual r" + (f" ({escape(origin)})" if origin else ""), r),
                            ("s = x + r, the norm's input", x + r)])


def render_gate(console, source: np.ndarray, z: np.ndarray, h: np.ndarray, act: str, name: str,
                origin: str | None = None) -> None:
    """Print a gate before the statistics: s | z | h = s · φ(z), side by side (the norm below
    then runs on h)."""
    from rich.markup import escape

    _side_by_side(console, [(name, source), ("gate z" + (f" ({escape(origin)})" if origin else ""), z),
                            (f"h = {name} · {act}(z), the norm's input", h)])


def _side_by_side(console, columns) -> None:
    from rich.text import Text

    def column(title: str, values: np.ndarray):
        texts = [format_value(v) for v in values.ravel()]
        width = max(len(t) for t in texts)
        return title, width, lambda per_line: Text("\n").join(
            tensor_lines(values.shape, lambda i: Text(texts[i].rjust(width)), per_line))

    _print_tensors(console, columns[0][1].ndim, [column(title, values) for title, values in columns])


def render_view(console, view: NormView, legend: bool = True, limit: int | None = None,
                show_observations: bool = True, meaning: str | None = None) -> None:
    """Print one norm applied to one tensor: input | group | normalized, legend, observations."""
    from rich.markup import escape

    groups = view.groups.ravel()
    n = view.num_groups
    size = view.plan.group_size
    sizes = "".join(f" {name}={size}" for name, size in view.sizes.items())
    console.print(f"[bold green]{escape(view.label)}[/]  [yellow]{escape(view.pattern)}{sizes}[/]"
                  + (f"  · {n} group{'s' * (n != 1)} of {size}" if view.segment_axis is None
                     else f"  · {n} groups (split by the segment ids)")
                  + (f" · [dim]{escape(meaning)}[/]" if meaning else f", each with its own {'rms' if view.rms else 'mean and std'}"))
    _print_tensors(console, view.x.ndim, [
        _column(view, "input", [format_value(v) for v in view.x.ravel()]),
        _column(view, "group", [group_label(g, n) for g in groups]),
        _column(view, "normalized", [format_output(v) for v in view.y.ravel()]),
    ])
    if view.counted is not None and view.counted.all():
        console.print(f"[dim]the mask counts every element ({view.counted.size} of {view.counted.size}): "
                      "the same as no mask[/]")
    elif view.counted is not None:
        console.print(f"[dim](…) = masked out: normalized, but not counted in the statistics "
                      f"({int(view.counted.sum())} of {view.counted.size} counted)[/]")
    if legend:
        console.print(legend_table(view))
    if show_observations:
        render_observations(console, observations(view), limit)


def legend_table(view: NormView):
    """Each group: its name, where it lies, its members' values, and the library's mean and std."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, padding=(0, 2), show_edge=False, header_style="dim")
    table.add_column("group")
    table.add_column("which")
    table.add_column("values")
    if not view.rms:
        table.add_column("mean", justify="right")
    table.add_column("rms" if view.rms else "std", justify="right")
    x = view.x.ravel()
    means, stds = view.stat_texts()
    shown_groups = min(view.num_groups, 24)  # a legend longer than a screen helps nobody
    for group in range(shown_groups):
        members = view.counted_members(group)
        values = [format_value(v) for v in x[members[:12]]] or ["(none counted)"]
        if len(members) > 12:
            values.append(f"… {len(members) - 12} more")
        row = [Text(group_label(group, view.num_groups), style=group_style(group)),
               view.describe_group(group), Text(" ".join(values), style=group_style(group))]
        if not view.rms:
            row.append(means[group])
        row.append(stds[group])
        table.add_row(*row)
    if view.num_groups > shown_groups:
        table.add_row("…", f"{view.num_groups - shown_groups} more groups", "")
    return table


def render_observations(console, found: list[Observation], limit: int | None = None) -> None:
    """Print each observation with ✓ when the output's bits bear it out, ✗ when not."""
    from rich.markup import escape

    if not found:
        console.print("  [dim]no equal values, means or mirror pairs to point out in this data[/]")
        return
    shown = found if limit is None else found[:limit]
    for item in shown:
        mark = "[bold green]✓[/]" if item.holds else "[bold red]✗[/]"
        # soft wrap: a file or pipe keeps each claim on one line; a terminal still folds it
        console.print(f"  {mark} {escape(item.text)}", soft_wrap=not console.is_terminal)
    hidden = found[len(shown):]
    if hidden:
        failing = sum(not item.holds for item in hidden)
        verdict = "all hold" if not failing else f"[red]{failing} do not hold[/]"
        console.print(f"  [dim]… and {len(hidden)} more ({verdict}); the --html page lists them all[/]")
