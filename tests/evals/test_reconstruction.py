"""PSNR, SSIM, codebook statistics and the PNG grid.

References: PSNR by hand; SSIM against a direct loop-over-windows implementation of Wang et al.
(2004) in float64 written here (uniform window, sample covariance), to 1e-6 (observed ~1e-15);
optionally against scikit-image when it is installed (it is not a dependency).
"""

import math

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.evals.reconstruction import codebook_stats, png_grid, psnr, ssim


def textbook_ssim(x: np.ndarray, y: np.ndarray, data_range: float, win: int) -> float:
    """One [H, W, C] pair: the formula per channel at every full window, then the plain mean."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - win + 1):
            for j in range(x.shape[1] - win + 1):
                p = x[i:i + win, j:j + win, c].ravel()
                q = y[i:i + win, j:j + win, c].ravel()
                mp, mq = p.mean(), q.mean()
                n = p.size
                vp = ((p - mp) ** 2).sum() / (n - 1)
                vq = ((q - mq) ** 2).sum() / (n - 1)
                cov = ((p - mp) * (q - mq)).sum() / (n - 1)
                values.append((2 * mp * mq + c1) * (2 * cov + c2)
                              / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def noisy_pair(seed: int = 0, shape=(3, 12, 10, 3)):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, shape)
    return a, np.clip(a + 0.4 * rng.normal(size=shape), -1, 1)


def test_psnr_hand_computed():
    a = np.zeros((2, 2, 2, 1))
    b = a.copy()
    b[0, 0, 0, 0] = 1.0  # MSE = 1/4 over 4 values; range 2 -> 10 log10(4 / 0.25) = 10 log10(16)
    b[1] = 0.5  # MSE = 0.25 everywhere -> the same PSNR
    per, mean = psnr(a, b, data_range=2.0)
    expected = 10 * math.log10(16.0)
    np.testing.assert_allclose(per, [expected, expected], rtol=1e-12)
    assert mean == pytest.approx(expected, rel=1e-12)
    per, _ = psnr(a, a, 2.0)
    assert np.all(np.isinf(per))


@pytest.mark.parametrize("gaussian", [False, True])
def test_ssim_identical_is_one_and_symmetric(gaussian):
    a, b = noisy_pair(shape=(2, 14, 13, 3))
    kw = dict(data_range=2.0, gaussian=gaussian)
    np.testing.assert_allclose(ssim(a, a, **kw)[0], 1.0, atol=1e-12)
    np.testing.assert_allclose(ssim(a, b, **kw)[0], ssim(b, a, **kw)[0], atol=1e-12)
    assert np.all(ssim(a, b, **kw)[0] < 0.9)


@pytest.mark.parametrize("win", [3, 7])
def test_ssim_matches_textbook(win):
    a, b = noisy_pair(1)
    per, mean = ssim(a, b, data_range=2.0, win_size=win)
    ref = [textbook_ssim(a[i], b[i], 2.0, win) for i in range(len(a))]
    np.testing.assert_allclose(per, ref, atol=1e-6)
    assert mean == pytest.approx(np.mean(ref), abs=1e-6)


def test_ssim_matches_scikit_image_if_installed():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = noisy_pair(2, shape=(2, 16, 15, 3))
    for gaussian in (False, True):
        ours = ssim(a, b, 2.0, gaussian=gaussian)[0]
        ref = [metrics.structural_similarity(a[i], b[i], data_range=2.0, channel_axis=-1,
                                             gaussian_weights=gaussian,
                                             use_sample_covariance=not gaussian)
               for i in range(len(a))]
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_bad_inputs_raise():
    a, b = noisy_pair()
    with pytest.raises(ValueError, match="equal shape"):
        ssim(a, b[:, :5], 2.0)
    with pytest.raises(ValueError, match="batch"):
        psnr(a[0], b[0], 2.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, 0.0)
    with pytest.raises(ValueError, match="odd"):
        ssim(a, b, 2.0, win_size=4)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(a[:, :5, :5], b[:, :5, :5], 2.0)


def test_codebook_stats():
    idx = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])  # 4 of 10 words, uniformly -> perplexity 4
    stats = codebook_stats(idx, vocab=10)
    assert stats["usage"] == pytest.approx(0.4)
    assert stats["perplexity"] == pytest.approx(4.0, rel=1e-5)
    p = np.array([3, 1]) / 4.0  # codes 5 (x3) and 7 (x1): exp(entropy) by hand
    stats = codebook_stats(np.array([5, 5, 5, 7]), vocab=8)
    assert stats["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="outside"):
        codebook_stats(np.array([0, 10]), vocab=10)


def test_png_grid_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.uniform(-1, 1, (3, 4, 5, 3)) for _ in range(3)]
    rows[1] = rng.uniform(-1, 1, (3, 4, 5, 1)).repeat(3, -1)
    path = tmp_path / "sub" / "grid.png"
    grid = png_grid(rows, path, pad=2)
    assert grid.shape == (3 * 6 - 2, 3 * 7 - 2, 3)
    read = np.asarray(Image.open(path))
    np.testing.assert_array_equal(read, grid)
    # Row 2, image 1 sits at (12, 7); pixel value (x + 1) * 127.5 rounded.
    np.testing.assert_array_equal(read[12:16, 7:12],
                                  np.rint((rows[2][1] + 1) * 127.5).astype(np.uint8))
    assert np.all(read[4:6] == 255)  # padding between rows
    with pytest.raises(ValueError, match="same shape"):
        png_grid([rows[0], rows[0][:2]], path)
