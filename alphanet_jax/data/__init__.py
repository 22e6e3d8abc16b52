"""Input pipeline for alphanet-jax (spec §7-§8): ImageFolder / TFDS (no TensorFlow) / digits
sources, the AttentiveNAS training transform (RandomResizedCrop, flip, AutoAugment v0) and
validation transform (Resize 256, CenterCrop 224), multi-threaded with grain.

Public interface::

    make_train_iterator(cfg, *, batch_size, seed, process_index=0, process_count=1, state=None)
    make_eval_iterator(cfg, *, batch_size, split='val', process_index=0, process_count=1)
    make_calibration_iterator(cfg, *, batch_size, seed, process_index=0, process_count=1)
    dataset_info(cfg) -> dict
    default_config(source='digits') -> ml_collections.ConfigDict
    prefetch(iterator, size=2)
"""
from __future__ import annotations

from typing import Any

from alphanet_jax.data.config import DataSpec, default_config, resolve_config
from alphanet_jax.data.pipeline import (
    EvalIterator,
    TrainIterator,
    example_rngs,
    epoch_permutation,
    open_source,
    validate_structure,
)
from alphanet_jax.data.prefetch import prefetch
from alphanet_jax.data.sources import BadExample, clear_cache, decode_image

__all__ = [
    "make_train_iterator",
    "make_eval_iterator",
    "make_calibration_iterator",
    "dataset_info",
    "default_config",
    "resolve_config",
    "prefetch",
    "TrainIterator",
    "EvalIterator",
    "DataSpec",
    "BadExample",
    "decode_image",
    "example_rngs",
    "epoch_permutation",
    "clear_cache",
]


def make_train_iterator(cfg: Any, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                        state: dict | None = None) -> TrainIterator:
    """Infinite, shuffled (per epoch, from ``seed``), augmented, drop-remainder batches of the
    train split: ``dict(image=float32[B,H,W,3], label=int32[B])`` with B the per-host batch.

    Validates the dataset structure first (train and val splits present, non-empty, same
    classes).  ``state`` (from ``TrainIterator.get_state()``) resumes at the next batch."""
    spec = resolve_config(cfg)
    train, _ = validate_structure(spec)
    return TrainIterator(spec, train, batch_size=batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, state=state)


def make_eval_iterator(cfg: Any, *, batch_size: int, split: str = "val", process_index: int = 0,
                       process_count: int = 1) -> EvalIterator:
    """One ordered pass with the validation transform: ``dict(image, label, mask)``; the last
    batch is padded (``mask`` False) and every host yields the same number of batches."""
    spec = resolve_config(cfg)
    return EvalIterator(spec, open_source(spec, split), batch_size=batch_size, process_index=process_index,
                        process_count=process_count)


def make_calibration_iterator(cfg: Any, *, batch_size: int, seed: int, process_index: int = 0,
                              process_count: int = 1) -> TrainIterator:
    """BN-calibration batches (spec §7): the training transform on the train split, shuffled,
    drop-remainder.  Infinite; take e.g. 64 batches of 256."""
    spec = resolve_config(cfg)
    return TrainIterator(spec, open_source(spec, "train"), batch_size=batch_size, seed=seed,
                         process_index=process_index, process_count=process_count)


def dataset_info(cfg: Any) -> dict:
    """``num_classes, num_train, num_val, image_size, resize_size, class_names, source``.

    Raises ``PathNotFoundError`` / ``DataError`` (FileNotFoundError / ValueError) for structural
    problems (missing root or split folder, a split without images, classes differing between train
    and val)."""
    spec = resolve_config(cfg)
    train, val = validate_structure(spec)
    classes = train.classes
    return {
        "source": spec.source,
        "num_classes": len(classes),
        "num_train": len(train),
        "num_val": len(val),
        "image_size": spec.image_size,
        "resize_size": spec.resize_size,
        "class_names": list(classes),
        "train_split": spec.train_split,
        "val_split": spec.val_split,
    }
