"""`d3-plugin install`: drop native defenses into a BackdoorBench checkout (defense/<name>.py + config/defense/<name>/)."""
from __future__ import annotations

import argparse

NAME = "install"
HELP = ("install (or --uninstall) defense/<name>.py and config/defense/<name>/*.yaml of native defenses in a "
        "BackdoorBench checkout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkout", help="path to the BackdoorBench checkout (the folder holding defense/)")
    parser.add_argument("--defenses", metavar="NAME,NAME|all",
                        help="native defenses to install (default d3; all: every one, see `d3-plugin list`); those "
                             "BackdoorBench ships itself get the script name d3p_<name>; with --uninstall: remove "
                             "only these (default: every one installed)")
    parser.add_argument("--uninstall", action="store_true", help="remove exactly the files d3-plugin wrote")
    parser.add_argument("--force", action="store_true",
                        help="overwrite (install) or remove (--uninstall) d3-plugin's files even if you edited them")


def run(args: argparse.Namespace) -> int:
    from ..backdoorbench import install

    defenses = None if args.defenses is None else args.defenses.split(",")
    if args.uninstall:
        removed = install.uninstall(args.checkout, force=args.force, defenses=defenses)
        print(f"removed {len(removed)} files from {args.checkout}")
        for path in removed:
            print(f"  {path}")
        return 0
    written = install.install(args.checkout, force=args.force, defenses=defenses)
    print(f"installed {len(written)} files in {args.checkout}:")
    for path in written:
        print(f"  {path}")
    scripts = [p for p in written if p.parent.name == "defense"]
    for script in scripts:
        print(f"run from {args.checkout}: python defense/{script.name} --result_file <attack folder> "
              f"--yaml_path ./config/defense/{script.stem}/cifar10.yaml")
    return 0
