"""ANP, i-BAU, AFT/PBE and SAU on the shared tiny backdoored model (conftest.py: Fashion-MNIST, BadNets 10 %).

Each defense runs with a CPU-sized config. ACC/ASR are measured on 1000 test images, never hard-coded.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from d3_plugin.data import Loader
from d3_plugin.data.readers import dataset_spec
from d3_plugin import adversarial
from d3_plugin.defenses import aft, anp, ibau, sau
from d3_plugin.evaluation import evaluate

from conftest import TEST_SEED, observed

SPEC = dataset_spec("fashion_mnist")


pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]  # see conftest.py


@pytest.fixture(scope="module")
def setting(backdoored_once):
    """The shared backdoored model (conftest.py), read-only: every defense below works on a copy."""
    return backdoored_once


def reserved_loader(setting, size=None, seed=0):
    return setting.reserved_batches(100, size, seed)


def changed(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def anp_result(setting):
    config = anp.ANPConfig(iterations=100, holdout=0.25, acc_tolerance=0.25)  # tiny model: loose; 24 pruned none
    return anp.defend(setting.model, reserved_loader(setting), config), config


def test_backdoor_is_planted(setting):
    assert setting.before["asr"] >= 0.95 and setting.before["acc"] >= 0.75


# --- shared PGD ---------------------------------------------------------------------------------

@pytest.mark.parametrize("init", adversarial.INITS)
def test_pgd_stays_in_the_ball_and_the_image_range(setting, init):
    box = adversarial.InputBox.from_spec(SPEC)
    inputs, labels = next(iter(Loader(setting.reserved, SPEC, 64)))
    eps = 6 / 255
    adv = adversarial.untargeted_pgd(setting.model, inputs, labels, box, eps, eps / 2, 5, init=init,
                                     generator=torch.Generator().manual_seed(0))
    assert box.pixel_distance(adv, inputs) <= eps + 1e-5
    assert (adv >= box.lower - 1e-6).all() and (adv <= box.upper + 1e-6).all()
    assert not torch.equal(adv, inputs)
    with torch.no_grad():
        model = setting.model
        loss = nn.functional.cross_entropy
        assert loss(model(adv), labels) > loss(model(inputs), labels)


def test_input_box_maps_pixel_range_through_normalisation():
    box = adversarial.InputBox.from_spec(dataset_spec("cifar10"))
    mean, std = torch.tensor(dataset_spec("cifar10").mean), torch.tensor(dataset_spec("cifar10").std)
    assert torch.allclose(box.lower.flatten(), -mean / std)
    assert torch.allclose(box.upper.flatten(), (1 - mean) / std)


# --- ANP ----------------------------------------------------------------------------------------

def test_anp_prunes_and_lowers_asr(setting, anp_result):
    (purified, history), _ = anp_result
    after = evaluate(purified, *setting.test_loaders())
    assert observed("anp: neurons pruned", history[-1]["pruned"]) > 0  # measured 11–25
    assert changed(purified, setting.model)
    assert observed("anp: ASR drop", setting.before["asr"] - after["asr"]) > 0.1  # measured 0.17–0.99


def test_anp_pruning_sees_only_the_held_out_reserved_split(setting, anp_result, monkeypatch):
    """Masks learn on one part of the reserved set, the pruning amount is chosen on the other; the
    decision is a function of the reserved data and the seed alone (test data never enters)."""
    seen = {"learn": [], "evaluate": []}
    real_learn, real_evaluate = anp.learn_masks, anp.evaluate

    def spy_learn(model, batches, *args, **kwargs):
        seen["learn"].append(batches.data.source_index.clone())
        return real_learn(model, batches, *args, **kwargs)

    def spy_evaluate(model, *loaders):
        seen["evaluate"] += [loader.data.source_index.clone() for loader in loaders if loader is not None]
        return real_evaluate(model, *loaders)

    monkeypatch.setattr(anp, "learn_masks", spy_learn)
    monkeypatch.setattr(anp, "evaluate", spy_evaluate)
    (first, first_history), config = anp_result
    second, second_history = anp.defend(setting.model, reserved_loader(setting), config)

    reserved = set(setting.reserved.source_index.tolist())
    learned_on = set(seen["learn"][0].tolist())
    held_out = set(torch.cat(seen["evaluate"]).tolist())
    assert held_out and learned_on and held_out.isdisjoint(learned_on)
    assert held_out | learned_on == reserved
    assert len(held_out) == round(config.holdout * len(reserved))
    assert first_history[-1] == second_history[-1]  # same pruning decision ...
    assert not changed(first, second)  # ... and the same purified weights


def test_anp_fixed_count_prunes_exactly_that_many(setting):
    config = anp.ANPConfig(iterations=5, prune_by="number", prune_value=7)
    purified, history = anp.defend(setting.model, reserved_loader(setting), config)
    assert history[-1]["pruned"] == 7
    zeroed = sum(int((m.weight == 0).sum()) for m in purified.modules() if isinstance(m, nn.BatchNorm2d))
    assert zeroed == 7


def test_anp_needs_batchnorm(setting):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        anp.defend(model, reserved_loader(setting), anp.ANPConfig(iterations=1))


# --- AFT / PBE ----------------------------------------------------------------------------------

def test_aft_lowers_asr(setting):
    purified, history = aft.defend(setting.model, reserved_loader(setting), aft.AFTConfig(epochs=2, adv_epochs=1))
    after = evaluate(purified, *setting.test_loaders())
    assert [row["epoch"] for row in history] == [1, 2]
    assert changed(purified, setting.model)
    assert observed("aft, 2 epochs: ASR drop", setting.before["asr"] - after["asr"]) > 0.2  # measured 0.45–0.84


def test_pbe_progressive_runs_without_labels(setting):
    unlabeled = dataclasses.replace(setting.reserved, labels=torch.zeros(len(setting.reserved), dtype=torch.long))
    batches = Loader(unlabeled, SPEC, 100, train=True)
    config = aft.AFTConfig(progressive=True, round_epochs=1, keep_fractions=[0.5], initial_fraction=0.2)
    purified, history = aft.defend(setting.model, batches, config)
    assert [row["round"] for row in history] == [0, 1]
    assert history[-1]["subset"] == len(unlabeled) // 2
    assert changed(purified, setting.model)


# --- i-BAU and SAU ------------------------------------------------------------------------------

def test_ibau_runs_and_changes_the_model(setting):
    purified, history = ibau.defend(setting.model, reserved_loader(setting, 200),
                                    ibau.IBAUConfig(rounds=1, K=2, lr=1e-3))
    assert len(history) == 1 and history[0]["delta_norm"] > 0
    assert changed(purified, setting.model)


def test_ibau_surrogate_gradient_is_the_implicit_hypergradient():
    """On a linear model, compare the surrogate's θ-gradient with the hypergradient by hand."""
    torch.manual_seed(TEST_SEED)
    model = nn.Linear(3, 2)
    inputs, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    config = ibau.IBAUConfig(K=50, patch_portion=1.0, inner_lr=0.1, reg=1.0)  # convex inner: Φ contracts
    state = {"delta": torch.randn(1, 3) * 0.1}
    objective = ibau.hypergradient_objective(state, config, torch.Generator().manual_seed(0))
    loss, _ = objective(model, inputs, labels)
    got = torch.autograd.grad(loss, list(model.parameters()))

    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    delta = state["delta"].clone().requires_grad_(True)

    def forward(w, b, x):
        return x @ w.T + b

    def phi(d, w, b):
        inner = -nn.functional.cross_entropy(forward(w, b, inputs + d), labels) + config.reg * d.pow(2).sum()
        return d - config.inner_lr * torch.autograd.grad(inner, d, create_graph=True)[0]

    outer = nn.functional.cross_entropy(forward(*params, inputs + delta), labels)
    g_delta, *g_theta = torch.autograd.grad(outer, [delta, *params])
    jac_delta = torch.autograd.functional.jacobian(lambda d: phi(d, *params), delta).reshape(3, 3)
    v = torch.linalg.solve(torch.eye(3) - jac_delta.T, g_delta.reshape(3))  # exact fixed point
    mapped = phi(delta, *params)
    extra = torch.autograd.grad(mapped, params, grad_outputs=v.reshape(1, 3))
    for g, direct, indirect in zip(got, g_theta, extra):
        assert torch.allclose(g, direct + indirect, atol=1e-4)


def test_sau_runs_and_changes_the_model(setting):
    purified, history = sau.defend(setting.model, reserved_loader(setting, 200), sau.SAUConfig(epochs=1, lr=1e-3))
    assert len(history) == 1 and history[0]["shared_loss"] >= 0
    assert changed(purified, setting.model)
