"""End to end on real Fashion-MNIST: plant a BadNets backdoor in a small CNN, then remove it with D3.

4,000 training images (10 % poisoned, 3×3 white patch bottom-right, target 0), small_cnn, 3 epochs of
the attack trainer; D3 gets 500 clean held-out training images. Measured (2 shared cores): ASR ≈ 0.92
before, ≤ 0.04 after over D3 seeds 0–2, ACC 0.69 → 0.62–0.67. The thresholds below leave margin.
"""
import dataclasses

import pytest
import torch

from d3_plugin.attacks import BadNets, TrainConfig, poison_test_set, poison_training_set, train_model
from d3_plugin.d3 import D3Config, detoxify
from d3_plugin.data import Loader, dataset_spec, load_dataset
from d3_plugin.evaluation import evaluate, summarize
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything


@pytest.fixture(scope="module")
def backdoor():
    try:
        train, test = load_dataset("fashion_mnist", True), load_dataset("fashion_mnist", False)
    except FileNotFoundError as error:
        pytest.fail(f"Fashion-MNIST not available ({error})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 threads on a shared 2-core machine
    try:
        spec = dataset_spec("fashion_mnist")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        poisoned = poison_training_set(train.subset(order[:4000]), BadNets(), 0.1, target=0, seed=0)
        reserved = train.subset(order[4000:4500])
        clean_test = test.subset(torch.arange(1000))
        bd_test = poison_test_set(clean_test, BadNets(), target=0)
        seed_everything(0)
        no_crop = dataclasses.replace(spec, crop_padding=0)  # a fixed-position patch is learnt in 3 epochs
        model, _ = train_model(build_model("small_cnn", 10, 1, 28), poisoned, no_crop,
                               TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0))
        loaders = Loader(clean_test, spec, 500), Loader(bd_test, spec, 500)
        yield model, spec, reserved, loaders, evaluate(model, *loaders)
    finally:
        torch.set_num_threads(threads)


def test_the_attack_plants_a_backdoor(backdoor):
    *_, before = backdoor
    assert before["asr"] >= 0.8, before
    assert before["acc"] >= 0.6, before  # the model learnt the clean task too (chance is 0.1)


def test_d3_removes_the_backdoor_and_keeps_accuracy(backdoor):
    model, spec, reserved, loaders, before = backdoor
    config = D3Config(epochs=5, lr=0.1, batch_size=64, seed=0)
    purified, history = detoxify(model, Loader(reserved, spec, config.batch_size, train=True, seed=0), config)
    after = evaluate(purified, *loaders)
    assert after["asr"] < 0.2, after
    assert after["acc"] >= before["acc"] - 0.15, (before, after)
    assert after["ra"] > before["ra"] + 0.3, (before, after)  # triggered images get their true class back
    assert summarize(before, after)["der"] > 0.8
    assert evaluate(model, *loaders) == before  # the input model is left as it was
    assert len(history) == 5 and history[-1]["clean_loss"] < history[0]["clean_loss"]
