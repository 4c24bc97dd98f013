"""Why D3's result on a BackdoorBench record changes from seed to seed: one JSON line per run (not a test).

    .venv/bin/python benchmarks/d3_stability.py /work/bb/record/fmnist_blended --seeds 0,1,2 --layers linear

For each seed: BackdoorBench's reserved draw (5 %, `--draw` fixes it while the seed still changes the
warm start and the shuffling), then `detoxify` at the issue's budget (20 epochs, batch 32, λ 10, ε 0.1,
precision auto). Printed per run: ACC / ASR every `--every` epochs and at the end, the cosine between
the final and the initial θs (per selected weight) and between the penultimate features of the model
before and after (64 reserved images), and the test-free probe (`d3_plugin.probe`) on the two classes
the probe finds easiest to reach on the input model.

Test data are only read for the report, and only their DEV half (even indices of the clean test set and
of the poisoned test set), so that the other half stays unseen by any choice made from these runs.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from d3_plugin.bench import poisoned_only
from d3_plugin.record_io.records import load_attack_result, model_from_record
from d3_plugin.record_io.reserved import reserved_indices
import d3_plugin.d3 as d3_module
from d3_plugin.d3 import D3Config, detoxify, select_weights
from d3_plugin.data import Loader
from d3_plugin.evaluation import evaluate
from d3_plugin.adversarial import InputBox
from d3_plugin.probe import ProbeConfig, class_scores, universal_perturbation
from d3_plugin.training import seed_everything


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record", help="record folder (record/<attack>) of a BackdoorBench checkout")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draw", type=int, help="fix the reserved draw's seed (default: the run's seed)")
    parser.add_argument("--layers", default="linear", help="θs, comma-separated module names")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--warm", default="random", help="warm start: random | near | middle | far | noise")
    parser.add_argument("--every", type=int, default=4, help="evaluate on the dev half every N epochs")
    parser.add_argument("--probe_eps", type=float, default=0.1, help="probe's L∞ budget in pixel units")
    parser.add_argument("--suspected", help="classes to probe after each run, e.g. 0,9 (default: the two the "
                        "probe finds easiest on the input model, which costs a full-class probe)")
    parser.add_argument("--half", choices=("dev", "test"), default="dev",
                        help="dev: even test indices (used to choose settings); test: odd ones (to report them)")
    parser.add_argument("--transfer", action="store_true", help="also track the transfer probe (costs ~3 min)")
    parser.add_argument("--distance", choices=("signed", "unsigned"), default="signed",
                        help="unsigned: Σ min(‖W − W_init‖, ‖W + W_init‖), whose farthest points are orthogonal to "
                             "W_init instead of −W_init (an experiment; d3.distance is swapped for the run)")
    parser.add_argument("--precision", default="auto", help="D3's training precision: auto | bf16 | fp16 | fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="")
    return parser.parse_args(argv)


def test_half(record, half="dev"):
    """The even-indexed (dev) or odd-indexed (test) halves of the clean and poisoned test sets, as loaders."""
    start = 0 if half == "dev" else 1
    backdoor = poisoned_only(record.bd_test)
    clean = record.clean_test.subset(torch.arange(start, len(record.clean_test), 2))
    return (Loader(clean, record.spec, 512),
            Loader(backdoor.subset(torch.arange(start, len(backdoor), 2)), record.spec, 512))


def feature_cosine(before, after, inputs) -> float:
    """Mean cosine between the inputs of the `linear` head of two models (penultimate features)."""
    features = {}
    hooks = [model.linear.register_forward_pre_hook(lambda _, args, key=key: features.__setitem__(key, args[0]))
             for key, model in (("before", before), ("after", after))]
    with torch.no_grad():
        before.eval()(inputs), after.eval()(inputs)
    for hook in hooks:
        hook.remove()
    return F.cosine_similarity(features["before"].flatten(1), features["after"].flatten(1), dim=1).mean().item()


def transfer_perturbations(model, held, spec, classes, budgets):
    """δ_c fitted on the INPUT model for each suspected class c and L∞ budget: a stand-in for its trigger."""
    inputs, labels = next(iter(held))
    box = InputBox.from_spec(spec)
    deltas = {}
    for eps in budgets:
        config = ProbeConfig(eps=eps, steps=20, step_size=eps / 5)
        for c in classes:
            deltas[(c, eps)] = universal_perturbation(model.eval(), inputs[labels != c], c, box, config)
    return inputs, labels, box, deltas


def transfer_scores(model, transfer):
    """Fraction of held images (y ≠ c) that δ_c, fitted on the input model, still sends to c."""
    inputs, labels, box, deltas = transfer
    model.eval()
    with torch.no_grad():
        return {f"{c}@{eps}": round((model(box.clamp(inputs[labels != c] + d)).argmax(1) == c).float().mean().item(), 3)
                for (c, eps), d in deltas.items()}


def weight_cosines(before, after, layers):
    initial, final = select_weights(before, layers), select_weights(after, layers)
    return {name: round(F.cosine_similarity(initial[name].flatten(), final[name].flatten(), dim=0).item(), 3)
            for name in initial}


def one_run(args, record, model, tests, seed, suspected, probe, transfer):
    draw = seed if args.draw is None else args.draw
    seed_everything(seed)
    reserved = record.clean_train.subset(reserved_indices(len(record.clean_train), 0.05, None, draw))
    layers = args.layers.split(",")
    config = D3Config(lam=args.lam, epochs=args.epochs, lr=args.lr, batch_size=32, seed=seed, warm_start=args.warm,
                      layers=layers, eval_every=args.every, precision=args.precision)
    started = time.time()
    def track(_, m):
        row = {k: v for k, v in evaluate(m, *tests, precision=args.precision).items() if k in ("acc", "asr")}
        return {**row, "transfer": transfer_scores(m, transfer)} if transfer else row
    purified, history = detoxify(model, Loader(reserved, record.spec, 32, train=True, seed=seed), config, on_epoch=track)
    held = Loader(reserved.subset(torch.arange(64)), record.spec, 64)
    return {"tag": args.tag, "half": args.half, "record": str(record.folder), "seed": seed, "draw": draw, "layers": args.layers,
            "lr": args.lr, "lam": args.lam, "warm": args.warm, "precision": args.precision, "distance": args.distance, "epochs": args.epochs,
            "seconds": round(time.time() - started, 1), "acc": round(history[-1]["acc"], 4),
            "asr": round(history[-1]["asr"], 4),
            "curve": [(row["epoch"], round(row["acc"], 3), round(row["asr"], 3), row.get("transfer"))
                      for row in history if "acc" in row],
            "weight_cos": weight_cosines(model, purified, layers),
            "feature_cos": round(feature_cosine(model, purified, next(iter(held))[0]), 3),
            "probe": {c: round(v, 3) for c, v in class_scores(purified, held, record.spec, probe, suspected).items()}}


def unsigned_distance(weights, initial):
    """Σ min(‖W − W_init‖_F, ‖W + W_init‖_F): far from W_init and from its mirror −W_init."""
    return sum(torch.minimum(torch.linalg.vector_norm(w - initial[n]), torch.linalg.vector_norm(w + initial[n]))
               for n, w in weights.items())


def main(argv=None):
    args = parse_args(argv)
    if args.distance == "unsigned":
        d3_module.distance = unsigned_distance
    torch.set_num_threads(args.threads)
    record = load_attack_result(args.record)
    model, tests = model_from_record(record), test_half(record, args.half)
    probe = ProbeConfig(eps=args.probe_eps, steps=10, step_size=args.probe_eps / 5)
    held = Loader(record.clean_train.subset(reserved_indices(len(record.clean_train), 0.05, None, 0)[:64]),
                  record.spec, 64)
    if args.suspected:
        scores, suspected = {}, [int(c) for c in args.suspected.split(",")]
    else:
        scores = class_scores(model, held, record.spec, probe)
        suspected = sorted(scores, key=scores.get)[-2:]
    print(json.dumps({"record": str(record.folder), "before": evaluate(model, *tests, precision="auto"),
                      "probe_all": {c: round(v, 3) for c, v in scores.items()}, "suspected": suspected}), flush=True)
    transfer = None
    if args.transfer:
        spare = Loader(record.clean_train.subset(reserved_indices(len(record.clean_train), 0.05, None, 1000)[:128]),
                       record.spec, 128)  # another draw: mostly images no run trains on
        transfer = transfer_perturbations(model, spare, record.spec, suspected, (0.05, 0.1))
        print(json.dumps({"transfer_before": transfer_scores(model, transfer)}), flush=True)
    for seed in map(int, args.seeds.split(",")):
        print(json.dumps(one_run(args, record, model, tests, seed, suspected, probe, transfer)), flush=True)


if __name__ == "__main__":
    main()
