"""The fused Pallas Sinkhorn (interpreted on CPU) against the lax version and a float64 reference.

Tolerances: Q entries lie in [0, 1]; float32 results must match the lax `sinkhorn` and the
NumPy float64 reference to 1e-5 absolute (measured: <= 4e-6 at epsilon 0.01), and entries above
1e-6 to 1e-4 relative. Small tiles (8 x 32) so that every test has several row blocks, several
column chunks and ragged edges on both axes.

The mesh tests use the 8 fake CPU devices of tests/conftest.py: the rows split 8 ways inside a
jit, against the unsharded lax version with the same tolerances (the cross-device combination
only reorders the column sums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from jax.sharding import NamedSharding, PartitionSpec as P

from lqae_vlap.ops import sinkhorn as lax_sinkhorn
from lqae_vlap.ops import sinkhorn_pallas
from lqae_vlap.ops.sinkhorn_pallas import sinkhorn_fused
from lqae_vlap.core import sharding

BLOCKS = dict(block_rows=8, block_cols=32)
ATOL, RTOL = 1e-5, 1e-4


def reference(scores, epsilon, num_iters, col=None, row=None) -> np.ndarray:
    """Textbook log-domain Sinkhorn in float64 (column step first), Q = batch * P: [B, K]."""
    s = np.asarray(scores, np.float64)
    batch, words = s.shape
    log_k = s / epsilon
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = np.log(np.full(batch, 1 / batch) if row is None else row / row.sum())
        log_c = np.log(np.full(words, 1 / words) if col is None else col / col.sum())
        f = np.where(np.isneginf(log_r), -np.inf, 0.0)
        for _ in range(num_iters):
            g = np.where(np.isneginf(log_c), -np.inf, log_c - logsumexp(log_k + f[:, None], 0))
            f = np.where(np.isneginf(log_r), -np.inf, log_r - logsumexp(log_k + g[None], 1))
    with np.errstate(invalid="ignore"):
        q = batch * np.exp(log_k + f[:, None] + g[None, :])
    return np.where(np.isneginf(f)[:, None] | np.isneginf(g)[None, :], 0.0, q)


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)
    big = np.abs(expected) > 1e-6
    np.testing.assert_allclose(actual[big], expected[big], rtol=rtol)


def uniform_scores(key, batch, words, dtype=jnp.float32):
    return jax.random.uniform(jax.random.PRNGKey(key), (batch, words), minval=-1, maxval=1
                              ).astype(dtype)


@pytest.mark.parametrize("batch,words", [(37, 100), (8, 32), (3, 129)])
@pytest.mark.parametrize("epsilon", [0.05, 0.01])
def test_matches_lax_and_float64_on_ragged_shapes(batch, words, epsilon):
    s = uniform_scores(0, batch, words)
    q = sinkhorn_fused(s, epsilon=epsilon, num_iters=3, **BLOCKS)
    assert q.dtype == jnp.float32
    assert_close(q, lax_sinkhorn.sinkhorn(s, epsilon=epsilon, num_iters=3))
    assert_close(q, reference(s, epsilon, 3))
    # Rows are exact after the last row step: each sums to 1 (uniform r).
    np.testing.assert_allclose(np.asarray(q).sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("num_iters", [1, 4])
def test_iteration_counts(num_iters):
    # 1: only the column pass and the plan; 4: three fused passes.
    s = uniform_scores(1, 20, 70)
    q = sinkhorn_fused(s, epsilon=0.05, num_iters=num_iters, **BLOCKS)
    assert_close(q, reference(s, 0.05, num_iters))


def test_marginals_with_zeros_and_masked_scores():
    batch, words = 19, 75
    s = np.array(uniform_scores(2, batch, words))
    rng = np.random.default_rng(0)
    col = rng.uniform(0.1, 1.0, words)
    row = rng.uniform(0.5, 1.5, batch)
    col[[0, 40, 74]] = 0.0
    row[[3, 18]] = 0.0
    s[3, :] = -np.inf  # a padded sample: -inf scores are allowed where its marginal is 0
    s[:, 40] = -np.inf
    s = jnp.asarray(s)
    q = sinkhorn_fused(s, epsilon=0.01, num_iters=3, col_marginal=col, row_marginal=row, **BLOCKS)
    q = np.asarray(q)
    assert np.all(q[[3, 18]] == 0.0) and np.all(q[:, [0, 40, 74]] == 0.0)
    expected_lax = lax_sinkhorn.sinkhorn(s, epsilon=0.01, num_iters=3, col_marginal=col,
                                         row_marginal=row)
    assert_close(q, expected_lax)
    assert_close(q, reference(s, 0.01, 3, col=col, row=row))
    np.testing.assert_allclose(q.sum(1), batch * row / row.sum(), atol=1e-5)


def test_bfloat16_scores_compute_in_float32():
    s = uniform_scores(3, 24, 90, jnp.bfloat16)
    q = sinkhorn_fused(s, epsilon=0.01, num_iters=3, **BLOCKS)
    assert q.dtype == jnp.float32
    assert_close(q, lax_sinkhorn.sinkhorn(s, epsilon=0.01, num_iters=3))
    assert_close(q, reference(np.asarray(s.astype(jnp.float32)), 0.01, 3))


def test_vmap_and_traced_epsilon():
    s = jnp.stack([uniform_scores(k, 10, 50) for k in (4, 5, 6)])
    eps = jnp.asarray([0.05, 0.02, 0.01])
    fused = jax.jit(jax.vmap(lambda x, e: sinkhorn_fused(x, epsilon=e, num_iters=3, **BLOCKS)))
    q = fused(s, eps)
    for i in range(3):
        assert_close(q[i], reference(s[i], float(eps[i]), 3))


def test_dispatch_from_sinkhorn():
    s = uniform_scores(7, 12, 40)
    lax_q = lax_sinkhorn.sinkhorn(s, epsilon=0.05, num_iters=3)
    # The default and "auto" on CPU are the lax version, bit for bit.
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(
        lax_sinkhorn.sinkhorn(s, epsilon=0.05, num_iters=3, impl="auto"), lax_q)
    pallas_q = lax_sinkhorn.sinkhorn(s, epsilon=0.05, num_iters=3, impl="pallas")
    np.testing.assert_array_equal(pallas_q, sinkhorn_fused(s, epsilon=0.05, num_iters=3))
    assert_close(pallas_q, lax_q)


def test_bad_input_errors():
    s = uniform_scores(8, 4, 16)
    with pytest.raises(ValueError, match="impl must be"):
        lax_sinkhorn.sinkhorn(s, epsilon=0.05, num_iters=3, impl="triton")
    with pytest.raises(ValueError, match="differentiable=True needs impl='lax'"):
        lax_sinkhorn.sinkhorn(s, epsilon=0.05, num_iters=3, impl="pallas", differentiable=True)
    with pytest.raises(ValueError, match="block_cols must be a power of two"):
        sinkhorn_fused(s, epsilon=0.05, num_iters=3, block_cols=48)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn_fused(s, epsilon=0.0, num_iters=3)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_fused(s[None], epsilon=0.05, num_iters=3)
    with pytest.raises(ValueError, match="col_marginal must have shape"):
        sinkhorn_fused(s, epsilon=0.05, num_iters=3, col_marginal=jnp.ones(15))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_at_the_vlap_shape(dtype):
    # Cross-platform lowering needs no GPU: it builds the Triton IR of every kernel at the
    # benchmark's shape (B = 16,384, K = 50,272), so a tile that is not 2^n or an op Triton
    # cannot express fails here. (PTX compilation and speed still need a GPU.)
    from lqae_vlap.ops.sinkhorn_pallas import _sinkhorn_fused

    s = jax.ShapeDtypeStruct((16384, 50272), dtype)
    lowered = _sinkhorn_fused.trace(
        s, 0.01, None, None, num_iters=3, block_rows=64, block_cols=256, interpret=False,
        num_warps=8).lower(lowering_platforms=("cuda",))
    # One column pass, two fused passes, one plan pass.
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 4


# --- on a device mesh (8 fake CPU devices) -------------------------------------------------------


def sharded_problem(batch, words, seed):
    """Scores with masked rows / columns and non-uniform marginals with zeros; rows 0-4 are all
    dead, so on data=8 one device holds only r_b = 0 rows (its partials are all -inf)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, (batch, words)).astype(np.float32)
    col = rng.uniform(0.1, 1.0, words)
    row = rng.uniform(0.5, 1.5, batch)
    col[[0, 33, words - 1]] = 0.0
    row[[0, 1, 2, 3, 4, 17, batch - 1]] = 0.0
    s[2, :] = -np.inf
    s[:, 33] = -np.inf
    return jnp.asarray(s), jnp.asarray(col, jnp.float32), jnp.asarray(row, jnp.float32)


