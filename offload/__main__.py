"""``python -m offload COMMAND [ARGS...]``: offload's tools, each loaded only when chosen."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: command -> the module whose ``main(argv, prog)`` runs it, and what it does
COMMANDS = {
    "demo": ("offload.demo.command", "see a FastAPI server stall under CPU-bound work, then not"),
    "info": ("offload.info.command", "what this machine and environment give the pools"),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command's name, then hand the rest of the command line to its module."""
    parser = argparse.ArgumentParser(
        prog="python -m offload",
        usage="%(prog)s [-h] COMMAND [ARGS...]",
        description="offload's tools",
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items())
        + "\n\n'python -m offload COMMAND --help' tells more.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Optional for argparse, so that a missing command gets the error below, which
    # does not name the hidden ``args``.
    parser.add_argument(
        "command", nargs="?", choices=COMMANDS, metavar="COMMAND", help="one of: %(choices)s"
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"a command is required: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[args.command][0])
    module.main(args.args, prog=f"{parser.prog} {args.command}")


if __name__ == "__main__":
    main()
