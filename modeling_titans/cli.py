"""The `titans` command line: one subcommand per module in `modeling_titans/commands/`.

Each command module defines `add_parser(subparsers)`, which registers its subparser and sets `run=...`. Bad
input (a `CommandError` for the arguments, or the library's own error for a file, folder or checkpoint) is shown
as one clear line with exit code 2, never as a traceback from deep inside a library.
"""

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .checkpoints import CheckpointError
from .commands import CommandError
from .data import DataError
from .training import OutputDirError

# The errors that describe the user's input: shown as one line.
USER_ERRORS = (CommandError, CheckpointError, DataError, OutputDirError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titans", description="Train, evaluate, generate with and share Titans models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in sorted(info.name for info in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"{commands.__name__}.{module}").add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as error:
        print(f"titans {args.command}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
