"""Compare defenses on one backdoored model: same reserved subset, same seed, one table.

    record = load_attack_result("record/badnet")
    benches = [bench_from_record(record, seed=s, device="auto") for s in (0, 1, 2)]
    rows = compare(benches, ["d3", "ft", "ft-sam"], epochs=20, out="record/badnet/compare")
    table = aggregate(rows)   # one row per defense: mean, sample std, min, max over the seeds

Each run row: defense, seed, ACC, ASR, RA, DER (vs. the no-defense row), wall-clock seconds, config
hash, reserved-draw digest, error. Per seed, every defense sees that seed's reserved draw; the
no-defense row does not depend on the seed and is evaluated once. The hash covers the defense's full
configuration, the record, the reserved-set draw and the seed; a re-run with the same out folder
reuses finished rows from `compare_cache.json` (failed rows are retried), so adding seeds runs only
the new ones. One failing defense (or seed) yields an error row and the others still run.

Native defenses run in-process. A BackdoorBench script (entries with `backdoorbench:` and no native
implementation, or any name prefixed `bb:`) runs in a checkout given by `backdoorbench=PATH` as
    python defense/<name>.py --result_file <record> --yaml_path ./config/defense/<name>/<dataset>.yaml --device cpu
and its `record/<result_file>/defense/<name>/<name>_df_summary.csv` is read back.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from tqdm.auto import tqdm

from . import registry
from .bench import Bench, bench_from_record  # noqa: F401 — bench_from_record is part of this module's API
from .evaluation import summarize
from .files import folder_lock, write_bytes, write_json, write_text

METRICS = ("acc", "asr", "ra", "der", "seconds")
COLUMNS = ("defense", "seed", *METRICS, "config_hash", "reserved", "error")  # one run (seed) of a defense
STAT_COLUMNS = tuple(f"{m}{s}" for m in METRICS for s in ("", "_std", "_min", "_max"))
# one per defense: seed = "mean", n = seeds that finished, runs = seeds tried
AGGREGATE_COLUMNS = ("defense", "seed", "n", "runs", *STAT_COLUMNS, "config_hash", "error")
CSV_COLUMNS = ("defense", "seed", "n", "runs", *STAT_COLUMNS, "config_hash", "reserved", "error")
MEAN = "mean"
# identity keys the no-defense row does not depend on
SEED_KEYS = ("seed", "ratio", "index_file", "reserved", "reserved_source", "calibration")
MAX_SEED = 2 ** 32 - 1  # numpy's limit
NO_DEFENSE = "no defense"
CACHE = "compare_cache.json"
BB_PREFIX = "bb:"
COMPARE_PRECISION = "fp32"  # where a defense has a precision option: a table compares like with like


def parse_seeds(seeds: Optional[str] = None, seed: Optional[int] = None) -> List[int]:
    """`--seeds 0,1,2` or `--seed N` (not both) → the list of seeds; default [0]. Errors are one line."""
    if seeds is not None and seed is not None:
        raise ValueError("--seed and --seeds given together; use one, e.g. --seeds 0,1,2")
    if seeds is None:
        parsed = [0 if seed is None else seed]
    elif not seeds.strip():
        raise ValueError("--seeds is empty; name at least one seed, e.g. --seeds 0,1,2")
    else:
        parsed = [_one_seed(part, seeds) for part in seeds.split(",")]
    refuse_repeats("--seeds", seeds, parsed, "seed")
    bad = [s for s in parsed if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seed {bad[0]} is outside [0, {MAX_SEED}]")
    return parsed


def refuse_repeats(option: str, given: str, items: Sequence, noun: str) -> None:
    """One line for an option naming an item twice (rows of one table, or seeds, must be distinct)."""
    repeated = list(dict.fromkeys(item for item in items if items.count(item) > 1))
    if repeated:
        raise ValueError(f"{option} {given!r} repeats {', '.join(map(str, repeated))}; give each {noun} once")


def parse_defenses(text: str, backdoorbench: Optional[str] = None) -> List[str]:
    """`--defenses a,bb:b` → the names, checked before any data is read: known, each once, and a checkout
    for those BackdoorBench runs."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--defenses is empty; name at least one defense, e.g. --defenses d3,ft")
    keys = []
    for name in names:
        forced = name.lower().startswith(BB_PREFIX)
        entry = registry.get(name[len(BB_PREFIX):] if forced else name)
        keys.append(BB_PREFIX * forced + entry.name)
        if (forced or entry.where != "native") and backdoorbench is None:
            raise ValueError(f"{name} runs as a BackdoorBench script; pass --backdoorbench PATH of a BackdoorBench "
                             f"checkout, or drop it from --defenses")
    refuse_repeats("--defenses", text, keys, "defense")
    return names


