"""D3 as a BackdoorBench defense class: drop-in for `defense/<name>.py` scripts, and an entry point.

    parser = argparse.ArgumentParser(); d3.add_arguments(parser); args = parser.parse_args()
    d3(args).defense(args.result_file)     # from a BackdoorBench checkout root

The class follows BackdoorBench's defense interface (add_arguments, __init__(args), set_result,
set_logger, set_trainer, mitigation, defense) and subclasses its `defense.base.defense` when that is
importable. It reads only `self.args`. The algorithm is `d3_plugin.d3.detoxify`; this module only maps
BackdoorBench's settings onto `D3Config`, feeds it the reserved clean set, and writes BackdoorBench's
result files: record/<attack>/defense/d3/{defense_result.pt, d3_df.csv, d3_df_summary.csv,
acc_like_metric_plots.png, loss_metric_plots.png, d3_summary.json, log/index.txt, log/<time>.log}.

Speed settings (defaults in `D3Config`):
- precision (`--precision auto|bf16|fp16|fp32`, default auto; `d3_plugin.precision`). BackdoorBench's
  `--amp True` means auto (mixed precision where the device has it), `--amp False` means fp32.
  `--precision` beats `--amp`, and the command line beats the YAML: command-line precision, then
  command-line amp, then YAML precision, then YAML amp, then the default auto.
- `--eval_every N` (default 1): evaluate ACC/ASR/RA after every N-th epoch and always after the last.
  d3_df.csv keeps one row per epoch; a skipped epoch's row carries its training loss only (its test
  columns are empty cells), so `last` in d3_df_summary.csv is the last epoch's evaluation and
  `valid_max` the best evaluated value. Checkpoints (`frequency_save`) are written at evaluated epochs,
  so frequency_save must be a multiple of eval_every.
- `--eval_batch_size` (default 512): batch size of the test-set passes (before, every evaluated epoch).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from pprint import pformat
from typing import Dict, List, Optional

import torch
import yaml

from .. import __version__
from ..d3 import PRESETS, D3Config, detoxify
from ..errors import INPUT_ERRORS, INPUT_ERROR_STATUS, INTERRUPTED_STATUS, one_line
from ..data import Loader
from ..data.readers import dataset_spec
from ..evaluation import defense_effectiveness_rate, evaluate
from ..models import default_layers
from ..precision import PRECISIONS, resolve_precision
from ..training import resolve_device, seed_everything
from . import outputs
from .records import (align_state_dict, load_attack_result, load_model_checkpoint, model_from_record,
                      write_defense_result)
from .reserved import reserved_indices

try:  # inside a BackdoorBench checkout (cwd on sys.path) subclass its stub base class
    from defense.base import defense as _BackdoorBenchDefense
    if not isinstance(_BackdoorBenchDefense, type):
        raise ImportError
except Exception:  # noqa: BLE001 - any failure just means "not in a BackdoorBench checkout"
    _BackdoorBenchDefense = object

NAME = "d3"
DEFAULT_YAML = "./config/defense/d3/config.yaml"
LOG_FORMAT = "%(asctime)s [%(levelname)-8s] [%(filename)s:%(lineno)d] %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d:%H:%M:%S"
logger = logging.getLogger("d3_plugin.backdoorbench")


def _flag(text) -> bool:
    """BackdoorBench's boolean options: True/true/1 are true, anything else false."""
    return str(text) in ("True", "true", "1")


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else _flag(value)


def _positive(option: str):
    """A converter to a positive int whose error names the option."""
    def convert(value) -> int:
        try:
            number = int(value)
            if number != float(value) or number < 1 or isinstance(value, bool):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"--{option} must be a positive integer, got {value!r}; pass e.g. --{option} 1") from None
        return number
    return convert


