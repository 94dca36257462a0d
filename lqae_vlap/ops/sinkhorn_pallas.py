"""Fused Sinkhorn-Knopp in Pallas (Triton on GPU, interpreted on CPU): `sinkhorn_fused`.

Same assignments as `ops.sinkhorn.sinkhorn` (log domain, column step first, Q = batch * P), but
with the passes over the [B, K] scores fused so that each one reads the scores once and keeps
every log-sum-exp as a streaming (running max, running sum) pair:

    pass 0   "col":   f = f0 (0, or -inf for r_b = 0)      -> column partials of S/eps + f
    pass i   "fused": row LSE_k(S/eps + g) -> f = log r - LSE (one sweep over K),
                      then column partials of S/eps + f    (a second sweep, in reverse K order)
    last     "plan":  row LSE_k(S/eps + g) (one sweep), then Q = batch r_b softmax_k (one sweep
                      that reads S and writes Q, in reverse K order)

A program owns `block_rows` rows and walks K in chunks of `block_cols` (powers of two, as
Triton needs; the ragged last chunk of K = 50,272 and the ragged last row block are masked).
Column partials are written as a [num_row_blocks, K] (max, sum) pair; a cheap jnp reduction over
the row blocks turns them into the column LSE and hence g = log c - LSE.

HBM traffic for n iterations: 2n + 1 reads of the scores and one write of Q (8 passes for n = 3),
against ~4 reads per iteration for the lax version (logsumexp reads twice: max, then sum) plus
3 reads and a write for the final softmax. The second sweep of a "fused"/"plan" program re-reads
rows it has just read; it runs in reverse K order so the most recent chunks may still be in L2,
but a row block (block_rows x K x 4 bytes, 12.9 MB at 64 x 50,272) does not fit on chip, so
expect two HBM reads per fused pass. Reaching one read per iteration needs a row resident in
shared memory (Mosaic GPU, one row = 201 KB of the H100's 227 KB) and cross-row column sums by
atomics, which this file does not attempt.

On a device mesh (`mesh=`): XLA's SPMD partitioner does not split a pallas_call, so the rows are
split explicitly with jax.shard_map over the batch axes (words replicated). The row steps and the
plan only need a device's own rows; the column step couples all rows, so each iteration every
device reduces its row blocks' partials to one (max, sum) pair per word and the devices combine
them with a pmax and a psum of [K] floats (2 x 201 KB at K = 50,272) - the scores never move.

On GPU the kernel is lowered with Triton (`plgpu.CompilerParams`; without it jax 0.10 picks
Mosaic GPU, which rejects these masked, unaligned loads). TPU is not supported (use the lax
version). Not differentiable: the scores are stop_gradient'ed, as in `sinkhorn` by default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import Mesh, PartitionSpec as P

from lqae_vlap.ops import sinkhorn as _lax_sinkhorn

__all__ = ["sinkhorn_fused"]

_MODES = ("col", "fused", "plan")


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


# --- the kernel ----------------------------------------------------------------------------------


def _kernel(s_ref, eps_ref, g_ref, f_ref, logr_ref, scale_ref, *out_refs,
            mode: str, n_rows: int, n_cols: int, block_rows: int, block_cols: int, dtype):
    """One program = `block_rows` rows of the scores; see the module docstring for the modes.

    s_ref: [B, K] scores; eps_ref: [1]; g_ref: [K] column potential; f_ref: [B] row potential
    (read in "col" mode only); logr_ref: [B] log row marginal; scale_ref: [B] batch * r_b.
    Outputs: "col": (col_max, col_sum) [num_row_blocks, K]; "fused": (f [B], col_max, col_sum);
    "plan": (q [B, K]).
    """
    r0 = pl.program_id(0) * block_rows
    rows = r0 + jnp.arange(block_rows)
    rows_ok = rows < n_rows
    row_slice = pl.ds(r0, block_rows)
    n_chunks = pl.cdiv(n_cols, block_cols)
    neg_inf = jnp.asarray(-jnp.inf, dtype)
    eps = plgpu.load(eps_ref).astype(dtype)  # [1]; broadcasts against a [rows, cols] tile

    def tile(j):
        """Scores / epsilon of chunk j: [block_rows, block_cols], -inf outside the matrix."""
        c0 = j * block_cols
        cols = c0 + jnp.arange(block_cols)
        cols_ok = cols < n_cols
        ok = rows_ok[:, None] & cols_ok[None, :]
        s = plgpu.load(s_ref.at[row_slice, pl.ds(c0, block_cols)], mask=ok, other=0.0)
        # Divide (not multiply by 1/eps) so the log kernel is bit-identical to the lax version.
        z = jnp.where(ok, s.astype(dtype) / eps, neg_inf)
        return z, c0, cols_ok, ok

    def row_stats():
        """Per row: running max m and sum l of exp(S/eps + g - m) over K: [block_rows] each."""

        def body(j, carry):
            m, l = carry
            z, c0, cols_ok, _ = tile(j)
            g = plgpu.load(g_ref.at[pl.ds(c0, block_cols)], mask=cols_ok, other=-jnp.inf)
            z = z + g.astype(dtype)[None, :]
            m_new = jnp.maximum(m, jnp.max(z, axis=1))
            # A row that is -inf so far (masked) keeps m = -inf; shift by 0 to avoid inf - inf.
            shift = jnp.where(m_new == neg_inf, jnp.zeros_like(m_new), m_new)
            l = l * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
            return m_new, l

        init = (jnp.full((block_rows,), -jnp.inf, dtype), jnp.zeros((block_rows,), dtype))
        return lax.fori_loop(0, n_chunks, body, init)

    logr = plgpu.load(logr_ref.at[row_slice], mask=rows_ok, other=0.0).astype(dtype)
    row_dead = (logr == neg_inf) | ~rows_ok  # r_b = 0 or outside the batch: no part at all

    if mode == "col":
        f = plgpu.load(f_ref.at[row_slice], mask=rows_ok, other=-jnp.inf).astype(dtype)
    else:
        m, l = row_stats()
        if mode == "fused":
            f = jnp.where(row_dead, neg_inf, logr - (m + jnp.log(l)))
            plgpu.store(out_refs[0].at[row_slice], f.astype(out_refs[0].dtype), mask=rows_ok)

    if mode == "plan":
        (q_ref,) = out_refs
        scale = plgpu.load(scale_ref.at[row_slice], mask=rows_ok, other=0.0).astype(dtype)
        # exp(z - m) / l as in jax.nn.softmax, so the large potentials never enter an exponent.
        coef = jnp.where(row_dead, jnp.zeros_like(scale), scale / l)
        m_safe = jnp.where(m == neg_inf, jnp.zeros_like(m), m)

        def write(j, _):
            j = n_chunks - 1 - j  # reverse order: the last chunks read may still be in L2
            z, c0, cols_ok, ok = tile(j)
            g = plgpu.load(g_ref.at[pl.ds(c0, block_cols)], mask=cols_ok, other=-jnp.inf)
            q = jnp.exp(z + g.astype(dtype)[None, :] - m_safe[:, None]) * coef[:, None]
            plgpu.store(q_ref.at[row_slice, pl.ds(c0, block_cols)], q.astype(q_ref.dtype),
                        mask=ok)
            return 0

        lax.fori_loop(0, n_chunks, write, 0)
        return

    max_ref, sum_ref = out_refs[-2:]
    f = jnp.where(row_dead, neg_inf, f)
    blk = pl.program_id(0)

    def col_body(j, _):
        j = n_chunks - 1 - j
        z, c0, cols_ok, _ = tile(j)
        y = z + f[:, None]
        cm = jnp.max(y, axis=0)
        shift = jnp.where(cm == neg_inf, jnp.zeros_like(cm), cm)
        cs = jnp.sum(jnp.exp(y - shift[None, :]), axis=0)
        cols = pl.ds(c0, block_cols)
        plgpu.store(max_ref.at[pl.ds(blk, 1), cols], cm[None, :], mask=cols_ok[None, :])
        plgpu.store(sum_ref.at[pl.ds(blk, 1), cols], cs[None, :], mask=cols_ok[None, :])
        return 0

    lax.fori_loop(0, n_chunks, col_body, 0)


def _call(mode, scores, eps, g, f, log_r, scale, *, dtype, block_rows, block_cols, interpret,
          num_warps):
    n_rows, n_cols = scores.shape
    n_blocks = pl.cdiv(n_rows, block_rows)
    partial = jax.ShapeDtypeStruct((n_blocks, n_cols), dtype)
    out_shape = {
        "col": (partial, partial),
        "fused": (jax.ShapeDtypeStruct((n_rows,), dtype), partial, partial),
        "plan": (jax.ShapeDtypeStruct((n_rows, n_cols), dtype),),
    }[mode]
    kernel = functools.partial(
        _kernel, mode=mode, n_rows=n_rows, n_cols=n_cols, block_rows=block_rows,
        block_cols=block_cols, dtype=dtype)
    # Whole arrays are passed (no BlockSpec): the kernel slices its rows itself and masks the
    # ragged edges, which Triton allows for any array shape (only loaded tiles must be 2^n).
    return pl.pallas_call(
        kernel,
        grid=(n_blocks,),
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        name=f"sinkhorn_{mode}",
    )(scores, eps, g, f, log_r, scale)


def _col_potential(log_c, col_max, col_sum, axes=()):
    """g = log c - LSE over the row blocks of the partial (max, sum) pairs: [K].

    col_max, col_sum: [num_row_blocks, K] of this device's rows. With mesh `axes` (inside
    shard_map) the other devices' rows enter through one pmax and one psum of [K] floats, so the
    column LSE is over the whole batch while the row steps stay local.
    """
    top = jnp.max(col_max, axis=0)
    if axes:
        top = lax.pmax(top, axes)
    shift = jnp.where(jnp.isneginf(top), 0.0, top)
    total = jnp.sum(col_sum * jnp.exp(col_max - shift[None, :]), axis=0)
    if axes:
        total = lax.psum(total, axes)
    lse = shift + jnp.log(total)
    return jnp.where(jnp.isneginf(log_c), -jnp.inf, log_c - lse)


def _iterations(scores, eps, log_r, scale, log_c, *, num_iters, axes, dtype, block_rows,
                block_cols, interpret, num_warps):
    """The passes over this device's rows: scores [b, K], eps [1], log_r / scale [b], log_c [K]
    -> Q [b, K]. log_r and scale are already normalised over the whole batch; only the column
    potential needs the other devices (see `_col_potential`)."""
    call = functools.partial(_call, scores=scores, eps=eps, log_r=log_r, scale=scale, dtype=dtype,
                             block_rows=block_rows, block_cols=block_cols, interpret=interpret,
                             num_warps=num_warps)
    zeros_k = jnp.zeros((scores.shape[1],), dtype)  # placeholders for inputs a mode does not read
    f0 = _lax_sinkhorn._initial_f(log_r)
    g = _col_potential(log_c, *call("col", g=zeros_k, f=f0), axes=axes)
    for _ in range(num_iters - 1):  # num_iters is small (3): unrolled, one kernel each
        _, col_max, col_sum = call("fused", g=g, f=f0)
        g = _col_potential(log_c, col_max, col_sum, axes=axes)
    (q,) = call("plan", g=g, f=f0)
    return q


@functools.partial(
    jax.jit,
    static_argnames=("num_iters", "block_rows", "block_cols", "interpret", "num_warps", "mesh",
                     "batch_axes"))
def _sinkhorn_fused(scores, epsilon, col_marginal, row_marginal, *, num_iters, block_rows,
                    block_cols, interpret, num_warps, mesh=None, batch_axes=()):
    scores = lax.stop_gradient(scores)
    dtype = _lax_sinkhorn._compute_dtype(scores.dtype)
    batch, words = scores.shape
    # [B] / [K] vectors, normalised over the whole batch (cheap; XLA partitions these).
    log_r = _lax_sinkhorn._log_marginal(row_marginal, batch, dtype)
    log_c = _lax_sinkhorn._log_marginal(col_marginal, words, dtype)
    eps = lax.stop_gradient(jnp.asarray(epsilon, dtype)).reshape(1)
    scale = jnp.where(jnp.isneginf(log_r), 0.0, batch * jnp.exp(log_r))
    body = functools.partial(
        _iterations, num_iters=num_iters, axes=batch_axes if mesh is not None else (),
        dtype=dtype, block_rows=block_rows, block_cols=block_cols, interpret=interpret,
        num_warps=num_warps)
    if mesh is None:
        return body(scores, eps, log_r, scale, log_c)
    # pallas_call is opaque to the SPMD partitioner (it would gather the [B, K] scores onto every
    # device), so the split is explicit: rows over batch_axes, the words replicated. Axes not
    # in batch_axes (e.g. tensor) see the same rows and compute the same Q.
    rows, vec = P(batch_axes, None), P(batch_axes)
    # check_vma=False: pallas_call has no varying-manual-axes rule; the out_spec is exact anyway.
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, P(), vec, vec, P()), out_specs=rows,
                         check_vma=False)(scores, eps, log_r, scale, log_c)


def _default_interpret() -> bool:
    backend = jax.default_backend()
    if backend == "cpu":
        return True
    if backend == "tpu":
        raise NotImplementedError(
            "sinkhorn_fused: the kernel is written for Triton (GPU); on TPU use "
            "ops.sinkhorn.sinkhorn(..., impl='lax'), or interpret=True to debug."
        )
    return False


def _check_mesh(mesh, batch_axes, batch: int, fn: str) -> tuple[str, ...]:
    """Validates the mesh and the batch axes; returns batch_axes as a tuple."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh (e.g. the trainer's mesh), got "
                        f"{type(mesh).__name__}; pass mesh=None to run without one.")
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if not axes or missing or len(set(axes)) != len(axes):
        raise ValueError(f"{fn}: batch_axes must be distinct axes of the mesh "
                         f"{tuple(mesh.axis_names)}, got {batch_axes!r}.")
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    if batch % shards:
        raise ValueError(
            f"{fn}: batch {batch} is not divisible by the {shards} devices of mesh axes {axes} "
            f"(each device must own batch / {shards} rows); pad the batch to a multiple of "
            f"{shards} with row_marginal 0 on the padded rows (they take no part; multiply "
            "Q[:batch] by batch / padded_batch), or use impl='lax', which XLA partitions.")
    return axes


