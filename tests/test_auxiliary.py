"""Auxiliary-data sources: spec strings, corruptions, rendered digits, model inversion, and the sets that
replace the reserved data. Tiny models and few images, one torch thread."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from d3_plugin import auxiliary
from d3_plugin.auxiliary import (CORRUPTIONS, SourceSpec, auxiliary_set, corrupt, invert, parse_source,
                                 render_digits)
from d3_plugin.data import DatasetSpec, ImageSet
from d3_plugin.gic import bn_distance, predicted_labels
from d3_plugin.models import build_model
from d3_plugin.training import seed_everything

from conftest import TEST_SEED, observed

GREY = DatasetSpec("grey", 10, 1, 16, (0.5,), (0.5,), crop_padding=0)
RGB = DatasetSpec("rgb", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=0)

pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]


def textured(count: int, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 images with detail at every scale, kept off 0 and 255 so that no change is clipped away."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, channels, size // 4, size // 4, generator=generator)
    fine = torch.rand(count, channels, size, size, generator=generator)
    mixed = 0.6 * torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") + 0.4 * fine
    return (40 + 175 * mixed).round().to(torch.uint8)


def mean_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def tiny_bn_model(seed: int = TEST_SEED) -> nn.Module:
    """The package's small CNN with BatchNorm, its running statistics taken from dim, low-contrast images
    (so that Gaussian noise is clearly out of distribution)."""
    seed_everything(seed)
    model = build_model("small_cnn", GREY.num_classes, GREY.channels, GREY.size)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = None  # cumulative average over the warm-up batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model((torch.rand(64, 1, GREY.size, GREY.size) * 0.3 - 0.5) / 0.5)
    return model.eval()


@pytest.fixture
def reserved() -> ImageSet:
    seed_everything(TEST_SEED)
    return ImageSet(textured(20, GREY.channels, GREY.size), torch.arange(20) % GREY.num_classes)


# ---------------------------------------------------------------- spec strings

@pytest.mark.parametrize("text,expected,canonical", [
    ("id", SourceSpec("id"), "id"),
    ("corrupt:noise", SourceSpec("corrupt", "noise", 3), "corrupt:noise:3"),
    ("corrupt:jpeg:5", SourceSpec("corrupt", "jpeg", 5), "corrupt:jpeg:5"),
    ("corrupt:rotate:1", SourceSpec("corrupt", "rotate", 1), "corrupt:rotate:1"),
    ("digits", SourceSpec("digits"), "digits"),
    ("digits:250", SourceSpec("digits", count=250), "digits:250"),
    ("inversion", SourceSpec("inversion"), "inversion"),
    ("inversion:64", SourceSpec("inversion", count=64), "inversion:64"),
])
def test_source_specs_parse_and_round_trip(text, expected, canonical):
    spec = parse_source(text)
    assert spec == expected
    assert str(spec) == canonical
    assert parse_source(str(spec)) == spec


@pytest.mark.parametrize("text,problem", [
    ("", "unknown kind"), ("fog", "unknown kind"), ("ID", "unknown kind"),
    ("corrupt", "KIND"), ("corrupt:fog", "unknown corruption"), ("corrupt:noise:0", "severity"),
    ("corrupt:noise:6", "severity"), ("corrupt:noise:x", "severity"), ("corrupt:noise:3:1", "at most"),
    ("id:5", "too many"), ("digits:0", "positive"), ("digits:-3", "positive"), ("digits:1.5", "positive"),
    ("inversion:abc", "positive"), ("inversion:8:2", "too many"), ("digits:", "positive"),
])
def test_bad_source_specs_are_rejected_with_one_line(text, problem):
    with pytest.raises(ValueError) as caught:
        parse_source(text)
    message = str(caught.value)
    assert "\n" not in message
    assert problem in message and repr(text) in message
    assert "valid forms" in message and "corrupt:KIND[:SEVERITY]" in message


@pytest.mark.parametrize("fields", [dict(kind="corrupt"), dict(kind="id", count=5), dict(kind="digits", count=0),
                                    dict(kind="corrupt", corruption="noise", severity=7),
                                    dict(kind="digits", corruption="blur")])
def test_inconsistent_source_specs_cannot_be_built(fields):
    with pytest.raises(ValueError, match="valid forms"):
        SourceSpec(**fields)


def test_only_digits_are_unlabeled():
    assert [parse_source(t).labeled for t in ("id", "corrupt:blur", "digits", "inversion")] == [True, True, False, True]


# ---------------------------------------------------------------- corruptions

@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_corruption_changes_images_keeps_shape_and_repeats(kind, channels):
    images = textured(6, channels)
    first = corrupt(images, kind, 3, seed=1)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert mean_change(first, images) > 1.0, f"{kind} barely changed the images"
    assert torch.equal(first, corrupt(images, kind, 3, seed=1))
    assert torch.equal(images, textured(6, channels)), "the input must not be modified"


@pytest.mark.parametrize("kind", ["noise", "rotate"])
def test_random_corruptions_depend_on_the_seed(kind):
    images = textured(16)
    assert not torch.equal(corrupt(images, kind, 3, seed=0), corrupt(images, kind, 3, seed=1))


@pytest.mark.parametrize("kind", ["noise", "blur", "contrast", "brightness"])
def test_higher_severity_changes_images_more(kind):
    images = textured(8)
    changes = [mean_change(corrupt(images, kind, s, seed=0), images) for s in range(1, 6)]
    assert all(a < b for a, b in zip(changes, changes[1:])), f"{kind}: {changes}"


def test_jpeg_is_a_real_lossy_reencoding():
    images = textured(8)
    mild, harsh = corrupt(images, "jpeg", 1, seed=0), corrupt(images, "jpeg", 5, seed=0)
    assert 0 < mean_change(mild, images) < mean_change(harsh, images)
    # JPEG works on 8×8 blocks: at quality 10 most of each block's detail is gone, so pixels inside a block
    # are far closer to their block mean than in the original
    def spread(x):
        blocks = x.float().unfold(2, 8, 8).unfold(3, 8, 8)
        return float(blocks.std(dim=(-1, -2)).mean())
    assert spread(harsh) < 0.6 * spread(images)


def test_rotation_draws_a_sign_per_image_and_keeps_the_centre():
    one = textured(1, 1, 17)
    rotated = corrupt(one.repeat(16, 1, 1, 1), "rotate", 5, seed=0)
    assert len({tuple(r.flatten().tolist()) for r in rotated}) == 2, "expected exactly the +θ and −θ versions"
    assert (rotated[:, :, 8, 8].long() - one[0, 0, 8, 8].long()).abs().max() <= 1
    assert (rotated[:, :, 0, 0] == 0).all(), "corners come from outside the image: black"


def test_corruption_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(textured(1), "fog", 3, seed=0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(textured(1), "noise", 0, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(textured(1).float(), "noise", 3, seed=0)


# ---------------------------------------------------------------- rendered digits

@pytest.mark.parametrize("spec", [DatasetSpec("mnist-like", 10, 1, 28, (0.5,), (0.5,)), RGB])
def test_rendered_digits_cover_all_classes_and_are_distinct(spec):
    images, digits = render_digits(30, spec, seed=0)
    assert images.shape == (30, spec.channels, spec.size, spec.size) and images.dtype == torch.uint8
    assert digits.dtype == torch.long and sorted(digits.unique().tolist()) == list(range(10))
    assert len({tuple(x.flatten().tolist()) for x in images}) == 30
    assert (images == images[:, :1]).all(), "grey: every channel the same"
    corners = torch.cat([images[..., :2, :2].flatten(), images[..., -2:, -2:].flatten()])
    assert (corners == 0).float().mean() > 0.9, "black background"
    assert (images.flatten(1).amax(1) > 120).all(), "every image shows a bright digit"
    again, same_digits = render_digits(30, spec, seed=0)
    assert torch.equal(images, again) and torch.equal(digits, same_digits)
    assert not torch.equal(images, render_digits(30, spec, seed=1)[0])


def test_missing_fonts_give_a_one_line_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(auxiliary, "FONT_DIR", tmp_path / "no-fonts")
    with pytest.raises(ValueError) as caught:
        render_digits(3, GREY, seed=0)
    message = str(caught.value)
    assert "\n" not in message and "no-fonts" in message and "apt-get install fonts-dejavu-core" in message


# ---------------------------------------------------------------- model inversion

def test_inversion_moves_noise_towards_the_batchnorm_statistics():
    model = tiny_bn_model()
    noise = invert(model, GREY, 20, seed=0, steps=0)
    inverted = invert(model, GREY, 20, seed=0, steps=15)
    before, after = bn_distance(model, noise.images, GREY, "cpu"), bn_distance(model, inverted.images, GREY, "cpu")
    # measured 0.32–0.42
    assert observed("inversion: BN distance after / before", after / before) < 0.7, (before, after)
    assert torch.bincount(inverted.labels, minlength=10).tolist() == [2] * 10
    assert inverted.images.shape == (20, 1, 16, 16) and inverted.images.dtype == torch.uint8
    assert torch.equal(inverted.images, invert(model, GREY, 20, seed=0, steps=15).images)


def test_inversion_leaves_the_victim_as_it_was():
    model = tiny_bn_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    invert(model, GREY, 10, seed=0, steps=3, batch_size=4)
    assert model.training, "the mode must be restored"
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "weights or BN statistics changed"


def test_inversion_without_batchnorm_follows_the_classifier():
    """No BN layer: the BN term is 0 and cross-entropy alone pulls the images towards their classes (a random
    tiny classifier cannot reach every class from [0, 1] images, hence a gain rather than agreement 1)."""
    seed_everything(TEST_SEED)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 10))

    def agreement(data: ImageSet) -> float:
        return float((predicted_labels(model, data.images, GREY, "cpu") == data.labels).float().mean())

    noise, inverted = invert(model, GREY, 20, seed=0, steps=0), invert(model, GREY, 20, seed=0, steps=30)
    gained = agreement(inverted) - agreement(noise)
    observed("inversion without BN: noise agreement", agreement(noise))
    observed("inversion without BN: inverted agreement", agreement(inverted))
    assert observed("inversion without BN: agreement gained", gained) >= 0.2, gained  # measured 0.30–0.60


# ---------------------------------------------------------------- the auxiliary set

@pytest.mark.parametrize("text,size,labeled", [("id", 20, True), ("corrupt:rotate:2", 20, True),
                                               ("corrupt:noise", 20, True), ("digits", 20, False),
                                               ("digits:7", 7, False), ("inversion:6", 6, True)])
def test_auxiliary_sets_have_the_right_size_and_label_status(reserved, text, size, labeled):
    model = tiny_bn_model()
    data, is_labeled = auxiliary_set(text, reserved, model, GREY, seed=0)
    assert len(data) == size and is_labeled == labeled
    assert data.images.shape[1:] == (1, 16, 16) and data.images.dtype == torch.uint8
    assert data.images.device.type == "cpu"
    if text.startswith(("id", "corrupt")):
        assert torch.equal(data.labels, reserved.labels)
        assert torch.equal(data.images, reserved.images) == (text == "id")
    if text.startswith("digits"):
        assert torch.equal(data.labels, predicted_labels(model, data.images, GREY, "cpu"))
    again, _ = auxiliary_set(parse_source(text), reserved, model, GREY, seed=0)
    assert torch.equal(data.images, again.images) and torch.equal(data.labels, again.labels)


def test_inversion_source_defaults_to_the_reserved_size(reserved):
    data, labeled = auxiliary_set("inversion", reserved.subset(torch.arange(5)), tiny_bn_model(), GREY, seed=0)
    assert len(data) == 5 and labeled and data.labels.tolist() == [0, 1, 2, 3, 4]