def _one_seed(text: str, seeds: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"--seeds {seeds!r}: {text.strip()!r} is not an integer; use e.g. --seeds 0,1,2") from None


# --- planning: which runnable per requested name ------------------------------------------------------

def parse_overrides(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """['d3.lam=5', 'anp.iterations=200'] → {'d3': {'lam': 5}, 'anp': {'iterations': 200}} (YAML values)."""
    parsed: Dict[str, Dict[str, Any]] = {}
    for item in items or ():
        key, value = registry.parse_assignment(item, "--set", "DEFENSE.PARAM=VALUE, e.g. d3.lam=5")
        name, dot, param = key.rpartition(".")
        if not dot or not name or not param:
            raise ValueError(f"--set {item!r} must look like DEFENSE.PARAM=VALUE, e.g. d3.lam=5")
        parsed.setdefault(name.lower(), {})[param] = value
    return parsed


def check_overrides(overrides: Mapping[str, Mapping[str, Any]]) -> None:
    """Build every `--set NAME…` defense (or calibration, e.g. gic) once with its overrides (the registry
    checks names and values), so a bad one fails in one line before any data is read. `bb:NAME` rows take
    BackdoorBench's own argument names and are not checked."""
    calibrations = registry.names("calibration")
    for name, params in overrides.items():
        if name.startswith(BB_PREFIX):
            continue
        try:
            registry.build_calibration(name, **params) if name in calibrations else registry.build(name, None, **params)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--set: {error}") from None


def build_for(name: str, bench: Bench, *, epochs: Optional[int] = None,
              overrides: Optional[Mapping[str, Any]] = None) -> registry.Defense:
    """registry.build for a bench: its dataset and architecture, the shared budget, and the bench's seed
    and fp32 precision where the defense has such fields; `--set` overrides last."""
    return registry.build(name, bench.spec.name, model=bench.model_name, budget=epochs,
                          run={"seed": bench.seed, "precision": COMPARE_PRECISION}, **dict(overrides or {}))


# --- running ------------------------------------------------------------------------------------------

def run_native(bench: Bench, defense: registry.Defense) -> Dict[str, Any]:
    """Run one native defense on a copy of the bench model; ACC/ASR/RA and seconds."""
    purified, history, seconds = bench.run(defense)
    return {**bench.evaluate(purified), "seconds": seconds, **({"history": history} if bench.track else {})}


def bb_result_file(checkout: Path, record_folder: Path) -> str:
    """`--result_file` for a checkout: the record folder relative to `<checkout>/record`."""
    return os.path.relpath(Path(record_folder).resolve(), (Path(checkout) / "record").resolve())


def bb_command(checkout: Path, entry: registry.Entry, record_folder: Path, dataset: str, device: str = "cpu",
               python: str = sys.executable, overrides: Optional[Mapping[str, Any]] = None,
               reserved: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The BackdoorBench command line for a script entry (or a plugin class through our runner).

    `reserved` ({seed, ratio, index_file}) makes the script draw the same reserved set as compare:
    `--random_seed` always, `--ratio`/`--index` for defenses that use clean data (CLP has no --ratio).
    """
    checkout = Path(checkout)
    script = entry.backdoorbench
    if script:
        if not (checkout / "defense" / f"{script}.py").is_file():
            raise FileNotFoundError(f"{checkout}/defense/{script}.py not found; pass the root of a BackdoorBench "
                                    "checkout to --backdoorbench")
        command = [python, f"./defense/{script}.py"]
    else:
        script = entry.name
        command = [python, "-m", "d3_plugin.registry", "run-class", entry.name]  # a plugin class
    config_dir = checkout / "config" / "defense" / script
    yaml_name = f"{dataset}.yaml" if (config_dir / f"{dataset}.yaml").is_file() else "config.yaml"
    command += ["--result_file", bb_result_file(checkout, record_folder),
                "--yaml_path", f"./config/defense/{script}/{yaml_name}", "--dataset", dataset, "--device", device]
    reserved = reserved or {}
    if reserved.get("seed") is not None:
        command += ["--random_seed", str(reserved["seed"])]
    if entry.data == "clean" and reserved.get("index_file"):
        command += ["--index", str(Path(reserved["index_file"]).resolve())]
    elif entry.data == "clean" and reserved.get("ratio") is not None:
        command += ["--ratio", str(reserved["ratio"])]
    for key, value in (overrides or {}).items():  # last occurrence wins in argparse
        command += [f"--{key}", ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return command


def read_bb_summary(folder: Path, name: str) -> Dict[str, float]:
    """ACC/ASR/RA from `<name>_df_summary.csv` (row `last`), else the newest `*_df_summary.csv` there."""
    folder = Path(folder)
    path = folder / f"{name}_df_summary.csv"
    if not path.is_file():
        found = sorted(folder.glob("*_df_summary.csv"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no {name}_df_summary.csv in {folder}; the BackdoorBench run wrote no summary")
        path = found[-1]
    with open(path, newline="", encoding="utf-8") as f:
        rows = {row[0]: row[1:] for row in csv.reader(f) if row}
    header = rows.get("", None)
    if header is None or "last" not in rows:
        raise ValueError(f"{path} is not a BackdoorBench summary (needs a header and a `last` row)")
    last = dict(zip(header, rows["last"]))
    try:
        return {"acc": float(last["test_acc"]), "asr": float(last["test_asr"]), "ra": float(last["test_ra"])}
    except (KeyError, ValueError):
        raise ValueError(f"{path} lacks numeric test_acc/test_asr/test_ra in its `last` row") from None


def run_backdoorbench(bench: Bench, script: registry.ScriptDefense, checkout: Path, *, device: str = "cpu",
                      python: str = sys.executable, runner: Callable = subprocess.run) -> Dict[str, Any]:
    """Run a BackdoorBench defense script as a subprocess in `checkout`; read its summary back."""
    if bench.record_folder is None:
        raise ValueError("BackdoorBench scripts need an attack record folder; run compare with --result_file")
    command = bb_command(checkout, script.entry, bench.record_folder, bench.spec.name, device, python,
                         script.overrides, bench.identity)
    started = time.perf_counter()
    done = runner(command, cwd=str(checkout), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(command[1:3])} exited with status {done.returncode}: {tail[0]}")
    folder = Path(bench.record_folder) / "defense" / (script.entry.backdoorbench or script.entry.name)
    return {**read_bb_summary(folder, script.entry.backdoorbench or script.entry.name), "seconds": seconds}


# --- the comparison -------------------------------------------------------------------------------------

def _row(label: str, metrics: Mapping[str, Any], before: Optional[Mapping[str, float]], digest: str) -> Dict:
    row = {"defense": label, "acc": metrics["acc"], "asr": metrics["asr"], "ra": metrics["ra"], "der": None,
           "seconds": metrics.get("seconds", 0.0), "config_hash": digest, "error": ""}
    if "history" in metrics:
        row["history"] = metrics["history"]
    if before is not None:
        row["der"] = summarize(before, metrics)["der"]
    return row


def _error_row(label: str, digest: str, error: BaseException) -> Dict:
    message = " ".join(f"{type(error).__name__}: {error}".split())
    return {"defense": label, "acc": None, "asr": None, "ra": None, "der": None, "seconds": None,
            "config_hash": digest, "error": message[:300]}


def _load_cache(out: Optional[Path]) -> Dict[str, Dict]:
    if out is None or not (out / CACHE).is_file():
        return {}
    try:
        return json.loads((out / CACHE).read_text(encoding="utf-8")).get("rows", {})
    except (OSError, ValueError):
        return {}  # a damaged cache only costs recomputation


def compare(bench: Union[Bench, Sequence[Bench]], names: Sequence[str], *, epochs: Optional[int] = None,
            out: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
            backdoorbench: Optional[str] = None, bb_device: str = "cpu", bb_python: str = sys.executable,
            runner: Callable = subprocess.run, echo: Callable[[str], None] = print) -> List[Dict]:
    """Run every defense in `names` on the bench, or on each bench of a list (one per seed, e.g.
    `bench_from_record(record, seed=s)`); returns the run rows (no-defense row first, then seed by
    seed) and, with `out`, writes compare.{md,csv,json,png} and the cache there, holding the folder's lock
    (files.folder_lock: a second run into it is refused). `aggregate(rows)` gives the per-defense mean ± std
    over seeds."""
    with folder_lock(out) if out is not None else contextlib.nullcontext():
        return _compare(_benches(bench), names, epochs=epochs, out=out, overrides=overrides,
                        backdoorbench=backdoorbench, bb_device=bb_device, bb_python=bb_python, runner=runner,
                        echo=echo)


def _compare(benches, names, *, epochs, out, overrides, backdoorbench, bb_device, bb_python, runner, echo):
    out = Path(out) if out is not None else None
    cache = _load_cache(out)
    overrides = {k.lower(): v for k, v in (overrides or {}).items()}
    before_row = _no_defense_row(benches[0], cache)
    before = {k: before_row[k] for k in ("acc", "asr", "ra")}
    rows = [before_row]
    names = list(dict.fromkeys(n.strip() for n in names))  # a repeated name would merge into one aggregate
    jobs = [(b, requested) for b in benches for requested in names]
    for one, requested in tqdm(jobs, desc="defenses", disable=len(jobs) < 2):
        row = _run_one(one, requested, before, cache, epochs=epochs, overrides=overrides,
                       backdoorbench=backdoorbench, bb_device=bb_device, bb_python=bb_python, runner=runner)
        row = {**row, "seed": one.seed, "reserved": one.reserved_digest()}  # cached rows are shared: copy
        rows.append(row)
        if not row["error"]:
            cache[row["config_hash"]] = row
        if out is not None:
            write_json(out / CACHE, {"rows": cache})
        echo(_progress_line(row))
    if out is not None:
        write_outputs(rows, out)
    return rows


def _benches(bench: Union[Bench, Sequence[Bench]]) -> List[Bench]:
    benches = [bench] if isinstance(bench, Bench) else list(bench)
    seeds = [b.seed for b in benches]
    if not benches or len(set(seeds)) < len(seeds):
        raise ValueError(f"compare needs one bench per distinct seed, got seeds {seeds}")
    return benches


def _no_defense_row(bench: Bench, cache: Dict[str, Dict]) -> Dict:
    """The backdoored model's own row: independent of the seed and the reserved draw, so evaluated once."""
    digest = registry.config_hash({"name": NO_DEFENSE, **{k: v for k, v in bench.identity.items()
                                                           if k not in SEED_KEYS}})
    if digest not in cache:
        cache[digest] = {**_row(NO_DEFENSE, bench.evaluate(bench.model), None, digest), "seed": None,
                         "reserved": None}
    return cache[digest]


def _run_one(bench, requested, before, cache, *, epochs, overrides, backdoorbench, bb_device, bb_python, runner):
    force_bb = requested.lower().startswith(BB_PREFIX)
    name = requested[len(BB_PREFIX):] if force_bb else requested
    label = f"{name} (BackdoorBench)" if force_bb else name
    digest = registry.config_hash({"name": requested, "unbuilt": True, **bench.identity})
    try:
        entry = registry.get(name)
        if force_bb or entry.where != "native":
            if not (entry.backdoorbench or entry.where == "plugin class"):
                raise ValueError(f"{entry.name} has no BackdoorBench script ({entry.notes or 'see its registry entry'})")
            if "reserved_source" in bench.identity:
                raise ValueError(f"{label} runs as BackdoorBench's own script, which reads only the in-distribution "
                                 f"reserved draw; drop --reserved-source/--calibrate for it")
            # a forced bb:NAME row takes `--set bb:NAME.ARG=...` (BackdoorBench's own argument names)
            script = registry.ScriptDefense(entry, dict(overrides.get(requested.lower() if force_bb else entry.name, {})))
            if epochs is not None:
                script.overrides.setdefault("epochs", epochs)
            digest = registry.config_hash({"run": script.config_dict(), "label": label, **bench.identity})
            if digest in cache:
                return cache[digest]
            if backdoorbench is None:
                why = "is run by BackdoorBench" if force_bb else "has only a BackdoorBench implementation"
                raise ValueError(f"{label} {why}; pass --backdoorbench PATH of a BackdoorBench checkout")
            metrics = run_backdoorbench(bench, script, Path(backdoorbench), device=bb_device, python=bb_python,
                                        runner=runner)
        else:
            defense = build_for(entry.name, bench, epochs=epochs, overrides=overrides.get(entry.name))
            digest = registry.config_hash({"run": defense.hash(), "label": label, **bench.identity})
            if digest in cache:
                return cache[digest]
            metrics = run_native(bench, defense)
        return _row(label, metrics, before, digest)
    except Exception as error:  # one failing defense must not lose the others
        return _error_row(label, digest, error)


# --- output -------------------------------------------------------------------------------------------

def aggregate(rows: Sequence[Mapping]) -> List[Dict]:
    """One row per defense (in first-seen order) over its runs: for each of ACC, ASR, RA, DER and seconds
    the mean, sample std (ddof=1; None for one value), min and max over the runs that finished; `n` =
    how many finished, `runs` = how many were tried, `error` = the failed seeds' messages."""
    groups: Dict[str, List[Mapping]] = {}
    for row in rows:
        groups.setdefault(row["defense"], []).append(row)
    return [_aggregate_group(label, group) for label, group in groups.items()]


def _aggregate_group(label: str, group: Sequence[Mapping]) -> Dict:
    finished = [r for r in group if not r.get("error")]
    row: Dict[str, Any] = {"defense": label, "seed": MEAN, "n": len(finished), "runs": len(group)}
    for key in METRICS:
        values = [r[key] for r in finished if r.get(key) is not None]
        row.update(_stats(key, values))
    hashes = [r["config_hash"] for r in group]
    row["config_hash"] = hashes[0] if len(hashes) == 1 else registry.config_hash({"runs": hashes})
    row["error"] = _seed_errors(group)
    return row


def _seed_errors(group: Sequence[Mapping]) -> str:
    """'seed 2: RuntimeError: …' per distinct message ('seeds 0, 1: …' when shared); bare for a single run."""
    by_message: Dict[str, List[str]] = {}
    for r in group:
        if r.get("error"):
            by_message.setdefault(r["error"], []).append(str(r.get("seed")))
    if len(group) == 1:
        return next(iter(by_message), "")
    return "; ".join(f"seed{'s' * (len(seeds) > 1)} {', '.join(seeds)}: {message}"
                     for message, seeds in by_message.items())


def _stats(key: str, values: Sequence[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {key: None, f"{key}_std": None, f"{key}_min": None, f"{key}_max": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {key: statistics.fmean(values), f"{key}_std": std, f"{key}_min": min(values), f"{key}_max": max(values)}


def _table_rows(rows: Sequence[Mapping]) -> List[Mapping]:
    """Tables show aggregates; run rows are aggregated first."""
    return list(rows) if all("n" in row for row in rows) else aggregate(rows)


def _cell(row: Mapping, key: str, scale: float, digits: int) -> str:
    """`mean ± std (min–max)`; the plain value for one run or a run row; blank when missing."""
    if row.get(key) is None:
        return ""
    text = f"{scale * row[key]:.{digits}f}"
    if row.get(f"{key}_std") is not None:
        text += (f" ± {scale * row[key + '_std']:.{digits}f} ({scale * row[key + '_min']:.{digits}f}–"
                 f"{scale * row[key + '_max']:.{digits}f})")
    return text


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _display(row: Mapping) -> List[str]:
    metrics = [_cell(row, key, 100, 2) for key in ("acc", "asr", "ra", "der")]
    n = row.get("n")
    n_text = "" if n is None else (str(n) if n == row.get("runs", n) else f"{n} of {row['runs']}")
    return [row["defense"], *metrics, _cell(row, "seconds", 1, 1), n_text, row["config_hash"], row.get("error") or ""]


HEADER = ["defense", "ACC %", "ASR %", "RA %", "DER %", "seconds", "n", "config hash", "error"]


def _progress_line(row: Mapping) -> str:
    label = row["defense"] if row.get("seed") is None else f"{row['defense']} (seed {row['seed']})"
    if row["error"]:
        return f"{label}: FAILED {row['error']}"
    return f"{label}: ACC {_pct(row['acc'])}  ASR {_pct(row['asr'])}  DER {_pct(row['der'])}"


def _caption(rows: Sequence[Mapping]) -> str:
    seeds = sorted({r["seed"] for r in rows if isinstance(r.get("seed"), int)})
    if len(seeds) < 2:
        return ""
    return (f"Seeds {', '.join(map(str, seeds))}. Each cell: mean ± sample std (min–max) over the n seeds that "
            "finished; the no-defense row does not depend on the seed.\n\n")


def markdown_table(rows: Sequence[Mapping]) -> str:
    """The aggregate table in Markdown (run rows are aggregated; a caption names the seeds when several)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in _table_rows(rows):
        cells = [c.replace("|", "\\|") for c in _display(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return _caption(rows) + "\n".join(lines) + "\n"


def text_table(rows: Sequence[Mapping]) -> str:
    """Fixed-width aggregate table for the terminal (error column last, unpadded)."""
    body = [HEADER] + [_display(r) for r in _table_rows(rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in body)


def csv_table(rows: Sequence[Mapping]) -> str:
    """The run rows (one per defense and seed), then the aggregate rows (seed = "mean")."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    runs = [row for row in rows if "n" not in row]
    for row in runs + aggregate(runs):
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def bar_chart(rows: Sequence[Mapping]) -> bytes:
    """PNG bytes: mean ACC, ASR and DER per defense with ±std error bars (failed rows left empty)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _table_rows(rows)
    labels = [r["defense"] for r in rows]
    positions = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    for offset, (key, name) in zip((-0.27, 0, 0.27), (("acc", "ACC"), ("asr", "ASR"), ("der", "DER"))):
        errors = [100 * (r.get(f"{key}_std") or 0) for r in rows]
        ax.bar([p + offset for p in positions], [100 * (r[key] or 0) for r in rows], width=0.27, label=name,
               yerr=errors if any(errors) else None, capsize=3)
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(rows: Sequence[Mapping], out: str | os.PathLike) -> Dict[str, Path]:
    """compare.md, compare.csv, compare.json and compare.png in `out` from the run rows, each written
    atomically: the tables and the chart show `aggregate(rows)`; CSV and JSON also keep every run row."""
    out = Path(out)
    return {"md": write_text(out / "compare.md", markdown_table(rows)),
            "csv": write_text(out / "compare.csv", csv_table(rows)),
            "json": write_json(out / "compare.json", {"columns": list(COLUMNS), "rows": list(rows),
                                                      "aggregate_columns": list(AGGREGATE_COLUMNS),
                                                      "aggregate": aggregate(rows)}),
            "png": write_bytes(out / "compare.png", bar_chart(rows))}
