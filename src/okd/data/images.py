"""One image file in, uint8 tensors out: decoding and the per-image augmentations of the streaming path.

Decoding uses ``torchvision.io`` (libjpeg-turbo, PNG, WebP, GIF), with PIL as the
fallback for the formats it does not read (BMP, TIFF, ...); both give the same
pixels for a JPEG here (checked in the tests). Every augmentation takes an explicit
``torch.Generator``: the streaming path seeds one per (seed, epoch, image), so what a
view looks like never depends on which worker or rank made it, nor on resuming.

Training recipes (``data.augment``):

* ``crop_flip``: resize to ``size`` x ``size`` if needed, RandomCrop(size, padding=pad)
  with zero padding, horizontal flip with p=0.5 (the CIFAR recipe).
* ``resized_crop``: RandomResizedCrop(size, scale, ratio=(3/4, 4/3)) with antialiased
  bilinear resizing, horizontal flip with p=0.5 (the ImageNet recipe); evaluation
  resizes the shorter side to size/0.875 (256 for 224) and takes the centre crop.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

# torchvision 0.29 warns at every decode that its decoders will move to TorchCodec; they work, and PIL remains
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision without them: every image goes through PIL
    decode_image = None

AUGMENTS = ("crop_flip", "resized_crop")
EVAL_CROP_FRACTION = 0.875  # 224 of 256: the standard ImageNet evaluation crop
TORCHVISION_FORMATS = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"RIFF")  # JPEG, PNG, GIF, WebP


class UnreadableImage(Exception):
    """An image file that neither decoder reads; carries its path and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image '{path}' ({reason}); replace or remove it")
        self.path, self.reason = path, reason

    def __reduce__(self):  # crosses from a DataLoader worker to the main process
        return UnreadableImage, (self.path, self.reason)


def read_image(path: str) -> torch.Tensor:
    """uint8 3 x H x W RGB."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise UnreadableImage(path, exc.strerror or type(exc).__name__) from None
    if decode_image is not None and data[:4].startswith(TORCHVISION_FORMATS):
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception:  # e.g. an unusual JPEG flavour: PIL may still read it
            pass
    return _read_with_pil(path, data)


def _read_with_pil(path: str, data: bytes) -> torch.Tensor:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:
        reason = "empty file" if not data else type(exc).__name__
        raise UnreadableImage(path, reason) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.shape[-2:] == (size, size):
        return image
    return TF.resize(image, [size, size], antialias=True)


def pad_crop_flip(image: torch.Tensor, size: int, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding=pad) of the image resized to size x size, then a flip with p=0.5."""
    image = resize_square(image, size)
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    mirror = bool(torch.randint(0, 2, (1,), generator=gen)) if flip else False
    if pad:
        image = F.pad(image, (pad, pad, pad, pad))[:, top:top + size, left:left + size]
    return image.flip(-1) if mirror else image


def resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                     gen: torch.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of RandomResizedCrop: torchvision's algorithm, drawn from ``gen``.

    Up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect
    ratio; if none fits, the centre crop with the aspect ratio clamped to ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio, u_top, u_left = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_flip(image: torch.Tensor, size: int, scale: Sequence[float], flip: bool,
                      gen: torch.Generator, ratio: Sequence[float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    top, left, h, w = resized_crop_box(image.shape[-2], image.shape[-1], scale, ratio, gen)
    mirror = bool(torch.randint(0, 2, (1,), generator=gen)) if flip else False
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    return out.flip(-1) if mirror else out


def eval_view(image: torch.Tensor, augment: str, size: int) -> torch.Tensor:
    """The deterministic test view: resize + centre crop (resized_crop), else the image at size x size."""
    if augment == "resized_crop":
        image = TF.resize(image, [int(round(size / EVAL_CROP_FRACTION))], antialias=True)  # shorter side
        return TF.center_crop(image, [size, size])
    return resize_square(image, size)
