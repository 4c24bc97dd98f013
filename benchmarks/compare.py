"""Benchmark (not a test): `d3-plugin compare` on Fashion-MNIST BadNets and Blended records, CPU scale.

    .venv/bin/python benchmarks/compare.py --root /tmp/d3_compare_bench --attacks badnets,blended

For each attack: train small_cnn on the poisoned Fashion-MNIST training set (10 % poisoning, target 0),
write a BackdoorBench record (`<root>/checkout/record/fmnist_<attack>`), then run the comparison on it
with the same 5 % reserved draw and seed for every defense. Records and finished rows are reused on a
re-run. Prints each table (also in `<record>/compare/compare.md`).

Cost on the shared 2-core CPU (one thread per process, the two attacks as two parallel processes):
8–9 min of attack training plus ~22 min of defenses per attack. Results: docs/compare.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d3_plugin.attacks import TrainConfig, train_model  # noqa: E402
from d3_plugin.attacks.registry import get_attack  # noqa: E402
from d3_plugin.record_io.records import write_attack_record  # noqa: E402
from d3_plugin.data import Loader, dataset_spec, load_dataset  # noqa: E402
from d3_plugin.evaluation import evaluate  # noqa: E402
from d3_plugin.models import build_model  # noqa: E402

DEFENSES = "d3,ft,ft-sam,fst,nad,anp,fp,i-bau,aft"
# CPU-scale budgets for defenses whose cost is not counted in epochs.
OVERRIDES = ["anp.iterations=200"]


def make_record(root: Path, attack_name: str, epochs: int, train_size: int) -> Path:
    """Train a backdoored small_cnn and write it as a BackdoorBench record (skipped when it exists)."""
    folder = root / "checkout" / "record" / f"fmnist_{attack_name}"
    if (folder / "attack_result.pt").is_file():
        return folder
    spec = dataset_spec("fashion_mnist")
    train, test = load_dataset("fashion_mnist", True), load_dataset("fashion_mnist", False)
    if train_size < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_size])
    attack = get_attack(attack_name)
    poisoned = attack.poison_train(train, ratio=0.1, target=0, seed=0)
    bd_test = attack.poison_test(test, target=0)
    started = time.time()
    model, _ = train_model(build_model("small_cnn", 10, 1, 28), poisoned, spec,
                           TrainConfig(epochs=epochs, lr=0.05, batch_size=128), progress=f"attack {attack_name}")
    metrics = evaluate(model, Loader(test, spec, 1000), Loader(bd_test, spec, 1000))
    print(f"{attack_name}: trained in {time.time() - started:.0f}s, ACC {metrics['acc']:.4f} ASR {metrics['asr']:.4f}",
          flush=True)
    write_attack_record(folder, model_name="small_cnn", num_classes=10, state_dict=model.state_dict(),
                        dataset="fashion_mnist", data_path="./data/fashion_mnist", img_size=(28, 28, 1),
                        bd_train=poisoned.subset(torch.nonzero(poisoned.poisoned).flatten()), bd_test=bd_test)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/d3_compare_bench")
    parser.add_argument("--attacks", default="badnets,blended")
    parser.add_argument("--defenses", default=DEFENSES)
    parser.add_argument("--epochs", type=int, default=10, help="epochs for every defense")
    parser.add_argument("--attack_epochs", type=int, default=3)
    parser.add_argument("--train_size", type=int, default=60000, help="training images for the attack")
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from d3_plugin.commands import compare as command
    status = 0
    for attack_name in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        folder = make_record(Path(args.root), attack_name, args.attack_epochs, args.train_size)
        cli = argparse.ArgumentParser()
        command.add_arguments(cli)
        flags = ["--result_file", str(folder), "--defenses", args.defenses, "--epochs", str(args.epochs),
                 "--ratio", str(args.ratio), "--seed", "0", "--device", "cpu"]
        for item in OVERRIDES:
            flags += ["--set", item]
        print(f"\n## Fashion-MNIST {attack_name}\n$ d3-plugin compare {' '.join(flags)}", flush=True)
        started = time.time()
        status |= command.run(cli.parse_args(flags))
        print(f"({time.time() - started:.0f}s)\n" + (folder / "compare" / "compare.md").read_text(), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
