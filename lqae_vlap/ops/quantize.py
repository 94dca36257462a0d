"""Nearest-word quantizer: exact top-k search over a large frozen codebook, straight-through output.

LQAE quantizes every encoder token to its nearest word of a frozen word-embedding table
(RoBERTa-base: 50,265 x 768; up to ~250k words for multilingual tables) at every step. A plain
``x @ codebook.T`` would materialise an [N, K] float32 matrix (4096 tokens x 50k words = 800 MB), so
the search here walks the codebook in chunks and keeps a running top-k; peak temporaries are
O(rows x chunk) (O(row_chunk x chunk) with ``row_chunk_size``).

Conventions shared by every function in this file:
  * metric='l2': squared Euclidean distance ``|x|^2 - 2 x.c + |c|^2``; returned distances ascend.
  * metric='cosine': the search ranks by cosine similarity of the raw vectors (equivalent to L2-
    normalising both sides, as LQAE does); the returned value is the cosine DISTANCE ``1 - cos``
    in [0, 2], ascending, so "smaller is closer" holds for both metrics. A zero codebook row (e.g. a
    padding embedding) has cosine 0 with everything.
  * Ties: among codes with exactly equal scores the LOWEST index wins (and comes first in top-k).
  * The search ranks by float32-accumulated matmul scores; the returned distances are then
    recomputed elementwise from the chosen rows (exact 0 for x equal to a row) and the k results
    sorted by (distance, index). Codes whose true distances differ by less than float32 rounding
    of the matmul may therefore swap; anything larger is exact.
  * The search is not differentiable: its inputs are wrapped in ``stop_gradient`` and indices are
    int32. Gradients reach ``x`` only through ``quantize``'s straight-through output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

_METRICS = ("l2", "cosine")
_TOPK_MODES = ("mean", "random")
# What the straight-through estimator and the commitment term see: the raw x (the released LQAE
# quantizer, lqae/models/lqae.py LanguageQuantizer.__call__, which L2-normalises only the copy it
# searches with) or x / |x|.
STRAIGHT_THROUGH_ON = ("raw", "normalized")
# Norm floor for cosine, as in torch.nn.functional.normalize: a zero vector gets cosine 0, not NaN.
_NORM_EPS = 1e-12


def _check_args(x: jax.Array, codebook: jax.Array, k: int, metric: str, chunk_size: int,
                row_chunk_size: int | None) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {_METRICS}")
    if x.ndim != 2 or codebook.ndim != 2:
        raise ValueError(
            f"nearest_neighbors expects x [N, D] and codebook [K, D], got shapes {x.shape} and "
            f"{codebook.shape}; flatten leading axes first (or call quantize, which does)")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"feature sizes differ: x has D={x.shape[1]} but the codebook has "
            f"D={codebook.shape[1]}; project x to the codebook width before quantizing")
    if not 1 <= k <= codebook.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the codebook size {codebook.shape[0]}")
    if chunk_size < k:
        raise ValueError(f"chunk_size={chunk_size} must be >= k={k}; raise chunk_size")
    if row_chunk_size is not None and row_chunk_size < 1:
        raise ValueError(f"row_chunk_size={row_chunk_size} must be a positive int or None")


def codebook_sq_norms(codebook: jax.Array) -> jax.Array:
    """|c|^2 per row in float32. codebook: [K, D] -> [K].

    Precompute once for a frozen codebook and pass it as ``codebook_sq_norms`` to skip the pass.
    """
    return jnp.sum(jnp.square(codebook.astype(jnp.float32)), axis=-1)


def _chunk_scores(x: jax.Array, chunk: jax.Array, sq: jax.Array, metric: str) -> jax.Array:
    """Larger-is-better scores of x [R, D] against chunk [C, D] -> [R, C] float32.

    l2 drops the per-row constant |x|^2; cosine drops the positive per-row factor 1/|x|. Neither
    changes the ranking; the returned distances are recomputed in ``_candidate_distances``.
    """
    dot = lax.dot_general(x, chunk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if metric == "l2":
        return 2.0 * dot - sq[None, :]
    return dot / jnp.maximum(jnp.sqrt(sq), _NORM_EPS)[None, :]


def _local_topk(x: jax.Array, codebook: jax.Array, sq: jax.Array, *, k: int, metric: str,
                chunk_size: int, row_chunk_size: int | None,
                valid_limit: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """Top-k scores and indices of x [N, D] over codebook rows [0, valid_limit).

    Returns scores [N, k] float32 (descending) and indices [N, k] int32 (local to ``codebook``).
    """
    n, num_rows = x.shape[0], codebook.shape[0]
    chunk = min(chunk_size, num_rows)
    num_chunks = -(-num_rows // chunk)

    def search_rows(xr: jax.Array) -> tuple[jax.Array, jax.Array]:
        def body(i, carry):
            best_s, best_i = carry
            # The last chunk is shifted back to end at num_rows (instead of padding the codebook,
            # which would copy the whole table every call); rows it shares with the previous chunk
            # are masked, so every row is considered exactly once.
            nominal = i * chunk
            start = jnp.minimum(nominal, num_rows - chunk)
            cb = lax.dynamic_slice_in_dim(codebook, start, chunk, axis=0).astype(xr.dtype)
            sqc = lax.dynamic_slice_in_dim(sq, start, chunk, axis=0)
            s = _chunk_scores(xr, cb, sqc, metric)
            idx = start + jnp.arange(chunk, dtype=jnp.int32)
            s = jnp.where((idx >= nominal) & (idx < valid_limit), s, -jnp.inf)
            cs, ci = lax.top_k(s, k)
            # Running candidates go first: they hold lower indices, and top_k keeps the lower
            # position on equal values, so ties resolve to the lowest index.
            ms, mpos = lax.top_k(jnp.concatenate([best_s, cs], axis=1), k)
            mi = jnp.take_along_axis(jnp.concatenate([best_i, ci + start], axis=1), mpos, axis=1)
            return ms, mi

        init = (jnp.full((xr.shape[0], k), -jnp.inf, jnp.float32),
                jnp.zeros((xr.shape[0], k), jnp.int32))
        return lax.fori_loop(0, num_chunks, body, init)

    if row_chunk_size is None or row_chunk_size >= n:
        return search_rows(x)
    num_blocks = -(-n // row_chunk_size)
    xp = jnp.pad(x, ((0, num_blocks * row_chunk_size - n), (0, 0)))
    s, i = lax.map(search_rows, xp.reshape(num_blocks, row_chunk_size, x.shape[1]))
    return s.reshape(-1, k)[:n], i.reshape(-1, k)[:n]


def _pairwise_sum(v: jax.Array) -> jax.Array:
    """Sum over the last axis by halving: v [..., D] -> [...].

    A fixed tree of elementwise adds, so each result's rounding depends only on its own D values,
    never on the array's other dimensions (XLA's reduce may vectorise differently per shape). D is
    zero-padded to a power of two; adding 0 is exact.
    """
    width = 1 << max(v.shape[-1] - 1, 0).bit_length()
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, width - v.shape[-1])])
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]


def _candidate_distances(x: jax.Array, codebook: jax.Array, scores: jax.Array, idx: jax.Array,
                         metric: str) -> jax.Array:
    """Distances of x [N, D] to its candidates codebook[idx] (idx: [N, k]) -> [N, k] float32.

    Recomputed elementwise from the gathered rows rather than from the matmul scores: this avoids
    the |x|^2 - 2x.c + |c|^2 cancellation (x equal to a row gives exactly 0), and the value no
    longer depends on the matmul's shape, which on XLA:CPU changes the last bits of a dot product;
    so the sharded and unsharded searches return identical distances. Candidates whose score is
    -inf (masked rows) get +inf.
    """
    xf = x.astype(jnp.float32)[:, None, :]
    rows = jnp.take(codebook, idx, axis=0).astype(jnp.float32)
    if metric == "l2":
        dist = _pairwise_sum(jnp.square(xf - rows))
    else:
        x_norm = jnp.maximum(jnp.sqrt(_pairwise_sum(jnp.square(xf))), _NORM_EPS)
        c_norm = jnp.maximum(jnp.sqrt(_pairwise_sum(jnp.square(rows))), _NORM_EPS)
        cos = _pairwise_sum(xf * rows) / (x_norm * c_norm)
        dist = jnp.clip(1.0 - cos, 0.0, 2.0)
    return jnp.where(scores == -jnp.inf, jnp.inf, dist)


def _sort_candidates(dist: jax.Array, idx: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k best of [N, M] candidates: ascending distance, then ascending index."""
    dist, idx = lax.sort((dist, idx), dimension=1, num_keys=2)
    return dist[:, :k], idx[:, :k]


