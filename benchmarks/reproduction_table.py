"""The reproduction grid's tables in the paper's shapes, beside the paper's own numbers (docs/reproduction.md).

    .venv/bin/d3-plugin grid benchmarks/grids/reproduction.yaml --out /work/repro --workers 2
    .venv/bin/d3-plugin grid benchmarks/grids/reproduction.yaml --out /work/repro --table-only   # while it runs
    .venv/bin/python benchmarks/reproduction_table.py /work/repro > tables.md

Reads `<out>/<grid>/grid.json` of each grid of benchmarks/grids/reproduction.yaml and benchmarks/paper_numbers.csv.
Our cells are mean ± sample std over the seeds that finished (n in the grid's own grid.md); the paper's are one
number each (CIFAR-10, PreAct-ResNet18).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

PAPER = Path(__file__).with_name("paper_numbers.csv")
ATTACKS = ["badnets", "blended", "sig", "wanet", "lf", "input-aware"]
NO_DEFENSE = "no defense"


def paper_numbers() -> dict:
    lines = [line for line in PAPER.read_text().splitlines() if not line.startswith("#")]
    return {(r["table"], r["attack"], r["defense"]): r for r in csv.DictReader(lines)}


def grid_rows(out: Path, name: str) -> list:
    path = out / name / "grid.json"
    return json.loads(path.read_text())["aggregate"] if path.is_file() else []


def pct(row, metric: str, std: bool = True) -> str:
    if not row or row.get(metric) is None:
        return "–"
    text = f"{100 * row[metric]:.1f}"
    if std and row.get(f"{metric}_std") is not None:
        text += f" ± {100 * row[metric + '_std']:.1f}"
    return text


def acc_asr(row, std: bool = False) -> str:
    return "–" if not row else f"{pct(row, 'acc', std)} / {pct(row, 'asr', std)}"


def paper_cell(paper: dict, table: str, attack: str, defense: str, der: bool = False) -> str:
    row = paper.get((table, attack, defense.replace("-paper", "")))  # d3-paper: D3 at the paper's setting
    if not row:
        return "–"
    return f"{row['acc']} / {row['asr']}" + (f" / {row['der']}" if der and row["der"] else "")


def find(rows, record: str, defense: str):
    return next((r for r in rows if r["record"] == record and r["defense"] == defense), None)


def table(header: list, lines: list) -> str:
    rule = "|" + "---|" * len(header)
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(line) + " |" for line in lines])


def average(rows, defense: str, metric: str):
    values = [r[metric] for r in rows
              if r["defense"] == defense and r["record"] in ATTACKS and r.get(metric) is not None]
    return statistics.fmean(values) if len(values) == len(ATTACKS) else None


def table1(rows, paper) -> str:
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    lines = []
    for defense in defenses:
        cells = [acc_asr(find(rows, attack, defense)) for attack in ATTACKS]
        means = [average(rows, defense, m) for m in ("acc", "asr", "der")]
        mean = " / ".join("–" if v is None else f"{100 * v:.1f}" for v in means)
        lines.append([defense, *cells, mean, paper_cell(paper, "1", "average", defense, der=True)])
    header = ["defense", *ATTACKS, "ours: average ACC / ASR / DER", "paper: average ACC / ASR / DER"]
    return table(header, lines)


def ranks(values: list) -> list:
    """1 = smallest; ties share their mean rank."""
    order = sorted(values)
    return [order.index(v) + 1 + (order.count(v) - 1) / 2 for v in values]


def spearman(a: list, b: list) -> float:
    ra, rb = ranks(a), ranks(b)
    mean = (len(a) + 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb))
    return cov / (sum((x - mean) ** 2 for x in ra) * sum((y - mean) ** 2 for y in rb)) ** 0.5


def ordering(rows, paper) -> str:
    """The defenses both tables average, ranked by average ASR here and in the paper, and Spearman's ρ."""
    ours_by_defense = {d: average(rows, d, "asr") for d in dict.fromkeys(r["defense"] for r in rows)}
    pairs = [(d, a, float(paper[("1", "average", d)]["asr"])) for d, a in ours_by_defense.items()
             if d != NO_DEFENSE and a is not None and ("1", "average", d) in paper]
    if len(pairs) < 3:
        return "too few defenses in both tables to rank"
    ours, theirs = ranks([100 * p[1] for p in pairs]), ranks([p[2] for p in pairs])
    lines = [[d, f"{100 * a:.1f}", f"{o:g}", f"{b:.2f}", f"{t:g}"]
             for (d, a, b), o, t in sorted(zip(pairs, ours, theirs), key=lambda x: x[1])]
    rho = spearman([100 * p[1] for p in pairs], [p[2] for p in pairs])
    return (table(["defense", "ours: average ASR %", "rank", "paper: average ASR %", "rank"], lines)
            + f"\n\nSpearman's ρ between the two rankings: {rho:.2f} over {len(pairs)} defenses.")