def run_on_mesh(mesh, s, col, row, epsilon):
    """sinkhorn_fused inside a jit, scores and row marginal split over (data, fsdp) as in the
    trainer's step."""
    rows, rep = sharding.batch_sharding(mesh, 2), sharding.replicated(mesh)
    vec = NamedSharding(mesh, P(("data", "fsdp")))
    step = jax.jit(
        lambda s, c, r, e: sinkhorn_fused(s, epsilon=e, num_iters=3, col_marginal=c,
                                          row_marginal=r, mesh=mesh, block_rows=4, block_cols=32),
        in_shardings=(rows, rep, vec, rep), out_shardings=rows)
    return step(jax.device_put(s, rows), col, jax.device_put(row, vec), jnp.float32(epsilon))


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 4, "tensor": 1},
                                  {"data": 8, "fsdp": 1, "tensor": 1}])
def test_sharded_equals_unsharded_lax(axes):
    # 40 rows = 5 per device (a full and a ragged block of 4), 100 words (ragged last chunk).
    mesh = sharding.make_mesh(axes)
    s, col, row = sharded_problem(40, 100, 0)
    want = lax_sinkhorn.sinkhorn(s, epsilon=0.01, num_iters=3, col_marginal=col,
                                 row_marginal=row)
    q = run_on_mesh(mesh, s, col, row, 0.01)
    assert q.sharding.spec == P(("data", "fsdp"), None) and len(q.addressable_shards) == 8
    assert_close(q, want)
    q = np.asarray(q)
    assert np.all(q[[0, 1, 2, 3, 4, 17, 39]] == 0.0) and np.all(q[:, [0, 33, 99]] == 0.0)


