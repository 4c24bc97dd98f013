"""Bad inputs and faults against every front end, each in a subprocess (issue 11; not a test)

    .venv/bin/python benchmarks/error_sweep.py [--work /tmp/sweep]

Makes one tiny record (`d3-plugin attack badnets`, 1 epoch, 1,000 images) and a first complete D3 run on
it, then runs every case below on a fresh copy of that checkout — `d3-plugin defend/attack/compare/install/
list` and the installed `python defense/<name>.py` scripts — and checks, per case:
- the outcome: `one-line` (exit 2, one stderr line after any progress bar, no "Traceback"), `traceback`,
  `success` (exit 0) or `other`; a case names the outcome it expects (one-line unless said otherwise);
- result folders: every `record/*/defense/<name>/` is whole (result, tables and summary together) and a
  failed run left the first run's `defense/d3/` byte for byte as it was (no partial or mixed folder);
- unsafe loads: hostile pickles (attack_result.pt, --checkpoint_load, a CIFAR batch) would create the file
  PWNED if anything unpickled them unsafely;
- lost user edits: install cases that edited a file of ours check the edit is still there;
- staging left: no hidden `record/*/defense/.<name>.partial-*` folder remains (a failed run removes its own,
  and every run those of killed runs).
Prints one row per case and the totals; exits 1 when any case misses its expectation.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import torch

D3_PLUGIN = str(Path(sys.executable).with_name("d3-plugin"))
EDIT = "# my edit\n"


def defend(*argv):
    return ["defend", "--result_file", "record/tiny", "--epochs", "1", "--device", "cpu", *argv]


def attack(*argv):
    return ["attack", "badnets", "--out", "record/new", "--epochs", "1", "--train-size", "500", "--device", "cpu", *argv]


def script(name, *argv):
    """An installed BackdoorBench script (the checkout copy gets `install --defenses all` first)."""
    return ["SCRIPT", f"defense/{name}.py", "--result_file", "tiny", "--yaml_path", f"./config/defense/{name}/mnist.yaml",
            "--epochs", "1", "--device", "cpu", *argv]


def compare(*argv):
    return ["compare", "--result_file", "record/tiny", "--epochs", "1", "--device", "cpu", *argv]


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
    "defend, output folder is a file": (defend(), lambda root: _replace_with_file(root / "record/tiny/defense")),
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
    # --- added with the registry redesign (issue 11's wider sweep)
    "defend, attack_result.pt hostile pickle": (defend(), lambda root: _hostile(root / "record/tiny/attack_result.pt")),
    "defend --checkpoint_load hostile pickle": (defend("--checkpoint_load", "evil.pt"), lambda root: _hostile(root / "evil.pt")),
    "defend --checkpoint_load missing": (defend("--checkpoint_load", "missing.pt"), None),
    "defend, record's model is a string": (defend(), lambda root: _model_is_a_string(root)),
    "defend, record's weights are NaN": (defend(), lambda root: _nan_weights(root)),
    "defend, a poisoned PNG empty": (defend(), lambda root: _first_png(root).write_bytes(b"")),
    "defend, a poisoned PNG truncated": (defend(), lambda root: _truncate(_first_png(root), 40)),
    "defend, a poisoned PNG decompression bomb": (defend(), lambda root: _png_bomb(_first_png(root))),
    "defend --yaml_path invalid YAML": (defend("--yaml_path", "bad.yaml"), lambda root: (root / "bad.yaml").write_text("a: [1\n")),
    "defend --yaml_path python tag": (defend("--yaml_path", "bad.yaml"),
                                      lambda root: (root / "bad.yaml").write_text("lmd: !!python/object/apply:os.system ['touch PWNED']\n")),
    "defend --yaml_path not a mapping": (defend("--yaml_path", "bad.yaml"), lambda root: (root / "bad.yaml").write_text("- 1\n")),
    "defend --yaml_path missing": (defend("--yaml_path", "missing.yaml"), None),
    "defend --index out of range": (defend("--index", "idx.txt"), lambda root: (root / "idx.txt").write_text("99999999\n")),
    "defend --index not integers": (defend("--index", "idx.txt"), lambda root: (root / "idx.txt").write_text("a\nb\n")),
    "defend --ratio 0.00001 (empty reserved set)": (defend("--ratio", "0.00001"), None),
    "defend --eval_every 0": (defend("--eval_every", "0"), None),
    "defend --eval_batch_size -1": (defend("--eval_batch_size", "-1"), None),
    "defend --frequency_save 3 --eval_every 2": (defend("--frequency_save", "3", "--eval_every", "2"), None),
    "defend --precision fp16 on cpu": (defend("--precision", "fp16"), None),
    "defend --precision fp8": (defend("--precision", "fp8"), None),
    "defend --model vgg19_bn (record: small_cnn)": (defend("--model", "vgg19_bn"), None),
    "defend --dataset cifar10 (record: fashion_mnist)": (defend("--dataset", "cifar10"), None),
    "defend --lr -1": (defend("--lr", "-1"), None),
    "defend --lmd abc": (defend("--lmd", "abc"), None),
    "defend --hinge both": (defend("--hinge", "both"), None),
    "defend --Lp 1": (defend("--Lp", "1"), None),
    "defend --client_optimizer adam": (defend("--client_optimizer", "adam"), None),
    "defend --select_layer_name bn (BatchNorm)": (defend("--select_layer_name", "features.1"), None),
    "defend, record folder unwritable target": (defend(), lambda root: _block(root / "record/tiny/defense/.d3.resume.pt")),
    "script fst --alpha nan": (script("fst", "--alpha", "nan"), None),
    "script fst --head nope": (script("fst", "--head", "nope"), None),
    "script d3p_clp --u -1": (script("d3p_clp", "--u", "-1"), None),
    "script d3p_clp --resume True": (script("d3p_clp", "--resume", "True"), None),
    "script d3p_ft --epochs -1": (script("d3p_ft", "--epochs", "-1"), None),
    "script d3p_ft-sam --rho abc": (script("d3p_ft-sam", "--rho", "abc"), None),
    "script d3p_nad --betas 1,x": (script("d3p_nad", "--betas", "1,x"), None),
    "script d3p_anp --prune_by sideways": (script("d3p_anp", "--prune_by", "sideways"), None),
    "script d3p_i-bau --patch_portion 2": (script("d3p_i-bau", "--patch_portion", "2"), None),
    "script d3p_sau --init nope": (script("d3p_sau", "--init", "nope"), None),
    "script aft --labels nope": (script("aft", "--labels", "nope"), None),
    "script d3p_fp --layer nope": (script("d3p_fp", "--layer", "nope"), None),
    "script d3, record missing": (["SCRIPT", "defense/d3.py", "--result_file", "none", "--yaml_path",
                                   "./config/defense/d3/mnist.yaml"], None),
    "script d3 --resume True, checkpoint of another run": (script("d3", "--resume", "True", "--epochs", "2"),
                                                           lambda root: _foreign_resume(root)),
    "script d3 --resume True, checkpoint corrupt": (script("d3", "--resume", "True"),
                                                    lambda root: (root / "record/tiny/defense/.d3.resume.pt").write_bytes(b"junk")),
    "compare --defenses nope": (compare("--defenses", "nope"), None),
    "compare --defenses gic (a calibration)": (compare("--defenses", "gic"), None),
    "compare --reserved-source fog": (compare("--reserved-source", "fog"), None),
    "compare --reserved-source corrupt:noise:9": (compare("--reserved-source", "corrupt:noise:9"), None),
    "compare --calibrate gac": (compare("--calibrate", "gac"), None),
    "compare --calibrate gic --set gic.delta=2": (compare("--calibrate", "gic", "--set", "gic.delta=2"), None),
    "script d3 --reserved_source fog": (script("d3", "--reserved_source", "fog"), None),
    "grid, file missing": (["grid", "missing.yaml"], None),
    "grid, unknown key": (["grid", "g.yaml"], lambda root: (root / "g.yaml").write_text(
        "attacks: [{record: record/tiny}]\ndefenses: [ft]\nsedes: [0]\n")),
    "grid, unknown defense": (["grid", "g.yaml"], lambda root: (root / "g.yaml").write_text(
        "attacks: [{record: record/tiny}]\ndefenses: [nope]\n")),
    "analyze cost, no ft row": (["analyze", "cost", "--from", "c.json"], lambda root: (root / "c.json").write_text(
        '{"rows": [{"defense": "d3", "seconds": 1.0, "error": ""}]}')),
    "compare --seeds 0,0": (compare("--seeds", "0,0"), None),
    "compare --seeds a": (compare("--seeds", "a"), None),
    "compare --seed 1 --seeds 0,1": (compare("--seed", "1", "--seeds", "0,1"), None),
    "compare --epochs -1": (compare("--epochs", "-1"), None),
    "compare --set nodot=1": (compare("--set", "nodot=1"), None),
    "compare --set ft.lr=abc": (compare("--set", "ft.lr=abc"), None),
    "compare, record missing": (["compare", "--result_file", "record/none"], None),
    "attack nope": (["attack", "nope", "--out", "record/new"], None),
    "attack --out outside record/": (["attack", "badnets", "--out", "elsewhere/new", "--epochs", "1"], None),
    "attack sam-flatten without --rho": (["attack", "sam-flatten", "--out", "record/flat", "--result_file", "record/tiny"], None),
    "attack sam-flatten --rho -1": (["attack", "sam-flatten", "--out", "record/flat", "--result_file", "record/tiny",
                                     "--rho", "-1"], None),
    "attack --dataset cifar10, CIFAR batch hostile": (attack("--dataset", "cifar10", "--data-root", "cifar"),
                                                      lambda root: _hostile_cifar(root / "cifar")),
    "attack --data-root /nonexistent": (attack("--data-root", "/nonexistent"), None),
    "install --defenses nope": (["install", ".", "--defenses", "nope"], None),
    "install --defenses gic (a calibration)": (["install", ".", "--defenses", "gic"], None),
    "install --uninstall, not installed": (["install", ".", "--uninstall"], None),
    "install --uninstall, a config edited": (["install", ".", "--uninstall"], lambda root: _install_then_edit(root, "config/defense/d3/mnist.yaml")),
    "install --defenses all, an edited fst.py": (["install", ".", "--defenses", "all"], lambda root: _install_then_edit(root, "defense/fst.py", "all")),
    # --- issue 26
    "defend --lr 1e308 (beyond float32)": (defend("--lr", "1e308"), None),
    "defend, record's num_classes -3": (defend(), lambda root: _set_in_record(root, "num_classes", -3)),
    "defend --resume maybe": (defend("--resume", "maybe"), None),
    "defend --normalize maybe": (defend("--normalize", "maybe"), None),
    "defend --bn_train 2": (defend("--bn_train", "2"), None),
    "defend --yaml_path resume: maybe": (defend("--yaml_path", "r.yaml"), lambda root: (root / "r.yaml").write_text("resume: maybe\n")),
    "script d3 --amp perhaps": (script("d3", "--amp", "perhaps"), None),
    "compare --set d3.bn_train=maybe": (compare("--defenses", "d3", "--set", "d3.bn_train=maybe"), None),
    "defend --index repeating one index": (defend("--index", "idx.txt"), lambda root: (root / "idx.txt").write_text("5\n5\n5\n")),
    "compare --defenses ft,ft": (compare("--defenses", "ft,ft"), None),
    "compare --defenses ft,FT": (compare("--defenses", "ft,FT"), None),
    "install --defenses ''": (["install", ".", "--defenses", ""], None),
    "compare --defenses bb:ft without --backdoorbench": (compare("--defenses", "bb:ft"), None),
    "demo --epochs -1": (["demo", "--out", "runs/demo", "--epochs", "-1"], None),
    "demo --lr nan": (["demo", "--out", "runs/demo", "--lr", "nan"], None),
    "demo --train-size 0": (["demo", "--out", "runs/demo", "--train-size", "0"], None),
    "grid --table-only, a cell's result.json truncated": (["grid", "g.yaml", "--table-only"],
                                                         lambda root: _grid_with_a_truncated_cell(root), "success"),
    "defend, a killed run's staging folder left": (defend(), lambda root: _stale_staging(root), "success"),
    "defend --index out of range, a killed run's staging folder left": (defend("--index", "idx.txt"),
                                                                         lambda root: _stale_staging(root, "99999999\n")),
    "compare --out in use by another run": (compare("--defenses", "ft", "--out", "cmp"), lambda root: _hold_lock(root / "cmp")),
    "grid, its out in use by another run": (["grid", "g.yaml"], lambda root: _hold_lock(root / "g", grid=True)),
    "defend --layers ''": (defend("--layers", ""), None),
    "defend --checkpoint_load a folder": (defend("--checkpoint_load", "ck"), lambda root: (root / "ck").mkdir()),
    "defend --checkpoint_load a link to /dev/zero": (defend("--checkpoint_load", "zero.pt"),
                                                     lambda root: (root / "zero.pt").symlink_to("/dev/zero")),
    "defend, attack_result.pt is a folder": (defend(), lambda root: _replace_with_folder(root / "record/tiny/attack_result.pt")),
    "install --uninstall --defenses fst, d3.py edited": (["install", ".", "--uninstall", "--defenses", "fst"],
                                                         lambda root: _install_then_edit(root, defenses="d3,fst"), "success"),
    "list, a broken plugin installed": (["list"], lambda root: _broken_plugin(root), "success"),
    "attack --help, a broken plugin installed": (["attack", "--help"], lambda root: _broken_plugin(root), "success"),
}


def _truncate(path: Path, size: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _replace_with_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("a file where the output folder should be")


def _replace_with_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _hostile(path: Path) -> None:
    torch.save({"model": _Hostile(), "model_name": "small_cnn", "num_classes": 10}, path)


def _hostile_cifar(folder: Path) -> None:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(batches / name, "wb") as f:
            pickle.dump(_Hostile(), f)


def _model_is_a_string(root: Path) -> None:
    path = root / "record/tiny/attack_result.pt"
    result = torch.load(path, weights_only=False)
    result["model"] = "not a state dict"
    torch.save(result, path)


def _set_in_record(root: Path, key: str, value) -> None:
    path = root / "record/tiny/attack_result.pt"
    result = torch.load(path, weights_only=False)
    result[key] = value
    torch.save(result, path)


def _nan_weights(root: Path) -> None:
    path = root / "record/tiny/attack_result.pt"
    result = torch.load(path, weights_only=False)
    result["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in result["model"].items()}
    torch.save(result, path)


def _png_bomb(path: Path) -> None:
    """A valid 1x1 PNG whose header claims 60000 x 60000 pixels."""
    import struct
    import zlib
    from io import BytesIO

    from PIL import Image
    buffer = BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", 60000, 60000) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _block(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()  # a folder where a file must go


KILL_IN_EPOCH_2 = """
import runpy, sys
import d3_plugin.bench as bench
evaluate, calls = bench.Bench.evaluate, []
def dies(self, *args, **kwargs):  # before, epoch 1, then a kill in epoch 2's evaluation
    calls.append(1)
    if len(calls) == 3:
        raise KeyboardInterrupt
    return evaluate(self, *args, **kwargs)
