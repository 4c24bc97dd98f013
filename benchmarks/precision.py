"""fp32 vs bf16 (+ channels_last) throughput on PreAct-ResNet18, side by side in one run (not a test).

    python benchmarks/precision.py                        # steps, evaluation at batch 32, 64 and 512
    python benchmarks/precision.py --end-to-end           # also detoxify + per-epoch evaluate, fp32 vs auto
    python benchmarks/precision.py --data fashion_mnist   # Fashion-MNIST rendered as 32x32x3

Measured, each on the same model and batches:
  train     one SGD step (forward, backward, step) at --train-batch (32): fit()'s train_epoch over
            pre-built batches (no augmentation cost);
  eval@B    evaluate() over --eval-images test images at batch B (32, 64 and 512), under inference_mode;
  e2e       (--end-to-end) detoxify with an on_epoch that evaluates the clean and poisoned test sets
            after every epoch: --reserved images, --epochs epochs, --test-images clean + as many
            "poisoned" images; fp32 as before the precision option (contiguous, evaluation at batch 32)
            vs the defaults (precision auto, evaluation at the device's batch size, BatchNorm folded).
Variants: fp32 = precision fp32 in the plain (contiguous) memory format, the code before the precision
option; fp32+cl = fp32 in channels_last; bf16+cl = bf16 autocast in channels_last (auto on this CPU
when it has native bf16); a `+fold` variant evaluates with the BatchNorms folded into the convolutions
(evaluate's default; the others evaluate unfolded, as before it; training ignores it). Each round runs
every variant once, in an order that alternates between rounds (A B C, C B A, ...), and reports the
median over rounds of time(fp32) / time(variant): robust to the load of a shared machine drifting.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from d3_plugin.d3 import D3Config, detoxify
from d3_plugin.data import DatasetSpec, ImageSet, Loader
from d3_plugin.evaluation import eval_batch_size, evaluate
from d3_plugin.d3_targets import default_layers
from d3_plugin.models import build_model
from d3_plugin.precision import Precision, cpu_has_native_bf16, resolve_precision
from d3_plugin.training import cross_entropy, resolve_device, sgd, train_epoch

SPEC = DatasetSpec("cifar10-like", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
                   crop_padding=4, horizontal_flip=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="random", choices=("random", "fashion_mnist"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=4, help="steps per timed training measurement")
    parser.add_argument("--eval-batches", default="32,64,512")
    parser.add_argument("--eval-images", type=int, default=1024)
    parser.add_argument("--variants", default="fp32,fp32+cl,bf16+cl,bf16+cl+fold")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--e2e-only", action="store_true", help="skip the step/evaluation measurements")
    parser.add_argument("--reserved", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--e2e-rounds", type=int, default=2)
    parser.add_argument("--e2e-eval-batch", type=int, default=None,
                        help="eval batch of the auto run (default: the device's, evaluation.eval_batch_size)")
    return parser.parse_args(argv)


def images(kind: str, n: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g))
    from d3_plugin.data import load_dataset
    data = load_dataset("fashion_mnist", False, None)
    data = data.subset(torch.randperm(len(data), generator=g)[:n])
    rendered = torch.nn.functional.pad(data.images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # 28x28x1 → 32x32x3
    return ImageSet(rendered.contiguous(), data.labels)


def variant(name: str, device) -> Precision:
    precision, *options = name.split("+")
    return Precision(precision, device.type, "cl" in options)


def timed(fn, device, cpu_seconds=None) -> float:
    """Wall seconds of fn(); the process's CPU seconds are appended to `cpu_seconds` when given (a run
    paused by SIGSTOP on a shared machine shows up as wall time without CPU time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if cpu_seconds is not None:
        cpu_seconds.append(time.process_time() - cpu)
    return time.perf_counter() - start


def interleaved(measure, names, rounds):
    """{name: [seconds per round]}, every variant once per round, the order alternating."""
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else list(reversed(names))):
            times[name].append(measure(name))
    return times


def report(title, times, per_round_units, unit):
    base = times["fp32"]
    print(f"\n{title}")
    for name, seconds in times.items():
        ratios = [b / s for b, s in zip(base, seconds)]
        print(f"  {name:8s} median {statistics.median(seconds):7.3f} s = "
              f"{per_round_units / statistics.median(seconds):8.1f} {unit}/s   "
              f"fp32/{name} median ratio {statistics.median(ratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")


