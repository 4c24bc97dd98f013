"""Benchmark (not a test): our CPU attacks on Fashion-MNIST with small_cnn, and the SAM-flattened
adaptive attack against FT and D3.

1. Train a clean model and one backdoored model per attack on a seeded training subset; report ACC
   and ASR (goal: ASR ≥ 90 %, ACC within 3 points of the clean model).
2. For BadNets and Blended: flatten the backdoor with adaptive SAM at each ρ, measure the backdoor
   loss flatness before/after, then defend with FT and D3 with the same epochs on a 5 % reserved
   clean set (disjoint from the attack's training data); report ACC/ASR after each.

    .venv/bin/python benchmarks/attacks.py --out benchmarks/results/attacks.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d3_plugin.attacks import TrainConfig, train_model  # noqa: E402
from d3_plugin.attacks.record import flatness_batches  # noqa: E402
from d3_plugin.attacks.flatness import measure_flatness  # noqa: E402
from d3_plugin.attacks.registry import get_attack  # noqa: E402
from d3_plugin.attacks.sam_flatten import FlattenConfig, sam_flatten  # noqa: E402
from d3_plugin.d3 import D3Config, detoxify  # noqa: E402
from d3_plugin.data import Loader, load_dataset  # noqa: E402
from d3_plugin.data.readers import dataset_spec  # noqa: E402
from d3_plugin.defenses.ft import FTConfig, finetune  # noqa: E402
from d3_plugin.evaluation import evaluate  # noqa: E402
from d3_plugin.d3_targets import default_layers  # noqa: E402
from d3_plugin.models import build_model  # noqa: E402
from d3_plugin.training import seed_everything  # noqa: E402

MODEL = "small_cnn"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="badnets,blended,sig,wanet,lf")
    parser.add_argument("--flatten", default="badnets,blended", help="attacks to SAM-flatten and defend")
    parser.add_argument("--rhos", default="1,2,3")
    parser.add_argument("--ratios", default="sig=0.08",
                        help="per-attack poisoning ratios NAME=R,... (others use the attack's default, 0.1)")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--sam-epochs", type=int, default=2)
    parser.add_argument("--defense-epochs", type=int, default=30)
    parser.add_argument("--defense-lr", type=float, default=0.03, help="FT and D3 learning rate")
    parser.add_argument("--reserved", type=float, default=0.05, help="reserved clean fraction of the train set")
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--hessian-iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/attacks.json")
    return parser.parse_args()


def parse_ratios(text: str) -> dict:
    """'sig=0.08,wanet=0.1' → {'sig': 0.08, 'wanet': 0.1}."""
    pairs = [item.split("=") for item in filter(None, text.split(","))]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--ratios {text!r} must look like NAME=RATIO[,NAME=RATIO]")
    return {name.strip(): float(value) for name, value in pairs}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


class Bench:
    def __init__(self, args):
        self.args, self.spec = args, dataset_spec("fashion_mnist")
        train, test = load_dataset("fashion_mnist", True), load_dataset("fashion_mnist", False)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        n_reserved = int(args.reserved * len(train))
        self.reserved = train.subset(order[:n_reserved].sort().values)
        self.train = train.subset(order[n_reserved:n_reserved + args.train_size].sort().values)
        test_order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 1))
        self.test = test.subset(test_order[:args.test_size].sort().values)
        self.clean_loader = Loader(self.test, self.spec, 1000)

    def evaluate(self, model, bd_test) -> dict:
        return evaluate(model, self.clean_loader, Loader(bd_test, self.spec, 1000))

    def train_model(self, data):
        seed_everything(self.args.seed)
        model = build_model(MODEL, self.spec.num_classes, self.spec.channels, self.spec.size)
        return train_model(model, data, self.spec, TrainConfig(epochs=self.args.epochs, seed=self.args.seed))[0]

    def reserved_batches(self, batch_size: int):
        return Loader(self.reserved, self.spec, batch_size, train=True, seed=self.args.seed)

    def defend(self, model, bd_test) -> dict:
        epochs = self.args.defense_epochs
        ft_config = FTConfig(epochs=epochs, lr=self.args.defense_lr, seed=self.args.seed)
        ft, _ = finetune(model, self.reserved_batches(ft_config.batch_size), ft_config)
        d3_config = D3Config(epochs=epochs, lr=self.args.defense_lr, layers=default_layers(MODEL), seed=self.args.seed)
        d3, _ = detoxify(model, self.reserved_batches(d3_config.batch_size), d3_config)
        return {"ft": self.evaluate(ft, bd_test), "d3": self.evaluate(d3, bd_test),
                "d3_config": d3_config.to_dict(), "ft_config": ft_config.to_dict()}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    bench, results = Bench(args), {"args": vars(args), "attacks": {}, "flattened": []}
    log(f"train {len(bench.train)}, reserved {len(bench.reserved)}, test {len(bench.test)}")
    clean = bench.evaluate(bench.train_model(bench.train), get_attack("badnets").poison_test(bench.test))
    results["clean"] = clean
    log(f"clean ACC {pct(clean['acc'])}")
    models, ratios = {}, parse_ratios(args.ratios)
    for name in args.attacks.split(","):
        attack = get_attack(name)
        bd_test = attack.poison_test(bench.test)
        model = bench.train_model(attack.poison_train(bench.train, ratio=ratios.get(name), seed=args.seed))
        models[name] = (model, bd_test, attack)
        results["attacks"][name] = {**bench.evaluate(model, bd_test), "ratio": ratios.get(name, attack.ratio)}
        log(f"{name}: {results['attacks'][name]}")
    for name in filter(None, args.flatten.split(",")):
        model, bd_test, attack = models[name]
        poisoned = attack.poison_train(bench.train, ratio=ratios.get(name), seed=args.seed)
        batches = flatness_batches(bd_test, bench.spec, "cpu", samples=500)
        before = measure_flatness(model, batches, hessian_iterations=args.hessian_iterations)
        row = {"attack": name, "rho": 0.0, "flatness": before, "attacked": results["attacks"][name],
               **bench.defend(model, bd_test)}
        results["flattened"].append(row)
        log(f"{name} rho=0: FT {row['ft']} D3 {row['d3']}")
        for rho in (float(r) for r in args.rhos.split(",")):
            config = FlattenConfig(rho=rho, epochs=args.sam_epochs, seed=args.seed)
            flat, _ = sam_flatten(model, poisoned, bench.spec, config)
            row = {"attack": name, "rho": rho, "flatness_before": before,
                   "flatness": measure_flatness(flat, batches, hessian_iterations=args.hessian_iterations),
                   "attacked": bench.evaluate(flat, bd_test), **bench.defend(flat, bd_test)}
            results["flattened"].append(row)
            log(f"{name} rho={rho}: {row['attacked']} flat {row['flatness']} FT {row['ft']} D3 {row['d3']}")
        save(results, args.out)
    save(results, args.out)
    print(tables(results))
    return 0


def save(results: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


def tables(results: dict) -> str:
    clean = results["clean"]["acc"]
    lines = [f"clean model ACC {pct(clean)}", "", "| attack | poisoning ratio | ACC | ASR | ΔACC vs clean |",
             "|---|---|---|---|---|"]
    for name, r in results["attacks"].items():
        lines.append(f"| {name} | {r['ratio']:g} | {pct(r['acc'])} | {pct(r['asr'])} | {100 * (r['acc'] - clean):+.2f} |")
    lines += ["", "| attack | ρ (ASAM) | no defense ACC/ASR | FT ACC/ASR | D3 ACC/ASR | backdoor-loss sharpness "
              "| top Hessian eig. |", "|---|---|---|---|---|---|---|"]
    for r in results["flattened"]:
        f = r["flatness"]
        lines.append(f"| {r['attack']} | {r['rho']:g} | {pct(r['attacked']['acc'])}/{pct(r['attacked']['asr'])} "
                     f"| {pct(r['ft']['acc'])}/{pct(r['ft']['asr'])} | {pct(r['d3']['acc'])}/{pct(r['d3']['asr'])} "
                     f"| {f['sharpness']:.4f} | {f.get('hessian_top', float('nan')):.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
