"""Make BackdoorBench attack records with BackdoorBench's own, unmodified attack scripts, on CPU.

    .venv/bin/python benchmarks/backdoorbench_records.py --backdoorbench /work/bb --python /work/bbenv/bin/python

(a) Renders a Fashion-MNIST subset (Debian's dataset-fashion-mnist, read with
    `d3_plugin.data.load_dataset`) as 32x32 RGB uint8 in CIFAR-10's python-batch layout under
    `<checkout>/data/cifar10/cifar-10-batches-py/` (`data_batch_1..5`, `test_batch`, `batches.meta`):
    each 28x28 grey image is zero-padded by 2 pixels on every side and copied into 3 channels. The
    training subset is class-balanced (`--train-size`, default 5,000 = 500 per class), the test subset
    too (`--test-size`, default 2,000 = 200 per class; 10,000 is the full test set), drawn with a fixed
    seed (`--data-seed`). Batch files are dicts with str keys `data` (N x 3072 uint8, channel-major rows)
    and `labels`, pickled at protocol 2, as torchvision's CIFAR10 reads them (encoding latin1).
    A `fmnist_render.json` beside them records the parameters; the data are re-rendered only when
    they differ.
(b) Writes a prototype attack YAML to `<checkout>/config/attack/prototype/fmnist_cpu.yaml` (not one of
    BackdoorBench's files): PreAct-ResNet18, cpu, 15 epochs, cosine with `cos_t_max` 15, batch 128,
    lr 0.01, wd 5e-4, dataset cifar10.
(c) Runs BackdoorBench's `attack/badnet.py` and `attack/blended.py` (their default attack YAMLs:
    all-to-one, target 0, 10 % poisoning; Blended alpha 0.2 with their hello_kitty trigger) through
    benchmarks/backdoorbench_runner.py, which only bypasses torchvision's CIFAR md5 check and adds
    torch/numpy compatibility shims (see that file). Records land in `<checkout>/record/<name>`.
(d) Skips a record that already exists complete (`attack_result.pt` and `attack_df_summary.csv`); an
    incomplete folder of that name is moved aside to `<name>.incomplete.<time>`.

Prints the clean ACC / ASR / RA of each record's last epoch and writes them with the wall-clock
seconds to `<checkout>/record/fmnist_records.json`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "backdoorbench_runner.py"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
ATTACKS = {"badnet": "attack/badnet.py", "blended": "attack/blended.py"}
YAML_REL = "config/attack/prototype/fmnist_cpu.yaml"


def balanced_subset(labels: np.ndarray, size: int, rng: np.random.RandomState) -> np.ndarray:
    """`size` indices, size/10 per class (the remainder spread over the first classes), shuffled."""
    classes = np.unique(labels)
    per, extra = divmod(size, len(classes))
    chosen = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        k = per + (1 if i < extra else 0)
        if k > len(idx):
            raise SystemExit(f"class {c} has {len(idx)} images, {k} requested")
        chosen.append(rng.choice(idx, k, replace=False))
    out = np.concatenate(chosen)
    rng.shuffle(out)
    return out


def to_cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 1, 28, 28) uint8 -> (N, 3072) uint8: zero-pad to 32x32, grey into R, G and B, channel-major."""
    n = len(images)
    padded = np.zeros((n, 32, 32), dtype=np.uint8)
    padded[:, 2:30, 2:30] = images[:, 0]
    rgb = np.repeat(padded[:, None], 3, axis=1)
    return np.ascontiguousarray(rgb.reshape(n, 3072))


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def render_data(checkout: Path, train_size: int, test_size: int, seed: int) -> Path:
    folder = checkout / "data" / "cifar10" / "cifar-10-batches-py"
    manifest = folder / "fmnist_render.json"
    params = {"source": "fashion_mnist (d3_plugin.data.load_dataset)", "train_size": train_size,
              "test_size": test_size, "seed": seed, "render": "zero-pad 2px to 32x32, grey -> RGB",
              "class_balanced": True}
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        print(f"data: {folder} already rendered ({params})")
        return folder
    from d3_plugin.data import load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for train in (True, False):
        ds = load_dataset("fashion_mnist", train)
        images, labels = ds.images.numpy(), ds.labels.numpy()
        size = train_size if train else test_size
        idx = balanced_subset(labels, size, rng) if size < len(labels) else np.arange(len(labels))
        rows, labs = to_cifar_rows(images[idx]), [int(v) for v in labels[idx]]
        if train:
            for b, part in enumerate(np.array_split(np.arange(len(idx)), 5), start=1):
                _dump({"batch_label": f"training batch {b} of 5", "labels": [labs[i] for i in part],
                       "data": rows[part], "filenames": [f"fmnist_train_{int(idx[i])}.png" for i in part]},
                      folder / f"data_batch_{b}")
        else:
            _dump({"batch_label": "testing batch 1 of 1", "labels": labs, "data": rows,
                   "filenames": [f"fmnist_test_{int(i)}.png" for i in idx]}, folder / "test_batch")
        print(f"data: {'train' if train else 'test'} {len(idx)} images, per class "
              f"{np.bincount(labels[idx], minlength=10).tolist()}")
    _dump({"num_cases_per_batch": train_size // 5, "label_names": CLASSES, "num_vis": 3072},
          folder / "batches.meta")
    manifest.write_text(json.dumps(params, indent=1))
    return folder


def write_yaml(checkout: Path, epochs: int, num_workers: int) -> Path:
    path = checkout / YAML_REL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by d3-plugin's benchmarks/backdoorbench_records.py (not a BackdoorBench file):\n"
        "# their prototype settings for a short CPU run on the rendered Fashion-MNIST subset.\n"
        f"num_workers: {num_workers}\npin_memory: False\nnon_blocking: False\nprefetch: False\n"
        "amp: False\ndevice: cpu\nclient_optimizer: sgd\ndataset: cifar10\ndataset_path: ./data\n"
        "frequency_save: 0\nbatch_size: 128\nlr: 0.01\nlr_scheduler: CosineAnnealingLR\n"
        f"cos_t_max: {epochs}\nmodel: preactresnet18\nrandom_seed: 0\nsgd_momentum: 0.9\nwd: 0.0005\n"
        f"epochs: {epochs}\n")
    return path


