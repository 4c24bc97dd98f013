"""Make a BackdoorBench attack record from a typed spec: train an attack (a trigger attack of the registry, or
input-aware: classifier and trigger generator), optionally (A)SAM-flatten it after training, or flatten an
existing record (sam-flatten). `d3-plugin attack` and the grid both call `make_record`."""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional

import torch

from .. import registry
from ..data import load_dataset
from ..data.readers import dataset_spec
from ..models import build_model
from ..record_io.records import load_attack_result, model_from_record
from ..training import EpochCheckpoint, resolve_device, seed_everything
from . import input_aware as ia
from .flatness import measure_flatness
from .record import epoch_evaluator, flatness_batches, save_record
from .registry import INPUT_AWARE, SAM_FLATTEN, get_attack, resumes
from .sam_flatten import FlattenConfig, sam_flatten
from .training import TrainConfig, default_lr, train_model

# the options that make a record: a checkpoint continues only a run made with the same ones
RECORD_OPTIONS = ("attack", "dataset", "data_root", "model", "epochs", "ratio", "target", "params", "train_size",
                  "lr", "batch_size", "seed", "rho", "sam_epochs", "plain_sam")
# input-aware config fields set by the spec's own options, not by `params` (value: the command-line option)
INPUT_AWARE_OPTIONS = {"epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size", "seed": "--seed",
                       "ratio": "--ratio", "target": "--target", "eval_every": "--eval-every"}


@dataclass(frozen=True)
class AttackSpec:
    """One record to make. None: the attack's own default (epochs: TrainConfig's, sam-flatten's or
    input-aware's; ratio: the attack's; lr: by architecture, `default_lr`; eval_every: 1)."""

    attack: str
    out: str                                  # <checkout>/record/<name>
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    model: str = "small_cnn"
    epochs: Optional[int] = None
    ratio: Optional[float] = None
    target: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)  # the attack's parameters, e.g. {"alpha": 0.3}
    train_size: Optional[int] = None          # a seeded subset of the training set
    lr: Optional[float] = None
    batch_size: int = TrainConfig.batch_size
    seed: int = 0
    device: str = "auto"
    eval_every: Optional[int] = None          # measure ACC / ASR / RA every N epochs and after the last
    resume: bool = False                      # continue a killed run with the same options
    result_file: Optional[str] = None         # sam-flatten: the record to flatten
    rho: Optional[float] = None               # SAM radius; with a trained attack: flatten after training
    sam_epochs: int = FlattenConfig.epochs
    plain_sam: bool = False
    hessian_iterations: int = 20              # power iterations for the top Hessian eigenvalue (0: skip)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(AttackSpec))
INTEGER_OPTIONS = ("epochs", "target", "train_size", "batch_size", "seed", "eval_every", "sam_epochs",
                   "hessian_iterations")
NUMBER_OPTIONS = ("ratio", "lr", "rho")


def spec_from_values(values: Mapping[str, Any]) -> AttackSpec:
    """An AttackSpec from loosely typed values (a grid file's): a number written as text (YAML reads 1e-3 as
    a string) is read as the number; anything else of the wrong kind is refused in one line."""
    return AttackSpec(**{name: _typed(name, value) for name, value in values.items()})


def _typed(name: str, value: Any) -> Any:
    if value is None or name not in INTEGER_OPTIONS + NUMBER_OPTIONS:
        return value
    try:
        number = float(value) if name in NUMBER_OPTIONS else int(str(value).strip())
    except ValueError:
        number = None
    if isinstance(value, bool) or number is None or (name in INTEGER_OPTIONS and isinstance(value, float)):
        kind = "an integer" if name in INTEGER_OPTIONS else "a number"
        raise ValueError(f"--{name.replace('_', '-')} must be {kind}, got {value!r}")
    return number


# option → (smallest allowed value, whether the smallest itself is allowed); None means "not given"
NUMBERS = {"epochs": (1, True), "ratio": (0, False), "train_size": (1, True), "lr": (0, False),
           "batch_size": (1, True), "target": (0, True), "rho": (0, False), "sam_epochs": (1, True),
           "hessian_iterations": (0, True), "eval_every": (1, True)}


def check_numbers(options) -> None:
    """Every numeric option is finite and in range (0 and negatives are errors, not "unset"), in one line."""
    for option, (least, inclusive) in NUMBERS.items():
        value = getattr(options, option, None)
        if value is None:
            continue
        ok = math.isfinite(value) and (value >= least if inclusive else value > least)
        if option == "ratio":
            ok = ok and value <= 1
        if not ok:
            bound = f"≥ {least}" if inclusive else f"> {least}"
            raise ValueError(f"--{option.replace('_', '-')} must be {bound}"
                             f"{' and ≤ 1' if option == 'ratio' else ''}, got {value}")