def _prepare(x: jax.Array, codebook: jax.Array, sq: jax.Array | None, k: int, metric: str,
             chunk_size: int, row_chunk_size: int | None):
    """Validates, cuts gradients, and casts x to the common dtype; returns (x, codebook, |c|^2)."""
    x = lax.stop_gradient(jnp.asarray(x))
    codebook = lax.stop_gradient(jnp.asarray(codebook))
    _check_args(x, codebook, k, metric, chunk_size, row_chunk_size)
    dtype = jnp.result_type(x.dtype, codebook.dtype)
    if sq is None:
        sq = codebook_sq_norms(codebook)
    sq = lax.stop_gradient(jnp.asarray(sq, jnp.float32))
    if sq.shape != codebook.shape[:1]:
        raise ValueError(f"codebook_sq_norms has shape {sq.shape}, expected "
                         f"({codebook.shape[0]},); compute it with codebook_sq_norms(codebook)")
    # Only x is cast up front; codebook chunks are cast inside the loop, so a bf16 table searched
    # with float32 queries is never copied whole to float32.
    return x.astype(dtype), codebook, sq


def nearest_neighbors(x: jax.Array, codebook: jax.Array, *, k: int = 1, metric: str = "l2",
                      chunk_size: int = 4096, row_chunk_size: int | None = None,
                      codebook_sq_norms: jax.Array | None = None,
                      num_codes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Exact top-k nearest codebook rows, chunked over the codebook (never an [N, K] matrix).

    Args:
      x: [N, D] queries. codebook: [K, D]. Any float dtypes; the matmul runs in their common dtype
        (bf16 is fine) and accumulates in float32.
      k: neighbours per query. metric: 'l2' or 'cosine' (see the module docstring).
      chunk_size: codebook rows scored at once; temporaries are O(N x chunk_size).
      row_chunk_size: if set, queries are also processed in blocks of this many rows, bounding
        temporaries to O(row_chunk_size x chunk_size).
      codebook_sq_norms: optional precomputed |c|^2 [K] (float32), for a frozen codebook.
      num_codes: if set, only rows [0, num_codes) may be returned (for a codebook padded to a
        multiple of some size); default all K.

    Returns:
      (distances [N, k] float32 ascending, indices [N, k] int32). Distances are squared L2 or
      ``1 - cos``; equal distances are ordered by lowest index. Neither carries gradients.
    """
    x, codebook, sq = _prepare(x, codebook, codebook_sq_norms, k, metric, chunk_size,
                               row_chunk_size)
    limit = codebook.shape[0] if num_codes is None else num_codes
    if not k <= limit <= codebook.shape[0]:
        raise ValueError(f"num_codes={num_codes} must be in [k={k}, K={codebook.shape[0]}]")
    scores, idx = _local_topk(x, codebook, sq, k=k, metric=metric, chunk_size=chunk_size,
                              row_chunk_size=row_chunk_size, valid_limit=limit)
    return _sort_candidates(_candidate_distances(x, codebook, scores, idx, metric), idx, k)


def nearest_neighbors_sharded(x: jax.Array, codebook: jax.Array, mesh: Mesh, *,
                              codebook_axis: str = "tensor",
                              batch_axes: Sequence[str] = ("data", "fsdp"), k: int = 1,
                              metric: str = "l2", chunk_size: int = 4096,
                              row_chunk_size: int | None = None,
                              codebook_sq_norms: jax.Array | None = None,
                              num_codes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``nearest_neighbors`` with the codebook split over codebook_axis and rows over batch_axes.

    Each codebook shard searches its slice (indices offset by the shard's start), then the shards'
    k candidates (with their recomputed distances) are all-gathered and the best k kept by
    (distance, global index), so ties still go to the lowest global index and the result equals
    ``nearest_neighbors`` bit for bit, barring codes whose matmul scores differ by float32 rounding
    only. A K that the codebook axis does not divide is padded here (a copy per call: pre-pad a
    frozen table once and pass ``num_codes`` to avoid it); N is padded to the batch shard count.
    Communication per call: an all-gather of N x k distances and indices over the codebook axis.

    Args/returns as ``nearest_neighbors``; x: [N, D], codebook: [K, D] -> ([N, k], [N, k]).
    """
    batch_axes = tuple(batch_axes)
    for name in (codebook_axis, *batch_axes):
        if name not in mesh.axis_names:
            raise ValueError(f"mesh axis {name!r} not in the mesh {mesh.axis_names}; pass "
                             "codebook_axis/batch_axes that name axes of this mesh")
    if codebook_axis in batch_axes:
        raise ValueError(f"codebook_axis {codebook_axis!r} is also in batch_axes {batch_axes}; "
                         "the codebook and the rows must be split over different mesh axes")
    x, codebook, sq = _prepare(x, codebook, codebook_sq_norms, k, metric, chunk_size,
                               row_chunk_size)
    n, num_rows = x.shape[0], codebook.shape[0]
    limit = num_rows if num_codes is None else num_codes
    if not k <= limit <= num_rows:
        raise ValueError(f"num_codes={num_codes} must be in [k={k}, K={num_rows}]")

    shards = mesh.shape[codebook_axis]
    row_shards = 1
    for name in batch_axes:
        row_shards *= mesh.shape[name]
    pad_k = -num_rows % shards
    if pad_k:
        codebook = jnp.pad(codebook, ((0, pad_k), (0, 0)))
        sq = jnp.pad(sq, (0, pad_k))
    local_rows = codebook.shape[0] // shards
    if local_rows < k:
        raise ValueError(f"each of the {shards} codebook shards holds {local_rows} rows < k={k}; "
                         "use fewer codebook shards or a smaller k")
    pad_n = -n % row_shards
    xp = jnp.pad(x, ((0, pad_n), (0, 0))) if pad_n else x

    def local(xs, cbs, sqs):
        offset = lax.axis_index(codebook_axis) * local_rows
        s, i = _local_topk(xs, cbs, sqs, k=k, metric=metric, chunk_size=chunk_size,
                           row_chunk_size=row_chunk_size, valid_limit=limit - offset)
        d = _candidate_distances(xs, cbs, s, i, metric)
        d = lax.all_gather(d, codebook_axis, axis=1, tiled=True)
        i = lax.all_gather(i + offset, codebook_axis, axis=1, tiled=True)
        return _sort_candidates(d, i, k)

    rows = P(batch_axes, None)
    dist, idx = jax.shard_map(
        local, mesh=mesh, in_specs=(rows, P(codebook_axis, None), P(codebook_axis)),
        out_specs=(rows, rows), check_vma=False)(xp, codebook, sq)
    return dist[:n], idx[:n]


def straight_through_input(x: jax.Array, straight_through_on: str = "raw") -> jax.Array:
    """What ``quantize``'s straight-through and commitment see: x [..., D] itself ('raw') or
    x / |x| ('normalized', |x|^2 floored at 1e-12), in x's dtype."""
    if straight_through_on not in STRAIGHT_THROUGH_ON:
        raise ValueError(f"straight_through_on={straight_through_on!r} is not supported; use one "
                         f"of {STRAIGHT_THROUGH_ON}")
    if straight_through_on == "raw":
        return x
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, -1, keepdims=True), 1e-12))
            ).astype(x.dtype)


