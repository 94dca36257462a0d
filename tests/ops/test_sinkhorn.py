"""Sinkhorn-Knopp against a NumPy float64 exp-domain textbook version, plus its edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.ops.sinkhorn import (
    released_code_word_prior,
    sinkhorn,
    sinkhorn_released_code,
    sinkhorn_until_converged,
)

B, K = 16, 37
# float32 against the float64 textbook: |S / eps| <= 20 here, so each of S / eps, the potential g
# and S / eps + g is rounded to ~2^-20 absolute, i.e. ~1e-6 relative on Q per rounding. Measured
# over 200 random draws: worst 1.05e-6 absolute, all within atol 1e-6 + rtol 1e-7; rtol 2e-6 leaves
# room for other CPUs' exp/log. The algorithm itself is pinned in float64 to 1e-12 below.
F32_TOL = dict(rtol=2e-6, atol=1e-6)


def textbook_sinkhorn(scores, epsilon, num_iters, col=None, row=None):
    """SwAV's Sinkhorn-Knopp in the exp domain, float64, generalised to marginals.

    Q = exp(S / eps)^T [K, B]; Q /= sum(Q); repeat: scale each word (row of Q) to c_k, then each
    sample (column of Q) to r_b; return (B * Q)^T. Uniform c = 1/K, r = 1/B is SwAV verbatim.
    """
    s = np.asarray(scores, np.float64)
    b, k = s.shape
    c = np.full(k, 1.0 / k) if col is None else np.asarray(col, np.float64)
    r = np.full(b, 1.0 / b) if row is None else np.asarray(row, np.float64)
    c, r = c / c.sum(), r / r.sum()
    q = np.exp(s / epsilon).T
    q /= q.sum()
    for _ in range(num_iters):
        q /= q.sum(axis=1, keepdims=True)
        q *= c[:, None]
        q /= q.sum(axis=0, keepdims=True)
        q *= r[None, :]
    return (q * b).T


def _scores(seed, shape=(B, K)):
    # float32-representable, so the reference sees exactly the numbers the float32 code sees.
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def _marginal(seed, n, zeros=()):
    m = np.random.default_rng(seed).uniform(0.05, 1.0, n).astype(np.float32)
    m[list(zeros)] = 0.0
    return m


# --- exactness against the textbook ------------------------------------------------------------


def test_uniform_matches_textbook_float32():
    s = _scores(0)
    q = sinkhorn(jnp.asarray(s), epsilon=0.05, num_iters=3)
    assert q.dtype == jnp.float32 and q.shape == (B, K)
    np.testing.assert_allclose(np.asarray(q), textbook_sinkhorn(s, 0.05, 3), **F32_TOL)


def test_col_marginal_matches_textbook_float32():
    s, c = _scores(1), _marginal(2, K)
    q = sinkhorn(jnp.asarray(s), epsilon=0.05, num_iters=3, col_marginal=jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(q), textbook_sinkhorn(s, 0.05, 3, col=c), **F32_TOL)


@pytest.mark.parametrize("num_iters", [1, 3, 7])
def test_matches_textbook_float64(num_iters):
    # In float64 the log-domain iterations must agree with the exp domain to rounding.
    s, c, r = _scores(3), _marginal(4, K), _marginal(5, B)
    with jax.enable_x64(True):
        kw = dict(epsilon=0.05, num_iters=num_iters)
        q = sinkhorn(jnp.asarray(s, jnp.float64), **kw)
        qm = sinkhorn(
            jnp.asarray(s, jnp.float64), col_marginal=jnp.asarray(c, jnp.float64),
            row_marginal=jnp.asarray(r, jnp.float64), **kw,
        )
        assert q.dtype == jnp.float64
    expected = textbook_sinkhorn(s, 0.05, num_iters)
    np.testing.assert_allclose(np.asarray(q), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(qm), textbook_sinkhorn(s, 0.05, num_iters, col=c, row=r), rtol=0, atol=1e-12
    )


def test_converges_to_marginals():
    s, c = _scores(6), _marginal(7, K)
    q = np.asarray(sinkhorn(jnp.asarray(s), epsilon=0.1, num_iters=200, col_marginal=c))
    np.testing.assert_allclose(q.sum(axis=1), np.ones(B), rtol=0, atol=1e-5)
    np.testing.assert_allclose(q.sum(axis=0), B * c / c.sum(), rtol=0, atol=1e-4)
    # And 3 iterations do not meet the word marginal yet (so the check above can fail).
    q3 = np.asarray(sinkhorn(jnp.asarray(s), epsilon=0.1, num_iters=3, col_marginal=jnp.asarray(c)))
    assert np.abs(q3.sum(axis=0) - B * c / c.sum()).max() > 1e-3


# --- numerics at small epsilon, dtypes, zeros ----------------------------------------------------


def test_finite_at_epsilon_001_float32_and_bf16():
    s = _scores(8)
    q32 = sinkhorn(jnp.asarray(s), epsilon=0.01, num_iters=3)
    sb = jnp.asarray(s, jnp.bfloat16)
    qb = sinkhorn(sb, epsilon=0.01, num_iters=3)
    assert q32.dtype == jnp.float32 and qb.dtype == jnp.float32
    for q in (q32, qb):
        q = np.asarray(q)
        assert np.all(np.isfinite(q)) and np.all(q >= 0)
        np.testing.assert_allclose(q.sum(axis=1), np.ones(B), rtol=0, atol=1e-5)
    # bf16 inputs are computed in float32: same as upcasting them by hand.
    q_up = sinkhorn(sb.astype(jnp.float32), epsilon=0.01, num_iters=3)
    np.testing.assert_array_equal(np.asarray(qb), np.asarray(q_up))
    # The exp-domain version overflows float32 here (e^100), the reason for the log domain.
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.all(np.isfinite(np.exp(s / np.float32(0.01))))


def test_zero_marginals_give_exact_zeros():
    s = _scores(9)
    zero_cols, zero_rows = [0, 5, 36], [3, 15]
    c, r = _marginal(10, K, zero_cols), _marginal(11, B, zero_rows)
    q = np.asarray(
        sinkhorn(jnp.asarray(s), epsilon=0.01, num_iters=3, col_marginal=c, row_marginal=r)
    )
    assert np.all(np.isfinite(q))
    assert np.all(q[:, zero_cols] == 0.0) and np.all(q[zero_rows, :] == 0.0)
    np.testing.assert_allclose(q.sum(axis=1), B * r / r.sum(), rtol=0, atol=1e-5)
    # Masking: -inf scores where the marginal is 0 change nothing and make no NaN.
    masked = s.copy()
    masked[:, zero_cols] = -np.inf
    masked[zero_rows, :] = -np.inf
    q_masked = sinkhorn(
        jnp.asarray(masked), epsilon=0.01, num_iters=3, col_marginal=c, row_marginal=r
    )
    np.testing.assert_array_equal(np.asarray(q_masked), q)


def test_zero_marginals_equal_deleting_those_rows_and_columns():
    s = _scores(26)
    zero_cols, zero_rows = [1, 2, 20], [0, 7, 8]
    c, r = _marginal(27, K, zero_cols), _marginal(28, B, zero_rows)
    keep_r, keep_c = np.flatnonzero(r), np.flatnonzero(c)
    q = np.asarray(
        sinkhorn(jnp.asarray(s), epsilon=0.05, num_iters=3, col_marginal=c, row_marginal=r)
    )
    # Textbook on the smaller problem; Q = batch * P, so rescale from its batch to the full one.
    sub = textbook_sinkhorn(s[np.ix_(keep_r, keep_c)], 0.05, 3, col=c[keep_c], row=r[keep_r])
    expected = np.zeros((B, K))
    expected[np.ix_(keep_r, keep_c)] = sub * B / len(keep_r)
    np.testing.assert_allclose(q, expected, **F32_TOL)
    # Gradients through zero marginals stay finite too.
    w = jnp.asarray(_scores(12))
    grad = jax.grad(
        lambda x: jnp.sum(sinkhorn(x, epsilon=0.05, num_iters=3, col_marginal=c,
                                   row_marginal=r, differentiable=True) * w)
    )(jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(grad)))
    grad = np.asarray(grad)
    assert np.all(grad[zero_rows] == 0.0) and np.all(grad[:, zero_cols] == 0.0)


# --- transformations ---------------------------------------------------------------------------


def test_vmap_equals_loop():
    s, c = _scores(13, (4, B, K)), _marginal(14, K)
    f = lambda x: sinkhorn(x, epsilon=0.05, num_iters=3, col_marginal=jnp.asarray(c))
    batched = np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(s)))
    looped = np.stack([np.asarray(f(jnp.asarray(x))) for x in s])
    # Batched and unbatched programs may round differently (float32); a wrong batching would not
    # be off by ulps but by O(1).
    np.testing.assert_allclose(batched, looped, rtol=2e-6, atol=1e-7)


def test_no_gradient_by_default():
    s, w = jnp.asarray(_scores(15)), jnp.asarray(_scores(16))
    grad = jax.grad(lambda x: jnp.sum(sinkhorn(x, epsilon=0.05, num_iters=3) * w))(s)
    assert np.all(np.asarray(grad) == 0.0)


def test_gradient_when_differentiable_matches_finite_differences():
    s, w, c = _scores(17, (6, 9)), _scores(18, (6, 9)), _marginal(19, 9)
    with jax.enable_x64(True):
        s64, w64, c64 = (jnp.asarray(x, jnp.float64) for x in (s, w, c))

        def loss(x):
            q = sinkhorn(x, epsilon=0.3, num_iters=4, col_marginal=c64, differentiable=True)
            return jnp.sum(q * w64)

        grad = np.asarray(jax.grad(loss)(s64))
        h = 1e-6
        # Every coordinate's +h and -h perturbation, evaluated in one batched call.
        eye = np.eye(s.size).reshape(s.size, *s.shape) * h
        perturbed = jnp.asarray(np.concatenate([s + eye, s - eye]), jnp.float64)
        values = np.asarray(jax.jit(jax.vmap(loss))(perturbed))
        fd = ((values[: s.size] - values[s.size :]) / (2 * h)).reshape(s.shape)
    assert np.abs(grad).max() > 1e-2  # a real, non-trivial gradient
    # Central differences in float64: truncation ~h^2, rounding ~1e-16 / h.
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


# --- tolerance mode ----------------------------------------------------------------------------


def _col_error(q, c):
    p = np.asarray(q, np.float64) / q.shape[0]
    return np.abs(p.sum(axis=0) - c / c.sum()).sum()


def test_until_converged_stops_early_and_meets_tol():
    s, c = jnp.asarray(_scores(20)), _marginal(21, K)
    tol, max_iters = 1e-4, 500
    q, iters = sinkhorn_until_converged(
        s, epsilon=0.1, tol=tol, max_iters=max_iters, col_marginal=jnp.asarray(c)
    )
    iters = int(iters)
    assert 1 < iters < max_iters
    assert _col_error(q, c) < tol
    # It is the fixed-iteration algorithm, stopped at the first iteration that meets tol.
    kw = dict(epsilon=0.1, col_marginal=jnp.asarray(c))
    q_fixed = sinkhorn(s, num_iters=iters, **kw)
    np.testing.assert_allclose(np.asarray(q), np.asarray(q_fixed), rtol=0, atol=1e-6)
    assert _col_error(sinkhorn(s, num_iters=iters - 1, **kw), c) >= tol


def test_until_converged_hits_max_iters_and_vmaps():
    s = _scores(22, (2, B, K))
    s[0] *= 0.05  # nearly flat scores: converges in a few iterations
    f = lambda x: sinkhorn_until_converged(x, epsilon=0.05, tol=1e-5, max_iters=40)
    q, iters = jax.vmap(f)(jnp.asarray(s))
    for i in range(2):
        q_i, it_i = f(jnp.asarray(s[i]))
        assert int(iters[i]) == int(it_i)
        np.testing.assert_allclose(np.asarray(q[i]), np.asarray(q_i), rtol=0, atol=1e-6)
    assert int(iters[0]) < int(iters[1]) == 40


# --- the released code's variant ----------------------------------------------------------------


def test_released_code_variant_equals_their_loop():
    s = _scores(23)
    freqs = _marginal(24, K)
    freqs = freqs / freqs.sum()
    prior = released_code_word_prior(jnp.asarray(freqs))
    z = freqs / 0.25
    np.testing.assert_allclose(np.asarray(prior), np.exp(z) / np.exp(z).sum(), rtol=1e-6)

    # Their distributed_sinkhorn, 2-D branch, one process, in float64.
    w = np.exp(z) / np.exp(z).sum()
    qt = np.exp(s.astype(np.float64) / 0.05).T
    for _ in range(3):
        qt *= w[:, None]
        qt /= qt.sum(axis=0, keepdims=True)
        qt /= B
    expected = (qt * B).T

    q = np.asarray(sinkhorn_released_code(jnp.asarray(s), epsilon=0.05, prior=prior))
    np.testing.assert_allclose(q, expected, **F32_TOL)
    # It does not enforce the word marginal, unlike sinkhorn.
    assert np.abs(q.sum(axis=0) - B * w).max() > 0.1


# --- input checks ------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    s = jnp.asarray(_scores(25))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn(s, epsilon=0.0, num_iters=3)
    with pytest.raises(ValueError, match="num_iters must be"):
        sinkhorn(s, epsilon=0.05, num_iters=0)
    with pytest.raises(ValueError, match=r"\[batch, words\]"):
        sinkhorn(s[0], epsilon=0.05, num_iters=3)
    with pytest.raises(ValueError, match=r"col_marginal must have shape \(37,\)"):
        sinkhorn(s, epsilon=0.05, num_iters=3, col_marginal=jnp.ones(K + 1))
    with pytest.raises(ValueError, match="finite and >= 0"):
        sinkhorn(s, epsilon=0.05, num_iters=3, row_marginal=-jnp.ones(B))
    with pytest.raises(ValueError, match="at least one positive"):
        sinkhorn(s, epsilon=0.05, num_iters=3, col_marginal=jnp.zeros(K))
    with pytest.raises(ValueError, match="tol must be > 0"):
        sinkhorn_until_converged(s, epsilon=0.05, tol=0.0, max_iters=10)


# --- VLAP's choice of the two ----------------------------------------------------------------


def test_assignments_picks_the_mode():
    """assignments('paper') is the optimal transport, 'released_code' the released loop with the
    frequency prior (uniform without a marginal); anything else is named."""
    from lqae_vlap.ops.sinkhorn import assignments

    s, col = jnp.asarray(_scores(31)), jnp.asarray(_marginal(32, K))
    kw = dict(epsilon=0.05, num_iters=3)
    np.testing.assert_array_equal(
        np.asarray(assignments(s, mode="paper", col_marginal=col, **kw)),
        np.asarray(sinkhorn(s, col_marginal=col, **kw)))
    np.testing.assert_allclose(
        np.asarray(assignments(s, mode="released_code", col_marginal=col, prior_temperature=0.5,
                               **kw)),
        np.asarray(sinkhorn_released_code(s, prior=released_code_word_prior(col, 0.5), **kw)),
        rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(assignments(s, mode="released_code", col_marginal=None, **kw)),
        np.asarray(jax.nn.softmax(s / 0.05, axis=1)), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="sinkhorn_mode='swav'.*config.sinkhorn.mode"):
        assignments(s, mode="swav", col_marginal=None, **kw)
