"""Per-view augmentation recipes (``data.views``): each member of a method may see its own distortion.

A recipe is ``crop`` followed by operations joined with ``+``, applied in that order to the uint8 view:

  ``flip``         horizontal flip with p = 0.5 (fused with the crop, as the default ``crop+flip``)
  ``rotate``       RandomRotation(15): an angle uniform in [-15, 15] degrees, nearest, zero fill
  ``cutout``       Cutout(n_holes=1, length=16): a 16 x 16 square around a uniform centre set to zero, clipped
                   at the border (zero pixels before normalisation, as the code's mask after ToTensor)
  ``randaugment``  RandAugment (2 layers, magnitude 9 of 31 bins, nearest, zero fill): per layer one of
                   torchvision's 14 operations, drawn per image, its sign drawn per image where it has one

OKDPH's CIFAR-100 code gives student 1 ``crop+flip+rotate``, student 2 ``crop+flip+cutout`` and the hybrid-weight
model ``crop+randaugment`` (tianlizhang/OKDPH ``src/OKDPH.py`` ``transes``, ``src/data/data_loader.py``).

Every parameter is drawn per image (per position of the epoch) from the epoch's CPU generator, after the order,
crops and flips, so ``crop+flip`` views are what they were and a resumed run redraws exactly what it would have
had. On the resident path a batch is augmented on the device in a few batched calls: rotation is one
``grid_sample`` with one angle per image, Cutout one mask, and RandAugment one call of torchvision's own
functional kernel per (layer, operation, sign) group of images, so no Python runs per image. The streaming path
applies the same functions to each image in its worker, with the image's own generator.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF

from ..errors import ConfigError

OPS = ("flip", "rotate", "cutout", "randaugment")
DEFAULT = "crop+flip"
ROTATE_DEGREES = 15.0
CUTOUT_LENGTH = 16
RA_LAYERS, RA_MAGNITUDE, RA_BINS = 2, 9, 31
# RandAugment's operations in torchvision's order, each with (its magnitude at bin 9 of 31 for an H x W image,
# whether it is signed); the bins are torchvision's linspace(0, max, 31) (Posterize: 8 - round(bin / 7.5) bits,
# Solarize: a threshold of 255 x linspace(1, 0, 31))
RA_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
          "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
IS_SIGNED = torch.tensor([op in SIGNED for op in RA_OPS])  # by index into RA_OPS


@functools.lru_cache(maxsize=None)  # asked once per (operation, sign) group of every batch
def ra_magnitude(op: str, height: int, width: int) -> float:
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width, "TranslateY": 150.0 / 331.0 * height,
           "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    if op in top:
        return float(torch.linspace(0.0, top[op], RA_BINS)[RA_MAGNITUDE])
    if op == "Posterize":
        return float(int((8 - (torch.arange(RA_BINS) / ((RA_BINS - 1) / 4))).round().int()[RA_MAGNITUDE]))
    if op == "Solarize":
        return 255.0 * float(torch.linspace(1.0, 0.0, RA_BINS)[RA_MAGNITUDE])
    return 0.0


def parse(recipe: str) -> Tuple[str, ...]:
    """The operations after ``crop`` of a recipe string, checked; a one-line ConfigError otherwise."""
    parts = tuple(p.strip() for p in str(recipe).split("+"))
    ops = parts[1:]
    unknown = [p for p in ops if p not in OPS]
    if parts[0] != "crop" or unknown or len(set(ops)) != len(ops) or ("flip" in ops and ops.index("flip") != 0):
        raise ConfigError(f"config key 'data.views' has recipe '{recipe}': a recipe is 'crop' then any of "
                          f"{', '.join(OPS)} joined by '+', each once, flip first (e.g. crop+flip+cutout)")
    return ops


def check_views(views: Optional[Sequence[str]], num_views: int, method: str) -> List[Tuple[str, ...]]:
    """One parsed recipe per view of the method (None: ``crop+flip`` for all)."""
    if views is None:
        return [parse(DEFAULT)] * num_views
    if len(views) != num_views:
        raise ConfigError(f"config key 'data.views' lists {len(views)} recipes but method {method} trains on "
                          f"{num_views} view(s); give one per view")
    return [parse(v) for v in views]


@dataclass
class ViewParams:
    """One view's random parameters for n images (positions): what ``apply`` needs beyond the crop and flip."""
    angles: Optional[torch.Tensor] = None  # (n,) degrees
    centres: Optional[torch.Tensor] = None  # (n, 2) cutout centre (row, column)
    ra_ops: Optional[torch.Tensor] = None  # (RA_LAYERS, n) indices into RA_OPS
    ra_negative: Optional[torch.Tensor] = None  # (RA_LAYERS, n) bool: the signed magnitude negated

    def select(self, index) -> "ViewParams":
        """The parameters of some of the n images (``index`` into the positions)."""
        return ViewParams(None if self.angles is None else self.angles[index],
                          None if self.centres is None else self.centres[index],
                          None if self.ra_ops is None else self.ra_ops[:, index],
                          None if self.ra_negative is None else self.ra_negative[:, index])


