"""ImageFolder source: layout and labels, bad files (decoded or skipped and counted), and the
structural errors raised before training starts."""
from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

import alphanet_jax.data as D
from alphanet_jax.data import transforms as T
from alphanet_jax.data.sources import BadExample, ImageFolderSource, decode_image
from alphanet_jax.errors import DataError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((64, 64), Image.Resampling.BILINEAR))


def _jpeg_bytes(a: np.ndarray, mode: str = "RGB") -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).convert(mode).save(b, "JPEG", quality=90)
    return b.getvalue()


def _png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _good_tree(root, photo, classes=("cat", "dog", "fish"), n_train=3, n_val=2):
    for c, cls in enumerate(classes):
        for split, n in (("train", n_train), ("val", n_val)):
            for k in range(n):
                crop = photo[4 * k : 4 * k + 40 + 2 * c, 3 * c : 3 * c + 36 + k]
                _write(os.path.join(root, split, cls, f"{cls}_{k}.jpg"), _jpeg_bytes(crop))
    return root


BAD_FILES = ("dog/b_truncated.jpg", "fish/z_garbage.jpg")


@pytest.fixture
def messy(tmp_path, photo):
    """Good JPEGs plus each awkward case in the train split (and one broken val file)."""
    root = str(_good_tree(str(tmp_path / "ds"), photo))
    tr = os.path.join(root, "train")
    full = _jpeg_bytes(photo)
    _write(os.path.join(tr, "dog", "b_truncated.jpg"), full[: len(full) // 2])
    _write(os.path.join(tr, "dog", "c_cmyk.jpg"), _jpeg_bytes(photo[:30, :34], "CMYK"))
    _write(os.path.join(tr, "dog", "d_grey.jpg"), _jpeg_bytes(photo[:33, :31], "L"))
    _write(os.path.join(tr, "cat", "e_grey.png"), _png_bytes(Image.fromarray(photo[:20, :28]).convert("L")))
    pal = Image.fromarray(photo[10:40, 5:45]).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    _write(os.path.join(tr, "cat", "f_palette.png"), _png_bytes(pal, transparency=3))
    rgba = np.concatenate([photo[:26, :30], np.full((26, 30, 1), 128, np.uint8)], axis=-1)
    _write(os.path.join(tr, "fish", "g_rgba.png"), _png_bytes(Image.fromarray(rgba, "RGBA")))
    _write(os.path.join(tr, "fish", "h_png_named.jpg"), _png_bytes(Image.fromarray(photo[:35, :29])))
    _write(os.path.join(tr, "fish", "z_garbage.jpg"), np.random.default_rng(0).bytes(3000))
    _write(os.path.join(tr, "fish", "notes.txt"), b"not an image, ignored by extension")
    _write(os.path.join(tr, "cat", "nested", "i_sub.JPEG"), _jpeg_bytes(photo[:41, :37]))
    _write(os.path.join(root, "val", "cat", "zz_garbage.jpg"), b"\xff\xd8\xff\xe0 garbage")
    return root


def cfg_for(root, **kw):
    cfg = D.default_config("imagefolder")
    cfg.root = root
    cfg.image_size = 24
    cfg.resize_size = 28
    cfg.num_workers = 2
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
def test_layout_classes_and_labels(messy):
    src = ImageFolderSource(messy, "train")
    assert src.classes == ["cat", "dog", "fish"]
    rel = [os.path.relpath(p, os.path.join(messy, "train")) for p in src.paths]
    assert rel == [
        "cat/cat_0.jpg", "cat/cat_1.jpg", "cat/cat_2.jpg", "cat/e_grey.png", "cat/f_palette.png",
        "cat/nested/i_sub.JPEG",
        "dog/b_truncated.jpg", "dog/c_cmyk.jpg", "dog/d_grey.jpg", "dog/dog_0.jpg", "dog/dog_1.jpg", "dog/dog_2.jpg",
        "fish/fish_0.jpg", "fish/fish_1.jpg", "fish/fish_2.jpg", "fish/g_rgba.png", "fish/h_png_named.jpg",
        "fish/z_garbage.jpg",
    ]
    np.testing.assert_array_equal(src.labels, [0] * 6 + [1] * 6 + [2] * 6)
    info = D.dataset_info(cfg_for(messy))
    assert info["num_classes"] == 3 and info["num_train"] == 18 and info["num_val"] == 7
    assert info["class_names"] == ["cat", "dog", "fish"]


# --------------------------------------------------------------------------------------------
# Decoding each awkward file
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rel,mode",
    [("dog/c_cmyk.jpg", "CMYK"), ("dog/d_grey.jpg", "L"), ("cat/e_grey.png", "L"), ("cat/f_palette.png", "P"),
     ("fish/g_rgba.png", "RGBA"), ("fish/h_png_named.jpg", "RGB")],
)
def test_decodable_files_become_rgb(messy, rel, mode):
    path = os.path.join(messy, "train", rel)
    with Image.open(path) as raw:
        assert raw.mode == mode
        if rel.endswith("png_named.jpg"):
            assert raw.format == "PNG"
        exp = np.asarray(raw.convert("RGB"))
    img = decode_image(path)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), exp)
    with open(path, "rb") as f:  # same from bytes
        np.testing.assert_array_equal(np.asarray(decode_image(f.read())), exp)