def sinkhorn_fused(
    scores: jax.Array,
    *,
    epsilon: float,
    num_iters: int,
    col_marginal: jax.Array | None = None,
    row_marginal: jax.Array | None = None,
    interpret: bool | None = None,
    block_rows: int = 64,
    block_cols: int = 256,
    num_warps: int = 8,
    mesh: Mesh | None = None,
    batch_axes: str | tuple[str, ...] = ("data", "fsdp"),
) -> jax.Array:
    """Sinkhorn-Knopp assignments, fused Pallas kernels; same result as `sinkhorn.sinkhorn`.

    Args:
      scores: [batch, words] finite similarities, any float dtype (bf16 halves the reads);
        computed in float32 (float64 stays float64) and returned in that dtype.
      epsilon: entropic temperature (> 0), a number or scalar array (may be traced).
      num_iters: (column step, row step) iterations, a Python int >= 1 (3 in SwAV / VLAP).
      col_marginal: [words] non-negative word marginal, None = uniform; zeros give zero columns.
      row_marginal: [batch] non-negative sample marginal, None = uniform; zeros give zero rows.
      interpret: None = interpret on CPU, Triton on GPU (TPU raises); True forces the Pallas
        interpreter anywhere (slow; for tests).
      block_rows, block_cols: tile of one program step, powers of two. The column partials take
        ceil(batch / block_rows) x words x 2 floats; block_rows x block_cols floats live in
        registers (64 x 256 with 8 warps = 64 per thread).
      num_warps: Triton warps per program (ignored when interpreting).
      mesh: None runs the kernels on whatever holds the scores (a single device; under a sharded
        jit XLA would gather the whole [batch, words] matrix onto every device, as it cannot
        partition a pallas_call). A Mesh splits the rows over `batch_axes` with jax.shard_map
        (words replicated): each device runs the kernels on its batch / n rows, and the column
        partials are combined across devices each iteration (one pmax and one psum of [words]).
        Pass the trainer's mesh when calling from inside its sharded jit; the batch must divide
        evenly over the batch axes (a clear error says how to pad otherwise).
      batch_axes: mesh axis name(s) the batch is split over (the trainer's ('data', 'fsdp')).

    Returns:
      Q: [batch, words] = batch * P, rows summing to batch * r_b; not differentiable (the scores
      are stop_gradient'ed). Works under jax.vmap (an extra grid axis). With a mesh, Q comes
      back split over `batch_axes` like the rows of the scores.
    """
    fn = "sinkhorn_fused"
    num_iters = _lax_sinkhorn._check_count(num_iters, "num_iters", fn)
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols)):
        if not isinstance(value, int) or not _is_pow2(value):
            raise ValueError(
                f"{fn}: {name} must be a power of two (Triton tiles are 2^n), got {value!r}; "
                "the ragged edges of the scores are masked, so any batch / words work."
            )
    scores = _lax_sinkhorn._check_common(scores, epsilon, fn)
    batch, words = scores.shape
    col = _lax_sinkhorn._check_marginal(col_marginal, words, "col_marginal", fn)
    row = _lax_sinkhorn._check_marginal(row_marginal, batch, "row_marginal", fn)
    axes = () if mesh is None else _check_mesh(mesh, batch_axes, batch, fn)
    if interpret is None:
        interpret = _default_interpret()
    return _sinkhorn_fused(scores, epsilon, col, row, num_iters=num_iters,
                           block_rows=block_rows, block_cols=block_cols,
                           interpret=bool(interpret), num_warps=int(num_warps), mesh=mesh,
                           batch_axes=axes)
