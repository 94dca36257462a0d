"""Loss pieces both methods share, each in float32 whatever its inputs' dtype.

``l2_normalize``: VLAP's cosine word scores and LQAE's unit-norm encoder output.
``soft_cross_entropy``: VLAP's swapped assignment prediction against Sinkhorn targets.
``masked_cross_entropy``: VLAP's captioning loss on caption tokens, LQAE's masked-LM loss.
``masked_mean``: the mean over real tokens, VLAP's text representation and the frozen LM's
  features of LQAE's words.
"""

from __future__ import annotations

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
    """
    if logits.shape[:2] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"masked_cross_entropy: logits [B, N, V], targets [B, N] and mask [B, N] "
                         f"must agree, got {logits.shape}, {targets.shape}, {mask.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D], mask: [B, L] (1 = real token) -> mean over the real tokens [B, D] float32
    (0 for a row without any)."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
