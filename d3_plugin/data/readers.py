"""Readers for datasets on disk. Nothing is ever downloaded: a missing dataset is a clear error."""
from __future__ import annotations

import csv
import gzip
import os
import pickle
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from .images import DatasetSpec, ImageSet

FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")

SPECS = {
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, 1, 28, (0.5,), (0.5,), crop_padding=4),
    "mnist": DatasetSpec("mnist", 10, 1, 28, (0.5,), (0.5,), crop_padding=4),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
                           crop_padding=4, horizontal_flip=True),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": DatasetSpec("gtsrb", 43, 3, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": DatasetSpec("tiny", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


class DatasetNotFound(FileNotFoundError):
    """Raised when a dataset's files are missing; the message says where we looked and how to get them."""


def dataset_spec(name: str) -> DatasetSpec:
    key = name.lower().replace("-", "_")
    if key not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(SPECS))}")
    return SPECS[key]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes; re-install the dataset")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); re-install it")
    return data.reshape(dims)


def _find_idx(folders: Iterable[Path], stem: str) -> Optional[Path]:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _mnist_like_folders(root: Optional[Path], torchvision_name: str) -> list[Path]:
    candidates = []
    if root is not None:
        candidates += [root, root / torchvision_name / "raw", root / "raw"]
    return candidates


