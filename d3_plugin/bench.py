"""What every defense run shares, whoever starts it (`compare`, the BackdoorBench adapter, benchmarks):
the backdoored model, the reserved clean set drawn as BackdoorBench draws it, the clean and poisoned
test sets, the device and the seed.

    bench = bench_from_record(load_attack_result("record/badnet"), seed=0)
    purified, history, seconds = bench.run(registry.build("fst", budget=10))
    bench.evaluate(purified)               # {'acc', 'asr', 'ra', 'clean_loss', 'bd_loss'}
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .record_io.records import model_from_record
from .record_io.reserved import RESERVED_RATIO, reserved_indices
from .data import DatasetSpec, ImageSet, Loader
from .evaluation import eval_batch_size, evaluate
from .training import resolve_device, seed_everything

DEFAULT_BATCH_SIZE = 256  # for a defense whose config names no batch size


@dataclass
class Bench:
    """The inputs of a defense run. `reserved` is None for a data-free defense."""

    model: nn.Module
    spec: DatasetSpec
    reserved: Optional[ImageSet]
    clean_test: ImageSet
    bd_test: ImageSet
    device: torch.device
    seed: int = 0
    identity: Dict[str, Any] = field(default_factory=dict)  # record, reserved draw: enters every hash
    record_folder: Optional[Path] = None
    eval_batch_size: Optional[int] = None  # None: by device (evaluation.eval_batch_size)
    model_name: Optional[str] = None  # picks per-architecture defaults such as D3's layers
    precision: Any = "fp32"  # of the evaluation passes (d3_plugin.precision)
    track: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None  # per-epoch curves, if wanted
    calibration_report: Optional[Dict[str, Any]] = None  # set by with_auxiliary(calibration=...)
    auxiliary: Optional[Callable[[], Tuple[ImageSet, Optional[Dict[str, Any]]]]] = field(default=None, repr=False)
    digest: Optional[str] = None  # of the reserved data, known before a deferred auxiliary set is made

    def ready(self) -> "Bench":
        """Make the deferred auxiliary reserved set of `with_auxiliary` now (once); returns the bench."""
        if self.auxiliary is not None:
            make, self.auxiliary = self.auxiliary, None
            self.reserved, self.calibration_report = make()
        return self

    def test_loader(self, data: ImageSet) -> Loader:
        """An evaluation loader over `data` (a test set or part of one)."""
        return Loader(data, self.spec, eval_batch_size(self.device, self.eval_batch_size), device=self.device)

    def test_loaders(self) -> Tuple[Loader, Loader]:
        return self.test_loader(self.clean_test), self.test_loader(self.bd_test)

    def evaluate(self, model: nn.Module, loaders: Optional[Tuple[Loader, Loader]] = None) -> Dict[str, float]:
        clean, backdoor = loaders or self.test_loaders()
        return evaluate(model, clean, backdoor, precision=self.precision)

    def reserved_batches(self, batch_size: int):
        """The reserved set, shuffled and augmented by the bench seed ([] for a data-free defense)."""
        if self.ready().reserved is None:
            return []
        return Loader(self.reserved, self.spec, batch_size, train=True, device=self.device, seed=self.seed)

    def reserved_digest(self) -> str:
        """Short hash of the reserved indices (in draw order; with the auxiliary source and calibration, if
        any): tells two seeds' draws apart."""
        from .registry import config_hash
        if self.digest:
            return self.digest
        return config_hash({"reserved": [] if self.reserved is None else self.reserved.source_index.tolist()})

    def run(self, defense, *, on_epoch=None, **extra) -> Tuple[nn.Module, List[Dict], float]:
        """Seed, then run a built defense (`registry.Defense`) on a copy of the model: (purified, history,
        seconds). `extra` keywords reach the defend function (e.g. a resume checkpoint)."""
        seed_everything(self.seed)
        batch_size = int(getattr(defense.config, "batch_size", None) or DEFAULT_BATCH_SIZE)
        model = copy.deepcopy(self.model).to(self.device)
        started = time.perf_counter()
        purified, history = defense(model, self.reserved_batches(batch_size), on_epoch=on_epoch or self.track,
                                    progress=defense.name, **extra)
        return purified, history, time.perf_counter() - started