def make_record(options: AttackSpec) -> Path:
    """Make the record `options.out` (one-line ValueError for bad options, before any data is read)."""
    check_numbers(options)
    if Path(options.out).parent.name != "record":
        raise ValueError(f"--out {options.out} must be <checkout>/record/<name> (BackdoorBench resolves the "
                         f"record's paths against the folder holding record/)")
    if options.resume and not resumes(options.attack):
        raise ValueError(f"{INPUT_AWARE} cannot resume a killed run (its trigger generator keeps no checkpoint); "
                         f"drop --resume")
    device = resolve_device(options.device)
    if not options.resume:
        _start_over(options.out)
    seed_everything(options.seed)
    if options.attack == SAM_FLATTEN:
        return _run_flatten(options, device)
    if options.result_file:
        raise ValueError("--result_file is only for `attack sam-flatten`; drop it or use sam-flatten")
    if options.attack == INPUT_AWARE:
        return _run_input_aware(options, device)
    return _run_attack(options, device)


def resume_files(out) -> List[Path]:
    """The epoch checkpoints of unfinished runs of the record `out`: hidden files beside it."""
    out = Path(out)
    return sorted(out.parent.glob(f".{out.name}.*.resume.pt"))


def phase_checkpoint(options, phase: str, source: str = "") -> EpochCheckpoint:
    """The checkpoint of one training phase (train / sam) of this run; `source`: the digest of the
    record a sam-flatten run starts from. Its name holds the hash of the options, so a run with other
    options starts afresh instead of continuing it."""
    made_with = {**{key: getattr(options, key) for key in RECORD_OPTIONS}, "source": source}
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = f".{out.name}.{phase}-{registry.config_hash({'options': made_with, 'phase': phase})}.resume.pt"
    return EpochCheckpoint(out.parent / name, {"options": made_with, "phase": phase})


def _start_over(out) -> None:
    for path in resume_files(out):
        path.unlink()
        print(f"started over: removed {path}, the checkpoint of an unfinished run (--resume continues one)")


def _finished(out) -> None:
    for path in resume_files(out):  # the record is whole: nothing is left to resume
        path.unlink()


def _flatten(model, poisoned_train, spec, options, device, epochs, test, bd_test, source: str = ""):
    """(A)SAM-flatten `model`; returns (model, history, info) with the backdoor-loss flatness before and
    after, measured on a fixed sample of the poisoned test set."""
    config = FlattenConfig(rho=options.rho, adaptive=not options.plain_sam, epochs=epochs,
                           lr=FlattenConfig.lr if options.lr is None else options.lr, batch_size=options.batch_size,
                           seed=options.seed)
    batches = flatness_batches(bd_test, spec, device)
    before = measure_flatness(model, batches, hessian_iterations=options.hessian_iterations)
    model, history = sam_flatten(model, poisoned_train, spec, config, device=device,
                                 on_epoch=epoch_evaluator(test, bd_test, spec, device, "sam"),
                                 eval_every=eval_every(options), progress="sam",
                                 checkpoint=phase_checkpoint(options, "sam", source))
    for row in history:
        row.setdefault("phase", "sam")  # the epochs that were not measured
    after = measure_flatness(model, batches, hessian_iterations=options.hessian_iterations)
    print(f"backdoor-loss flatness before SAM: {_fmt(before)}\n                          after SAM: {_fmt(after)}")
    return model, history, {"sam": config.to_dict(), "flatness_before": before, "flatness_after": after}


def eval_every(options) -> int:
    return 1 if options.eval_every is None else options.eval_every


def _fmt(flatness: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in flatness.items())


def _run_attack(options, device) -> Path:
    attack = get_attack(options.attack)
    params = dict(options.params)
    trigger_params, poison_params = attack.split_params(params)  # fail on unknown keys before loading data
    spec = dataset_spec(options.dataset)
    train, test, full_size = _load_data(options, spec)
    poisoned = attack.poison_train(train, ratio=options.ratio, target=options.target, seed=options.seed, **params)
    bd_test = attack.poison_test(test, target=options.target, **params)
    model = build_model(options.model, spec.num_classes, spec.channels, spec.size)
    config = TrainConfig(epochs=TrainConfig.epochs if options.epochs is None else options.epochs,
                         lr=default_lr(options.model) if options.lr is None else options.lr, batch_size=options.batch_size,
                         seed=options.seed)
    model, history = train_model(model, poisoned, spec, config, device=device,
                                 on_epoch=epoch_evaluator(test, bd_test, spec, device), eval_every=eval_every(options),
                                 progress=attack.name, checkpoint=phase_checkpoint(options, "train"))
    info = {"attack": attack.name, "params": {**trigger_params, **poison_params}, "target": options.target,
            "ratio": attack.ratio if options.ratio is None else options.ratio, "clean_label": attack.clean_label,
            "poisoned_samples": int(poisoned.poisoned.sum()), "train_size": len(train),
            "train": config.to_dict(), "model": options.model}
    if options.rho is not None:
        model, sam_history, sam_info = _flatten(model, poisoned, spec, options, device, options.sam_epochs, test, bd_test)
        history += sam_history
        info.update(sam_info)
    _report(history)
    save_record(options.out, model.cpu(), model_name=options.model, num_classes=spec.num_classes, spec=spec,
                poisoned_train=poisoned, bd_test=bd_test, history=history, info=info, clean_train_size=full_size,
                clean_test_size=len(test))
    _finished(options.out)
    print(f"saved {Path(options.out) / 'attack_result.pt'}")
    return Path(options.out)


