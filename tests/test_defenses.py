"""Native defenses (D3, FT, FT-SAM, FST, NAD, FP) on the shared tiny backdoored model (conftest.py)."""
import copy
import math

import pytest
import torch

from d3_plugin import registry
from d3_plugin.data import Loader
from d3_plugin.evaluation import evaluate
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything

from conftest import TEST_SEED, observed

pytestmark = pytest.mark.trained  # see conftest.py


def test_the_fixture_model_is_backdoored(backdoored):  # measured: ASR 0.966–0.994, ACC 0.799–0.819
    assert observed("fixture: ASR", backdoored.before["asr"]) >= 0.95, backdoored.before
    assert observed("fixture: ACC", backdoored.before["acc"]) >= 0.75, backdoored.before


FAST = {"d3": {"epochs": 3}, "ft": {"epochs": 3}, "ft-sam": {"epochs": 3}, "fst": {"epochs": 3},
        "nad": {"epochs": 2, "teacher_epochs": 2}, "fp": {"epochs": 2}}
FAST = {name: {**budget, "batch_size": 64} for name, budget in FAST.items()}  # 500 reserved samples: 8 steps an epoch
# Which of these budgets halve the fixture's ASR on every fixture model (ASR after / before, measured over seeds
# 0–5 × threads 1–2): FST 0–0.015. Not D3 (0–0.70: 24 steps at lr 0.01 are too few on some models; its removal
# is asserted at a real budget in test_end_to_end.py) nor FT-SAM (0.002–0.53).
SHOULD_LOWER_ASR = {"fst"}


@pytest.mark.parametrize("name", sorted(FAST))
def test_defense_runs_changes_model_and_lowers_asr_where_expected(backdoored, name):
    model, before = backdoored.model, backdoored.before
    original = copy.deepcopy(model.state_dict())
    defense = registry.build(name, dataset="fashion_mnist", **FAST[name])
    batches = backdoored.reserved_batches(defense.config.batch_size)
    seed_everything(TEST_SEED)
    purified, history = defense(model, batches)
    assert history, "a defense returns its per-epoch history"
    for key, value in model.state_dict().items():  # the input model is left untouched
        assert torch.equal(value, original[key]), key
    changed = [k for k, v in purified.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, original[k])]
    assert changed, f"{name} returned an unchanged model"
    after = backdoored.evaluate(purified)
    ratio = observed(f"{name}, {FAST[name]['epochs']} epochs: ASR after / before", after["asr"] / before["asr"])
    if name in SHOULD_LOWER_ASR:
        assert ratio < 0.5, (before, after)


def accuracy_with_inputs_pruned(model, layer, units, batches) -> float:
    """Reserved accuracy with `units` of `layer`'s inputs zeroed (FP's own masking, for any rounding)."""
    mask = torch.ones(layer.in_features)
    mask[units] = 0
    handle = layer.register_forward_pre_hook(lambda _m, inputs: (inputs[0] * mask,))
    try:
        return evaluate(model, batches)["acc"]
    finally:
        handle.remove()


def test_fp_prunes_the_largest_least_active_prefix_within_its_tolerance_and_keeps_it_zero(backdoored):
    """What FP guarantees for any model: each tolerance prunes a prefix of the least-active ranking, every
    prefix up to it keeps reserved accuracy within the tolerance, the next step would not, and a looser
    tolerance prunes a superset. (A zero tolerance may prune: whenever pruning *raises* accuracy.)"""
    from d3_plugin.defenses.fp import FPConfig, choose_pruned, fine_prune, mean_activation, prune_layer
    model, spec, reserved = backdoored.model, backdoored.spec, backdoored.reserved
    batches = Loader(reserved, spec, 256)
    work = copy.deepcopy(model)
    layer = prune_layer(work)
    order = torch.argsort(mean_activation(work, layer, batches))
    step = max(1, math.ceil(layer.in_features * FPConfig().prune_step))
    base = evaluate(work, batches)["acc"]
    chosen = {}
    for ratio in (0.0, 0.1, 0.5):
        units, reported_base = choose_pruned(work, layer, batches, FPConfig(acc_ratio=ratio))
        assert reported_base == base
        assert len(units) % step == 0 and torch.equal(units, order[:len(units)])
        for count in range(step, len(units) + 1, step):  # every prefix up to the chosen one is within tolerance
            assert base - accuracy_with_inputs_pruned(work, layer, order[:count], batches) < ratio * base
        following = len(units) + step
        if following < layer.in_features:  # the next step would break it
            assert base - accuracy_with_inputs_pruned(work, layer, order[:following], batches) >= ratio * base
        chosen[ratio] = units
    assert len(chosen[0.0]) <= len(chosen[0.1]) <= len(chosen[0.5])
    # Behavioural: half the accuracy as tolerance prunes some units of the fixture model; measured (seeds 0–5,
    # threads 1–2, benchmarks/test_margins.py): 33–56 of 64.
    loose = chosen[0.5]
    assert observed("fp: units pruned at acc_ratio 0.5 (of 64)", len(loose)) > 0
    purified, history = fine_prune(model, Loader(reserved, spec, 128, train=True), FPConfig(acc_ratio=0.5, epochs=1))
    assert history[0]["pruned"] == len(loose)
    assert torch.count_nonzero(prune_layer(purified).weight[:, loose]) == 0


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
    assert observed("fst, 1 epoch: cosine(old head, new head)", cosine_similarity) < 0.5  # measured −0.06–0.03
