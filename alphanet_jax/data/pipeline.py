"""Train / eval / calibration iterators on top of grain (threads only; no TensorFlow).

Determinism: example ``i`` of the source in epoch ``e`` is augmented with random generators
seeded from ``(seed, e, i)`` only (:func:`example_rngs`), and the order of epoch ``e`` is a
permutation seeded from ``(seed, e)``.  Nothing depends on the number of worker threads, the
batch a record lands in, or the read-ahead.
"""
from __future__ import annotations

import logging
import random
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from alphanet_jax.data import sources as sources_lib
from alphanet_jax.data import transforms as T
from alphanet_jax.data.config import DataSpec
from alphanet_jax.errors import ConfigError, DataError

__all__ = [
    "STATE_VERSION",
    "example_rngs",
    "epoch_permutation",
    "open_source",
    "validate_structure",
    "TrainIterator",
    "EvalIterator",
]

log = logging.getLogger("alphanet_jax.data")

STATE_VERSION = 1
_TAG_PERM = 0x5045524D  # 'PERM'
_TAG_NP = 0x4E503031  # 'NP01': crop + flip
_TAG_PY = 0x50593031  # 'PY01': AutoAugment


def _u64(x: int) -> int:
    x = int(x)
    if x < 0:
        raise ConfigError(f"seeds, epochs and indices must be non-negative, got {x}")
    return x


def example_rngs(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, random.Random]:
    """The two generators used to augment source example ``index`` in ``epoch``: a numpy
    Generator (random-resized crop and flip) and a ``random.Random`` (AutoAugment)."""
    key = [_u64(seed), _u64(epoch), _u64(index)]
    np_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_NP, *key])))
    words = np.random.SeedSequence([_TAG_PY, *key]).generate_state(4, np.uint64)
    py_seed = int(words[0]) | (int(words[1]) << 64) | (int(words[2]) << 128) | (int(words[3]) << 192)
    return np_rng, random.Random(py_seed)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled order of the whole split for ``epoch`` (identical on every host)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_PERM, _u64(seed), _u64(epoch)])))
    return rng.permutation(n)


# ----------------------------------------------------------------------------------------------
# Sources and structural validation
# ----------------------------------------------------------------------------------------------
def open_source(spec: DataSpec, split: str):
    """Build the source for ``split`` ('train' / 'val' are aliases of the configured names)."""
    name = spec.split_name(split)
    if spec.source == "digits":
        return sources_lib.DigitsSource(name)
    if spec.source == "imagefolder":
        if not spec.root:
            raise ConfigError(
                "cfg.root is empty: set it to the ImageFolder root that contains train/ and val/ "
                "(<root>/train/<class>/*.jpg)."
            )
        return sources_lib.ImageFolderSource(spec.root, name)
    if spec.source == "tfds":
        return sources_lib.TfdsSource(spec.tfds_name, name, spec.tfds_data_dir)
    raise ConfigError(f"unknown data source {spec.source!r}")


def validate_structure(spec: DataSpec) -> tuple[Any, Any]:
    """Open the train and val splits and check that they agree on the classes.

    Raises ``PathNotFoundError`` (a FileNotFoundError) / ``DataError`` (a ValueError) naming the
    path and the fix."""
    train = open_source(spec, "train")
    val = open_source(spec, "val")
    tc, vc = train.classes, val.classes
    derived = getattr(train, "classes_from_labels", False) or getattr(val, "classes_from_labels", False)
    if not derived and list(tc) != list(vc):
        only_t = sorted(set(tc) - set(vc))
        only_v = sorted(set(vc) - set(tc))
        where = (
            f"{spec.root}/{spec.train_split} vs {spec.root}/{spec.val_split}"
            if spec.source == "imagefolder"
            else f"{spec.source}:{spec.train_split} vs {spec.val_split}"
        )
        detail = (
            f"only in train: {only_t[:10]}{'...' if len(only_t) > 10 else ''}; "
            f"only in val: {only_v[:10]}{'...' if len(only_v) > 10 else ''}"
            if (only_t or only_v)
            else "same names in a different order"
        )
        raise DataError(
            f"The train and val splits have different classes ({where}): {len(tc)} vs {len(vc)} "
            f"classes, {detail}. Class indices come from the sorted folder names, so both splits "
            f"need the same class folders (an empty class folder is not allowed either)."
        )
    return train, val


