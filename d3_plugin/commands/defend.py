"""`d3-plugin defend`: run the D3 BackdoorBench defense on an attack record, without BackdoorBench."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "defend"
HELP = ("purify the model of a BackdoorBench attack record with D3 (writes record/<attack>/defense/d3/, "
        "as `python defense/d3.py` does)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..backdoorbench.defense import defense_class

    defense_class("d3").add_arguments(parser)
    parser.add_argument("--checkout", type=str, help="BackdoorBench checkout whose record/ holds --result_file "
                        "(default: the current folder)")
    parser.set_defaults(yaml_path=None)  # the defaults alone, unless a config file is named


def run(args: argparse.Namespace) -> int:
    from ..backdoorbench.defense import defense_class

    if not args.result_file:
        raise ValueError("--result_file is required: an attack folder under <checkout>/record or a record path")
    checkout = args.__dict__.pop("checkout", None)
    if checkout and not Path(args.result_file).is_absolute():
        inside = Path(checkout) / args.result_file  # a path relative to the checkout, e.g. record/<attack>
        args.result_file = str(inside if (inside / "attack_result.pt").is_file()
                               else Path(checkout) / "record" / args.result_file)
    result = defense_class("d3")(args).defense(args.result_file)
    summary = result["summary"]
    before, after = summary["before"], summary["after"]
    print(f"D3 on {summary['record']}: ACC {before['acc']:.4f} -> {after['acc']:.4f}, "
          f"ASR {before['asr']:.4f} -> {after['asr']:.4f}, RA {before['ra']:.4f} -> {after['ra']:.4f}, "
          f"DER {summary['der']:.4f}; results in {args.save_path}")
    return 0
