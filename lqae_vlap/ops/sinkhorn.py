"""Sinkhorn-Knopp assignments of samples to words for VLAP, in the log domain.

Given scores S [B, K] (cosine similarities of B representations to K word embeddings), the
entropic optimal-transport plan is

    P = diag(exp(f)) exp(S / epsilon) diag(exp(g)),   P 1_K = r,   P^T 1_B = c,

with a row (sample) marginal r [B] and a column (word) marginal c [K], both summing to 1. The
assignment returned is Q = B * P, so with the default uniform r every row of Q sums to 1 and can
serve as a soft target distribution over the words (rows sum to B * r_b in general).

Sinkhorn-Knopp alternates two exact projections, the column step first as in SwAV:

    g <- log c - logsumexp_b(S / epsilon + f)      (each word k gets mass c_k)
    f <- log r - logsumexp_k(S / epsilon + g)      (each sample b gets mass r_b)

One "iteration" is one column step followed by one row step. After a fixed number of iterations
(3 in SwAV and in VLAP) the rows hold their marginal exactly and the columns approximately.
Working with the potentials f, g instead of exp(S / epsilon) keeps everything finite at the
epsilon = 0.01 VLAP uses, where exp(1 / 0.01) = e^100 overflows float32 (the NaN reports against
SwAV and ott-jax come from that).

Zero entries in a marginal are allowed: their potential is set to -inf, so the matching rows or
columns of Q are exactly 0 and no NaN appears (at least one entry of each marginal must be
positive). Such samples and words take no part at all: Q on the others equals Sinkhorn on the
scores with those rows / columns deleted (times batch / remaining batch, since Q = batch * P), so
padding a batch is safe. Scores must be finite, except that rows / columns whose marginal is 0 may
be -inf (masked).

Also here: `sinkhorn_until_converged` (tolerance-based, for checking convergence) and
`sinkhorn_released_code`, which reproduces what the VLAP authors' released training script computes
(it never normalises over the words, so it does NOT enforce the word marginal).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "sinkhorn",
    "sinkhorn_until_converged",
    "sinkhorn_released_code",
    "released_code_word_prior",
]


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    # bf16/fp16 scores lose the digits that separate nearby words once divided by epsilon = 0.01,
    # so the iterations run in at least float32 (float64 stays float64 when x64 is enabled).
    return jnp.promote_types(dtype, jnp.float32)


# --- input checks (plain Python, before anything is traced) --------------------------------------


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_common(scores, epsilon, fn: str) -> jax.Array:
    # A traced epsilon cannot be checked here; a concrete one can.
    if _is_concrete(epsilon) and not float(np.asarray(epsilon)) > 0:
        raise ValueError(
            f"{fn}: epsilon must be > 0 (the entropic temperature), got {epsilon!r}; "
            "VLAP uses 0.01, SwAV 0.05."
        )
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(
            f"{fn}: scores must be [batch, words] (2-D), got shape {scores.shape}; "
            "use jax.vmap for extra leading axes."
        )
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"{fn}: scores must be floating point, got {scores.dtype}.")
    return scores


def _check_marginal(marginal, size: int, name: str, fn: str) -> jax.Array | None:
    if marginal is None:
        return None
    marginal = jnp.asarray(marginal)
    if marginal.shape != (size,):
        raise ValueError(
            f"{fn}: {name} must have shape ({size},) to match the scores, got {marginal.shape}."
        )
    if _is_concrete(marginal):
        # Concrete values can be checked now; inside jit the caller owns this.
        m = np.asarray(marginal, np.float64)
        if not np.all(np.isfinite(m)) or np.any(m < 0):
            raise ValueError(f"{fn}: {name} must be finite and >= 0.")
        if not m.sum() > 0:
            raise ValueError(f"{fn}: {name} must have at least one positive entry.")
    return marginal


def _check_count(value, name: str, fn: str, hint: str = "") -> int:
    if not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{fn}: {name} must be a Python int >= 1, got {value!r}{hint}.")
    return int(value)


# --- the iterations (traced) ---------------------------------------------------------------------


def _safe_log(p: jax.Array) -> jax.Array:
    """log p with log 0 = -inf, and no NaN in the gradient w.r.t. p where p == 0."""
    positive = p > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, p, 1.0)), -jnp.inf)


def _log_marginal(marginal: jax.Array | None, size: int, dtype: jnp.dtype) -> jax.Array:
    """Normalised log marginal [size]; uniform when None."""
    if marginal is None:
        return jnp.full((size,), -np.log(size), dtype)
    marginal = lax.stop_gradient(marginal.astype(dtype))
    return _safe_log(marginal / jnp.sum(marginal))


def _prepare(scores, epsilon, col_marginal, row_marginal, differentiable):
    """Returns the log kernel S / epsilon [B, K], log_r [B] and log_c [K] in the compute dtype."""
    if not differentiable:
        # The assignments are targets: by default nothing flows back through them.
        scores = lax.stop_gradient(scores)
    dtype = _compute_dtype(scores.dtype)
    batch, words = scores.shape
    # No max-shift of the rows: logsumexp already stabilises, and an extra subtraction only adds
    # rounding (measured: larger float32 error against a float64 reference).
    log_k = scores.astype(dtype) / lax.stop_gradient(jnp.asarray(epsilon, dtype))
    log_r = _log_marginal(row_marginal, batch, dtype)
    return log_k, log_r, _log_marginal(col_marginal, words, dtype)


def _initial_f(log_r):
    """Row potential before the first column step: 0, so that step sees exp(S / epsilon) as in
    SwAV, except -inf for samples with r_b = 0, so they take no part at all: the result on the
    other samples is exactly Sinkhorn on the batch with those samples deleted (padding-safe)."""
    return jnp.where(jnp.isneginf(log_r), -jnp.inf, 0.0).astype(log_r.dtype)


def _iterate(log_k, log_r, log_c, f):
    """One column step then one row step; f: [B] row potential -> (f, g)."""
    lse_b = jax.nn.logsumexp(log_k + f[:, None], axis=0)
    g = jnp.where(jnp.isneginf(log_c), -jnp.inf, log_c - lse_b)
    lse_k = jax.nn.logsumexp(log_k + g[None, :], axis=1)
    f = jnp.where(jnp.isneginf(log_r), -jnp.inf, log_r - lse_k)
    return f, g


def _plan(log_k, log_r, g):
    """Transport plan P [B, K] with total mass 1, right after a row step.

    Equal to exp(log_k + f + g), but written as r_b * softmax_k(log_k + g) so the large row
    potential f never enters the final exponent (less float32 rounding in Q). Rows with
    r_b = 0 come out exactly 0, even when their scores are all -inf (a masked-out sample).
    """
    p = jnp.exp(log_r)[:, None] * jax.nn.softmax(log_k + g[None, :], axis=1)
    return jnp.where(jnp.isneginf(log_r)[:, None], 0.0, p)


@functools.partial(jax.jit, static_argnames=("num_iters", "differentiable"))
def _sinkhorn_fixed(scores, epsilon, col_marginal, row_marginal, num_iters, differentiable):
    log_k, log_r, log_c = _prepare(scores, epsilon, col_marginal, row_marginal, differentiable)
    batch, words = log_k.shape
    f0 = _initial_f(log_r)
    g0 = jnp.zeros((words,), log_k.dtype)
    # Static trip count: lowers to a scan, so reverse-mode differentiation works.
    _, g = lax.fori_loop(0, num_iters, lambda _, fg: _iterate(log_k, log_r, log_c, fg[0]), (f0, g0))
    return batch * _plan(log_k, log_r, g)


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _sinkhorn_tol(scores, epsilon, col_marginal, row_marginal, tol, max_iters):
    log_k, log_r, log_c = _prepare(scores, epsilon, col_marginal, row_marginal, False)
    batch, words = log_k.shape
    c = jnp.exp(log_c)
    tol = jnp.asarray(tol, log_k.dtype)

    def cond(state):
        it, _, _, err = state
        return (it < max_iters) & (err >= tol)

    def body(state):
        it, f, _, _ = state
        f, g = _iterate(log_k, log_r, log_c, f)
        err = jnp.sum(jnp.abs(jnp.sum(_plan(log_k, log_r, g), axis=0) - c))
        return it + 1, f, g, err

    state = (
        jnp.asarray(0, jnp.int32),
        _initial_f(log_r),
        jnp.zeros((words,), log_k.dtype),
        jnp.asarray(jnp.inf, log_k.dtype),
    )
    iters, _, g, _ = lax.while_loop(cond, body, state)
    return batch * _plan(log_k, log_r, g), iters


# --- public API ----------------------------------------------------------------------------------


def sinkhorn(
    scores: jax.Array,
    *,
    epsilon: float,
    num_iters: int,
    col_marginal: jax.Array | None = None,
    row_marginal: jax.Array | None = None,
    differentiable: bool = False,
    impl: str = "lax",
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: str | tuple[str, ...] = ("data", "fsdp"),
) -> jax.Array:
    """Sinkhorn-Knopp assignments with a fixed number of iterations (SwAV / VLAP).

    Args:
      scores: [batch, words] similarities (finite; any float dtype). bf16/fp16 inputs are
        computed in float32 and the result is float32; float64 stays float64.
      epsilon: entropic temperature (> 0), a number or a scalar array (may be traced). Scores are
        divided by it.
      num_iters: number of (column step, row step) iterations, a Python int >= 1; 3 in SwAV and
        VLAP.
      col_marginal: [words] non-negative word marginal (e.g. word frequencies); normalised to sum
        1 here. None means uniform 1/words. Zero entries give columns of exact zeros.
      row_marginal: [batch] non-negative sample marginal, normalised to sum 1; None means uniform
        1/batch. Zero entries give rows of exact zeros.
      differentiable: if False (default) the scores are wrapped in stop_gradient, so Q is a
        constant target; if True, gradients w.r.t. the scores flow through all iterations
        (never w.r.t. epsilon or the marginals).
      impl: "lax" (default; this file), "pallas" (the fused kernels of ops/sinkhorn_pallas.py:
        Triton on GPU, the Pallas interpreter on CPU, same result to float32 rounding; not
        differentiable) or "auto" (pallas on GPU unless differentiable, lax elsewhere).
      mesh, batch_axes: only for the pallas path (see `sinkhorn_fused`): under a sharded jit,
        pass the jax.sharding.Mesh the batch is split on and its batch axes, so each device
        runs the kernels on its own rows (XLA cannot partition a pallas_call). The lax path
        ignores them: XLA partitions it from the scores' sharding.

    Returns:
      Q: [batch, words] = batch * P. Row b sums to batch * r_b (1 for uniform rows); column k sums
      to approximately batch * c_k (exactly only in the limit of many iterations).
    """
    fn = "sinkhorn"
    num_iters = _check_count(
        num_iters, "num_iters", fn, "; for a tolerance use sinkhorn_until_converged"
    )
    if impl not in ("lax", "pallas", "auto"):
        raise ValueError(f"{fn}: impl must be 'lax', 'pallas' or 'auto', got {impl!r}.")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" and not differentiable else "lax"
    if impl == "pallas":
        if differentiable:
            raise ValueError(
                f"{fn}: differentiable=True needs impl='lax' (the Pallas kernels have no "
                "gradient); use impl='lax' or impl='auto'."
            )
        # Imported here: sinkhorn_pallas imports this module's helpers.
        from lqae_vlap.ops.sinkhorn_pallas import sinkhorn_fused

        return sinkhorn_fused(
            scores, epsilon=epsilon, num_iters=num_iters, col_marginal=col_marginal,
            row_marginal=row_marginal, mesh=mesh, batch_axes=batch_axes,
        )
    scores = _check_common(scores, epsilon, fn)
    batch, words = scores.shape
    col = _check_marginal(col_marginal, words, "col_marginal", fn)
    row = _check_marginal(row_marginal, batch, "row_marginal", fn)
    return _sinkhorn_fixed(scores, epsilon, col, row, num_iters, bool(differentiable))


def sinkhorn_until_converged(
    scores: jax.Array,
    *,
    epsilon: float,
    tol: float,
    max_iters: int,
    col_marginal: jax.Array | None = None,
    row_marginal: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sinkhorn-Knopp until the word marginal is met to `tol` (for checking convergence).

    Same assignments as `sinkhorn`, but iterates with lax.while_loop until

        err = sum_k | sum_b P[b, k] - c_k |  <  tol

    (L1 error of the column sums of the mass-1 plan P = Q / batch against the normalised column
    marginal; err lies in [0, 2]) or until `max_iters` iterations. The error is measured after
    each full iteration, when the rows are exact. NOT differentiable (a while_loop has no
    reverse-mode gradient); the scores are always stop_gradient'ed.

    Args:
      scores: [batch, words]; see `sinkhorn` for dtypes.
      epsilon: entropic temperature (> 0).
      tol: target L1 column-marginal error (> 0).
      max_iters: upper bound on iterations, a Python int >= 1.
      col_marginal: [words] or None (uniform); row_marginal: [batch] or None (uniform).

    Returns:
      A PAIR, unlike `sinkhorn`: (Q, iterations). Q [batch, words] as in `sinkhorn`; iterations
      an int32 scalar, the number of iterations run (== max_iters when tol was not reached).
      Under vmap each example gets its own count.
    """
    fn = "sinkhorn_until_converged"
    if _is_concrete(tol) and not float(np.asarray(tol)) > 0:
        raise ValueError(f"{fn}: tol must be > 0, got {tol!r}.")
    max_iters = _check_count(max_iters, "max_iters", fn)
    scores = _check_common(scores, epsilon, fn)
    batch, words = scores.shape
    col = _check_marginal(col_marginal, words, "col_marginal", fn)
    row = _check_marginal(row_marginal, batch, "row_marginal", fn)
    return _sinkhorn_tol(scores, epsilon, col, row, tol, max_iters)


