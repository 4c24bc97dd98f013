"""An attack run end to end: poison, train (optionally SAM-flatten), evaluate every epoch, and save a
BackdoorBench record folder: attack_result.pt + bd_*_dataset/ PNGs (through the BackdoorBench adapter's
writer), attack_df.csv / attack_df_summary.csv (per-epoch metrics, BackdoorBench's column names) and
attack_info.json (attack, parameters, training settings, flatness before/after SAM)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..data import DatasetSpec, ImageSet, Loader
from ..record_io.outputs import write_metric_table, write_summary_table
from ..evaluation import evaluate
from ..files import write_text

# our history keys → BackdoorBench's attack_df.csv columns
COLUMNS = {"loss": "train_epoch_loss_avg_over_batch", "clean_loss": "clean_test_loss_avg_over_batch",
           "bd_loss": "bd_test_loss_avg_over_batch", "acc": "test_acc", "asr": "test_asr", "ra": "test_ra"}


def write_attack_df(folder: Path, history: List[Dict[str, float]]) -> None:
    """attack_df.csv (one row per epoch, BackdoorBench's columns plus `phase`: train/sam) and
    attack_df_summary.csv (rows last, valid_max, exist_nan_value), in BackdoorBench's table layout."""
    metrics = [{name: row.get(key, float("nan")) for key, name in COLUMNS.items()} for row in history]
    write_metric_table(folder / "attack_df.csv",
                       [{"phase": row.get("phase", "train"), **m} for row, m in zip(history, metrics)])
    write_summary_table(folder / "attack_df_summary.csv", metrics)


def write_attack_info(folder: Path, info: dict) -> None:
    write_text(folder / "attack_info.json", json.dumps(info, indent=2, default=str) + "\n")


def epoch_evaluator(clean_test: ImageSet, bd_test: ImageSet, spec: DatasetSpec, device, phase: str = "train",
                    batch_size: int = 512):
    """An `on_epoch` callback: ACC / ASR / RA and test losses after each epoch."""
    clean = Loader(clean_test, spec, batch_size, device=device)
    backdoor = Loader(bd_test, spec, batch_size, device=device)

    def on_epoch(epoch: int, model: nn.Module) -> Dict[str, float]:
        return {**evaluate(model, clean, backdoor), "phase": phase}
    return on_epoch


def flatness_batches(bd_test: ImageSet, spec: DatasetSpec, device, samples: int = 1000, seed: int = 0,
                     batch_size: int = 500) -> list:
    """A fixed, seeded sample of the poisoned test set as batches, for the backdoor-loss flatness."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(bd_test), generator=generator)[:samples].sort().values
    return list(Loader(bd_test.subset(index), spec, batch_size, device=device))


def save_record(folder: str | os.PathLike, model: nn.Module, *, model_name: str, num_classes: int,
                spec: DatasetSpec, poisoned_train: Optional[ImageSet], bd_test: ImageSet,
                history: List[Dict[str, float]], info: dict, data_path: Optional[str] = None,
                clean_train_size: Optional[int] = None, clean_test_size: Optional[int] = None) -> Path:
    """Write the whole record folder (see module doc); `folder` must be <checkout>/record/<name>."""
    from ..record_io.records import write_attack_record

    folder = Path(folder)
    write_attack_record(folder, model_name=model_name, num_classes=num_classes,
                        state_dict=model.state_dict(), dataset=spec.name,
                        data_path=data_path or f"./data/{spec.name}", img_size=[spec.size, spec.size, spec.channels],
                        bd_train=poisoned_train, bd_test=bd_test, clean_train_size=clean_train_size,
                        clean_test_size=clean_test_size)
    write_attack_df(folder, history)
    write_attack_info(folder, info)
    return folder
