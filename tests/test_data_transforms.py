"""Transforms of the input pipeline (spec §7, §8) against direct PIL / numpy computations."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from alphanet_jax.data import autoaugment as AA
from alphanet_jax.data import example_rngs
from alphanet_jax.data import transforms as T

FILL = (124, 116, 104)
FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """skimage's astronaut, a real photograph, made small (and non-square)."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((72, 60), Image.Resampling.BICUBIC)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


# --------------------------------------------------------------------------------------------
# AutoAugment v0
# --------------------------------------------------------------------------------------------
SPEC_V0 = """
1 (Equalize .8 1, ShearY .8 4); 2 (Color .4 9, Equalize .6 3); 3 (Color .4 1, Rotate .6 8);
4 (Solarize .8 3, Equalize .4 7); 5 (Solarize .4 2, Solarize .6 2); 6 (Color .2 0, Equalize .8 8);
7 (Equalize .4 8, SolarizeAdd .8 3); 8 (ShearX .2 9, Rotate .6 8); 9 (Color .6 1, Equalize 1.0 2);
10 (Invert .4 9, Rotate .6 0); 11 (Equalize 1.0 9, ShearY .6 3); 12 (Color .4 7, Equalize .6 0);
13 (Posterize .4 6, AutoContrast .4 7); 14 (Solarize .6 8, Color .6 9); 15 (Solarize .2 4, Rotate .8 9);
16 (Rotate 1.0 7, TranslateYRel .8 9); 17 (ShearX .0 0, Solarize .8 4); 18 (ShearY .8 0, Color .6 4);
19 (Color 1.0 0, Rotate .6 2); 20 (Equalize .8 4, Equalize .0 8); 21 (Equalize 1.0 4, AutoContrast .6 2);
22 (ShearY .4 7, SolarizeAdd .6 7); 23 (Posterize .8 2, Solarize .6 10); 24 (Solarize .6 8, Equalize .6 1);
25 (Color .8 6, Rotate .4 5)
"""


def test_policy_table_matches_spec():
    import re

    entries = re.findall(r"(\d+) \((\w+) ([\d.]+) (\d+), (\w+) ([\d.]+) (\d+)\)", SPEC_V0)
    assert len(entries) == 25
    for k, (num, n1, p1, m1, n2, p2, m2) in enumerate(entries):
        assert int(num) == k + 1
        assert AA.POLICY_V0[k] == ((n1, float(p1), int(m1)), (n2, float(p2), int(m2)))
    assert AA.FILL_COLOR == tuple(round(x) for x in (123.675, 116.28, 103.53)) == FILL


def _draw(rng: random.Random, magnitude: float, signed: bool, affine: bool):
    """Replicates the reference's draws for one op that runs (prob 1)."""
    assert rng.random() <= 1.0
    level = min(10.0, max(0.0, rng.gauss(magnitude, 0.5)))
    neg = signed and rng.random() > 0.5
    resample = rng.choice(FILTERS) if affine else None
    return level, neg, resample


def _expected(img: Image.Image, name: str, level: float, neg: bool, resample) -> np.ndarray:
    """Direct PIL / numpy computation of each op with the spec's magnitude maps."""
    x = np.asarray(img).astype(np.int32)
    sgn = -1.0 if neg else 1.0
    w, h = img.size
    affine = Image.Transform.AFFINE
    if name == "ShearX":
        f = sgn * level / 10 * 0.3
        return arr(img.transform(img.size, affine, (1, f, 0, 0, 1, 0), resample=resample, fillcolor=FILL))
    if name == "ShearY":
        f = sgn * level / 10 * 0.3
        return arr(img.transform(img.size, affine, (1, 0, 0, f, 1, 0), resample=resample, fillcolor=FILL))
    if name == "TranslateYRel":
        px = sgn * level / 10 * 0.45 * h
        return arr(img.transform(img.size, affine, (1, 0, 0, 0, 1, px), resample=resample, fillcolor=FILL))
    if name == "TranslateXRel":
        px = sgn * level / 10 * 0.45 * w
        return arr(img.transform(img.size, affine, (1, 0, px, 0, 1, 0), resample=resample, fillcolor=FILL))
    if name == "Rotate":
        deg = sgn * level / 10 * 30
        return arr(img.rotate(deg, resample=resample, fillcolor=FILL))
    if name == "Solarize":
        t = int(level / 10 * 256)
        return np.where(x >= t, 255 - x, x)
    if name == "SolarizeAdd":
        add = int(level / 10 * 110)
        return np.where(x < 128, np.minimum(255, x + add), x)
    if name == "Posterize":
        bits = int(level / 10 * 4) + 4
        return x if bits >= 8 else x & ~(2 ** (8 - bits) - 1)
    if name == "Invert":
        return 255 - x
    if name == "Equalize":
        return arr(ImageOps.equalize(img))
    if name == "AutoContrast":
        return arr(ImageOps.autocontrast(img))
    factor = level / 10 * 1.8 + 0.1
    if name == "Color":
        grey = img.convert("L").convert("RGB")
        return arr(Image.blend(grey, img, factor))
    if name == "Contrast":
        return arr(ImageEnhance.Contrast(img).enhance(factor))
    if name == "Brightness":
        return arr(Image.blend(Image.new("RGB", img.size, 0), img, factor))
    if name == "Sharpness":
        return arr(ImageEnhance.Sharpness(img).enhance(factor))
    raise AssertionError(name)