def load_mnist_like(train: bool, root: Optional[str | os.PathLike] = None, *, fashion: bool = True) -> ImageSet:
    """Fashion-MNIST or MNIST from idx files (plain or .gz): a folder holding them directly, or
    torchvision's `<root>/FashionMNIST/raw` / `<root>/MNIST/raw` layout."""
    torchvision_name = "FashionMNIST" if fashion else "MNIST"
    env_root = os.environ.get("D3_FASHION_MNIST" if fashion else "D3_MNIST")
    roots = [Path(r) for r in (root, env_root) if r]
    if fashion and root is None:
        roots.append(FASHION_MNIST_DEFAULT)
    folders = [f for r in roots for f in _mnist_like_folders(r, torchvision_name)]
    prefix = "train" if train else "t10k"
    images_path = _find_idx(folders, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folders, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        how = ("install it with `apt-get install dataset-fashion-mnist` or pass --data_root with the idx files"
               if fashion else "pass --data_root pointing at torchvision's MNIST folder")
        raise DatasetNotFound(f"{torchvision_name} {prefix} idx files not found in "
                              f"{', '.join(map(str, folders)) or '(no folder given)'}; {how}")
    images = torch.from_numpy(_read_idx(images_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    return ImageSet(images, labels)


def load_cifar(train: bool, root: str | os.PathLike, *, classes: int = 10) -> ImageSet:
    """CIFAR-10/100 in torchvision's python-batch layout (`cifar-10-batches-py` / `cifar-100-python`)."""
    root = Path(root)
    folder_name = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    folder = root / folder_name if (root / folder_name).is_dir() else root
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        names = ["train"] if train else ["test"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFound(f"CIFAR-{classes} batches {', '.join(missing)} not found in {folder}; download "
                              f"torchvision's CIFAR{classes} python version and unpack it there")
    images, labels = [], []
    for name in names:
        batch = _read_cifar_batch(folder / name)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels" if classes == 10 else "fine_labels"])
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long))


class _PlainDataUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of plain dicts, lists, bytes and numpy arrays; refuse anything else.
    (`_codecs.encode` is how Python 3 writes bytes at pickle protocol 2: str → bytes, nothing else.)"""

    ALLOWED = {("_codecs", "encode"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR batch file")


def _read_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        batch = _PlainDataUnpickler(f, encoding="latin1").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


# The file types torchvision's ImageFolder accepts (BackdoorBench's Tiny-ImageNet is an ImageFolder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pil_to_tensor(image, channels: int, size: Optional[int] = None) -> torch.Tensor:
    """A PIL image as uint8 (C, H, W) with `channels` channels, resized (bilinear, like torchvision's
    Resize on PIL images) to size x size when it differs."""
    from PIL import Image
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.array(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_images(paths: list[Path], labels: list[int], channels: int, size: int, what: str) -> ImageSet:
    from PIL import Image
    if not paths:
        raise DatasetNotFound(f"no {what} images found; check the dataset folder")
    images = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                images[i] = pil_to_tensor(image, channels, size)
        except FileNotFoundError:
            raise DatasetNotFound(f"{what} image {path} is missing; re-install the dataset") from None
    return ImageSet(images, torch.tensor(labels, dtype=torch.long))


def _gtsrb_csv(csv_path: Path, folder: Path) -> tuple[list[Path], list[int]]:
    if not csv_path.is_file():
        raise DatasetNotFound(f"GTSRB annotation file {csv_path} not found; unpack GTSRB's Train/ and Test/ "
                              f"folders (with their GT-*.csv files) into {csv_path.parent.parent}")
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))[1:]
    return [folder / row[0] for row in rows if row], [int(row[7]) for row in rows if row]


def load_gtsrb(train: bool, root: str | os.PathLike, size: int = 32) -> ImageSet:
    """GTSRB as BackdoorBench reads it: `Train/000NN/GT-000NN.csv` for classes 0-42 in order, and
    `Test/GT-final_test.csv`; column 0 is the file, column 7 the class. Images are resized to size x size."""
    root = Path(root)
    paths, labels = [], []
    if train:
        for c in range(43):
            folder = root / "Train" / f"{c:05d}"
            p, l = _gtsrb_csv(folder / f"GT-{c:05d}.csv", folder)
            paths += p
            labels += l
    else:
        paths, labels = _gtsrb_csv(root / "Test" / "GT-final_test.csv", root / "Test")
    return _read_images(paths, labels, 3, size, "GTSRB")


def _image_folder(split: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """torchvision ImageFolder's order: classes sorted, then files of each class's tree in sorted walk order."""
    paths, labels = [], []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(split / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(Path(folder) / file)
                    labels.append(index)
    return paths, labels


def load_tiny(train: bool, root: str | os.PathLike) -> ImageSet:
    """Tiny-ImageNet-200 as BackdoorBench's ImageFolder reads `tiny-imagenet-200/{train,val}`. The val split
    may still be in the download's layout (`val/images` + `val_annotations.txt`); it is read in place, in the
    order BackdoorBench's reorganised folder would give, without moving any file."""
    root = Path(root)
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DatasetNotFound(f"Tiny-ImageNet folder {base / 'train'} not found; unpack tiny-imagenet-200.zip "
                              f"into {root}")
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if train:
        paths, labels = _image_folder(train_dir, classes)
    else:
        val = base / "val"
        annotations = val / "val_annotations.txt"
        if annotations.is_file() and (val / "images").is_dir():
            index = {name: i for i, name in enumerate(classes)}
            rows = [line.split() for line in annotations.read_text().splitlines() if line.strip()]
            pairs = sorted((index[row[1]], row[0]) for row in rows)
            paths, labels = [val / "images" / file for _, file in pairs], [c for c, _ in pairs]
        else:
            val_classes = sorted(entry.name for entry in os.scandir(val) if entry.is_dir()) if val.is_dir() else []
            if val_classes and val_classes != classes:
                raise DatasetNotFound(f"{val} has {len(val_classes)} class folders but train has {len(classes)}; "
                                      f"re-unpack Tiny-ImageNet")
            paths, labels = _image_folder(val, classes)
    return _read_images(paths, labels, 3, 64, "Tiny-ImageNet")


def load_dataset(name: str, train: bool, root: Optional[str | os.PathLike] = None) -> ImageSet:
    """Load a dataset by name from `root` (Fashion-MNIST also looks in the Debian package's folder)."""
    spec = dataset_spec(name)
    if spec.name in ("fashion_mnist", "mnist"):
        return load_mnist_like(train, root, fashion=spec.name == "fashion_mnist")
    if root is None:
        raise DatasetNotFound(f"{spec.name} needs a data root (--data_root) holding its files")
    if spec.name in ("cifar10", "cifar100"):
        return load_cifar(train, root, classes=spec.num_classes)
    if spec.name == "gtsrb":
        return load_gtsrb(train, root, spec.size)
    return load_tiny(train, root)