def released_code_word_prior(frequencies: jax.Array, temperature: float = 0.25) -> jax.Array:
    """The word prior of the VLAP release: softmax(frequencies / temperature) over the words.

    frequencies: [words] normalised token frequencies (a probability vector in their code), so
    with temperature 0.25 the prior is nearly uniform (entries differ by at most a factor e^4).
    Returns [words] float32 (float64 for float64 input) summing to 1.
    """
    frequencies = jnp.asarray(frequencies)
    if frequencies.ndim != 1:
        raise ValueError(
            f"released_code_word_prior: frequencies must be [words], got {frequencies.shape}."
        )
    dtype = _compute_dtype(frequencies.dtype)
    return jax.nn.softmax(frequencies.astype(dtype) / temperature)


@functools.partial(jax.jit, static_argnames=("num_iters",))
def _released(scores, epsilon, prior, num_iters):
    scores = lax.stop_gradient(scores)
    dtype = _compute_dtype(scores.dtype)
    log_w = _log_marginal(prior, scores.shape[1], dtype)
    logits = scores.astype(dtype) / jnp.asarray(epsilon, dtype) + num_iters * log_w[None, :]
    return jax.nn.softmax(logits, axis=1)


def sinkhorn_released_code(
    scores: jax.Array, *, epsilon: float, prior: jax.Array, num_iters: int = 3
) -> jax.Array:
    """What the VLAP authors' released `distributed_sinkhorn` computes (2-D branch).

    Their loop multiplies Q = exp(S / epsilon)^T [K, B] by the prior w [K] and then normalises
    each sample over the words, `num_iters` times; no step ever normalises over the samples, so
    the result is a prior-weighted softmax per sample:

        Q[b, k] = w_k^n exp(S[b, k] / epsilon) / sum_j w_j^n exp(S[b, j] / epsilon),  n = num_iters

    (the prior enters once per iteration, i.e. cubed with their 3 iterations). Rows sum to 1, but
    the word marginal is NOT enforced: this is not optimal transport, unlike `sinkhorn`. Offered
    only to reproduce the released code; the paper's method is `sinkhorn` with col_marginal.
    Never differentiated (their code runs it under torch.no_grad).

    Args:
      scores: [batch, words]; bf16/fp16 computed and returned in float32.
      epsilon: temperature (> 0); 0.01 in their code.
      prior: [words] non-negative word weights w, e.g. `released_code_word_prior(freqs)`; their
        scale does not matter. Zero weights give zero columns.
      num_iters: their `sinkhorn_iterations` (3); the power the prior is raised to.

    Returns:
      Q: [batch, words], each row a probability distribution.
    """
    fn = "sinkhorn_released_code"
    num_iters = _check_count(num_iters, "num_iters", fn)
    scores = _check_common(scores, epsilon, fn)
    prior = _check_marginal(prior, scores.shape[1], "prior", fn)
    if prior is None:
        raise ValueError(f"{fn}: prior is required; use released_code_word_prior(frequencies).")
    return _released(scores, epsilon, prior, num_iters)


