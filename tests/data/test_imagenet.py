"""ImageNet path: crops and resizes on real photos, error messages, and TFDS array_record access.

ImageNet itself cannot be downloaded here; the preprocessing runs on scikit-learn's sample photos
(china.jpg, flower.jpg, 427x640) and the TFDS path on a tiny builder defined below.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from lqae_vlap.data.batches import IndexedBatches
from lqae_vlap.data.imagenet import decode_image, eval_crop, imagenet_preprocess, imagenet_source
from lqae_vlap.data.preprocess import center_crop, random_resized_crop_box


@pytest.fixture(scope="module")
def photos():
    return [np.asarray(p, np.uint8) for p in load_sample_images().images]


# --- an independent float64 model of PIL's antialiased bicubic resize ------------------------


def _cubic(x, a=-0.5):
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, inner, np.where(x < 2, outer, 0.0))


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] filter matrix: cubic kernel stretched by the reduction factor when shrinking."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - 2 * stretch + 0.5), 0)
        hi = min(int(centre + 2 * stretch + 0.5), n_in)
        j = np.arange(lo, hi)
        k = _cubic((j - centre + 0.5) / stretch)
        w[i, lo:hi] = k / k.sum()
    return w


def bicubic_ref(image: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    """Both pass orders, each rounded to 8 bits between passes as PIL's 8-bit path does."""
    x = image.astype(np.float64)
    wh, ww = _weights(image.shape[0], h), _weights(image.shape[1], w)
    rnd = lambda a: np.clip(np.rint(a), 0, 255)  # noqa: E731
    horiz = lambda a: np.einsum("ow,hwc->hoc", ww, a, optimize=True)  # noqa: E731
    vert = lambda a: np.einsum("oh,hwc->owc", wh, a, optimize=True)  # noqa: E731
    h_first = rnd(vert(rnd(horiz(x))))
    v_first = rnd(horiz(rnd(vert(x))))
    return [h_first, v_first]


def assert_close_to_bicubic(got: np.ndarray, image: np.ndarray) -> None:
    # Which pass PIL runs first is a Pillow detail; with the right order the fixed-point filter is
    # within 2 grey levels everywhere and off on well under 1% of pixels. A wrong filter (bilinear)
    # or a shifted crop misses by far more.
    refs = bicubic_ref(image, got.shape[0], got.shape[1])
    diffs = [np.abs(got.astype(np.float64) - r) for r in refs]
    best = min(diffs, key=lambda d: d.mean())
    assert best.max() <= 2 and best.mean() <= 0.01, (best.max(), best.mean())


# --- preprocessing --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 256])
def test_eval_crop_is_resize_shorter_side_then_center(photos, size):
    for photo in photos:
        got = eval_crop(photo, size)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        # 427x640 -> size x int(size * 640 / 427), then the central columns.
        long = int(size * 640 / 427)
        left = int(round((long - size) / 2.0))
        full = bicubic_ref(photo, size, long)
        refs = [r[:, left : left + size] for r in full]
        diffs = [np.abs(got.astype(np.float64) - r) for r in refs]
        best = min(diffs, key=lambda d: d.mean())
        assert best.max() <= 2 and best.mean() <= 0.01, (best.max(), best.mean())


def test_center_crop_offsets(photos):
    photo = photos[0]  # 427 x 640
    np.testing.assert_array_equal(center_crop(photo, 427), photo[:, 106:533])  # round(213/2) = 106
    np.testing.assert_array_equal(center_crop(photo[:, :428], 427), photo[0:427, 0:427])  # round(0.5) = 0
    with pytest.raises(ValueError, match="resize the shorter side"):
        center_crop(photo, 500)


def test_random_resized_crop_boxes_obey_scale_and_ratio():
    h, w = 427, 640
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    areas, aspects = [], []
    for seed in range(400):
        top, left, bh, bw = random_resized_crop_box(h, w, np.random.default_rng(seed), scale, ratio)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        areas.append(bh * bw / (h * w))
        aspects.append(bw / bh)
    areas, aspects = np.array(areas), np.array(aspects)
    # Rounding w and h to integers moves the area and aspect by at most ~1% at these sizes.
    assert areas.min() >= 0.2 * 0.99 and areas.max() <= 1.0
    assert aspects.min() >= 0.75 * 0.99 and aspects.max() <= 4 / 3 * 1.01
    # Uniform area fraction on [0.2, 1] (minus rejected boxes near 1): mean well inside.
    assert 0.45 < areas.mean() < 0.65
    # Same generator state, same box.
    assert random_resized_crop_box(h, w, np.random.default_rng(7)) == random_resized_crop_box(
        h, w, np.random.default_rng(7)
    )


