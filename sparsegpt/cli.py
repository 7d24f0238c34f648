"""The `sparsegpt` console script: `sparsegpt <command> --help` explains each command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sparsegpt.commands import COMMANDS
from sparsegpt.core.errors import UserError


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: every command listed; only `command`'s module imported and its flags added (None: all of them)."""
    parser = argparse.ArgumentParser(
        prog="sparsegpt",
        description="Prune LLMs with SparseGPT, heal them with mask-preserving fine-tuning, evaluate, compare.",
        epilog="Progressive runs: accelerate launch train/progressive.py --recipe recipes/demo.yaml",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_line in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_line)
            continue
        module = importlib.import_module(f"sparsegpt.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_line, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _command(argv: list[str]) -> str:
    """The subcommand named in argv ("" when none is): the first argument that is a command name."""
    return next((a for a in argv if a in COMMANDS), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