MODES = ("paper", "released_code")


def assignments(scores: jax.Array, *, mode: str = "paper", col_marginal: jax.Array | None,
                epsilon: float, num_iters: int, prior_temperature: float = 0.25,
                impl: str = "lax", mesh: Any = None) -> jax.Array:
    """VLAP's word assignments Q [B, V] (rows sum to 1) from scores [B, V], by ``mode``.

    'paper': optimal transport (``sinkhorn``) with word marginal ``col_marginal`` (uniform if
    None), ``impl`` and ``mesh`` as there. 'released_code': the authors' released computation
    (``sinkhorn_released_code``), a per-sample softmax weighted by the prior
    softmax(col_marginal / prior_temperature) (uniform if None); no word marginal is enforced.
    """
    if mode == "paper":
        return sinkhorn(scores, epsilon=epsilon, num_iters=num_iters, col_marginal=col_marginal,
                        impl=impl, mesh=mesh)
    if mode == "released_code":
        prior = (jnp.ones((scores.shape[1],), jnp.float32) if col_marginal is None
                 else released_code_word_prior(col_marginal, prior_temperature))
        return sinkhorn_released_code(scores, epsilon=epsilon, prior=prior, num_iters=num_iters)
    raise ValueError(f"sinkhorn_mode={mode!r} is not known; use one of {MODES} "
                     "(config.sinkhorn.mode)")
