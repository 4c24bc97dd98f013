"""CLP (channel Lipschitzness-based pruning, d3_plugin/defenses/clp.py) on tiny random models: data-free, seconds."""
import copy
import math

import pytest
import torch
from torch import nn

from d3_plugin.defenses.clp import CLPConfig, channel_lipschitz_bounds, clp, clp_masks, conv_bn_pairs
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything

from conftest import TEST_SEED, observed

pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]


@pytest.fixture(autouse=True)
def seeded():
    seed_everything(TEST_SEED)  # before anything random, the models' initial weights included


def no_bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def with_trained_bn(model: nn.Module) -> nn.Module:
    """Spread the BN statistics and affine weights as training would, so the BN scale matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features))
                m.bias.copy_(0.1 * torch.randn(m.num_features))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features))
                m.running_var.copy_(0.5 + torch.rand(m.num_features))
    return model.eval()


def channel_output(model: nn.Module, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    store = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return store["out"]


def pruned_sets(model: nn.Module, **config) -> dict:
    return {name: set(torch.nonzero(mask).flatten().tolist()) for name, mask in
            clp_masks(model, CLPConfig(**config)).items()}


# --- (1) the planted outlier is the channel pruned ---------------------------------------------------

PLANTS = {
    "conv weight": lambda conv, bn, k: conv.weight[k].mul_(20),
    "bn gamma": lambda conv, bn, k: bn.weight[k].mul_(20),
    "bn running_var": lambda conv, bn, k: bn.running_var[k].div_(400),  # 1/sqrt(var) grows 20x
}


@pytest.mark.parametrize("where", sorted(PLANTS))
def test_a_planted_outlier_channel_is_pruned_and_its_activation_removed(where):
    model = with_trained_bn(build_model("small_cnn", 10, 1, 28))
    before = pruned_sets(model)
    planted = copy.deepcopy(model)
    modules = dict(planted.named_modules())
    conv, bn, k = modules["features.2.0"], modules["features.2.1"], 7
    with torch.no_grad():
        PLANTS[where](conv, bn, k)
    after = pruned_sets(planted)
    assert after["features.2.0"] == {k}, after
    assert {n: s for n, s in after.items() if n != "features.2.0"} == \
           {n: s for n, s in before.items() if n != "features.2.0"}  # thresholds are per layer

    purified, history = clp(planted, None)
    out = dict(purified.named_modules())
    assert out["features.2.1"].weight[k] == 0 and out["features.2.1"].bias[k] == 0
    keep = torch.arange(32) != k
    assert torch.equal(out["features.2.1"].weight[keep], bn.weight[keep])
    assert torch.equal(out["features.2.0"].weight, conv.weight)  # paired: the BN is zeroed, not the conv
    activation = channel_output(purified, out["features.2.1"], torch.randn(4, 1, 28, 28))
    assert torch.count_nonzero(activation[:, k]) == 0 and torch.count_nonzero(activation[:, keep]) > 0
    assert history[0]["pruned"] == sum(len(s) for s in after.values()) >= 1


def test_preact_conv_is_scored_and_pruned_through_the_bn_that_consumes_its_output():
    model = with_trained_bn(build_model("preactresnet18", 10, 3, 32))
    pairs = {name: bn_name for name, _, bn_name, _ in conv_bn_pairs(model)}
    assert pairs["conv1"] == "layer1.0.bn1"
    assert pairs["layer1.0.conv1"] == "layer1.0.bn2"
    assert pairs["layer1.0.conv2"] == "layer1.1.bn1"
    assert pairs["layer2.0.conv2"] is None and pairs["layer2.0.shortcut.0"] == "layer2.1.bn1"
    assert pairs["layer4.1.conv2"] is None
    assert len(set(b for b in pairs.values() if b)) == len([b for b in pairs.values() if b])  # one conv per BN

    unplanted, _ = clp(model, None)
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules["layer1.0.conv1"].weight[3].mul_(20)
    purified, _ = clp(model, None)
    out, before = dict(purified.named_modules()), dict(unplanted.named_modules())
    assert out["layer1.0.bn2"].weight[3] == 0 and out["layer1.0.bn2"].bias[3] == 0
    # the BN in front of the planted conv decides as it did without the plant (a random layer may lose a channel
    # to CLP either way)
    assert torch.equal(out["layer1.0.bn1"].weight, before["layer1.0.bn1"].weight)


def test_without_bn_the_conv_output_channel_is_zeroed():
    model = no_bn_model()
    with torch.no_grad():
        model[2].weight[5].mul_(20)
    purified, history = clp(model, None)
    assert torch.count_nonzero(purified[2].weight[5]) == 0 and purified[2].bias[5] == 0
    assert torch.count_nonzero(channel_output(purified, purified[2], torch.randn(2, 1, 8, 8))[:, 5]) == 0
    assert history[0]["channels"] == 8 + 16
    _, bn_only = clp(model, None, CLPConfig(prune_unpaired=False))  # the authors' code prunes BN-paired convs only
    assert bn_only[0]["pruned"] == 0 and bn_only[0]["channels"] == 0


def test_uclc_is_the_spectral_norm_times_the_bn_scale():
    model = with_trained_bn(build_model("small_cnn", 10, 1, 28))
    modules = dict(model.named_modules())
    conv, bn = modules["features.4.0"], modules["features.4.1"]
    bn.running_var[11] = bn.eps  # BN divides by sqrt(var + eps): here eps doubles the variance
    bounds = channel_lipschitz_bounds(model)["features.4.0"]
    for k in (0, 11, 63):
        sigma = torch.linalg.svdvals(conv.weight[k].reshape(conv.in_channels, -1)).max()
        expected = sigma * bn.weight[k].abs() / math.sqrt(bn.running_var[k] + bn.eps)
        assert torch.isclose(bounds[k], expected, rtol=1e-5), (k, bounds[k], expected)


# --- (2) a pruned copy with the same architecture -----------------------------------------------------

def test_the_input_model_is_unchanged_and_the_copy_keeps_its_architecture():
    model = with_trained_bn(build_model("small_cnn", 10, 1, 28))
    with torch.no_grad():
        model.features[2][0].weight[7].mul_(20)
    original = copy.deepcopy(model.state_dict())
    purified, _ = clp(model, None)
    assert purified is not model and type(purified) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    state = purified.state_dict()
    assert list(state) == list(original)
    assert all(state[k].shape == original[k].shape and state[k].dtype == original[k].dtype for k in state)
    assert any(not torch.equal(state[k], original[k]) for k in state), "CLP returned an unchanged model"


# --- (3) the threshold --------------------------------------------------------------------------------

def test_a_larger_u_prunes_a_subset_of_what_a_smaller_u_prunes():
    model = with_trained_bn(build_model("small_cnn", 10, 1, 28))
    sets = [pruned_sets(model, u=u) for u in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0)]
    counts = [sum(len(s) for s in layer.values()) for layer in sets]
    assert counts[0] > 0 and counts[-1] == 0, counts  # at most 63/√64 ≈ 7.9 std above the mean
    for smaller, larger in zip(sets, sets[1:]):
        assert all(larger[name] <= smaller[name] for name in smaller), (smaller, larger)
    assert counts == sorted(counts, reverse=True)


# --- (4) config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    {"u": float("nan")}, {"u": float("inf")}, {"u": -float("inf")}, {"u": -0.5}, {"u": "3"}, {"u": None},
    {"u": True}, {"prune_unpaired": "yes"}, {"prune_unpaired": 1},
])
def test_bad_config_values_raise(values):
    with pytest.raises(ValueError):
        CLPConfig(**values)


def test_good_config_values_round_trip():
    config = CLPConfig(u=0, prune_unpaired=False)
    assert CLPConfig(**config.to_dict()) == config
    assert CLPConfig().to_dict() == {"u": 3.0, "prune_unpaired": True}


# --- (5) architectures, data-freeness, history --------------------------------------------------------

class Untouchable:
    def __iter__(self):
        raise AssertionError("CLP is data-free: it must not read clean_batches")


@pytest.mark.parametrize("build, shape", [
    (lambda: build_model("small_cnn", 10, 1, 28), (2, 1, 28, 28)),
    (lambda: build_model("preactresnet18", 10, 3, 32), (2, 3, 32, 32)),
    (no_bn_model, (2, 1, 28, 28)),
])
def test_runs_data_free_on_each_architecture_and_reports_one_row(build, shape):
    model = build().eval()
    calls = []

    def on_epoch(epoch, net):
        calls.append((epoch, net))
        return {"acc": 0.5, "asr": 0.25}

    purified, history = clp(model, Untouchable(), CLPConfig(u=1.0), on_epoch=on_epoch, progress="clp")
    assert len(calls) == 1 and calls[0][0] == 1 and calls[0][1] is purified
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert history[0]["acc"] == 0.5 and history[0]["asr"] == 0.25
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert history[0]["channels"] == sum(c.out_channels for c in convs)
    share = observed("clp u=1, random layers: share of channels pruned", history[0]["pruned"] / history[0]["channels"])
    assert 0 < share < 1  # u=1 flags some channels of random layers; measured 0.12–0.21
    with torch.no_grad():
        assert torch.isfinite(purified(torch.randn(*shape))).all()


def test_runs_on_a_bfloat16_model():
    model = build_model("small_cnn", 10, 1, 28).to(torch.bfloat16)
    purified, history = clp(model, None, CLPConfig(u=1.0))
    assert observed("clp u=1, random bf16 small_cnn: channels pruned", history[0]["pruned"]) > 0  # measured 13–20
    assert all(p.dtype == torch.bfloat16 for p in purified.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda_and_stays_there():
    model = with_trained_bn(build_model("small_cnn", 10, 1, 28)).cuda()
    purified, history = clp(model, None, CLPConfig(u=1.0))
    assert history[0]["pruned"] > 0 and all(p.is_cuda for p in purified.parameters())
    assert pruned_sets(model, u=1.0) == pruned_sets(copy.deepcopy(model).cpu(), u=1.0)
