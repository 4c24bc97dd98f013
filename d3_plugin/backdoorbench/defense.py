"""Any native defense of the registry as a BackdoorBench defense class: drop-in `defense/<name>.py` scripts.

    cls = defense_class("fst")                 # or: from d3_plugin.backdoorbench.defense import d3
    parser = argparse.ArgumentParser(); cls.add_arguments(parser); args = parser.parse_args()
    cls(args).defense(args.result_file)        # from a BackdoorBench checkout root

The class follows BackdoorBench's defense interface (add_arguments, __init__(args), set_result, set_logger,
set_trainer, mitigation, defense) and subclasses its `defense.base.defense` when a checkout's is
importable (looked up only when a class is built). It reads only `self.args`. It runs the entry's defend
function on the reserved clean set (`d3_plugin.bench`) and writes BackdoorBench's result files:
record/<attack>/defense/<name>/{defense_result.pt, <name>_df.csv, <name>_df_summary.csv,
acc_like_metric_plots.png, loss_metric_plots.png, <name>_summary.json, log/index.txt, log/<time>.log}.

Options: BackdoorBench's standard ones (`STANDARD`), one per field of the defense's config dataclass
(`--<field>`, plus the BackdoorBench names the registration declares as aliases, e.g. D3's `--lmd`), and
`--preset` for defenses with presets. Every option defaults to None, so the YAML decides what the command
line does not; the settings are merged by `registry.settings` (config defaults < preset < architecture <
dataset < YAML < command line). `epochs` sets every budget field of the config (`registry.budget_fields`).

Run settings, for every defense: `--precision auto|bf16|fp16|fp32` (evaluation, and training where the
config has a `precision` field; BackdoorBench's `--amp True` = auto, `--amp False` = fp32; the command line
beats the YAML, and within each `precision` beats `amp`), `--eval_every N` (evaluate after every N-th epoch
and the last; a skipped epoch's CSV row keeps its training loss, test columns empty; `frequency_save` must
be a multiple of it), `--eval_batch_size`.
"""
from __future__ import annotations

import argparse
import collections.abc
import contextlib
import dataclasses
import logging
import re
import sys
import time
import typing
from pathlib import Path
from pprint import pformat
from typing import Any, Callable, ClassVar, Dict, List, Optional

from .. import __version__, registry
from ..bench import bench_from_record, with_auxiliary
from ..data.readers import dataset_spec
from ..checks import is_bool_hint, parse_bool
from ..errors import INPUT_ERRORS, INPUT_ERROR_STATUS, INTERRUPTED_STATUS, is_out_of_memory, one_line, \
    out_of_memory_line
from ..evaluation import defense_effectiveness_rate
from ..files import check_file
from ..precision import PRECISIONS, resolve_precision
from ..shipped import shipped_folder
from ..training import due, resolve_device
from ..record_io import outputs
from ..record_io.reserved import RESERVED_RATIO
from ..record_io.records import align_state_dict, load_attack_result, load_model_checkpoint, model_from_record, write_defense_result

LOG_FORMAT = "%(asctime)s [%(levelname)-8s] [%(filename)s:%(lineno)d] %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d:%H:%M:%S"
logger = logging.getLogger("d3_plugin.backdoorbench")

