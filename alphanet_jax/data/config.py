"""Data configuration: ``default_config`` and the resolution of a user config into a typed spec."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from alphanet_jax.data.transforms import AUGMENTS, DEFAULT_RATIO, DEFAULT_SCALE, INTERPOLATIONS
from alphanet_jax.errors import ConfigError

__all__ = ["SOURCES", "DataSpec", "default_config", "resolve_config"]

SOURCES = ("digits", "imagefolder", "tfds")


def _default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _defaults(source: str) -> dict[str, Any]:
    if source not in SOURCES:
        raise ConfigError(f"data source must be one of {SOURCES}, got {source!r}")
    d = dict(
        source=source,
        root="",
        tfds_name="",
        tfds_data_dir=None,
        train_split="train",
        val_split="val",
        image_size=224,
        resize_size=256,
        augment="autoaugment_v0",
        crop_scale=tuple(DEFAULT_SCALE),
        crop_ratio=tuple(DEFAULT_RATIO),
        interpolation="bicubic",
        num_workers=_default_workers(),
        prefetch_examples=0,  # 0: automatic (max(batch, 4 * num_workers))
    )
    if source == "digits":
        d.update(image_size=32, resize_size=36)
    elif source == "tfds":
        d.update(tfds_name="imagenet2012", val_split="validation")
    return d


def default_config(source: str = "digits"):
    """An ``ml_collections.ConfigDict`` with every data field, defaults for ``source``.

    Fields: source ('digits' | 'imagefolder' | 'tfds'), root, tfds_name, tfds_data_dir,
    train_split, val_split, image_size, resize_size, augment ('autoaugment_v0' | 'flip' |
    'none'), crop_scale, crop_ratio, interpolation ('bicubic' | 'bilinear'), num_workers
    (threads; 0 = decode in the calling thread), prefetch_examples (0 = automatic).
    """
    import ml_collections

    d = _defaults(source)
    cfg = ml_collections.ConfigDict()
    for k, v in d.items():
        if v is None:
            # Typed placeholder so the field can later be set to a string.
            cfg[k] = ml_collections.config_dict.placeholder(str)
        else:
            cfg[k] = v
    return cfg


@dataclasses.dataclass(frozen=True)
class DataSpec:
    source: str
    root: str
    tfds_name: str
    tfds_data_dir: str | None
    train_split: str
    val_split: str
    image_size: int
    resize_size: int
    augment: str
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    interpolation: str
    num_workers: int
    prefetch_examples: int

    def split_name(self, split: str) -> str:
        """'train' / 'val' are aliases of the configured train_split / val_split."""
        if split == "train":
            return self.train_split
        if split in ("val", "validation") and split != self.val_split:
            return self.val_split
        return split


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        v = cfg.get(key, default)
    else:
        try:
            v = getattr(cfg, key)
        except (AttributeError, KeyError):
            v = default
    return default if v is None else v


def resolve_config(cfg: Any) -> DataSpec:
    """Accepts a ConfigDict, any attribute-access object or a plain dict; missing fields take the
    defaults of the source (so a trainer config may omit e.g. ``crop_ratio``).  A config that
    holds the data fields under ``cfg.data`` is also accepted."""
    if isinstance(cfg, DataSpec):
        return cfg
    if cfg is None:
        cfg = {}
    if _get(cfg, "source", None) is None:
        inner = _get(cfg, "data", None)
        if inner is not None and _get(inner, "source", None) is not None:
            cfg = inner
    source = str(_get(cfg, "source", "digits")).lower()
    d = _defaults(source)
    vals = {k: _get(cfg, k, v) for k, v in d.items()}
    if source == "tfds" and vals["val_split"] == "val" and _get(cfg, "val_split", None) is None:
        vals["val_split"] = "validation"
    augment = str(vals["augment"]).lower()
    if augment in ("auto_augment_tf", "autoaugment", "auto_augment"):
        augment = "autoaugment_v0"
    if augment not in AUGMENTS:
        raise ConfigError(f"cfg.augment must be one of {AUGMENTS}, got {vals['augment']!r}")
    interpolation = str(vals["interpolation"]).lower()
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"cfg.interpolation must be one of {sorted(INTERPOLATIONS)}, got {vals['interpolation']!r}"
        )
    image_size, resize_size = int(vals["image_size"]), int(vals["resize_size"])
    if image_size <= 0 or resize_size <= 0:
        raise ConfigError(f"image_size and resize_size must be positive, got {image_size}, {resize_size}")
    scale = tuple(float(x) for x in vals["crop_scale"])
    ratio = tuple(float(x) for x in vals["crop_ratio"])
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ConfigError(f"cfg.crop_scale must be (lo, hi) with 0 < lo <= hi, got {vals['crop_scale']!r}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"cfg.crop_ratio must be (lo, hi) with 0 < lo <= hi, got {vals['crop_ratio']!r}")
    num_workers = int(vals["num_workers"])
    if num_workers < 0:
        raise ConfigError(f"cfg.num_workers must be >= 0, got {num_workers}")
    data_dir = vals["tfds_data_dir"]
    return DataSpec(
        source=source,
        root=str(vals["root"]),
        tfds_name=str(vals["tfds_name"]),
        tfds_data_dir=str(data_dir) if data_dir else None,
        train_split=str(vals["train_split"]),
        val_split=str(vals["val_split"]),
        image_size=image_size,
        resize_size=resize_size,
        augment=augment,
        crop_scale=scale,  # type: ignore[arg-type]
        crop_ratio=ratio,  # type: ignore[arg-type]
        interpolation=interpolation,
        num_workers=num_workers,
        prefetch_examples=int(vals["prefetch_examples"]),
    )
