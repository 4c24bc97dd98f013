"""The common training loop: history rows, cosine schedule, SAM through fit, the after_step hook."""
import pytest
import torch
from torch import nn

from d3_plugin.sam import SAM
from d3_plugin.training import cosine, cross_entropy, fit, resolve_device, seed_everything, sgd, train_epoch

from conftest import TEST_SEED, observed

pytestmark = pytest.mark.trained  # see conftest.py


def separable_batches(n=96, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def linear_model():
    torch.manual_seed(TEST_SEED)
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
    ratio = history[-1]["loss"] / history[0]["loss"]
    assert observed("fit with SAM: last / first epoch loss", ratio) < 0.7  # measured 0.18–0.32
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


def poison_weights(model):
    """An after_step hook that breaks the model: its bias becomes NaN."""
    with torch.no_grad():
        model.bias.fill_(float("nan"))


def test_fit_stops_with_one_line_when_the_loss_or_the_weights_become_non_finite():
    from d3_plugin.training import Diverged
    model, batches = linear_model(), separable_batches()
    with pytest.raises(Diverged, match="training diverged in epoch 1: the loss became non-finite; lower the learning"):
        fit(model, batches, sgd(model.parameters(), 1e38), cross_entropy(), 3)
    model = linear_model()
    with pytest.raises(Diverged, match="epoch 1: the loss became non-finite|epoch 1: the weights became non-finite"):
        fit(model, batches, sgd(model.parameters(), 0.1), cross_entropy(), 3, after_step=poison_weights)


def test_fit_notices_weights_that_go_non_finite_after_the_last_step():
    from d3_plugin.training import Diverged
    model, batches = linear_model(), separable_batches(n=16)  # one batch: the loss is taken before the step
    with pytest.raises(Diverged, match="epoch 1: the weights became non-finite"):
        fit(model, batches, sgd(model.parameters(), 0.1), cross_entropy(), 2, after_step=poison_weights)


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


# --- precision (d3_plugin.precision) ---------------------------------------------------------------

from d3_plugin import precision as precision_module  # noqa: E402
from d3_plugin.d3 import D3Config, detoxify, distance, objective, project, select_weights  # noqa: E402
from d3_plugin.precision import Precision, full_precision, resolve_precision  # noqa: E402
from d3_plugin.training import due  # noqa: E402


def conv_model():
    torch.manual_seed(TEST_SEED)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def image_batches(n=48, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.2).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_is_bf16_exactly_when_the_cpu_has_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    mode = resolve_precision("auto", "cpu", model=conv_model())
    assert (mode.name, mode.device_type, mode.channels_last) == (expected, "cpu", True)
    assert not resolve_precision("auto", "cpu", model=linear_model()).channels_last  # no conv: no channels_last
    assert not resolve_precision("bf16", "cpu", model=conv_model(), channels_last=False).channels_last
    assert resolve_precision(None, "cpu", model=conv_model()) == Precision("fp32", "cpu", False)


def test_cuda_rules_without_a_gpu(monkeypatch):
    """The CUDA branches resolve as documented (resolution only: nothing runs on a GPU here)."""
    for bf16 in (True, False):
        monkeypatch.setattr(precision_module, "cuda_has_bf16", lambda device: bf16)
        mode = resolve_precision("auto", "cuda", model=conv_model())
        assert (mode.name, mode.needs_scaler, mode.channels_last) == (("bf16", False, True) if bf16 else
                                                                       ("fp16", True, True))
        assert resolve_precision("auto", "cuda", sam=True).name == ("bf16" if bf16 else "fp32")
        assert resolve_precision("fp16", "cuda").needs_scaler
        assert not resolve_precision("fp32", "cuda", model=conv_model()).channels_last
    with pytest.raises(ValueError, match="SAM"):
        resolve_precision("fp16", "cuda", sam=True)
    with pytest.raises(ValueError, match="native bf16"):
        resolve_precision("bf16", "cuda")


@pytest.mark.parametrize("name, message", [("fp16", "needs a CUDA device"), ("half", "not one of"),
                                           ("", "not one of")])
def test_fp16_on_cpu_and_unknown_names_are_one_line_errors(name, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_precision(name, "cpu")
    assert "\n" not in str(error.value) and "--precision" in str(error.value)
    with pytest.raises(ValueError, match=message):  # D3Config rejects a bad name; fp16 fails on the CPU
        detoxify(conv_model(), image_batches(), D3Config(epochs=1, precision=name))


def test_bf16_fit_keeps_fp32_weights_and_restores_the_memory_format():
    model, batches = conv_model(), image_batches()
    optimizer = sgd(model.parameters(), 0.1)
    formats = []

    def on_epoch(epoch, m):
        formats.append(m[0].weight.is_contiguous(memory_format=torch.channels_last))
        return {}

    history = fit(model, batches, optimizer, cross_entropy(), 6, precision="bf16", on_epoch=on_epoch)
    assert formats == [True] * 6  # channels_last while training
    assert model[0].weight.is_contiguous()  # and back afterwards
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in optimizer.state.values())
    assert history[-1]["loss"] < history[0]["loss"]


def test_sam_runs_under_bf16():
    model, batches = conv_model(), image_batches()
    calls = {"objective": 0}
    plain = cross_entropy()

    def counted(m, x, y):
        calls["objective"] += 1
        assert torch.is_autocast_enabled("cpu")
        return plain(m, x, y)

    base = sgd(model.parameters(), 0.1)
    history = fit(model, batches, SAM(base, rho=0.05), counted, 3, precision="bf16")
    assert calls["objective"] == 2 * 3 * len(batches)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history[-1]["loss"] < history[0]["loss"]


def test_grad_scaler_path_equals_the_plain_step():
    """The fp16 code path (closure once, scaler.step, scaler.update) on CPU with a CPU GradScaler and
    no autocast: scaling by a power of two is exact, so the weights match an unscaled step."""
    batches = separable_batches()
    plain, scaled = linear_model(), linear_model()
    train_epoch(plain, batches, sgd(plain.parameters(), 0.1), cross_entropy())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    stats = train_epoch(scaled, batches, sgd(scaled.parameters(), 0.1), cross_entropy(), scaler=scaler)
    assert stats["loss"] > 0
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="SAM"):
        train_epoch(scaled, batches, SAM(sgd(scaled.parameters(), 0.1)), cross_entropy(), scaler=scaler)