# BackdoorBench's standard options: name → (type, help). Those naming a config field (epochs, lr, ...) set it.
STANDARD = {
    "device": (str, "auto (cuda when present), cpu, cuda, cuda:N"),
    "pin_memory": ("flag", "accepted for compatibility (tensor loader)"),
    "non_blocking": ("flag", "accepted for compatibility"),
    "prefetch": ("flag", "accepted for compatibility"),
    "amp": ("flag", "True: mixed precision (= --precision auto); False: fp32 unless --precision says otherwise"),
    "precision": (str, f"{' | '.join(PRECISIONS)} (default auto: bf16 on CPUs with native bf16 and bf16 GPUs, "
                       "fp16 on older GPUs, else fp32); beats --amp"),
    "eval_every": (int, "evaluate every N epochs and after the last (default 1: every epoch)"),
    "eval_batch_size": (int, "batch size of test-set evaluation (default: 64 on a CPU, 512 on a GPU)"),
    "checkpoint_load": (str, "model checkpoint to purify instead of the record's model"),
    "checkpoint_save": (str, "folder for per-epoch checkpoints (default save_path/checkpoint)"),
    "log": (str, "folder for the log and index.txt (default save_path/log)"),
    "resume": ("flag", "True: continue a killed run from its last finished epoch (defenses that checkpoint)"),
    "dataset_path": (str, "BackdoorBench's data folder (informational; see --data_root)"),
    "data_root": (str, "dataset folder to use instead of the record's data_path"),
    "dataset": (str, "mnist, cifar10, cifar100, gtsrb, tiny, fashion_mnist (must match the record)"),
    "result_file": (str, "attack folder under ./record, or a path to a record folder"),
    "epochs": (int, "training budget: sets the defense's epoch-like fields"),
    "batch_size": (int, None),
    "num_workers": (float, "accepted for compatibility"),
    "lr": (float, None),
    "lr_scheduler": (str, "accepted for compatibility"),
    "model": (str, "must match the record's model_name"),
    "client_optimizer": (str, "accepted for compatibility"),
    "sgd_momentum": (float, "momentum of sgd"),
    "wd": (float, "weight decay of sgd"),
    "frequency_save": (int, "save a checkpoint every N epochs, 0 is never"),
    "random_seed": (int, "seeds the reserved-set draw, the defense and shuffling"),
    "ratio": (float, "fraction of the clean training set reserved for the defense"),
    "index": (str, "file of reserved-set indices (overrides --ratio)"),
    "reserved_source": (str, "auxiliary data in place of the reserved draw: id, corrupt:KIND[:SEVERITY], digits[:N], "
                             "inversion[:N] (docs/gic.md)"),
    "calibrate": (str, "calibrate the reserved data for the model first, e.g. gic (its defaults; tune it in compare)"),
}
GENERIC_ALIASES = {"sgd_momentum": "momentum", "wd": "weight_decay"}  # BackdoorBench name → config field
RUN_KEYS = ("random_seed", "precision", "amp", "eval_every", "eval_batch_size")  # set by the adapter itself
RUN_FIELDS = ("seed", "precision", "eval_every", "eval_batch_size")  # what run_settings() offers to configs
STANDARD_YAML = "backdoorbench.yaml"  # in the shipped configs/: the run defaults, one place


def standard_settings() -> Dict[str, Any]:
    """The run defaults (configs/backdoorbench.yaml), under every YAML file and command line."""
    return read_yaml(shipped_folder("configs") / STANDARD_YAML)