def micro(args, device):
    names = args.variants.split(",")
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, 3, 32).to(device)
    data = images(args.data, max(args.eval_images, args.train_batch * args.train_steps))
    train_loader = Loader(data.subset(range(args.train_batch * args.train_steps)), SPEC, args.train_batch,
                          device=device)
    train_batches = list(train_loader)
    optimizer = sgd(model.parameters(), 0.01)

    def train(name):
        mode = variant(name, device)
        with mode.formatted(model):
            train_epoch(model, train_batches[:1], optimizer, cross_entropy(), precision=mode)  # warm-up
            return timed(lambda: train_epoch(model, train_batches, optimizer, cross_entropy(), precision=mode),
                         device)

    times = interleaved(train, [n for n in names if "fold" not in n.split("+")], args.rounds)
    report(f"training step, batch {args.train_batch} ({args.train_steps} steps per round)", times,
           args.train_batch * args.train_steps, "img")

    test = data.subset(range(args.eval_images))
    for batch in (int(b) for b in args.eval_batches.split(",")):
        loader = Loader(test, SPEC, batch, device=device)
        warm = Loader(test.subset(range(min(batch, len(test)))), SPEC, batch, device=device)

        def evaluation(name):
            mode = variant(name, device)
            fold = "fold" in name.split("+")
            evaluate(model, warm, precision=mode, fold=fold)
            return timed(lambda: evaluate(model, loader, precision=mode, fold=fold), device)

        report(f"evaluation, batch {batch} ({args.eval_images} images per round)",
               interleaved(evaluation, names, args.rounds), args.eval_images, "img")


def end_to_end(args, device):
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, 3, 32).to(device)
    data = images(args.data, args.reserved + 2 * args.test_images, seed=1)
    reserved = data.subset(range(args.reserved))
    clean = data.subset(range(args.reserved, args.reserved + args.test_images))
    poisoned = data.subset(range(args.reserved + args.test_images, len(data)))
    poisoned = ImageSet(poisoned.images, torch.zeros(len(poisoned), dtype=torch.long), poisoned.labels,
                        torch.ones(len(poisoned), dtype=torch.bool))
    # fp32: the code before the precision option (contiguous fp32, evaluation at the training batch size,
    # unfolded, as the adapter did); auto: the defaults (bf16 + channels_last here, evaluation at
    # --e2e-eval-batch or the device's, BatchNorm folded)
    runs = {"fp32": dict(precision="fp32", channels_last=False, eval_batch_size=32),
            "auto": dict(precision="auto", eval_batch_size=args.e2e_eval_batch)}
    cpu = {name: [] for name in runs}

    def run(name):
        config = D3Config(epochs=args.epochs, batch_size=32, layers=default_layers("preactresnet18"), **runs[name])
        eval_batch = eval_batch_size(device, config.eval_batch_size)
        mode = resolve_precision(config.precision, device, model=model, channels_last=config.channels_last)
        tests = [Loader(d, SPEC, eval_batch, device=device) for d in (clean, poisoned)]
        batches = Loader(reserved, SPEC, config.batch_size, train=True, device=device, seed=0)
        on_epoch = (lambda epoch, m: evaluate(m, *tests, precision=mode, fold=name != "fp32"))
        seconds = timed(lambda: detoxify(model, batches, config, on_epoch=on_epoch), device, cpu[name])
        print(f"  e2e {name} ({mode.name}{'+cl' if mode.channels_last else ''}, eval batch {eval_batch}): "
              f"{seconds:.1f} s wall, {cpu[name][-1]:.1f} s CPU", flush=True)
        return seconds

    times = interleaved(run, list(runs), args.e2e_rounds)
    ratios = [a / b for a, b in zip(times["fp32"], times["auto"])]
    print(f"\nend to end: detoxify PreAct-ResNet18, {args.reserved} reserved images at batch 32, {args.epochs} "
          f"epochs, evaluate {args.test_images} clean + {args.test_images} poisoned images after every epoch")
    print(f"  fp32 median {statistics.median(times['fp32']):.1f} s, auto median "
          f"{statistics.median(times['auto']):.1f} s, fp32/auto median ratio {statistics.median(ratios):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    cpu_ratios = [a / b for a, b in zip(cpu["fp32"], cpu["auto"])]
    print(f"  CPU seconds: fp32/auto median ratio {statistics.median(cpu_ratios):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in cpu_ratios)})")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    auto = resolve_precision("auto", device, model=build_model("preactresnet18", 10, 3, 32))
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads; native CPU bf16: "
          f"{cpu_has_native_bf16()}; auto → {auto.name}{' + channels_last' if auto.channels_last else ''}")
    if not args.e2e_only:
        micro(args, device)
    if args.end_to_end or args.e2e_only:
        end_to_end(args, device)


if __name__ == "__main__":
    main()
