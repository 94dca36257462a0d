"""CLIP's image preprocessing in NumPy / PIL, matching transformers' ``CLIPImageProcessor``.

Two halves, so the data pipeline can keep images as uint8 until the model's door (see
``data/preprocess.py``):
  ``clip_resize_crop``: host side, PIL. Resize so the SHORTER side is ``size`` (bicubic, the longer
      side ``int(size * long / short)``, truncated as HF does), then center crop ``crop`` x ``crop``
      with the top-left corner at ``((H - crop) // 2, (W - crop) // 2)``. uint8 in, uint8 out.
  ``clip_normalize``: uint8 -> float32 ``(x / 255 - mean) / std`` with OpenAI CLIP's statistics.
      Only ``astype`` and arithmetic, so it runs on NumPy or inside a jitted step on JAX arrays.
``clip_preprocess`` chains both for one image.

OpenAI's own ``clip.load`` pipeline (torchvision ``Resize`` + ``CenterCrop``) rounds the crop offset
instead of flooring it; for odd margins it can be one pixel off HF's, which is what we follow since
transformers' CLIP is this project's parity reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:  # greyscale: CLIP wants RGB (HF's do_convert_rgb does the same)
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"CLIP preprocessing expects a uint8 image [height, width, 3], got dtype {image.dtype} "
            f"shape {image.shape}; decode to RGB first (PIL: np.asarray(img.convert('RGB'))).")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:  # RGBA -> RGB by dropping alpha, as PIL's convert('RGB') does
        image = image[:, :, :3]
    return image


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) with the shorter side = size and the longer one truncated (HF)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def clip_resize_crop(image: Any, size: int = 224, crop: int = 224) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), then a centered ``crop`` x ``crop`` window.

    image: [H, W, 3] uint8 (a PIL image is accepted too) -> [crop, crop, 3] uint8.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = _check_image(image)
    if size <= 0 or crop <= 0:
        raise ValueError(f"size and crop must be positive, got size={size} crop={crop}")
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, size)
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    if top < 0 or left < 0:
        # Only when crop > size: HF zero-pads here; silently changing the field of view would hide
        # a misconfiguration, so refuse.
        raise ValueError(f"crop {crop} is larger than the resized image {new_h}x{new_w}; "
                         f"use crop <= size (CLIP uses size = crop = 224)")
    return np.ascontiguousarray(image[top:top + crop, left:left + crop])


def clip_normalize(images: Any) -> Any:
    """uint8 pixels -> float32 CLIP input: (x / 255 - mean) / std per channel.

    Works on NumPy and JAX arrays alike. images: [..., H, W, 3] uint8 -> [..., H, W, 3] float32.
    """
    return normalize(images, CLIP_MEAN, CLIP_STD, "clip_normalize", "clip_resize_crop")


def normalize(images: Any, mean: Any, std: Any, who: str, resize: str) -> Any:
    """uint8 pixels -> float32 ``(x / 255 - mean) / std`` per channel (CLIP's, BEiT's).

    NumPy or JAX arrays. images: [..., H, W, 3] uint8; who / resize: the caller and its host-side
    resize, named in the error.
    """
    dtype = getattr(images, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.uint8 or images.shape[-1] != 3:
        raise ValueError(
            f"{who} expects uint8 RGB pixels [..., H, W, 3], got dtype {dtype} shape "
            f"{getattr(images, 'shape', None)}; use {resize} on decoded uint8 images first")
    # Folding 1/255 into the affine map keeps it to one multiply-add per pixel.
    scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    shift = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
    return images.astype(np.float32) * scale + shift


def clip_preprocess(image: Any, size: int = 224, crop: int = 224) -> np.ndarray:
    """One decoded image -> the model's float32 input [crop, crop, 3] (channels last)."""
    return clip_normalize(clip_resize_crop(image, size, crop))
