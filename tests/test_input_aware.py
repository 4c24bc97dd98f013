"""The input-aware dynamic backdoor: per-image triggers (diversity), cross triggers, the training objective,
the materialised poisoned sets, and a tiny end-to-end run through the command line into a record that
loads and evaluates like every other attack's."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from d3_plugin import registry
from d3_plugin.attacks.input_aware import (NETWORKS_FILE, InputAwareConfig, InputAwareTrigger, backdoor_test_set,
                                           blend, build_networks, cross_test_set, diversity_loss, input_aware,
                                           input_aware_objective, poisoned_training_set, train_mask)
from d3_plugin.attacks import TrainConfig, train_model
from d3_plugin.attacks.registry import get_attack
from d3_plugin.data import Loader, load_dataset
from d3_plugin.data.readers import dataset_spec
from d3_plugin.evaluation import evaluate
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything

from conftest import TEST_SEED, observed, write_fashion_mnist_subset

pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]  # see conftest.py
SPEC = dataset_spec("fashion_mnist")


@pytest.fixture(scope="module")
def data():
    seed_everything(TEST_SEED)
    train = load_dataset("fashion_mnist", True).subset(torch.arange(300))
    test = load_dataset("fashion_mnist", False).subset(torch.arange(200))
    return train, test


@pytest.fixture(scope="module")
def trained(data):
    """A tiny real run: 300 images, 1 mask epoch, 2 epochs of classifier + generator."""
    seed_everything(TEST_SEED)
    train, test = data
    config = InputAwareConfig(epochs=2, mask_epochs=1, batch_size=50, width=8)
    model, trigger, history = input_aware(build_model("small_cnn", 10, 1, 28), train, SPEC, config)
    return config, model, trigger, history


def test_diversity_loss_is_the_ratio_of_image_to_output_distances():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert diversity_loss(x, y, x, y).item() == pytest.approx(1.0, rel=1e-3)       # outputs differ like inputs
    assert diversity_loss(x, y, x / 2, y / 2).item() == pytest.approx(2.0, rel=1e-3)
    assert diversity_loss(x, y, torch.zeros_like(x), torch.zeros_like(y)).item() > 100  # a constant output


def test_the_mask_pre_training_meets_the_density_and_makes_masks_differ(data):
    train, test = data
    config = InputAwareConfig(mask_epochs=10, batch_size=50, width=8, mask_density=0.05)
    _, mask = build_networks(1, config.width, 0)
    before = [p.clone() for p in mask.parameters()]
    history = train_mask(mask, train, SPEC, config)
    assert history[-1]["mask_norm"] < history[0]["mask_norm"]
    masks = InputAwareTrigger(build_networks(1, 8, 0)[0], mask).masks(test.images[:100])
    # measured 0.0576 and 0.111 (the mask network's seed is fixed)
    assert observed("input-aware: mean mask density", masks.flatten(1).mean(1).mean()) < 0.075  # target 0.05
    assert observed("input-aware: least largest mask difference of a pair",
                    (masks[:50] - masks[50:]).abs().flatten(1).amax(1).min()) > 0.05  # every pair differs somewhere
    assert any(not torch.equal(a, b) for a, b in zip(before, mask.parameters()))


def test_each_image_gets_its_own_trigger_and_a_cross_trigger_differs(trained, data):
    _, test = data
    _, _, trigger, _ = trained
    images = test.images[:40]
    own = trigger(images)
    assert own.dtype == torch.uint8 and own.shape == images.shape
    assert torch.equal(own, trigger(images)) and torch.equal(images, test.images[:40])  # deterministic, input kept
    # per image: a sample's trigger does not depend on the batch it is computed in
    assert torch.equal(own[:5], trigger(images[:5]))
    # diversity: the generated patterns differ between images, and so do the residuals B(x) − x
    with torch.no_grad():
        patterns = trigger.generator(images.float() / 255)
    assert observed("input-aware: least mean pattern difference of a pair",
                    (patterns[:20] - patterns[20:]).abs().flatten(1).mean(1).min()) > 1e-3  # measured 0.026–0.030
    residual = own.float() - images.float()
    assert (residual[:20] - residual[20:]).abs().flatten(1).sum(1).min() > 0
    # cross: the trigger of another image applied to x differs from x's own trigger
    partners = images.roll(1, 0)
    crossed = trigger.cross(images, partners)
    assert crossed.dtype == torch.uint8
    differing = (crossed != own).flatten(1).any(1).float().mean()
    assert observed("input-aware: cross triggers differing from own", differing) > 0.9  # measured 1.0
    assert torch.equal(trigger.cross(images, images), own)
    # only pixels under the mask change (a mask below half a grey level leaves the pixel as it was)
    masks = trigger.masks(images)
    assert torch.equal(own[masks < 1 / 510], images[masks < 1 / 510])


def test_the_objective_poisons_rho_b_relabels_them_and_keeps_cross_labels():
    seed_everything(TEST_SEED)
    config = InputAwareConfig(ratio=0.2, cross_ratio=0.3, batch_size=10, width=4, target=0)
    generator, mask = build_networks(1, 4, 0)

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(28 * 28, 10)

        def forward(self, x):
            self.seen = x.detach().clone()
            return self.linear(x.flatten(1))

    spy = Spy()
    x01 = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    inputs = (x01 - 0.5) / 0.5
    labels = torch.arange(1, 11) % 10
    loss, stats = input_aware_objective(generator, mask, SPEC, config, "cpu")(spy, inputs, labels)
    seen = spy.seen * 0.5 + 0.5
    # ρ_b = 2 of 10 relabelled to the target; cross (3) and clean (5) keep their true labels
    expected = torch.cat([torch.zeros(2, dtype=torch.long), labels[2:]])
    with torch.no_grad():
        logits = spy.linear(spy.seen.flatten(1))
    assert stats["loss"].item() == pytest.approx(nn.functional.cross_entropy(logits, expected).item(), rel=1e-5)
    assert stats["loss"].item() != pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-3)
    with torch.no_grad():
        own = blend(x01[:2], generator(x01[:2]), mask(x01[:2]))
        partners = x01[(torch.arange(10) + 5) % 10][2:5]
        crossed = blend(x01[2:5], generator(partners), mask(partners))
    assert torch.allclose(seen[:2], own, atol=1e-5) and torch.allclose(seen[2:5], crossed, atol=1e-5)
    assert torch.allclose(seen[5:], x01[5:], atol=1e-5)                              # the rest stays clean
    assert stats["div"] > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.out.parameters())
    assert all(p.grad is None for p in mask.parameters())  # M is fixed in phase 2


def test_without_poisoning_the_classifier_trains_exactly_like_the_common_trainer(data):
    """ρ_b = ρ_c = 0: the same SGD, schedule, batches and augmentation as every other attack's training, bit
    for bit (so a clean reference trained with `train_model` is this code's own clean model)."""
    train, _ = data
    torch.manual_seed(TEST_SEED)
    start = build_model("small_cnn", 10, 1, 28)
    config = InputAwareConfig(epochs=2, ratio=0.0, cross_ratio=0.0, mask_epochs=0, batch_size=50, width=4)
    ours, _, _ = input_aware(start, train, SPEC, config)
    theirs, _ = train_model(start, train, SPEC, TrainConfig(epochs=2, lr=config.lr, batch_size=50, seed=0))
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_tiny_training_history_and_frozen_mask(trained):
    config, model, trigger, history = trained
    phases = [row["phase"] for row in history]
    assert phases == ["mask"] * config.mask_epochs + ["train"] * config.epochs
    assert all(0 <= row["train_asr"] <= 1 for row in history if row["phase"] == "train")
    assert not any(p.requires_grad for p in trigger.mask.parameters())
    assert next(model.parameters()).device.type == "cpu"


def test_materialised_sets(trained, data):
    train, test = data
    config, _, trigger, _ = trained
    bd = backdoor_test_set(test, trigger, target=0)
    non_target = test.labels != 0
    assert len(bd) == int(non_target.sum()) and bd.images.dtype == torch.uint8
    assert (bd.labels == 0).all() and bd.poisoned.all() and (bd.original_labels != 0).all()
    assert torch.equal(bd.source_index, test.source_index[non_target])
    assert torch.equal(bd.images, trigger(test.images[non_target]))
    crossed = cross_test_set(test, trigger, target=0)
    assert torch.equal(crossed.labels, test.labels[non_target])
    assert observed("input-aware: crossed test images differing from backdoored",
                    (crossed.images != bd.images).flatten(1).any(1).float().mean()) > 0.9  # measured 1.0
    poisoned = poisoned_training_set(train, trigger, config)
    relabelled = poisoned.poisoned & (poisoned.labels != poisoned.original_labels)
    kept = poisoned.poisoned & (poisoned.labels == poisoned.original_labels)
    assert int(relabelled.sum()) == round(config.ratio * len(train)) and (poisoned.labels[relabelled] == 0).all()
    assert int(kept.sum()) == round(config.cross_ratio * len(train))
    assert torch.equal(poisoned.images[~poisoned.poisoned], train.images[~poisoned.poisoned])
    assert torch.equal(poisoned.images[relabelled], trigger(train.images[relabelled]))


def test_trigger_networks_save_and_load(trained, tmp_path, data):
    config, _, trigger, _ = trained
    path = trigger.save(tmp_path / NETWORKS_FILE, config)
    again = InputAwareTrigger.load(path)
    images = data[1].images[:10]
    assert torch.equal(again(images), trigger(images))


def test_registered_like_sam_flatten():
    entry = registry.get("input-aware", "attack")
    assert entry.run is input_aware and entry.config is InputAwareConfig
    assert entry.notes.endswith("(Nguyen & Tran 2020)")
    with pytest.raises(ValueError, match="not a trigger attack"):
        get_attack("input-aware")


@pytest.mark.parametrize("values, message", [
    ({"ratio": 1.0}, "ratio must be in"), ({"ratio": 0.6, "cross_ratio": 0.5}, "ratio \\+ cross_ratio"),
    ({"width": "wide"}, "width must be"), ({"mask_epochs": -1}, "mask_epochs"), ({"eval_every": 0}, "eval_every")])
def test_bad_settings_are_one_line_errors(values, message):
    with pytest.raises(ValueError, match=message):
        InputAwareConfig(**values)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """`d3-plugin attack input-aware --epochs 1 --train-size 300` on a small copy of Fashion-MNIST (2,000 training,
    1,000 test images: every epoch regenerates the whole backdoor test set with G)."""
    from d3_plugin.cli import main

    checkout = tmp_path_factory.mktemp("checkout")
    data = write_fashion_mnist_subset(checkout / "data" / "fashion_mnist", 2000, 1000)
    out = checkout / "record" / "input_aware"
    seed_everything(TEST_SEED)
    assert main(["attack", "input-aware", "--out", str(out), "--epochs", "1", "--train-size", "300", "--device",
                 "cpu", "--data-root", str(data), "--param", "mask_epochs=1", "--param", "width=8"]) == 0
    return out, data


def test_command_line_writes_a_record_that_loads_and_evaluates(record):
    from d3_plugin.record_io.records import load_attack_result, model_from_record

    record, data = record
    loaded = load_attack_result(record, data)
    assert len(loaded.clean_test) == 1000
    bd = loaded.bd_test
    assert len(bd) == int((loaded.clean_test.labels != 0).sum())
    assert (bd.labels == 0).all() and bd.poisoned.all() and (bd.original_labels != 0).all()
    assert not torch.equal(bd.images, loaded.clean_test.images[loaded.clean_test.labels != 0])
    trigger = InputAwareTrigger.load(record / NETWORKS_FILE)
    assert torch.equal(bd.images[:50], trigger(loaded.clean_test.images[bd.source_index[:50]]))  # PNGs exact
    assert loaded.bd_train is not None and int(loaded.bd_train.poisoned.sum()) == 60  # 30 backdoor + 30 cross
    model = model_from_record(loaded)
    results = evaluate(model, Loader(loaded.clean_test, loaded.spec, 500), Loader(bd, loaded.spec, 500))
    assert {"acc", "asr", "ra"} <= set(results) and all(0 <= results[k] <= 1 for k in ("acc", "asr", "ra"))
    info = json.loads((record / "attack_info.json").read_text())
    assert info["attack"] == "input-aware" and info["backdoor_samples"] == 30 and info["cross_samples"] == 30
    assert info["params"]["width"] == 8 and info["params"]["epochs"] == 1
    assert (record / "attack_df.csv").read_text().count("\n") == 2  # header + one epoch
    assert info["cross_acc"] is not None and 0 <= info["cross_acc"] <= 1


@pytest.mark.parametrize("param, message", [("nope=1", "has no parameter nope"), ("epochs=3", "with --epochs"),
                                            ("width=wide", "width must be"), ("oops", "must look like KEY=VALUE"),
                                            ("mask_density=2e0", "mask_density must be in (0, 1]")])
def test_bad_param_is_a_one_line_error(tmp_path, capsys, param, message):
    from d3_plugin.cli import main

    out = tmp_path / "record" / "x"
    assert main(["attack", "input-aware", "--out", str(out), "--device", "cpu", "--param", param]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not out.exists()


def test_param_values_reach_the_config():
    from d3_plugin.cli import build_parser
    from d3_plugin.attacks.make import input_aware_config
    from d3_plugin.commands.attack import spec_of

    args = build_parser()[0].parse_args(["attack", "input-aware", "--out", "x/record/y", "--epochs", "3", "--ratio",
                                         "0.2", "--param", "generator_lr=1e-3", "--param", "cross_ratio=0.05"])
    config = input_aware_config(spec_of(args))
    assert (config.epochs, config.ratio, config.generator_lr, config.cross_ratio) == (3, 0.2, 0.001, 0.05)
    assert (config.lr, config.batch_size, config.mask_density) == (0.05, 128, 0.06)  # defaults where not given
