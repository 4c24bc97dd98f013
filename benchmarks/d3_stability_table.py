"""One Markdown table over `d3_stability.py` outputs: a row per (record, half, θs, λ, warm start, precision).

    .venv/bin/python benchmarks/d3_stability_table.py /work/logs/s4/*.jsonl

ACC / ASR: mean ± sample std (min–max) over the seeds of that row, in %, then every seed's value.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def spread(values) -> str:
    values = [100 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f} ({min(values):.1f}–{max(values):.1f})"


def rows(paths):
    groups = defaultdict(list)
    for path in paths:
        for line in Path(path).read_text().splitlines():
            run = json.loads(line)
            if "seed" in run:
                key = (Path(run["record"]).name, run.get("half", "dev"), run["layers"], run["lam"], run["warm"],
                       run.get("precision", "auto"), run.get("distance", "signed"))
                groups[key].append(run)
    for key, runs in sorted(groups.items()):
        runs.sort(key=lambda run: run["seed"])
        yield key, runs


def main(paths) -> None:
    print("| record | half | θs | λ | warm start, distance | precision | seeds | ACC % | ASR % | ASR % per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (record, half, layers, lam, warm, precision, distance), runs in rows(paths):
        seeds = ",".join(str(run["seed"]) for run in runs)
        per_seed = " / ".join(f"{100 * run['asr']:.1f}" for run in runs)
        print(f"| {record} | {half} | `{layers}` | {lam:g} | {warm}, {distance} | {precision} | {seeds} | "
              f"{spread([r['acc'] for r in runs])} | {spread([r['asr'] for r in runs])} | {per_seed} |")


if __name__ == "__main__":
    main(sys.argv[1:])
