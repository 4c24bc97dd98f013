"""BadActs (d3_plugin.defenses.badacts): learned clean activation intervals, the clipped model, detection by
neuron activation state, metrics and config checks. Tiny models, a few hundred Fashion-MNIST images."""
import copy
import math

import pytest
import torch
from torch import nn

from d3_plugin import registry
from d3_plugin.data import Loader, dataset_spec, load_dataset
from d3_plugin.defenses.badacts import (BadActsConfig, ClippedModel, accuracy, badacts, default_layers,
                                        detection_metrics, fit_detector, initial_bounds)
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything, train_classifier

from conftest import TEST_SEED, observed

pytestmark = pytest.mark.trained  # see conftest.py


@pytest.fixture(scope="module")
def fashion(suite_threads):
    """A small_cnn trained briefly on 1,024 images, and two disjoint 256-image clean sets."""
    seed_everything(TEST_SEED)
    data, spec = load_dataset("fashion_mnist", True), dataset_spec("fashion_mnist")
    train = data.subset(torch.arange(1024))
    model, _ = train_classifier(build_model("small_cnn", 10, 1, 28), Loader(train, spec, 64, train=True),
                                epochs=2, lr=0.05)
    reserved = Loader(data.subset(torch.arange(1024, 1280)), spec, 128)
    held_out = Loader(data.subset(torch.arange(1280, 1536)), spec, 256)
    return model.eval(), reserved, held_out


def patched(inputs: torch.Tensor, value: float = 30.0) -> torch.Tensor:
    """A corner patch of huge values: activations far outside anything clean."""
    out = inputs.clone()
    out[:, :, :8, :8] = value
    return out


def layer_outputs(model: nn.Module, layers, inputs: torch.Tensor):
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out.detach().clone()))
               for n in layers]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return outputs


