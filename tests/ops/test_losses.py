"""The shared loss pieces (ops/losses.py) against NumPy float64 references.

Tolerances: float32 kernels against float64 formulas, rtol 1e-5 (softmax over <= 11 classes of
unit-scale logits; observed ~1e-7), 1e-6 for the unit-norm rows.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.ops import losses


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_l2_normalize_matches_numpy_and_keeps_zero_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7))
    x[2] = 0.0  # a padding word: stays zero, never NaN
    got = np.asarray(losses.l2_normalize(jnp.float32(x)))
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    want = np.where(norms > 0, x / np.maximum(norms, 1e-300), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(got[2] == 0.0)
    # bfloat16 inputs are normalised in float32 (the scores VLAP takes from them stay exact).
    assert losses.l2_normalize(jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.float32


def test_soft_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 11))
    target = rng.random((4, 11))
    target /= target.sum(-1, keepdims=True)
    want = -np.mean(np.sum(target * np_log_softmax(logits), -1))
    got = float(losses.soft_cross_entropy(jnp.float32(target), jnp.float32(logits)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A one-hot target is the plain cross-entropy of its class.
    onehot = np.eye(11)[[3, 0, 7, 10]]
    want = -np.mean(np_log_softmax(logits)[np.arange(4), [3, 0, 7, 10]])
    np.testing.assert_allclose(float(losses.soft_cross_entropy(jnp.float32(onehot),
                                                               jnp.float32(logits))),
                               want, rtol=1e-5)


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = rng.random((2, 5)) < 0.5
    lp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    want = -np.take_along_axis(lp, targets[..., None], -1)[..., 0][mask].mean()
    got = losses.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    none = losses.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                       jnp.zeros((2, 5), bool))
    assert float(none) == 0.0




def test_masked_cross_entropy_names_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \[B, N, V\], targets \[B, N\] and mask"):
        losses.masked_cross_entropy(jnp.zeros((2, 5, 7)), jnp.zeros((2, 4), jnp.int32),
                                    jnp.ones((2, 4)))


def test_masked_mean_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 4))
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    got = np.asarray(losses.masked_mean(jnp.float32(x), jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], x[0, :2].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], x[1].mean(0), rtol=1e-5, atol=1e-6)
    assert np.all(got[2] == 0.0)  # no real token: zero, never NaN
