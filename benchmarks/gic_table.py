"""The tables of benchmarks/gic_evidence.sh: per attack and defense, ACC and ASR with each auxiliary source,
without and with GIC (mean ± sample std (min–max) over seeds, from each compare.json), and the share of the
gap between the out-of-distribution and the in-distribution reserved set that GIC recovers."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

DEFENSES = ("d3", "ft", "fst")


def cell(values) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def runs(folder: Path):
    path = folder / "compare.json"
    if not path.is_file():
        return None, {}
    rows = json.loads(path.read_text())["rows"]
    base = next(r for r in rows if r["defense"] == "no defense")
    return base, {d: [r for r in rows if r["defense"] == d and not r.get("error")] for d in DEFENSES}


def mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def recovered(id_rows, ood_rows, gic_rows) -> str:
    """(GIC − OOD) / (ID − OOD) of the defense's DER, in %: the share of the gap GIC closes."""
    id_, ood, gic = (mean(r, "der") for r in (id_rows, ood_rows, gic_rows))
    if None in (id_, ood, gic) or abs(id_ - ood) < 0.01:
        return "–"
    return f"{100 * (gic - ood) / (id_ - ood):.0f} %"


def main(work: Path) -> None:
    for attack_folder in sorted((work / "compare").iterdir()):
        sources = sorted({p.name.removesuffix("+gic") for p in attack_folder.iterdir() if p.is_dir()},
                         key=lambda s: (s != "id", s))
        base, _ = runs(attack_folder / "id")
        title = f"### {attack_folder.name}"
        if base:
            title += f" (no defense: ACC {100 * base['acc']:.1f} %, ASR {100 * base['asr']:.1f} %)"
        print(title + "\n")
        print("| defense | auxiliary data | ACC % | ASR % | ACC % with GIC | ASR % with GIC | gap recovered (DER) |")
        print("|---|---|---|---|---|---|---|")
        id_runs = runs(attack_folder / "id")[1]
        for defense in DEFENSES:
            for source in sources:
                plain = runs(attack_folder / source)[1].get(defense, [])
                calibrated = runs(attack_folder / f"{source}+gic")[1].get(defense, [])
                gap = "" if source == "id" else recovered(id_runs.get(defense, []), plain, calibrated)
                print(f"| {defense} | {source} | {cell([r['acc'] for r in plain])} | {cell([r['asr'] for r in plain])} "
                      f"| {cell([r['acc'] for r in calibrated])} | {cell([r['asr'] for r in calibrated])} | {gap} |")
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gic_evidence"))