def record_complete(folder: Path) -> bool:
    return (folder / "attack_result.pt").is_file() and (folder / "attack_df_summary.csv").is_file()


def last_metrics(folder: Path) -> dict:
    """ACC / ASR / RA (%) of the last epoch from BackdoorBench's attack_df_summary.csv."""
    with open(folder / "attack_df_summary.csv") as f:
        rows = {r[""] if "" in r else next(iter(r.values())): r for r in csv.DictReader(f)}
    last = rows["last"]
    return {k: round(100 * float(last[col]), 2) for k, col in
            (("ACC", "test_acc"), ("ASR", "test_asr"), ("RA", "test_ra")) if col in last}


def attack_command(python: str, checkout: Path, name: str, yaml: Path, record: str,
                   extra: list[str]) -> list[str]:
    return [python, str(RUNNER), str(checkout), ATTACKS[name], "--yaml_path", str(yaml.relative_to(checkout)),
            "--save_folder_name", record] + extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backdoorbench", required=True, type=Path, help="a BackdoorBench checkout")
    p.add_argument("--python", required=True, help="python of a venv that runs BackdoorBench's scripts")
    p.add_argument("--attacks", default="badnet,blended")
    p.add_argument("--prefix", default="fmnist_", help="record folder = <prefix><attack>")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--parallel", action="store_true", help="run the attacks concurrently")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per attack (default: 2 sequential, 1 each in parallel)")
    p.add_argument("--extra", default="", help="extra args for every attack script")
    p.add_argument("--data-only", action="store_true")
    args = p.parse_args(argv)

    checkout = args.backdoorbench.resolve()
    if not (checkout / "attack" / "badnet.py").is_file():
        raise SystemExit(f"{checkout} is not a BackdoorBench checkout (no attack/badnet.py)")
    render_data(checkout, args.train_size, args.test_size, args.data_seed)
    yaml = write_yaml(checkout, args.epochs, args.num_workers)
    print(f"attack yaml: {yaml}")
    if args.data_only:
        return 0

    threads = args.threads or (1 if args.parallel else 2)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               BB_TORCH_THREADS=str(threads), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONUNBUFFERED="1")
    summary_path = checkout / "record" / "fmnist_records.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    jobs = []
    for name in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        record = f"{args.prefix}{name}"
        folder = checkout / "record" / record
        if record_complete(folder):
            print(f"{record}: complete record exists, skipped")
            continue
        if folder.exists():
            aside = folder.with_name(f"{record}.incomplete.{time.strftime('%Y%m%d%H%M%S')}")
            print(f"{record}: incomplete folder moved to {aside}")
            shutil.move(str(folder), str(aside))
        folder.parent.mkdir(parents=True, exist_ok=True)
        cmd = attack_command(args.python, checkout, name, yaml, record, args.extra.split())
        log = open(checkout / "record" / f"{record}.stdout.log", "w")
        print(f"{record}: {' '.join(cmd)}  (log {log.name})", flush=True)
        jobs.append((name, record, cmd, log))

    def finish(name, record, proc, log, t0):
        rc = proc.wait()
        seconds = round(time.time() - t0, 1)
        log.close()
        folder = checkout / "record" / record
        if rc != 0 or not record_complete(folder):
            print(f"{record}: FAILED (exit {rc}) after {seconds} s; see {log.name}")
            return False
        m = last_metrics(folder)
        summary[record] = {"attack": name, "seconds": seconds, **m, "epochs": args.epochs,
                           "train_size": args.train_size, "test_size": args.test_size,
                           "threads": threads, "parallel": args.parallel,
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        summary_path.write_text(json.dumps(summary, indent=1))
        print(f"{record}: {seconds} s, last epoch ACC {m.get('ACC')} ASR {m.get('ASR')} RA {m.get('RA')}",
              flush=True)
        return True

    ok = True
    if args.parallel:
        running = [(n, r, subprocess.Popen(c, stdout=l, stderr=subprocess.STDOUT, env=env), l, time.time())
                   for n, r, c, l in jobs]
        for n, r, proc, l, t0 in running:
            ok &= finish(n, r, proc, l, t0)
    else:
        for n, r, c, l in jobs:
            t0 = time.time()
            ok &= finish(n, r, subprocess.Popen(c, stdout=l, stderr=subprocess.STDOUT, env=env), l, t0)
    for record, m in summary.items():
        print(f"{record}: ACC {m.get('ACC')} ASR {m.get('ASR')} RA {m.get('RA')} ({m.get('seconds')} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