# ----------------------------------------------------------------------------------------------
# What the iterators share: the host's place and batch size, bad-record handling
# ----------------------------------------------------------------------------------------------

class _HostBatches:
    """What both iterators hold: the split's source, this host's place among the hosts and the per-host
    batch size (checked)."""

    def __init__(self, spec: DataSpec, source, batch_size: int, process_index: int, process_count: int):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        self.spec = spec
        self.source = source
        self.batch_size = int(batch_size)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.num_examples = len(source)


class _Loader:
    """Loads records from a source, remembering undecodable ones and warning once per record.

    ``fate`` completes the warning: what the iterator does with a bad record."""

    def __init__(self, source, fate: str = "it is replaced by the next good example"):
        self.source = source
        self._fate = fate
        self._bad: set[int] = set()
        self._lock = threading.Lock()

    def _mark_bad(self, index: int, err: Exception) -> None:
        with self._lock:
            new = index not in self._bad
            self._bad.add(index)
        if new:
            log.warning(
                "Skipping undecodable image %s (%s); %s and counted in stats['bad_examples'].",
                self.source.key(index),
                err,
                self._fate,
            )

    def try_load(self, index: int):
        """``(img, label)`` or ``None`` if the record is bad."""
        if index in self._bad:
            return None
        try:
            return self.source.load(index)
        except sources_lib.BadExample as e:
            self._mark_bad(index, e)
            return None

    def load_good(self, index: int):
        """The first good record at ``index, index+1, ...`` (wrapping); returns
        ``(img, label, number_of_bad_records_skipped)``."""
        n = len(self.source)
        for k in range(n):
            r = self.try_load((index + k) % n)
            if r is not None:
                return r[0], r[1], k
        raise DataError(
            f"No record of {self.source.key(0)} ... ({n} records) could be decoded as an image: the "
            f"split holds no readable image; check the files (the warnings above name each one)."
        )


def _collate(examples: Sequence[dict]) -> dict:
    out = {"image": np.stack([e["image"] for e in examples])}
    for k in examples[0]:
        if k != "image":
            out[k] = np.asarray([e[k] for e in examples])
    out["label"] = out["label"].astype(np.int32)
    if "mask" in out:
        out["mask"] = out["mask"].astype(np.bool_)
    return out


def _grain_batches(fn: Callable[[int], dict], start: int, stop: int, batch_size: int, num_workers: int, buffer: int):
    """Iterator over batches of ``fn(k)`` for k in [start, stop), computed by grain threads."""
    import grain

    ds = grain.MapDataset.range(start, stop).map(fn)
    if num_workers > 0:
        opts = grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=max(buffer, num_workers))
    else:
        opts = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(ds.to_iter_dataset(opts).batch(batch_size, drop_remainder=True, batch_fn=_collate))


def _buffer_size(spec: DataSpec, batch_size: int) -> int:
    if spec.prefetch_examples > 0:
        return spec.prefetch_examples
    return max(batch_size, 4 * spec.num_workers)


