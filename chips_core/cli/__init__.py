"""The `chips` command line: one module per command group, each command a thin call into the library.

A command is a `Command` (common.py): a name, a one-line help, `add_arguments(parser)` and `run(args)`.
Add one by calling `register(...)` in the module of its group and importing that module in main.py."""

from chips_core.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
