"""Model zoo: BackdoorBench-identical state_dict keys, cheap construction, default D3 layers."""
import pytest
import torch

from d3_plugin.d3_targets import default_layers
from d3_plugin.models import build_model, model_names


def expected_preactresnet18(num_classes=10):
    """BackdoorBench's PreActResNet18 state_dict, written out: (key, shape) in registration order."""
    def bn(prefix, c):
        return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
                (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]

    keys = [("conv1.weight", (64, 3, 3, 3))]
    cin = 64
    for layer, width in zip((1, 2, 3, 4), (64, 128, 256, 512)):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            keys += bn(f"{p}.bn1", cin) + [(f"{p}.conv1.weight", (width, cin, 3, 3))]
            keys += bn(f"{p}.bn2", width) + [(f"{p}.conv2.weight", (width, width, 3, 3))]
            if cin != width:  # first block of layers 2-4: stride 2 and wider
                keys.append((f"{p}.shortcut.0.weight", (width, cin, 1, 1)))
            cin = width
    return keys + [("linear.weight", (num_classes, 512)), ("linear.bias", (num_classes,))]


def test_preactresnet18_key_parity():
    expected = expected_preactresnet18(10)
    assert len(expected) == 102
    state = build_model("preactresnet18", 10).state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    model = build_model("preactresnet18", 10)
    assert sum(p.numel() for p in model.parameters()) == 11_171_146
    assert [k for k in state if "shortcut" in k] == [f"layer{i}.0.shortcut.0.weight" for i in (2, 3, 4)]


def test_preactresnet18_forward_and_classes():
    model = build_model("preactresnet18", 43).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 43)  # adaptive pooling: any input size
        grey = build_model("preactresnet18", 10, in_channels=1)
        assert grey.state_dict()["conv1.weight"].shape == (64, 1, 3, 3)
        assert grey(torch.randn(1, 1, 12, 12)).shape == (1, 10)


BACKDOORBENCH_NAMES = ["preactresnet18", "resnet18", "resnet34", "resnet50", "alexnet", "vgg11", "vgg16", "vgg19",
                       "vgg19_bn", "squeezenet1_0", "densenet121", "densenet161", "inception_v3", "googlenet",
                       "shufflenet_v2_x1_0", "mobilenet_v2", "mobilenet_v3_large", "resnext50_32x4d",
                       "wide_resnet50_2", "mnasnet1_0", "efficientnet_b0", "efficientnet_b3", "convnext_tiny",
                       "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32"]


@pytest.mark.parametrize("name", BACKDOORBENCH_NAMES)
def test_zoo_structure(name):
    """Built on the meta device (no memory, no init cost); the head is sized for C and θs exists."""
    assert name in model_names()
    with torch.device("meta"):
        model = build_model(name, 7)
    modules = dict(model.named_modules())
    for preset in ("default", "paper"):
        layers = default_layers(name, preset)
        assert layers, f"{name} has no {preset} D3 layers"
        for layer in layers:
            assert layer in modules, f"{name}: {preset} layer {layer} missing"
            weights = [m.weight for m in modules[layer].modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            assert weights
        head = [m.weight for m in modules[layers[-1]].modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        assert head[-1].shape[0] == 7, f"{name}: the last {preset} layer is not the classifier head"
    if name.startswith("vit"):
        assert all(k.startswith("1.") for k in model.state_dict())
        assert isinstance(model[0], torch.nn.Module) and type(model[0]).__name__ == "Resize"


@pytest.mark.parametrize("name,head,expected_keys", [
    ("vgg19_bn", "classifier.6.weight", 118), ("vit_b_16", "1.heads.head.weight", 152),
    ("convnext_tiny", "classifier.2.weight", 182), ("mobilenet_v3_large", "classifier.3.weight", 312),
    ("densenet161", "classifier.weight", 967), ("efficientnet_b3", "classifier.1.weight", 574),
    ("resnet18", "fc.weight", 122)])
def test_zoo_heads_and_key_counts(name, head, expected_keys):
    with torch.device("meta"):
        state = build_model(name, 10).state_dict()
    assert len(state) == expected_keys
    assert state[head].shape[0] == 10


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_0"])
def test_small_zoo_forward(name):
    model = build_model(name, 10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_rgb_only_models_refuse_grey_input():
    with pytest.raises(ValueError, match="3-channel"):
        build_model("vgg19_bn", 10, in_channels=1)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_net", 10)


def test_small_cnn_default_layers_are_its_last_conv_block_and_head():
    from d3_plugin.d3 import select_weights
    model = build_model("small_cnn", 10, 1, 28)
    chosen = select_weights(model, default_layers("small_cnn"))
    assert list(chosen) == ["features.4.0.weight", "fc.weight", "linear.weight"]
    assert chosen["features.4.0.weight"].dim() == 4  # the conv of the third block, not a pooling layer


def test_preactresnet18_reaches_into_its_last_stages_by_default_and_the_paper_moves_only_the_head():
    assert list(default_layers("preactresnet18")) == ["layer3", "layer4", "linear"]
    assert list(default_layers("preactresnet18", "paper")) == ["linear"]
    assert default_layers("small_cnn", "paper") is None  # every nn.Linear, the paper's "linear layers"
    with pytest.raises(ValueError, match="unknown D3 preset 'fast'; use default or paper"):
        default_layers("preactresnet18", "fast")
