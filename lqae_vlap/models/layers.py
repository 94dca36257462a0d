"""Small building blocks shared by the model files (roberta, clip, opt, llama, t5, vit).

Each helper only fixes the logical axis names (see ``core/sharding.py``) and the usual defaults;
the module types, parameter names and shapes are exactly those of the plain flax layers, so the
param trees (and the checkpoint name maps that address them) do not depend on this file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lqae_vlap.core.sharding import fit_sharding_to_shape, logical_to_sharding

Initializer = Callable[..., jax.Array]
# BERT / GPT style N(0, 0.02^2) kernels; a file with another default passes its own.
DEFAULT_INIT: Initializer = nn.initializers.normal(0.02)

# Hugging Face activation names (ACT2FN) -> function; every name any model here accepts.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# Rematerialisation policies of a frozen model's layer stack (``remat`` of opt, llama, t5,
# roberta), from the least recompute to the most. Gradients flow through these frozen layers to
# what feeds them, so the backward pass needs each layer's intermediates: 'none' stores them all;
# 'dots' stores only the outputs of the weight matmuls (dots without batch dimensions) and
# recomputes the rest (attention scores, softmax, activations, norms); 'full' stores each layer's
# input only and reruns the whole layer forward in the backward pass (one more forward's FLOPs).
REMAT_POLICIES: tuple[str, ...] = ("none", "dots", "full")


def check_remat(policy: str, field: str = "remat") -> None:
    """Raises a ValueError naming ``field`` and the policies when ``policy`` is unknown."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{field}={policy!r} is not a rematerialisation policy; use one of "
                         f"{REMAT_POLICIES}")


def remat_layer(cls: type[nn.Module], policy: str, field: str = "remat") -> type[nn.Module]:
    """The layer class ``cls`` checkpointed with ``policy`` ('none': ``cls`` itself).

    nn.remat keeps the module's name and param tree, so params do not depend on the policy.
    Without differentiation the wrapped layer computes exactly what ``cls`` does.
    """
    check_remat(policy, field)
    if policy == "none":
        return cls
    saveable = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "full": jax.checkpoint_policies.nothing_saveable}[policy]
    return nn.remat(cls, policy=saveable)


def check_activation(name: str, field: str = "hidden_act") -> None:
    """Raises a ValueError naming ``field`` and the supported names when ``name`` is unknown."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not supported; use one of {sorted(ACTIVATIONS)}")


def check_heads_divide(hidden_size: int, num_heads: int, who: str = "") -> None:
    """Raises a ValueError (message prefixed by ``who``) unless the heads split hidden_size evenly."""
    if hidden_size % num_heads:
        raise ValueError(f"{who}hidden_size {hidden_size} is not divisible by "
                         f"num_attention_heads {num_heads}")


def logical_init(names: tuple[str | None, ...], init: Initializer = DEFAULT_INIT) -> Initializer:
    """``init`` whose param carries the logical axis ``names`` (one per param dimension)."""
    return nn.with_logical_partitioning(init, names)


def layer_norm(*, epsilon: float, dtype: Any, param_dtype: Any, name: str | None = None,
               use_affine: bool = True) -> nn.LayerNorm:
    """nn.LayerNorm with scale (ones) / bias (zeros) named ('norm',); ``use_affine=False`` drops both.

    flax computes the statistics in float32 even for a bfloat16 dtype, as torch's fp32 LayerNorm does.
    """
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        use_scale=use_affine, use_bias=use_affine,
                        scale_init=logical_init(("norm",), nn.initializers.ones),
                        bias_init=logical_init(("norm",), nn.initializers.zeros), name=name)


def dense(features: int, names: tuple[str | None, str | None], *, dtype: Any, param_dtype: Any,
          name: str | None = None, use_bias: bool = True,
          kernel_init: Initializer = DEFAULT_INIT) -> nn.Dense:
    """nn.Dense with kernel [names[0], names[1]] and a zero bias [names[1]]."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=logical_init(names, kernel_init),
                    bias_init=logical_init(names[1:], nn.initializers.zeros), name=name)


def heads_dense(num_heads: int, head_dim: int, *, dtype: Any, param_dtype: Any,
                name: str | None = None, use_bias: bool = True,
                kernel_init: Initializer = DEFAULT_INIT) -> nn.DenseGeneral:
    """q/k/v projection [..., D] -> [..., heads, head_dim]: kernel [embed, heads, kv], bias [heads, kv]."""
    return nn.DenseGeneral((num_heads, head_dim), use_bias=use_bias, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=logical_init(("embed", "heads", "kv"), kernel_init),
                           bias_init=logical_init(("heads", "kv"), nn.initializers.zeros), name=name)