bench.Bench.evaluate = dies
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _foreign_resume(root: Path) -> None:
    """The resume checkpoint of a killed run with other settings (λ 5)."""
    from d3_plugin.backdoorbench import install
    install.install(root, defenses=["all"])
    subprocess.run([sys.executable, "-c", KILL_IN_EPOCH_2, "defense/d3.py", "--result_file", "tiny", "--yaml_path",
                    "./config/defense/d3/mnist.yaml", "--epochs", "2", "--lmd", "5", "--device", "cpu"], cwd=root,
                   capture_output=True)
    assert (root / "record/tiny/defense/.d3.resume.pt").is_file(), "the killed run left no checkpoint"


def _broken_plugin(root: Path) -> None:
    (root / "plugins").mkdir()
    (root / "plugins" / "broken_plugin.py").write_text("def wrong(model):\n    return model\n")
    info = root / "plugins" / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[backdoorbench.defenses]\nwrong = broken_plugin:wrong\n"
                                           "[backdoorbench.attacks]\nmissing = broken_plugin:missing\n")


def _grid_with_a_truncated_cell(root: Path) -> None:
    (root / "g.yaml").write_text("epochs: 0\ndevice: cpu\nattacks: [{record: record/tiny}]\ndefenses: [ft]\nseeds: [0]\n")
    subprocess.run([D3_PLUGIN, "grid", "g.yaml"], cwd=root, check=True, capture_output=True)
    _truncate(next((root / "g/cells").rglob("ft/*/result.json")), 50)


