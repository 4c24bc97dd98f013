"""Tensor data pipeline (Loader, augment) and the dataset readers (idx, CIFAR python batches)."""
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from d3_plugin.data import DatasetNotFound, DatasetSpec, ImageSet, Loader, augment, load_cifar, load_dataset
from d3_plugin.data.readers import FASHION_MNIST_DEFAULT, load_mnist_like

PLAIN = DatasetSpec("plain", 10, 1, 6, (0.0,), (1.0,), crop_padding=0)


def numbered_set(n=10, size=6):
    """Image i is filled with value i and labelled i, so batches show which samples they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return ImageSet(images, torch.arange(n))


# ---------------------------------------------------------------- Loader

def test_training_loader_covers_each_sample_once_per_epoch_in_new_orders():
    loader = Loader(numbered_set(10), PLAIN, 3, train=True, seed=0)
    assert len(loader) == 4
    orders = []
    for _ in range(3):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [3, 3, 3, 1]
        labels = torch.cat([y for _, y in batches])
        pixels = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in batches])
        assert torch.equal(labels, pixels)  # images and labels stay paired
        assert sorted(labels.tolist()) == list(range(10))
        orders.append(labels.tolist())
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert orders[0] != list(range(10))


def test_loader_same_seed_same_order_and_drop_last():
    first = [y.tolist() for _, y in Loader(numbered_set(10), PLAIN, 3, train=True, seed=5)]
    again = [y.tolist() for _, y in Loader(numbered_set(10), PLAIN, 3, train=True, seed=5)]
    other = [y.tolist() for _, y in Loader(numbered_set(10), PLAIN, 3, train=True, seed=6)]
    assert first == again and first != other
    dropped = Loader(numbered_set(10), PLAIN, 3, train=True, drop_last=True)
    assert len(dropped) == 3 and [len(y) for _, y in dropped] == [3, 3, 3]
    test_order = torch.cat([y for _, y in Loader(numbered_set(10), PLAIN, 4)])
    assert torch.equal(test_order, torch.arange(10))  # evaluation keeps the order


def test_loader_normalisation_is_exact():
    spec = DatasetSpec("rgb", 10, 3, 2, (0.5, 0.25, 0.0), (0.25, 0.5, 2.0), crop_padding=4)
    images = torch.randint(0, 256, (5, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x, _ = next(iter(Loader(ImageSet(images, torch.zeros(5)), spec, 8)))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean) / std
    assert x.dtype == torch.float32
    assert torch.allclose(x.double(), expected, atol=1e-5)


def test_empty_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        Loader(numbered_set(10).subset([]), PLAIN)


# ---------------------------------------------------------------- augment

def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(1, 256, (64, 2, 5, 6), generator=g, dtype=torch.uint8)  # no zero pixels
    out = augment(batch, 2, False, g)
    padded = torch.nn.functional.pad(batch, (2,) * 4)
    shifts = set()
    for i in range(len(batch)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], padded[i, :, dy:dy + 5, dx:dx + 6])]
        assert len(matches) == 1, i
        shifts.add(matches[0])
    assert len(shifts) > 10  # the offsets really vary


def test_flip_mirrors_about_half_the_images():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (200, 3, 4, 4), generator=g, dtype=torch.uint8)
    out = augment(batch, 0, True, g)
    flipped = torch.tensor([torch.equal(o, b.flip(2)) for o, b in zip(out, batch)])
    kept = torch.tensor([torch.equal(o, b) for o, b in zip(out, batch)])
    assert bool((flipped | kept).all())
    assert 60 < int(flipped.sum()) < 140
    assert torch.equal(augment(batch, 0, False, g), batch)


def test_training_loader_augments_with_the_spec():
    spec = DatasetSpec("aug", 10, 1, 6, (0.0,), (1.0,), crop_padding=3)
    data = ImageSet(torch.full((32, 1, 6, 6), 200, dtype=torch.uint8), torch.zeros(32))
    x, _ = next(iter(Loader(data, spec, 32, train=True)))
    assert (x == 0).any()  # zero padding shifted in
    x, _ = next(iter(Loader(data, spec, 32, train=False)))
    assert not (x == 0).any()


# ---------------------------------------------------------------- idx files

def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(array)
        if gz:
            with gzip.open(folder / (stem + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (folder / stem).write_bytes(raw)


@pytest.fixture
def fake_idx():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)


@pytest.fixture(autouse=True)
def no_env_roots(monkeypatch):
    monkeypatch.delenv("D3_FASHION_MNIST", raising=False)
    monkeypatch.delenv("D3_MNIST", raising=False)


@pytest.mark.parametrize("layout, gz", [(".", False), (".", True), ("FashionMNIST/raw", False),
                                        ("FashionMNIST/raw", True)])
def test_idx_reader_on_self_made_files(tmp_path, fake_idx, layout, gz):
    images, labels = fake_idx
    _write_idx_pair(tmp_path / layout, "t10k", images, labels, gz)
    data = load_dataset("fashion_mnist", False, tmp_path)
    assert data.images.shape == (7, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.labels, torch.from_numpy(labels).long())
    with pytest.raises(DatasetNotFound):  # only the test split was written
        load_dataset("fashion_mnist", True, tmp_path)


def test_truncated_or_foreign_idx_file_is_a_value_error(tmp_path, fake_idx):
    images, labels = fake_idx
    _write_idx_pair(tmp_path, "t10k", images, labels, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist_like(False, tmp_path)
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an idx file"):
        load_mnist_like(False, tmp_path)


def test_missing_folder_names_where_it_looked_and_how_to_install(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFound) as error:
        load_dataset("fashion_mnist", True, missing)
    message = str(error.value)
    assert str(missing) in message and str(missing / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert isinstance(error.value, FileNotFoundError)


def test_env_variable_root_is_searched(tmp_path, fake_idx, monkeypatch):
    images, labels = fake_idx
    _write_idx_pair(tmp_path / "env", "t10k", images, labels, gz=True)
    monkeypatch.setenv("D3_FASHION_MNIST", str(tmp_path / "env"))
    assert len(load_mnist_like(False)) == 7


@pytest.mark.skipif(not FASHION_MNIST_DEFAULT.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_files():
    train = load_dataset("fashion-mnist", True)
    test = load_dataset("fashion_mnist", False)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert 60 < train.images[:1000].float().mean() < 90  # Fashion-MNIST's mean pixel is ≈ 73


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", True)


# ---------------------------------------------------------------- CIFAR python batches

def _write_cifar(folder: Path, per_batch: int, protocol: int):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=protocol)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_python_batches(tmp_path, protocol):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", 3, protocol)
    train = load_dataset("cifar10", True, tmp_path)
    test = load_cifar(False, tmp_path / "cifar-10-batches-py")  # the batch folder itself also works
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    data, labels = written["data_batch_2"]
    image = train.images[3]  # first image of the second batch
    assert torch.equal(image[1], torch.from_numpy(data[0, 1024:2048].reshape(32, 32)))  # planes R, G, B
    assert train.labels[3:6].tolist() == labels
    assert test.labels.tolist() == written["test_batch"][1]


def test_cifar_missing_batches(tmp_path):
    with pytest.raises(DatasetNotFound, match="data_batch_1"):
        load_cifar(True, tmp_path)
    with pytest.raises(DatasetNotFound, match="data root"):
        load_dataset("cifar10", True)


class _Hostile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_cifar_reader_refuses_a_hostile_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, 1, 4)
    target = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Hostile(str(target)), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="posix.mkdir|os.mkdir|nt.mkdir"):
        load_cifar(False, tmp_path)
    assert not target.exists()