def channel_view(bound: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return bound.view(1, -1, *([1] * (out.dim() - 2)))


# ------------------------------------------------------------------------------------------- purification


def test_intervals_contain_the_clean_activations_they_were_fitted_on(fashion):
    model, reserved, _ = fashion
    inputs = torch.cat([x for x, _ in reserved])
    exact, _ = badacts(model, reserved, BadActsConfig(epochs=0, init_k=None))
    learned, _ = badacts(model, reserved, BadActsConfig(epochs=3))
    outputs = layer_outputs(model, exact.layers, inputs)
    assert exact.layers == ("features.0", "features.2", "features.4")
    # [min, max] bounds hold every activation; learned ones (3 epochs) most within 5 % of the span: measured 0.92–0.99
    for clipped, tolerance, share in ((exact, 0.0, 1.0), (learned, 0.05, 0.85)):
        bounds = clipped.bounds_state()
        inside = total = 0
        for name, out in outputs.items():
            low, up = channel_view(bounds[f"{name}.lower"], out), channel_view(bounds[f"{name}.upper"], out)
            span = channel_view(out.transpose(0, 1).flatten(1).amax(1) - out.transpose(0, 1).flatten(1).amin(1), out)
            inside += int(((out >= low - tolerance * span) & (out <= up + tolerance * span)).sum())
            total += out.numel()
        assert observed(f"badacts: share inside the bounds ± {tolerance} span", inside / total) >= share
    with torch.no_grad():  # [min, max] bounds are the identity on the set they came from
        assert torch.equal(exact(inputs), model(inputs))


def test_clipping_keeps_clean_logits_and_pulls_outlying_activations_back(fashion):
    model, reserved, held_out = fashion
    clipped, _ = badacts(model, reserved, BadActsConfig(epochs=3))
    inputs = next(iter(held_out))[0]
    with torch.no_grad():
        clean, clean_clipped = model(inputs), clipped(inputs)
        attacked, attacked_clipped = model(patched(inputs)), clipped(patched(inputs))
    scale = float(clean.var())

    def change(a, b, claim):
        return observed(f"badacts: {claim}", float(((a - b) ** 2).mean()) / scale)
    # measured (÷ the clean logits' variance): 0.012–0.058, 0.38–23, 0.43–21, 0.006–0.19
    assert change(clean_clipped, clean, "clean logits moved by clipping") < 0.1  # unseen clean images: nearly unchanged
    assert change(attacked, clean, "logits moved by the patch") > 0.3  # the patch moves the victim's logits a lot
    assert change(attacked_clipped, attacked, "patched logits moved by clipping") > 0.3  # clipping changes them ...
    pulled_back = float(((attacked_clipped - clean) ** 2).mean() / ((attacked - clean) ** 2).mean())
    assert observed("badacts: patched-clipped / patched distance to clean", pulled_back) < 0.25  # ... back


def planted_backdoor():
    """x → Linear(4, 8) → ReLU → Linear(8, 3); hidden neuron 7 reads only feature 3 (≈ 0 on clean data)
    and votes for class 2: a trigger x₃ = 5 drives it to 50 and forces class 2."""
    seed_everything(TEST_SEED)
    toy = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        toy[0].weight[:, 3] = 0
        toy[0].weight[7] = torch.tensor([0.0, 0.0, 0.0, 10.0])
        toy[0].bias[7] = 0
        toy[2].weight.mul_(5)  # decisive clean logits
        toy[2].weight[:, 7] = torch.tensor([0.0, 0.0, 0.5])
    clean = torch.cat([torch.randn(512, 3), 0.01 * torch.randn(512, 1)], 1)
    with torch.no_grad():
        labels = toy(clean).argmax(1)
    return toy.eval(), clean, labels


def test_a_planted_backdoor_neuron_is_clipped_back_into_its_clean_range():
    toy, clean, labels = planted_backdoor()
    batches = [(clean[i:i + 128], labels[i:i + 128]) for i in range(0, 512, 128)]
    clipped, _ = badacts(toy, batches, BadActsConfig(layers=["1"], epochs=5))
    triggered = clean.clone()
    triggered[:, 3] = 5.0
    with torch.no_grad():
        assert (toy(triggered).argmax(1) == 2).all()
        purified = clipped(triggered).argmax(1)
    # measured 0.95–0.99 and 0.18–0.25
    assert observed("badacts toy: triggered inputs given their clean label", (purified == labels).float().mean()) > 0.9
    assert observed("badacts toy: backdoor neuron's upper bound", clipped.bounds_state()["1.upper"][7]) < 0.5  # tiny
    assert accuracy(clipped, batches) >= 0.98  # the floor (the victim is 100 % accurate on its own labels)


def test_the_victim_is_untouched_and_saved_bounds_reproduce_the_clipped_model(fashion):
    model, reserved, held_out = fashion
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    clipped, _ = badacts(model, reserved, BadActsConfig(epochs=2))
    for state in (model.state_dict(), clipped.base.state_dict()):
        assert list(state) == list(before)
        assert all(state[k].dtype == before[k].dtype and torch.equal(state[k], before[k]) for k in before)
    assert [p.requires_grad for p in clipped.base.parameters()] == flags
    assert not any(m._forward_hooks for net in (model, clipped.base) for m in net.modules())
    saved = clipped.bounds_state()
    assert list(saved) == [f"{n}.{kind}" for n in clipped.layers for kind in ("lower", "upper")]
    assert all((saved[f"{n}.lower"] <= saved[f"{n}.upper"]).all() for n in clipped.layers)
    restored = ClippedModel.from_bounds(model, saved)
    inputs = torch.cat([next(iter(held_out))[0], patched(next(iter(held_out))[0])])
    with torch.no_grad():
        assert torch.equal(restored(inputs), clipped(inputs))
        assert not torch.equal(restored(inputs), model(inputs))
        assert torch.equal(clipped.base(inputs), model(inputs))  # base is the plain victim
    assert all(torch.equal(a, b) for a, b in zip(restored.bounds_state().values(), saved.values()))
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(clipped)(inputs), clipped(inputs))


