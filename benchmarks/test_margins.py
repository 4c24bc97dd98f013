"""The measured range of every behavioural test claim, over fixture seeds and torch thread counts (not a test)

    .venv/bin/python benchmarks/test_margins.py [--seeds 0-5] [--threads 1,2] [--native-bf16 machine,0]
                                                [--out /tmp/margins] [PYTEST_ARGS]

Runs the `trained` tests once per (seed, threads, CPU bf16 branch) — `D3_PLUGIN_TEST_SEED=s OMP_NUM_THREADS=t
D3_PLUGIN_TEST_NATIVE_BF16=b pytest -m trained`, each in a fresh process with an empty TMPDIR — and collects what each assertion wrapped in
`observed(...)` (tests/conftest.py) saw. Prints one line per run (passed/failed, wall time) and one per
claim (min–max over all runs, and the run nearest its threshold), and writes both as JSON to --out.
A threshold in a test must sit outside the range printed here with a margin; the range goes beside it.
Run it alone on the machine: the runs are timed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def integers(text: str):
    """'0-5' or '1,2' → a list of ints."""
    if re.fullmatch(r"\d+-\d+", text):
        low, high = map(int, text.split("-"))
        return list(range(low, high + 1))
    return [int(part) for part in text.split(",")]


def run_once(seed: int, threads: int, bf16: str, margins: Path, extra) -> dict:
    env = {**os.environ, "D3_PLUGIN_TEST_SEED": str(seed), "OMP_NUM_THREADS": str(threads),
           "D3_PLUGIN_TEST_MARGINS": str(margins)}
    env.pop("D3_PLUGIN_TEST_NATIVE_BF16", None)
    if bf16 != "machine":
        env["D3_PLUGIN_TEST_NATIVE_BF16"] = bf16
    with tempfile.TemporaryDirectory() as tmp:
        env["TMPDIR"] = tmp
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "trained",
                               *extra], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - start
    lines = done.stdout.strip().splitlines()
    failed = [line.split(" - ")[0] for line in lines if line.startswith("FAILED")]
    return {"seed": seed, "threads": threads, "native_bf16": bf16, "status": done.returncode, "seconds": round(seconds, 1),
            "summary": lines[-1] if lines else done.stderr.strip()[-200:], "failed": failed}


def claim_ranges(margins: Path) -> dict:
    values = defaultdict(list)
    if margins.exists():
        for line in margins.read_text().splitlines():
            row = json.loads(line)
            values[row["claim"]].append((row["value"], row["seed"], row["threads"]))
    return {claim: {"min": min(v for v, _, _ in seen), "max": max(v for v, _, _ in seen), "runs": len(seen)}
            for claim, seen in sorted(values.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=integers, default=integers("0-5"))
    parser.add_argument("--threads", type=integers, default=[1, 2])
    parser.add_argument("--native-bf16", type=lambda text: text.split(","), default=["machine"],
                        help="machine (this CPU decides), 0 or 1, comma-separated (tests/conftest.py)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "d3-plugin-margins")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (e.g. a test file)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    margins = args.out / "observed.jsonl"
    margins.unlink(missing_ok=True)
    runs = []
    for bf16 in args.native_bf16:
        for threads in args.threads:
            for seed in args.seeds:
                run = run_once(seed, threads, bf16, margins, args.pytest_args)
                runs.append(run)
                print(f"seed {seed} threads {threads} native bf16 {bf16}: {run['summary']} ({run['seconds']:.0f} s)",
                      flush=True)
                for name in run["failed"]:
                    print(f"    {name}", flush=True)
    ranges = claim_ranges(margins)
    width = max((len(claim) for claim in ranges), default=0)
    for claim, seen in ranges.items():
        print(f"{claim:<{width}}  {seen['min']:.4g}–{seen['max']:.4g}  ({seen['runs']} values)")
    (args.out / "margins.json").write_text(json.dumps({"runs": runs, "claims": ranges}, indent=1))
    return 0 if all(run["status"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
