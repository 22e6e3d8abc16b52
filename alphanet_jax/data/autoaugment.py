"""AutoAugment policy v0 (spec §8), as in AttentiveNAS ``data/auto_augment_tf.py`` (itself timm's).

Every random draw comes from an explicit :class:`random.Random` passed in by the caller, in the
same order as the reference, which uses the global ``random`` module:

1. ``rng.choice(policy)`` picks one of the 25 sub-policies;
2. for each of its two ops: ``rng.random()`` (always drawn, even for probability 0); the op runs
   if ``prob >= draw``; if it runs: ``rng.gauss(M, 0.5)`` clipped to [0, 10]; for ops with a
   signed argument (rotate, shear, translate) ``rng.random() > 0.5`` negates it; affine ops then
   draw their resampling filter with ``rng.choice((NEAREST, BILINEAR, BICUBIC))``.

So given the same ``random.Random`` state, :func:`auto_augment_v0` makes exactly the reference's
decisions.  Only PIL is used (no TensorFlow, no torch).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "FILL_COLOR",
    "MAX_LEVEL",
    "MAGNITUDE_STD",
    "POLICY_V0",
    "RANDOM_INTERPOLATION",
    "NAME_TO_OP",
    "LEVEL_TO_ARG",
    "apply_op",
    "auto_augment_v0",
]

MAX_LEVEL = 10.0
MAGNITUDE_STD = 0.5
# tuple(round(x) for x in (123.675, 116.28, 103.53)): AttentiveNAS passes it as hparams['img_mean'].
FILL_COLOR = (124, 116, 104)
# translate_const = int(224 * 0.45) is passed by the reference but no v0 op reads it; the absolute
# TranslateX/Y ops (not in v0) would use the module default 250 (spec §8).
TRANSLATE_CONST = 250
RANDOM_INTERPOLATION = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
)
_AFFINE = Image.Transform.AFFINE

# (op name, probability, magnitude) pairs; spec §8 / AttentiveNAS auto_augment_policy_v0.
POLICY_V0: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


# ----------------------------------------------------------------------------------------------
# Image operations (PIL).  Affine ops take the resampling filter and fill colour explicitly.
# ----------------------------------------------------------------------------------------------
def shear_x(img: Image.Image, factor: float, resample, fillcolor) -> Image.Image:
    return img.transform(img.size, _AFFINE, (1, factor, 0, 0, 1, 0), resample=resample, fillcolor=fillcolor)


def shear_y(img: Image.Image, factor: float, resample, fillcolor) -> Image.Image:
    return img.transform(img.size, _AFFINE, (1, 0, 0, factor, 1, 0), resample=resample, fillcolor=fillcolor)


def translate_x_rel(img: Image.Image, pct: float, resample, fillcolor) -> Image.Image:
    pixels = pct * img.size[0]
    return img.transform(img.size, _AFFINE, (1, 0, pixels, 0, 1, 0), resample=resample, fillcolor=fillcolor)


def translate_y_rel(img: Image.Image, pct: float, resample, fillcolor) -> Image.Image:
    pixels = pct * img.size[1]
    return img.transform(img.size, _AFFINE, (1, 0, 0, 0, 1, pixels), resample=resample, fillcolor=fillcolor)


def translate_x_abs(img: Image.Image, pixels: float, resample, fillcolor) -> Image.Image:
    return img.transform(img.size, _AFFINE, (1, 0, pixels, 0, 1, 0), resample=resample, fillcolor=fillcolor)


def translate_y_abs(img: Image.Image, pixels: float, resample, fillcolor) -> Image.Image:
    return img.transform(img.size, _AFFINE, (1, 0, 0, 0, 1, pixels), resample=resample, fillcolor=fillcolor)


def rotate(img: Image.Image, degrees: float, resample, fillcolor) -> Image.Image:
    return img.rotate(degrees, resample=resample, fillcolor=fillcolor)


def auto_contrast(img: Image.Image) -> Image.Image:
    return ImageOps.autocontrast(img)


def invert(img: Image.Image) -> Image.Image:
    return ImageOps.invert(img)


def equalize(img: Image.Image) -> Image.Image:
    return ImageOps.equalize(img)


def solarize(img: Image.Image, thresh: int) -> Image.Image:
    return ImageOps.solarize(img, thresh)


def solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    if img.mode in ("L", "RGB"):
        if img.mode == "RGB":
            lut = lut + lut + lut
        return img.point(lut)
    return img


def posterize(img: Image.Image, bits_to_keep: int) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, max(1, bits_to_keep))


def contrast(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(factor)


def color(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(factor)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(factor)


NAME_TO_OP: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x_abs,
    "TranslateY": translate_y_abs,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}
AFFINE_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"})


# ----------------------------------------------------------------------------------------------
# Magnitude -> argument maps.  ``neg`` is a callable returning True to negate (one rng.random()).
# ----------------------------------------------------------------------------------------------
def _signed(value: float, rng: random.Random) -> float:
    """With 50 % probability negate (reference: ``-v if random.random() > 0.5 else v``)."""
    return -value if rng.random() > 0.5 else value


def _rotate_arg(level: float, rng: random.Random) -> tuple:
    return (_signed((level / MAX_LEVEL) * 30.0, rng),)


def _enhance_arg(level: float, rng: random.Random) -> tuple:
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


def _shear_arg(level: float, rng: random.Random) -> tuple:
    return (_signed((level / MAX_LEVEL) * 0.3, rng),)


def _translate_abs_arg(level: float, rng: random.Random) -> tuple:
    return (_signed((level / MAX_LEVEL) * float(TRANSLATE_CONST), rng),)


def _translate_rel_arg(level: float, rng: random.Random) -> tuple:
    return (_signed((level / MAX_LEVEL) * 0.45, rng),)


LEVEL_TO_ARG: dict[str, Callable[[float, random.Random], tuple]] = {
    "AutoContrast": lambda level, rng: (),
    "Equalize": lambda level, rng: (),
    "Invert": lambda level, rng: (),
    "Rotate": _rotate_arg,
    "Posterize": lambda level, rng: (int((level / MAX_LEVEL) * 4) + 4,),
    "Solarize": lambda level, rng: (int((level / MAX_LEVEL) * 256),),
    "SolarizeAdd": lambda level, rng: (int((level / MAX_LEVEL) * 110),),
    "Color": _enhance_arg,
    "Contrast": _enhance_arg,
    "Brightness": _enhance_arg,
    "Sharpness": _enhance_arg,
    "ShearX": _shear_arg,
    "ShearY": _shear_arg,
    "TranslateX": _translate_abs_arg,
    "TranslateY": _translate_abs_arg,
    "TranslateXRel": _translate_rel_arg,
    "TranslateYRel": _translate_rel_arg,
}


def apply_op(
    img: Image.Image,
    name: str,
    prob: float,
    magnitude: float,
    rng: random.Random,
    *,
    fillcolor: Sequence[int] = FILL_COLOR,
    magnitude_std: float = MAGNITUDE_STD,
) -> Image.Image:
    """One ``AutoAugmentOp.__call__`` of the reference, drawing from ``rng``."""
    if prob < rng.random():
        return img
    level = magnitude
    if magnitude_std and magnitude_std > 0:
        level = rng.gauss(level, magnitude_std)
    level = min(MAX_LEVEL, max(0.0, level))
    args = LEVEL_TO_ARG[name](level, rng)
    op = NAME_TO_OP[name]
    if name in AFFINE_OPS:
        resample = rng.choice(RANDOM_INTERPOLATION)
        return op(img, *args, resample=resample, fillcolor=tuple(fillcolor))
    return op(img, *args)


def auto_augment_v0(
    img: Image.Image,
    rng: random.Random,
    *,
    fillcolor: Sequence[int] = FILL_COLOR,
    policy=POLICY_V0,
) -> Image.Image:
    """Apply AutoAugment policy v0 to an RGB PIL image: one random sub-policy, its two ops."""
    sub_policy = rng.choice(policy)
    for name, prob, magnitude in sub_policy:
        img = apply_op(img, name, prob, magnitude, rng, fillcolor=fillcolor)
    return img
