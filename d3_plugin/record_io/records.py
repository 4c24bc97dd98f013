"""BackdoorBench attack/defense result files: read safely, rebuild datasets, write the same format.

An attack record is `<checkout>/record/<name>/attack_result.pt` plus PNG folders of poisoned samples. Its
`bd_train` / `bd_test` entries are the state of BackdoorBench's poisoned dataset: `original_index_array`
(which samples of the clean split, in order), `poison_indicator` (per clean sample, 1 = poisoned) and a
container whose `data_dict[index]` is either `(PIL image, bd_label, original_label)` or
`{'path': './record/<name>/bd_*_dataset/<label>/<index>.png', 'other_info': [bd_label, original_label]}`.
Sample i is the container's entry for `original_index_array[i]` when poisoned, else the clean sample.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data.images import DatasetSpec, ImageSet
from ..files import torch_save
from ..data.readers import DatasetNotFound, dataset_spec, pil_to_tensor
from ..models import build_model, head_layer
from .datasets import SPLIT_SIZES, dataset_folder, load_clean_split, spec_name
from .safe_load import CheckpointError, safe_torch_load

ATTACK_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")


@dataclass
class AttackRecord:
    """Everything in an attack record, with the datasets rebuilt as uint8 ImageSets."""

    folder: Path
    checkout_root: Path
    model_name: str
    num_classes: int
    dataset: str
    spec: DatasetSpec
    img_size: tuple
    state_dict: dict
    clean_train: ImageSet
    clean_test: ImageSet
    bd_test: ImageSet
    bd_train: Optional[ImageSet] = None
    raw: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- loading

def strip_module_prefix(state_dict: dict) -> dict:
    """Drop DataParallel's `module.` prefixes (keeping key order); tensors are moved to the CPU."""
    return {(k[7:] if k.startswith("module.") else k): v.detach().cpu() if torch.is_tensor(v) else v
            for k, v in state_dict.items()}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                      for k, v in obj.items())