# ----------------------------------------------------------------------------------------------
# Training (and calibration) iterator
# ----------------------------------------------------------------------------------------------
class TrainIterator(_HostBatches):
    """Infinite iterator over epochs of shuffled, augmented, drop-remainder batches.

    Yields ``dict(image=float32[B, H, W, 3], label=int32[B])`` with B the per-host batch.
    Epoch ``e`` uses :func:`epoch_permutation`; host ``p`` of ``P`` takes the contiguous slice
    ``perm[p * (N // P):(p + 1) * (N // P)]`` of it, and the first ``steps_per_epoch * B``
    entries of that slice are batched (the rest is dropped), so every host runs the same number
    of steps and the hosts' examples are disjoint.

    ``get_state()`` returns the position of the *next* batch as a JSON-able dict; pass it to
    ``set_state`` or ``make_train_iterator(state=...)`` to continue from there.  ``epoch`` is
    the epoch of the next batch.  ``stats['bad_examples']`` counts the undecodable records that
    were replaced in the batches yielded so far.
    """

    def __init__(
        self,
        spec: DataSpec,
        source,
        *,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        state: dict | None = None,
    ):
        super().__init__(spec, source, batch_size, process_index, process_count)
        self.seed = _u64(seed)
        self.examples_per_host = self.num_examples // self.process_count
        self.steps_per_epoch = self.examples_per_host // self.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"The training split has {self.num_examples} examples: fewer than one batch of "
                f"{self.batch_size} per host for {self.process_count} host(s). Use a smaller batch "
                f"size or more data."
            )
        self.examples_per_epoch = self.steps_per_epoch * self.batch_size  # per host
        self._loader = _Loader(source)
        self._perm_cache: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()
        self._pos = 0  # flat per-host example position of the next batch
        self._bad_count = 0
        self._it = None
        self._buffer = _buffer_size(spec, self.batch_size)
        if state is not None:
            self.set_state(state)

    # -- indices ---------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Source indices this host reads in ``epoch``, in order (length examples_per_epoch)."""
        with self._perm_lock:
            idx = self._perm_cache.get(epoch)
            if idx is None:
                perm = epoch_permutation(self.seed, epoch, self.num_examples)
                lo = self.process_index * self.examples_per_host
                idx = perm[lo : lo + self.examples_per_epoch].copy()
                if len(self._perm_cache) >= 3:
                    self._perm_cache.pop(min(self._perm_cache))
                self._perm_cache[epoch] = idx
        return idx

    def _example(self, pos: int) -> dict:
        epoch, k = divmod(pos, self.examples_per_epoch)
        index = int(self.epoch_indices(epoch)[k])
        img, label, n_bad = self._loader.load_good(index)
        np_rng, py_rng = example_rngs(self.seed, epoch, index)
        s = self.spec
        image = T.train_transform(
            img,
            image_size=s.image_size,
            np_rng=np_rng,
            py_rng=py_rng,
            augment=s.augment,
            scale=s.crop_scale,
            ratio=s.crop_ratio,
            interpolation=s.interpolation,
        )
        return {"image": image, "label": label, "_bad": n_bad}

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            # The flat position space is (practically) unbounded: epochs follow each other
            # without draining the read-ahead at epoch boundaries.
            self._it = _grain_batches(
                self._example, self._pos, self._pos + (1 << 62), self.batch_size, self.spec.num_workers, self._buffer
            )
        batch = next(self._it)
        self._bad_count += int(batch.pop("_bad").sum())
        self._pos += self.batch_size
        return batch

    @property
    def epoch(self) -> int:
        return self._pos // self.examples_per_epoch

    @property
    def step(self) -> int:
        """Number of batches yielded so far (over all epochs, including resumed ones)."""
        return self._pos // self.batch_size

    @property
    def stats(self) -> dict:
        return {"bad_examples": self._bad_count}

    def get_state(self) -> dict:
        epoch, index = divmod(self._pos, self.examples_per_epoch)
        return {
            "version": STATE_VERSION,
            "epoch": int(epoch),
            "index": int(index),  # examples of this epoch already yielded by this host
            "seed": self.seed,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_examples": self.num_examples,
            "bad_examples": self._bad_count,
        }

    def set_state(self, state: dict) -> None:
        """Continue from a ``get_state()`` dict.  Exact when seed, batch size, process count and
        dataset size are unchanged; otherwise the epoch is kept and the position within it is
        rescaled (with a warning)."""
        epoch = int(state["epoch"])
        index = int(state.get("index", 0))
        if epoch < 0 or index < 0:
            raise ValueError(f"invalid iterator state {state!r}")
        same = (
            int(state.get("batch_size", self.batch_size)) == self.batch_size
            and int(state.get("process_count", self.process_count)) == self.process_count
            and int(state.get("num_examples", self.num_examples)) == self.num_examples
        )
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(
                f"Restoring a data iterator state saved with seed {state.get('seed')} into an "
                f"iterator with seed {self.seed}: the order of the remaining batches differs.",
                stacklevel=2,
            )
        if not same:
            old_pc = int(state.get("process_count", self.process_count))
            old_n = max(1, int(state.get("num_examples", self.num_examples)))
            old_per_host = max(1, old_n // old_pc)
            frac = min(1.0, index / old_per_host)
            index = int(frac * self.examples_per_epoch) // self.batch_size * self.batch_size
            warnings.warn(
                "Restoring a data iterator state saved with a different batch size, process "
                "count or dataset size: the position within the epoch is rescaled, so the "
                "continuation is approximate.",
                stacklevel=2,
            )
        if index % self.batch_size:
            index = index // self.batch_size * self.batch_size
        if index >= self.examples_per_epoch:
            epoch, index = epoch + 1, 0
        self.close()
        self._pos = epoch * self.examples_per_epoch + index
        self._bad_count = int(state.get("bad_examples", 0))

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            try:
                it.close()
            except Exception:  # pragma: no cover - best effort
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# Evaluation iterator
# ----------------------------------------------------------------------------------------------
class EvalIterator(_HostBatches):
    """One pass over a split in order with the validation transform.

    Host ``p`` of ``P`` gets the contiguous shard ``[p * S, min(N, (p + 1) * S))`` with
    ``S = ceil(N / P)``; every host yields ``ceil(S / B)`` batches of exactly B, padded with
    zero images whose ``mask`` is False.  An undecodable record is also yielded as a masked-out
    zero image (so no other example is counted twice) and counted in ``stats['bad_examples']``.
    Iterating again starts a fresh pass.
    """

    def __init__(self, spec: DataSpec, source, *, batch_size: int, process_index: int = 0, process_count: int = 1):
        super().__init__(spec, source, batch_size, process_index, process_count)
        self.shard_size = -(-self.num_examples // self.process_count)
        self.start = min(self.num_examples, self.process_index * self.shard_size)
        self.stop = min(self.num_examples, self.start + self.shard_size)
        self.num_local = self.stop - self.start
        self.num_batches = -(-self.shard_size // self.batch_size)
        self._loader = _Loader(source, "it is masked out (left out of the evaluation)")
        self._stats = {"bad_examples": 0, "num_examples": 0}
        self._lock = threading.Lock()
        s = spec
        self._blank = np.zeros((s.image_size, s.image_size, 3), np.float32)

    def __len__(self) -> int:
        return self.num_batches

    def _example(self, k: int) -> dict:
        if k < self.num_local:
            r = self._loader.try_load(self.start + k)
            if r is not None:
                s = self.spec
                image = T.val_transform(
                    r[0], image_size=s.image_size, resize_size=s.resize_size, interpolation=s.interpolation
                )
                return {"image": image, "label": r[1], "mask": True, "_bad": 0}
            return {"image": self._blank, "label": 0, "mask": False, "_bad": 1}
        return {"image": self._blank, "label": 0, "mask": False, "_bad": 0}

    @property
    def stats(self) -> dict:
        return dict(self._stats)

    def __iter__(self) -> Iterator[dict]:
        self._stats = {"bad_examples": 0, "num_examples": 0}
        it = _grain_batches(
            self._example,
            0,
            self.num_batches * self.batch_size,
            self.batch_size,
            self.spec.num_workers,
            _buffer_size(self.spec, self.batch_size),
        )
        try:
            for batch in it:
                self._stats["bad_examples"] += int(batch.pop("_bad").sum())
                self._stats["num_examples"] += int(batch["mask"].sum())
                yield batch
        finally:
            if hasattr(it, "close"):
                it.close()
