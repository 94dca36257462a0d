"""Image preprocessing shared by every image source: resizes and crops.

Images travel through the data pipeline as uint8 ``[H, W, 3]`` (4x smaller than float32 in the
prefetch queue and on the host-to-device copy) and become float only at the model's door through
``ops/pixels.py``'s ``to_float`` (LQAE: in ``config.model.pixel_range``, [0, 1] as released).
The geometry follows torchvision's conventions on PIL images, which is what the LQAE release
used (``lqae/data/data.py``): ``RandomResizedCrop`` + ``RandomHorizontalFlip`` for training and
``Resize(shorter side) + CenterCrop`` for evaluation, bicubic, on PIL.

Every random choice draws from a ``np.random.Generator`` handed in by the caller, so the batch
iterator (``data/batches.py``) can make augmentation a pure function of (seed, example position).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"{where} expects a uint8 image [height, width, channels], got dtype {image.dtype} "
            f"shape {image.shape}; decode to an RGB uint8 array first (PIL: np.asarray(img.convert('RGB')))."
        )
    return image


def _resample(name: str) -> Image.Resampling:
    if name not in _RESAMPLE:
        raise ValueError(f"unknown resample {name!r}; choose one of {sorted(_RESAMPLE)}")
    return _RESAMPLE[name]


def resize(image: np.ndarray, height: int, width: int, resample: str = "bicubic") -> np.ndarray:
    """PIL resize of a uint8 image (antialiased when shrinking). image: [H, W, C] -> [height, width, C]."""
    image = _check_image(image, "resize")
    if image.shape[:2] == (height, width):
        return image
    channels = image.shape[2]
    size, method = (width, height), _resample(resample)
    if channels == 3:
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, method))
    # Other channel counts (PIL has no 2- or 5-channel 8-bit mode): one 'L' plane at a time, which
    # is the same per-band fixed-point filter the RGB path applies.
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c])).resize(size, method))
        for c in range(channels)
    ]
    return np.stack(planes, axis=-1)


def resize_shorter_side(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """Scales so the shorter side is ``size``, keeping the aspect ratio (torchvision ``Resize(int)``).

    The longer side is ``int(size * long / short)`` (truncated, as torchvision does).
    image: [H, W, C] -> [H', W', C] with min(H', W') == size.
    """
    image = _check_image(image, "resize_shorter_side")
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return resize(image, new_h, new_w, resample)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central ``size x size`` window; offsets rounded as torchvision's ``CenterCrop``.

    image: [H, W, C] with H, W >= size -> [size, size, C].
    """
    image = _check_image(image, "center_crop")
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(
            f"center_crop of {size}x{size} needs an image at least that large, got {h}x{w}; "
            "resize the shorter side to the crop size first (resize_shorter_side)."
        )
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image[top : top + size, left : left + size]


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """Samples a crop box as torchvision's ``RandomResizedCrop.get_params``: (top, left, h, w).

    Area fraction ~ U(scale), aspect w/h ~ log-uniform(ratio); ten tries, then a central crop with
    the aspect ratio clamped into ``ratio``. The box always lies inside the image.
    """
    if not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0.0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    resample: str = "bicubic",
) -> np.ndarray:
    """Crop a random box (:func:`random_resized_crop_box`) and resize it to ``size x size``.

    image: [H, W, C] uint8 -> [size, size, C] uint8.
    """
    image = _check_image(image, "random_resized_crop")
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return resize(image[top : top + h, left : left + w], size, size, resample)