def read_yaml(path) -> dict:
    """A defense config file as a dict; one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; pass --yaml_path (e.g. "
                                f"./config/defense/d3/cifar10.yaml after `d3-plugin install .`)")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML ({str(error).splitlines()[0]}); fix it") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value; fix it")
    return loaded


def record_location(result_file: str) -> Path:
    """`result_file` as BackdoorBench means it (a folder name under ./record) or a path to a record folder."""
    given = Path(result_file)
    if given.name == "attack_result.pt":
        return given.parent
    if (given / "attack_result.pt").is_file() or given.is_absolute():
        return given
    return Path("record") / result_file


@contextlib.contextmanager
def one_line_errors(program: str = "d3"):
    """Turn input errors into one line on stderr and exit status 2, Ctrl-C into one line and 130 (for scripts)."""
    try:
        yield
    except INPUT_ERRORS as error:
        print(f"{program}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(INPUT_ERROR_STATUS)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; no results were written (an earlier complete run is kept)", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)


class d3(_BackdoorBenchDefense):  # noqa: N801 - BackdoorBench names defense classes after their scripts
    """D3 with BackdoorBench's defense interface (see the module docstring)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Every option defaults to None (so the YAML decides) except --yaml_path."""
        add = parser.add_argument
        add("--device", type=str, help="auto (cuda when present), cpu, cuda, cuda:N")
        add("-pm", "--pin_memory", type=_flag, help="accepted for compatibility (tensor loader)")
        add("-nb", "--non_blocking", type=_flag, help="accepted for compatibility")
        add("-pf", "--prefetch", type=_flag, help="accepted for compatibility")
        add("--amp", type=_flag, help="True: mixed precision (= --precision auto); False: fp32 unless --precision "
            "says otherwise")
        add("--precision", type=str, help=f"{' | '.join(PRECISIONS)} (default auto: bf16 on CPUs with native "
            "bf16 and bf16 GPUs, fp16 on older GPUs, else fp32); beats --amp")
        add("--eval_every", type=int, help="evaluate every N epochs and after the last (default 1: every epoch)")
        add("--eval_batch_size", type=int, help="batch size of test-set evaluation (default 512)")
        add("--checkpoint_load", type=str, help="model checkpoint to purify instead of the record's model")
        add("--checkpoint_save", type=str, help="folder for per-epoch checkpoints (default save_path/checkpoint)")
        add("--log", type=str, help="folder for the log and index.txt (default save_path/log)")
        add("--dataset_path", type=str, help="BackdoorBench's data folder (informational; see --data_root)")
        add("--data_root", type=str, help="dataset folder to use instead of the record's data_path")
        add("--dataset", type=str, help="mnist, cifar10, cifar100, gtsrb, tiny, fashion_mnist (must match the record)")
        add("--result_file", type=str, help="attack folder under ./record, or a path to a record folder")
        add("--epochs", type=int)
        add("--batch_size", type=int)
        add("--num_workers", type=float, help="accepted for compatibility")
        add("--lr", type=float)
        add("--lr_scheduler", type=str, help="CosineAnnealingLR (the only schedule D3 uses)")
        add("--model", type=str, help="must match the record's model_name")
        add("--client_optimizer", type=str, help="sgd (the only optimizer D3 uses)")
        add("--sgd_momentum", type=float)
        add("--wd", type=float, help="weight decay of sgd")
        add("--frequency_save", type=int, help="save a checkpoint every N epochs, 0 is never")
        add("--random_seed", type=int, help="seeds the reserved-set draw, warm start and shuffling")
        add("--yaml_path", type=str, default=DEFAULT_YAML, help="the config file")
        add("--ratio", type=float, help="fraction of the clean training set reserved for the defense")
        add("--index", type=str, help="file of reserved-set indices (overrides --ratio)")
        add("--preset", type=str, help="default | paper: the paper's λ 10 and θs (the classifier head) as "
            "defaults; values set in the YAML or on the command line still win")
        add("--lmd", "--lam", dest="lmd", type=float, help="λ, weight of the clean-loss hinge (default 1; paper 10)")
        add("--eps", type=float, help="ε, the clean-loss threshold of the hinge")
        add("--Lp", type=float, help="norm of the distance; only 2 (Frobenius) is supported")
        add("--warm_up_method", type=str, help="near | middle | far | noise | random")
        add("--select_layer_name", type=str, help="module(s) whose weights D3 moves, comma-separated "
            "(default: the architecture's, e.g. layer3,layer4,linear; paper: linear)")
        add("--hinge", type=str, help="sample (mean of per-sample hinges) | batch (hinge of the mean)")
        add("--normalize", type=_flag, help="divide the loss by λ+1 when λ > 1")
        add("--train_mode", type=_flag, help="update BN statistics while training (True) or freeze them")

    def __init__(self, args: argparse.Namespace):
        settings = read_yaml(args.yaml_path)
        self.cli_keys = {k for k, v in vars(args).items() if v is not None and k != "yaml_path"}
        settings.update({k: v for k, v in vars(args).items() if v is not None})
        args.__dict__ = settings
        args.terminal_info = sys.argv
        self.args = args
        self.result = None
        self._describe_dataset(args.dataset if getattr(args, "dataset", None) else None)
        self.d3_config()  # bad settings fail here, in one line, before any data is read
        if getattr(args, "result_file", None):
            self.set_result(args.result_file)

    def _describe_dataset(self, name: Optional[str], img_size=None) -> None:
        """BackdoorBench's derived settings: num_classes, input_height/width/channel, img_size."""
        if name is None:
            return
        try:
            spec = dataset_spec(name)
        except ValueError:
            return  # judged against the record in set_result
        size = tuple(img_size) if img_size is not None else (spec.size, spec.size, spec.channels)
        self.args.num_classes = spec.num_classes
        self.args.input_height, self.args.input_width, self.args.input_channel = size
        self.args.img_size = size

    def set_result(self, result_file: str) -> None:
        """Load record/<result_file>/attack_result.pt and prepare record/<result_file>/defense/d3/."""
        folder = record_location(result_file)
        if self.result is not None and Path(self.result.folder).resolve() == folder.resolve():
            return  # already loaded (BackdoorBench calls set_result from __init__ and from defense)
        record = load_attack_result(folder, data_root=getattr(self.args, "data_root", None))
        self._agree_with(record)
        final = Path(record.folder) / "defense" / NAME
        outputs.ensure_writable(final.parent)
        self.staged = outputs.StagedFolder(final)  # the run builds aside; _write swaps it in whole
        staging, args = self.staged.staging, self.args
        args.save_path = f"{staging}/"
        self.default_folders = {k: sub for k, sub in (("checkpoint_save", "checkpoint"), ("log", "log"))
                                if not getattr(args, k, None)}  # inside the run's folder, unless given
        for key, sub in self.default_folders.items():
            setattr(args, key, f"{staging}/{sub}/")
        for folder_path in (staging, args.checkpoint_save, args.log):
            outputs.ensure_writable(folder_path)
        self.result = record

    def _agree_with(self, record) -> None:
        """The record decides model and dataset; a different one named on the command line is an error."""
        args = self.args
        given_dataset = getattr(args, "dataset", None)
        if "dataset" in self.cli_keys and dataset_spec(given_dataset).name != record.spec.name:
            raise ValueError(f"--dataset {given_dataset} but the record holds {record.dataset}; drop --dataset "
                             f"or pick the matching record")
        if "model" in self.cli_keys and args.model != record.model_name:
            raise ValueError(f"--model {args.model} but the record holds a {record.model_name}; drop --model "
                             f"or pick the matching record")
        args.model, args.dataset = record.model_name, record.dataset
        self._describe_dataset(record.dataset, getattr(record, "img_size", None))
        args.num_classes = record.num_classes

    def set_logger(self) -> None:
        """Log to log/%Y_%m_%d_%H_%M_%S.log and stdout (stderr stays for errors), in BackdoorBench's format."""
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        formatter = logging.Formatter(fmt=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
        log_file = Path(self.args.log) / (time.strftime("%Y_%m_%d_%H_%M_%S", time.localtime()) + ".log")
        for handler in (logging.FileHandler(log_file), logging.StreamHandler(sys.stdout)):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self.log_file = log_file
        logger.info(pformat(self.args.__dict__))

    def d3_config(self) -> D3Config:
        """BackdoorBench/authors' setting names → D3Config (unset ones keep D3Config's defaults)."""
        args = self.args
        self._supported("Lp", (2, 2.0), "D3 measures distance with the Frobenius norm; set Lp: 2")
        self._supported("client_optimizer", ("sgd",), "D3 uses SGD; set client_optimizer: sgd")
        self._supported("lr_scheduler", ("CosineAnnealingLR",), "D3 uses a cosine schedule; set "
                        "lr_scheduler: CosineAnnealingLR")
        get = lambda key: getattr(args, key, None)  # noqa: E731
        layers = get("select_layer_name")
        if isinstance(layers, str):
            layers = [name.strip() for name in layers.split(",") if name.strip()]
        values = {"lam": get("lmd") if get("lmd") is not None else get("lam"), "eps": get("eps"),
                  "hinge": get("hinge"), "normalize": get("normalize"), "warm_start": get("warm_up_method"),
                  "epochs": get("epochs"), "lr": get("lr"), "momentum": get("sgd_momentum"),
                  "weight_decay": get("wd"), "batch_size": get("batch_size"), "bn_train": get("train_mode"),
                  "seed": get("random_seed"), "precision": self.precision_setting(),
                  "eval_every": get("eval_every"), "eval_batch_size": get("eval_batch_size")}
        types = {"lam": float, "eps": float, "lr": float, "momentum": float, "weight_decay": float,
                 "epochs": int, "batch_size": int, "seed": int, "normalize": _as_bool, "bn_train": _as_bool,
                 "eval_every": _positive("eval_every"), "eval_batch_size": _positive("eval_batch_size")}
        preset = str(get("preset") or "default")
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is unknown; use {' or '.join(PRESETS)}")
        values = {**PRESETS[preset], **{k: types.get(k, str)(v) for k, v in values.items() if v is not None}}
        values["layers"] = layers or default_layers(getattr(args, "model", None), preset)
        config = D3Config(**values)
        frequency = int(get("frequency_save") or 0)
        if frequency < 0:
            raise ValueError(f"frequency_save must be ≥ 0 (0 is never), got {frequency}")
        ratio = get("ratio")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < float(ratio) <= 1):
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}; e.g. --ratio 0.05")
        if frequency and frequency % config.eval_every:
            raise ValueError(f"frequency_save {frequency} is not a multiple of eval_every {config.eval_every} "
                             f"(checkpoints are written at evaluated epochs); make it one")
        return config

    def precision_setting(self) -> Optional[str]:
        """--precision or --amp → a precision name (None: D3Config's default). The command line beats
        the YAML, and within each precision beats amp; amp True → auto, amp False → fp32."""
        args = self.args
        for from_command_line in (True, False):
            for key in ("precision", "amp"):
                value = getattr(args, key, None)
                if value is None or value == "" or (key in self.cli_keys) != from_command_line:
                    continue
                if key == "precision":
                    return str(value)  # D3Config checks it
                return "auto" if _as_bool(value) else "fp32"
        return None

    def _supported(self, key: str, allowed: tuple, fix: str) -> None:
        value = getattr(self.args, key, None)
        if value is not None and value not in allowed:
            raise ValueError(f"{key}={value!r} is not supported; {fix}")

    def set_trainer(self, model) -> None:
        """Bind the model and its D3Config; `self.trainer(batches, on_epoch=)` runs detoxify."""
        self.model = model
        self.config = self.d3_config()

        def trainer(batches, on_epoch=None):
            return detoxify(self.model, batches, self.config, on_epoch=on_epoch, progress="d3")
        self.trainer = trainer

    def _device(self):
        device = str(getattr(self.args, "device", None) or "auto")
        if "," in device:  # BackdoorBench's "cuda:2,3" DataParallel syntax: run on the first one
            device = device.split(",")[0]
            logger.warning("multi-GPU device lists are not supported; using %s", device)
        return resolve_device(device)

    def _load_model(self):
        """The record's model, or (`checkpoint_load`) the same architecture with a checkpoint's weights."""
        model = model_from_record(self.result)
        checkpoint = getattr(self.args, "checkpoint_load", None)
        if checkpoint:
            name, classes, state = load_model_checkpoint(checkpoint)
            if (name and name != self.args.model) or (classes and classes != self.args.num_classes):
                raise ValueError(f"checkpoint {checkpoint} holds a {name} with {classes} classes but the record "
                                 f"a {self.args.model} with {self.args.num_classes}; pass a matching checkpoint")
            model.load_state_dict(align_state_dict(model, state, self.args.model, self.args.num_classes))
        return model

    def mitigation(self) -> Dict:
        """Purify the record's model with D3 on the reserved clean set; write every result file."""
        args, record = self.args, self.result
        if record is None:
            raise ValueError("no attack result loaded; pass --result_file")
        started = time.time()
        device = self._device()
        seed = int(getattr(args, "random_seed", None) or 0)
        seed_everything(seed)
        self.set_trainer(self._load_model().to(device))
        index = reserved_indices(len(record.clean_train), getattr(args, "ratio", None),
                                 getattr(args, "index", None), seed)
        config = self.config
        reserved = Loader(record.clean_train.subset(index), record.spec, config.batch_size, train=True,
                          device=device, seed=seed)
        clean_test = Loader(record.clean_test, record.spec, config.eval_batch_size, device=device)
        bd_test = Loader(poisoned_only(record.bd_test), record.spec, config.eval_batch_size, device=device)
        self.precision = resolve_precision(config.precision, device, model=self.model,
                                           channels_last=config.channels_last)
        logger.info("D3 on %s (%s, %s) with %d reserved samples on %s in %s%s; config %s", record.folder,
                    args.model, record.dataset, len(index), device, self.precision.name,
                    " (channels_last)" if self.precision.channels_last else "", config.to_dict())

        before = evaluate(self.model, clean_test, bd_test, precision=self.precision)
        logger.info("before: %s", _rounded(before))
        purified, history = self.trainer(reserved, on_epoch=self._on_epoch(clean_test, bd_test))
        after = _metrics(history[-1]) if history else before  # the last epoch's evaluation
        logger.info("after: %s", _rounded(after))
        summary = self._summary(before, after, history, index, device, time.time() - started)
        self._write(purified, history, index, summary)
        return {"model": purified, "before": before, "after": after, "history": history, "summary": summary}

    def _on_epoch(self, clean_test, bd_test):
        frequency = int(getattr(self.args, "frequency_save", None) or 0)

        def on_epoch(epoch: int, model) -> Dict[str, float]:  # detoxify calls it on evaluated epochs
            metrics = evaluate(model, clean_test, bd_test, precision=self.precision)
            logger.info("epoch %d: %s", epoch - 1, _rounded(metrics))
            if frequency and epoch % frequency == 0:
                write_defense_result(Path(self.args.checkpoint_save) / f"{NAME}_epoch_{epoch - 1}.pt",
                                     self.args.model, self.args.num_classes, _cpu_state(model))
            return metrics
        return on_epoch

    def _summary(self, before, after, history, index, device, seconds) -> Dict:
        args = self.args
        keys = ("acc", "asr", "ra")
        return {"defense": NAME, "d3_plugin_version": __version__, "record": str(self.result.folder),
                "model": args.model, "dataset": args.dataset, "device": str(device),
                "precision": self.precision.name, "channels_last": self.precision.channels_last,
                "reserved": {"size": len(index), "ratio": getattr(args, "ratio", None),
                             "index_file": getattr(args, "index", None), "random_seed": args.random_seed
                             if getattr(args, "random_seed", None) is not None else 0},
                "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
                "der": defense_effectiveness_rate(before["acc"], before["asr"], after["acc"], after["asr"]),
                "config": self.config.to_dict(), "seconds": round(seconds, 2), "history": history}

    def _write(self, purified, history, index, summary) -> None:
        """All result files into the staging folder, then the folder swapped in whole (files.StagedFolder):
        record/<attack>/defense/d3/ holds one complete run or none, never a mix of two."""
        save = Path(self.args.save_path)
        rows = [epoch_row(h) for h in history]
        write_defense_result(save / "defense_result.pt", self.args.model, self.args.num_classes,
                             _cpu_state(purified))
        outputs.write_metric_table(save / f"{NAME}_df.csv", rows)
        outputs.write_summary_table(save / f"{NAME}_df_summary.csv", rows)
        if rows:
            outputs.plot_metrics(save, rows)
        outputs.write_index(Path(self.args.log) / "index.txt", index)
        outputs.write_json(save / f"{NAME}_summary.json", summary)
        final = self.staged.publish()
        self.args.save_path = f"{final}/"
        for key, sub in self.default_folders.items():
            setattr(self.args, key, f"{final}/{sub}/")
        logger.info("results in %s", final)

    def defense(self, result_file: str) -> Dict:
        self.set_result(result_file)
        self.set_logger()
        try:
            return self.mitigation()
        except BaseException as error:  # Ctrl-C too: logged, and d3/ keeps the previous complete run
            logger.error("%s: %s; %s keeps its previous results, this run's log is in %s",
                         type(error).__name__, str(error) or "interrupted", self.staged.final, self.args.log)
            raise


