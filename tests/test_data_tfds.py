"""TFDS source without TensorFlow: a tiny ArrayRecord dataset is built with a project-local
GeneratorBasedBuilder (environment.md §1b) and read back through ``tfds.data_source``."""
from __future__ import annotations

import importlib
import io
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("importlib_resources", reason="tfds download_and_prepare needs importlib_resources")

import alphanet_jax.data as D  # noqa: E402
from alphanet_jax.data import transforms as T  # noqa: E402

BUILDER_MODULE = textwrap.dedent(
    '''
    """Tiny datasets for the pipeline tests (written by tests/test_data_tfds.py)."""
    import io

    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image


    def photo():
        import skimage.data
        return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((48, 48)))


    def encoded(i, n):
        """JPEG bytes, with a CMYK JPEG, a grey JPEG, a PNG and one garbage record mixed in."""
        a = photo()[i % 7 : i % 7 + 30 + i % 5, 2 * (i % 4) : 2 * (i % 4) + 33]
        b = io.BytesIO()
        kind = i % 6
        if kind == 1:
            Image.fromarray(a).convert("CMYK").save(b, "JPEG")
        elif kind == 2:
            Image.fromarray(a).convert("L").save(b, "JPEG")
        elif kind == 3:
            Image.fromarray(a).save(b, "PNG")
        else:
            Image.fromarray(a).save(b, "JPEG", quality=90)
        data = b.getvalue()
        if i == n - 2:
            data = b"\\xff\\xd8\\xff\\xe0 not really a jpeg"
        return data


    class PipelineTestJpeg(tfds.core.GeneratorBasedBuilder):
        """Encoded images in an Image feature (like imagenet2012)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c", "d"]),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(26), "validation": self._generate_examples(11)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": encoded(i, n), "label": i % 4}


    class PipelineTestArray(tfds.core.GeneratorBasedBuilder):
        """uint8 arrays in a Tensor feature (the TF-free way to store decoded pixels)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(20, 24, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 12), "validation": self._generate_examples(100, 5)}

        def _generate_examples(self, start, n):
            p = photo()
            for i in range(n):
                yield i, {"image": p[i : i + 20, i : i + 24], "label": (start + i) % 3}
    '''
)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    mod_dir = tmp_path_factory.mktemp("tfds_module")
    (mod_dir / "alphanet_pipeline_test_tfds.py").write_text(BUILDER_MODULE)
    data_dir = str(tmp_path_factory.mktemp("tfds_data"))
    sys.path.insert(0, str(mod_dir))
    try:
        mod = importlib.import_module("alphanet_pipeline_test_tfds")
        tfds.disable_progress_bar()
        for cls in (mod.PipelineTestJpeg, mod.PipelineTestArray):
            cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
    finally:
        sys.path.remove(str(mod_dir))
    assert "tensorflow" not in sys.modules
    return data_dir, mod


def cfg_for(data_dir, name, **kw):
    cfg = D.default_config("tfds")
    cfg.tfds_name = name
    cfg.tfds_data_dir = data_dir
    cfg.image_size = 16
    cfg.resize_size = 20
    cfg.num_workers = 2
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_tfds_info_and_records(tfds_dir):
    data_dir, mod = tfds_dir
    info = D.dataset_info(cfg_for(data_dir, "pipeline_test_jpeg"))
    assert info["num_train"] == 26 and info["num_val"] == 11 and info["num_classes"] == 4
    assert info["class_names"] == ["a", "b", "c", "d"] and info["val_split"] == "validation"
    info = D.dataset_info(cfg_for(data_dir, "pipeline_test_array"))
    assert (info["num_train"], info["num_val"], info["num_classes"]) == (12, 5, 3)


def test_tfds_encoded_images_decoded_by_pil(tfds_dir):
    data_dir, mod = tfds_dir
    src = D.open_source(D.resolve_config(cfg_for(data_dir, "pipeline_test_jpeg")), "train")
    raw = tfds.data_source("pipeline_test_jpeg", split="train", data_dir=data_dir, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    bad = 0
    for i in range(len(src)):
        data = raw[i]["image"]
        try:
            exp = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception:
            bad += 1
            with pytest.raises(D.BadExample):
                src.load(i)
            continue
        img, label = src.load(i)
        assert img.mode == "RGB" and label == raw[i]["label"]
        np.testing.assert_array_equal(np.asarray(img), exp)
    assert bad == 1


def test_tfds_train_iterator_counts_bad_record(tfds_dir):
    data_dir, _ = tfds_dir
    cfg = cfg_for(data_dir, "pipeline_test_jpeg")
    it = D.make_train_iterator(cfg, batch_size=13, seed=0)
    b = [next(it), next(it)]
    assert it.epoch == 1 and it.stats["bad_examples"] == 1
    assert b[0]["image"].shape == (13, 16, 16, 3) and b[0]["label"].dtype == np.int32
    it0 = D.make_train_iterator(cfg_for(data_dir, "pipeline_test_jpeg", num_workers=0), batch_size=13, seed=0)
    np.testing.assert_array_equal(next(it0)["image"], b[0]["image"])


def test_tfds_eval_iterator_exact_counts(tfds_dir):
    data_dir, _ = tfds_dir
    cfg = cfg_for(data_dir, "pipeline_test_array")
    src = D.open_source(D.resolve_config(cfg), "val")
    total = 0
    imgs = []
    for p in range(2):
        ev = D.make_eval_iterator(cfg, batch_size=2, process_index=p, process_count=2)
        bs = list(ev)
        assert len(bs) == 2  # ceil(ceil(5 / 2) / 2)
        total += sum(int(b["mask"].sum()) for b in bs)
        imgs += [b["image"][b["mask"]] for b in bs]
    assert total == 5
    exp = np.stack([T.val_transform(src.load(i)[0], image_size=16, resize_size=20) for i in range(5)])
    np.testing.assert_array_equal(np.concatenate(imgs), exp)
    # array records round-trip exactly
    raw = tfds.data_source("pipeline_test_array", split="validation", data_dir=data_dir, download=False)
    np.testing.assert_array_equal(np.asarray(src.load(3)[0]), raw[3]["image"])


def test_tfds_errors(tfds_dir, tmp_path):
    data_dir, _ = tfds_dir
    with pytest.raises(FileNotFoundError, match="array_record"):
        D.dataset_info(cfg_for(str(tmp_path), "pipeline_test_jpeg"))
    with pytest.raises(ValueError, match="no split 'val'"):
        D.dataset_info(cfg_for(data_dir, "pipeline_test_jpeg", val_split="val"))
    with pytest.raises(ValueError, match="tfds_name"):
        D.dataset_info(cfg_for(data_dir, ""))