def converter(hint) -> Callable[[Any], Any]:
    """A function turning a command-line string (or a YAML value) into a value of the type `hint`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return converter(args[0])
    if hint is bool:
        return parse_bool
    if hint in (int, float, str):
        def scalar(value):
            return value if isinstance(value, hint) and not isinstance(value, bool) else hint(value)
        scalar.__name__ = hint.__name__  # argparse names it in "invalid int value"
        return scalar
    if typing.get_origin(hint) in (list, tuple, collections.abc.Sequence):
        item = converter(args[0]) if args else str

        def sequence(value):  # "a,b" on the command line, a list in YAML
            parts = value.split(",") if isinstance(value, str) else value
            return [item(v.strip() if isinstance(v, str) else v) for v in parts if not (isinstance(v, str) and not v.strip())]
        sequence.__name__ = "comma-separated list"
        return sequence
    return lambda value: value


def _positive(option: str, value) -> int:
    try:
        number = int(value)
        if isinstance(value, bool) or number != float(value) or number < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"--{option} must be a positive integer, got {value!r}; pass e.g. --{option} 1") from None
    return number


def read_yaml(path, name: str = "<name>") -> dict:
    """A defense config file as a dict; one-line errors for a missing or malformed file."""
    import yaml

    path = check_file(path, f"pass --yaml_path (e.g. ./config/defense/{name}/cifar10.yaml after `d3-plugin "
                            f"install .`)", "config file")
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
    if given.is_absolute() or given.exists() or given.parts[:1] == ("record",):
        return given  # a path (checkouts name records by their folder under record/)
    return Path("record") / result_file


@contextlib.contextmanager
def one_line_errors(program: str):
    """Turn input errors into one line on stderr and exit status 2, Ctrl-C into one line and 130 (for scripts)."""
    try:
        yield
    except INPUT_ERRORS as error:
        print(f"{program}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(INPUT_ERROR_STATUS)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        print(f"{program}: error: {out_of_memory_line(error)}", file=sys.stderr)
        sys.exit(INPUT_ERROR_STATUS)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; no results were written (an earlier complete run is kept)", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)


class BackdoorBenchDefense:
    """The generic BackdoorBench defense class; `defense_class(name)` binds it to a registry entry."""

    entry: ClassVar[registry.Entry]
    NAME: ClassVar[str]  # the script's name: output folder and file prefix

    # --- options ------------------------------------------------------------------------------------
    @classmethod
    def field_options(cls) -> Dict[str, List[str]]:
        """Config field → its option names (the field's own, unless a standard option, and its aliases)."""
        aliases = {**GENERIC_ALIASES, **cls.entry.aliases}
        options = {}
        for field in registry.field_names(cls.entry.config):
            names = [] if field in STANDARD or field in ("seed", "precision") else [field]
            names += [alias for alias, target in aliases.items() if target == field and alias not in STANDARD]
            if names:
                options[field] = names
        return options

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Every option defaults to None (so the YAML decides) except --yaml_path."""
        for name, (kind, text) in STANDARD.items():
            spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if name == "data_root" else [])
            parser.add_argument(*spellings, dest=name, type=parse_bool if kind == "flag" else kind, help=text)
        parser.add_argument("--yaml_path", type=str, default=f"./config/defense/{cls.NAME}/config.yaml",
                            help="the config file (empty: the defaults only)")
        if cls.entry.presets:
            parser.add_argument("--preset", type=str, help=f"{' | '.join(cls.entry.presets)}: which defaults "
                                "unset values take (values set in the YAML or here win)")
        hints = registry.type_hints(cls.entry.config) if cls.entry.config else {}
        defaults = {f.name: f.default for f in dataclasses.fields(cls.entry.config)} if cls.entry.config else {}
        for field, names in cls.field_options().items():
            default = defaults.get(field)
            shown = "" if default is dataclasses.MISSING else f", default {default}"
            if field in cls.entry.floating_fields():
                shown = ", default: the preset's / the architecture's"
            parser.add_argument(*[f"--{n}" for n in names], dest=field, type=converter(hints.get(field)),
                                help=f"{cls.entry.name}'s {field} ({_type_name(hints.get(field))}{shown})")

    # --- settings -----------------------------------------------------------------------------------
    def __init__(self, args: argparse.Namespace):
        self.yaml_values = {**standard_settings(), **(read_yaml(args.yaml_path, self.NAME) if args.yaml_path else {})}
        self.cli_values = {k: v for k, v in vars(args).items() if v is not None and k != "yaml_path"}
        self.cli_keys = set(self.cli_values)
        args.__dict__ = {**vars(args), **self.yaml_values, **self.cli_values}  # None: not set anywhere
        for name in (n for n, (kind, _) in STANDARD.items() if kind == "flag"):  # YAML's too: "maybe" is no False
            if getattr(args, name, None) not in (None, ""):
                setattr(args, name, parse_bool(getattr(args, name), name))
        args.terminal_info = sys.argv
        self.args = args
        self.result = None
        self._describe_dataset(getattr(args, "dataset", None))
        self.config = self.build_config()  # bad settings fail here, in one line, before any data is read
        if getattr(args, "result_file", None):
            self.set_result(args.result_file)

    def _config_values(self, source: Dict[str, Any]) -> Dict[str, Any]:
        """YAML or command-line settings → config fields (aliases resolved, types converted, `epochs` spread
        over the budget fields)."""
        entry, values = self.entry, {}
        aliases = {**GENERIC_ALIASES, **entry.aliases}
        hints = registry.type_hints(entry.config) if entry.config else {}
        if source.get("epochs") is not None:
            values.update({f: source["epochs"] for f in registry.budget_fields(entry.config)})
        for key, value in source.items():
            field = aliases.get(key, key)
            if key in RUN_KEYS or field not in hints or value is None or value == "":
                continue
            try:
                values[field] = converter(hints[field])(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key}={value!r} is not a valid {_type_name(hints[field])}") from None
        return values

    def run_settings(self) -> Dict[str, Any]:
        """Seed, precision and evaluation settings (checked here), offered to configs that have such fields."""
        get = lambda key: getattr(self.args, key, None)  # noqa: E731
        return {"seed": int(get("random_seed") or 0), "precision": self.precision_setting(),
                "eval_every": _positive("eval_every", get("eval_every")) if get("eval_every") is not None else None,
                "eval_batch_size": _positive("eval_batch_size", get("eval_batch_size"))
                if get("eval_batch_size") is not None else None}

    def build_config(self):
        """The defense's config from the settings; one-line errors for unsupported or invalid values."""
        args, entry = self.args, self.entry
        for key, allowed in entry.fixed.items():
            value = getattr(args, key, None)
            if value is not None and value != "" and value not in allowed:
                raise ValueError(f"{key}={value!r} is not supported by {entry.name}; set {key}: {allowed[0]}")
        run = self.run_settings()
        preset = getattr(args, "preset", None) or None
        dataset = _known_dataset(getattr(args, "dataset", None))
        values = registry.settings(entry, dataset=dataset, model=getattr(args, "model", None), preset=preset,
                                   layers=[self._config_values(self.yaml_values), self._config_values(self.cli_values),
                                           registry.applicable(entry, run)])
        config = registry.make_config(entry, values)
        self._check_harness(config, run)
        return config

    def _check_harness(self, config, run) -> None:
        frequency = int(getattr(self.args, "frequency_save", None) or 0)
        if frequency < 0:
            raise ValueError(f"frequency_save must be ≥ 0 (0 is never), got {frequency}")
        ratio = getattr(self.args, "ratio", None)
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < float(ratio) <= 1):
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}; e.g. --ratio {RESERVED_RATIO}")
        if getattr(self.args, "resume", None) and not takes_checkpoint(self.entry.run):
            raise ValueError(f"{self.entry.name} cannot resume a killed run (it keeps no epoch checkpoint); "
                             f"drop --resume")
        from ..auxiliary import parse_source

        parse_source(getattr(self.args, "reserved_source", None) or "id")
        if getattr(self.args, "calibrate", None):
            registry.get(self.args.calibrate, "calibration")
        every = run["eval_every"] or 1
        if frequency and frequency % every:
            raise ValueError(f"frequency_save {frequency} is not a multiple of eval_every {every} "
                             f"(checkpoints are written at evaluated epochs); make it one")

    def precision_setting(self) -> Optional[str]:
        """--precision or --amp → a precision name (None: the default). The command line beats the YAML, and
        within each precision beats amp; amp True → auto, amp False → fp32."""
        for from_command_line in (True, False):
            for key in ("precision", "amp"):
                value = getattr(self.args, key, None)
                if value is None or value == "" or (key in self.cli_keys) != from_command_line:
                    continue
                if key == "precision":
                    return str(value)
                return "auto" if value else "fp32"
        return None

    def _describe_dataset(self, name: Optional[str], img_size=None) -> None:
        """BackdoorBench's derived settings: num_classes, input_height/width/channel, img_size."""
        if _known_dataset(name) is None:
            return  # judged against the record in set_result
        spec = dataset_spec(name)
        size = tuple(img_size) if img_size is not None else (spec.size, spec.size, spec.channels)
        self.args.num_classes = spec.num_classes
        self.args.input_height, self.args.input_width, self.args.input_channel = size
        self.args.img_size = size

    # --- BackdoorBench's interface --------------------------------------------------------------------
    def set_result(self, result_file: str) -> None:
        """Load record/<result_file>/attack_result.pt and prepare record/<result_file>/defense/<name>/."""
        folder = record_location(result_file)
        if self.result is not None and Path(self.result.folder).resolve() == folder.resolve():
            return  # already loaded (BackdoorBench calls set_result from __init__ and from defense)
        record = load_attack_result(folder, data_root=getattr(self.args, "data_root", None))
        self._agree_with(record)
        final = Path(record.folder) / "defense" / self.NAME
        outputs.ensure_writable(final.parent)
        self.staged = outputs.StagedFolder(final)  # the run builds aside; _write swaps it in whole
        self.staged.remove_stale()  # those of killed runs
        try:
            self._prepare_staging(record)
        except Exception:
            self.staged.discard()
            raise

    def _prepare_staging(self, record) -> None:
        """Point save_path (and, unless given, checkpoint_save and log) into the staging folder; the config
        again, now with the record's dataset and architecture."""
        staging, args = self.staged.staging, self.args
        args.save_path = f"{staging}/"
        self.default_folders = {k: sub for k, sub in (("checkpoint_save", "checkpoint"), ("log", "log"))
                                if not getattr(args, k, None)}  # inside the run's folder, unless given
        for key, sub in self.default_folders.items():
            setattr(args, key, f"{staging}/{sub}/")
        for folder_path in (staging, args.checkpoint_save, args.log):
            outputs.ensure_writable(folder_path)
        self.result = record
        self.config = self.build_config()  # with the record's dataset and architecture

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

    def set_trainer(self, model) -> None:
        """Bind the model to purify and the runnable defense (`registry.Defense`) built from the settings."""
        self.model = model
        self.runnable = registry.Defense(self.entry, self.config)

    def _device(self):
        given = str(getattr(self.args, "device", None) or "auto")
        device = resolve_device(given.split(",")[0])  # BackdoorBench's "cuda:2,3" (DataParallel): the first
        if "," in given:
            logger.warning("multi-GPU device lists are not supported; using %s (docs/gpu.md)", device)
        return device

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
        """Purify the record's model on the reserved clean set; write every result file."""
        args, record, entry = self.args, self.result, self.entry
        if record is None:
            raise ValueError("no attack result loaded; pass --result_file")
        if entry.data == "poisoned":
            raise ValueError(f"{entry.name} needs poisoned training data, which this adapter does not pass")
        started = time.time()
        device = self._device()
        run = self.run_settings()
        model = self._load_model()
        self.precision = resolve_precision(run["precision"] or "auto", device, model=model,
                                           channels_last=getattr(self.config, "channels_last", None))
        bench = bench_from_record(record, ratio=getattr(args, "ratio", None), seed=run["seed"], device=device,
                                  index_file=getattr(args, "index", None), model=model, data=entry.data,
                                  eval_batch_size=run["eval_batch_size"], precision=self.precision)
        bench = self._auxiliary(bench, run["seed"])
        self.set_trainer(bench.model)
        index = [] if bench.reserved is None else bench.reserved.source_index.tolist()
        logger.info("%s on %s (%s, %s) with %d reserved samples on %s in %s%s; config %s", entry.name, record.folder,
                    args.model, record.dataset, len(index), device, self.precision.name,
                    " (channels_last)" if self.precision.channels_last else "", self.runnable.config_dict())
        loaders = bench.test_loaders()
        before = bench.evaluate(bench.model, loaders)
        logger.info("before: %s", _rounded(before))
        purified, history, _ = bench.run(self.runnable, on_epoch=self._on_epoch(bench, loaders, run),
                                         **self._resume_point())
        after = _metrics(history[-1]) if history and "acc" in history[-1] else before
        logger.info("after: %s", _rounded(after))
        summary = self._summary(before, after, history, index, device, time.time() - started)
        self._write(purified, history, index, summary)
        return {"model": purified, "before": before, "after": after, "history": history, "summary": summary}

    def _auxiliary(self, bench, seed: int):
        """The bench on `--reserved_source` data, calibrated by `--calibrate` (e.g. gic), as compare does."""
        source, calibrate = getattr(self.args, "reserved_source", None), getattr(self.args, "calibrate", None)
        calibration = registry.build_calibration(calibrate, seed=seed) if calibrate else None

        def report(result):
            logger.info("%s on %s: BN-statistics distance %.3f -> %.3f, largest change %.4f, labels %s", calibrate,
                        source or "id", result["bn_before"], result["bn_after"], result["max_change"], result["labels"])
        return with_auxiliary(bench, source, calibration, report).ready()

    def _on_epoch(self, bench, loaders, run):
        frequency = int(getattr(self.args, "frequency_save", None) or 0)
        every = run["eval_every"] or 1
        budget = [getattr(self.config, f) for f in registry.budget_fields(self.entry.config)]
        total = budget[-1] if budget and isinstance(budget[-1], int) else None

        def on_epoch(epoch: int, model) -> Dict[str, float]:
            if total is not None and not due(epoch, total, every):
                return {}
            metrics = bench.evaluate(model, loaders)
            logger.info("epoch %d: %s", epoch - 1, _rounded(metrics))
            if frequency and epoch % frequency == 0:
                write_defense_result(Path(self.args.checkpoint_save) / f"{self.NAME}_epoch_{epoch - 1}.pt",
                                     self.args.model, self.args.num_classes, model.state_dict())
            return metrics
        return on_epoch

    def resume_file(self) -> Path:
        """Where a run keeps its epoch checkpoint: beside the result folder, outside the staged run."""
        return Path(self.staged.final).parent / f".{self.NAME}.resume.pt"

    def _resume_point(self) -> Dict[str, Any]:
        """{checkpoint: path} for defenses that checkpoint every epoch (a fresh run first drops an old one)."""
        if not takes_checkpoint(self.entry.run):
            return {}
        path = self.resume_file()
        if path.exists() and not getattr(self.args, "resume", None):
            path.unlink()
            logger.info("started over: removed the checkpoint of an earlier unfinished run (pass --resume to continue one)")
        elif path.exists():
            logger.info("resuming from %s", path)
        return {"checkpoint": path}

    def _summary(self, before, after, history, index, device, seconds) -> Dict:
        args = self.args
        keys = ("acc", "asr", "ra")
        return {"defense": self.entry.name, "script": self.NAME, "d3_plugin_version": __version__,
                "record": str(self.result.folder), "model": args.model, "dataset": args.dataset,
                "device": str(device), "precision": self.precision.name,
                "channels_last": self.precision.channels_last,
                "reserved": {"size": len(index), "ratio": getattr(args, "ratio", None),
                             "index_file": getattr(args, "index", None),
                             "random_seed": int(getattr(args, "random_seed", None) or 0),
                             "source": getattr(args, "reserved_source", None) or "id",
                             "calibration": getattr(args, "calibrate", None)},
                "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
                "der": defense_effectiveness_rate(before["acc"], before["asr"], after["acc"], after["asr"]),
                "config": self.runnable.config_dict(), "seconds": round(seconds, 2),
                "history": history}

    def _write(self, purified, history, index, summary) -> None:
        """All result files into the staging folder, then the folder swapped in whole (files.StagedFolder):
        record/<attack>/defense/<name>/ holds one complete run or none, never a mix of two."""
        save, name = Path(self.args.save_path), self.NAME
        rows = [outputs.epoch_row(h) for h in history]
        architecture, extra = saved_parts(purified)
        write_defense_result(save / "defense_result.pt", self.args.model, self.args.num_classes,
                             architecture.state_dict())
        if extra:
            outputs.torch_save(extra, save / f"{name}_{EXTRA_STATE}.pt")
        outputs.write_metric_table(save / f"{name}_df.csv", rows)
        outputs.write_summary_table(save / f"{name}_df_summary.csv", rows)
        if rows:
            outputs.plot_metrics(save, rows)
        if self.entry.data != "none":
            outputs.write_index(Path(self.args.log) / "index.txt", index)
        outputs.write_json(save / f"{name}_summary.json", summary)
        final = self.staged.publish()
        if self.resume_file().exists():
            self.resume_file().unlink()  # the run is whole: nothing left to resume
        self.args.save_path = f"{final}/"
        for key, sub in self.default_folders.items():
            setattr(self.args, key, f"{final}/{sub}/")
        logger.info("results in %s", final)

    def defense(self, result_file: str) -> Dict:
        self.set_result(result_file)
        self.set_logger()
        try:
            return self.mitigation()
        except Exception as error:  # the folder keeps the previous complete run; this run's files go
            logger.error("%s: %s; %s keeps its previous results", type(error).__name__, error, self.staged.final)
            self.staged.discard()
            raise
        except BaseException as error:  # Ctrl-C: the log stays with the run's staging folder (a later run removes it)
            logger.error("%s: interrupted; %s keeps its previous results, this run's log is in %s",
                         type(error).__name__, self.staged.final, self.args.log)
            raise


