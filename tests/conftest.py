"""Shared test fixtures.

`backdoored`: one small CNN with a BadNets backdoor on real Fashion-MNIST, trained once per pytest
session and never cached on disk, so every run builds the same model from the same seed whatever ran
before it. Recipe margin, measured for training seeds 0–5 × 1 and 2 torch threads (`RECIPE` below): ASR
0.966–0.994 and ACC 0.80–0.82 on the 1,000 test images; 4 epochs instead of 8 gave ASR 0.69–0.99.

Portability: `D3_PLUGIN_TEST_SEED` (default 0) seeds the shared fixture and every test-local model, and
`OMP_NUM_THREADS` (default 1: tiny models run faster on one thread) sets torch's thread count, so a test
that asserts what a trained model does can be run on other models and other float rounding:
`D3_PLUGIN_TEST_SEED=1 OMP_NUM_THREADS=2 python -m pytest -m trained`. `D3_PLUGIN_TEST_NATIVE_BF16=0` (or 1)
forces what precision `auto` believes of the CPU (bf16 with AVX512-BF16/AMX, else fp32), so both branches
run on any machine; unset, the machine decides. Tests marked `trained` are those
that train, evaluate or prune a model (every user of the shared fixture is marked automatically);
each of their assertions is an invariant or a margin measured by `benchmarks/test_margins.py` over
seeds 0–5 × threads 1, 2 (the measured range is written beside the threshold; `observed` records it).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch
from torch import nn

from d3_plugin.attacks import BadNets, TrainConfig, poison_test_set, poison_training_set, train_model
from d3_plugin.data import DatasetSpec, ImageSet, Loader, dataset_spec, load_dataset
from d3_plugin.data.readers import DatasetNotFound
from d3_plugin.evaluation import evaluate
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything



def env_count(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < minimum:
        raise pytest.UsageError(f"{name}={text!r}: expected an integer ≥ {minimum}")
    return int(text)


TEST_SEED = env_count("D3_PLUGIN_TEST_SEED", 0, 0)
TEST_THREADS = env_count("OMP_NUM_THREADS", 1, 1)
torch.set_num_threads(TEST_THREADS)
NATIVE_BF16 = os.environ.get("D3_PLUGIN_TEST_NATIVE_BF16", "").strip()
if NATIVE_BF16 not in ("", "0", "1"):
    raise pytest.UsageError(f"D3_PLUGIN_TEST_NATIVE_BF16={NATIVE_BF16!r}: expected 0, 1 or unset")


@pytest.fixture(autouse=True, scope="session")
def cpu_bf16_branch():
    """Forces precision `auto`'s CPU branch when D3_PLUGIN_TEST_NATIVE_BF16 says so (module docstring)."""
    if not NATIVE_BF16:
        yield
        return
    from d3_plugin import precision
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "cpu_has_native_bf16", lambda: NATIVE_BF16 == "1")
        yield

RECIPE = {"train": 4000, "reserved": 500, "test": 1000, "ratio": 0.1, "target": 0,
          "epochs": 8, "lr": 0.05, "batch": 64, "seed": TEST_SEED}


def observed(claim: str, value: float) -> float:
    """`value`, unchanged; with $D3_PLUGIN_TEST_MARGINS set, also appended there (JSON lines) with the seed
    and thread count, so `benchmarks/test_margins.py` can report each behavioural claim's measured range."""
    path = os.environ.get("D3_PLUGIN_TEST_MARGINS")
    if path:
        row = {"claim": claim, "value": float(value), "seed": TEST_SEED, "threads": TEST_THREADS}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return value


def pytest_collection_modifyitems(items):
    """Every user of the shared trained fixture is a `trained` test (others are marked in their module)."""
    for item in items:
        if "backdoored_once" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.trained)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path, array) -> None:
    """An idx file of unsigned bytes, gzipped (the format of the Fashion-MNIST distribution)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist_subset(folder: Path, train_size: int, test_size: int) -> Path:
    """The first images of Debian's Fashion-MNIST, in its own file layout, in `folder` (a small data root)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, split, size in (("train", True, train_size), ("t10k", False, test_size)):
        full = load_dataset("fashion_mnist", split, FASHION_MNIST)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", full.images[:size, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", full.labels[:size].numpy())
    return folder


