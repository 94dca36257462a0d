"""The one attention core (models/layers.py dot_product_attention) against NumPy float64.

Tolerance: float32 against float64 with logits of unit scale, rtol/atol 1e-5 (observed ~1e-7).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.models import layers


def np_attention(q, k, v, mask, bias, scale):
    """Textbook grouped-query attention: keys repeated per query head (transformers' repeat_kv)."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q * scale, k) + bias
    logits = np.where(mask, logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(logits - m)
    total = w.sum(-1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / logits.shape[-1])
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_matches_numpy_with_groups_mask_and_bias(heads, kv_heads):
    rng = np.random.default_rng(heads + kv_heads)
    b, lq, lk, dh = 2, 5, 7, 8
    q = rng.standard_normal((b, lq, heads, dh))
    k, v = rng.standard_normal((2, b, lk, kv_heads, dh))
    mask = rng.random((b, 1, lq, lk)) < 0.7
    mask[0, 0, 2] = False  # a padded query that sees no key: uniform weights, finite
    bias = rng.standard_normal((1, heads, lq, lk))
    got = layers.dot_product_attention(jnp.float32(q), jnp.float32(k), jnp.float32(v),
                                       mask=jnp.asarray(mask), bias=jnp.float32(bias), scale=0.3)
    want = np_attention(q, k, v, mask, bias, 0.3)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # Defaults: scale Dh ** -0.5, no mask, no bias.
    got = layers.dot_product_attention(jnp.float32(q), jnp.float32(k), jnp.float32(v))
    want = np_attention(q, k, v, np.ones((1, 1, 1, 1), bool), 0.0, dh ** -0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_masks_in_the_one_convention():
    pad = layers.padding_mask(jnp.asarray([[1, 1, 0]]))
    assert pad.shape == (1, 1, 1, 3) and pad.tolist() == [[[[True, True, False]]]]
    # Two new queries at slots 1 and 2 of a 4-slot cache whose slot 0 is padding.
    vis = np.asarray(layers.causal_visibility(jnp.asarray([[0, 1, 1, 1]]), jnp.int32(1), 2))
    assert vis.shape == (1, 1, 2, 4)
    assert vis[0, 0].tolist() == [[False, True, False, False], [False, True, True, False]]
