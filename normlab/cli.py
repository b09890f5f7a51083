"""The ``normlab`` command line (also ``python -m normlab``). Each subcommand lives in its own module, which supplies
``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit code``; it is imported only
when the command line is built, and keeps its heavy imports inside ``run``."""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except NormlabError as err:
        print(f"normlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