def test_a_d3_step_under_bf16_keeps_weights_fp32_and_the_projection_exact():
    model, batches = conv_model(), image_batches()
    config = D3Config(epochs=1, lr=0.5, layers=["0", "5"], precision="bf16", warm_start="near")
    weights = select_weights(model, config.layers)
    initial = {n: w.detach().clone() for n, w in weights.items()}
    norms = {n: torch.linalg.vector_norm(w) for n, w in initial.items()}
    seen = {}
    d3_loss = objective(weights, initial, config)

    def recorded(m, x, y):
        loss, stats = d3_loss(m, x, y)
        seen.update(loss=loss.dtype, distance=stats["distance"].dtype, autocast=torch.is_autocast_enabled("cpu"))
        return loss, stats

    fit(model, batches, sgd(model.parameters(), config.lr), recorded, 2, precision="bf16",
        after_step=lambda _: project(weights, norms))
    assert seen == {"loss": torch.float32, "distance": torch.float32, "autocast": True}
    for name, w in weights.items():
        assert w.dtype == torch.float32
        assert not torch.equal(w, initial[name])
        assert torch.linalg.vector_norm(w).item() == pytest.approx(norms[name].item(), rel=1e-5)
    with full_precision("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert distance(weights, initial).dtype == torch.float32
    purified, history = detoxify(model, batches, config)
    assert all(p.dtype == torch.float32 for p in purified.parameters())
    assert purified[0].weight.is_contiguous() and len(history) == 1


def test_on_epoch_every_n_and_always_the_last():
    assert [e for e in range(1, 6) if due(e, 5, 3)] == [3, 5]
    assert [e for e in range(1, 5) if due(e, 4, 1)] == [1, 2, 3, 4]
    model, batches = linear_model(), separable_batches()
    history = fit(model, batches, sgd(model.parameters(), 0.1), cross_entropy(), 5,
                  on_epoch=lambda epoch, m: {"seen": float(epoch)}, on_epoch_every=3)
    assert [row.get("seen") for row in history] == [None, None, 3.0, None, 5.0]
    with pytest.raises(ValueError, match="on_epoch_every"):
        fit(model, batches, sgd(model.parameters(), 0.1), cross_entropy(), 1, on_epoch_every=0)
