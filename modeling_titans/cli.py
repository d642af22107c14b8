"""The `titans` command line: one subcommand per module in `modeling_titans/commands/`.

Each command module defines `add_parser(subparsers)`, which registers its subparser and sets `run=...`. A
command reports bad input by raising `CommandError`; the user then sees one clear line and a non-zero exit,
never a traceback from deep inside a library.
"""

import argparse
import importlib
import pkgutil
import sys

from . import commands


class CommandError(Exception):
    """A problem with the user's input or files, reported as one line."""


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
    except CommandError as error:
        print(f"titans {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as `python -m modeling_titans.cli`, this file is `__main__` and the commands raise the CommandError of
    # the imported `modeling_titans.cli`: dispatch through that module so its errors are caught.
    from modeling_titans.cli import main as package_main

    sys.exit(package_main())
