"""The table of benchmarks/badacts_evidence.sh: per attack, no defense / D3 / BadActs ACC and ASR (mean ± std,
min–max over seeds, from compare.json) and BadActs detection AUROC and TPR at 5 % FPR (from detect)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def cell(values, scale: float = 100.0, digits: int = 1) -> str:
    """mean ± sample std (min–max); percentages by default."""
    values = [scale * v for v in values if v is not None]
    if not values:
        return ""
    f = f".{digits}f"
    if len(values) == 1:
        return format(values[0], f)
    return (f"{statistics.fmean(values):{f}} ± {statistics.stdev(values):{f}} "
            f"({min(values):{f}}–{max(values):{f}})")


def main(work: Path) -> None:
    print("| attack | no defense ACC / ASR | D3 ACC | D3 ASR | BadActs ACC | BadActs ASR | detection AUROC | TPR @ 5 % FPR |")
    print("|---|---|---|---|---|---|---|---|")
    for attack in ("badnets", "blended", "wanet", "sig", "lf"):
        compare = work / "compare" / attack / "compare.json"
        if not compare.is_file():
            continue
        rows = json.loads(compare.read_text())["rows"]
        runs = {name: [r for r in rows if r["defense"] == name and not r.get("error")] for name in ("d3", "badacts")}
        base = next(r for r in rows if r["defense"] == "no defense")
        detections = [json.loads(p.read_text()) for p in sorted((work / "detect" / attack).glob("seed*/badacts.json"))]
        print(f"| {attack} | {100 * base['acc']:.1f} / {100 * base['asr']:.1f} | "
              + " | ".join(cell([r[k] for r in runs[n]]) for n in ("d3", "badacts") for k in ("acc", "asr"))
              + f" | {cell([d['auroc'] for d in detections], 1.0, 3)} | {cell([d['tpr_at_fpr'] for d in detections])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/badacts_evidence"))
