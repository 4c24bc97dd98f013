"""`d3-plugin attack <name>`: train a backdoored model on CPU/GPU and save a BackdoorBench record;
`d3-plugin attack sam-flatten --result_file X`: flatten an existing record's backdoor with (A)SAM;
`d3-plugin attack input-aware`: train the input-aware dynamic backdoor (classifier + trigger generator)."""
from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path
from typing import List

import torch

from .. import registry
from ..attacks import MODEL_LR, TrainConfig, default_lr, train_model
from ..attacks import input_aware as ia
from ..attacks.flatness import measure_flatness
from ..attacks.record import epoch_evaluator, flatness_batches, save_record
from ..attacks.registry import INPUT_AWARE, SAM_FLATTEN as FLATTEN, attacks, get_attack, resumes
from ..attacks.sam_flatten import FlattenConfig, sam_flatten
from ..data import load_dataset
from ..data.readers import dataset_spec
from ..models import build_model
from ..training import EpochCheckpoint, resolve_device, seed_everything

NAME = "attack"
HELP = "train a backdoor attack (or SAM-flatten one) and save it as a BackdoorBench record folder"
# the options that make a record: a checkpoint continues only a run made with the same ones
RECORD_OPTIONS = ("attack", "dataset", "data_root", "model", "epochs", "ratio", "target", "param", "train_size",
                  "lr", "batch_size", "seed", "rho", "sam_epochs", "plain_sam")
# input-aware config fields set by this command's own options, not by --param
INPUT_AWARE_OPTIONS = {"epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size", "seed": "--seed",
                       "ratio": "--ratio", "target": "--target", "eval_every": "--eval-every"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("attack", help=f"attack name ({', '.join(sorted(attacks()))}, {INPUT_AWARE}) or "
                                       f"{FLATTEN}")
    parser.add_argument("--out", required=True, help="record folder to write: <checkout>/record/<name>")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data_root", "--data-root", dest="data_root", default=None,
                        help="folder holding the dataset files")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {TrainConfig.epochs}; sam-flatten {FlattenConfig.epochs}; "
                             f"input-aware {ia.InputAwareConfig.epochs})")
    parser.add_argument("--ratio", type=float, default=None,
                        help="poisoning ratio (default: the attack's, 0.1; input-aware: ρ_b of every batch)")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="attack parameter, e.g. alpha=0.3 (repeatable; values parsed as YAML)")
    parser.add_argument("--train-size", type=int, default=None, help="train on a seeded subset of this size")
    per_model = "; ".join(f"{model} {lr}" for model, lr in MODEL_LR.items())
    parser.add_argument("--lr", type=float, default=None,
                        help=f"training lr (default {TrainConfig.lr}; {per_model}; sam-flatten {FlattenConfig.lr})")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="measure ACC / ASR / RA on the test sets every N epochs and after the last (default 1; "
                             "each measurement costs about a training epoch on a large model)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run with the same options from its last finished epoch (every "
                             "attack but input-aware saves one after each epoch); without it a killed run's "
                             "checkpoint is removed and training starts over")
    sam = parser.add_argument_group("SAM flattening")
    sam.add_argument("--result_file", "--result-file", dest="result_file", default=None,
                     help="sam-flatten: the record folder (or its attack_result.pt) to flatten")
    sam.add_argument("--rho", "--sam-rho", dest="rho", type=float, default=None,
                     help="SAM radius (adaptive SAM: 1–3 as in the paper); with an attack name: flatten after "
                          "training")
    sam.add_argument("--sam-epochs", type=int, default=FlattenConfig.epochs, help="SAM epochs after training an attack")
    sam.add_argument("--plain-sam", action="store_true", help="plain SAM instead of adaptive SAM (ASAM)")
    sam.add_argument("--hessian-iterations", type=int, default=20,
                     help="power iterations for the top Hessian eigenvalue (0: skip)")


def parse_params(pairs) -> dict:
    return dict(registry.parse_assignment(pair, "--param", "KEY=VALUE, e.g. alpha=0.3") for pair in pairs)