def draw(ops: Sequence[str], n: int, size: Tuple[int, int], generator: torch.Generator) -> ViewParams:
    """The view's parameters for n images, drawn from ``generator`` in a fixed order."""
    params = ViewParams()
    for op in ops:
        if op == "rotate":
            params.angles = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * ROTATE_DEGREES
        elif op == "cutout":
            params.centres = torch.stack([torch.randint(0, size[0], (n,), generator=generator),
                                          torch.randint(0, size[1], (n,), generator=generator)], dim=1)
        elif op == "randaugment":
            params.ra_ops = torch.randint(0, len(RA_OPS), (RA_LAYERS, n), generator=generator)
            params.ra_negative = torch.rand(RA_LAYERS, n, generator=generator) <= 0.5
    return params


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each uint8 image rotated counter-clockwise by its own angle about its centre (nearest, zero fill), in one
    ``grid_sample``: torchvision's ``rotate`` (expand=False) with one angle per image."""
    n, _, h, w = images.shape
    dev = images.device
    a = torch.deg2rad(degrees.to(dev, torch.float64))
    cos, sin = torch.cos(a), torch.sin(a)
    # output pixel centres in pixels about the image centre; their source in the input is R(angle)^-1 (x, y)
    # with y pointing down, which for a counter-clockwise turn on screen is [[cos, -sin], [sin, cos]]
    ys = torch.arange(h, device=dev, dtype=torch.float64) + 0.5 - h / 2
    xs = torch.arange(w, device=dev, dtype=torch.float64) + 0.5 - w / 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    src_x = cos[:, None, None] * x - sin[:, None, None] * y
    src_y = sin[:, None, None] * x + cos[:, None, None] * y
    grid = torch.stack([src_x / (w / 2), src_y / (h / 2)], dim=-1).to(torch.float32)
    out = TF.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(torch.uint8)


def cutout(images: torch.Tensor, centres: torch.Tensor, length: int = CUTOUT_LENGTH) -> torch.Tensor:
    """Zero the square [r - length//2, r + length//2) x [c - length//2, c + length//2) of each image, clipped."""
    _, _, h, w = images.shape
    dev = images.device
    r, c = centres[:, 0:1].to(dev), centres[:, 1:2].to(dev)
    rows = (torch.arange(h, device=dev) >= r - length // 2) & (torch.arange(h, device=dev) < r + length // 2)
    cols = (torch.arange(w, device=dev) >= c - length // 2) & (torch.arange(w, device=dev) < c + length // 2)
    hole = rows[:, :, None] & cols[:, None, :]  # (n, H, W)
    return images.masked_fill(hole[:, None], 0)


def ra_apply(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One RandAugment operation at one magnitude on a batch, through torchvision's functional kernels."""
    import torchvision.transforms.v2.functional as F

    nearest = F.InterpolationMode.NEAREST
    if op == "Identity":
        return images
    if op in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(magnitude)), 0.0] if op == "ShearX" else [0.0, math.degrees(math.atan(magnitude))]
        return F.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
                        fill=None, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return F.affine(images, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                        fill=None)
    if op == "Rotate":
        return F.rotate(images, angle=magnitude, interpolation=nearest, fill=None)
    if op == "Brightness":
        return F.adjust_brightness(images, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return F.adjust_saturation(images, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return F.adjust_contrast(images, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return F.adjust_sharpness(images, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return F.posterize(images, bits=int(magnitude))
    if op == "Solarize":
        return F.solarize(images, threshold=magnitude)
    if op == "AutoContrast":
        return F.autocontrast(images)
    return F.equalize(images)  # "Equalize"


def randaugment(images: torch.Tensor, ops: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """RandAugment with each image's own operations and signs: per layer, one call per (operation, sign)
    group of images."""
    _, _, h, w = images.shape
    out = images
    for layer in range(ops.shape[0]):
        # the groups are found on the CPU, where the draws are: no host sync on the device
        layer_ops = ops[layer].cpu()
        key = layer_ops * 2 + (negative[layer].cpu() & IS_SIGNED[layer_ops]).long()
        result = out.clone()
        for value in torch.unique(key).tolist():  # at most 22 groups of images, not one call per image
            op = RA_OPS[value // 2]
            if op == "Identity":
                continue
            index = (key == value).nonzero().squeeze(1).to(images.device)
            magnitude = ra_magnitude(op, h, w)
            if value % 2:
                magnitude = -magnitude
            result[index] = ra_apply(out[index], op, magnitude)
        out = result
    return out


def apply(images: torch.Tensor, ops: Sequence[str], params: ViewParams) -> torch.Tensor:
    """The operations after the crop and flip, in the recipe's order, on a uint8 batch."""
    for op in ops:
        if op == "rotate":
            images = rotate(images, params.angles)
        elif op == "cutout":
            images = cutout(images, params.centres)
        elif op == "randaugment":
            images = randaugment(images, params.ra_ops, params.ra_negative)
    return images


def needs_more(ops: Sequence[str]) -> bool:
    """Whether a recipe has operations beyond the crop and flip."""
    return any(op != "flip" for op in ops)


__all__ = ["DEFAULT", "OPS", "RA_OPS", "ViewParams", "apply", "check_views", "cutout", "draw", "needs_more",
           "parse", "ra_apply", "ra_magnitude", "randaugment", "rotate"]