def codebook_loss(codebook: jax.Array, indices: jax.Array, target: jax.Array) -> jax.Array:
    """The VQ-VAE codebook term (van den Oord et al. 2017; the authors' ``q_latent_loss``) for a
    LEARNED codebook: mean((codebook[indices] - stop_gradient(target))^2).

    codebook: [K, D] (differentiated); indices: [...] int codes from the search; target: [..., D]
    the vectors they quantize (``straight_through_input`` of the encoder output; no gradient).
    Returns a float32 scalar whose gradient moves each used row towards the mean of its targets:
    d/dC_k = 2 / M * sum_{i: indices_i = k} (C_k - target_i), M = target.size; unused rows get 0.
    """
    rows = jnp.take(codebook, indices, axis=0).astype(jnp.float32)
    return jnp.mean(jnp.square(rows - lax.stop_gradient(target).astype(jnp.float32)))


def spread_penalty(x: jax.Array) -> jax.Array:
    """Mean squared cosine over all ordered pairs of x's rows: x [..., D] -> scalar float32.

    With M rows u_i = x_i / |x_i| (a zero row stays 0): (1/M^2) sum_{i,j} (u_i . u_j)^2 =
    |U^T U|_F^2 / M^2, computed through the [D, D] Gram matrix, so the cost is O(M D^2) and no
    [M, M] matrix is built. 1 when every row is parallel or antiparallel to one direction (a
    collapsed encoder: every token the same word); its minimum 1/D is reached by rows spread
    evenly over D orthogonal directions (random isotropic rows give about 1/M + 1/D). A
    regulariser against codebook collapse with a frozen codebook (configs/lqae_scenes.py): unlike
    a penalty on the batch mean, two antipodal clusters score 1, not 0.
    """
    u = straight_through_input(jnp.asarray(x).reshape(-1, x.shape[-1]), "normalized")
    u = u.astype(jnp.float32)
    gram = u.T @ u  # [D, D]
    return jnp.sum(jnp.square(gram)) / jnp.square(jnp.float32(u.shape[0]))


