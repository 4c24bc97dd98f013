"""SAM flattening and the flatness measures: a short (A)SAM run must leave the loss flatter than the
same number of plain SGD steps from the same start, and the measures must match exact computations."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from d3_plugin.attacks.flatness import mean_loss, measure_flatness, perturbation_sharpness, top_hessian_eigenvalue
from d3_plugin.attacks.sam_flatten import FlattenConfig, sam_flatten
from d3_plugin.data import Loader, load_dataset
from d3_plugin.data.readers import dataset_spec
from d3_plugin.models import build_model
from d3_plugin.sam import SAM
from d3_plugin.training import cross_entropy, fit, sgd

from conftest import TEST_SEED, observed


pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]  # see conftest.py


@pytest.fixture(scope="module")
def tiny():
    spec = dataset_spec("fashion_mnist")
    data = load_dataset("fashion_mnist", False).subset(torch.arange(128))
    return spec, data, list(Loader(data, spec, 32))


@pytest.fixture(scope="module")
def start(tiny):
    _, _, batches = tiny
    torch.manual_seed(TEST_SEED)
    model = build_model("small_cnn", 10, 1, 28)
    fit(model, batches, sgd(model.parameters(), 0.05), cross_entropy(), 3)
    return model


def plain_net() -> nn.Module:
    """A small net without batch norm, so eval-mode measures see the weights that were trained."""
    torch.manual_seed(TEST_SEED)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 49, 32), nn.ReLU(), nn.Linear(32, 10))


def test_asam_leaves_a_flatter_minimum_than_sgd(tiny):
    """Same start, same batches, same steps; only the optimizer differs. The top Hessian eigenvalue
    (the curvature SAM targets) must drop well below SGD's while the loss stays far from chance."""
    spec, _, _ = tiny
    data = load_dataset("fashion_mnist", False).subset(torch.arange(256))
    batches = list(Loader(data, spec, 32))
    start = plain_net()
    fit(start, batches, sgd(start.parameters(), 0.05), cross_entropy(), 3)
    results = {}
    for name, rho in (("sgd", 0.0), ("asam", 0.5)):
        model = copy.deepcopy(start)
        base = sgd(model.parameters(), 0.05)
        fit(model, batches, base if rho == 0 else SAM(base, rho, adaptive=True), cross_entropy(), 8)
        results[name] = (top_hessian_eigenvalue(model, batches, iterations=10), mean_loss(model, batches))
    (sharp, sgd_loss), (flat, sam_loss) = results["sgd"], results["asam"]
    # measured 0.21–0.53 and 0.39–0.60
    assert observed("asam / sgd top Hessian eigenvalue", flat / sharp) < 0.6, (flat, sharp)
    assert observed("asam / sgd: larger loss", max(sam_loss, sgd_loss)) < 1.0, "a model at chance is trivially flat"


def test_sam_flatten_trains_a_copy_and_accepts_rho_1_to_3(tiny, start):
    spec, data, _ = tiny
    before = [p.detach().clone() for p in start.parameters()]
    for rho in (1.0, 3.0):
        flat, history = sam_flatten(start, data, spec, FlattenConfig(rho=rho, epochs=1, batch_size=64))
        assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
        assert any(not torch.equal(p, q) for p, q in zip(flat.parameters(), before))
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), before)), "the input model was modified"
    with pytest.raises(ValueError, match="rho > 0"):
        FlattenConfig(rho=0)


def test_hessian_eigenvalue_matches_the_exact_hessian():
    torch.manual_seed(TEST_SEED)
    model = nn.Linear(3, 4)
    inputs, labels = torch.randn(20, 3), torch.randint(0, 4, (20,))
    batches = [(inputs[:10], labels[:10]), (inputs[10:], labels[10:])]
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()

    def loss(flat):
        w, b = flat[:12].view(4, 3), flat[12:]
        return nn.functional.cross_entropy(inputs @ w.T + b, labels)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, torch.cat([weight.flatten(), bias])))
    estimate = top_hessian_eigenvalue(model, batches, iterations=200, tol=1e-7)
    assert estimate == pytest.approx(exact.max().item(), rel=1e-3)


def test_perturbation_sharpness_leaves_the_model_alone(tiny, start):
    _, _, batches = tiny
    state = copy.deepcopy(start.state_dict())
    zero = perturbation_sharpness(start, batches, radius=0.0, draws=2)
    assert zero["sharpness"] == pytest.approx(0.0, abs=1e-6)
    assert zero["loss"] == pytest.approx(mean_loss(start, batches))
    result = measure_flatness(start, batches[:1], radius=0.1, draws=2, hessian_iterations=3)
    assert result["perturbed_loss"] != result["loss"] and "hessian_top" in result
    filtered = perturbation_sharpness(start, batches, 0.1, 2, seed=1, mode="filter")
    assert filtered["perturbed_loss"] != filtered["loss"]
    for key, value in start.state_dict().items():
        assert torch.equal(value, state[key])