EXTRA_STATE = "bounds"  # <script>_bounds.pt: what a wrapping defense (BadActs) adds to the plain weights


def saved_parts(purified):
    """(the model BackdoorBench rebuilds, the defense's extra state or None). A defense that wraps the
    architecture (BadActs: activation clipping) exposes the unmodified model as `base` and its own state
    as `bounds_state()`; BackdoorBench's own evaluation of defense_result.pt sees `base` only."""
    if hasattr(purified, "base") and hasattr(purified, "bounds_state"):
        return purified.base, purified.bounds_state()
    return purified, None


def load_purified(folder) -> "torch.nn.Module":
    """A result folder's purified model as the defense made it: defense_result.pt (safe loader), wrapped
    again with its `<script>_bounds.pt` when there is one (BadActs)."""
    from ..record_io.safe_load import safe_torch_load
    from ..record_io.records import model_from_record

    folder = Path(folder)
    result = safe_torch_load(folder / "defense_result.pt")
    model = model_from_record((result["model_name"], result["num_classes"], result["model"]))
    bounds = folder / f"{folder.name}_{EXTRA_STATE}.pt"
    if bounds.is_file():
        from ..defenses.badacts import ClippedModel
        return ClippedModel.from_bounds(model, safe_torch_load(bounds))
    return model


