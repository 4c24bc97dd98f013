"""The common training loop: history rows, cosine schedule, SAM through fit, the after_step hook."""
import pytest
import torch
from torch import nn

from d3_plugin.sam import SAM
from d3_plugin.training import cosine, cross_entropy, fit, resolve_device, seed_everything, sgd, train_epoch


def separable_batches(n=96, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def linear_model():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def test_fit_history_rows_and_cosine_lr():
    model, batches = linear_model(), separable_batches()
    optimizer = sgd(model.parameters(), 0.1)
    history = fit(model, batches, optimizer, cross_entropy(), 5, scheduler=cosine(optimizer, 5),
                  on_epoch=lambda epoch, m: {"seen": float(epoch)})
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert [row["seen"] for row in history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    lrs = [row["lr"] for row in history]
    assert lrs[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[2] == pytest.approx(0.1 * (1 + torch.cos(torch.tensor(2 * torch.pi / 5)).item()) / 2)
    assert history[-1]["loss"] < history[0]["loss"]


def test_fit_with_sam_lowers_the_loss_and_calls_the_closure_twice():
    model, batches = linear_model(), separable_batches()
    calls = {"objective": 0, "after_step": 0}
    plain = cross_entropy()

    def counted(m, x, y):
        calls["objective"] += 1
        return plain(m, x, y)

    def after_step(m):
        assert m is model
        calls["after_step"] += 1

    base = sgd(model.parameters(), 0.1)
    history = fit(model, batches, SAM(base, rho=0.5), counted, 4, scheduler=cosine(base, 4), after_step=after_step)
    steps = 4 * len(batches)
    assert calls == {"objective": 2 * steps, "after_step": steps}
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[1]["lr"] < history[0]["lr"]  # the scheduler drives SAM's base optimizer


def test_sam_stats_are_taken_at_the_unperturbed_weights():
    model, batches = linear_model(), separable_batches()[:1]
    x, y = batches[0]
    expected = nn.functional.cross_entropy(model(x), y).item()
    stats = train_epoch(model, batches, SAM(sgd(model.parameters(), 0.1), rho=2.0), cross_entropy())
    assert stats["loss"] == pytest.approx(expected, rel=1e-6)


def test_train_epoch_averages_stats_over_batches_and_sets_bn_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batches = separable_batches(n=48, batch=16)

    def objective(m, x, y):
        loss = nn.functional.cross_entropy(m(x), y)
        return loss, {"loss": loss.detach(), "first": x[0, 0].detach()}

    stats = train_epoch(model, batches, sgd(model.parameters(), 0.0), objective, bn_train=False)
    assert not model.training
    assert stats["first"] == pytest.approx(sum(x[0, 0].item() for x, _ in batches) / 3, rel=1e-6)
    train_epoch(model, batches, sgd(model.parameters(), 0.0), objective, bn_train=True)
    assert model.training


def test_seed_everything_repeats_draws():
    seed_everything(7)
    a = torch.rand(3)
    seed_everything(7)
    assert torch.equal(a, torch.rand(3))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
