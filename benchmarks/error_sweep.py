"""Bad inputs against the command line, each in a subprocess: one-line error or traceback? (issue 11; not a test)

    .venv/bin/python benchmarks/error_sweep.py [--work /tmp/sweep]

Makes one tiny record (`d3-plugin attack badnets`, 1 epoch, 1,000 images), then runs every case below on
a fresh copy of its checkout and classifies the outcome: `one-line` (exit 2, one stderr line after any
progress bar, no "Traceback"), `traceback`, `success` (exit 0) or `other`. A case also fails when it leaves
`record/<attack>/defense/d3/` half-written (a result file without `d3_summary.json`). Prints one row per
case and the counts; exits 1 when any case is not `one-line`.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

D3_PLUGIN = str(Path(sys.executable).with_name("d3-plugin"))
RESULTS = ("defense_result.pt", "d3_df.csv", "d3_df_summary.csv", "d3_summary.json")


def defend(*argv):
    return ["defend", "--result_file", "record/tiny", "--epochs", "1", "--device", "cpu", *argv]


def attack(*argv):
    return ["attack", "badnets", "--out", "record/new", "--epochs", "1", "--train-size", "500", "--device", "cpu", *argv]


CASES = {  # name → (d3-plugin arguments, preparation of the checkout copy or None)
    "defend --lr nan": (defend("--lr", "nan"), None),
    "defend --lmd inf": (defend("--lmd", "inf"), None),
    "defend --eps nan": (defend("--eps", "nan"), None),
    "defend --batch_size 0": (defend("--batch_size", "0"), None),
    "defend --frequency_save -1": (defend("--frequency_save", "-1"), None),
    "defend --ratio 2": (defend("--ratio", "2"), None),
    "defend --device tpu": (defend("--device", "tpu"), None),
    "defend --warm_up_method sideways": (defend("--warm_up_method", "sideways"), None),
    "defend --preset fast": (defend("--preset", "fast"), None),
    "defend --select_layer_name nope": (defend("--select_layer_name", "nope"), None),
    "defend --data_root /nonexistent": (defend("--data_root", "/nonexistent"), None),
    "defend, record missing": (["defend", "--result_file", "record/none", "--epochs", "1"], None),
    "defend, attack_result.pt truncated": (defend(), lambda root: _truncate(root / "record/tiny/attack_result.pt")),
    "defend, attack_result.pt empty": (defend(), lambda root: (root / "record/tiny/attack_result.pt").write_bytes(b"")),
    "defend, a poisoned PNG corrupt": (defend(), lambda root: _first_png(root).write_bytes(b"not a png")),
    "defend, a poisoned PNG missing": (defend(), lambda root: _first_png(root).unlink()),
    "defend, output folder is a file": (defend(), lambda root: (root / "record/tiny/defense").write_text("x")),
    "attack --epochs 0": (attack("--epochs", "0"), None),
    "attack --lr 0": (attack("--lr", "0"), None),
    "attack --train-size -5": (attack("--train-size", "-5"), None),
    "attack --ratio 1.5": (attack("--ratio", "1.5"), None),
    "attack --param size=[1": (attack("--param", "size=[1"), None),
    "attack --param nope=1": (attack("--param", "nope=1"), None),
    "attack --device tpu": (attack("--device", "tpu"), None),
    "compare --set d3.lam=[oops": (["compare", "--result_file", "record/tiny", "--set", "d3.lam=[oops"], None),
    "compare --set d3.lamda=1": (["compare", "--result_file", "record/tiny", "--set", "d3.lamda=1", "--epochs", "1"],
                                 None),
    "install into a non-checkout": (["install", "nowhere"], None),
    "install over a foreign defense/d3.py": (["install", "."], lambda root: (root / "defense/d3.py").write_text("x\n")),
    "install over an edited defense/d3.py": (["install", "."], lambda root: _install_then_edit(root)),
    "install with a corrupt manifest": (["install", "."], lambda root: (root / ".d3-plugin-manifest.json").write_text("{")),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _first_png(root: Path) -> Path:
    return next((root / "record/tiny").rglob("*.png"))


def _install_then_edit(root: Path) -> None:
    subprocess.run([D3_PLUGIN, "install", "."], cwd=root, check=True, capture_output=True)
    script = root / "defense/d3.py"
    script.write_text(script.read_text() + "# my edit\n")


def make_checkout(work: Path) -> Path:
    base = work / "base"
    if (base / "record/tiny/attack_result.pt").is_file():
        return base
    (base / "defense").mkdir(parents=True, exist_ok=True)
    subprocess.run([D3_PLUGIN, "attack", "badnets", "--out", str(base / "record/tiny"), "--epochs", "1",
                    "--train-size", "1000", "--device", "cpu"], check=True, capture_output=True)
    return base


def classify(done: subprocess.CompletedProcess) -> str:
    if done.returncode == 0:
        return "success"
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    if "Traceback" in done.stderr:
        return "traceback"
    last = lines[-1] if lines else ""
    return "one-line" if done.returncode == 2 and "error:" in last else "other"


def half_written(root: Path) -> bool:
    for save in root.glob("record/*/defense/d3"):
        present = {name for name in RESULTS if (save / name).exists()}
        if present and "d3_summary.json" not in present:
            return True
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/d3_error_sweep"))
    args = parser.parse_args(argv)
    base = make_checkout(args.work)
    counts: dict = {}
    print("| case | outcome | exit | last stderr line |\n|---|---|---|---|")
    for name, (command, prepare) in CASES.items():
        root = args.work / "case"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        if prepare is not None:
            prepare(root)
        done = subprocess.run([D3_PLUGIN, *command], cwd=root, capture_output=True, text=True, timeout=600)
        outcome = classify(done)
        if half_written(root):
            outcome += " + half-written"
        counts[outcome] = counts.get(outcome, 0) + 1
        last = ([line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()] or [""])[-1]
        print(f"| {name} | {outcome} | {done.returncode} | {last[:160].replace('|', '/')} |", flush=True)
    print(f"\n{len(CASES)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if counts.get("one-line", 0) == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
