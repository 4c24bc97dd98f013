"""The `d3-plugin` command: one sub-command per module in d3_plugin.commands."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# Each module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
COMMAND_MODULES = ["demo", "defend", "install", "list", "compare", "attack", "detect", "grid", "analyze"]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="d3-plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(f"d3_plugin.commands.{module_name}")
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.HELP))
        commands[module.NAME] = module
    return parser, commands


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    from .errors import INPUT_ERRORS, INPUT_ERROR_STATUS, INTERRUPTED_STATUS, is_out_of_memory, one_line, \
        out_of_memory_line

    try:
        return commands[args.command].run(args) or 0
    except (UserError, *INPUT_ERRORS) as error:
        print(f"d3-plugin {args.command}: error: {one_line(error)}", file=sys.stderr)
        return INPUT_ERROR_STATUS
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        print(f"d3-plugin {args.command}: error: {out_of_memory_line(error)}", file=sys.stderr)
        return INPUT_ERROR_STATUS
    except KeyboardInterrupt:
        print(f"d3-plugin {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS


if __name__ == "__main__":
    sys.exit(main())