V0_OPS = sorted({op[0] for sp in AA.POLICY_V0 for op in sp})
ALL_OPS = sorted(AA.NAME_TO_OP)


def test_v0_uses_these_ops():
    assert V0_OPS == sorted(
        ["AutoContrast", "Color", "Equalize", "Invert", "Posterize", "Rotate", "ShearX", "ShearY",
         "Solarize", "SolarizeAdd", "TranslateYRel"]
    )


@pytest.mark.parametrize("name", [n for n in ALL_OPS if n not in ("TranslateX", "TranslateY")])
@pytest.mark.parametrize("magnitude", [0, 3, 7, 10])
def test_each_op_against_direct_pil(photo, name, magnitude):
    signed = name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    affine = name in AA.AFFINE_OPS
    for seed in range(4):
        out = AA.apply_op(photo, name, 1.0, magnitude, random.Random(seed))
        level, neg, resample = _draw(random.Random(seed), magnitude, signed, affine)
        assert out.mode == "RGB" and out.size == photo.size
        np.testing.assert_array_equal(arr(out), _expected(photo, name, level, neg, resample), err_msg=f"{name} seed {seed}")


def test_op_changes_the_photo(photo):
    """Sanity: every v0 op with a large magnitude actually modifies the picture."""
    for name in V0_OPS:
        out = AA.apply_op(photo, name, 1.0, 9, random.Random(1))
        if name == "AutoContrast":
            continue  # the photo already spans 0..255 in each channel
        assert not np.array_equal(arr(out), arr(photo)), name


def test_rotate_is_counter_clockwise_and_shear_maps():
    """Geometry of the PIL calls (spec §8): rotate +90 about the centre is counter-clockwise;
    ShearX is the output->input map (x, y) -> (x + f*y, y)."""
    a = np.zeros((9, 9, 3), np.uint8)
    a[4, 8] = 255  # right of centre
    img = Image.fromarray(a)
    r = np.asarray(AA.rotate(img, 90.0, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0)))
    assert r[0, 4, 0] == 255  # moved to the top: counter-clockwise
    b = np.zeros((9, 9, 3), np.uint8)
    b[4, 6] = 255
    s = np.asarray(AA.shear_x(Image.fromarray(b), 0.5, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0)))
    ys, xs = np.nonzero(s[..., 0])
    # output (x, y) samples input (x + 0.5 y, y): the pixel at input x=6, y=4 appears at x=4
    assert (ys.tolist(), xs.tolist()) == ([4], [4])


def test_probability_draw_is_always_made(photo):
    rng = random.Random(5)
    out = AA.apply_op(photo, "ShearX", 0.0, 0, rng)  # sub-policy 17's first op
    assert out is photo
    ref = random.Random(5)
    ref.random()
    assert rng.getstate() == ref.getstate()
    # U <= prob runs: probability 1 always runs (U in [0, 1))
    rng = random.Random(5)
    assert AA.apply_op(photo, "Invert", 1.0, 0, rng) is not photo


