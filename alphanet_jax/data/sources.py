"""Data sources: an ImageFolder tree, a prepared TFDS dataset (read without TensorFlow), and
scikit-learn's bundled digits.

Every source is a random-access sequence: ``len(src)`` and ``src.load(i) -> (PIL RGB image, label)``.
``load`` raises :class:`BadExample` when a record cannot be decoded; the pipeline then counts it
and substitutes the next good record.  Structural problems (missing folders, empty splits,
train/val class mismatch) raise ``PathNotFoundError`` (a FileNotFoundError) / ``DataError`` (a
ValueError) when the source is built.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from alphanet_jax.errors import ConfigError, DataError, PathNotFoundError

__all__ = [
    "IMG_EXTENSIONS",
    "BadExample",
    "decode_image",
    "ImageFolderSource",
    "TfdsSource",
    "DigitsSource",
    "scan_image_folder",
    "clear_cache",
]

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadExample(Exception):
    """A record that cannot be decoded into an RGB image (truncated, unreadable, not an image)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB like torchvision's ``pil_loader`` (``img.convert('RGB')``).

    Palette images with a transparency entry go through RGBA first, which yields the same RGB
    pixels without PIL's "Palette images with Transparency" warning (alpha is dropped, as with a
    direct conversion)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(data: Any) -> Image.Image:
    """Decode a path, encoded bytes, or a uint8 array (HW, HW1, HW3, HW4) to an RGB PIL image.

    The format is detected from the content, not the file name (a PNG named .jpg is fine).
    Grey (L), palette (P), CMYK, RGBA, LA, 1-bit, ... are converted to RGB.  Raises
    :class:`BadExample` if decoding is impossible (garbage, truncated file, missing file).
    """
    try:
        if isinstance(data, np.ndarray):
            arr = data
            if arr.dtype != np.uint8:
                raise BadExample(f"image array has dtype {arr.dtype}, expected uint8")
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[:, :, 0]
            if arr.ndim == 2:
                return Image.fromarray(arr, "L").convert("RGB")
            if arr.ndim == 3 and arr.shape[-1] == 3:
                return Image.fromarray(np.ascontiguousarray(arr), "RGB")
            if arr.ndim == 3 and arr.shape[-1] == 4:
                return Image.fromarray(np.ascontiguousarray(arr), "RGBA").convert("RGB")
            raise BadExample(f"image array has shape {arr.shape}, expected (H, W[, 1|3|4])")
        if isinstance(data, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return _to_rgb(img)
        if isinstance(data, np.bytes_):
            return decode_image(bytes(data))
        with open(os.fspath(data), "rb") as f:
            with Image.open(f) as img:
                img.load()
                return _to_rgb(img)
    except BadExample:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadExample(f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------
_SCAN_CACHE: dict[tuple, tuple[list[str], list[str], np.ndarray]] = {}
_SCAN_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget cached directory scans (they are keyed on path and the split folder's mtime)."""
    with _SCAN_LOCK:
        _SCAN_CACHE.clear()


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: str, split: str) -> tuple[list[str], list[str], np.ndarray]:
    """Scan ``<root>/<split>/<class>/**/<image>`` like torchvision's ``ImageFolder``.

    Returns ``(classes, paths, labels)``: classes are the sorted sub-folder names, a class's
    index is its position; files are walked in sorted order (sub-folders followed, symlinks
    followed) and kept if their extension is one of :data:`IMG_EXTENSIONS`.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise PathNotFoundError(
            f"ImageFolder root {root!r} does not exist or is not a directory. Set cfg.root to a "
            f"folder laid out as <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg."
        )
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        present = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise PathNotFoundError(
            f"Split folder {split_dir!r} not found (sub-folders of the root: {present}). "
            f"Create it with one sub-folder per class, or point cfg.train_split / cfg.val_split "
            f"at the right folder name."
        )
    key = (split_dir, os.stat(split_dir).st_mtime_ns)
    with _SCAN_LOCK:
        hit = _SCAN_CACHE.get(key)
    if hit is not None:
        return hit
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DataError(
            f"Split folder {split_dir!r} contains no class sub-folders, so it has no images. "
            f"Put the images in {split_dir}/<class_name>/ (one folder per class, as for "
            f"torchvision ImageFolder); a flat folder of images is not supported."
        )
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for idx, cls in enumerate(classes):
        cls_dir = os.path.join(split_dir, cls)
        n0 = len(paths)
        for dirpath, _, fnames in sorted(os.walk(cls_dir, followlinks=True)):
            for fname in sorted(fnames):
                if _is_image_file(fname):
                    paths.append(os.path.join(dirpath, fname))
                    labels.append(idx)
        if len(paths) == n0:
            empty.append(cls)
    if not paths:
        raise DataError(
            f"Split {split_dir!r} has {len(classes)} class folders but no image files "
            f"(extensions {', '.join(IMG_EXTENSIONS)}). Copy the images into the class folders."
        )
    if empty:
        shown = ", ".join(os.path.join(split_dir, c) for c in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise DataError(
            f"{len(empty)} class folder(s) of split {split_dir!r} contain no image files: "
            f"{shown}{more}. Every class needs at least one image (as in torchvision ImageFolder); "
            f"remove the empty folders from every split or add images."
        )
    result = (classes, paths, np.asarray(labels, np.int32))
    with _SCAN_LOCK:
        _SCAN_CACHE[key] = result
    return result


class ImageFolderSource:
    """``<root>/<split>/<class>/*`` read with PIL."""

    def __init__(self, root: str, split: str):
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.split = split
        self.classes, self.paths, self.labels = scan_image_folder(self.root, split)

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> tuple[Image.Image, int]:
        return decode_image(self.paths[index]), int(self.labels[index])


# ----------------------------------------------------------------------------------------------
# TFDS (ArrayRecord, read with tfds.data_source: works without TensorFlow)
# ----------------------------------------------------------------------------------------------
class TfdsSource:
    """A TFDS dataset already prepared on disk in the ArrayRecord format.

    Records need an ``'image'`` feature (encoded bytes or a uint8 array) and an integer
    ``'label'``.  ``tensorflow_datasets`` is imported here only, lazily; it never imports
    TensorFlow for ``data_source`` reads.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        if not name:
            raise ConfigError("cfg.tfds_name is empty; set it to the TFDS dataset name, e.g. 'imagenet2012'.")
        import tensorflow_datasets as tfds  # lazy: only this source needs it

        self.name, self.split, self.data_dir = name, split, data_dir
        decoders = None
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:
            raise PathNotFoundError(
                f"TFDS dataset {name!r} not found (data_dir={data_dir!r}): {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                f"Prepare it first with file_format=array_record (see docs_data_readme.md) and "
                f"set cfg.tfds_data_dir to the folder that contains {name}/."
            ) from e
        info = builder.info
        if not info.splits:
            raise PathNotFoundError(
                f"TFDS dataset {name!r} is not prepared under data_dir={data_dir!r} (no splits on "
                f"disk). Prepare it first with file_format='array_record' (tfds build {name} "
                f"--file_format=array_record --data_dir=...; see docs_data_readme.md) and set "
                f"cfg.tfds_data_dir to the folder that contains {name}/."
            )
        if "image" not in info.features or "label" not in info.features:
            raise DataError(
                f"TFDS dataset {name!r} has features {list(info.features)}; the pipeline needs "
                f"'image' and 'label'."
            )
        if type(info.features["image"]).__name__ == "Image":
            # Keep the encoded bytes: this module decodes them (bad-data handling, CMYK, ...).
            decoders = {"image": tfds.decode.SkipDecoding()}
        if split not in info.splits:
            raise DataError(
                f"TFDS dataset {name!r} has no split {split!r} (splits: {sorted(info.splits)}). "
                f"Set cfg.train_split / cfg.val_split (imagenet2012 calls its validation split "
                f"'validation')."
            )
        try:
            self._ds = tfds.data_source(
                name, split=split, data_dir=data_dir, download=False, decoders=decoders
            )
        except Exception as e:
            raise PathNotFoundError(
                f"Could not open TFDS split {name}/{split} under data_dir={data_dir!r} with "
                f"tfds.data_source: {type(e).__name__}: {e}. The dataset must be prepared on disk "
                f"with file_format='array_record' (tfds build {name} --file_format=array_record "
                f"--data_dir=...); TFRecord files cannot be read without TensorFlow."
            ) from e
        self.classes_from_labels = False
        n = len(self._ds)
        if n == 0:
            raise DataError(f"TFDS split {name}/{split} (data_dir={data_dir!r}) has no examples.")
        label = info.features["label"]
        names = getattr(label, "names", None)
        num_classes = getattr(label, "num_classes", None)
        if names:
            self.classes = list(names)
        elif num_classes:
            self.classes = [str(i) for i in range(num_classes)]
        else:
            # A plain integer label (no ClassLabel): derive the class count from the labels.
            log.warning("TFDS %s/%s: 'label' is not a ClassLabel; reading all %d labels to count "
                        "the classes.", name, split, n)
            top = max(int(self._ds[i]["label"]) for i in range(n))
            self.classes = [str(i) for i in range(top + 1)]
            self.classes_from_labels = True
        self._len = n

    def __len__(self) -> int:
        return self._len

    def key(self, index: int) -> str:
        return f"{self.name}/{self.split}[{index}]"

    def load(self, index: int) -> tuple[Image.Image, int]:
        try:
            rec = self._ds[index]
        except Exception as e:
            raise BadExample(f"reading record failed: {type(e).__name__}: {e}") from e
        img = rec["image"]
        if isinstance(img, np.ndarray) and img.dtype == object:
            img = img.item()
        return decode_image(img), int(rec["label"])


# ----------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------
DIGITS_NUM_VAL = 297
DIGITS_SPLIT_SEED = 0
_DIGITS: dict[str, Any] = {}


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    if "images" not in _DIGITS:
        from sklearn.datasets import load_digits

        d = load_digits()
        # 0..16 -> 0..255, rounded; grey -> RGB by repeating the channel.
        grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
        _DIGITS["images"] = np.repeat(grey[..., None], 3, axis=-1)
        _DIGITS["labels"] = d.target.astype(np.int32)
    return _DIGITS["images"], _DIGITS["labels"]


class DigitsSource:
    """scikit-learn's bundled 8x8 digits as uint8 RGB: 1500 train / 297 val.

    The split is fixed: ``np.random.default_rng(0).permutation(1797)``, first 1500 = train,
    last 297 = val.  The split name 'validation' is accepted as an alias of 'val'.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str):
        images, labels = _digits_arrays()
        perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
        n_train = len(images) - DIGITS_NUM_VAL
        if split == "train":
            idx = perm[:n_train]
        elif split in ("val", "validation", "test"):
            idx = perm[n_train:]
        else:
            raise ConfigError(f"digits has splits 'train' and 'val', got {split!r}")
        self.split = split
        self.images = images[idx]
        self.labels = labels[idx]

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, index: int) -> str:
        return f"digits/{self.split}[{index}]"

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], "RGB"), int(self.labels[index])
