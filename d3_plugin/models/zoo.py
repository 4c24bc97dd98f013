"""BackdoorBench's model-zoo names, built from torchvision without any download.

Each constructor reproduces what BackdoorBench's `generate_cls_model` builds for that name, so the
state_dict keys and shapes are identical and its checkpoints load strictly: torchvision models are built
with `num_classes=C` (their head is sized for C classes); ViTs get their `heads.head` replaced by
Linear(hidden, C) and are wrapped as `Sequential(Resize((224, 224)), vit)`, so their keys start with `1.`.
The default layers are the classifier module D3 moves by default (θs); only PreAct-ResNet18, measured
on BackdoorBench records, reaches further by default (docs/d3-stability.md).
"""
from __future__ import annotations

from functools import partial

import torchvision
from torch import nn
from torchvision.transforms import Resize

from . import register_model
from .preact_resnet import PreActResNet18


@register_model("preactresnet18", head="linear")
def preactresnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return PreActResNet18(num_classes, in_channels)


def _rgb_only(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"model {name!r} takes 3-channel images, as in BackdoorBench, but the data has "
                         f"{in_channels} channel(s); use preactresnet18 or small_cnn, or convert the images to RGB")


# BackdoorBench name -> (torchvision constructor, extra keyword arguments, classifier module)
_TORCHVISION = {
    "resnet18": ("resnet18", {}, "fc"),
    "resnet34": ("resnet34", {}, "fc"),
    "resnet50": ("resnet50", {}, "fc"),
    "resnext50_32x4d": ("resnext50_32x4d", {}, "fc"),
    "wide_resnet50_2": ("wide_resnet50_2", {}, "fc"),
    "alexnet": ("alexnet", {}, "classifier.6"),
    "vgg11": ("vgg11", {}, "classifier.6"),
    "vgg16": ("vgg16", {}, "classifier.6"),
    "vgg19": ("vgg19", {}, "classifier.6"),
    "vgg19_bn": ("vgg19_bn", {}, "classifier.6"),
    "squeezenet1_0": ("squeezenet1_0", {}, "classifier.1"),
    "densenet121": ("densenet121", {}, "classifier"),
    "densenet161": ("densenet161", {}, "classifier"),
    "inception_v3": ("inception_v3", {"aux_logits": True, "init_weights": True}, "fc"),
    "googlenet": ("googlenet", {"aux_logits": True, "init_weights": True}, "fc"),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", {}, "fc"),
    "mobilenet_v2": ("mobilenet_v2", {}, "classifier.1"),
    "mobilenet_v3_large": ("mobilenet_v3_large", {}, "classifier.3"),
    "mnasnet1_0": ("mnasnet1_0", {}, "classifier.1"),
    "efficientnet_b0": ("efficientnet_b0", {}, "classifier.1"),
    "efficientnet_b3": ("efficientnet_b3", {}, "classifier.1"),
    "convnext_tiny": ("convnext_tiny", {}, "classifier.2"),
}
VIT_NAMES = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")


def _torchvision_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    _rgb_only(name, in_channels)
    builder, extra, _ = _TORCHVISION[name]
    return getattr(torchvision.models, builder)(weights=None, num_classes=num_classes, **extra)


def _vit(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    _rgb_only(name, in_channels)
    vit = getattr(torchvision.models, name)(weights=None)
    vit.heads.head = nn.Linear(vit.heads.head.in_features, num_classes)
    return nn.Sequential(Resize((224, 224), antialias=True), vit)


for _name, (_, _, _head) in _TORCHVISION.items():
    register_model(_name, head=_head)(partial(_torchvision_model, _name))
for _name in VIT_NAMES:
    register_model(_name, head="1.heads.head")(partial(_vit, _name))