def test_runs_repeat_exactly_given_the_seed(fashion):
    model, reserved, _ = fashion
    runs = []
    for _ in range(2):
        seed_everything(TEST_SEED)
        runs.append(badacts(model, reserved, BadActsConfig(epochs=2)))
    first, second = (clipped.bounds_state() for clipped, _ in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert runs[0][1] == runs[1][1]


@pytest.mark.parametrize("initial, scripted, kept_epoch", [
    (1.0, [0.97, 0.90, 0.99, 0.80, 0.85], 3),  # both branches: the last epoch meeting the floor
    (1.0, [0.90, 0.80, 0.94, 0.85, 0.70], 0),  # no epoch meets it: the initial bounds stay
    (0.5, [0.90, 0.80, 0.94, 0.85, 0.70], 3),  # nothing meets it, the initial bounds neither: the most accurate
])
def test_history_rows_the_c_rule_and_the_returned_bounds(monkeypatch, initial, scripted, kept_epoch):
    """The c rule and the choice of bounds as logic, whatever the toy's accuracy would be: the reserved
    accuracy of the victim (1.0), of the initial bounds and after each epoch is scripted; floor 0.955."""
    import d3_plugin.defenses.badacts as module
    toy, clean, labels = planted_backdoor()
    batches = [(clean[i:i + 128], labels[i:i + 128]) for i in range(0, 512, 128)]
    seen_bounds = {0: badacts(toy, batches, BadActsConfig(layers=["1"], epochs=0))[0].bounds_state()["1.upper"]}
    answers = iter([1.0, initial, *scripted])
    monkeypatch.setattr(module, "accuracy", lambda _model, _batches: next(answers))

    def on_epoch(epoch, net):
        seen_bounds[epoch] = net.bounds(0)[1].detach().clone()
        return {"seen": float(epoch)}

    config = BadActsConfig(layers=["1"], epochs=len(scripted), c=1.0, c_factor=2.0, acc_floor=0.955)
    clipped, history = badacts(toy, batches, config, on_epoch=on_epoch)
    assert [row["epoch"] for row in history] == list(range(1, len(scripted) + 1))
    assert [row["reserved_acc"] for row in history] == scripted
    for row in history:
        assert {"epoch", "loss", "mse", "width", "c", "reserved_acc", "seen"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
    for row, following in zip(history, history[1:]):
        factor = config.c_factor if row["reserved_acc"] >= config.acc_floor else 1 / config.c_factor
        assert following["c"] == pytest.approx(row["c"] * factor)
    assert torch.equal(clipped.bounds_state()["1.upper"], seen_bounds[kept_epoch])


def test_with_a_floor_of_1_the_most_accurate_bounds_are_kept():
    """acc_floor 1.0: only a perfect epoch meets it, so whatever the toy does, the kept bounds are the most
    accurate of the initial ones and every epoch's."""
    toy, clean, labels = planted_backdoor()
    batches = [(clean[i:i + 128], labels[i:i + 128]) for i in range(0, 512, 128)]
    strict, history = badacts(toy, batches, BadActsConfig(layers=["1"], epochs=3, acc_floor=1.0))
    initial = badacts(toy, batches, BadActsConfig(layers=["1"], epochs=0))[1][0]["reserved_acc"]
    assert accuracy(strict, batches) == max(initial, *(row["reserved_acc"] for row in history))


def test_default_layers_are_residual_stages_or_conv_blocks():
    assert default_layers(build_model("preactresnet18", 10)) == ["layer1", "layer2", "layer3", "layer4"]
    assert default_layers(build_model("small_cnn", 10, 1, 28)) == ["features.0", "features.2", "features.4"]
    with pytest.raises(ValueError, match="name the modules with `layers`"):
        default_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    batches = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ValueError, match="not modules of the model"):
        badacts(build_model("small_cnn", 10, 1, 28), batches, BadActsConfig(layers=["nope"], epochs=1))


def test_bad_saved_bounds_are_one_line_errors():
    model = build_model("small_cnn", 10, 1, 28)
    with pytest.raises(ValueError, match="must end in .lower or .upper"):
        ClippedModel.from_bounds(model, {"features.0": torch.zeros(16)})
    with pytest.raises(ValueError, match="incomplete: \\['features.0'\\]"):
        ClippedModel.from_bounds(model, {"features.0.lower": torch.zeros(16)})
    with pytest.raises(ValueError, match="lower ≤ upper"):
        ClippedModel.from_bounds(model, {"features.0.lower": torch.ones(16), "features.0.upper": torch.zeros(16)})
    wrong = ClippedModel.from_bounds(model, {"features.0.lower": torch.zeros(3), "features.0.upper": torch.ones(3)})
    with pytest.raises(ValueError, match="does not match bounds of 3 channels"):
        wrong(torch.zeros(1, 1, 28, 28))


# ---------------------------------------------------------------------------------------------- detection


def test_detection_scores_are_deterministic_and_flag_out_of_distribution_inputs(fashion):
    model, reserved, held_out = fashion
    config = BadActsConfig()
    detector = fit_detector(model, reserved, config)
    again = fit_detector(model, reserved, config)
    assert torch.equal(detector.mean, again.mean) and detector.threshold == again.threshold
    assert (detector.clean_scores < detector.threshold).float().mean() <= config.fpr
    inputs = next(iter(held_out))[0]
    clean = detector.scores(model, held_out)
    assert torch.equal(clean, detector.scores(model, held_out))
    ood = detector.scores(model, [(patched(inputs), None)])
    noise = detector.scores(model, [(3 * torch.randn_like(inputs), None)])
    flagged_clean = observed("badacts detection: held-out clean flagged", (clean < detector.threshold).float().mean())
    assert flagged_clean < 0.15  # measured 0.008–0.031
    for kind, other in (("patched", ood), ("noise", noise)):
        flagged = observed(f"badacts detection: {kind} flagged − clean flagged",
                           (other < detector.threshold).float().mean() - flagged_clean)
        assert flagged > 0.7  # measured 0.97–0.99 (patched and noise)
    assert torch.equal(detector.flag(model, held_out), clean < detector.threshold)
    clipped, _ = badacts(model, reserved, BadActsConfig(epochs=1))
    assert torch.equal(detector.scores(clipped, held_out), clean)  # scored through the unclipped base
    metrics = detection_metrics(clean, ood, detector.threshold)
    assert observed("badacts detection: patched AUROC", metrics["auroc"]) > 0.99  # measured 1.0 (and 1.0 flagged)
    assert observed("badacts detection: patched flagged", metrics["flagged_poisoned"]) > 0.9


def test_detection_metrics_match_a_hand_computed_example():
    clean, poisoned = [0.9, 0.8, 0.5, 0.7], [0.4, 0.8, 0.95]
    # pairs (poisoned below clean = 1, tie = ½): 0.4 → 4, 0.8 → 1 + ½, 0.95 → 0;  5.5 / 12
    metrics = detection_metrics(clean, poisoned, threshold=0.75, fpr=0.25)
    assert metrics["auroc"] == pytest.approx(5.5 / 12)
    assert metrics["flagged_clean"] == pytest.approx(2 / 4)  # 0.5, 0.7
    assert metrics["flagged_poisoned"] == pytest.approx(1 / 3)  # 0.4
    assert metrics["tpr_at_fpr"] == pytest.approx(1 / 3)  # cut = sorted clean[⌊4·0.25⌋] = 0.7: 0.4 only
    separable = detection_metrics(torch.linspace(0.8, 1.0, 50), torch.linspace(0.1, 0.3, 20), 0.5)
    assert separable == {"auroc": 1.0, "tpr_at_fpr": 1.0, "flagged_clean": 0.0, "flagged_poisoned": 1.0}
    assert detection_metrics([0.1, 0.2], [0.8, 0.9], 0.5)["auroc"] == 0.0
    assert detection_metrics([0.5] * 3, [0.5] * 2, 0.5)["auroc"] == 0.5
    with pytest.raises(ValueError, match="at least one clean and one poisoned"):
        detection_metrics([], [0.1], 0.5)


# ---------------------------------------------------------------------------------------- config, registry


@pytest.mark.parametrize("field, value", [
    ("epochs", -1), ("epochs", 1.5), ("epochs", True), ("batch_size", 0), ("seed", -2), ("lr", 0.0),
    ("lr", float("nan")), ("c", -1.0), ("c", float("inf")), ("c_factor", 0.5), ("init_k", 0.0),
    ("acc_floor", 1.5), ("k", 0), ("fpr", 1.0), ("fpr", -0.1), ("penalty", "l1"), ("layers", []),
    ("layers", [""]), ("layers", [3]),
])
def test_bad_config_values_are_one_line_value_errors(field, value):
    with pytest.raises(ValueError, match=f"BadActs {field}") as error:
        BadActsConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_registered_as_a_native_clean_data_defense_with_an_epoch_budget():
    entry = registry.get("badacts")
    assert entry.where == "native" and entry.data == "clean" and entry.run is badacts and entry.source
    assert "no implementation" not in entry.notes
    defense = registry.build("badacts", budget=3)
    assert defense.config.epochs == 3 and isinstance(defense.config, BadActsConfig)


def test_initial_bounds_without_init_k_are_the_padded_clean_range():
    seed_everything(TEST_SEED)
    toy = nn.Sequential(nn.Linear(3, 5))
    x = torch.randn(64, 3)
    lower, upper = initial_bounds(toy, ["0"], [(x, None)], None)
    with torch.no_grad():
        out = toy(x)
    span = out.amax(0) - out.amin(0)
    assert torch.allclose(lower[0], out.amin(0) - 1e-3 * span - 1e-6)
    assert torch.allclose(upper[0], out.amax(0) + 1e-3 * span + 1e-6)
    narrow, _ = initial_bounds(toy, ["0"], [(x, None)], 1.0)
    assert (narrow[0] > lower[0]).all()
