"""Iterators of the input pipeline on scikit-learn's digits: shapes, determinism, resume,
multi-host sharding, exact eval counts, prefetch, config handling."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

import alphanet_jax.data as D
from alphanet_jax.data import transforms as T
from alphanet_jax.data.sources import DigitsSource


def digits_cfg(**kw):
    cfg = D.default_config("digits")
    cfg.num_workers = 2
    cfg.image_size = 16
    cfg.resize_size = 18
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------------------------------------
# Source and info
# --------------------------------------------------------------------------------------------
def test_digits_source_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    tr, va = DigitsSource("train"), DigitsSource("val")
    assert len(tr) == 1500 and len(va) == 297
    perm = np.random.default_rng(0).permutation(1797)
    grey = np.round(d.images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(tr.images[..., 0], grey[perm[:1500]])
    np.testing.assert_array_equal(va.images[..., 1], grey[perm[1500:]])
    np.testing.assert_array_equal(va.labels, d.target[perm[1500:]])
    assert tr.images.dtype == np.uint8 and tr.images.shape == (1500, 8, 8, 3)
    assert tr.images.max() == 255 and tr.images.min() == 0
    assert np.all(tr.images[..., 0] == tr.images[..., 2])
    img, label = tr.load(3)
    assert img.mode == "RGB" and img.size == (8, 8) and label == d.target[perm[3]]


def test_dataset_info_digits():
    info = D.dataset_info(D.default_config("digits"))
    assert info["num_classes"] == 10 and info["num_train"] == 1500 and info["num_val"] == 297
    assert info["image_size"] == 32 and info["class_names"] == [str(i) for i in range(10)]


def test_default_config_and_plain_dict():
    cfg = D.default_config("digits")
    assert (cfg.image_size, cfg.resize_size, cfg.augment, tuple(cfg.crop_scale)) == (32, 36, "autoaugment_v0", (0.08, 1.0))
    assert D.default_config("imagefolder").image_size == 224
    t = D.default_config("tfds")
    assert (t.val_split, t.tfds_name) == ("validation", "imagenet2012")
    cfg.tfds_data_dir = "/tmp/x"  # typed placeholder accepts a string
    spec = D.resolve_config({"source": "digits", "image_size": 8, "augment": "flip"})
    assert (spec.image_size, spec.resize_size, spec.augment, spec.interpolation) == (8, 36, "flip", "bicubic")
    it = D.make_train_iterator({"source": "digits", "image_size": 8, "num_workers": 0}, batch_size=4, seed=0)
    assert next(it)["image"].shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="augment"):
        D.resolve_config({"source": "digits", "augment": "randaugment"})
    with pytest.raises(ValueError, match="interpolation"):
        D.resolve_config({"source": "digits", "interpolation": "cubic-spline"})
    with pytest.raises(ValueError, match="source"):
        D.resolve_config({"source": "cifar"})


# --------------------------------------------------------------------------------------------
# Training iterator
# --------------------------------------------------------------------------------------------
def test_train_batches_shapes_dtypes_ranges():
    it = D.make_train_iterator(digits_cfg(), batch_size=32, seed=0)
    b = next(it)
    assert set(b) == {"image", "label"}
    assert b["image"].shape == (32, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    lo = ((0 - T.IMAGENET_MEAN) / T.IMAGENET_STD).min()
    hi = ((1 - T.IMAGENET_MEAN) / T.IMAGENET_STD).max()
    assert b["image"].min() >= lo - 1e-6 and b["image"].max() <= hi + 1e-6
    assert np.all((b["label"] >= 0) & (b["label"] < 10))
    assert it.steps_per_epoch == 1500 // 32 and it.epoch == 0
    assert it.stats == {"bad_examples": 0}


def test_digits_default_size_upsamples():
    cfg = D.default_config("digits")
    cfg.num_workers = 0
    b = next(D.make_train_iterator(cfg, batch_size=8, seed=3))
    assert b["image"].shape == (8, 32, 32, 3)


def test_train_batches_match_direct_transform():
    cfg = digits_cfg()
    it = D.make_train_iterator(cfg, batch_size=16, seed=7)
    b = next(it)
    src = DigitsSource("train")
    idx = it.epoch_indices(0)[:16]
    for k, i in enumerate(idx):
        np_rng, py_rng = D.example_rngs(7, 0, int(i))
        exp = T.train_transform(src.load(int(i))[0], image_size=16, np_rng=np_rng, py_rng=py_rng)
        np.testing.assert_array_equal(b["image"][k], exp)
        assert b["label"][k] == src.labels[i]


def test_determinism_and_independence_of_worker_count():
    a = take(D.make_train_iterator(digits_cfg(num_workers=0), batch_size=20, seed=1), 3)
    b = take(D.make_train_iterator(digits_cfg(num_workers=2), batch_size=20, seed=1), 3)
    c = take(D.make_train_iterator(digits_cfg(num_workers=3, prefetch_examples=7), batch_size=20, seed=1), 3)
    assert_batches_equal(a, b)
    assert_batches_equal(a, c)
    d = take(D.make_train_iterator(digits_cfg(num_workers=2), batch_size=20, seed=2), 1)
    assert not np.array_equal(a[0]["image"], d[0]["image"])


def test_epochs_reshuffle_and_augment_differently():
    cfg = digits_cfg(augment="none", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    it = D.make_train_iterator(cfg, batch_size=300, seed=0)
    assert it.steps_per_epoch == 5
    e0 = take(it, 5)
    assert it.epoch == 1 and it.get_state()["index"] == 0
    e1 = take(it, 5)
    labels0 = np.concatenate([b["label"] for b in e0])
    labels1 = np.concatenate([b["label"] for b in e1])
    assert not np.array_equal(labels0, labels1)
    np.testing.assert_array_equal(np.sort(labels0), np.sort(DigitsSource("train").labels))
    np.testing.assert_array_equal(np.sort(labels0), np.sort(labels1))
    assert not np.array_equal(it.epoch_indices(0), it.epoch_indices(1))


def test_resume_from_state_gives_same_following_batches():
    cfg = digits_cfg()
    it = D.make_train_iterator(cfg, batch_size=64, seed=3)  # 23 steps per epoch
    take(it, 21)
    state = it.get_state()
    json.dumps(state)  # JSON-able
    assert (state["epoch"], state["index"]) == (0, 21 * 64)
    ref = take(it, 5)  # crosses into epoch 1
    assert it.epoch == 1
    it2 = D.make_train_iterator(cfg, batch_size=64, seed=3, state=json.loads(json.dumps(state)))
    assert_batches_equal(ref, take(it2, 5))
    assert it2.get_state() == it.get_state()
    # set_state on a running iterator rewinds it
    it.set_state(state)
    assert_batches_equal(ref, take(it, 5))


def test_resume_with_different_batch_size_warns():
    it = D.make_train_iterator(digits_cfg(), batch_size=50, seed=0)
    take(it, 10)
    st = it.get_state()
    with pytest.warns(UserWarning, match="rescaled"):
        it2 = D.make_train_iterator(digits_cfg(), batch_size=100, seed=0, state=st)
    assert it2.get_state()["epoch"] == 0 and it2.get_state()["index"] == 500


def _identify(images: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index into ``table`` of each image (exact match)."""
    flat_t = table.reshape(len(table), -1)
    out = []
    for im in images.reshape(len(images), -1):
        hit = np.nonzero(np.all(flat_t == im, axis=1))[0]
        assert len(hit) == 1
        out.append(hit[0])
    return np.asarray(out)


