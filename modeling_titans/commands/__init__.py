"""Subcommands of the `titans` command line (see `modeling_titans/cli.py`)."""
