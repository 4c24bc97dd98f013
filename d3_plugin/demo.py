"""`d3-plugin demo`: plant a BadNets backdoor in Fashion-MNIST and remove it with FT and D3.

Steps: train a backdoored small CNN (cached by configuration, so a second run skips it), draw a 5 %
clean reserved set from the training data the way BackdoorBench does, run FT and D3 with the same
budget through `compare`, and write the table (Markdown/CSV/JSON), a bar chart and ACC/ASR curves.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .attacks import BadNets, TrainConfig, poison_test_set, poison_training_set, train_model
from . import registry
from .checks import is_integer
from .record_io.outputs import plot_panels
from .record_io.reserved import RESERVED_RATIO, reserved_indices
from .bench import Bench
from .compare import compare, text_table
from .files import ensure_writable, torch_save
from .data import Loader, dataset_spec, load_dataset
from .evaluation import evaluate
from .models import build_model
from .training import resolve_device, seed_everything


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data_root: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    model: str = "small_cnn"
    poison_ratio: float = 0.1
    target: int = 0
    train_size: Optional[int] = None  # None: all 60,000 training images
    attack: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6))
    defenses: tuple = ("ft", "d3")
    defense_epochs: int = 60
    defense_lr: float = 0.03  # FT's and D3's θs' (the rest: small_cnn's lr_rest); 60 epochs, not the authors' 100
    reserved_ratio: float = RESERVED_RATIO
    curve_samples: int = 2000  # per-epoch curves use this many clean and poisoned test images

    def defense_overrides(self, name: str) -> Dict:
        return {"lr": self.defense_lr} if "lr" in registry.field_names(registry.get(name).config) else {}

    def check(self) -> None:
        """Every setting checked, in one line, before any data is read or model trained."""
        if self.train_size is not None and not (is_integer(self.train_size) and self.train_size >= 1):
            raise ValueError(f"--train-size must be an integer ≥ 1 (leave it out for all images), "
                             f"got {self.train_size}")
        if not (is_integer(self.attack.epochs) and self.attack.epochs >= 1):
            raise ValueError(f"--attack-epochs must be an integer ≥ 1, got {self.attack.epochs}")
        for name in self.defenses:  # the registry checks the budget, lr and seed as compare will use them
            registry.build(name, "fashion_mnist", model=self.model, budget=self.defense_epochs,
                           run={"seed": self.seed}, **self.defense_overrides(name))


def _cache_key(config: DemoConfig) -> str:
    keys = ("model", "poison_ratio", "target", "train_size", "seed")
    payload = {k: getattr(config, k) for k in keys} | {"attack": asdict(config.attack), "trigger": "badnets-3",
                                                       "spec": asdict(dataset_spec("fashion_mnist"))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _backdoored_model(config: DemoConfig, poisoned, spec, device) -> torch.nn.Module:
    """Train (or load from the cache) the backdoored model."""
    model = build_model(config.model, spec.num_classes, spec.channels, spec.size)
    cache = Path(config.out) / "cache" / f"backdoored_{config.model}_{_cache_key(config)}.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        print(f"using cached backdoored model {cache}")
        return model.to(device)
    model, _ = train_model(model, poisoned, spec, config.attack, device=device, progress="train backdoored model")
    torch_save({k: v.cpu() for k, v in model.state_dict().items()}, cache)
    return model


def _curve_tracker(bench: Bench, samples: int):
    """An on_epoch callback evaluating ACC/ASR on fixed test subsets (cheap per-epoch curves)."""
    generator = torch.Generator().manual_seed(bench.seed)
    pick = lambda data: data.subset(torch.randperm(len(data), generator=generator)[:samples])
    clean = Loader(pick(bench.clean_test), bench.spec, 1024, device=bench.device)
    backdoor = Loader(pick(bench.bd_test), bench.spec, 1024, device=bench.device)
    return lambda epoch, model: evaluate(model, clean, backdoor)


def plot_curves(rows: List[Dict], path: Path) -> Path:
    """ACC and ASR (%) per epoch for every defense row that carries a history; the no-defense level as a
    flat line."""
    longest = max((len(row.get("history") or []) for row in rows), default=1)
    panels = []
    for key, title in (("acc", "clean accuracy (ACC)"), ("asr", "attack success rate (ASR)")):
        curves = {row["defense"]: [100 * h[key] for h in row["history"]] if row.get("history")
                  else [100 * row[key]] * longest for row in rows if row.get("history") or row.get(key) is not None}
        panels.append((title, curves, "%", (0, 100)))
    return plot_panels(path, panels, figsize=(10, 3.8))


def run_demo(config: DemoConfig) -> List[Dict]:
    config.check()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    out = ensure_writable(config.out)
    spec = dataset_spec("fashion_mnist")
    train = load_dataset("fashion_mnist", True, config.data_root)
    test = load_dataset("fashion_mnist", False, config.data_root)
    if config.train_size:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
                             [:config.train_size])
    trigger = BadNets()
    poisoned = poison_training_set(train, trigger, config.poison_ratio, config.target, seed=config.seed)
    model = _backdoored_model(config, poisoned, spec, device)
    index = reserved_indices(len(train), config.reserved_ratio, None, config.seed)
    bench = Bench(model, spec, train.subset(index), test, poison_test_set(test, trigger, config.target), device,
                  config.seed, identity={"demo": _cache_key(config), "reserved": len(index)},
                  model_name=config.model)
    bench.track = _curve_tracker(bench, config.curve_samples)
    overrides = {name: config.defense_overrides(name) for name in config.defenses}
    rows = compare(bench, list(config.defenses), epochs=config.defense_epochs, overrides=overrides, out=out)
    plot_curves(rows, out / "curves.png")
    print(text_table(rows))
    print(f"wrote {out}/compare.md, compare.csv, compare.json, compare.png, curves.png")
    return rows