def test_magnitude_jitter_clipped():
    lv = []
    for s in range(300):
        r = random.Random(s)
        r.random()
        lv.append(min(10.0, max(0.0, r.gauss(10, 0.5))))
    assert max(lv) == 10.0 and min(lv) < 10.0
    # posterize with jittered M=10 always keeps 8 bits (int(4) + 4), M=0 keeps 4
    assert int(10 / 10 * 4) + 4 == 8


class _ReferenceAutoAugment:
    """Independent transcription of AttentiveNAS/timm ``AutoAugment(auto_augment_policy('v0'))``
    with the module ``random`` replaced by an instance (same call order)."""

    def __init__(self, rng):
        self.r = rng

    def _neg(self, v):
        return -v if self.r.random() > 0.5 else v

    def op(self, img, name, prob, mag):
        r = self.r
        if prob < r.random():
            return img
        m = min(10.0, max(0, r.gauss(mag, 0.5)))
        kw = {}
        if name in ("Rotate",):
            args = (self._neg(m / 10 * 30.0),)
        elif name in ("ShearX", "ShearY"):
            args = (self._neg(m / 10 * 0.3),)
        elif name == "TranslateYRel":
            args = (self._neg(m / 10 * 0.45),)
        elif name == "Posterize":
            args = (int(m / 10 * 4) + 4,)
        elif name == "Solarize":
            args = (int(m / 10 * 256),)
        elif name == "SolarizeAdd":
            args = (int(m / 10 * 110),)
        elif name == "Color":
            args = (m / 10 * 1.8 + 0.1,)
        else:
            args = ()
        if name in ("Rotate", "ShearX", "ShearY", "TranslateYRel"):
            kw = dict(resample=r.choice(FILTERS), fillcolor=FILL)
        a = Image.Transform.AFFINE
        if name == "Rotate":
            return img.rotate(args[0], **kw)
        if name == "ShearX":
            return img.transform(img.size, a, (1, args[0], 0, 0, 1, 0), **kw)
        if name == "ShearY":
            return img.transform(img.size, a, (1, 0, 0, args[0], 1, 0), **kw)
        if name == "TranslateYRel":
            return img.transform(img.size, a, (1, 0, 0, 0, 1, args[0] * img.size[1]), **kw)
        if name == "Posterize":
            return img if args[0] >= 8 else ImageOps.posterize(img, max(1, args[0]))
        if name == "Solarize":
            return ImageOps.solarize(img, args[0])
        if name == "SolarizeAdd":
            lut = [min(255, i + args[0]) if i < 128 else i for i in range(256)]
            return img.point(lut * 3)
        if name == "Color":
            return ImageEnhance.Color(img).enhance(args[0])
        return {"Equalize": ImageOps.equalize, "AutoContrast": ImageOps.autocontrast, "Invert": ImageOps.invert}[name](img)

    def __call__(self, img):
        sub = self.r.choice(AA.POLICY_V0)
        for name, p, m in sub:
            img = self.op(img, name, p, m)
        return img


def test_auto_augment_v0_matches_reference_transcription(photo):
    chosen = set()
    for seed in range(120):
        out = AA.auto_augment_v0(photo, random.Random(seed))
        ref = _ReferenceAutoAugment(random.Random(seed))(photo)
        np.testing.assert_array_equal(arr(out), arr(ref), err_msg=f"seed {seed}")
        chosen.add(random.Random(seed).choice(range(25)))
    assert len(chosen) == 25  # every sub-policy exercised


