"""Pixel values: uint8 [0, 255] <-> float32 in a range (default [-1, 1]), in NumPy or inside a jit.

Images stay uint8 through the data pipeline and become float only at the model's door, so these
two conversions are shared by the methods (on the device), the stand-in vision encoder and the
evaluations that write pictures. ``value_range`` is (low, high): 0 maps to low and 255 to high.
VLAP's stand-in uses the default (-1, 1); LQAE uses its ``config.model.pixel_range``, (0, 1) in the
paper config as in the released code (lqae/data/data.py ImageNetDataset: ToTensor, no mean/std).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SYMMETRIC = (-1.0, 1.0)


def check_range(value_range: Any, where: str = "value_range") -> tuple[float, float]:
    """(low, high) as floats with low < high, else a ValueError naming ``where``."""
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a pair (low, high) such as (0.0, 1.0), got "
                         f"{value_range!r}") from None
    if not np.isfinite(low) or not np.isfinite(high) or not low < high:
        raise ValueError(f"{where} must be a pair (low, high) with low < high, got {value_range!r}")
    return low, high


def to_float(images: Any, value_range: Any = SYMMETRIC) -> Any:
    """uint8 pixels -> float32 in value_range: 0 -> low and 255 -> high exactly.

    Works on NumPy and JAX arrays alike (only ``astype`` and arithmetic), so it can run on the host
    or inside a jitted step. images: [..., H, W, C] uint8 -> [..., H, W, C] float32.
    """
    dtype = getattr(images, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.uint8:
        raise TypeError(
            f"to_float expects uint8 pixels in [0, 255], got dtype {dtype}; images are kept as uint8 "
            "through the data pipeline, so convert at the source (e.g. np.asarray(img, np.uint8))."
        )
    low, high = check_range(value_range)
    # A division by 255 / (high - low) (127.5 for [-1, 1], 255 for [0, 1], both exact in
    # float32) makes 255 land on high exactly.
    return images.astype(np.float32) / np.float32(255.0 / (high - low)) + np.float32(low)


def to_uint8(images: Any, value_range: Any = SYMMETRIC) -> np.ndarray:
    """Inverse of :func:`to_float` for viewing reconstructions: float in value_range -> uint8.

    Values outside the range (a decoder's overshoot) are clipped. images: [..., H, W, C].
    """
    low, high = check_range(value_range)
    x = np.asarray(images, dtype=np.float64)
    return np.clip(np.rint((x - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def to_unit(images: Any, value_range: Any = SYMMETRIC) -> np.ndarray:
    """Float pixels in value_range -> float64 in [0, 1] (not clipped), e.g. for PSNR / SSIM."""
    low, high = check_range(value_range)
    return (np.asarray(images, dtype=np.float64) - low) / (high - low)
