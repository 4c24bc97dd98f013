"""`d3-plugin list`: every defense, attack and reserved-data calibration — ours, BackdoorBench-script-only
ones and plugins."""
from __future__ import annotations

import argparse

NAME = "list"
HELP = ("list every defense, attack and reserved-data calibration: where it runs (native / BackdoorBench script / "
        "plugin), data, paper")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", choices=["defenses", "attacks", "calibrations"], help="only this group")


def run(args: argparse.Namespace) -> int:
    from .. import registry

    groups = [args.group[:-1]] if args.group else list(registry.GROUPS)
    for group in groups:
        entries = registry.list_entries(group)
        print(f"{group}s ({registry.GROUPS[group]}): {len(entries)}")
        for entry in entries:
            print("  " + line(entry))
    return 0


def line(entry) -> str:
    """name, where it runs, data it needs, paper — or a broken plugin's reason."""
    where = entry.where if entry.where != "backdoorbench" else f"BackdoorBench {entry.backdoorbench}.py"
    if entry.where == "native" and entry.backdoorbench:
        where += f" (+BB {entry.backdoorbench}.py)"
    if entry.broken:
        return f"{entry.name:<12} broken: {entry.broken} — {entry.origin}"
    paper = entry.paper.get("title", "") or entry.notes
    venue = entry.paper.get("venue", "")
    origin = "" if entry.origin == "d3-plugin" else f" [{entry.origin}]"
    return (f"{entry.name:<12} {where:<24} {entry.data:<9} {paper}" + (f" ({venue})" if venue else "")
            + origin)
