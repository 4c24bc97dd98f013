"""Native defenses (D3, FT, FT-SAM, FST, NAD, FP) on the shared tiny backdoored model (conftest.py)."""
import copy

import pytest
import torch

from d3_plugin import registry
from d3_plugin.data import Loader
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything


def test_the_fixture_model_is_backdoored(backdoored):
    assert backdoored.before["asr"] >= 0.95, backdoored.before
    assert backdoored.before["acc"] >= 0.75, backdoored.before


FAST = {"d3": {"epochs": 3}, "ft": {"epochs": 3}, "ft-sam": {"epochs": 3}, "fst": {"epochs": 3},
        "nad": {"epochs": 2, "teacher_epochs": 2}, "fp": {"epochs": 2}}
FAST = {name: {**budget, "batch_size": 64} for name, budget in FAST.items()}  # 500 reserved samples: 8 steps an epoch
SHOULD_LOWER_ASR = {"d3", "ft-sam", "fst"}


@pytest.mark.parametrize("name", sorted(FAST))
def test_defense_runs_changes_model_and_lowers_asr_where_expected(backdoored, name):
    model, before = backdoored.model, backdoored.before
    original = copy.deepcopy(model.state_dict())
    defense = registry.build(name, dataset="fashion_mnist", **FAST[name])
    batches = backdoored.reserved_batches(defense.config.batch_size)
    seed_everything(0)
    purified, history = defense(model, batches)
    assert history, "a defense returns its per-epoch history"
    for key, value in model.state_dict().items():  # the input model is left untouched
        assert torch.equal(value, original[key]), key
    changed = [k for k, v in purified.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, original[k])]
    assert changed, f"{name} returned an unchanged model"
    after = backdoored.evaluate(purified)
    if name in SHOULD_LOWER_ASR:
        assert after["asr"] < 0.5 * before["asr"], (name, before, after)


def test_fp_prunes_by_reserved_accuracy_and_keeps_pruned_weights_zero(backdoored):
    from d3_plugin.defenses.fp import FPConfig, choose_pruned, fine_prune, prune_layer
    model, spec, reserved = backdoored.model, backdoored.spec, backdoored.reserved
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
    model = backdoored.model
    defense = registry.build("fst", epochs=1)
    purified, _ = defense(model, backdoored.reserved_batches(128))
    old, new = model.linear.weight, purified.linear.weight
    assert torch.allclose(torch.linalg.vector_norm(new), torch.linalg.vector_norm(old), rtol=1e-4)
    cosine_similarity = torch.nn.functional.cosine_similarity(old.flatten(), new.flatten(), dim=0)
    assert cosine_similarity < 0.5