# option → (smallest allowed value, whether the smallest itself is allowed); None means "not given"
NUMBERS = {"epochs": (1, True), "ratio": (0, False), "train_size": (1, True), "lr": (0, False),
           "batch_size": (1, True), "target": (0, True), "rho": (0, False), "sam_epochs": (1, True),
           "hessian_iterations": (0, True), "eval_every": (1, True)}


def check_numbers(args) -> None:
    """Every numeric option is finite and in range (0 and negatives are errors, not "unset"), in one line."""
    for option, (least, inclusive) in NUMBERS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        ok = math.isfinite(value) and (value >= least if inclusive else value > least)
        if option == "ratio":
            ok = ok and value <= 1
        if not ok:
            bound = f"≥ {least}" if inclusive else f"> {least}"
            raise ValueError(f"--{option.replace('_', '-')} must be {bound}"
                             f"{' and ≤ 1' if option == 'ratio' else ''}, got {value}")


def run(args) -> int:
    check_numbers(args)
    if Path(args.out).parent.name != "record":
        raise ValueError(f"--out {args.out} must be <checkout>/record/<name> (BackdoorBench resolves the "
                         f"record's paths against the folder holding record/)")
    if args.resume and not resumes(args.attack):
        raise ValueError(f"{INPUT_AWARE} cannot resume a killed run (its trigger generator keeps no checkpoint); "
                         f"drop --resume")
    device = resolve_device(args.device)
    if not args.resume:
        _start_over(args.out)
    seed_everything(args.seed)
    if args.attack == FLATTEN:
        return _run_flatten(args, device)
    if args.result_file:
        raise ValueError("--result_file is only for `attack sam-flatten`; drop it or use sam-flatten")
    if args.attack == INPUT_AWARE:
        return _run_input_aware(args, device)
    return _run_attack(args, device)


def resume_files(out) -> List[Path]:
    """The epoch checkpoints of unfinished runs of the record `out`: hidden files beside it."""
    out = Path(out)
    return sorted(out.parent.glob(f".{out.name}.*.resume.pt"))


def phase_checkpoint(args, phase: str, source: str = "") -> EpochCheckpoint:
    """The checkpoint of one training phase (train / sam) of this run; `source`: the digest of the
    record a sam-flatten run starts from. Its name holds the hash of the options, so a run with other
    options starts afresh instead of continuing it."""
    options = {**{key: getattr(args, key) for key in RECORD_OPTIONS}, "source": source}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = f".{out.name}.{phase}-{registry.config_hash({'options': options, 'phase': phase})}.resume.pt"
    return EpochCheckpoint(out.parent / name, {"options": options, "phase": phase})


def _start_over(out) -> None:
    for path in resume_files(out):
        path.unlink()
        print(f"started over: removed {path}, the checkpoint of an unfinished run (--resume continues one)")


def _finished(out) -> None:
    for path in resume_files(out):  # the record is whole: nothing is left to resume
        path.unlink()


def _flatten(model, poisoned_train, spec, args, device, epochs, test, bd_test, source: str = ""):
    """(A)SAM-flatten `model`; returns (model, history, info) with the backdoor-loss flatness before and
    after, measured on a fixed sample of the poisoned test set."""
    config = FlattenConfig(rho=args.rho, adaptive=not args.plain_sam, epochs=epochs,
                           lr=FlattenConfig.lr if args.lr is None else args.lr, batch_size=args.batch_size,
                           seed=args.seed)
    batches = flatness_batches(bd_test, spec, device)
    before = measure_flatness(model, batches, hessian_iterations=args.hessian_iterations)
    model, history = sam_flatten(model, poisoned_train, spec, config, device=device,
                                 on_epoch=epoch_evaluator(test, bd_test, spec, device, "sam"),
                                 eval_every=eval_every(args), progress="sam",
                                 checkpoint=phase_checkpoint(args, "sam", source))
    for row in history:
        row.setdefault("phase", "sam")  # the epochs that were not measured
    after = measure_flatness(model, batches, hessian_iterations=args.hessian_iterations)
    print(f"backdoor-loss flatness before SAM: {_fmt(before)}\n                          after SAM: {_fmt(after)}")
    return model, history, {"sam": config.to_dict(), "flatness_before": before, "flatness_after": after}