def span(row, metric: str) -> str:
    """min–max over the seeds, e.g. '0.3–37.8' ('–' without both)."""
    low, high = row.get(f"{metric}_min"), row.get(f"{metric}_max")
    return "–" if low is None or high is None else f"{100 * low:.1f}–{100 * high:.1f}"


def beside_paper(rows, paper, table_name: str, records: list, defenses: list) -> str:
    lines = []
    for record in records:
        for defense in defenses:
            ours = find(rows, record, defense)
            if ours is None:
                continue
            der = "–" if defense == NO_DEFENSE else pct(ours, "der")
            lines.append([record, defense, pct(ours, "acc"), pct(ours, "asr"), span(ours, "asr"), der,
                          paper_cell(paper, table_name, record.replace("-preact", ""), defense, der=True)])
    return table(["record", "defense", "ACC %", "ASR %", "ASR min–max", "DER %", "paper ACC / ASR / DER"], lines)


def table5(rows, paper, defenses=("ft", "ft-sam", "d3")) -> str:
    """One row per record (plain, then flattened at each ρ): the record itself, each defense, the paper's."""
    lines = []
    for record in dict.fromkeys(r["record"] for r in rows):
        cells = [acc_asr(find(rows, record, d), std=True) for d in (NO_DEFENSE, *defenses)]
        lines.append([record, *cells, *(paper_cell(paper, "5", record, d) for d in defenses)])
    return table(["record", NO_DEFENSE, *defenses, *(f"paper {d}" for d in defenses)], lines)


def budgets(short_rows, long_rows, paper) -> str:
    """The same cells at Table 1's 20 epochs and at the paper's 100, beside the paper."""
    lines = []
    for record in ATTACKS:
        for defense in dict.fromkeys(r["defense"] for r in long_rows if r["defense"] != NO_DEFENSE):
            long = find(long_rows, record, defense)
            if long is not None:
                lines.append([record, defense, acc_asr(find(short_rows, record, defense), std=True),
                              acc_asr(long, std=True), paper_cell(paper, "1", record, defense)])
    return table(["record", "defense", "20 epochs: ACC / ASR %", "100 epochs: ACC / ASR %", "paper ACC / ASR"],
                 lines)


def settings_table(rows) -> str:
    """One row per defense setting (a sweep's labels), one column per attack."""
    settings = [d for d in dict.fromkeys(r["defense"] for r in rows) if d != NO_DEFENSE]
    return table(["setting", "badnets", "blended"],
                 [[s, *(acc_asr(find(rows, a, s), std=True) for a in ("badnets", "blended"))] for s in settings])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the grid's output folder (`--out` of d3-plugin grid)")
    out = parser.parse_args().out
    paper = paper_numbers()
    parts = []
    rows = grid_rows(out, "table1")
    if rows:
        parts += ["## Table 1, small CNN: ACC / ASR % (means over seeds)", table1(rows, paper),
                  "## Table 1: the defenses ranked by average ASR (ours: 6 attacks; the paper's: 7, with SSBA)",
                  ordering(rows, paper),
                  "## Table 1, small CNN, beside the paper's per-attack numbers",
                  beside_paper(rows, paper, "1", ATTACKS, [NO_DEFENSE, "ft", "ft-sam", "sau", "d3", "d3-paper"])]
    long_rows = grid_rows(out, "budget") + grid_rows(out, "budget_sau")
    if long_rows:
        parts += ["## The budget: 20 epochs (Table 1) against the paper's 100", budgets(rows, long_rows, paper)]
    rows = grid_rows(out, "table1_preact")
    if rows:
        records = list(dict.fromkeys(r["record"] for r in rows))
        parts += ["## Table 1, PreAct-ResNet18", beside_paper(rows, paper, "1", records,
                                                              [NO_DEFENSE, "ft", "ft-sam", "fst", "d3"])]
    rows = grid_rows(out, "table5")
    if rows:
        parts += ["## Table 5: SAM-flattened backdoors, ACC / ASR %", table5(rows, paper)]
    for name, title in (("table6_7", "Tables 6 and 7: D3's ε and λ"), ("table3", "Table 3: the reserved fraction")):
        rows = grid_rows(out, name)
        if rows:
            parts += [f"## {title}, ACC / ASR %", settings_table(rows)]
    print("\n\n".join(parts) if parts else f"no grid table under {out} yet (d3-plugin grid … --table-only)")


if __name__ == "__main__":
    main()
