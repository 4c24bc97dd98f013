"""The clean datasets behind a BackdoorBench record, rebuilt the way its loader does."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..data.images import ImageSet
from ..data.readers import DatasetNotFound, load_cifar, load_dataset, load_gtsrb, load_mnist_like, load_tiny

# BackdoorBench's `clean_data` names (plus our Fashion-MNIST spellings) -> our dataset spec names.
DATASET_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "gtsrb": "gtsrb", "tiny": "tiny",
                 "mnist": "mnist", "fashion_mnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
                 "fashion-mnist": "fashion_mnist"}
# Sizes of the clean (train, test) sets, for poison indicators when the writer is not told them.
SPLIT_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "gtsrb": (39209, 12630),
               "tiny": (100000, 10000), "mnist": (60000, 10000), "fashion_mnist": (60000, 10000)}
_HOW = {"cifar10": "unpack torchvision's cifar-10-python.tar.gz there",
        "cifar100": "unpack torchvision's cifar-100-python.tar.gz there",
        "gtsrb": "put GTSRB's Train/ and Test/ folders there",
        "tiny": "unpack tiny-imagenet-200.zip there",
        "mnist": "put torchvision's MNIST/raw idx files there",
        "fashion_mnist": "put the Fashion-MNIST idx files there or install dataset-fashion-mnist"}


def spec_name(clean_data: str) -> str:
    """Our dataset name for a record's `clean_data`."""
    key = str(clean_data).lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"unsupported dataset {clean_data!r} in the record; supported: "
                         f"{', '.join(sorted(set(DATASET_NAMES)))}")
    return DATASET_NAMES[key]


def dataset_folder(checkout_root: Path, data_path: str) -> Path:
    """BackdoorBench's rule: the checkout root joined with `data_path` from its first `data` on
    (`./data/cifar10` -> `<root>/data/cifar10`); an absolute path without `data` is used as is."""
    data_path = str(data_path)
    if "data" in data_path:
        return checkout_root / data_path[data_path.index("data"):]
    return Path(data_path) if os.path.isabs(data_path) else checkout_root / data_path


def load_clean_split(name: str, train: bool, folder: Path, size: Optional[int] = None, *,
                     system_copy: bool = True) -> ImageSet:
    """One clean split of dataset `name` (our spec name) from `folder`, in BackdoorBench's sample order.
    `system_copy`: Fashion-MNIST may come from the Debian package when `folder` lacks it (never when the
    user named the folder)."""
    try:
        if name in ("mnist", "fashion_mnist"):
            return _mnist_like(name, train, folder, system_copy)
        if not folder.is_dir():
            raise DatasetNotFound(f"dataset folder {folder} for {name} does not exist")
        if name in ("cifar10", "cifar100"):
            return load_cifar(train, folder, classes=10 if name == "cifar10" else 100)
        if name == "gtsrb":
            return load_gtsrb(train, folder, size or 32)
        return load_tiny(train, folder)
    except DatasetNotFound as error:
        raise DatasetNotFound(f"{error} ({_HOW[name]}, or pass the dataset folder as data_root / "
                              f"--data_root)") from None


def _mnist_like(name: str, train: bool, folder: Path, system_copy: bool) -> ImageSet:
    fashion = name == "fashion_mnist"
    if not folder.is_dir() and not (fashion and system_copy):
        raise DatasetNotFound(f"dataset folder {folder} for {name} does not exist")
    try:
        return load_mnist_like(train, folder, fashion=fashion)
    except DatasetNotFound:
        if not (fashion and system_copy):
            raise
    # Fashion-MNIST is the same data wherever it is installed: use the system copy when the checkout has none.
    return load_dataset("fashion_mnist", train)
