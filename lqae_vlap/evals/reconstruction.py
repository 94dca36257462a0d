"""Reconstruction quality of an image autoencoder: PSNR, SSIM, codebook statistics, PNG grids.

All metrics run on the host in float64 NumPy on batches ``[B, H, W, C]``; evaluation sets are small
enough that exactness beats speed here.

SSIM follows Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error
visibility to structural similarity", with K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2 and
L = data_range. Local statistics are computed per channel over every window position that fits
entirely inside the image ("valid" positions, which is what scikit-image keeps after cropping its
border), then averaged over positions and channels. Two windows:
  * uniform (default, win_size=7): unweighted means with the unbiased (N-1) sample covariance,
    scikit-image's default;
  * gaussian=True: 11x11 Gaussian weights with sigma 1.5 and population (weighted) moments, the
    paper's setting (scikit-image ``gaussian_weights=True, use_sample_covariance=False``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lqae_vlap.core import files
from lqae_vlap.ops.pixels import to_uint8
from lqae_vlap.ops.quantize import codebook_usage, perplexity

K1, K2 = 0.01, 0.03
GAUSSIAN_WIN_SIZE, GAUSSIAN_SIGMA = 11, 1.5


def _pair(a: np.ndarray, b: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"{where} expects two [batch, height, width, channels] arrays of equal "
                         f"shape, got {a.shape} and {b.shape}; add a batch axis with x[None]")
    return a, b


def _check_range(data_range: float, where: str) -> float:
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"{where}: data_range must be a positive number (max - min of the pixel "
                         f"scale: 2.0 for [-1, 1], 255 for uint8), got {data_range}")
    return float(data_range)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> tuple[np.ndarray, float]:
    """Peak signal-to-noise ratio 10 log10(L^2 / MSE) per image, and its mean over the batch.

    a, b: [B, H, W, C]; the MSE is over each image's H*W*C values. Identical images give +inf.
    Returns (per_image [B] float64, mean float).
    """
    a, b = _pair(a, b, "psnr")
    data_range = _check_range(data_range, "psnr")
    mse = np.mean(np.square(a - b), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(data_range**2 / mse)
    return per_image, float(np.mean(per_image))


def _window(win_size: int, gaussian: bool) -> np.ndarray:
    """1-D normalised window weights [win_size]; the 2-D window is their outer product."""
    if gaussian:
        r = np.arange(win_size, dtype=np.float64) - (win_size - 1) / 2.0
        w = np.exp(-0.5 * (r / GAUSSIAN_SIGMA) ** 2)
    else:
        w = np.ones(win_size, dtype=np.float64)
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable weighted average over every full window: [B, H, W, C] -> [B, H-k+1, W-k+1, C]."""
    x = sliding_window_view(x, w.size, axis=1) @ w  # window axis appended last
    return sliding_window_view(x, w.size, axis=2) @ w


def ssim(a: np.ndarray, b: np.ndarray, data_range: float, win_size: int = 7,
         gaussian: bool = False) -> tuple[np.ndarray, float]:
    """Structural similarity (Wang et al. 2004) per image, and its mean over the batch.

    a, b: [B, H, W, C] on the same scale; data_range: L (2.0 for [-1, 1] images, 255 for uint8).
    win_size: odd side of the uniform window (ignored with gaussian=True, which uses 11, sigma 1.5).
    Returns (per_image [B] float64, mean float): the mean SSIM map over valid windows and channels.
    """
    a, b = _pair(a, b, "ssim")
    data_range = _check_range(data_range, "ssim")
    if gaussian:
        win_size = GAUSSIAN_WIN_SIZE
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size must be an odd integer >= 3, got {win_size}")
    if min(a.shape[1:3]) < win_size:
        raise ValueError(f"ssim: images of {a.shape[1]}x{a.shape[2]} are smaller than the "
                         f"{win_size}x{win_size} window; use a smaller win_size")
    w = _window(win_size, gaussian)
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    # E[xy] - E[x]E[y] is the population (weighted) covariance; the uniform window rescales it to
    # the unbiased sample covariance, as Wang et al.'s reference code and scikit-image do.
    scale = 1.0 if gaussian else win_size**2 / (win_size**2 - 1.0)
    var_a = scale * (_filter_valid(a * a, w) - mu_a**2)
    var_b = scale * (_filter_valid(b * b, w) - mu_b**2)
    cov = scale * (_filter_valid(a * b, w) - mu_a * mu_b)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    per_image = smap.mean(axis=(1, 2, 3))
    return per_image, float(per_image.mean())


def codebook_stats(indices: np.ndarray, vocab: int) -> dict[str, float]:
    """How much of the word vocabulary the quantizer uses. indices: [...] int codes in [0, vocab).

    Returns dict(usage=fraction of the vocab used at least once, perplexity=exp(entropy) of the
    empirical code distribution, i.e. the effective number of words used).
    """
    if int(vocab) != vocab or vocab < 1:
        raise ValueError(f"codebook_stats: vocab must be a positive integer, got {vocab}")
    idx = np.asarray(indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"codebook_stats: indices must be integer codes, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab):
        raise ValueError(f"codebook_stats: indices span [{idx.min()}, {idx.max()}], outside "
                         f"[0, {vocab}); pass the vocabulary size of the codebook")
    return {"usage": float(codebook_usage(idx, int(vocab))),
            "perplexity": float(perplexity(idx, int(vocab)))}


def png_grid(rows: Sequence[np.ndarray], path: str | os.PathLike, pad: int = 2,
             value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Writes rows of images as one PNG, e.g. [originals, reconstructions, LM-filled].

    rows: each [n, H, W, C] float in value_range (C = 1 or 3), all of the same shape; out-of-range
    values are clipped. pad: white pixels between images. Returns the grid, uint8 [rows*(H+pad)-pad,
    n*(W+pad)-pad, 3].
    """
    from PIL import Image

    if not rows:
        raise ValueError("png_grid needs at least one row of images")
    arrays = [np.asarray(r) for r in rows]
    shape = arrays[0].shape
    if len(shape) != 4 or shape[-1] not in (1, 3) or any(r.shape != shape for r in arrays):
        raise ValueError(f"png_grid: every row must be [n, H, W, C] with C in (1, 3) and the same "
                         f"shape, got {[r.shape for r in arrays]}")
    n, h, w, _ = shape
    grid = np.full((len(arrays) * (h + pad) - pad, n * (w + pad) - pad, 3), 255, np.uint8)
    for i, row in enumerate(arrays):
        pixels = np.broadcast_to(to_uint8(row, value_range), (n, h, w, 3))  # grey -> RGB
        for j in range(n):
            grid[i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = pixels[j]
    files.makedirs(os.path.dirname(files.normalize(path)))
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    files.write_bytes(path, buffer.getvalue())  # local or gs:// (core/files.py)
    return grid