# --------------------------------------------------------------------------------------------
# RandomResizedCrop
# --------------------------------------------------------------------------------------------
class _RecordingRng:
    """A numpy Generator's ``uniform`` and ``integers`` that record every draw: (method, low, high, value)."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self.draws: list[tuple] = []

    def uniform(self, low, high):
        self.draws.append(("uniform", low, high, float(self._rng.uniform(low, high))))
        return self.draws[-1][-1]

    def integers(self, low, high):
        self.draws.append(("integers", low, high, int(self._rng.integers(low, high))))
        return self.draws[-1][-1]


@pytest.mark.parametrize(
    "size,scale",
    [((72, 60), (0.08, 1.0)), ((8, 8), (0.08, 1.0)), ((500, 20), (0.08, 1.0)), ((20, 500), (0.5, 1.0)),
     ((300, 200), (0.9, 1.0)), ((40, 40), (1.0, 1.0))],
)
def test_random_resized_crop_params_match_torchvision(size, scale):
    """torchvision's RandomResizedCrop.get_params, checked draw by draw: up to 10 tries, each an area
    fraction ~ U(scale) then a log aspect ratio ~ U(log ratio); the first crop that fits is placed at
    top ~ U{0..H-h}, left ~ U{0..W-w}; after 10 misses, no more draws and the centred crop of the whole
    image narrowed to the nearest allowed aspect ratio."""
    width, height = size
    ratio = (3 / 4, 4 / 3)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for seed in range(200):
        rng = _RecordingRng(seed)
        got = T.random_resized_crop_params(width, height, rng, scale, ratio)
        i, j, h, w = got
        draws, tries = list(rng.draws), []  # tries: the (w, h) each try asked for
        while draws and draws[0][0] == "uniform":
            (_, *area_bounds, frac), (_, *aspect_bounds, log_aspect) = draws[:2]
            assert tuple(area_bounds) == tuple(scale) and tuple(aspect_bounds) == log_ratio
            target, aspect = width * height * frac, math.exp(log_aspect)
            tries.append((round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))))
            draws = draws[2:]
        fits = [0 < tw <= width and 0 < th <= height for tw, th in tries]
        assert 1 <= len(tries) <= 10 and not any(fits[:-1])
        if fits[-1]:
            assert (w, h) == tries[-1]
            assert draws == [("integers", 0, height - h + 1, i), ("integers", 0, width - w + 1, j)]
        else:
            assert len(tries) == 10 and not draws
            r = min(max(width / height, min(ratio)), max(ratio))  # the nearest allowed aspect ratio
            wide = width / height > max(ratio)  # full height, else full width
            assert (h, w) == ((height, round(height * r)) if wide else (round(width / r), width))
            assert (i, j) == ((height - h) // 2, (width - w) // 2)
        assert 0 <= i and 0 <= j and i + h <= height and j + w <= width and h > 0 and w > 0
        assert got == T.random_resized_crop_params(width, height, np.random.default_rng(seed), scale, ratio)
    if size == (500, 20):
        # a 25:1 image never fits a crop with ratio <= 4/3 of area >= 8 % -> always the fallback
        got = T.random_resized_crop_params(500, 20, np.random.default_rng(0), scale, ratio)
        assert got == (0, (500 - round(20 * 4 / 3)) // 2, 20, round(20 * 4 / 3))


def test_random_resized_crop_pixels(photo):
    for interp, filt in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
        for seed in range(10):
            out = T.random_resized_crop(photo, 24, np.random.default_rng(seed), interpolation=interp)
            i, j, h, w = T.random_resized_crop_params(*photo.size, np.random.default_rng(seed))
            exp = photo.crop((j, i, j + w, i + h)).resize((24, 24), filt)
            np.testing.assert_array_equal(arr(out), arr(exp))


def test_rrc_upsamples_tiny_digit_image():
    a = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    img = Image.fromarray(np.repeat(a[..., None], 3, -1))
    out = T.random_resized_crop(img, 32, np.random.default_rng(0))
    assert out.size == (32, 32) and out.mode == "RGB"


# --------------------------------------------------------------------------------------------
# Validation transform and normalisation
# --------------------------------------------------------------------------------------------
def test_resize_shorter_side_truncates_long_side(photo):
    img = photo.resize((451, 300))
    out = T.resize_shorter(img, 256)
    assert out.size == (int(256 * 451 / 300), 256) == (384, 256)
    np.testing.assert_array_equal(arr(out), arr(img.resize((384, 256), Image.Resampling.BICUBIC)))
    tall = photo.resize((300, 451))
    assert T.resize_shorter(tall, 256).size == (256, 384)
    assert T.resize_shorter(tall, 256, "bilinear").size == (256, 384)
    sq = photo.resize((256, 256))
    assert T.resize_shorter(sq, 256) is sq


def _torchvision_center_crop(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[:2]
    if size > w or size > h:
        pl = (size - w) // 2 if size > w else 0
        pt = (size - h) // 2 if size > h else 0
        pr = (size - w + 1) // 2 if size > w else 0
        pb = (size - h + 1) // 2 if size > h else 0
        a = np.pad(a, ((pt, pb), (pl, pr), (0, 0)))
        h, w = a.shape[:2]
        if (h, w) == (size, size):
            return a
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return a[top : top + size, left : left + size]


@pytest.mark.parametrize("wh", [(72, 60), (61, 59), (30, 29), (29, 40), (12, 12), (33, 31)])
def test_center_crop_matches_torchvision(photo, wh):
    img = photo.resize(wh)
    for size in (8, 27, 31, 32):
        np.testing.assert_array_equal(arr(T.center_crop(img, size)), _torchvision_center_crop(arr(img), size))


def test_normalisation_matches_totensor_normalize(photo):
    x = np.asarray(photo)
    mean = np.array([123.675, 116.28, 103.53], np.float32) / np.float32(255)
    std = np.array([58.395, 57.12, 57.375], np.float32) / np.float32(255)
    np.testing.assert_allclose(mean, [0.485, 0.456, 0.406], atol=1e-6)
    np.testing.assert_allclose(std, [0.229, 0.224, 0.225], atol=1e-6)
    exp = (x.astype(np.float32) / np.float32(255) - mean) / std
    got = T.to_normalized_array(photo)
    assert got.dtype == np.float32 and got.shape == (60, 72, 3)
    np.testing.assert_array_equal(got, exp)


def test_val_transform(photo):
    img = photo.resize((90, 70))
    out = T.val_transform(img, image_size=56, resize_size=64)
    r = img.resize((int(64 * 90 / 70), 64), Image.Resampling.BICUBIC)
    top, left = int(round((64 - 56) / 2)), int(round((r.size[0] - 56) / 2))
    exp = T.to_normalized_array(r.crop((left, top, left + 56, top + 56)))
    np.testing.assert_array_equal(out, exp)
    assert out.shape == (56, 56, 3) and out.dtype == np.float32


# --------------------------------------------------------------------------------------------
# Full training transform
# --------------------------------------------------------------------------------------------
LO = (0 - T.IMAGENET_MEAN) / T.IMAGENET_STD
HI = (1 - T.IMAGENET_MEAN) / T.IMAGENET_STD


def test_train_transform_composition(photo):
    for seed in range(20):
        np_rng, py_rng = example_rngs(0, 0, seed)
        out = T.train_transform(photo, image_size=40, np_rng=np_rng, py_rng=py_rng)
        assert out.shape == (40, 40, 3) and out.dtype == np.float32
        assert np.all(out >= LO - 1e-6) and np.all(out <= HI + 1e-6)
        # same thing by hand: crop, flip draw, AutoAugment
        np_rng, py_rng = example_rngs(0, 0, seed)
        img = T.random_resized_crop(photo, 40, np_rng)
        if np_rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = _ReferenceAutoAugment(py_rng)(img)
        np.testing.assert_array_equal(out, T.to_normalized_array(img))


def test_train_transform_augment_modes(photo):
    flips = 0
    for seed in range(16):
        outs = {}
        for mode in ("none", "flip", "autoaugment_v0"):
            np_rng, py_rng = example_rngs(1, 2, seed)
            outs[mode] = T.train_transform(photo, image_size=32, np_rng=np_rng, py_rng=py_rng, augment=mode)
        base = T.to_normalized_array(T.random_resized_crop(photo, 32, example_rngs(1, 2, seed)[0]))
        np.testing.assert_array_equal(outs["none"], base)
        flipped = np.array_equal(outs["flip"], base[:, ::-1])
        flips += flipped
        assert flipped or np.array_equal(outs["flip"], base)
    assert 0 < flips < 16
    with pytest.raises(ValueError, match="augment"):
        T.train_transform(photo, image_size=32, np_rng=np.random.default_rng(0), py_rng=random.Random(0), augment="bogus")


def test_crop_scale_option(photo):
    """crop_scale=(1, 1) with ratio (1, 1) on a square image is the whole image."""
    sq = photo.resize((48, 48))
    out = T.train_transform(
        sq, image_size=48, np_rng=np.random.default_rng(0), py_rng=random.Random(0), augment="none",
        scale=(1.0, 1.0), ratio=(1.0, 1.0),
    )
    np.testing.assert_array_equal(out, T.to_normalized_array(sq))