def _load_data(options, spec):
    """(training set, optionally a seeded subset; test set; size of the full training split)."""
    train, test = load_dataset(spec.name, True, options.data_root), load_dataset(spec.name, False, options.data_root)
    full_size = len(train)
    if options.train_size is not None:
        if options.train_size > full_size:
            raise ValueError(f"--train-size {options.train_size} is larger than the {full_size} training images")
        order = torch.randperm(full_size, generator=torch.Generator().manual_seed(options.seed))
        train = train.subset(order[:options.train_size].sort().values)
    return train, test, full_size


def input_aware_config(options: AttackSpec) -> "ia.InputAwareConfig":
    """The input-aware settings: config defaults < --param KEY=VALUE < this command's own options."""
    params = dict(options.params)
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
    values = {**params, "batch_size": options.batch_size, "seed": options.seed, "target": options.target}
    for key in ("epochs", "lr", "ratio", "eval_every"):
        if getattr(options, key) is not None:
            values[key] = getattr(options, key)
    return ia.InputAwareConfig(**values)


def _run_input_aware(options, device) -> Path:
    """Train classifier + trigger generator, materialise the per-image triggers, save the record (and G, M)."""
    config = input_aware_config(options)  # fail on bad parameters before loading data
    spec = dataset_spec(options.dataset)
    if config.target >= spec.num_classes:
        raise ValueError(f"--target {config.target} is not a class of {spec.name} (0–{spec.num_classes - 1})")
    train, test, full_size = _load_data(options, spec)
    model = build_model(options.model, spec.num_classes, spec.channels, spec.size)
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
            "model": options.model, "mask_pretraining": mask_rows, "mask_mean": float(masks.mean()),
            "mask_pixels_over_half": float((masks > 0.5).flatten(1).sum(1).float().mean()),
            "cross_acc": history[-1].get("cross_acc"), "trigger_networks": ia.NETWORKS_FILE}
    if options.rho is not None:
        model, sam_history, sam_info = _flatten(model, poisoned, spec, options, device, options.sam_epochs, test, bd_test)
        history += sam_history
        info.update(sam_info)
    _report(history)
    print(f"cross-trigger ACC {info['cross_acc']:.2%} (another image's trigger; true labels kept)"
          f"{' before SAM' if options.rho is not None else ''}")
    save_record(options.out, model.cpu(), model_name=options.model, num_classes=spec.num_classes, spec=spec,
                poisoned_train=poisoned, bd_test=bd_test, history=history, info=info, clean_train_size=full_size,
                clean_test_size=len(test))
    trigger.save(Path(options.out) / ia.NETWORKS_FILE, config)
    _finished(options.out)
    print(f"saved {Path(options.out) / 'attack_result.pt'}")
    return Path(options.out)


def _run_flatten(options, device) -> Path:
    if not options.result_file or options.rho is None:
        raise ValueError("sam-flatten needs --result_file <record folder> and --rho (e.g. 2.0)")
    record = load_attack_result(options.result_file, options.data_root)
    if record.bd_train is None:
        raise ValueError(f"{options.result_file} holds no poisoned training set (bd_train); flatten a record "
                         f"that has one")
    model = model_from_record(record).to(device)
    epochs = FlattenConfig.epochs if options.epochs is None else options.epochs
    pt = Path(options.result_file)
    source = hashlib.sha256((pt / "attack_result.pt" if pt.is_dir() else pt).read_bytes()).hexdigest()
    model, history, info = _flatten(model, record.bd_train, record.spec, options, device, epochs,
                                    record.clean_test, record.bd_test, source)
    info.update({"source_record": str(record.folder), "model": record.model_name})
    _report(history)
    save_record(options.out, model.cpu(), model_name=record.model_name, num_classes=record.num_classes,
                spec=record.spec, poisoned_train=record.bd_train, bd_test=record.bd_test, history=history,
                info=info, clean_train_size=len(record.clean_train), clean_test_size=len(record.clean_test))
    _finished(options.out)
    print(f"saved {Path(options.out) / 'attack_result.pt'}")
    return Path(options.out)


def _report(history) -> None:
    last = history[-1]
    print(f"ACC {last['acc']:.2%}  ASR {last['asr']:.2%}  RA {last['ra']:.2%}")
