"""Auxiliary-data sources that stand in for a defense's in-distribution reserved (clean) set.

Purification is usually studied with a reserved set drawn from the training distribution; in practice the
defender may only have other data (Wei et al., "Revisiting the Auxiliary Data in Backdoor Purification",
arXiv 2502.07231). A source is named by a short spec string (`--reserved-source SPEC`):

    id                       the reserved set itself, unchanged                              (labeled)
    corrupt:KIND[:SEVERITY]  the reserved images corrupted, labels kept; SEVERITY 1..5, default 3 (labeled)
    digits[:N]               N digits 0-9 rendered from the DejaVu fonts, out of distribution; labeled by
                             the victim's predictions, as they have no label of the task     (unlabeled)
    inversion[:N]            N images synthesised from the victim alone (DeepInversion-style); labels are
                             the classes they were synthesised for                           (labeled)

N defaults to the size of the reserved set.

Corruption parameters per severity 1..5 (our table, in the spirit of ImageNet-C; pixels on a [0, 1] scale):

    noise       Gaussian noise, standard deviation        0.04  0.06  0.08  0.11  0.15
    blur        Gaussian blur, sigma in pixels            0.5   0.75  1.0   1.25  1.5
    brightness  added to every pixel                      0.1   0.2   0.3   0.4   0.5
    contrast    factor on the distance to the image mean  0.8   0.6   0.45  0.3   0.2
    jpeg        PIL JPEG quality                          75    50    30    20    10
    rotate      angle in degrees, random sign per image   5     10    15    22    30

Every result is rounded back to uint8 and clipped to [0, 255]. Only `noise` and `rotate` draw random
numbers; they come from a CPU generator seeded with `seed`, so the same seed gives the same output.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from .data import DatasetSpec, ImageSet
from .adversarial import evaluating
from .gic import BatchNormMatch, Normalizer, predicted_labels

SOURCES = ("id", "corrupt", "digits", "inversion")
CORRUPTIONS = ("noise", "blur", "brightness", "contrast", "jpeg", "rotate")
SEVERITY_TABLE: Dict[str, Tuple[float, ...]] = {
    "noise": (0.04, 0.06, 0.08, 0.11, 0.15),
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.8, 0.6, 0.45, 0.3, 0.2),
    "jpeg": (75, 50, 30, 20, 10),
    "rotate": (5, 10, 15, 22, 30),
}
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
VALID_FORMS = (f"valid forms: id, corrupt:KIND[:SEVERITY] (KIND one of {'|'.join(CORRUPTIONS)}, "
               f"SEVERITY 1-5), digits[:N], inversion[:N] (N a positive integer)")


# ---------------------------------------------------------------- source specs

@dataclass(frozen=True)
class SourceSpec:
    """A parsed `--reserved-source`; `str()` gives back a spec string that `parse_source` reads."""

    kind: str
    corruption: Optional[str] = None
    severity: int = 3
    count: Optional[int] = None  # N for digits/inversion (None: the size of the reserved set)

    def __post_init__(self):
        problem = _problem(self)
        if problem:
            raise ValueError(f"bad auxiliary source {self!r}: {problem}; {VALID_FORMS}")

    def __str__(self) -> str:
        if self.kind == "corrupt":
            return f"corrupt:{self.corruption}:{self.severity}"
        return self.kind if self.count is None else f"{self.kind}:{self.count}"

    @property
    def labeled(self) -> bool:
        return self.kind != "digits"


def _problem(spec: SourceSpec) -> Optional[str]:
    """What is wrong with a SourceSpec, or None."""
    if spec.kind not in SOURCES:
        return f"unknown kind {spec.kind!r}"
    if spec.kind == "corrupt" and spec.corruption not in CORRUPTIONS:
        return f"unknown corruption {spec.corruption!r}"
    if spec.kind != "corrupt" and spec.corruption is not None:
        return f"{spec.kind} takes no corruption"
    if type(spec.severity) is not int or not 1 <= spec.severity <= 5:
        return f"severity must be an integer 1-5, got {spec.severity!r}"
    if spec.kind != "corrupt" and spec.severity != 3:
        return f"{spec.kind} takes no severity"
    if spec.count is not None and (spec.kind in ("id", "corrupt")
                                   or type(spec.count) is not int or spec.count < 1):
        return f"N must be a positive integer for digits/inversion only, got {spec.count!r}"
    return None


def parse_source(text: str) -> SourceSpec:
    """'id' | 'corrupt:KIND[:SEVERITY]' | 'digits[:N]' | 'inversion[:N]' → SourceSpec (ValueError if bad)."""
    def fail(problem: str) -> ValueError:
        return ValueError(f"bad auxiliary source {text!r}: {problem}; {VALID_FORMS}")

    kind, *rest = str(text).strip().split(":")
    if kind not in SOURCES:
        raise fail(f"unknown kind {kind!r}")
    if kind == "corrupt":
        if not 1 <= len(rest) <= 2:
            raise fail("corrupt needs a KIND and at most a SEVERITY")
        if rest[0] not in CORRUPTIONS:
            raise fail(f"unknown corruption {rest[0]!r}")
        if len(rest) == 2 and not (re.fullmatch(r"[1-5]", rest[1])):
            raise fail(f"severity must be an integer 1-5, got {rest[1]!r}")
        return SourceSpec(kind, rest[0], int(rest[1]) if len(rest) == 2 else 3)
    if len(rest) > (0 if kind == "id" else 1):
        raise fail(f"too many parts after {kind!r}")
    if rest and not (re.fullmatch(r"[0-9]+", rest[0]) and int(rest[0]) > 0):
        raise fail(f"N must be a positive integer, got {rest[0]!r}")
    return SourceSpec(kind, count=int(rest[0]) if rest else None)


# ---------------------------------------------------------------- corruptions

def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int) -> torch.Tensor:
    """Corrupt a uint8 batch (N, C, H, W); the result is uint8 of the same shape, on the input's device."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    if type(severity) is not int or not 1 <= severity <= 5:
        raise ValueError(f"corruption severity must be an integer 1-5, got {severity!r}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"corrupt expects uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    level = SEVERITY_TABLE[kind][severity - 1]
    if kind == "jpeg":
        return _jpeg(images, int(level))
    generator = torch.Generator().manual_seed(seed)
    pixels = images.float() / 255
    out = _CORRUPT[kind](pixels, level, generator)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def _noise(pixels: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return pixels + sigma * torch.randn(pixels.shape, generator=generator).to(pixels.device)


def _blur(pixels: torch.Tensor, sigma: float, _generator) -> torch.Tensor:
    """Separable Gaussian blur, edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixels.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = pixels.shape[1]
    rows = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    padded = F.pad(pixels, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, rows, groups=channels)                        # along the width
    return F.conv2d(out, rows.transpose(2, 3), groups=channels)          # along the height


def _brightness(pixels: torch.Tensor, shift: float, _generator) -> torch.Tensor:
    return pixels + shift


def _contrast(pixels: torch.Tensor, factor: float, _generator) -> torch.Tensor:
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    return (pixels - mean) * factor + mean


def _rotate(pixels: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image about its centre by ±degrees (sign drawn per image), bilinear, zeros outside."""
    signs = torch.randint(0, 2, (len(pixels),), generator=generator).float() * 2 - 1
    angles = (signs * math.radians(degrees)).to(pixels.device)
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Real JPEG re-encoding in memory with PIL (RGB for 3 channels, else each channel as greyscale)."""
    arrays = images.cpu().numpy()
    out = torch.empty_like(images, device="cpu")
    for i, image in enumerate(arrays):
        planes = [image.transpose(1, 2, 0)] if image.shape[0] == 3 else list(image)
        decoded = [_jpeg_roundtrip(plane, quality) for plane in planes]
        out[i] = torch.from_numpy(decoded[0]).permute(2, 0, 1) if image.shape[0] == 3 \
            else torch.stack([torch.from_numpy(plane) for plane in decoded])
    return out.to(images.device)


def _jpeg_roundtrip(array: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.array(decoded)


_CORRUPT = {"noise": _noise, "blur": _blur, "brightness": _brightness, "contrast": _contrast,
            "rotate": _rotate}


# ---------------------------------------------------------------- rendered digits

def _font_files() -> List[Path]:
    fonts = sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name) if FONT_DIR.is_dir() else []
    if not fonts:
        raise ValueError(f"digits: no DejaVu TrueType font found in {FONT_DIR}/; "
                         f"install them with `apt-get install fonts-dejavu-core`")
    return fonts


def render_digits(count: int, spec: DatasetSpec, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`count` digit images, grey on black, at `spec`'s size and channels: (uint8 (N, C, H, W), digits 0-9).

    Each digit varies in font, size, offset, rotation (±15°), stroke width and brightness; it is drawn on a
    canvas four times larger and box-downscaled, so small images stay smooth. Digits cycle 0-9, shuffled.
    """
    if count < 0:
        raise ValueError(f"digits: count must be ≥ 0, got {count}")
    fonts, generator = _font_files(), torch.Generator().manual_seed(seed)
    digits = (torch.arange(count) % 10)[torch.randperm(count, generator=generator)]
    font_index = torch.randint(len(fonts), (count,), generator=generator)
    looks = torch.rand(count, 6, generator=generator)  # size, dx, dy, angle, stroke, brightness in [0, 1)
    loaded: Dict[Tuple[Path, int], ImageFont.FreeTypeFont] = {}
    images = torch.empty(count, spec.channels, spec.size, spec.size, dtype=torch.uint8)
    for i in range(count):
        images[i] = _draw_digit(int(digits[i]), fonts[int(font_index[i])], looks[i].tolist(), spec.size, loaded)
    return images, digits


def _draw_digit(digit: int, font_file: Path, looks: List[float], size: int, loaded: Dict) -> torch.Tensor:
    """One (size, size) uint8 digit, drawn 4× larger then box-downscaled; `looks`: six numbers in [0, 1)."""
    height, dx, dy, angle, stroke, grey = looks
    canvas = 4 * size
    key = (font_file, int(canvas * (0.55 + 0.3 * height)))
    if key not in loaded:
        loaded[key] = ImageFont.truetype(str(font_file), key[1])
    level = int(140 + 115 * grey)
    centre = (canvas * (0.5 + 0.24 * (dx - 0.5)), canvas * (0.5 + 0.24 * (dy - 0.5)))
    picture = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(picture).text(centre, str(digit), fill=level, font=loaded[key], anchor="mm",
                                 stroke_width=int(stroke * canvas / 24), stroke_fill=level)
    picture = picture.rotate(30 * (angle - 0.5), resample=Image.Resampling.BILINEAR)  # ±15°
    picture = picture.resize((size, size), resample=Image.Resampling.BOX)
    return torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(size, size)


# ---------------------------------------------------------------- model inversion

def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (rows and columns)."""
    return ((pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean()
            + (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean())


def invert(model: nn.Module, spec: DatasetSpec, count: int, seed: int, *, device="cpu", steps: int = 200,
           lr: float = 0.1, batch_size: int = 128, tv_weight: float = 0.05) -> ImageSet:
    """Synthesise `count` images from the victim alone (DeepInversion-style), labels = their target classes.

    Pixels are sigmoid(z), z starting as Gaussian noise; Adam moves z, batch by batch, to minimise
        BatchNormMatch loss (batch statistics vs the running statistics of every BN layer)
        + cross-entropy to the targets (classes 0..K-1 in turn, so every batch is class-balanced)
        + tv_weight · total variation.
    A model without BatchNorm layers still works: its BN term is 0 (cross-entropy and TV only).
    The model, already on `device`, is used in eval mode and left unchanged; `steps=0` returns the noise.
    """
    if type(steps) is not int or steps < 0:
        raise ValueError(f"inversion: steps must be an integer ≥ 0, got {steps!r}")
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(count) % spec.num_classes
    batches = [_invert_batch(model, spec, targets[s:s + batch_size], generator, device, steps, lr, tv_weight)
               for s in range(0, count, batch_size)]
    images = torch.cat(batches) if batches else torch.zeros(0, spec.channels, spec.size, spec.size, dtype=torch.uint8)
    return ImageSet(images, targets)


def _invert_batch(model, spec, targets, generator, device, steps, lr, tv_weight) -> torch.Tensor:
    shape = (len(targets), spec.channels, spec.size, spec.size)
    latent = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    targets, normalize = targets.to(device), Normalizer(spec, device)
    optimizer = torch.optim.Adam([latent], lr=lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # no gradients for the victim: only the pixels move
        p.requires_grad_(False)
    try:
        with evaluating(model), BatchNormMatch(model) as match:
            for _ in range(steps):
                pixels = torch.sigmoid(latent)
                logits = model(normalize(pixels)).float()
                loss = (match.loss().to(logits.device) + F.cross_entropy(logits, targets)
                        + tv_weight * total_variation(pixels))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return (torch.sigmoid(latent.detach()) * 255).round().to(torch.uint8).cpu()


# ---------------------------------------------------------------- the auxiliary set

def auxiliary_set(source: Union[SourceSpec, str], reserved: ImageSet, model: nn.Module, spec: DatasetSpec, *,
                  seed: int, device="cpu") -> Tuple[ImageSet, bool]:
    """The auxiliary set that replaces `reserved` (the in-distribution reserved draw), and whether its labels
    are labels of the task. `id`/`corrupt` transform `reserved`; `digits`/`inversion` make len(reserved)
    images unless the spec gives N. Images come back as CPU uint8 tensors."""
    source = parse_source(source) if isinstance(source, str) else source
    count = len(reserved) if source.count is None else source.count
    if source.kind == "id":
        return reserved, True
    if source.kind == "corrupt":
        images = corrupt(reserved.images.to(device), source.corruption, source.severity, seed).cpu()
        return ImageSet(images, reserved.labels.clone(), reserved.original_labels.clone(),
                        reserved.poisoned.clone(), reserved.source_index.clone()), True
    if source.kind == "digits":
        images, _digits = render_digits(count, spec, seed)
        return ImageSet(images, predicted_labels(model, images, spec, device)), False
    return invert(model, spec, count, seed, device=device), True
