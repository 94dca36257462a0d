"""Demo image sources (sklearn digits and sample photos)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits, load_sample_images

from lqae_vlap.data.batches import IndexedBatches
from lqae_vlap.data.demo_images import DemoImages, DemoPhotos


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images.astype(np.float64), d.target


def bilinear_upsample_ref(images: np.ndarray, size: int) -> np.ndarray:
    """Textbook bilinear (half-pixel centres, edges clamped) in float64. images: [N, h, w]."""
    n, h, w = images.shape

    def axis(n_in):
        x = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo

    r0, r1, fr = axis(h)
    c0, c1, fc = axis(w)
    rows = images[:, r0] * (1 - fr)[None, :, None] + images[:, r1] * fr[None, :, None]
    return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc


def test_sizes_dtypes_labels_and_split(digits):
    grey, target = digits
    train, val = DemoImages("train", 16), DemoImages("validation", 16)
    assert (len(train), len(val)) == (1500, 297)
    ex = train[0]
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].dtype == np.int32
    # The split is the first 1500 / last 297 scans: disjoint and together all of sklearn's digits.
    np.testing.assert_array_equal(np.concatenate([train.labels, val.labels]), target)
    assert train.class_names[:3] == ("zero", "one", "two") and len(train.class_names) == 10
    assert set(np.unique(val.labels)) == set(range(10))
    # Deterministic across constructions.
    np.testing.assert_array_equal(DemoImages("validation", 16).images, val.images)
    assert val[-1]["label"] == target[-1]


def test_nearest_upsampling_is_exact_block_replication(digits):
    grey, _ = digits
    for size in (16, 32):
        imgs = DemoImages("validation", size, resample="nearest").images
        k = size // 8
        want = np.rint(np.kron(grey[1500:], np.ones((k, k))) * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(imgs[..., 0], want)
        # Greyscale replicated into three identical channels.
        np.testing.assert_array_equal(imgs[..., 1], imgs[..., 0])
        np.testing.assert_array_equal(imgs[..., 2], imgs[..., 0])


def test_bilinear_upsampling_matches_float64_reference(digits):
    grey, _ = digits
    imgs = DemoImages("train", 32).images[..., 0].astype(np.float64)
    want = bilinear_upsample_ref(grey[:1500] * 255 / 16, 32)
    # PIL interpolates in float32 and we round to uint8 once: at most one grey level apart.
    assert np.abs(imgs - want).max() <= 1.0
    assert imgs.min() == 0 and imgs.max() == 255


def test_demo_photos_tiles():
    photos = load_sample_images().images
    train, val = DemoPhotos("train", 32), DemoPhotos("validation", 32)
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    # 427x640 -> 256x383: 8 rows x 11 columns per photo; the last column of each is validation.
    assert (len(train), len(val)) == (2 * 8 * 10, 2 * 8)
    assert np.bincount(train.labels).tolist() == [80, 80] and np.bincount(val.labels).tolist() == [8, 8]
    # Tiles are cut row-major from the photo scaled to 256x383 (an independent PIL call here).
    from PIL import Image

    small = np.asarray(Image.fromarray(photos[0]).resize((383, 256), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(train.images[0], small[0:32, 0:32])
    np.testing.assert_array_equal(train.images[11], small[32:64, 32:64])  # row 1, column 1
    np.testing.assert_array_equal(val.images[1], small[32:64, 320:352])  # row 1, last column
    # No tile appears in both splits.
    train_set = {t.tobytes() for t in train.images}
    assert not any(t.tobytes() in train_set for t in val.images)


def test_sources_batch_with_indexed_batches():
    batches = IndexedBatches(DemoImages("train", 16), global_batch_size=8, seed=0)
    b = batches.batch_at(0)
    assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        DemoImages("test")
    with pytest.raises(ValueError, match="image_size"):
        DemoImages("train", 0)
    with pytest.raises(ValueError, match="resample"):
        DemoImages("train", 16, resample="cubic")
    with pytest.raises(IndexError, match="out of range"):
        DemoImages("validation")[297]
    with pytest.raises(ValueError, match="unknown split"):
        DemoPhotos("val")
