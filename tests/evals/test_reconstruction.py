"""PSNR, SSIM (dm-pix) and codebook statistics.

References, each at a stated tolerance: PSNR by hand and against scikit-image's
``peak_signal_noise_ratio`` (float64), to 1e-4 dB (dm-pix runs in float32; observed ~1e-5);
SSIM against scikit-image's ``structural_similarity`` with Wang et al.'s settings (Gaussian
weights, population covariance) and against a direct float64 loop over every window written here,
to 2e-5 (observed ~1e-6). scikit-image is in the test extra.
"""

import math

import numpy as np
import pytest

from lqae_vlap.evals.reconstruction import (codebook_stats, psnr, ssim,
                                            ssim_filter_size)


def textbook_ssim(x: np.ndarray, y: np.ndarray, data_range: float, win: int,
                  sigma: float = 1.5) -> float:
    """One [H, W, C] pair: Wang et al.'s formula per channel at every full window with Gaussian
    weights (population moments), then the plain mean. float64, one window at a time."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    w = np.outer(g, g).ravel() / np.outer(g, g).sum()
    values = []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - win + 1):
            for j in range(x.shape[1] - win + 1):
                p = x[i:i + win, j:j + win, c].ravel()
                q = y[i:i + win, j:j + win, c].ravel()
                mp, mq = w @ p, w @ q
                vp, vq = w @ (p - mp) ** 2, w @ (q - mq) ** 2
                cov = w @ ((p - mp) * (q - mq))
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
    np.testing.assert_allclose(per, [expected, expected], rtol=1e-6)  # dm-pix: float32
    assert mean == pytest.approx(expected, rel=1e-6)
    per, _ = psnr(a, a, 2.0)
    assert np.all(np.isinf(per))


def test_psnr_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = noisy_pair(3)
    ours = psnr(a, b, data_range=2.0)[0]
    ref = [metrics.peak_signal_noise_ratio(a[i], b[i], data_range=2.0) for i in range(len(a))]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_ssim_identical_is_one_and_symmetric():
    a, b = noisy_pair(shape=(2, 14, 13, 3))
    np.testing.assert_allclose(ssim(a, a, data_range=2.0)[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(ssim(a, b, 2.0)[0], ssim(b, a, 2.0)[0], atol=1e-6)
    assert np.all(ssim(a, b, 2.0)[0] < 0.9)


@pytest.mark.parametrize("win, sigma", [(11, 1.5), (7, 1.5), (5, 0.8)])
def test_ssim_matches_textbook(win, sigma):
    a, b = noisy_pair(1, shape=(3, 13, 12, 3))
    per, mean = ssim(a, b, data_range=2.0, filter_size=win, filter_sigma=sigma)
    ref = [textbook_ssim(a[i], b[i], 2.0, win, sigma) for i in range(len(a))]
    np.testing.assert_allclose(per, ref, rtol=0, atol=2e-5)
    assert mean == pytest.approx(np.mean(ref), abs=2e-5)


@pytest.mark.parametrize("win, sigma", [(11, 1.5), (7, 0.8)])
def test_ssim_matches_scikit_image(win, sigma):
    # scikit-image truncates its Gaussian at 3.5 sigma: radius int(3.5 sigma + 0.5), so sigma 1.5
    # gives the 11-pixel window and sigma 0.8 the 7-pixel one.
    metrics = pytest.importorskip("skimage.metrics")
    a, b = noisy_pair(2, shape=(2, 16, 15, 3))
    ours = ssim(a, b, 2.0, filter_size=win, filter_sigma=sigma)[0]
    ref = [metrics.structural_similarity(a[i], b[i], data_range=2.0, channel_axis=-1,
                                         gaussian_weights=True, sigma=sigma,
                                         use_sample_covariance=False)
           for i in range(len(a))]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


def test_ssim_default_is_the_papers_gaussian_window_not_the_uniform_one():
    # The hand-written SSIM this replaced defaulted to a uniform 7x7 window with the sample
    # covariance (scikit-image's default); the default is now Wang et al.'s Gaussian 11x11.
    metrics = pytest.importorskip("skimage.metrics")
    a, b = noisy_pair(4, shape=(1, 16, 16, 1))
    gaussian = metrics.structural_similarity(a[0], b[0], data_range=2.0, channel_axis=-1,
                                             gaussian_weights=True, use_sample_covariance=False)
    uniform = metrics.structural_similarity(a[0], b[0], data_range=2.0, channel_axis=-1)
    ours = ssim(a, b, 2.0)[1]
    assert abs(uniform - gaussian) > 1e-3  # the two settings are distinguishable here
    assert ours == pytest.approx(gaussian, abs=2e-5)


def test_ssim_filter_size_fits_the_image():
    assert ssim_filter_size(256, 256) == 11
    assert ssim_filter_size(16, 16) == 11
    assert ssim_filter_size(8, 8) == 7
    assert ssim_filter_size(10, 12) == 9
    a, b = noisy_pair(5, shape=(1, 8, 8, 3))
    assert np.isfinite(ssim(a, b, 2.0, filter_size=ssim_filter_size(8, 8))[1])


def test_bad_inputs_raise():
    a, b = noisy_pair()
    with pytest.raises(ValueError, match="equal shape"):
        ssim(a, b[:, :5], 2.0)
    with pytest.raises(ValueError, match="batch"):
        psnr(a[0], b[0], 2.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, 0.0)
    with pytest.raises(ValueError, match="odd"):
        ssim(a, b, 2.0, filter_size=4)
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
