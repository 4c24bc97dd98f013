"""`d3-plugin install`: drop D3 into a BackdoorBench checkout (defense/d3.py + config/defense/d3/)."""
from __future__ import annotations

import argparse

NAME = "install"
HELP = "install (or --uninstall) defense/d3.py and config/defense/d3/*.yaml in a BackdoorBench checkout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkout", help="path to the BackdoorBench checkout (the folder holding defense/)")
    parser.add_argument("--uninstall", action="store_true", help="remove exactly the files d3-plugin wrote")
    parser.add_argument("--force", action="store_true",
                        help="overwrite (install) or remove (--uninstall) d3-plugin's files even if you edited them")


def run(args: argparse.Namespace) -> int:
    from ..backdoorbench import install

    if args.uninstall:
        removed = install.uninstall(args.checkout, force=args.force)
        print(f"removed {len(removed)} files from {args.checkout}")
        for path in removed:
            print(f"  {path}")
        return 0
    written = install.install(args.checkout, force=args.force)
    print(f"installed {len(written)} files in {args.checkout}:")
    for path in written:
        print(f"  {path}")
    print(f"run from {args.checkout}: python defense/d3.py --result_file <attack folder> "
          f"--yaml_path ./config/defense/d3/cifar10.yaml")
    return 0