def _stale_staging(root: Path, index: str = "") -> None:
    """The hidden staging folder of a killed run (its process is gone); an index file."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / f"record/tiny/defense/.d3.partial-20200101-000000-{dead.pid}/log").mkdir(parents=True)
    (root / "idx.txt").write_text(index)


def staging_left(root: Path) -> bool:
    """A run's hidden staging folder left behind (a failed run removes its own, a run those of killed ones)."""
    return any(root.glob("record/*/defense/.*.partial-*"))


HOLD_LOCK = """import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], ".d3-plugin.lock"), "a+") as f:  # as files.folder_lock takes it
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    while os.path.isdir(sys.argv[1]):  # until the sweep removes this case's copy
        time.sleep(0.2)
"""


def _hold_lock(folder: Path, grid: bool = False) -> None:
    """Another run writing `folder` (a process holding its lock)."""
    if grid:
        (folder.parent / "g.yaml").write_text("epochs: 0\ndevice: cpu\nattacks: [{record: record/tiny}]\n"
                                              "defenses: [ft]\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"


def _first_png(root: Path) -> Path:
    return next((root / "record/tiny").rglob("*.png"))


def _install_then_edit(root: Path, rel: str = "defense/d3.py", defenses: str = "d3") -> None:
    subprocess.run([D3_PLUGIN, "install", ".", "--defenses", defenses], cwd=root, check=True, capture_output=True)
    edited = root / rel
    edited.write_text(edited.read_text() + EDIT)
    (root / ".edited").write_text(rel)


def make_checkout(work: Path) -> Path:
    """A checkout with a tiny record and one complete D3 run on it (kept across sweeps)."""
    base = work / "base"
    if (base / "record/tiny/defense/d3/d3_summary.json").is_file():
        return base
    (base / "defense").mkdir(parents=True, exist_ok=True)
    subprocess.run([D3_PLUGIN, "attack", "badnets", "--out", str(base / "record/tiny"), "--epochs", "1",
                    "--train-size", "1000", "--device", "cpu"], check=True, capture_output=True)
    subprocess.run([D3_PLUGIN, *defend()], cwd=base, check=True, capture_output=True)
    return base


def fingerprint(folder: Path):
    """sha256 of every file below `folder` (None when it is not a folder)."""
    if not folder.is_dir():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def partial_or_mixed(root: Path) -> bool:
    """A result folder holding part of a run (result, tables and summary go together)."""
    for save in root.glob("record/*/defense/*"):
        if save.name.startswith(".") or not save.is_dir():
            continue
        present = {p.name for p in save.iterdir()}
        parts = {"defense_result.pt", f"{save.name}_df.csv", f"{save.name}_summary.json"}
        if present & parts and not parts <= present:
            return True
    return False


def run_case(root: Path, command: list) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if (root / "plugins").is_dir():
        env["PYTHONPATH"] = str(root / "plugins")
    if command[0] == "SCRIPT":
        from d3_plugin.backdoorbench import install
        install.install(root, defenses=["all"])
        argv = [sys.executable, *command[1:]]
    else:
        argv = [D3_PLUGIN, *command]
    return subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=600, env=env)


