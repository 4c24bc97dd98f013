"""`d3-plugin compare`: several defenses on one attack record, same reserved subset and seed, one table
(with `--seeds`, mean ± std over seeds)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..record_io.reserved import RESERVED_RATIO

NAME = "compare"
HELP = ("run several defenses on one BackdoorBench attack record with the same reserved data and seed "
        "(or seeds); print one table and save it as Markdown, CSV, JSON and a bar chart")
DEFAULT_DEFENSES = "d3,ft,ft-sam,fst,nad,anp,fp,i-bau,aft"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result_file", help="attack record folder (record/<attack>) or its attack_result.pt")
    parser.add_argument("--defenses", default=DEFAULT_DEFENSES,
                        help=f"comma-separated registry names (default {DEFAULT_DEFENSES}); prefix bb: to force "
                             "the BackdoorBench script, e.g. bb:ft; see `d3-plugin list`")
    parser.add_argument("--epochs", type=int, help="training epochs for every defense (default: each one's own)")
    parser.add_argument("--ratio", type=float, default=RESERVED_RATIO, help="reserved clean fraction of the training set")
    parser.add_argument("--index", help="reserved-set index file (one integer a line) instead of --ratio")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the reserved draw and every defense (default 0); same as --seeds N")
    parser.add_argument("--seeds", metavar="S1,S2,...",
                        help="comma-separated seeds: per seed its own reserved draw and defense seed; the table "
                             "shows mean ± std (min–max) over them (not with --seed)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", help="output folder (default <record>/compare)")
    parser.add_argument("--data_root", "--data-root", dest="data_root", help="dataset folder, if not where the record says")
    parser.add_argument("--reserved-source", "--reserved_source", dest="reserved_source", default="id",
                        help="auxiliary data in place of the reserved draw: id (default), corrupt:KIND[:SEVERITY] "
                             "(noise, blur, brightness, contrast, jpeg, rotate; 1-5), digits[:N], inversion[:N]; "
                             "see docs/gic.md")
    parser.add_argument("--calibrate", metavar="NAME",
                        help="calibrate the reserved data for the model before every defense, e.g. gic "
                             "(its settings: --set gic.delta=0.05)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="DEFENSE.PARAM=VALUE",
                        help="override one hyper-parameter, e.g. --set d3.lam=5 (repeatable)")
    parser.add_argument("--backdoorbench", metavar="PATH",
                        help="BackdoorBench checkout in which script-only defenses (and bb:NAME) run")
    parser.add_argument("--backdoorbench_python", default=None,
                        help="python of the BackdoorBench environment (default: this python)")
    parser.add_argument("--backdoorbench_device", default="cpu", help="--device passed to BackdoorBench scripts")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..auxiliary import parse_source
    from ..record_io.records import load_attack_result
    from .. import registry
    from ..compare import (bench_from_record, check_overrides, compare, parse_defenses, parse_overrides, parse_seeds,
                           text_table)

    if not args.result_file:
        raise ValueError("--result_file is required: an attack record folder (record/<attack>) or its attack_result.pt")
    if args.epochs is not None and args.epochs < 0:
        raise ValueError(f"--epochs must be ≥ 0, got {args.epochs}")
    names = parse_defenses(args.defenses, args.backdoorbench)
    overrides = parse_overrides(args.overrides)
    check_overrides(overrides)
    seeds = parse_seeds(args.seeds, args.seed)
    source = parse_source(args.reserved_source)
    if args.calibrate:
        registry.get(args.calibrate, "calibration")
    record = load_attack_result(args.result_file, args.data_root)
    benches = [auxiliary_bench(bench_from_record(record, ratio=args.ratio, seed=s, device=args.device,
                                                 index_file=args.index), source, args.calibrate, overrides)
               for s in seeds]
    out = Path(args.out) if args.out else Path(record.folder) / "compare"
    reserved = f"a reserved draw of {len(benches[0].reserved)} ({source}" + (f", calibrated by {args.calibrate})"
                                                                            if args.calibrate else ")")
    print(f"compare on {record.folder} ({record.model_name}, {record.dataset}): {reserved}, "
          f"seed{'s' * (len(seeds) > 1)} {','.join(map(str, seeds))}, device {benches[0].device}; results in {out}")
    rows = compare(benches, names, epochs=args.epochs, out=out, overrides=overrides, backdoorbench=args.backdoorbench,
                   bb_device=args.backdoorbench_device, bb_python=args.backdoorbench_python or sys.executable)
    print(text_table(rows))
    return 1 if any(row["error"] for row in rows) else 0


def auxiliary_bench(bench, source, calibrate, overrides):
    """The bench on its auxiliary reserved data, calibrated if asked; prints one line on what GIC did when
    it runs (only for rows not already in the cache)."""
    from .. import registry
    from ..bench import with_auxiliary

    calibration = None
    if calibrate:
        calibration = registry.build_calibration(calibrate, seed=bench.seed, **overrides.get(calibrate.lower(), {}))

    def report(result):
        print(f"{calibration.name} (seed {bench.seed}) on {source}: BN-statistics distance {result['bn_before']:.3f} → "
              f"{result['bn_after']:.3f}, largest change {result['max_change']:.4f}, labels {result['labels']}")
    return with_auxiliary(bench, str(source), calibration, report)