@flax.struct.dataclass
class QuantizeOutput:
    """Result of ``quantize`` for x: [..., D] (k neighbours searched).

    quantized:     [..., D] raw codebook rows (mean of the top-k rows for topk_mode='mean').
    quantized_st:  [..., D] s + stop_gradient(quantized - s), s = x (straight_through_on='raw')
                   or x / |x| ('normalized'): forward value = quantized, gradient w.r.t. s =
                   identity.
    indices:       [...] int32, the code used: the nearest one (k=1 or 'mean') or the sampled one.
    topk_indices:  [..., k] int32, nearest first. topk_distances: [..., k] float32 ascending.
    commitment:    scalar float32, mean((stop_gradient(quantized) - s)^2).
    """
    quantized: jax.Array
    quantized_st: jax.Array
    indices: jax.Array
    topk_indices: jax.Array
    topk_distances: jax.Array
    commitment: jax.Array


def quantize(x: jax.Array, codebook: jax.Array, *, metric: str = "cosine", k: int = 1,
             topk_mode: str = "mean", rng: jax.Array | None = None, chunk_size: int = 4096,
             row_chunk_size: int | None = None, codebook_sq_norms: jax.Array | None = None,
             search_fn: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
             straight_through_on: str = "raw") -> QuantizeOutput:
    """Quantizes x [..., D] to the nearest rows of a frozen codebook [K, D], straight-through.

    The search uses ``metric`` (LQAE: cosine, i.e. on L2-normalised vectors), but ``quantized`` is
    the RAW codebook row, gathered (never a one-hot matmul). The codebook is frozen: it is wrapped
    in stop_gradient, so it receives no gradient.

    straight_through_on: 'raw' (default, as the released LQAE quantizer) passes the gradient of
    ``quantized_st`` to x unchanged and measures the commitment from x itself; 'normalized' uses
    s = x / |x| (|x|^2 floored at 1e-12) in both, so the gradient reaching x is projected onto
    the tangent of the unit sphere and scaled by 1/|x|. The search is the same in both modes for
    metric='cosine' (it is scale-blind); for metric='l2' it runs on s.

    For k > 1 (LQAE's top-k options): topk_mode='mean' averages the k nearest raw rows;
    topk_mode='random' picks one of the k uniformly per token using ``rng`` (required).

    ``search_fn`` replaces the search, e.g.
    ``functools.partial(nearest_neighbors_sharded, mesh=mesh)`` for a vocab-sharded codebook; it is
    called as ``search_fn(x2d, codebook, k=, metric=, chunk_size=, row_chunk_size=,
    codebook_sq_norms=)`` and must return (distances [N, k], indices [N, k]).
    """
    if topk_mode not in _TOPK_MODES:
        raise ValueError(f"topk_mode={topk_mode!r} is not supported; use one of {_TOPK_MODES}")
    if k > 1 and topk_mode == "random" and rng is None:
        raise ValueError("topk_mode='random' with k > 1 needs rng=jax.random.key(...)")
    if straight_through_on not in STRAIGHT_THROUGH_ON:
        raise ValueError(f"straight_through_on={straight_through_on!r} is not supported; use one "
                         f"of {STRAIGHT_THROUGH_ON}")
    x = jnp.asarray(x)
    codebook = lax.stop_gradient(jnp.asarray(codebook))
    if x.ndim < 1 or codebook.ndim != 2 or x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"quantize expects x [..., D] and codebook [K, D] with equal D, got "
                         f"{x.shape} and {codebook.shape}")
    x = straight_through_input(x, straight_through_on)
    lead = x.shape[:-1]
    search = nearest_neighbors if search_fn is None else search_fn
    dist, idx = search(x.reshape(-1, x.shape[-1]), codebook, k=k, metric=metric,
                       chunk_size=chunk_size, row_chunk_size=row_chunk_size,
                       codebook_sq_norms=codebook_sq_norms)
    if k == 1:
        chosen = idx[:, 0]
        quantized = jnp.take(codebook, chosen, axis=0)
    elif topk_mode == "mean":
        chosen = idx[:, 0]
        quantized = jnp.mean(jnp.take(codebook, idx, axis=0).astype(jnp.float32), axis=1)
        quantized = quantized.astype(codebook.dtype)
    else:
        pick = jax.random.randint(rng, (idx.shape[0], 1), 0, k)
        chosen = jnp.take_along_axis(idx, pick, axis=1)[:, 0]
        quantized = jnp.take(codebook, chosen, axis=0)
    quantized = quantized.reshape(*lead, x.shape[-1])
    # Straight-through: the forward pass sees the word vector, the backward pass copies dL/dq to x
    # (to x / |x| for straight_through_on="normalized", which then carries it back to x).
    quantized_st = x + lax.stop_gradient(quantized.astype(x.dtype) - x)
    commitment = jnp.mean(jnp.square(
        lax.stop_gradient(quantized).astype(jnp.float32) - x.astype(jnp.float32)))
    return QuantizeOutput(
        quantized=quantized, quantized_st=quantized_st, indices=chosen.reshape(lead),
        topk_indices=idx.reshape(*lead, k), topk_distances=dist.reshape(*lead, k),
        commitment=commitment)