def test_random_resized_crop_falls_back_to_a_clamped_centre_crop():
    # Scale 1 on a 1.5:1 photo with aspect at most 4/3: no box fits, so torchvision's fallback is
    # the full height, width round(427 * 4/3) = 569, centred.
    box = random_resized_crop_box(427, 640, np.random.default_rng(0), (1.0, 1.0), (3 / 4, 4 / 3))
    assert box == (0, (640 - 569) // 2, 427, 569)


def test_train_preprocess_whole_image_crop_and_flip(photos):
    photo = photos[1]
    size = 96
    # Scale 1 with the photo's own aspect ratio: the box is the whole photo, so the result is the
    # photo resized to size x size, mirrored on about half of the draws.
    whole_box = dict(scale=(1.0, 1.0), ratio=(640 / 427, 640 / 427))
    plain = imagenet_preprocess(size, train=True, flip=False, **whole_box)
    unflipped = plain({"image": photo, "label": 3}, np.random.default_rng(0))["image"]
    assert unflipped.shape == (size, size, 3) and unflipped.dtype == np.uint8
    assert_close_to_bicubic(unflipped, photo)
    assert not np.array_equal(unflipped, unflipped[:, ::-1])  # else flips would be invisible
    pre = imagenet_preprocess(size, train=True, **whole_box)
    flips = 0
    for seed in range(60):
        out = pre({"image": photo, "label": 3}, np.random.default_rng(seed))
        assert out["label"] == 3
        if np.array_equal(out["image"], unflipped):
            continue
        np.testing.assert_array_equal(out["image"], unflipped[:, ::-1])
        flips += 1
    # 60 fair coin flips: P(outside [15, 45]) < 1e-4, and the seeds are fixed anyway.
    assert 15 <= flips <= 45


def test_train_preprocess_is_deterministic_given_rng_and_eval_ignores_it(photos):
    photo = photos[0]
    pre = imagenet_preprocess(64, train=True)
    a = pre({"image": photo, "label": 1}, np.random.default_rng(5))["image"]
    b = pre({"image": photo, "label": 1}, np.random.default_rng(5))["image"]
    c = pre({"image": photo, "label": 1}, np.random.default_rng(6))["image"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ev = imagenet_preprocess(64, train=False)
    x = ev({"image": photo, "label": 1}, np.random.default_rng(0))["image"]
    np.testing.assert_array_equal(x, ev({"image": photo, "label": 1}, np.random.default_rng(1))["image"])
    np.testing.assert_array_equal(x, eval_crop(photo, 64))
    # Idempotent: an eval source that already cropped is left as it is.
    np.testing.assert_array_equal(ev({"image": x}, np.random.default_rng(0))["image"], x)


def test_decode_image_from_jpeg_bytes_and_greyscale():
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    decoded = decode_image(buf.getvalue())
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(decode_image(grey), np.repeat(grey[..., None], 3, -1))


# --- errors ---------------------------------------------------------------------------------


def test_missing_tensorflow_datasets_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        imagenet_source("train", data_dir=tmp_path, manual_dir=None, image_size=64, train=True)


def test_wrong_split_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown ImageNet split 'val'.*'validation'"):
        imagenet_source("val", data_dir=tmp_path, manual_dir=tmp_path, image_size=64, train=False)


def test_unprepared_without_tar_files_is_named(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder.*does not exist.*ILSVRC2012_img_train.tar"):
        imagenet_source("train", data_dir=tmp_path / "tfds", manual_dir=missing, image_size=64, train=True)
    empty = tmp_path / "downloads"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="lacks ILSVRC2012_img_val.tar.*readme.txt"):
        imagenet_source("validation", data_dir=tmp_path / "tfds", manual_dir=empty, image_size=64, train=False)
    with pytest.raises(FileNotFoundError, match="no manual_dir was given"):
        imagenet_source("train", data_dir=tmp_path / "tfds", manual_dir=None, image_size=64, train=True)
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build"):
        imagenet_source("train", data_dir=tmp_path / "tfds", image_size=64, train=True, prepare=False)


def test_preparing_without_tensorflow_is_named(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (manual / name).write_bytes(b"")

    def no_tensorflow(self, *args, **kwargs):  # what TFDS's ImageNet builder hits without TF
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_tensorflow)
    with pytest.raises(ImportError, match="needs the package 'tensorflow'.*pip install tensorflow"):
        imagenet_source("train", data_dir=tmp_path / "tfds", manual_dir=manual, image_size=64, train=True)


# --- the TFDS array_record path on a tiny builder --------------------------------------------


def _jpeg(i: int) -> bytes:
    # Real photo content, varied sizes, so decoding and cropping see JPEG data like ImageNet's.
    photo = load_sample_images().images[i % 2]
    crop = np.ascontiguousarray(photo[10 * i : 10 * i + 60 + 7 * i, 20 * i : 20 * i + 80])
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


NUM_TINY = 6


def _tiny_builder_class():
    tfds = pytest.importorskip("tensorflow_datasets")

    class LqaeTinyJpegImages(tfds.core.GeneratorBasedBuilder):
        """JPEG bytes in a Tensor(object) feature: tfds' Image feature needs TensorFlow to encode."""

        VERSION = tfds.core.Version("1.0.0")
        # tfds looks for the builder's code next to its module; under a dotted test package that
        # lookup needs the optional `importlib_resources`. A one-word module name skips it.
        __module__ = "lqae_tiny_tfds_builder"

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                        "label": tfds.features.ClassLabel(names=[f"class{i}" for i in range(NUM_TINY)]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(NUM_TINY)), "validation": self._generate_examples(range(2))}

        def _generate_examples(self, ids):
            for i in ids:
                yield i, {"image": _jpeg(i), "label": i}

    return tfds, LqaeTinyJpegImages


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tfds, cls = _tiny_builder_class()
    tfds.disable_progress_bar()
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_array_record_source_decodes_and_batches(tiny_dir):
    src = imagenet_source(
        "train", data_dir=tiny_dir, image_size=32, train=True, dataset_name="lqae_tiny_jpeg_images"
    )
    assert len(src) == NUM_TINY and src.class_names[0] == "class0" and src.num_classes == NUM_TINY
    # TFDS shuffles records on write; match examples to their source by label (label i <- _jpeg(i)).
    for k in range(len(src)):
        ex = src[k]
        i = int(ex["label"])
        want = np.asarray(Image.open(io.BytesIO(_jpeg(i))).convert("RGB"))
        np.testing.assert_array_equal(ex["image"], want)  # full size for the random crop
        assert ex["label"].dtype == np.int32
    batches = IndexedBatches(
        src, global_batch_size=4, seed=0, preprocess=imagenet_preprocess(32, train=True), num_workers=2
    )
    again = IndexedBatches(src, global_batch_size=4, seed=0, preprocess=imagenet_preprocess(32, train=True))
    b1, b2 = batches.batch_at(3), again.batch_at(3)
    assert b1["image"].shape == (4, 32, 32, 3) and b1["image"].dtype == np.uint8
    np.testing.assert_array_equal(b1["image"], b2["image"])
    batches.close()

    val = imagenet_source(
        "validation", data_dir=tiny_dir, image_size=24, train=False, dataset_name="lqae_tiny_jpeg_images"
    )
    assert len(val) == 2
    for k in range(2):
        ex = val[k]
        want = eval_crop(decode_image(_jpeg(int(ex["label"]))), 24)
        np.testing.assert_array_equal(ex["image"], want)
    # Eval examples are already [S, S, 3], so they batch without a preprocess.
    assert IndexedBatches(val, global_batch_size=2, seed=0).batch_at(0)["image"].shape == (2, 24, 24, 3)
    sliced = imagenet_source(
        "train[:4]", data_dir=tiny_dir, image_size=32, train=True, dataset_name="lqae_tiny_jpeg_images"
    )
    assert len(sliced) == 4
    with pytest.raises(ValueError, match="split 'test' not found.*available"):
        imagenet_source(
            "test", data_dir=tiny_dir, image_size=32, train=True, dataset_name="lqae_tiny_jpeg_images"
        )