def eval_every(args) -> int:
    return 1 if args.eval_every is None else args.eval_every


def _fmt(flatness: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in flatness.items())


def _run_attack(args, device) -> int:
    attack = get_attack(args.attack)
    params = parse_params(args.param)
    trigger_params, poison_params = attack.split_params(params)  # fail on unknown keys before loading data
    spec = dataset_spec(args.dataset)
    train, test, full_size = _load_data(args, spec)
    poisoned = attack.poison_train(train, ratio=args.ratio, target=args.target, seed=args.seed, **params)
    bd_test = attack.poison_test(test, target=args.target, **params)
    model = build_model(args.model, spec.num_classes, spec.channels, spec.size)
    config = TrainConfig(epochs=TrainConfig.epochs if args.epochs is None else args.epochs,
                         lr=default_lr(args.model) if args.lr is None else args.lr, batch_size=args.batch_size,
                         seed=args.seed)
    model, history = train_model(model, poisoned, spec, config, device=device,
                                 on_epoch=epoch_evaluator(test, bd_test, spec, device), eval_every=eval_every(args),
                                 progress=attack.name, checkpoint=phase_checkpoint(args, "train"))
    info = {"attack": attack.name, "params": {**trigger_params, **poison_params}, "target": args.target,
            "ratio": attack.ratio if args.ratio is None else args.ratio, "clean_label": attack.clean_label,
            "poisoned_samples": int(poisoned.poisoned.sum()), "train_size": len(train),
            "train": config.to_dict(), "model": args.model}
    if args.rho is not None:
        model, sam_history, sam_info = _flatten(model, poisoned, spec, args, device, args.sam_epochs, test, bd_test)
        history += sam_history
        info.update(sam_info)
    _report(history)
    save_record(args.out, model.cpu(), model_name=args.model, num_classes=spec.num_classes, spec=spec,
                poisoned_train=poisoned, bd_test=bd_test, history=history, info=info, clean_train_size=full_size,
                clean_test_size=len(test))
    _finished(args.out)
    print(f"saved {Path(args.out) / 'attack_result.pt'}")
    return 0


def _load_data(args, spec):
    """(training set, optionally a seeded subset; test set; size of the full training split)."""
    train, test = load_dataset(spec.name, True, args.data_root), load_dataset(spec.name, False, args.data_root)
    full_size = len(train)
    if args.train_size is not None:
        if args.train_size > full_size:
            raise ValueError(f"--train-size {args.train_size} is larger than the {full_size} training images")
        order = torch.randperm(full_size, generator=torch.Generator().manual_seed(args.seed))
        train = train.subset(order[:args.train_size].sort().values)
    return train, test, full_size


