"""Subcommands of the `titans` command line (see `modeling_titans/cli.py`). Each module parses its arguments and
calls the library (`training`, `evaluation`, `checkpoints`, `demo`, `tokenization`, `hub_upload`); no command
imports another."""


class CommandError(Exception):
    """A problem with the user's arguments, reported as one line."""
