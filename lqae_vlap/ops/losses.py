"""Loss pieces both methods share, each in float32 whatever its inputs' dtype.

``l2_normalize``: VLAP's cosine word scores and LQAE's unit-norm encoder output.
``soft_cross_entropy``: VLAP's swapped assignment prediction against Sinkhorn targets.
``masked_cross_entropy``: VLAP's captioning loss on caption tokens, LQAE's masked-LM loss.
``chunked_cross_entropy``: the same loss from hidden states and the vocabulary matrix, a few
  tokens at a time, so [B, N, V] float32 logits never exist (forward or backward).
``masked_positions``: the masked positions of each row, gathered to a static count, so a loss
  over them only needs those rows (LQAE's masked LM).
``masked_mean``: the mean over real tokens, VLAP's text representation and the frozen LM's
  features of LQAE's words.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| along the last axis (zero vectors stay zero), in float32 at least.

    eps floors the squared norm, as torch.nn.functional.normalize floors the norm.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps))


def soft_cross_entropy(target: jax.Array, logits: jax.Array) -> jax.Array:
    """mean_b -sum_k target[b, k] log softmax(logits)[b, k]; target, logits: [B, K]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(target * logp, axis=-1))


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the positions where ``mask`` is nonzero (0 when there are none).

    logits: [B, N, V] (position i predicts targets[:, i]; a caller with next-token targets
    shifts them), targets: [B, N] int, mask: [B, N] bool or int.

    The same values as ``-take_along_axis(log_softmax(logits), targets)`` averaged over the mask
    (float32), with a hand-written gradient (softmax - one_hot(targets)) * mask / count: autodiff
    of the gather scatters into a zero [B, N, V] array and adds it to the softmax's gradient
    (three passes over the logits' size); here the softmax is kept from the forward pass and the
    gradient is one pass (measured on LQAE's head, [32, 32, 50,265]: 20% less time and a third
    less temporary memory for the head's forward and backward).
    """
    if logits.shape[:2] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"masked_cross_entropy: logits [B, N, V], targets [B, N] and mask [B, N] "
                         f"must agree, got {logits.shape}, {targets.shape}, {mask.shape}")
    return _masked_ce(logits, targets.astype(jnp.int32), mask.astype(jnp.float32))


@jax.custom_vjp
def _masked_ce(logits: jax.Array, targets: jax.Array, m: jax.Array) -> jax.Array:
    return _masked_ce_fwd(logits, targets, m)[0]


def _masked_ce_fwd(logits, targets, m):
    x = logits.astype(jnp.float32)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    e = jnp.exp(shifted)
    total = jnp.sum(e, axis=-1, keepdims=True)
    # -(shifted[target] - log(total)): log_softmax's own order of operations.
    nll = -(jnp.take_along_axis(shifted, targets[..., None], axis=-1) - jnp.log(total))[..., 0]
    count = jnp.maximum(jnp.sum(m), 1.0)
    # The zero-size array carries the logits' dtype to the backward pass (residuals are arrays).
    return jnp.sum(nll * m) / count, (e / total, targets, m / count, jnp.zeros((0,), logits.dtype))


def _masked_ce_bwd(res, g):
    softmax, targets, weight, like = res
    one_hot = jnp.arange(softmax.shape[-1], dtype=jnp.int32) == targets[..., None]
    d = (softmax - one_hot.astype(softmax.dtype)) * (g * weight)[..., None]
    return d.astype(like.dtype), None, None


_masked_ce.defvjp(_masked_ce_fwd, _masked_ce_bwd)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D], mask: [B, L] (1 = real token) -> mean over the real tokens [B, D] float32
    (0 for a row without any)."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def chunked_cross_entropy(hidden: jax.Array, vocab_matrix: jax.Array, targets: jax.Array,
                          mask: jax.Array, *, chunk_size: int, vocab_axis: int = 0,
                          scale: float = 1.0) -> jax.Array:
    """``masked_cross_entropy(scale * hidden @ W, targets, mask)``, ``chunk_size`` tokens at a time.

    Each chunk's logits [B, chunk, V] are made, reduced to log-sum-exp and target logit in
    float32, and dropped; the chunk is checkpointed, so the backward pass recomputes them instead
    of keeping [B, N, V] logits (one more head matmul: 2 B N D V FLOPs, a third on top of the
    head's forward and input-gradient matmuls when W is frozen).

    Args:
      hidden: [B, N, D] (position i predicts targets[:, i]), any float dtype; the matmul takes
        its inputs in hidden's dtype and accumulates in float32 (logits are never rounded to
        bfloat16, unlike a bfloat16 head followed by a cast).
      vocab_matrix: [V, D] (vocab_axis 0: a tied embedding table) or [D, V] (vocab_axis 1: a
        Dense kernel).
      targets: [B, N] int; mask: [B, N] bool or int (nonzero = scored).
      chunk_size: tokens per chunk (N is padded up to a multiple with unscored positions).
      scale: multiplies the logits' input (T5's tied head: d_model ** -0.5).

    Returns:
      float32 scalar: the mean over scored positions (0 when there are none).
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"chunked_cross_entropy: hidden [B, N, D], targets [B, N] and mask "
                         f"[B, N] must agree, got {hidden.shape}, {targets.shape}, {mask.shape}")
    if vocab_axis not in (0, 1) or vocab_matrix.ndim != 2 \
            or vocab_matrix.shape[1 - vocab_axis] != hidden.shape[-1]:
        raise ValueError(f"chunked_cross_entropy: vocab_matrix must be [V, D] (vocab_axis 0) or "
                         f"[D, V] (vocab_axis 1) with D={hidden.shape[-1]}, got "
                         f"{vocab_matrix.shape} with vocab_axis {vocab_axis}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    b, n, d = hidden.shape
    c = min(int(chunk_size), n)
    k = -(-n // c)
    pad = k * c - n
    targets = targets.astype(jnp.int32)
    m = mask.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    # [k, B, c, ...]: the scan runs over chunks of tokens, every row of the batch at once.
    chunks = (hidden.reshape(b, k, c, d).swapaxes(0, 1), targets.reshape(b, k, c).swapaxes(0, 1),
              m.reshape(b, k, c).swapaxes(0, 1))
    w = vocab_matrix.astype(hidden.dtype)
    spec = "bcd,vd->bcv" if vocab_axis == 0 else "bcd,dv->bcv"

    @jax.checkpoint
    def chunk_nll(h, t, cm):
        if scale != 1.0:
            h = h * jnp.asarray(scale, h.dtype)
        logits = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * cm)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total / jnp.maximum(jnp.sum(m), 1.0)


def masked_positions(mask: jax.Array, max_count: int) -> tuple[jax.Array, jax.Array]:
    """Each row's masked positions, gathered to a static count.

    mask: [B, N] bool (True = masked); max_count: K, at least the most masked positions any row
    can have (rows with fewer are padded with unmasked positions, marked invalid).
    Returns (positions [B, K] int32 in increasing order within the masked ones, valid [B, K] bool).
    A row with more than K masked positions would lose the last ones, so K must be a true bound.
    """
    if mask.ndim != 2:
        raise ValueError(f"masked_positions: mask must be [batch, tokens], got {mask.shape}")
    k = int(max_count)
    if not 1 <= k <= mask.shape[1]:
        raise ValueError(f"masked_positions: max_count must be in [1, {mask.shape[1]}], got {k}")
    mask = mask.astype(bool)
    order = jnp.argsort(~mask, axis=1, stable=True)[:, :k].astype(jnp.int32)  # masked ones first
    return order, jnp.take_along_axis(mask, order, axis=1)


def max_masked(tokens: int, max_ratio: float) -> int:
    """A bound on round(r * tokens) for r <= max_ratio (``masked_positions``' max_count)."""
    return max(1, min(int(tokens), math.ceil(float(max_ratio) * int(tokens))))