def input_aware_config(args) -> "ia.InputAwareConfig":
    """The input-aware settings: config defaults < --param KEY=VALUE < this command's own options."""
    params = parse_params(args.param)
    known = ia.InputAwareConfig.field_names()
    unknown = sorted(set(params) - set(known))
    if unknown:
        free = ", ".join(k for k in known if k not in INPUT_AWARE_OPTIONS)
        raise ValueError(f"attack {INPUT_AWARE!r} has no parameter {', '.join(unknown)}; known: {free}")
    owned = sorted(set(params) & set(INPUT_AWARE_OPTIONS))
    if owned:
        raise ValueError(f"set {', '.join(owned)} with {', '.join(INPUT_AWARE_OPTIONS[k] for k in owned)}, "
                         f"not --param")
    defaults = ia.InputAwareConfig().to_dict()
    for key, value in params.items():  # YAML reads 1e-3 as a string; a float field takes it as the number
        if isinstance(defaults[key], float) and isinstance(value, str):
            try:
                params[key] = float(value)
            except ValueError:
                pass
    values = {**params, "batch_size": args.batch_size, "seed": args.seed, "target": args.target}
    for key in ("epochs", "lr", "ratio", "eval_every"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return ia.InputAwareConfig(**values)


def _run_input_aware(args, device) -> int:
    """Train classifier + trigger generator, materialise the per-image triggers, save the record (and G, M)."""
    config = input_aware_config(args)  # fail on bad parameters before loading data
    spec = dataset_spec(args.dataset)
    if config.target >= spec.num_classes:
        raise ValueError(f"--target {config.target} is not a class of {spec.name} (0–{spec.num_classes - 1})")
    train, test, full_size = _load_data(args, spec)
    model = build_model(args.model, spec.num_classes, spec.channels, spec.size)
    evaluator = ia.epoch_evaluator(test, spec, device, config.target)
    model, trigger, history = ia.input_aware(model, train, spec, config, device=device, on_epoch=evaluator,
                                             progress=INPUT_AWARE)
    mask_rows = [row for row in history if row.get("phase") == "mask"]
    history = [row for row in history if row.get("phase") != "mask"]
    bd_test = evaluator.bd_test  # made with the final G after the last epoch: the set the ASR was measured on
    poisoned = ia.poisoned_training_set(train, trigger, config)
    modified = int(poisoned.poisoned.sum())
    relabelled = int((poisoned.poisoned & (poisoned.labels != poisoned.original_labels)).sum())
    masks = trigger.masks(test.images[:1000])
    info = {"attack": INPUT_AWARE, "params": config.to_dict(), "target": config.target, "ratio": config.ratio,
            "cross_ratio": config.cross_ratio, "clean_label": False, "poisoned_samples": modified,
            "backdoor_samples": relabelled, "cross_samples": modified - relabelled, "train_size": len(train),
            "model": args.model, "mask_pretraining": mask_rows, "mask_mean": float(masks.mean()),
            "mask_pixels_over_half": float((masks > 0.5).flatten(1).sum(1).float().mean()),
            "cross_acc": history[-1].get("cross_acc"), "trigger_networks": ia.NETWORKS_FILE}
    if args.rho is not None:
        model, sam_history, sam_info = _flatten(model, poisoned, spec, args, device, args.sam_epochs, test, bd_test)
        history += sam_history
        info.update(sam_info)
    _report(history)
    print(f"cross-trigger ACC {info['cross_acc']:.2%} (another image's trigger; true labels kept)"
          f"{' before SAM' if args.rho is not None else ''}")
    save_record(args.out, model.cpu(), model_name=args.model, num_classes=spec.num_classes, spec=spec,
                poisoned_train=poisoned, bd_test=bd_test, history=history, info=info, clean_train_size=full_size,
                clean_test_size=len(test))
    trigger.save(Path(args.out) / ia.NETWORKS_FILE, config)
    _finished(args.out)
    print(f"saved {Path(args.out) / 'attack_result.pt'}")
    return 0


def _run_flatten(args, device) -> int:
    from ..record_io.records import load_attack_result, model_from_record

    if not args.result_file or args.rho is None:
        raise ValueError("sam-flatten needs --result_file <record folder> and --rho (e.g. 2.0)")
    record = load_attack_result(args.result_file, args.data_root)
    if record.bd_train is None:
        raise ValueError(f"{args.result_file} holds no poisoned training set (bd_train); flatten a record "
                         f"that has one")
    model = model_from_record(record).to(device)
    epochs = FlattenConfig.epochs if args.epochs is None else args.epochs
    pt = Path(args.result_file)
    source = hashlib.sha256((pt / "attack_result.pt" if pt.is_dir() else pt).read_bytes()).hexdigest()
    model, history, info = _flatten(model, record.bd_train, record.spec, args, device, epochs,
                                    record.clean_test, record.bd_test, source)
    info.update({"source_record": str(record.folder), "model": record.model_name})
    _report(history)
    save_record(args.out, model.cpu(), model_name=record.model_name, num_classes=record.num_classes,
                spec=record.spec, poisoned_train=record.bd_train, bd_test=record.bd_test, history=history,
                info=info, clean_train_size=len(record.clean_train), clean_test_size=len(record.clean_test))
    _finished(args.out)
    print(f"saved {Path(args.out) / 'attack_result.pt'}")
    return 0


def _report(history) -> None:
    last = history[-1]
    print(f"ACC {last['acc']:.2%}  ASR {last['asr']:.2%}  RA {last['ra']:.2%}")