def test_sharded_without_the_collectives_is_wrong(monkeypatch):
    # Mutation check: if the column partials were not combined across devices (each device
    # normalising the columns over its own rows only), the mesh test above must fail. A shape
    # of its own, so that jit traces anew with the patched function.
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    s, col, row = sharded_problem(48, 90, 1)
    want = lax_sinkhorn.sinkhorn(s, epsilon=0.01, num_iters=3, col_marginal=col,
                                 row_marginal=row)
    local_only = sinkhorn_pallas._col_potential
    monkeypatch.setattr(sinkhorn_pallas, "_col_potential",
                        lambda log_c, m, l, axes=(): local_only(log_c, m, l))
    q = np.asarray(run_on_mesh(mesh, s, col, row, 0.01))
    assert np.abs(q - np.asarray(want)).max() > 0.1
    # Rows are still normalised locally: only the coupling through the columns is lost.
    np.testing.assert_allclose(q.sum(1), np.asarray(want).sum(1), atol=1e-5)


def test_sharded_batch_must_divide_and_padding_fix():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    s, col, row = sharded_problem(36, 50, 2)
    for call in (sinkhorn_fused, lambda s, **kw: lax_sinkhorn.sinkhorn(s, impl="pallas", **kw)):
        with pytest.raises(ValueError, match="batch 36 is not divisible by the 8 devices.*pad"):
            call(s, epsilon=0.05, num_iters=3, mesh=mesh)
    with pytest.raises(ValueError, match="batch_axes must be distinct axes of the mesh"):
        sinkhorn_fused(s[:32], epsilon=0.05, num_iters=3, mesh=mesh, batch_axes=("batch",))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sinkhorn_fused(s[:32], epsilon=0.05, num_iters=3, mesh={"data": 8})
    # The fix the message names: pad to 40 with row_marginal 0 and rescale by 36 / 40.
    padded = jnp.concatenate([s, jnp.zeros((4, 50), s.dtype)])
    q = run_on_mesh(mesh, padded, col, jnp.concatenate([row, jnp.zeros(4)]), 0.05)
    assert_close(np.asarray(q)[:36] * 36 / 40, lax_sinkhorn.sinkhorn(
        s, epsilon=0.05, num_iters=3, col_marginal=col, row_marginal=row))


def test_sharded_lowers_to_triton_without_gathering_the_scores():
    # At the benchmark shape on the 8-device mesh: each Triton kernel sees its device's
    # 16,384 / 8 = 2,048 rows, the scores are never all-gathered, and each of the 3 column steps
    # is one pmax + one psum across devices (6 all-reduces).
    from lqae_vlap.ops.sinkhorn_pallas import _sinkhorn_fused

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    s = jax.ShapeDtypeStruct((16384, 50272), jnp.float32,
                             sharding=sharding.batch_sharding(mesh, 2))
    text = _sinkhorn_fused.trace(
        s, 0.01, None, None, num_iters=3, block_rows=64, block_cols=256, interpret=False,
        num_warps=8, mesh=mesh, batch_axes=("data", "fsdp")).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 4
    assert text.count("all_reduce") == 6 and "all_gather" not in text
    assert "tensor<2048x50272xf32>" in text


def test_sharded_inside_value_and_grad():
    # As in the VLAP loss: Q is a constant target inside the differentiated, sharded step. The
    # kernels have no JVP rule, so this checks nothing asks for one (and the public dispatch
    # sinkhorn(impl='pallas', mesh=...)); the loss and gradient must
    # equal those with the lax Sinkhorn (Q agrees to 1e-5, so the gradients do too).
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (40, 8))

    def loss(x, impl, mesh):
        s = jnp.tanh(x @ w.T)
        q = lax_sinkhorn.sinkhorn(s, epsilon=0.05, num_iters=3, impl=impl, mesh=mesh)
        return -jnp.mean(jnp.sum(q * jax.nn.log_softmax(s / 0.1), -1))

    rows = sharding.batch_sharding(mesh, 2)
    got = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2), in_shardings=(rows,))(
        jax.device_put(x, rows), "pallas", mesh)
    want = jax.value_and_grad(loss)(x, "lax", None)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