def test_cmyk_colours_survive(messy, photo):
    got = np.asarray(decode_image(os.path.join(messy, "train", "dog", "c_cmyk.jpg"))).astype(int)
    assert np.abs(got - photo[:30, :34].astype(int)).mean() < 12  # JPEG loss only


@pytest.mark.parametrize("rel", BAD_FILES)
def test_undecodable_files_raise_bad_example(messy, rel):
    with pytest.raises(BadExample):
        decode_image(os.path.join(messy, "train", rel))


def test_decode_arrays_and_missing_file(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert decode_image(g).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decode_image(g[..., None]))[..., 2], g)
    with pytest.raises(BadExample):
        decode_image(np.zeros((3, 4, 2), np.uint8))
    with pytest.raises(BadExample):
        decode_image(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(BadExample):
        decode_image(str(tmp_path / "gone.jpg"))


# --------------------------------------------------------------------------------------------
# Bad files in the iterators
# --------------------------------------------------------------------------------------------
def test_train_skips_bad_files_counts_and_replaces_deterministically(messy, caplog):
    cfg = cfg_for(messy)
    src = ImageFolderSource(messy, "train")
    bad = {src.paths.index(os.path.join(messy, "train", r)) for r in BAD_FILES}
    with caplog.at_level(logging.WARNING, logger="alphanet_jax.data"):
        it = D.make_train_iterator(cfg, batch_size=18, seed=4)  # one batch = one epoch
        b0 = next(it)
        assert it.stats["bad_examples"] == 2
        b1 = next(it)
        assert it.stats["bad_examples"] == 4 and it.epoch == 2
    for epoch, b in ((0, b0), (1, b1)):
        order = it.epoch_indices(epoch)
        for k, idx in enumerate(order):
            j = int(idx)
            while j in bad:  # next good example in source order
                j = (j + 1) % len(src)
            np_rng, py_rng = D.example_rngs(4, epoch, int(idx))
            exp = T.train_transform(decode_image(src.paths[j]), image_size=24, np_rng=np_rng, py_rng=py_rng)
            np.testing.assert_array_equal(b["image"][k], exp)
            assert b["label"][k] == src.labels[j]
    msgs = [r.getMessage() for r in caplog.records]
    for r in BAD_FILES:  # one warning per bad file, naming it
        assert sum(os.path.join(messy, "train", r) in m for m in msgs) == 1
    # Same batches with another thread count
    again = D.make_train_iterator(cfg_for(messy, num_workers=0), batch_size=18, seed=4)
    np.testing.assert_array_equal(next(again)["image"], b0["image"])
    # the count survives a resume
    st = it.get_state()
    assert D.make_train_iterator(cfg, batch_size=18, seed=4, state=st).stats["bad_examples"] == 4


def test_eval_masks_bad_files(messy):
    cfg = cfg_for(messy)
    ev = D.make_eval_iterator(cfg, batch_size=4)
    batches = list(ev)
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(mask) == 8 and mask.sum() == 6  # 7 files, 1 bad, 1 padding
    src = ImageFolderSource(messy, "val")
    bad = src.paths.index(os.path.join(messy, "val", "cat", "zz_garbage.jpg"))
    assert not mask[bad] and mask[:7].sum() == 6
    assert ev.stats == {"bad_examples": 1, "num_examples": 6}
    imgs = np.concatenate([b["image"] for b in batches])
    for i in range(7):
        if i != bad:
            exp = T.val_transform(decode_image(src.paths[i]), image_size=24, resize_size=28)
            np.testing.assert_array_equal(imgs[i], exp)


def test_all_images_bad_raises(tmp_path):
    for split in ("train", "val"):
        _write(str(tmp_path / split / "a" / "x.jpg"), b"junk")
    it = D.make_train_iterator(cfg_for(str(tmp_path), num_workers=0), batch_size=1, seed=0)
    with pytest.raises(DataError, match="could be decoded"):
        next(it)


# --------------------------------------------------------------------------------------------
# Structural errors
# --------------------------------------------------------------------------------------------
def _raises_for_all_entry_points(cfg, exc, match):
    with pytest.raises(exc, match=match):
        D.dataset_info(cfg)
    with pytest.raises(exc, match=match):
        D.make_train_iterator(cfg, batch_size=2, seed=0)


def test_missing_root(tmp_path):
    missing = str(tmp_path / "nope")
    _raises_for_all_entry_points(cfg_for(missing), FileNotFoundError, "nope.*does not exist")
    with pytest.raises(ValueError, match="cfg.root is empty"):
        D.dataset_info(cfg_for(""))


def test_missing_split_folders(tmp_path, photo):
    root = _good_tree(str(tmp_path / "ds"), photo)
    os.rename(os.path.join(root, "val"), os.path.join(root, "validation"))
    _raises_for_all_entry_points(cfg_for(root), FileNotFoundError, r"ds/val' not found.*validation")
    # the fix: point val_split at the folder
    assert D.dataset_info(cfg_for(root, val_split="validation"))["num_val"] == 6
    os.rename(os.path.join(root, "train"), os.path.join(root, "training"))
    _raises_for_all_entry_points(cfg_for(root, val_split="validation"), FileNotFoundError, r"ds/train' not found")
    with pytest.raises(FileNotFoundError, match="not found"):
        D.make_eval_iterator(cfg_for(root), batch_size=2)


def test_split_without_images(tmp_path, photo):
    root = _good_tree(str(tmp_path / "ds"), photo)
    os.makedirs(os.path.join(root, "empty_split"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.make_eval_iterator(cfg_for(root), batch_size=2, split="empty_split")
    # class folders holding no image files at all
    for cls in ("a", "b"):
        _write(os.path.join(root, "txt_only", cls, "readme.txt"), b"x")
    with pytest.raises(ValueError, match="no image files"):
        D.make_eval_iterator(cfg_for(root), batch_size=2, split="txt_only")
    # flat folder of images without class folders
    _write(os.path.join(root, "flat", "img.jpg"), _jpeg_bytes(photo))
    with pytest.raises(ValueError, match="flat folder"):
        D.make_eval_iterator(cfg_for(root), batch_size=2, split="flat")


def test_empty_class_folder(tmp_path, photo):
    root = _good_tree(str(tmp_path / "ds"), photo)
    os.makedirs(os.path.join(root, "train", "zebra"))
    os.makedirs(os.path.join(root, "val", "zebra"))
    _raises_for_all_entry_points(cfg_for(root), ValueError, "train/zebra")


def test_class_mismatch_between_train_and_val(tmp_path, photo):
    root = _good_tree(str(tmp_path / "ds"), photo)
    _write(os.path.join(root, "train", "emu", "e.jpg"), _jpeg_bytes(photo))
    _raises_for_all_entry_points(cfg_for(root), ValueError, r"different classes.*only in train: \['emu'\]")
    _write(os.path.join(root, "val", "emu", "e.jpg"), _jpeg_bytes(photo))
    _write(os.path.join(root, "val", "yak", "y.jpg"), _jpeg_bytes(photo))
    _raises_for_all_entry_points(cfg_for(root), ValueError, r"only in val: \['yak'\]")
