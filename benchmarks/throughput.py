"""Throughput ratios of issue 2, measured in one run (not a test).

(1) D3 epoch time / FT epoch time: the same model, the same reserved batches (a training Loader with the
    same seed), the same batch size; after each run's warm-up epoch, runs alternate A B B A ..., and
    the ratio is the median of back-to-back pairs (robust to a drifting load). Goal ≤ 1.05.
(2) end-to-end training throughput (fit() over a training Loader: shuffle, crop/flip on tensors,
    normalisation) / pure forward+backward+step throughput of the same model on the same batches,
    pre-built on the device. Goal ≥ 0.9.

    python benchmarks/throughput.py                                   # small_cnn, Fashion-MNIST
    python benchmarks/throughput.py --model preactresnet18 --dataset cifar10-like --train-size 256 \
        --reserved-size 256 --batch-size 64 --train-batch 64 --rounds 4

`cifar10-like` is random uint8 data with CIFAR-10's shape and augmentation (speed only, nothing learnt).
On a shared machine the absolute numbers move with the load; the interleaving keeps the ratios fair.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

from d3_plugin.d3 import D3Config, detoxify
from d3_plugin.data import ImageSet, Loader, dataset_spec, load_dataset
from d3_plugin.defenses.ft import FTConfig, finetune
from d3_plugin.d3_targets import default_layers
from d3_plugin.models import build_model
from d3_plugin.training import cross_entropy, fit, resolve_device, sgd


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="fashion_mnist (real files), or <name>-like for random data of that shape, "
                             "e.g. cifar10-like")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--train-size", type=int, default=4096, help="images per training epoch in (2)")
    parser.add_argument("--train-batch", type=int, default=128, help="batch size in (2) (TrainConfig's)")
    parser.add_argument("--reserved-size", type=int, default=1024, help="reserved clean images in (1)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size in (1) (D3's and FT's)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per D3/FT run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of each measurement")
    return parser.parse_args(argv)


def images(args, spec) -> ImageSet:
    n = max(args.train_size, args.reserved_size)
    if args.dataset.endswith("-like"):
        g = torch.Generator().manual_seed(0)
        shape = (n, spec.channels, spec.size, spec.size)
        return ImageSet(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                        torch.randint(0, spec.num_classes, (n,), generator=g))
    data = load_dataset(spec.name, True, args.data_root)
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_times(run, device, epochs):
    """Wall time of each epoch after the first, from the `on_epoch` callback's timestamps."""
    stamps = []

    def on_epoch(epoch, model):
        synchronize(device)
        stamps.append(time.perf_counter())
        return {}

    run(on_epoch)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def d3_vs_ft(model, reserved, spec, args, device):
    layers = default_layers(args.model)
    d3_config = D3Config(epochs=args.epochs, batch_size=args.batch_size, layers=layers)
    ft_config = FTConfig(epochs=args.epochs, batch_size=args.batch_size)

    def batches():
        return Loader(reserved, spec, args.batch_size, train=True, device=device, seed=0)

    runs = {"d3": lambda cb: detoxify(model, batches(), d3_config, on_epoch=cb),
            "ft": lambda cb: finetune(model, batches(), ft_config, on_epoch=cb)}
    return interleaved(runs, args.rounds, lambda run: epoch_times(run, device, args.epochs))


def interleaved(runs, rounds, measure):
    """Measure each run `rounds` times in A B B A ... order, so a drift in machine load hits both alike."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            result = measure(runs[name])
            times[name] += result if isinstance(result, list) else [result]
    return times


def pure_epoch(model, optimizer, batches):
    model.train()
    for inputs, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()


def fit_vs_pure(model, train, spec, args, device):
    loader = Loader(train, spec, args.train_batch, train=True, device=device, seed=0)
    prebuilt = [(x.clone(), y.clone()) for x, y in loader]  # the same augmented batches, already on the device
    fit_model, pure_model = copy.deepcopy(model), copy.deepcopy(model)
    fit_opt = sgd(fit_model.parameters(), 0.01, 0.9, 5e-4)
    pure_opt = sgd(pure_model.parameters(), 0.01, 0.9, 5e-4)
    objective = cross_entropy()

    def timed(step):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        return time.perf_counter() - start

    runs = {"fit": lambda: fit(fit_model, loader, fit_opt, objective, 1),
            "pure": lambda: pure_epoch(pure_model, pure_opt, prebuilt)}
    timed(runs["fit"]), timed(runs["pure"])  # warm-up
    times = interleaved(runs, args.rounds, timed)
    return {name: [len(train) / t for t in values] for name, values in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    spec = dataset_spec(args.dataset.removesuffix("-like"))
    data = images(args, spec)
    train, reserved = data.subset(torch.arange(args.train_size)), data.subset(torch.arange(args.reserved_size))
    torch.manual_seed(0)
    model = build_model(args.model, spec.num_classes, spec.channels, spec.size).to(device)

    epochs = d3_vs_ft(model, reserved, spec, args, device)
    rates = fit_vs_pure(model, train, spec, args, device)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {args.model}, data {args.dataset}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, 1-min load average {load:.1f} (a shared machine: absolute numbers vary)")
    print(f"(1) {args.reserved_size} reserved images, batch {args.batch_size}, "
          f"{args.rounds}×{args.epochs - 1} timed epochs each, A B B A order")
    print(f"(2) {args.train_size} training images, batch {args.train_batch}, {args.rounds} timed epochs each")
    print(f"  {'':<22} {'median':>12} {'best':>12}")
    for name, values, unit in (("D3 epoch time", epochs["d3"], "s"), ("FT epoch time", epochs["ft"], "s"),
                               ("fit() over Loader", rates["fit"], "img/s"),
                               ("pure fwd+bwd+step", rates["pure"], "img/s")):
        best, digits = (min(values), 3) if unit == "s" else (max(values), 0)
        print(f"  {name:<22} {statistics.median(values):>8.{digits}f} {unit:<5} {best:>6.{digits}f} {unit}")
    ratios = (("D3 / FT epoch time", epochs["d3"], epochs["ft"], min, "<= 1.05", lambda r: r <= 1.05),
              ("fit / pure throughput", rates["fit"], rates["pure"], max, ">= 0.90", lambda r: r >= 0.9))
    print(f"  {'ratio':<22} {'paired':>8} {'best':>12}")
    for name, a, b, best, goal, ok in ratios:
        paired = statistics.median(x / y for x, y in zip(a, b))  # each pair measured back to back
        print(f"  {name:<22} {paired:>8.3f} {best(a) / best(b):>12.3f}   goal {goal}   "
              f"{'met' if ok(paired) else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
