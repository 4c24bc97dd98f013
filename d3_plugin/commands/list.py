"""`d3-plugin list`: BackdoorBench defense and attack plugins installed through entry points."""
from __future__ import annotations

import argparse

NAME = "list"
HELP = "list the defense and attack plugins installed (entry-point groups backdoorbench.defenses/attacks)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", choices=["defenses", "attacks"], help="only this group")


def run(args: argparse.Namespace) -> int:
    from .. import plugins

    groups = [f"backdoorbench.{args.group}"] if args.group else list(plugins.GROUPS)
    for group in groups:
        found = plugins.discover(group)
        print(f"{group}: {len(found)} plugin{'s' if len(found) != 1 else ''}")
        for plugin in found:
            source = f"{plugin.distribution} {plugin.version}".strip() or "unknown package"
            print(f"  {plugin.name:<16} {plugin.value:<50} ({source})")
    return 0
