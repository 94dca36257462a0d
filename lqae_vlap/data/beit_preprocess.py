"""BEiT's image preprocessing in NumPy / PIL, matching transformers' ``BeitImageProcessor`` as
microsoft/beit-base-patch16-224-pt22k configures it (what the VLAP authors load with
``AutoImageProcessor.from_pretrained``).

That checkpoint's processor was saved by HF's conversion script as
``BeitFeatureExtractor(size=224, resample=Image.BILINEAR, do_center_crop=False)``: the image is
resized to ``size`` x ``size`` (aspect ratio NOT kept, no crop), bilinear, then
``(x / 255 - 0.5) / 0.5``. (BeitImageProcessor's own defaults differ only in the filter: bicubic.)

Two halves, as for CLIP (``data/clip_preprocess.py``), so images stay uint8 until the model:
  ``beit_resize``: host side, PIL. uint8 in, uint8 out.
  ``beit_normalize``: uint8 -> float32 in [-1, 1]; only ``astype`` and arithmetic, so it runs
      on NumPy or inside a jitted step on JAX arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from lqae_vlap.data import clip_preprocess

BEIT_MEAN = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN in transformers
BEIT_STD = (0.5, 0.5, 0.5)
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# microsoft/beit-base-patch16-224-pt22k's preprocessor_config.json: resample 2 = PIL bilinear.
PT22K_RESAMPLE = "bilinear"


def beit_resize(image: Any, size: int = 224, resample: str = "bilinear") -> np.ndarray:
    """Resize to ``size`` x ``size`` with PIL's ``resample`` filter ('bilinear' for pt22k).

    image: [H, W, 3] uint8 (greyscale [H, W], RGBA and PIL images are converted to RGB)
    -> [size, size, 3] uint8.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[2] not in (3, 4):
        raise ValueError(f"BEiT preprocessing expects a uint8 image [height, width, 3], got dtype "
                         f"{image.dtype} shape {image.shape}; decode to RGB first (PIL: "
                         "np.asarray(img.convert('RGB'))).")
    if resample not in RESAMPLE:
        raise ValueError(f"beit_resize: resample={resample!r} is not known; use one of "
                         f"{sorted(RESAMPLE)}")
    if size <= 0:
        raise ValueError(f"beit_resize: size must be positive, got {size}")
    image = image[:, :, :3]  # RGBA -> RGB by dropping alpha, as PIL's convert('RGB') does
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), RESAMPLE[resample]))
    return np.ascontiguousarray(image)


def beit_normalize(images: Any) -> Any:
    """uint8 pixels -> float32 BEiT input ``(x / 255 - 0.5) / 0.5`` per channel.

    Works on NumPy and JAX arrays alike. images: [..., H, W, 3] uint8 -> [..., H, W, 3] float32.
    """
    return clip_preprocess.normalize(images, BEIT_MEAN, BEIT_STD, "beit_normalize", "beit_resize")


def beit_preprocess(image: Any, size: int = 224, resample: str = "bilinear") -> np.ndarray:
    """One decoded image -> the model's float32 input [size, size, 3] (channels last)."""
    return beit_normalize(beit_resize(image, size, resample))
