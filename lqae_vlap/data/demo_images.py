"""Real images that ship with the project's dependencies, for offline demos and CPU tests.

``DemoImages``: scikit-learn's handwritten digits (1,797 greyscale 8x8 scans, 17 grey levels, labels
0-9; ``sklearn.datasets.load_digits``), upsampled to ``image_size`` and replicated to RGB.
``DemoPhotos``: non-overlapping tiles of scikit-learn's two sample photographs (``china.jpg``, a
temple, and ``flower.jpg``; ``sklearn.datasets.load_sample_images``), for natural-image texture.

Both are random-access sources for ``IndexedBatches``: ``source[i] -> {'image': uint8 [S, S, 3],
'label': int32}``, with fixed, disjoint train/validation splits.
"""

from __future__ import annotations

import functools
import operator

import numpy as np
from PIL import Image

from lqae_vlap.data.indexing import check_index
from lqae_vlap.data.preprocess import resize_shorter_side

SPLITS = ("train", "validation")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A fixed contiguous hold-out: the last 297 scans (1797 - 1500), which hold 27-33 of every digit.
NUM_DIGITS_VALIDATION = 297
_DIGIT_LEVELS = 16.0  # load_digits stores ink counts 0..16 (a 4x4 block count of the 32x32 scan)
_RESAMPLE_F = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; demo images have splits {SPLITS}")


def _check_size(image_size: int, minimum: int = 1) -> int:
    size = operator.index(image_size)
    if size < minimum:
        raise ValueError(f"image_size must be an integer >= {minimum}, got {image_size}")
    return size


@functools.lru_cache(maxsize=8)
def _digits(image_size: int, resample: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # scikit-learn is a dependency; deferred for import time

    digits = load_digits()
    grey = digits.images.astype(np.float32) * np.float32(255.0 / _DIGIT_LEVELS)  # [N, 8, 8]
    # Resize in PIL's float mode: interpolating the 17 grey levels in uint8 first would round twice.
    method = _RESAMPLE_F[resample]
    big = np.stack(
        [np.asarray(Image.fromarray(g).resize((image_size, image_size), method)) for g in grey]
    )
    images = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)  # [N, S, S, 3]
    images.setflags(write=False)
    labels = digits.target.astype(np.int32)
    labels.setflags(write=False)
    return images, labels


class DemoImages:
    """sklearn's digits as RGB uint8 images: 1,500 train and 297 validation examples.

    Args:
      split: 'train' (the first 1,500 scans) or 'validation' (the last 297).
      image_size: output side S; the 8x8 scans are upsampled with ``resample``.
      resample: 'bilinear' (smooth strokes) or 'nearest' (exact SxS blocks when 8 divides S).
    """

    class_names: tuple[str, ...] = DIGIT_NAMES
    num_classes: int = len(DIGIT_NAMES)

    def __init__(self, split: str = "train", image_size: int = 16, resample: str = "bilinear") -> None:
        _check_split(split)
        self.image_size = _check_size(image_size)
        if resample not in _RESAMPLE_F:
            raise ValueError(f"unknown resample {resample!r}; choose one of {sorted(_RESAMPLE_F)}")
        self.split = split
        images, labels = _digits(self.image_size, resample)
        cut = len(images) - NUM_DIGITS_VALIDATION
        part = slice(0, cut) if split == "train" else slice(cut, None)
        # Read-only views: examples handed out cannot corrupt the shared cache.
        self.images: np.ndarray = images[part]  # [N, S, S, 3] uint8
        self.labels: np.ndarray = labels[part]  # [N] int32

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self), f"DemoImages({self.split!r})")
        return {"image": self.images[i], "label": self.labels[i]}


@functools.lru_cache(maxsize=4)
def _photo_tiles(image_size: int, grid_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_sample_images

    tiles, labels, columns = [], [], []
    for label, photo in enumerate(load_sample_images().images):  # each [427, 640, 3] uint8
        small = resize_shorter_side(np.asarray(photo, np.uint8), grid_rows * image_size, "bicubic")
        rows, cols = small.shape[0] // image_size, small.shape[1] // image_size
        for r in range(rows):
            for c in range(cols):
                tiles.append(small[r * image_size : (r + 1) * image_size, c * image_size : (c + 1) * image_size])
                labels.append(label)
                columns.append(c)
    out = (np.stack(tiles), np.asarray(labels, np.int32), np.asarray(columns))
    for a in out:
        a.setflags(write=False)
    return out


class DemoPhotos:
    """Tiles of scikit-learn's two sample photos; label 0 = 'china', 1 = 'flower'.

    Each photo is scaled so its shorter side is ``grid_rows * image_size`` and cut into
    non-overlapping ``image_size`` tiles (8 x 11 per 427x640 photo with the default 8 rows). Validation is
    the rightmost tile column of each photo, train the rest; tiles never overlap across splits.
    """

    class_names: tuple[str, ...] = ("china", "flower")
    num_classes: int = 2

    def __init__(self, split: str = "train", image_size: int = 32, grid_rows: int = 8) -> None:
        _check_split(split)
        self.image_size = _check_size(image_size)
        grid_rows = _check_size(grid_rows)
        self.split = split
        tiles, labels, columns = _photo_tiles(self.image_size, grid_rows)
        last = columns.max()
        keep = columns == last if split == "validation" else columns != last
        self.images: np.ndarray = tiles[keep]  # [N, S, S, 3] uint8
        self.labels: np.ndarray = labels[keep]  # [N] int32

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self), f"DemoPhotos({self.split!r})")
        return {"image": self.images[i], "label": self.labels[i]}