def takes_checkpoint(function) -> bool:
    """Whether a defend function keeps an epoch checkpoint it can resume from (a `checkpoint` keyword)."""
    import inspect
    return function is not None and "checkpoint" in inspect.signature(function).parameters


def _type_name(hint) -> str:
    if is_bool_hint(hint):
        return "boolean: true/false, yes/no or 1/0"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _type_name(args[0])
    if typing.get_origin(hint) in (list, tuple, collections.abc.Sequence):
        return f"comma-separated {_type_name(args[0]) if args else 'str'}s"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _known_dataset(name: Optional[str]) -> Optional[str]:
    try:
        return dataset_spec(name).name if name else None
    except ValueError:
        return None


def _metrics(row: Dict[str, float]) -> Dict[str, float]:
    return {k: row[k] for k in ("acc", "asr", "ra", "clean_loss", "bd_loss") if k in row}


def _rounded(metrics: Dict[str, float]) -> Dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


def _backdoorbench_base() -> type:
    """BackdoorBench's `defense.base.defense` when a checkout's is importable, else object (looked up only
    when a class is built, i.e. when a defense script runs)."""
    try:
        from defense.base import defense as base  # the checkout root is on sys.path in its scripts
        return base if isinstance(base, type) else object
    except Exception:  # noqa: BLE001 - any failure just means "not in a BackdoorBench checkout"
        return object


