"""The ``normlab`` command line (also ``python -m normlab``). Each subcommand lives in its own module, which supplies
``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit code``; it is imported only
when the command line is built, and keeps its heavy imports inside ``run``."""

from __future__ import annotations

import argparse
import codecs
import copy
import importlib
import sys

from normlab.errors import NormlabError

COMMANDS = {
    "demo": "normlab.explain.demo",
    "explain": "normlab.explain.cli",
    "bench": "normlab.bench",
}


def build_parser() -> argparse.ArgumentParser:
    from normlab import __version__

    parser = argparse.ArgumentParser(prog="normlab", description="Normalization layers as patterns.")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    parser.add_argument("--no-color", action="store_true", help="plain text output (also NO_COLOR=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


# what the output writes beyond ASCII, spelled in ASCII for a terminal whose encoding lacks it
# (LC_ALL=C without Python's UTF-8 mode, a Latin-1 locale, PYTHONIOENCODING=ascii)
ASCII_SPELLINGS = {"✓": "OK", "✗": "FAILS", "×": "x", "·": ".", "…": "...", "–": "-", "−": "-", "→": "->",
                   "φ": "phi", "μ": "mu", "σ": "sigma", "²": "^2", "₀": "0", "\u0302": "^"}


def _spell_in_ascii(err: UnicodeEncodeError) -> tuple[str, int]:
    """A codecs error handler: each character the encoding lacks as :data:`ASCII_SPELLINGS`
    writes it, else as Python escapes it (``\\u2713``), as it does on stderr."""
    text = err.object[err.start:err.end]
    return "".join(ASCII_SPELLINGS.get(ch) or ch.encode("ascii", "backslashreplace").decode() for ch in text), err.end


codecs.register_error("normlab-ascii", _spell_in_ascii)


def spell_before_layout(console) -> None:
    """On a console whose encoding is not UTF-8, spell what the encoding lacks before rich
    lays the text out, as the encoder would (:func:`_spell_in_ascii`): its spellings (``…``
    as ``...``, ``✓`` as ``OK``) are wider than the characters rich measured, and shifted
    every table column after them. Table columns then fold a word too long for them, where
    rich would cut it with a ``…``."""
    encoding = console.encoding
    if codecs.lookup(encoding).name == "utf-8":
        return
    from rich.console import RenderHook

    class SpellBeforeLayout(RenderHook):
        def process_renderables(self, renderables):
            return [_spelled(renderable, encoding) for renderable in renderables]

    console.push_render_hook(SpellBeforeLayout())


def _spell(text: str, encoding: str) -> str:
    return text.encode(encoding, "normlab-ascii").decode(encoding)


def _spelled(renderable, encoding: str):
    """``renderable`` (text, or a table of them) spelled for ``encoding``; any other
    renderable as it is (the encoder still spells what it writes)."""
    from rich.table import Table
    from rich.text import Span, Text

    if isinstance(renderable, str):
        return _spell(renderable, encoding)  # (the spellings hold no markup)
    if isinstance(renderable, Text):
        spelled = _spell(renderable.plain, encoding)
        if spelled == renderable.plain:
            return renderable
        ends = [0]  # where each character's spelling ends: the styles' spans move with them
        for char in renderable.plain:
            ends.append(ends[-1] + len(_spell(char, encoding)))
        text = renderable.copy()
        text.plain = spelled
        text.spans = [Span(ends[span.start], ends[span.end], span.style) for span in renderable.spans]
        return text
    if isinstance(renderable, Table):
        table = copy.copy(renderable)
        table.title, table.caption = _spelled(table.title, encoding), _spelled(table.caption, encoding)
        table.columns = [_spelled_column(column, encoding) for column in renderable.columns]
        return table
    return renderable


def _spelled_column(column, encoding: str):
    column = copy.copy(column)
    column.header, column.footer = _spelled(column.header, encoding), _spelled(column.footer, encoding)
    column._cells = [_spelled(cell, encoding) for cell in column._cells]
    if column.overflow == "ellipsis":  # (rich's own ellipsis is a "…")
        column.overflow = "fold"
    return column


def _write_what_the_terminal_can(stream) -> None:
    """Let text that ``stream``'s encoding cannot hold (``×``, ``✓``) go out spelled in ASCII
    instead of ending the command in a UnicodeEncodeError (a UTF-8 stream is left as it is;
    stderr needs nothing: Python escapes what its encoding lacks)."""
    encoding = getattr(stream, "encoding", None)
    if encoding and hasattr(stream, "reconfigure") and codecs.lookup(encoding).name != "utf-8":
        stream.reconfigure(errors="normlab-ascii")


def main(argv: list[str] | None = None) -> int:
    _write_what_the_terminal_can(sys.stdout)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except NormlabError as err:
        print(f"normlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
