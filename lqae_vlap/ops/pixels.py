"""Pixel values: uint8 [0, 255] <-> float32 [-1, 1], on the host (NumPy) or inside a jit (JAX).

Images stay uint8 through the data pipeline and become float only at the model's door, so these
two conversions are shared by the methods (on the device), the stand-in vision encoder and the
evaluations that write pictures.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_float(images: Any) -> Any:
    """uint8 pixels -> float32 in [-1, 1]: 0 -> -1.0, 255 -> +1.0 exactly.

    Works on NumPy and JAX arrays alike (only ``astype`` and arithmetic), so it can run on the host
    or inside a jitted step. images: [..., H, W, C] uint8 -> [..., H, W, C] float32.
    """
    dtype = getattr(images, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.uint8:
        raise TypeError(
            f"to_float expects uint8 pixels in [0, 255], got dtype {dtype}; images are kept as uint8 "
            "through the data pipeline, so convert at the source (e.g. np.asarray(img, np.uint8))."
        )
    # 127.5 is exact in float32, so 255 / 127.5 - 1 is exactly 1.
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images: Any) -> np.ndarray:
    """Inverse of :func:`to_float` for viewing reconstructions: float in [-1, 1] -> uint8.

    Values outside [-1, 1] (a decoder's overshoot) are clipped. images: [..., H, W, C].
    """
    x = np.asarray(images, dtype=np.float64)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