@contextlib.contextmanager
def torch_threads(count: int = TEST_THREADS):
    """The suite's thread count, restored afterwards (code under test may change it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def suite_threads():
    with torch_threads():
        yield


@dataclass
class Backdoored:
    """A backdoored model with its reserved clean set and test sets; `before` = its ACC/ASR/RA."""

    model: nn.Module
    spec: DatasetSpec
    reserved: ImageSet
    clean_test: ImageSet
    bd_test: ImageSet
    before: Dict[str, float]

    def test_loaders(self, batch_size: int = 500):
        return Loader(self.clean_test, self.spec, batch_size), Loader(self.bd_test, self.spec, batch_size)

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        return evaluate(model, *self.test_loaders())

    def reserved_batches(self, batch_size: int, size: Optional[int] = None, seed: int = 0) -> Loader:
        data = self.reserved if size is None else self.reserved.subset(torch.arange(size))
        return Loader(data, self.spec, batch_size, train=True, seed=seed)


def train_backdoored() -> Backdoored:
    seed_everything(RECIPE["seed"])  # before anything random, the model's initial weights included
    try:
        train, test = load_dataset("fashion_mnist", True), load_dataset("fashion_mnist", False)
    except DatasetNotFound as error:
        pytest.fail(f"Fashion-MNIST not available: {error}")
    spec = dataset_spec("fashion_mnist")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(RECIPE["seed"]))
    n, trigger = RECIPE["train"], BadNets()
    poisoned = poison_training_set(train.subset(order[:n]), trigger, RECIPE["ratio"], RECIPE["target"],
                                   seed=RECIPE["seed"])
    reserved = train.subset(order[n:n + RECIPE["reserved"]])
    clean_test = test.subset(torch.arange(RECIPE["test"]))
    no_crop = dataclasses.replace(spec, crop_padding=0)  # a fixed-position patch is learnt in few epochs
    config = TrainConfig(epochs=RECIPE["epochs"], lr=RECIPE["lr"], batch_size=RECIPE["batch"], seed=RECIPE["seed"])
    model, _ = train_model(build_model("small_cnn", 10, 1, 28), poisoned, no_crop, config)
    result = Backdoored(model.eval(), spec, reserved, clean_test, poison_test_set(clean_test, trigger, 0), {})
    result.before = result.evaluate(result.model)
    return result


@pytest.fixture(scope="session")
def backdoored_once() -> Backdoored:
    with torch_threads():
        return train_backdoored()


@pytest.fixture
def backdoored(backdoored_once) -> Backdoored:
    """The session's backdoored model, copied so that no test can change it for another."""
    with torch_threads():
        yield dataclasses.replace(backdoored_once, model=copy.deepcopy(backdoored_once.model))


def synthetic(n: int, seed: int) -> ImageSet:
    """n random 28×28 grey images with random labels: plumbing data, no efficacy."""
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g))


@pytest.fixture
def record(tmp_path):
    """A small synthetic AttackRecord in memory (an untrained small CNN, 400 train and 100 test images)."""
    from d3_plugin.record_io.records import AttackRecord

    torch.manual_seed(TEST_SEED)
    test = synthetic(100, 1)
    folder = tmp_path / "checkout" / "record" / "badnet_tiny"
    folder.mkdir(parents=True)
    return AttackRecord(folder=folder, checkout_root=tmp_path / "checkout", model_name="small_cnn",
                        num_classes=10, dataset="fashion_mnist", spec=dataset_spec("fashion_mnist"),
                        img_size=(28, 28, 1), state_dict=build_model("small_cnn", 10, 1, 28).state_dict(),
                        clean_train=synthetic(400, 0), clean_test=test, bd_test=poison_test_set(test, BadNets(), 0))

