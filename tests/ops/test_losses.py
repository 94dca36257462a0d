"""The shared loss pieces (ops/losses.py) against NumPy float64 references.

Tolerances: float32 kernels against float64 formulas, rtol 1e-5 (softmax over <= 11 classes of
unit-scale logits; observed ~1e-7), 1e-6 for the unit-norm rows.
"""

import jax
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




@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_cross_entropy_gradient_is_softmax_minus_one_hot(dtype):
    """The hand-written gradient against the textbook one in float64, (softmax - one_hot) *
    mask / count, and zero at unscored positions; returned in the logits' dtype."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), dtype)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = rng.random((2, 5)) < 0.6
    g = jax.grad(losses.masked_cross_entropy)(logits, jnp.asarray(targets), jnp.asarray(mask))
    assert g.dtype == dtype
    x = np.asarray(logits.astype(jnp.float32), np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = (p - np.eye(7)[targets]) * mask[..., None] / mask.sum()
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), want, rtol=tol, atol=tol)
    assert not np.any(np.asarray(g.astype(jnp.float32))[~mask])


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


# --- chunked cross-entropy and masked positions ---------------------------------------------------
# Reference: the plain full-logits masked_cross_entropy in float32 (value rtol 1e-6, gradient
# w.r.t. hidden atol 1e-6) and a NumPy float64 cross-entropy (rtol 1e-5).


def _ce_inputs(seed=0, b=3, n=7, d=16, v=50):
    rng = np.random.RandomState(seed)
    hidden = rng.normal(0, 1, (b, n, d)).astype(np.float32)
    words = rng.normal(0, 1, (v, d)).astype(np.float32)
    targets = rng.randint(0, v, (b, n)).astype(np.int32)
    mask = (rng.uniform(size=(b, n)) < 0.7).astype(np.int32)
    return hidden, words, targets, mask


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])  # 3 does not divide 7: padded chunk
@pytest.mark.parametrize("vocab_axis", [0, 1])
def test_chunked_cross_entropy_equals_full_logits_value_and_gradient(chunk, vocab_axis):
    hidden, words, targets, mask = _ce_inputs()
    scale = 0.25
    matrix = words if vocab_axis == 0 else words.T

    def full(h):
        return losses.masked_cross_entropy((scale * h) @ jnp.asarray(words).T, targets, mask)

    def chunked(h):
        return losses.chunked_cross_entropy(h, jnp.asarray(matrix), targets, mask,
                                            chunk_size=chunk, vocab_axis=vocab_axis, scale=scale)

    want, want_grad = jax.value_and_grad(full)(jnp.asarray(hidden))
    got, got_grad = jax.jit(jax.value_and_grad(chunked))(jnp.asarray(hidden))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-6)
    logits = scale * hidden.astype(np.float64) @ words.astype(np.float64).T
    nll = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(got), (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_chunked_cross_entropy_without_scored_positions_is_zero_and_checks_shapes():
    hidden, words, targets, mask = _ce_inputs()
    got = losses.chunked_cross_entropy(hidden, words, targets, np.zeros_like(mask), chunk_size=2)
    assert float(got) == 0.0
    with pytest.raises(ValueError, match="vocab_matrix"):
        losses.chunked_cross_entropy(hidden, words.T, targets, mask, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_cross_entropy(hidden, words, targets, mask, chunk_size=0)


def test_masked_positions_gathers_every_masked_position_in_order():
    rng = np.random.RandomState(1)
    mask = rng.uniform(size=(5, 12)) < 0.4
    mask[0] = False  # a row with none
    k = int(mask.sum(1).max())
    pos, valid = map(np.asarray, losses.masked_positions(jnp.asarray(mask), k))
    assert pos.shape == valid.shape == (5, k)
    for row in range(5):
        want = np.flatnonzero(mask[row])
        np.testing.assert_array_equal(pos[row][valid[row]], want)
        assert valid[row].sum() == len(want)
    # The loss over the gathered positions equals the loss over the full mask.
    logits = rng.normal(0, 1, (5, 12, 9)).astype(np.float32)
    targets = rng.randint(0, 9, (5, 12))
    gathered = np.take_along_axis(logits, pos[..., None], 1)
    np.testing.assert_allclose(
        float(losses.masked_cross_entropy(gathered, np.take_along_axis(targets, pos, 1), valid)),
        float(losses.masked_cross_entropy(logits, targets, mask)), rtol=1e-6)
    assert losses.max_masked(196, 0.5) == 98 and losses.max_masked(10, 0.33) == 4