def classify(done: subprocess.CompletedProcess) -> str:
    if done.returncode == 0:
        return "success"
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    if "Traceback" in done.stderr:
        return "traceback"
    last = lines[-1] if lines else ""
    return "one-line" if done.returncode == 2 and "error:" in last else "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/d3_error_sweep"))
    args = parser.parse_args(argv)
    base = make_checkout(args.work)
    totals = {"cases": 0, "as expected": 0, "one-line": 0, "traceback": 0, "partial or mixed": 0,
              "staging left": 0, "unsafe loads": 0, "lost user edits": 0}
    print("| case | outcome | expected | exit | last stderr line |\n|---|---|---|---|---|")
    for name, (command, prepare, *expected) in CASES.items():
        expected = expected[0] if expected else "one-line"
        root = args.work / "case"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root, symlinks=True)
        if prepare is not None:
            prepare(root)
        first_run = fingerprint(root / "record/tiny/defense/d3")
        done = run_case(root, command)
        outcome = classify(done)
        problems = []
        if partial_or_mixed(root) or (done.returncode != 0 and fingerprint(root / "record/tiny/defense/d3") != first_run):
            problems.append("partial or mixed")
        if staging_left(root):
            problems.append("staging left")
        if (root / "PWNED").exists():
            problems.append("unsafe loads")
        edited = root / ".edited"
        if edited.exists() and not (root / edited.read_text()).read_text().endswith(EDIT):
            problems.append("lost user edits")
        totals["cases"] += 1
        totals["as expected"] += outcome == expected and not problems
        totals["one-line"] += outcome == "one-line"
        totals["traceback"] += outcome == "traceback"
        for problem in problems:
            totals[problem] += 1
        last = ([line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()] or [""])[-1]
        shown = " + ".join([outcome, *problems])
        print(f"| {name} | {shown} | {expected} | {done.returncode} | {last[:160].replace('|', '/')} |", flush=True)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in totals.items()))
    return 0 if totals["as expected"] == totals["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
