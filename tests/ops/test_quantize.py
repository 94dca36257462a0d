"""The chunked nearest-word quantizer against a NumPy float64 brute force, plus its gradients,
usage statistics, memory bound and the vocab-sharded search on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.ops.quantize import (
    codebook_loss,
    codebook_usage,
    nearest_neighbors,
    nearest_neighbors_sharded,
    perplexity,
    quantize,
    spread_penalty,
    straight_through_input,
)
from lqae_vlap.core.sharding import make_mesh


def brute_force(x, cb, k, metric):
    """float64 reference: (distances [N, k], indices [N, k]); ties broken by lowest index."""
    x = np.asarray(x, np.float64)
    cb = np.asarray(cb, np.float64)
    if metric == "l2":
        dist = ((x[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    else:
        xn = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        cn = np.maximum(np.linalg.norm(cb, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - (x / xn) @ (cb / cn).T
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order, dist


def search(x, cb, **kw):
    d, i = jax.jit(functools.partial(nearest_neighbors, **kw))(x, cb)
    return np.asarray(d), np.asarray(i)


def randn(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# --- exact search vs brute force --------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("num_codes,chunk,row_chunk,k", [
    (1000, 128, None, 1),  # K not a multiple of the chunk: the last chunk overlaps the previous one
    (1000, 128, None, 4),
    (300, 4096, None, 4),  # chunk larger than K: one chunk
    (1024, 256, 7, 1),     # K a multiple of the chunk, rows in blocks that do not divide N
])
def test_matches_brute_force(metric, num_codes, chunk, row_chunk, k):
    x, cb = randn(0, 61, 24), randn(1, num_codes, 24)
    d, i = search(x, cb, k=k, metric=metric, chunk_size=chunk, row_chunk_size=row_chunk)
    ref_d, ref_i, _ = brute_force(x, cb, k, metric)
    assert i.shape == (61, k) and i.dtype == np.int32 and d.dtype == np.float32
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(d, axis=1) >= 0)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_duplicate_rows_tie_to_lowest_index(metric):
    cb = randn(2, 700, 16)
    # Copies of row 5 in other chunks (chunk 128), and for cosine also a 2x copy: x.(2c)/|2c| is
    # bit-identical to x.c/|c| because scaling by 2 is exact, so it is a true tie under cosine.
    for j in (300, 650, 699):
        cb[j] = cb[5]
    cb[400] = 2.0 * cb[5]
    x = cb[5][None] + 0.01 * randn(3, 8, 16)
    d, i = search(x, cb, k=5, metric=metric, chunk_size=128)
    want = [5, 300, 400, 650, 699] if metric == "cosine" else [5, 300, 650, 699]
    np.testing.assert_array_equal(i[:, :len(want)], np.tile(want, (8, 1)))
    tied = d[:, :len(want)]
    assert np.all(tied == tied[:, :1])
    _, ref_i, _ = brute_force(x, cb, 5, metric)
    np.testing.assert_array_equal(i, ref_i)


def test_l2_and_cosine_differ_on_rows_of_different_norms():
    scales = np.exp(np.random.default_rng(4).uniform(np.log(0.01), np.log(100.0), size=(500, 1)))
    cb = (randn(5, 500, 16) * scales).astype(np.float32)
    x = randn(6, 128, 16)
    _, i_l2 = search(x, cb, k=1, metric="l2", chunk_size=64)
    _, i_cos = search(x, cb, k=1, metric="cosine", chunk_size=64)
    np.testing.assert_array_equal(i_l2, brute_force(x, cb, 1, "l2")[1])
    np.testing.assert_array_equal(i_cos, brute_force(x, cb, 1, "cosine")[1])
    # Cosine ignores norms, L2 favours small rows: they must mostly disagree here.
    assert np.mean(i_l2 != i_cos) > 0.5


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_x_equal_to_codebook_rows(metric):
    cb = randn(7, 900, 32, scale=3.0)
    rows = np.array([0, 1, 127, 128, 500, 899])
    d, i = search(cb[rows], cb, k=1, metric=metric, chunk_size=128)
    np.testing.assert_array_equal(i[:, 0], rows)
    if metric == "l2":
        assert np.all(d == 0.0)  # recomputed as sum((x - c)^2), so no cancellation residue
    else:
        np.testing.assert_allclose(d, 0.0, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bfloat16_inputs(metric):
    x = jnp.asarray(randn(8, 96, 64), jnp.bfloat16)
    cb = jnp.asarray(randn(9, 2000, 64), jnp.bfloat16)
    d, i = search(x, cb, k=1, metric=metric, chunk_size=512)
    xr, cbr = np.asarray(x.astype(jnp.float32)), np.asarray(cb.astype(jnp.float32))
    ref_d, ref_i, full = brute_force(xr, cbr, 1, metric)
    ours = full[np.arange(96), i[:, 0]]
    # bf16 products are exact in float32, so only float32 accumulation order separates us from the
    # float64 reference: a disagreement is allowed only where the two codes' true distances agree
    # to within that rounding.
    gap = ours - ref_d[:, 0]
    assert np.all(gap <= 1e-4 * np.maximum(1.0, np.abs(ref_d[:, 0])))
    assert np.mean(i[:, 0] != ref_i[:, 0]) <= 0.02
    np.testing.assert_allclose(d[:, 0], ours, rtol=1e-5, atol=1e-5)


def test_padded_codebook_rows_never_win():
    x = randn(10, 16, 8)
    cb = randn(11, 200, 8)
    padded = np.concatenate([cb, x[:5]])  # padding rows that would be exact matches
    d, i = search(x, padded, k=3, metric="l2", chunk_size=64, num_codes=200)
    ref_d, ref_i, _ = brute_force(x, cb, 3, "l2")
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    x, cb = jnp.zeros((4, 8)), jnp.ones((10, 8))
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbors(x, cb, metric="dot")
    with pytest.raises(ValueError, match="feature sizes differ"):
        nearest_neighbors(x, jnp.ones((10, 9)))
    with pytest.raises(ValueError, match="k=11"):
        nearest_neighbors(x, cb, k=11)
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_neighbors(x, cb, k=4, chunk_size=2)
    with pytest.raises(ValueError, match="x \\[N, D\\]"):
        nearest_neighbors(jnp.zeros((2, 4, 8)), cb)
    with pytest.raises(ValueError, match="rng"):
        quantize(x, cb, k=2, topk_mode="random")
    with pytest.raises(ValueError, match="topk_mode"):
        quantize(x, cb, k=2, topk_mode="median")


# --- quantize: gather, straight-through, commitment --------------------------------------------

def _codebook_of_mixed_norms(seed, num_codes, dim):
    scales = np.random.default_rng(seed).uniform(0.2, 5.0, size=(num_codes, 1))
    return (randn(seed + 1, num_codes, dim) * scales).astype(np.float32)


def test_quantize_gathers_raw_rows_for_any_leading_shape():
    x = randn(12, 2, 3, 5, 16)
    cb = _codebook_of_mixed_norms(13, 300, 16)
    out = jax.jit(functools.partial(quantize, metric="cosine", chunk_size=64))(x, cb)
    _, ref_i, _ = brute_force(x.reshape(-1, 16), cb, 1, "cosine")
    assert out.indices.shape == (2, 3, 5) and out.topk_indices.shape == (2, 3, 5, 1)
    np.testing.assert_array_equal(np.asarray(out.indices).ravel(), ref_i[:, 0])
    # The raw (unnormalised) word vector is passed on, exactly.
    np.testing.assert_array_equal(np.asarray(out.quantized), cb[np.asarray(out.indices)])
    np.testing.assert_allclose(np.asarray(out.quantized_st), np.asarray(out.quantized),
                               rtol=1e-6, atol=1e-6)
    ref_commit = np.mean((cb[ref_i[:, 0]].astype(np.float64) - x.reshape(-1, 16)) ** 2)
    np.testing.assert_allclose(float(out.commitment), ref_commit, rtol=1e-5)


def test_straight_through_and_frozen_codebook_gradients():
    x = jnp.asarray(randn(14, 4, 6, 16))
    cb = jnp.asarray(_codebook_of_mixed_norms(15, 250, 16))
    w = jnp.asarray(randn(16, 4, 6, 16))

    def f(q):
        return jnp.sum(jnp.sin(q) * w)

    def loss(x, cb):
        out = quantize(x, cb, metric="cosine", chunk_size=64)
        return f(out.quantized_st), out

    (gx, gcb), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, cb)
    # Identity pass-through: d f(q_st)/dx equals f's gradient evaluated at the quantized vectors.
    np.testing.assert_allclose(np.asarray(gx), np.asarray(jax.grad(f)(out.quantized)),
                               rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(gcb) == 0.0)

    def commit(x, cb):
        return quantize(x, cb, metric="cosine", chunk_size=64).commitment

    # Even the raw gathered rows are cut off from the (frozen) codebook.
    gcb_q = jax.jit(jax.grad(lambda cb: f(quantize(x, cb, chunk_size=64).quantized)))(cb)
    assert np.all(np.asarray(gcb_q) == 0.0)

    gx_c, gcb_c = jax.jit(jax.grad(commit, argnums=(0, 1)))(x, cb)
    q = np.asarray(out.quantized, np.float64)
    want = 2.0 * (np.asarray(x, np.float64) - q) / q.size
    np.testing.assert_allclose(np.asarray(gx_c), want, rtol=1e-5, atol=1e-9)
    assert np.all(np.asarray(gcb_c) == 0.0)


def _np_straight_through_grad(x, cb, w, beta, mode):
    """Hand-derived float64 gradient of L = sum(w * q_st) + beta * commitment w.r.t. x [N, D].

    q is x's nearest row by cosine (the same for both modes). With s the vector the
    straight-through sees (x, or u = x / |x|): q_st = s + sg(q - s), commitment = mean((q - s)^2),
    so dL/ds = w - 2 beta (q - s) / (N D); 'raw': dL/dx = dL/ds; 'normalized': ds/dx =
    (I - u u^T) / |x|, so dL/dx = (g - u (u . g)) / |x| with g = dL/ds.
    """
    x = np.asarray(x, np.float64)
    _, idx, _ = brute_force(x, cb, 1, "cosine")
    q = np.asarray(cb, np.float64)[idx[:, 0]]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    s = x if mode == "raw" else x / norm
    g = np.asarray(w, np.float64) - 2.0 * beta * (q - s) / q.size
    if mode == "raw":
        return g
    return (g - s * np.sum(s * g, axis=1, keepdims=True)) / norm


@pytest.mark.parametrize("mode", ["raw", "normalized"])
def test_straight_through_on_raw_or_normalized_gradients(mode):
    """The released quantizer (lqae/models/lqae.py LanguageQuantizer.__call__) applies the
    straight-through and the commitment to the RAW x ('raw', the default); 'normalized' (this
    project's earlier behaviour) to x / |x|. Tiny shapes, against the float64 derivation; the two
    modes' gradients differ (encoder outputs of norm ~3, far from 1)."""
    x = jnp.asarray(randn(30, 6, 8, scale=3.0))
    cb = jnp.asarray(_codebook_of_mixed_norms(31, 40, 8))
    w = jnp.asarray(randn(32, 6, 8))
    beta = 0.7

    def loss(x):
        out = quantize(x, cb, metric="cosine", chunk_size=16, straight_through_on=mode)
        return jnp.sum(w * out.quantized_st) + beta * out.commitment

    got = np.asarray(jax.jit(jax.grad(loss))(x))
    want = _np_straight_through_grad(x, cb, w, beta, mode)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    other = _np_straight_through_grad(x, cb, w, beta, "normalized" if mode == "raw" else "raw")
    assert np.abs(got - other).max() > 0.1  # the test tells the two modes apart
    # The forward value is the raw word vector in both modes; only the gradients differ.
    out = quantize(x, cb, metric="cosine", chunk_size=16, straight_through_on=mode)
    np.testing.assert_allclose(np.asarray(out.quantized_st), np.asarray(out.quantized),
                               rtol=1e-5, atol=1e-5)
    assert quantize(x, cb, metric="cosine", chunk_size=16).commitment == pytest.approx(
        float(quantize(x, cb, metric="cosine", chunk_size=16,
                       straight_through_on="raw").commitment))  # 'raw' is the default


def test_straight_through_on_rejects_unknown_mode():
    with pytest.raises(ValueError, match="straight_through_on='unit'"):
        quantize(jnp.ones((2, 4)), jnp.ones((3, 4)), straight_through_on="unit")


def test_topk_mean_and_random():
    x = randn(17, 300, 12)
    cb = randn(18, 400, 12)
    _, ref_i, _ = brute_force(x, cb, 3, "l2")
    mean = jax.jit(functools.partial(quantize, metric="l2", k=3, topk_mode="mean",
                                     chunk_size=64))(x, cb)
    np.testing.assert_array_equal(np.asarray(mean.topk_indices), ref_i)
    np.testing.assert_array_equal(np.asarray(mean.indices), ref_i[:, 0])
    np.testing.assert_allclose(np.asarray(mean.quantized),
                               cb.astype(np.float64)[ref_i].mean(axis=1), rtol=1e-5, atol=1e-6)

    rnd = jax.jit(functools.partial(quantize, metric="l2", k=3, topk_mode="random",
                                    chunk_size=64))(x, cb, rng=jax.random.key(0))
    chosen = np.asarray(rnd.indices)
    pos = np.argmax(ref_i == chosen[:, None], axis=1)
    assert np.all(ref_i[np.arange(300), pos] == chosen)  # always one of the top 3
    assert np.all(np.bincount(pos, minlength=3) > 60)  # each rank is drawn (~100 expected each)
    np.testing.assert_array_equal(np.asarray(rnd.quantized), cb[chosen])


# --- usage statistics -------------------------------------------------------------------------

def test_usage_and_perplexity_hand_computed():
    usage = jax.jit(codebook_usage, static_argnums=1)
    ppl = jax.jit(perplexity, static_argnums=1)
    uniform = jnp.tile(jnp.arange(4), 25).reshape(10, 10)  # 4 codes, 25 times each
    assert float(usage(uniform, 10)) == pytest.approx(0.4)
    assert float(ppl(uniform, 10)) == pytest.approx(4.0, rel=1e-6)
    one = jnp.full((7, 3), 6)
    assert float(usage(one, 10)) == pytest.approx(0.1)
    assert float(ppl(one, 10)) == pytest.approx(1.0, rel=1e-6)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, so perplexity = 2^1.5.
    skew = jnp.array([3, 3, 1, 8])
    assert float(ppl(skew, 10)) == pytest.approx(2.0 ** 1.5, rel=1e-6)
    assert float(usage(skew, 10)) == pytest.approx(0.3)
    # Masked-out positions (padding) do not count.
    mask = jnp.array([True, True, False, False])
    assert float(usage(skew, 10, mask)) == pytest.approx(0.1)
    assert float(ppl(skew, 10, mask)) == pytest.approx(1.0, rel=1e-6)


# --- memory bound -----------------------------------------------------------------------------

def test_chunked_search_never_builds_the_distance_matrix():
    n, num_codes, dim = 4096, 32768, 64
    full_matrix = n * num_codes * 4  # 512 MiB of float32 distances
    xs = jax.ShapeDtypeStruct((n, dim), jnp.float32)
    cbs = jax.ShapeDtypeStruct((num_codes, dim), jnp.float32)

    def temp_bytes(fn):
        return jax.jit(fn).lower(xs, cbs).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(functools.partial(nearest_neighbors, chunk_size=1024))
    rows = temp_bytes(functools.partial(nearest_neighbors, chunk_size=1024, row_chunk_size=512))
    brute = temp_bytes(lambda a, b: jnp.argmin(jnp.sum(b * b, -1)[None] - 2.0 * a @ b.T, axis=1))
    # One [N, chunk] float32 block is N*K*4/32; allow two of them plus small buffers.
    assert chunked < full_matrix / 8, chunked
    assert rows < full_matrix / 64, rows
    assert brute >= full_matrix, brute  # the check can fail: the naive version is caught


# --- vocab-sharded search ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    return make_mesh({"data": 2, "fsdp": 1, "tensor": 4})


# (50, 1001): neither N nor K divides the mesh, so both are padded.
@pytest.mark.parametrize("metric,k,n,num_codes", [
    ("l2", 1, 64, 1024), ("l2", 4, 50, 1001), ("cosine", 1, 50, 1001), ("cosine", 4, 64, 1024)])
def test_sharded_equals_unsharded(mesh, metric, k, n, num_codes):
    x, cb = randn(20, n, 16), randn(21, num_codes, 16)
    cb[900] = cb[3]  # a cross-shard tie: shard 0 must win
    x[:4] = cb[3]
    kw = dict(k=k, metric=metric, chunk_size=128)
    d, i = search(x, cb, **kw)
    sharded = jax.jit(functools.partial(nearest_neighbors_sharded, mesh=mesh, row_chunk_size=16,
                                        **kw))
    ds, is_ = (np.asarray(a) for a in sharded(x, cb))
    np.testing.assert_array_equal(is_, i)
    np.testing.assert_array_equal(ds, d)
    np.testing.assert_array_equal(i, brute_force(x, cb, k, metric)[1])
    assert np.all(i[:4, 0] == 3)


def test_quantize_with_sharded_search(mesh):
    x, cb = randn(22, 8, 8, 16), randn(23, 1001, 16)
    search_fn = functools.partial(nearest_neighbors_sharded, mesh=mesh)
    out = jax.jit(functools.partial(quantize, chunk_size=128, search_fn=search_fn))(x, cb)
    ref = jax.jit(functools.partial(quantize, chunk_size=128))(x, cb)
    np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(ref.indices))
    np.testing.assert_array_equal(np.asarray(out.quantized), np.asarray(ref.quantized))