def with_auxiliary(bench: Bench, source: Optional[str] = None, calibration=None,
                   report: Optional[Callable[[Dict[str, Any]], None]] = None) -> Bench:
    """The bench with its reserved set replaced by auxiliary data (`source`, see d3_plugin.auxiliary: id,
    corrupt:KIND[:SEVERITY], digits[:N], inversion[:N]) and/or calibrated for the bench's model by a
    `registry.Calibration` such as GIC; `report(calibration_report)` is called once it has run.

    Both enter the bench identity, so every result hash tells them apart. The data are made only when a
    defense first needs them (`Bench.ready`), so a re-run that finds every row cached calibrates nothing."""
    if bench.reserved is None or (source in (None, "id") and calibration is None):
        return bench
    from .auxiliary import auxiliary_set, parse_source
    from .registry import config_hash

    spec = parse_source(source or "id")
    identity = {**bench.identity, "reserved_source": str(spec)}
    if calibration is not None:
        identity["calibration"] = calibration.hash()
    draw = bench.reserved

    def make():
        data, labeled = auxiliary_set(spec, draw, bench.model, bench.spec, seed=bench.seed, device=bench.device)
        if calibration is None:
            return data, None
        data, result = calibration(bench.model, data, bench.spec, labeled=labeled, device=bench.device,
                                   progress=calibration.name)
        if report is not None:
            report(result)
        return data, result

    digest = config_hash({"reserved": draw.source_index.tolist(), "source": str(spec),
                          "calibration": identity.get("calibration")})
    return replace(bench, identity=identity, auxiliary=make, digest=digest)


def poisoned_only(bd_test: ImageSet) -> ImageSet:
    """The poisoned samples of a backdoor test set (ASR and RA are measured on these only)."""
    keep = torch.nonzero(bd_test.poisoned).flatten()
    if len(keep) == 0:
        raise ValueError("the record's poisoned test set holds no poisoned sample; ASR cannot be measured, "
                         "re-create the attack record")
    return bd_test if len(keep) == len(bd_test) else bd_test.subset(keep)


TEST_HALVES = ("dev", "test")  # even / odd indices of the clean and the poisoned test sets


def on_test_half(bench: Bench, half: Optional[str]) -> Bench:
    """The bench measured on half of its test sets: `dev` (even indices) to choose settings on, `test` (odd
    ones) to report them; None keeps the whole sets."""
    if half is None:
        return bench
    if half not in TEST_HALVES:
        raise ValueError(f"test_half {half!r} is not one of {', '.join(TEST_HALVES)}; leave it out for the whole test sets")
    start = TEST_HALVES.index(half)

    def halved(data: ImageSet) -> ImageSet:
        return data.subset(torch.arange(start, len(data), 2))
    return replace(bench, clean_test=halved(bench.clean_test), bd_test=halved(bench.bd_test),
                   identity={**bench.identity, "test_half": half})


def bench_from_record(record, *, ratio: Optional[float] = RESERVED_RATIO, seed: int = 0, device: str = "auto",
                      index_file: Optional[str] = None, model: Optional[nn.Module] = None,
                      data: str = "clean", eval_batch_size: Optional[int] = None, precision: Any = "fp32") -> Bench:
    """A Bench from a loaded AttackRecord: the reserved set is BackdoorBench's draw (`data="none"`: no
    reserved set); `model` replaces the record's (e.g. a checkpoint's weights)."""
    device = resolve_device(device)
    index = reserved_indices(len(record.clean_train), ratio, index_file, seed) if data != "none" else None
    identity = {"record": str(Path(record.folder).resolve()), "ratio": None if index_file else ratio,
                "index_file": index_file, "reserved": 0 if index is None else len(index), "seed": seed}
    model = model if model is not None else model_from_record(record)
    reserved = None if index is None else record.clean_train.subset(index)
    return Bench(model.to(device), record.spec, reserved, record.clean_test, poisoned_only(record.bd_test), device,
                 seed, identity, Path(record.folder), eval_batch_size, record.model_name, precision)