def heads_out_dense(features: int, *, dtype: Any, param_dtype: Any, name: str | None = None,
                    use_bias: bool = True, kernel_init: Initializer = DEFAULT_INIT) -> nn.DenseGeneral:
    """Output projection [..., heads, head_dim] -> [..., features].

    Kernel [heads, kv, embed], bias [embed].
    """
    return nn.DenseGeneral(features, axis=(-2, -1), use_bias=use_bias, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=logical_init(("heads", "kv", "embed"), kernel_init),
                           bias_init=logical_init(("embed",), nn.initializers.zeros), name=name)


class RMSNorm(nn.Module):
    """x / rms(x) * scale: no mean subtraction, no bias; statistics in float32.

    Llama's LlamaRMSNorm and T5's T5LayerNorm are this same computation (one ``scale`` param).
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D]."""
        scale = self.param("scale", logical_init(("norm",), nn.initializers.ones), (x.shape[-1],),
                           self.param_dtype)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * h.astype(self.dtype)


def check_decoder_call(who: str, input_ids: jax.Array | None, inputs_embeds: jax.Array | None,
                       embed_width: int, logits_to_keep: int, cache: Any, cache_index: Any,
                       width_note: str = "") -> tuple[int, int]:
    """The argument checks every decoder-only LM's ``__call__`` makes (the generate.py contract).

    Returns (batch, length) of the new tokens.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{who}: pass exactly one of input_ids [B, L] or inputs_embeds [B, L, D]")
    if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"{who}: logits_to_keep must be a Python int >= 0 (0 = every position), "
                         f"got {logits_to_keep!r}")
    if (cache is None) != (cache_index is None):
        raise ValueError(f"{who}: pass cache and cache_index together (init_cache makes the "
                         "cache; cache_index is the slot of the first new token)")
    if inputs_embeds is not None:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != embed_width:
            raise ValueError(f"{who}: inputs_embeds must be [batch, length, {embed_width}]"
                             f"{width_note}, got shape {inputs_embeds.shape}")
        return inputs_embeds.shape[0], inputs_embeds.shape[1]
    if input_ids.ndim != 2:
        raise ValueError(f"{who}: input_ids must be [batch, length], got {input_ids.shape}")
    return input_ids.shape[0], input_ids.shape[1]


def decoder_attention_mask(who: str, attention_mask: jax.Array | None, batch: int, total: int,
                           cached: bool) -> jax.Array:
    """attention_mask over the ``total`` key slots ([batch, cache length] with a cache, else
    [batch, length]); all real when None."""
    if attention_mask is None:
        return jnp.ones((batch, total), jnp.int32)
    if attention_mask.shape != (batch, total):
        want = "[batch, cache length]" if cached else "[batch, length]"
        raise ValueError(f"{who}: attention_mask must be {want} = {(batch, total)}, got "
                         f"{attention_mask.shape}")
    return attention_mask


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """attention_mask: [B, Lk] (1 = real key) -> the ``dot_product_attention`` mask [B, 1, 1, Lk]."""
    return (attention_mask > 0)[:, None, None, :]


def causal_visibility(attention_mask: jax.Array, offset: jax.Array, length: int) -> jax.Array:
    """Which cache slots each new query sees: the ``dot_product_attention`` mask [B, 1, L, T].

    attention_mask: [B, T] (1 = slot holds a real token); the L queries sit at slots
    offset .. offset + L - 1. Query slot i sees key slot j iff j <= i and slot j is real, so slots
    not yet written are excluded by causality alone.
    """
    query_slots = offset + jnp.arange(length)
    causal = jnp.arange(attention_mask.shape[1])[None, :] <= query_slots[:, None]  # [L, T]
    return causal[None, None] & padding_mask(attention_mask)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          scale: float | None = None, dtype: Any = None) -> jax.Array:
    """softmax(scale * q k^T + bias, masked) v: the attention core of every model here.

    Args:
      q: [B, Lq, H, Dh]. k, v: [B, Lk, Hkv, Dh] with H a multiple of Hkv (grouped-query
        attention: query head h reads kv head h // (H / Hkv), as transformers' repeat_kv).
      mask: bool, broadcastable to [B, H, Lq, Lk] (head axis H or 1); True = attend.
      bias: float32 added to the logits, broadcastable to [B, H, Lq, Lk] (T5's positions).
      scale: multiplies q before the product (default Dh ** -0.5; T5 passes 1.0). Scaling q,
        not the logits, keeps bfloat16 logits in range and matches HF OPT's float32 rounding.
      dtype: compute dtype of q, k, v and the attention weights (default q's).

    Returns:
      [B, Lq, H, Dh] in ``dtype``.
    """
    dtype = q.dtype if dtype is None else dtype
    b, lq, h, dh = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    scale = dh ** -0.5 if scale is None else scale
    # Query head h = (kv head, group): the groups are folded into the query axis, so each kv
    # head serves its queries in one product and the (cached) keys and values are never copied.
    q = (q.astype(dtype) * jnp.asarray(scale, dtype)).reshape(b, lq, kv_heads, groups, dh)
    q = q.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * lq, dh)
    # float32 logits even from bfloat16 inputs: one rounding fewer before the softmax.
    logits = jnp.einsum("bhqd,bkhd->bhqk", q, k.astype(dtype), preferred_element_type=jnp.float32)
    logits = logits.reshape(b, h, lq, -1)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        # where, not an additive -inf-like bias: a fully masked row (a padded query) stays
        # finite, so no NaN reaches real tokens through 0-probabilities.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # Softmax in float32 so bfloat16 models keep the masking and the weights accurate.
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype).reshape(b, kv_heads, groups * lq, -1)
    out = jnp.einsum("bhqk,bkhd->bhqd", weights, v.astype(dtype))
    return out.reshape(b, kv_heads, groups, lq, dh).transpose(0, 3, 1, 2, 4).reshape(b, lq, h, dh)


def write_kv_cache(cache: dict[str, jax.Array], new: dict[str, jax.Array],
                   cache_index: jax.Array) -> dict[str, jax.Array]:
    """Writes new [B, L, H, Dh] entries into the same-named cache buffers [B, T, H, Dh] at slot
    ``cache_index`` (cast to the buffer dtype); returns the updated buffers."""
    return {n: jax.lax.dynamic_update_slice(cache[n], new[n].astype(cache[n].dtype),
                                            (0, cache_index, 0, 0)) for n in new}


# KV-cache buffers are [batch, length, heads, head_dim]: rows over ('data', 'fsdp') and heads over
# 'tensor' by LOGICAL_RULES, the same split as the q/k/v kernels' 'heads' axis, so attention runs
# on local heads with no resharding of the cache.
KV_CACHE_AXES = ("batch", "length", "heads", "kv")


def kv_cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """The mesh layout of one cache buffer ``[batch, length, heads, head_dim]`` (another rank: the
    batch axis only). Mesh axes that do not divide a dimension are dropped (that dim replicates)."""
    names = KV_CACHE_AXES if len(shape) == 4 else ("batch",) + (None,) * (len(shape) - 1)
    return fit_sharding_to_shape(logical_to_sharding(P(*names), mesh), tuple(shape))


def kv_cache_zeros(shape: Sequence[int], dtype: Any, mesh: Mesh | None = None) -> jax.Array:
    """A zeroed cache buffer, created in place on its ``kv_cache_sharding`` when ``mesh`` is given
    (never whole on one device first); inside a jit the layout becomes the buffer's sharding."""
    shape = tuple(int(d) for d in shape)
    if mesh is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(jnp.zeros, static_argnums=(0, 1),
                   out_shardings=kv_cache_sharding(mesh, shape))(shape, dtype)


def constrain_kv_cache(cache: Any, mesh: Mesh | None) -> Any:
    """Every leaf of a cache pytree pinned to ``kv_cache_sharding`` (identity without a mesh).

    Used inside generation loops so the carried cache keeps its layout step after step instead of
    whatever the partitioner would infer from the attention einsums or a beam gather.
    """
    if mesh is None:
        return cache
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, kv_cache_sharding(mesh, x.shape)), cache)


def embedding_lookup(params: Any, path: tuple[str, ...], ids: jax.Array, hint: str) -> jax.Array:
    """ids: [B, L] -> rows [B, L, D] of the embedding table at ``path`` (params' dtype).

    ``params``: the variables dict ``{'params': ...}`` or the inner tree, boxed or not. ``hint``
    ends the error message when the table is missing (which loader builds the right tree).
    """
    tree = params["params"] if "params" in params else params
    try:
        table = tree
        for key in path:
            table = table[key]
    except (KeyError, TypeError) as e:
        raise ValueError(f"embed_tokens: params lack {'/'.join(path)}; {hint}") from e
    return jnp.take(nn.meta.unbox(table), ids, axis=0)
