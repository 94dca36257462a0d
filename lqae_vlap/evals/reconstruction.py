"""Reconstruction quality of an image autoencoder: PSNR, SSIM and codebook statistics.

PSNR and SSIM are DeepMind's dm-pix (``dm_pix.psnr``, ``dm_pix.ssim``), run in float32 under
``jax.jit`` on batches ``[B, H, W, C]``; tests/evals/test_reconstruction.py checks them against
scikit-image and a float64 textbook loop. dm-pix assumes a pixel range of 1, so both images are
divided by ``data_range`` first (PSNR and SSIM with range L on x equal those with range 1 on x / L).

SSIM is Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error visibility
to structural similarity", as their reference code and dm-pix / tf.image.ssim compute it:
K1 = 0.01, K2 = 0.03, a Gaussian window (11 x 11, sigma 1.5) with population (weighted) moments,
over every window position that fits inside the image ("valid"), averaged over positions and
channels. Images smaller than 11 pixels (the tiny configs' 8 x 8 digits) need a smaller window:
``ssim_filter_size`` gives the largest odd size that fits, and the evaluation records it.
(The hand-written version this replaces defaulted to scikit-image's uniform 7 x 7 window with the
sample covariance, which reads a few hundredths higher or lower on the same images.)

The reconstruction pictures are evals/pictures.py's.
"""

from __future__ import annotations

import functools

import numpy as np

from lqae_vlap.ops.quantize import codebook_usage, perplexity

K1, K2 = 0.01, 0.03
FILTER_SIZE, FILTER_SIGMA = 11, 1.5  # Wang et al. (2004)


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


@functools.cache
def _jitted(name: str, **kw):
    """dm-pix's metric ``name`` with keyword arguments ``kw`` bound, jitted (one per setting)."""
    import dm_pix  # noqa: PLC0415  (imports jax; only when a metric is computed)
    import jax  # noqa: PLC0415

    return jax.jit(functools.partial(getattr(dm_pix, name), **kw))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> tuple[np.ndarray, float]:
    """Peak signal-to-noise ratio 10 log10(L^2 / MSE) per image, and its mean over the batch.

    a, b: [B, H, W, C]; the MSE is over each image's H*W*C values. Identical images give +inf.
    Returns (per_image [B] float64, mean float).
    """
    a, b = _pair(a, b, "psnr")
    data_range = _check_range(data_range, "psnr")
    scaled = [(x / data_range).astype(np.float32) for x in (a, b)]
    per_image = np.asarray(_jitted("psnr")(*scaled), np.float64)
    return per_image, float(np.mean(per_image))


def ssim_filter_size(height: int, width: int, largest: int = FILTER_SIZE) -> int:
    """The SSIM window side for images of ``height x width``: ``largest`` (11) when it fits, else
    the largest odd size that does (7 for 8 x 8 images)."""
    side = min(int(largest), int(height), int(width))
    return side if side % 2 else side - 1


def ssim(a: np.ndarray, b: np.ndarray, data_range: float, filter_size: int = FILTER_SIZE,
         filter_sigma: float = FILTER_SIGMA) -> tuple[np.ndarray, float]:
    """Structural similarity (Wang et al. 2004) per image, and its mean over the batch.

    a, b: [B, H, W, C] on the same scale; data_range: L (2.0 for [-1, 1] images, 255 for uint8).
    filter_size: odd side of the Gaussian window (at most the image's shorter side; see
    ``ssim_filter_size``); filter_sigma: its standard deviation in pixels.
    Returns (per_image [B] float64, mean float): the mean SSIM map over valid windows and channels.
    """
    a, b = _pair(a, b, "ssim")
    data_range = _check_range(data_range, "ssim")
    if filter_size < 3 or filter_size % 2 == 0:
        raise ValueError(f"ssim: filter_size must be an odd integer >= 3, got {filter_size}")
    if min(a.shape[1:3]) < filter_size:
        raise ValueError(f"ssim: images of {a.shape[1]}x{a.shape[2]} are smaller than the "
                         f"{filter_size}x{filter_size} window; use ssim_filter_size(h, w)")
    fn = _jitted("ssim", max_val=1.0, filter_size=int(filter_size),
                 filter_sigma=float(filter_sigma), k1=K1, k2=K2)
    per_image = np.asarray(fn(*[(x / data_range).astype(np.float32) for x in (a, b)]),
                           np.float64)
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
