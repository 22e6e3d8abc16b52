"""Training and validation transforms (spec §7, §8): numpy + PIL, no TensorFlow, no torch.

Outputs are HWC float32, ``(x / 255 - mean) / std`` computed in float32 like torchvision's
``ToTensor`` + ``Normalize``.
"""
from __future__ import annotations

import functools
import math
import random
from typing import Sequence

import numpy as np
from PIL import Image

from alphanet_jax.data.autoaugment import FILL_COLOR, auto_augment_v0
from alphanet_jax.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "AUGMENTS",
    "random_resized_crop_params",
    "random_resized_crop",
    "resize_shorter",
    "center_crop",
    "to_normalized_array",
    "train_transform",
    "val_transform",
]

# Spec §8: mean = (123.675, 116.28, 103.53) / 255, std = (58.395, 57.12, 57.375) / 255, in float32
# (torch.Tensor([...]) / 255.0 in the reference).
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32) / np.float32(255.0)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32) / np.float32(255.0)

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
AUGMENTS = ("autoaugment_v0", "flip", "none")

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _resample(interpolation) -> Image.Resampling:
    if isinstance(interpolation, str):
        try:
            return INTERPOLATIONS[interpolation.lower()]
        except KeyError:
            raise ConfigError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}"
            ) from None
    return Image.Resampling(interpolation)


# ----------------------------------------------------------------------------------------------
# RandomResizedCrop (torchvision.transforms.RandomResizedCrop.get_params, same algorithm).
# ----------------------------------------------------------------------------------------------
def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
    """Returns ``(top, left, h, w)`` of the crop, drawing from ``rng``.

    Per try: ``rng.uniform(*scale)`` (area fraction), then ``rng.uniform(log r0, log r1)``
    (log aspect); if the crop fits: ``rng.integers(0, height - h + 1)`` (top), then
    ``rng.integers(0, width - w + 1)`` (left).  After 10 failed tries: the centre crop of the
    whole image narrowed to the nearest aspect ratio in ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect_ratio = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    # Fallback to central crop.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    interpolation="bicubic",
) -> Image.Image:
    """``img.crop(box).resize((size, size), filter)`` with the box from the parameters above
    (torchvision ``F.resized_crop``).

    Note: PIL's ``resize(..., box=...)`` is *not* equivalent: its filter reads pixels outside
    the box near the edges, whereas the reference crops first (edges clamped to the crop).
    """
    i, j, h, w = random_resized_crop_params(img.size[0], img.size[1], rng, scale, ratio)
    return img.crop((j, i, j + w, i + h)).resize((size, size), _resample(interpolation))


# ----------------------------------------------------------------------------------------------
# Validation: Resize(shorter side) + CenterCrop, torchvision semantics.
# ----------------------------------------------------------------------------------------------
def resize_shorter(img: Image.Image, size: int, interpolation="bicubic") -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: shorter side -> size, longer side
    ``int(size * long / short)`` (truncated); unchanged if already that size."""
    w, h = img.size
    if w <= h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    if (ow, oh) == (w, h):
        return img
    return img.resize((ow, oh), _resample(interpolation))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)``: offsets ``int(round((H - size) / 2))``; an image smaller
    than ``size`` is first zero-padded by ``(size - w) // 2`` left / ``(size - w + 1) // 2`` right
    (same for top/bottom), exactly as torchvision does."""
    w, h = img.size
    if size > w or size > h:
        pad_l = (size - w) // 2 if size > w else 0
        pad_t = (size - h) // 2 if size > h else 0
        pad_r = (size - w + 1) // 2 if size > w else 0
        pad_b = (size - h + 1) // 2 if size > h else 0
        padded = Image.new(img.mode, (w + pad_l + pad_r, h + pad_t + pad_b), 0)
        padded.paste(img, (pad_l, pad_t))
        img = padded
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------
# ToTensor + Normalize, HWC.
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _tiled_mean_std(width: int, mean_key: tuple, std_key: tuple) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(mean_key, np.float32)
    std = np.asarray(std_key, np.float32)
    return np.tile(mean, width), np.tile(std, width)


def to_normalized_array(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 RGB PIL image -> float32 HWC array ``(x / 255 - mean) / std``.

    Same float32 operations per element as ``ToTensor`` + ``Normalize``; the mean/std are tiled
    along a row (H, W*3) so that numpy's inner loops are long (4x faster than broadcasting
    over a trailing axis of length 3)."""
    x = np.asarray(img, dtype=np.uint8)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    h, w, c = x.shape
    m, s = _tiled_mean_std(w, tuple(np.asarray(mean, np.float32).tolist()), tuple(np.asarray(std, np.float32).tolist()))
    out = x.reshape(h, w * c).astype(np.float32)
    out /= np.float32(255.0)
    out -= m
    out /= s
    return out.reshape(h, w, c)


def train_transform(
    img: Image.Image,
    *,
    image_size: int,
    np_rng: np.random.Generator,
    py_rng: random.Random,
    augment: str = "autoaugment_v0",
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    interpolation="bicubic",
    fillcolor: Sequence[int] = FILL_COLOR,
) -> np.ndarray:
    """Spec §8: RandomResizedCrop -> flip (p=0.5) -> AutoAugment v0 -> ToTensor -> Normalize.

    ``augment``: 'autoaugment_v0' (all of it), 'flip' (crop + flip), 'none' (crop only).
    Crop and flip draw from ``np_rng`` (one ``rng.random() < 0.5`` for the flip); AutoAugment
    draws from ``py_rng`` (the reference uses torch's RNG for the former, ``random`` for the
    latter).
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    img = random_resized_crop(img, image_size, np_rng, scale, ratio, interpolation)
    if augment in ("flip", "autoaugment_v0"):
        if float(np_rng.random()) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if augment == "autoaugment_v0":
        img = auto_augment_v0(img, py_rng, fillcolor=fillcolor)
    return to_normalized_array(img)


def val_transform(
    img: Image.Image, *, image_size: int, resize_size: int, interpolation="bicubic"
) -> np.ndarray:
    """Spec §7: Resize(resize_size) -> CenterCrop(image_size) -> ToTensor -> Normalize."""
    img = resize_shorter(img, resize_size, interpolation)
    img = center_crop(img, image_size)
    return to_normalized_array(img)