def test_sharded_rejects_bad_axes(mesh):
    x, cb = jnp.zeros((8, 4)), jnp.ones((16, 4))
    with pytest.raises(ValueError, match="not in the mesh"):
        nearest_neighbors_sharded(x, cb, mesh, codebook_axis="model")
    with pytest.raises(ValueError, match="also in batch_axes"):
        nearest_neighbors_sharded(x, cb, mesh, codebook_axis="data")
    with pytest.raises(ValueError, match="k=5"):
        nearest_neighbors_sharded(x, cb, mesh, k=5)


def test_codebook_loss_and_its_gradient_against_numpy():
    """The VQ-VAE codebook term of a learned codebook: its value and its gradient w.r.t. the
    table (2 / M * sum over the tokens coded k of (C_k - s_i), 0 for unused rows) in float64, and
    no gradient to the target (stop_gradient)."""
    cb = randn(0, 12, 5)
    s = randn(1, 3, 4, 5)
    idx = np.array(jax.jit(lambda x, c: quantize(x, c).indices)(s, cb))
    idx[0, 0] = idx[0, 1]  # a row used twice sums both pulls
    value, (g_cb, g_s) = jax.value_and_grad(codebook_loss, argnums=(0, 2))(
        jnp.asarray(cb), jnp.asarray(idx), jnp.asarray(s))
    c64, s64 = np.asarray(cb, np.float64), np.asarray(s, np.float64)
    diff = c64[idx] - s64  # [3, 4, 5]
    np.testing.assert_allclose(float(value), np.mean(diff ** 2), rtol=1e-6)
    want = np.zeros_like(c64)
    np.add.at(want, idx.reshape(-1), 2.0 * diff.reshape(-1, 5) / diff.size)
    np.testing.assert_allclose(np.asarray(g_cb), want, rtol=1e-5, atol=1e-7)
    unused = np.setdiff1d(np.arange(12), idx)
    assert unused.size and not np.asarray(g_cb)[unused].any()
    assert not np.asarray(g_s).any()