def test_two_hosts_cover_each_example_exactly_once_per_epoch():
    # Deterministic transform (full-image crop, no flip) so each output identifies its source.
    cfg = digits_cfg(augment="none", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), image_size=8)
    src = DigitsSource("train")
    table = np.stack([T.to_normalized_array(src.load(i)[0]) for i in range(len(src))])
    hosts = [D.make_train_iterator(cfg, batch_size=75, seed=11, process_index=p, process_count=2) for p in range(2)]
    assert [h.steps_per_epoch for h in hosts] == [10, 10]  # 750 per host / 75
    for epoch in range(2):
        seen = []
        for h in hosts:
            batches = take(h, 10)
            ids = _identify(np.concatenate([b["image"] for b in batches]), table)
            np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), src.labels[ids])
            np.testing.assert_array_equal(ids, h.epoch_indices(epoch))
            seen.append(ids)
        assert len(np.intersect1d(seen[0], seen[1])) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(1500))
        assert all(h.epoch == epoch + 1 for h in hosts)


def test_three_hosts_disjoint_same_step_count():
    hosts = [D.make_train_iterator(digits_cfg(), batch_size=64, seed=0, process_index=p, process_count=3) for p in range(3)]
    assert {h.steps_per_epoch for h in hosts} == {500 // 64}
    idx = [set(h.epoch_indices(0).tolist()) for h in hosts]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    with pytest.raises(ValueError, match="process_index"):
        D.make_train_iterator(digits_cfg(), batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        D.make_train_iterator(digits_cfg(), batch_size=1000, seed=0, process_count=2)


# --------------------------------------------------------------------------------------------
# Eval iterator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,hosts", [(50, 1), (32, 2), (64, 4), (400, 2)])
def test_eval_exact_counts(batch, hosts):
    cfg = digits_cfg()
    src = DigitsSource("val")
    expected = np.stack([
        T.val_transform(src.load(i)[0], image_size=16, resize_size=18) for i in range(len(src))
    ])
    nb = None
    got_img, got_lab = [], []
    for p in range(hosts):
        ev = D.make_eval_iterator(cfg, batch_size=batch, process_index=p, process_count=hosts)
        batches = list(ev)
        assert len(batches) == len(ev)
        nb = len(batches) if nb is None else nb
        assert len(batches) == nb  # every host the same number of batches
        for b in batches:
            assert b["image"].shape == (batch, 16, 16, 3) and b["image"].dtype == np.float32
            assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
            assert np.all(b["image"][~b["mask"]] == 0)
            got_img.append(b["image"][b["mask"]])
            got_lab.append(b["label"][b["mask"]])
        assert ev.stats["bad_examples"] == 0
    assert nb == -(-(-(-297 // hosts)) // batch)
    got_img = np.concatenate(got_img)
    assert len(got_img) == 297  # each val example exactly once, in order, host shards contiguous
    np.testing.assert_array_equal(got_img, expected)
    np.testing.assert_array_equal(np.concatenate(got_lab), src.labels)


def test_eval_iterator_is_reiterable_and_train_split():
    ev = D.make_eval_iterator(digits_cfg(num_workers=0), batch_size=128, split="train")
    n1 = sum(int(b["mask"].sum()) for b in ev)
    n2 = sum(int(b["mask"].sum()) for b in ev)
    assert n1 == n2 == 1500 and ev.stats["num_examples"] == 1500


def test_calibration_iterator():
    cal = D.make_calibration_iterator(digits_cfg(), batch_size=40, seed=5)
    b = take(cal, 3)
    assert b[0]["image"].shape == (40, 16, 16, 3)
    assert not np.array_equal(b[0]["image"], b[1]["image"])
    assert_batches_equal(b, take(D.make_calibration_iterator(digits_cfg(), batch_size=40, seed=5), 3))
    assert cal.steps_per_epoch == 1500 // 40


# --------------------------------------------------------------------------------------------
# Prefetch helper
# --------------------------------------------------------------------------------------------
def test_prefetch_same_batches_and_state():
    it = D.make_train_iterator(digits_cfg(), batch_size=50, seed=0)
    ref = take(D.make_train_iterator(digits_cfg(), batch_size=50, seed=0), 4)
    pf = D.prefetch(it, 3)
    got = take(pf, 2)
    st = pf.get_state()
    assert st["index"] == 100  # not the read-ahead position
    got += take(pf, 2)
    assert_batches_equal(ref, got)
    pf.close()
    it2 = D.make_train_iterator(digits_cfg(), batch_size=50, seed=0, state=st)
    assert_batches_equal(ref[2:], take(it2, 2))


def test_prefetch_finite_and_errors():
    assert list(D.prefetch(iter(range(5)), 2)) == [0, 1, 2, 3, 4]

    def gen():
        yield 1
        raise KeyError("boom")

    pf = D.prefetch(gen(), 1)
    assert next(pf) == 1
    with pytest.raises(KeyError, match="boom"):
        next(pf)
    with pytest.raises(StopIteration):
        next(pf)
    pf = D.prefetch(iter(range(1000)), 2)
    next(pf)
    pf.close()  # stops the producer thread
    assert not pf._thread.is_alive()


# --------------------------------------------------------------------------------------------
# The training path never imports TensorFlow (nor tfds unless the tfds source is used)
# --------------------------------------------------------------------------------------------
def test_training_path_imports_no_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        import alphanet_jax.data as D
        cfg = D.default_config('digits'); cfg.num_workers = 2; cfg.image_size = 8
        it = D.make_train_iterator(cfg, batch_size=16, seed=0)
        next(it)
        list(D.make_eval_iterator(cfg, batch_size=100))
        D.dataset_info(cfg)
        bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'torch')]
        print('BAD', bad)
        assert not bad, bad
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------------------------
# Sharding arithmetic for arbitrary sizes (tiny synthetic source)
# --------------------------------------------------------------------------------------------
class _TinySource:
    """Image i is a 2x2 picture whose pixels encode i; label i % 7."""

    classes = [str(i) for i in range(7)]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def key(self, i):
        return f"tiny[{i}]"

    def load(self, i):
        a = np.zeros((2, 2, 3), np.uint8)
        a[..., 0], a[..., 1] = i % 256, i // 256
        return Image.fromarray(a), i % 7


def _ids(images):
    x = np.rint(images[..., 0, 0, :2] * T.IMAGENET_STD[:2] * 255 + T.IMAGENET_MEAN[:2] * 255).astype(int)
    return x[..., 0] + 256 * x[..., 1]



@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), batch=st.integers(1, 9), hosts=st.integers(1, 4))
def test_eval_sharding_any_size(n, batch, hosts):
    spec = D.resolve_config({"source": "digits", "image_size": 2, "resize_size": 2, "num_workers": 0})
    seen, counts = [], set()
    for p in range(hosts):
        ev = D.EvalIterator(spec, _TinySource(n), batch_size=batch, process_index=p, process_count=hosts)
        bs = list(ev)
        counts.add(len(bs))
        for b in bs:
            assert b["image"].shape[0] == batch
            seen.append(_ids(b["image"][b["mask"]]))
            np.testing.assert_array_equal(b["label"][b["mask"]], seen[-1] % 7)
    assert len(counts) == 1
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(n))  # each once, in order


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 60), batch=st.integers(1, 6), hosts=st.integers(1, 3), seed=st.integers(0, 2**40))
def test_train_sharding_any_size(n, batch, hosts, seed):
    if n // hosts < batch:
        return
    spec = D.resolve_config({"source": "digits", "image_size": 2, "augment": "none", "crop_scale": (1.0, 1.0),
                             "crop_ratio": (1.0, 1.0), "num_workers": 0})
    its = [D.TrainIterator(spec, _TinySource(n), batch_size=batch, seed=seed, process_index=p, process_count=hosts)
           for p in range(hosts)]
    steps = its[0].steps_per_epoch
    assert steps == (n // hosts) // batch and all(it.steps_per_epoch == steps for it in its)
    ids = [np.concatenate([_ids(next(it)["image"]) for _ in range(steps)]) for it in its]
    allids = np.concatenate(ids)
    assert len(np.unique(allids)) == len(allids) == hosts * steps * batch  # disjoint, no repeats
    for it, got in zip(its, ids):
        np.testing.assert_array_equal(got, it.epoch_indices(0))
        assert it.get_state()["epoch"] == 1
