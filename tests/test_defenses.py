"""Native defenses (D3, FT, FT-SAM, FST, NAD, FP) on a tiny real backdoored model.

The model: small_cnn trained on 3,000 Fashion-MNIST images with BadNets (3×3 white patch, 10 %
poisoning, target 0), built once per session and cached in the temp folder.
"""
import copy
import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from d3_plugin import registry
from d3_plugin.attacks import BadNets, poison_test_set, poison_training_set
from d3_plugin.data import Loader, dataset_spec, load_dataset
from d3_plugin.evaluation import evaluate
from d3_plugin.models import build_model
from d3_plugin.training import cosine, cross_entropy, fit, seed_everything, sgd

RECIPE = {"train": 3000, "test": 1000, "reserved": 300, "ratio": 0.1, "epochs": 4, "lr": 0.05, "batch": 64, "v": 1}


def _tiny_backdoor():
    """(model, spec, reserved, clean_test, bd_test, before metrics); the trained weights are cached."""
    try:
        train = load_dataset("fashion_mnist", True)
        test = load_dataset("fashion_mnist", False)
    except FileNotFoundError as error:
        pytest.fail(f"Fashion-MNIST not available: {error}")
    spec = dataset_spec("fashion_mnist")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    poisoned = poison_training_set(train.subset(order[:RECIPE["train"]]), BadNets(), RECIPE["ratio"], 0)
    reserved = train.subset(order[RECIPE["train"]:RECIPE["train"] + RECIPE["reserved"]])
    clean_test = test.subset(torch.arange(RECIPE["test"]))
    bd_test = poison_test_set(clean_test, BadNets(), 0)
    model = build_model("small_cnn", 10, 1, 28)
    key = hashlib.sha256(repr(sorted(RECIPE.items())).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / "d3_plugin_tests" / f"badnets_small_cnn_{key}.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        seed_everything(0)
        no_crop = dataclasses.replace(spec, crop_padding=0)  # a fixed-position trigger is learnt in few epochs
        batches = Loader(poisoned, no_crop, RECIPE["batch"], train=True, seed=0)
        optimizer = sgd(model.parameters(), RECIPE["lr"], weight_decay=5e-4)
        fit(model, batches, optimizer, cross_entropy(), RECIPE["epochs"], scheduler=cosine(optimizer, RECIPE["epochs"]))
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), temporary)
        os.replace(temporary, cache)
    model.eval()
    before = evaluate(model, Loader(clean_test, spec, 500), Loader(bd_test, spec, 500))
    return model, spec, reserved, clean_test, bd_test, before


@pytest.fixture(scope="module")
def backdoored():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 threads on a shared 2-core machine
    try:
        yield _tiny_backdoor()
    finally:
        torch.set_num_threads(threads)


def test_the_fixture_model_is_backdoored(backdoored):
    *_, before = backdoored
    assert before["asr"] > 0.9, before
    assert before["acc"] > 0.5, before


FAST = {"d3": {"epochs": 3}, "ft": {"epochs": 3}, "ft-sam": {"epochs": 3}, "fst": {"epochs": 3},
        "nad": {"epochs": 2, "teacher_epochs": 2}, "fp": {"epochs": 2}}
FAST = {name: {**budget, "batch_size": 64} for name, budget in FAST.items()}  # 300 samples: enough steps
SHOULD_LOWER_ASR = {"d3", "ft-sam", "fst"}


@pytest.mark.parametrize("name", sorted(FAST))
def test_defense_runs_changes_model_and_lowers_asr_where_expected(backdoored, name):
    model, spec, reserved, clean_test, bd_test, before = backdoored
    original = copy.deepcopy(model.state_dict())
    defense = registry.build(name, dataset="fashion_mnist", **FAST[name])
    batches = Loader(reserved, spec, defense.config.batch_size, train=True, seed=0)
    seed_everything(0)
    purified, history = defense(model, batches)
    assert history, "a defense returns its per-epoch history"
    for key, value in model.state_dict().items():  # the input model is left untouched
        assert torch.equal(value, original[key]), key
    changed = [k for k, v in purified.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, original[k])]
    assert changed, f"{name} returned an unchanged model"
    after = evaluate(purified, Loader(clean_test, spec, 500), Loader(bd_test, spec, 500))
    if name in SHOULD_LOWER_ASR:
        assert after["asr"] < 0.5 * before["asr"], (name, before, after)


def test_fp_prunes_by_reserved_accuracy_and_keeps_pruned_weights_zero(backdoored):
    from d3_plugin.defenses.fp import FPConfig, choose_pruned, fine_prune, prune_layer
    model, spec, reserved, *_ = backdoored
    batches = Loader(reserved, spec, 256)
    work = copy.deepcopy(model)
    loose, _ = choose_pruned(work, prune_layer(work), batches, FPConfig(acc_ratio=0.5))
    strict, _ = choose_pruned(work, prune_layer(work), batches, FPConfig(acc_ratio=0.0))
    assert len(strict) == 0 < len(loose)  # a zero tolerance prunes nothing; a loose one prunes some
    purified, history = fine_prune(model, Loader(reserved, spec, 128, train=True), FPConfig(acc_ratio=0.5, epochs=1))
    layer = prune_layer(purified)
    assert history[0]["pruned"] == len(loose)
    assert torch.count_nonzero(layer.weight[:, loose]) == 0


def test_nad_default_layers_follow_the_architecture():
    from torch import nn
    from d3_plugin.defenses.nad import attention_layers
    assert attention_layers(build_model("small_cnn", 10, 1, 28)) == ["features.0", "features.2", "features.4"]

    class Stages(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(1, 5):
                setattr(self, f"layer{i}", nn.Conv2d(3, 3, 3))
    assert attention_layers(Stages()) == ["layer2", "layer3", "layer4"]
    with pytest.raises(ValueError, match="one beta per layer"):
        registry.build("nad", layers=["features.0"])


def test_fst_keeps_head_norm_and_moves_away_from_the_backdoored_head(backdoored):
    model, spec, reserved, *_ = backdoored
    defense = registry.build("fst", epochs=1)
    purified, _ = defense(model, Loader(reserved, spec, 128, train=True, seed=0))
    old, new = model.linear.weight, purified.linear.weight
    assert torch.allclose(torch.linalg.vector_norm(new), torch.linalg.vector_norm(old), rtol=1e-4)
    cosine_similarity = torch.nn.functional.cosine_similarity(old.flatten(), new.flatten(), dim=0)
    assert cosine_similarity < 0.5
