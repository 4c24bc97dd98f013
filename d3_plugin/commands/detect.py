"""`d3-plugin detect`: input-level backdoor detection on an attack record (BadActs' activation statistics)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..record_io.reserved import RESERVED_RATIO

NAME = "detect"
HELP = ("fit a detector on the reserved clean set and score the record's clean and poisoned test sets: "
        "AUROC, TPR at the false-positive rate, flagged fractions")
METHODS = ("badacts",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result_file", required=True, help="attack record folder (record/<attack>)")
    parser.add_argument("--method", default="badacts", choices=METHODS)
    parser.add_argument("--ratio", type=float, default=RESERVED_RATIO, help="reserved clean fraction of the training set")
    parser.add_argument("--seed", type=int, default=0, help="reserved draw and fit/threshold split")
    parser.add_argument("--fpr", type=float, default=None, help="false-positive rate of the threshold (default 0.05)")
    parser.add_argument("--layers", help="comma-separated modules to score (default: BadActs' automatic choice)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data_root", "--data-root", dest="data_root", help="dataset folder, if not where the record says")
    parser.add_argument("--out", help="output folder (default <record>/detect)")


def run(args: argparse.Namespace) -> int:
    from .. import registry
    from ..record_io.records import load_attack_result
    from ..bench import bench_from_record
    from ..defenses.badacts import detection_metrics, fit_detector
    from ..files import ensure_writable, write_json

    overrides = {"seed": args.seed, "fpr": args.fpr,
                 "layers": [n.strip() for n in args.layers.split(",")] if args.layers else None}
    config = registry.build("badacts", **{k: v for k, v in overrides.items() if v is not None}).config
    record = load_attack_result(args.result_file, args.data_root)
    bench = bench_from_record(record, ratio=args.ratio, seed=args.seed, device=args.device)
    detector = fit_detector(bench.model, bench.reserved_batches(config.batch_size), config)
    clean, poisoned = bench.test_loaders()
    metrics = detection_metrics(detector.scores(bench.model, clean), detector.scores(bench.model, poisoned),
                                detector.threshold, config.fpr)
    report = {"method": args.method, "record": str(record.folder), "reserved": len(bench.reserved),
              "layers": detector.layers, "k": detector.k, "fpr": config.fpr, "threshold": detector.threshold,
              **metrics}
    out = ensure_writable(Path(args.out) if args.out else Path(record.folder) / "detect")
    write_json(out / f"{args.method}.json", report)
    print(f"{args.method} on {record.folder}: AUROC {metrics['auroc']:.4f}, TPR@{config.fpr:.0%} FPR "
          f"{metrics['tpr_at_fpr']:.4f}, flagged clean {metrics['flagged_clean']:.4f}, poisoned "
          f"{metrics['flagged_poisoned']:.4f}; {out / (args.method + '.json')}")
    return 0
