"""D3 side by side on BackdoorBench records: our plugin's `defense/d3.py` and the authors' reference.

    .venv/bin/python benchmarks/backdoorbench_d3.py --backdoorbench /work/bb --reference /work/d3ref \\
        --bb-python /work/bbenv/bin/python --records fmnist_badnet,fmnist_blended \\
        --variants ours,reference --seeds 0,1,2 --out /work/bench_out/d3

- ours: `d3-plugin install <backdoorbench>` (the d3-plugin next to this script's python), then
  `python defense/d3.py --result_file R --yaml_path ./config/defense/d3/cifar10.yaml ...` in that
  checkout with this script's python (`--ours-python`), which has the d3_plugin package.
- reference: the authors' `defense/d3.py` in their BackdoorBench fork (`--reference`), run unmodified
  with BackdoorBench's venv python (`--bb-python`) through benchmarks/backdoorbench_runner.py
  (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, numpy aliases such as np.infty, torchvision's CIFAR md5 check
  reduced to "file exists"). Their checkout gets `data` -> <backdoorbench>/data and
  `record/R/<entry>` -> <backdoorbench>/record/R/<entry> symlinks (every entry except `defense`), so
  their outputs stay in their checkout.

Every run gets the same job: `--epochs --batch_size --ratio --lmd --eps --select_layer_name
--random_seed S --device cpu` (both draw the reserved set with BackdoorBench's choose_index:
random.seed(S); random.sample(range(N), int(N*ratio)); the script checks that both wrote the same
log/index.txt). A variant is KIND plus extra arguments appended after the common ones (argparse's last
value wins); a token `!name` drops the common option `--name`. Built in:
  ours            ours, + --ours-args
  reference       reference, + --reference-args
  ours-default    ours without --select_layer_name and --lmd (our default θs and λ), + --ours-args
  ours-fp32 / ours-bf16 / ours-auto   ours + --precision fp32|bf16|auto, + --ours-args
and `--variant 'NAME=KIND:ARGS'` (repeatable) defines more, e.g. `--variant 'ours-e5=ours:--eval_every 5'`.

Runs are interleaved (for each seed, for each record, every variant in the given order) so load drift
hits all variants alike. After each run its result folder is moved to
`<out>/runs/<record>/<variant>/seed<S>/` (with the run's stdout log), and `<out>/results.json` and
`<out>/table.md` are rewritten; a run already in results.json with the same command is skipped, so
the script can be restarted. ACC / ASR / RA are the `last` row of d3_df_summary.csv (ours:
defense/d3/, reference: defense/d3/default/), in %; seconds are wall-clock around the subprocess.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNNER = HERE / "backdoorbench_runner.py"
INITIAL = re.compile(r"Initial State:.*test acc: (?P<ACC>[0-9.]+), test asr: (?P<ASR>[0-9.]+), test ra: (?P<RA>[0-9.]+)")

BUILTIN = {
    "ours": ("ours", []),
    "reference": ("reference", []),
    "ours-default": ("ours", ["!select_layer_name", "!lmd"]),
    "ours-fp32": ("ours", ["--precision", "fp32"]),
    "ours-bf16": ("ours", ["--precision", "bf16"]),
    "ours-auto": ("ours", ["--precision", "auto"]),
}


def parse_variants(names: list[str], defined: list[str], ours_args: list[str], ref_args: list[str]) -> dict:
    table = dict(BUILTIN)
    for spec in defined:
        if "=" not in spec:
            raise SystemExit(f"--variant {spec!r}: expected NAME=KIND:ARGS with KIND ours or reference")
        name, rest = spec.split("=", 1)
        kind, _, args = rest.partition(":")
        if kind not in ("ours", "reference"):
            raise SystemExit(f"--variant {spec!r}: KIND must be ours or reference")
        table[name] = (kind, shlex.split(args))
    out = {}
    for name in names:
        if name not in table:
            raise SystemExit(f"unknown variant {name!r}; built in: {', '.join(BUILTIN)}; define others "
                             f"with --variant NAME=KIND:ARGS")
        kind, extra = table[name]
        extra = list(extra) + (ours_args if kind == "ours" else ref_args)
        out[name] = (kind, extra)
    return out


def job_args(common: dict, seed: int, extra: list[str]) -> list[str]:
    drop = {t[1:] for t in extra if t.startswith("!")}
    args = []
    for key, value in {**common, "random_seed": seed}.items():
        if key not in drop and value is not None:
            args += [f"--{key}", str(value)]
    return args + [t for t in extra if not t.startswith("!")]


def read_summary_last(path: Path) -> dict:
    with open(path) as f:
        rows = list(csv.reader(f))
    header = rows[0]
    for row in rows[1:]:
        if row and row[0] == "last":
            values = dict(zip(header, row))
            return {name: round(100 * float(values[col]), 2) for name, col in
                    (("ACC", "test_acc"), ("ASR", "test_asr"), ("RA", "test_ra"))
                    if values.get(col) not in (None, "")}
    raise ValueError(f"no 'last' row in {path}")


def read_epochs(path: Path) -> dict:
    """Per-epoch ACC / ASR / RA (%) from d3_df.csv."""
    if not path.is_file():
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for name, col in (("ACC", "test_acc"), ("ASR", "test_asr"), ("RA", "test_ra")):
        values = [r.get(col) for r in rows]
        if values and all(v not in (None, "") for v in values):
            out[name] = [round(100 * float(v), 2) for v in values]
    return out


def index_digest(path: Path):
    if not path.is_file():
        return None
    values = sorted(int(float(line)) for line in path.read_text().split() if line.strip())
    return {"n": len(values), "sha1": hashlib.sha1(",".join(map(str, values)).encode()).hexdigest()[:12]}


def link_reference_record(backdoorbench: Path, reference: Path, record: str) -> None:
    """data -> BB's data; record/R/<entry> -> BB's record/R/<entry> for every entry except defense."""
    data = reference / "data"
    if not data.exists():
        data.symlink_to(backdoorbench / "data", target_is_directory=True)
    source = backdoorbench / "record" / record
    target = reference / "record" / record
    if target.is_symlink():
        raise SystemExit(f"{target} is a symlink to a whole record; remove it (the reference would write into "
                         f"the BackdoorBench record)")
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name == "defense":
            continue
        link = target / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry, target_is_directory=entry.is_dir())


def move_aside(folder: Path, out: Path, label: str) -> None:
    if folder.exists():
        aside = out / "stale" / f"{label}.{time.strftime('%Y%m%d%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(aside))
        print(f"  moved an existing {folder} to {aside}")


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def make_table(results: dict) -> str:
    runs = [r for r in results["runs"] if r.get("status") == "ok"]
    records = list(dict.fromkeys(r["record"] for r in runs))
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    lines = ["| attack | variant | seeds | ACC % | ASR % | RA % | mean s | s / reference |",
             "|---|---|---|---|---|---|---|---|"]
    for record in records:
        ref = [r["seconds"] for r in runs if r["record"] == record and r["variant"] == "reference"]
        ref_mean = statistics.fmean(ref) if ref else None
        for variant in variants:
            sel = [r for r in runs if r["record"] == record and r["variant"] == variant]
            if not sel:
                continue
            secs = statistics.fmean(r["seconds"] for r in sel)
            ratio = f"{secs / ref_mean:.2f}" if ref_mean else "–"
            seeds = ",".join(str(r["seed"]) for r in sel)
            lines.append(f"| {record} | {variant} | {seeds} | {fmt([r['ACC'] for r in sel])} | "
                         f"{fmt([r['ASR'] for r in sel])} | {fmt([r['RA'] for r in sel])} | {secs:.0f} | {ratio} |")
    lines.append("")
    lines.append("ACC / ASR / RA: mean ± sample std (min–max) over seeds of the last epoch, in %; "
                 "seconds: wall-clock of the whole defense subprocess.")
    failed = [r for r in results["runs"] if r.get("status") != "ok"]
    for r in failed:
        lines.append(f"- FAILED: {r['record']} {r['variant']} seed {r['seed']} (exit {r.get('returncode')}), "
                     f"log {r.get('log')}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backdoorbench", type=Path, required=True, help="BackdoorBench checkout with the records")
    p.add_argument("--reference", type=Path, help="the authors' BackdoorBench fork with defense/d3.py")
    p.add_argument("--bb-python", help="python of the BackdoorBench venv (for the reference)")
    p.add_argument("--ours-python", default=sys.executable, help="python that has d3_plugin (default: this one)")
    p.add_argument("--records", default="fmnist_badnet,fmnist_blended")
    p.add_argument("--variants", default="ours,reference")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KIND:ARGS")
    p.add_argument("--ours-args", default="", help="extra args for every ours-kind variant")
    p.add_argument("--reference-args", default="", help="extra args for every reference-kind variant")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--lmd", type=float, default=10)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--select-layer-name", default="linear")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ours-yaml", default="./config/defense/d3/cifar10.yaml")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each run")
    p.add_argument("--no-install", action="store_true", help="do not run d3-plugin install first")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--table-only", action="store_true", help="rebuild table.md from results.json")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="with --table-only: also take the runs of these other --out folders")
    args = p.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    if args.table_only:
        for other in args.merge:
            results["runs"] += json.loads((other / "results.json").read_text())["runs"]
        table = make_table(results)
        (out / "table.md").write_text(table)
        print(table)
        return 0

    bb = args.backdoorbench.resolve()
    records = [r.strip() for r in args.records.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = parse_variants([v.strip() for v in args.variants.split(",") if v.strip()], args.variant,
                              shlex.split(args.ours_args), shlex.split(args.reference_args))
    kinds = {kind for kind, _ in variants.values()}
    for record in records:
        if not (bb / "record" / record / "attack_result.pt").is_file():
            raise SystemExit(f"no record {bb / 'record' / record}/attack_result.pt; make it with "
                             f"benchmarks/backdoorbench_records.py")
    if "reference" in kinds:
        if not args.reference or not args.bb_python:
            raise SystemExit("a reference variant needs --reference and --bb-python")
        ref = args.reference.resolve()
        if not (ref / "defense" / "d3.py").is_file():
            raise SystemExit(f"{ref} has no defense/d3.py (the authors' fork)")
        for record in records:
            link_reference_record(bb, ref, record)
    if "ours" in kinds and not args.no_install:
        d3_plugin = Path(args.ours_python).parent / "d3-plugin"
        subprocess.run([str(d3_plugin), "install", str(bb)], check=True)

    common = {"epochs": args.epochs, "batch_size": args.batch_size, "ratio": args.ratio, "lmd": args.lmd,
              "eps": args.eps, "select_layer_name": args.select_layer_name or None, "device": args.device}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               BB_TORCH_THREADS=str(args.threads), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONUNBUFFERED="1")
    git = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cI"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "d3_plugin", "configs"],
                           capture_output=True, text=True)
    results.setdefault("sessions", []).append({
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv,
        "d3_plugin_commit": git.stdout.strip(), "d3_plugin_dirty": dirty.stdout.split("\n")[:20],
        "machine": f"{os.cpu_count()} CPUs", "threads": args.threads})

    def save():
        results_path.write_text(json.dumps(results, indent=1))
        (out / "table.md").write_text(make_table(results))

    save()
    for seed in seeds:
        for record in records:
            for name, (kind, extra) in variants.items():
                job = ["--result_file", record] + job_args(common, seed, extra)
                if kind == "ours":
                    cwd, result_dir, summary_dir = bb, bb / "record" / record / "defense" / "d3", None
                    cmd = [args.ours_python, "defense/d3.py", "--yaml_path", args.ours_yaml] + job
                else:
                    cwd = ref
                    result_dir = ref / "record" / record / "defense" / "d3"
                    cmd = [args.bb_python, str(RUNNER), str(ref), "defense/d3.py"] + job
                summary_dir = result_dir / "default" if kind == "reference" else result_dir
                done = [r for r in results["runs"] if r["record"] == record and r["variant"] == name
                        and r["seed"] == seed and r.get("status") == "ok" and r.get("command") == cmd]
                if done:
                    print(f"{record} {name} seed {seed}: done before, skipped")
                    continue
                results["runs"] = [r for r in results["runs"] if not (
                    r["record"] == record and r["variant"] == name and r["seed"] == seed)]
                dest = out / "runs" / record / name / f"seed{seed}"
                if dest.exists():
                    shutil.rmtree(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                move_aside(result_dir, out, f"{record}.{kind}")
                log_path = out / "runs" / record / name / f"seed{seed}.stdout.log"
                print(f"{record} {name} seed {seed}: {' '.join(cmd)}", flush=True)
                started = time.time()
                with open(log_path, "w") as log:
                    rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                seconds = round(time.time() - started, 1)
                run = {"record": record, "variant": name, "kind": kind, "seed": seed, "command": cmd,
                       "cwd": str(cwd), "seconds": seconds, "returncode": rc, "log": str(log_path),
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
                try:
                    run.update(read_summary_last(summary_dir / "d3_df_summary.csv"))
                    run["epochs"] = read_epochs(summary_dir / "d3_df.csv")
                    run["reserved_index"] = index_digest(summary_dir / "log" / "index.txt")
                    ours_summary = summary_dir / "d3_summary.json"
                    if ours_summary.is_file():
                        before = json.loads(ours_summary.read_text()).get("before", {})
                        run["before"] = {k.upper(): round(100 * v, 2) for k, v in before.items()}
                    if "before" not in run:  # the reference logs its starting point in this line
                        match = INITIAL.search(log_path.read_text(errors="replace"))
                        if match:
                            run["before"] = {k: round(100 * float(match.group(k)), 2) for k in ("ACC", "ASR", "RA")}
                    run["status"] = "ok" if rc == 0 else "failed"
                except (OSError, ValueError, KeyError) as error:
                    run["status"] = "failed"
                    run["error"] = str(error)
                if result_dir.exists():
                    shutil.move(str(result_dir), str(dest))
                    run["result_folder"] = str(dest)
                results["runs"].append(run)
                save()
                print(f"  {run['status']} in {seconds} s: ACC {run.get('ACC')} ASR {run.get('ASR')} "
                      f"RA {run.get('RA')} reserved {run.get('reserved_index')}", flush=True)

    # same reserved set for every variant of a (record, seed)?
    for record in records:
        for seed in seeds:
            digests = {r["variant"]: (r.get("reserved_index") or {}).get("sha1") for r in results["runs"]
                       if r["record"] == record and r["seed"] == seed and r.get("status") == "ok"}
            if len(set(digests.values())) > 1:
                print(f"WARNING: {record} seed {seed}: reserved sets differ between variants: {digests}")
    table = make_table(results)
    print(table)
    return 0 if all(r.get("status") == "ok" for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