def load_model_checkpoint(path: str | os.PathLike) -> tuple[Optional[str], Optional[int], dict]:
    """(model_name, num_classes, state_dict) from an attack_result.pt, a defense_result.pt or a bare state
    dict (also `{'state_dict': ...}` / `{'model_state_dict': ...}`); names unknown to the file are None."""
    loaded = safe_torch_load(path)
    if _is_state_dict(loaded):
        return None, None, strip_module_prefix(loaded)
    if isinstance(loaded, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if _is_state_dict(loaded.get(key)):
                num_classes = loaded.get("num_classes")
                return (loaded.get("model_name"), class_count(num_classes, path) if num_classes is not None else None,
                        strip_module_prefix(loaded[key]))
    raise CheckpointError(f"{path} holds no model state dict (expected attack_result.pt, defense_result.pt "
                          f"or a state dict of tensors); pass a model checkpoint")


def class_count(value, path) -> int:
    """A file's `num_classes`: an integer ≥ 2 (a classifier needs two classes; a negative count breaks torch)."""
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or value < 2:
        raise CheckpointError(f"{path}: num_classes is {value!r}, not an integer ≥ 2; fix the file's num_classes "
                              f"or re-create it")
    return int(value)


def _attack_file(path_or_folder: str | os.PathLike) -> Path:
    path = Path(path_or_folder)
    return path / "attack_result.pt" if path.is_dir() else path


def _checkout_root(folder: Path) -> Path:
    """The directory holding `record/` (BackdoorBench: the .pt path up to `record`)."""
    resolved = folder.resolve()
    for parent in [resolved, *resolved.parents]:
        if parent.name == "record":
            return parent.parent
    return resolved.parent


def load_attack_result(path_or_record_folder: str | os.PathLike, data_root: Optional[str | os.PathLike] = None,
                       *, load_bd_train: bool = True) -> AttackRecord:
    """Read `record/<name>/attack_result.pt` safely and rebuild clean train/test and poisoned test (and
    train) sets. `data_root` overrides the dataset folder derived from the record's `data_path`."""
    pt = _attack_file(path_or_record_folder)
    loaded = safe_torch_load(pt)
    missing = [k for k in ATTACK_KEYS if not isinstance(loaded, dict) or k not in loaded]
    if missing:
        raise CheckpointError(f"{pt} is not a BackdoorBench attack result (missing {', '.join(missing)}); "
                              f"pass record/<attack>/attack_result.pt")
    if not _is_state_dict(loaded["model"]):
        raise CheckpointError(f"{pt}: its `model` is a {type(loaded['model']).__name__}, not a state_dict of "
                              f"tensors; re-save the attack result with model.state_dict()")
    num_classes = class_count(loaded["num_classes"], pt)
    folder = pt.resolve().parent
    root = _checkout_root(folder)
    name = spec_name(loaded["clean_data"])
    spec = _spec_for(name, loaded["img_size"])
    data = Path(data_root) if data_root is not None else dataset_folder(root, loaded["data_path"])
    named = data_root is not None  # a folder the user names is used or refused, never replaced
    clean_train = load_clean_split(name, True, data, spec.size, system_copy=not named)
    clean_test = load_clean_split(name, False, data, spec.size, system_copy=not named)
    bd_test = rebuild_bd_set(loaded["bd_test"], clean_test, spec, root, folder, "bd_test")
    bd_train = None
    if load_bd_train and loaded["bd_train"] is not None:
        bd_train = rebuild_bd_set(loaded["bd_train"], clean_train, spec, root, folder, "bd_train")
    return AttackRecord(folder=folder, checkout_root=root, model_name=str(loaded["model_name"]),
                        num_classes=num_classes, dataset=name, spec=spec,
                        img_size=tuple(int(v) for v in loaded["img_size"]),
                        state_dict=strip_module_prefix(loaded["model"]), clean_train=clean_train,
                        clean_test=clean_test, bd_test=bd_test, bd_train=bd_train, raw=_summary(loaded))


def _spec_for(name: str, img_size: Sequence[int]) -> DatasetSpec:
    spec = dataset_spec(name)
    if img_size is not None and len(img_size) >= 2 and int(img_size[0]) != spec.size:
        if int(img_size[0]) != int(img_size[1]):
            raise ValueError(f"non-square img_size {list(img_size)} is not supported")
        spec = dataclasses.replace(spec, size=int(img_size[0]))
    return spec


def _summary(loaded: dict) -> dict:
    """The record's small entries, with the poisoned sets summarised (counts instead of samples)."""
    raw = {k: v for k, v in loaded.items() if k not in ("model", "bd_train", "bd_test")}
    for key in ("bd_train", "bd_test"):
        state = loaded.get(key)
        raw[key] = None if state is None else {
            "samples": len(state["original_index_array"]),
            "poisoned_in_split": int(np.asarray(state["poison_indicator"]).sum()),
            "container_entries": len(state["bd_data_container"]["data_dict"])}
    return raw


def rebuild_bd_set(state: dict, clean: ImageSet, spec: DatasetSpec, checkout_root: Path, folder: Path,
                   what: str) -> ImageSet:
    """A poisoned dataset state (see module doc) applied to its clean split, as an ImageSet."""
    try:
        order = np.asarray(state["original_index_array"], dtype=np.int64)
        indicator = np.asarray(state["poison_indicator"])
        entries = {int(k): v for k, v in state["bd_data_container"]["data_dict"].items()}
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{what} in {folder / 'attack_result.pt'} is not a BackdoorBench dataset state "
                              f"(missing {error}); re-create the record") from None
    if len(indicator) != len(clean) or (len(order) and (order.min() < 0 or order.max() >= len(clean))):
        raise CheckpointError(f"{what} in {folder} was made on a split of {len(indicator)} images, but the dataset "
                              f"read for it has {len(clean)}; point --data_root at the data the attack used")
    subset = clean.subset(torch.from_numpy(order))
    images, labels, originals = subset.images.clone(), subset.labels.clone(), subset.original_labels.clone()
    poisoned = torch.from_numpy(indicator[order] == 1)
    for i in torch.nonzero(poisoned).flatten().tolist():
        index = int(order[i])
        if index not in entries:
            raise CheckpointError(f"{what} marks sample {index} poisoned but holds no data for it; "
                                  f"re-create the record")
        image, bd_label, original = _entry(entries[index], checkout_root, folder, what)
        images[i] = pil_to_tensor(image, spec.channels, spec.size)
        labels[i], originals[i] = int(bd_label), int(original)
    return ImageSet(images, labels, originals, poisoned, torch.from_numpy(order.copy()))


def _entry(value: Any, checkout_root: Path, folder: Path, what: str):
    """(PIL image, bd_label, original_label) of one container entry, in memory or on disk."""
    from PIL import Image
    if isinstance(value, dict):
        path = _png_path(str(value["path"]), checkout_root, folder)
        with Image.open(path) as image:
            image.load()
            return (image.copy(), *list(value["other_info"])[:2])
    image, bd_label, original = value[0], value[1], value[2]
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    return image, bd_label, original