_CLASSES: Dict[tuple, type] = {}


def class_name(script: str) -> str:
    """BackdoorBench names a defense class after its script; ours: the script name as an identifier."""
    return re.sub(r"\W", "_", script)


def defense_class(name: str, script: Optional[str] = None) -> type:
    """The BackdoorBench defense class of the registry entry `name`, writing under defense/<script>/."""
    entry = registry.get(name)
    if entry.where != "native":
        raise ValueError(f"{entry.name} has no native implementation to run as a BackdoorBench defense "
                         f"({entry.where}); see `d3-plugin list`")
    script = script or entry.name
    key = (entry.name, script)
    if key not in _CLASSES:
        bases = (BackdoorBenchDefense,) + ((_backdoorbench_base(),) if _backdoorbench_base() is not object else ())
        _CLASSES[key] = type(class_name(script), bases, {
            "entry": entry, "NAME": script, "__module__": __name__,
            "__doc__": f"{entry.title or entry.name} with BackdoorBench's defense interface (d3_plugin)."})
    return _CLASSES[key]


def __getattr__(attribute: str):
    """`from d3_plugin.backdoorbench.defense import d3` (or `fst`, `ft_sam`, ...): the entry's class."""
    if attribute.startswith("__"):
        raise AttributeError(attribute)
    try:
        return defense_class(attribute.replace("_", "-") if attribute not in registry.names() else attribute)
    except ValueError:
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}") from None


def main(argv: Optional[List[str]] = None, name: str = "d3", script: Optional[str] = None) -> Dict:
    """BackdoorBench's standard `__main__` for the class of `name` (what an installed defense/<script>.py runs)."""
    cls = defense_class(name, script)
    parser = argparse.ArgumentParser(description=f"{cls.entry.title or name} backdoor defense")
    cls.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.result_file:
        parser.error("--result_file is required (a folder under ./record)")
    with one_line_errors(parser.prog):
        return cls(args).defense(args.result_file)