def _code_counts(indices: jax.Array, codebook_size: int, mask: jax.Array | None) -> jax.Array:
    """Histogram [codebook_size] float32 of valid indices; out-of-range and masked-out ones drop."""
    flat = jnp.ravel(indices)
    keep = (flat >= 0) & (flat < codebook_size)
    if mask is not None:
        keep &= jnp.ravel(jnp.broadcast_to(mask, jnp.shape(indices))).astype(bool)
    # bincount clips out-of-range ids onto the edge bins, so they are zero-weighted instead.
    return jnp.bincount(jnp.clip(flat, 0, codebook_size - 1), weights=keep.astype(jnp.float32),
                        length=codebook_size)


def codebook_usage(indices: jax.Array, codebook_size: int,
                   mask: jax.Array | None = None) -> jax.Array:
    """Fraction of the codebook_size codes used at least once. indices: [...] int -> scalar f32.

    ``mask`` [...] (optional, bool) drops positions such as padding.
    """
    counts = _code_counts(indices, codebook_size, mask)
    return jnp.mean((counts > 0).astype(jnp.float32))


def perplexity(indices: jax.Array, codebook_size: int,
               mask: jax.Array | None = None) -> jax.Array:
    """exp(entropy) of the empirical code distribution: m for uniform use of m codes, 1 for one.

    indices: [...] int -> scalar float32 (1.0 when no position is counted).
    """
    counts = _code_counts(indices, codebook_size, mask)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    # 0 log 0 = 0: unused codes contribute nothing.
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)