def poisoned_only(bd_test):
    """The poisoned samples of a backdoor test set (ASR and RA are measured on these only)."""
    keep = torch.nonzero(bd_test.poisoned).flatten()
    if len(keep) == 0:
        raise ValueError("the record's poisoned test set holds no poisoned sample; ASR cannot be measured, "
                         "re-create the attack record")
    return bd_test if len(keep) == len(bd_test) else bd_test.subset(keep)


def epoch_row(history_row: Dict[str, float]) -> Dict[str, float]:
    """A history row of detoxify → BackdoorBench's per-epoch columns (epoch counted from 0). An epoch
    that was not evaluated (--eval_every) keeps its training loss; its test columns are None (empty)."""
    evaluated = "acc" in history_row  # else "clean_loss" is D3's training clean loss, not the test loss
    test = history_row.get if evaluated else (lambda key: None)
    return {"epoch": int(history_row["epoch"]) - 1,
            "train_epoch_loss_avg_over_batch": history_row.get("loss"),
            "clean_test_loss_avg_over_batch": test("clean_loss"),
            "bd_test_loss_avg_over_batch": test("bd_loss"),
            "test_acc": test("acc"), "test_asr": test("asr"), "test_ra": test("ra")}


def _metrics(row: Dict[str, float]) -> Dict[str, float]:
    return {k: row[k] for k in ("acc", "asr", "ra", "clean_loss", "bd_loss") if k in row}


def _cpu_state(model) -> Dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _rounded(metrics: Dict[str, float]) -> Dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


def main(argv: Optional[List[str]] = None) -> Dict:
    """BackdoorBench's standard `__main__` for this class (what the installed defense/d3.py runs)."""
    parser = argparse.ArgumentParser(description="D3 (Distance-Driven Detoxification) backdoor defense")
    d3.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.result_file:
        parser.error("--result_file is required (a folder under ./record)")
    with one_line_errors(parser.prog):
        return d3(args).defense(args.result_file)