@pytest.mark.parametrize("mode", ["raw", "normalized"])
def test_straight_through_input_is_what_quantize_commits_to(mode):
    """quantize's commitment is mean((q - s)^2) with s = straight_through_input(x, mode): x
    itself or x / |x| (float64 reference)."""
    x, cb = randn(2, 6, 4, scale=3.0), randn(3, 9, 4)
    s = np.asarray(straight_through_input(jnp.asarray(x), mode), np.float64)
    x64 = np.asarray(x, np.float64)
    want = x64 if mode == "raw" else x64 / np.linalg.norm(x64, axis=-1, keepdims=True)
    np.testing.assert_allclose(s, want, rtol=1e-6)
    q = quantize(jnp.asarray(x), jnp.asarray(cb), straight_through_on=mode)
    np.testing.assert_allclose(float(q.commitment),
                               np.mean((np.asarray(q.quantized, np.float64) - want) ** 2),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="straight_through_on='unit'"):
        straight_through_input(jnp.asarray(x), "unit")


def test_spread_penalty_against_numpy_pairwise_cosines():
    """Mean over all ordered row pairs (i = j included) of cos^2, by an explicit [M, M] matrix in
    float64; a zero row counts as cosine 0 with everything."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 8)) + 0.7  # a shared offset: not isotropic
    x[1, 2] = 0.0
    flat = x.reshape(-1, 8)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    u = flat / np.maximum(norms, 1e-12)
    want = np.mean((u @ u.T) ** 2)
    np.testing.assert_allclose(float(spread_penalty(jnp.asarray(x, jnp.float32))), want,
                               rtol=1e-5)
    # Collapsed (all rows on one line, either sign) scores 1; D orthogonal directions 1/D.
    line = np.outer(np.array([1.0, -2.0, 3.0, 0.5]), rng.normal(size=8))
    assert float(spread_penalty(jnp.asarray(line))) == pytest.approx(1.0, rel=1e-5)
    assert float(spread_penalty(jnp.eye(8))) == pytest.approx(1 / 8, rel=1e-6)