def _png_path(stored: str, checkout_root: Path, folder: Path) -> Path:
    """A stored PNG path: absolute, or relative to the checkout root; a record folder that was moved or
    renamed is found through the path's part after `record/<name>/`."""
    candidates = [Path(stored) if os.path.isabs(stored) else checkout_root / stored]
    parts = Path(stored).parts
    if "record" in parts and len(parts) > parts.index("record") + 2:
        candidates.append(folder.joinpath(*parts[parts.index("record") + 2:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetNotFound(f"poisoned sample {stored} not found (looked in {', '.join(map(str, candidates))}); "
                          f"copy the record's bd_*_dataset folders with it")


# ---------------------------------------------------------------------------------------------- models

def _infer_in_channels(state_dict: dict) -> int:
    first_conv = next((v for v in state_dict.values() if torch.is_tensor(v) and v.dim() == 4), None)
    return int(first_conv.shape[1]) if first_conv is not None else 3


def _head_layer(model_name: str, state_dict: dict) -> Optional[str]:
    """The classifier module: the architecture's head (a conv for SqueezeNet), else the last matrix's module."""
    head = head_layer(model_name)
    if head and f"{head}.weight" in state_dict:
        return head
    matrices = [k for k, v in state_dict.items() if k.endswith(".weight") and torch.is_tensor(v) and v.dim() == 2]
    return matrices[-1][: -len(".weight")] if matrices else None


def _infer_num_classes(model_name: str, state_dict: dict) -> Optional[int]:
    layer = _head_layer(model_name, state_dict)
    return int(state_dict[f"{layer}.weight"].shape[0]) if layer else None


def model_from_record(record_or_triplet, model_name: Optional[str] = None) -> nn.Module:
    """Our model for an AttackRecord or a (model_name, num_classes, state_dict) triplet, loaded strictly.
    `model_name` overrides (or supplies, for bare state dicts) the architecture."""
    if isinstance(record_or_triplet, AttackRecord):
        record = record_or_triplet
        name, classes, state = record.model_name, record.num_classes, record.state_dict
        channels, size = record.spec.channels, record.spec.size
    else:
        name, classes, state = record_or_triplet
        channels, size = _infer_in_channels(state), 32
    name = model_name or name
    if not name:
        raise ValueError("the checkpoint does not name its architecture; pass the model name (--model)")
    classes = classes if classes is not None else _infer_num_classes(name, state)
    if classes is None:
        raise ValueError(f"cannot tell the number of classes of this {name} checkpoint; pass it explicitly")
    model = build_model(name, int(classes), in_channels=channels, image_size=size)
    model.load_state_dict(align_state_dict(model, state, name, int(classes)), strict=True)
    broken = [key for key, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:
        raise ValueError(f"the {name} checkpoint has non-finite values in {len(broken)} tensor(s) (first: "
                         f"{broken[0]}); the training that made it diverged: retrain it or pick another checkpoint")
    return model


def align_state_dict(model: nn.Module, state: dict, name: str = "model", num_classes: int = 0) -> dict:
    """`state` with keys matching `model`: as is, or renamed by position when only names differ and every
    shape agrees (as BackdoorBench does). Otherwise one line naming the first offending keys."""
    expected = model.state_dict()
    state = strip_module_prefix(state)
    if list(state) != list(expected) and set(state) == set(expected):
        state = {k: state[k] for k in expected}
    if list(state) != list(expected):
        shapes_align = len(state) == len(expected) and all(
            tuple(a.shape) == tuple(b.shape) for a, b in zip(state.values(), expected.values()))
        if not shapes_align:
            missing = [k for k in expected if k not in state][:3]
            unexpected = [k for k in state if k not in expected][:3]
            raise ValueError(f"checkpoint keys do not match {name}: missing {missing or 'none'}, unexpected "
                             f"{unexpected or 'none'} ({len(state)} vs {len(expected)} keys); check the model name")
        state = dict(zip(expected, state.values()))
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        key, got, want = wrong[0]
        if key.rsplit(".", 1)[0] == _head_layer(name, expected) and got[:1] != want[:1]:
            raise ValueError(f"class count mismatch: the checkpoint's {key} has {got[0]} classes but "
                             f"{num_classes} were asked for; pass the right number of classes")
        listed = ", ".join(f"{k} {g} vs {w}" for k, g, w in wrong[:3])
        raise ValueError(f"checkpoint shapes do not match {name} (checkpoint vs model): {listed}; "
                         f"check the model name and input channels")
    return state


# ---------------------------------------------------------------------------------------------- writing

def _cpu_state(state_dict: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def write_defense_result(path: str | os.PathLike, model_name: str, num_classes: int, state_dict: dict) -> Path:
    """BackdoorBench's defense_result.pt: {'model_name', 'num_classes', 'model'} with CPU tensors, atomically."""
    path = Path(path)
    torch_save({"model_name": model_name, "num_classes": int(num_classes), "model": _cpu_state(state_dict)},
               path)
    return path


def _tensor_to_pil(image: torch.Tensor):
    from PIL import Image
    array = image.detach().cpu().numpy()
    return Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0))


def _write_bd_split(data: ImageSet, split_size: int, staging: Path, subfolder: str, stored_prefix: str) -> dict:
    """PNGs of `data`'s poisoned samples under staging/subfolder, and BackdoorBench's dataset state."""
    order = data.source_index.numpy().astype(np.int64)
    if len(order) and (order.min() < 0 or order.max() >= split_size):
        raise ValueError(f"{subfolder}: source indices exceed the clean split size {split_size}; "
                         f"pass the split size (clean_train_size / clean_test_size)")
    indicator = np.zeros(split_size, dtype=np.float64)
    data_dict = {}
    save_folder = f"{stored_prefix}/{subfolder}"
    for i in torch.nonzero(data.poisoned).flatten().tolist():
        index, original = int(order[i]), int(data.original_labels[i])
        (staging / subfolder / str(original)).mkdir(parents=True, exist_ok=True)
        _tensor_to_pil(data.images[i]).save(staging / subfolder / str(original) / f"{index}.png")
        indicator[index] = 1
        data_dict[np.int64(index)] = {"path": f"{save_folder}/{original}/{index}.png",
                                      "other_info": [int(data.labels[i]), original]}
    container = {"save_folder_path": save_folder, "data_dict": data_dict, "save_file_format": ".png"}
    return {"bd_data_container": container, "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": order, "poison_indicator": indicator, "save_folder_path": save_folder}


def write_attack_record(folder: str | os.PathLike, *, model_name: str, num_classes: int, state_dict: dict,
                        dataset: str, data_path: str, img_size: Sequence[int], bd_train: Optional[ImageSet],
                        bd_test: ImageSet, clean_train_size: Optional[int] = None,
                        clean_test_size: Optional[int] = None, extra: Optional[dict] = None) -> Path:
    """Write `<checkout>/record/<name>/` in BackdoorBench's format (attack_result.pt + PNG folders), so its
    own loader and ours read it. ImageSets carry clean-split indices in `source_index`; only poisoned
    samples are stored. PNG folders are staged and swapped in, then attack_result.pt is replaced atomically."""
    folder = Path(folder)
    if folder.parent.name != "record":
        raise ValueError(f"{folder} must be <checkout>/record/<name>: BackdoorBench resolves the record's "
                         f"paths against the folder holding record/")
    name = spec_name(dataset)
    sizes = SPLIT_SIZES[name]
    train_size, test_size = clean_train_size or sizes[0], clean_test_size or sizes[1]
    folder.mkdir(parents=True, exist_ok=True)
    stored_prefix = f"./record/{folder.name}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        states = {"bd_test": _write_bd_split(bd_test, test_size, staging, "bd_test_dataset", stored_prefix),
                  "bd_train": None if bd_train is None else
                  _write_bd_split(bd_train, train_size, staging, "bd_train_dataset", stored_prefix)}
        result = {"model_name": model_name, "num_classes": int(num_classes), "model": _cpu_state(state_dict),
                  "data_path": data_path, "img_size": [int(v) for v in img_size], "clean_data": dataset,
                  "bd_train": states["bd_train"], "bd_test": states["bd_test"], **(extra or {})}
        torch_save(result, staging / "attack_result.pt")
        for sub in ("bd_train_dataset", "bd_test_dataset"):
            _swap_in(staging / sub, folder / sub)
        os.replace(staging / "attack_result.pt", folder / "attack_result.pt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _swap_in(new: Path, target: Path) -> None:
    """Replace folder `target` by `new` (or remove it when `new` does not exist)."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    if new.exists():
        os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
