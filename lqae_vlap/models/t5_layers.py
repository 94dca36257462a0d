"""T5's config and its layers: relative position buckets, attention, FFN and the pre-norm block.

``models/t5.py`` builds the encoder-decoder from these (and re-exports ``T5Config``); the param
names here (q, k, v, o; wi | wi_0, wi_1, wo; the three norms) are those its checkpoint name map
addresses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lqae_vlap.models.layers import (ACTIVATIONS, RMSNorm, dense, dot_product_attention,
                                     heads_dense, heads_out_dense, write_kv_cache)

KERNEL_INIT = nn.initializers.normal(0.05)  # T5's default kernel / table init (fresh models only)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 model (names follow the Hugging Face ``T5Config``)."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_decoder_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # 'relu' | 'gated-gelu' | 'gated-silu' | ...
    tie_word_embeddings: bool = True  # lm head = shared embedding (no lm_head param)
    scale_decoder_outputs: bool = True  # multiply by d_model**-0.5 before the lm head
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not "
                             "supported; use 'relu', 'gated-gelu' or '[gated-]<act>' with act in "
                             f"{sorted(ACTIVATIONS)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # HF's legacy alias

    @classmethod
    def from_hf(cls, hf_config: Any, *, tie_word_embeddings: bool | None = None) -> T5Config:
        """Reads a transformers ``T5Config`` (t5, mt5, flan-t5). ``tie_word_embeddings`` overrides
        whether the lm head reuses the shared embedding (the loader decides it from the weights)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ("t5", "mt5"):
            raise ValueError(f"model_type {model_type!r} is not a T5 checkpoint; supported: "
                             "'t5', 'mt5'")
        # transformers 5 keeps the old "tie_word_embeddings=False means no rescale" meaning in
        # scale_decoder_outputs; older configs only have tie_word_embeddings.
        scale = getattr(hf_config, "scale_decoder_outputs", None)
        if scale is None:
            scale = getattr(hf_config, "tie_word_embeddings", True) is not False
        eos = hf_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
        start = getattr(hf_config, "decoder_start_token_id", None)
        return cls(
            vocab_size=int(hf_config.vocab_size), d_model=int(hf_config.d_model),
            d_kv=int(hf_config.d_kv), d_ff=int(hf_config.d_ff),
            num_layers=int(hf_config.num_layers),
            num_decoder_layers=int(hf_config.num_decoder_layers or hf_config.num_layers),
            num_heads=int(hf_config.num_heads),
            relative_attention_num_buckets=int(hf_config.relative_attention_num_buckets),
            relative_attention_max_distance=int(hf_config.relative_attention_max_distance),
            layer_norm_epsilon=float(hf_config.layer_norm_epsilon),
            feed_forward_proj=str(hf_config.feed_forward_proj),
            tie_word_embeddings=True if tie_word_embeddings is None else bool(tie_word_embeddings),
            scale_decoder_outputs=bool(scale), pad_token_id=int(pad),
            eos_token_id=int(eos if eos is not None else 1),
            decoder_start_token_id=int(start if start is not None else pad))


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucketing of (key position - query position): exact for small distances, log-spaced
    up to max_distance. relative_position: int [...] -> int32 buckets in [0, num_buckets)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # max(.,1) only keeps log() finite for the small positions the where() discards anyway.
    rp = jnp.maximum(relative_position, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(rp / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return (buckets + jnp.where(is_small, relative_position, large)).astype(jnp.int32)


class Attention(nn.Module):
    """Multi-head attention without biases or score scaling; ``bias`` carries the positions."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        proj = lambda: heads_dense(cfg.num_heads, cfg.d_kv, kernel_init=KERNEL_INIT,  # noqa: E731
                                   **kw)
        self.q, self.k, self.v = proj(), proj(), proj()
        self.o = heads_out_dense(cfg.d_model, kernel_init=KERNEL_INIT, **kw)

    def key_values(self, x: jax.Array) -> dict[str, jax.Array]:
        """x: [B, Lk, D] -> {'key', 'value'}: [B, Lk, H, Dh]."""
        return {"key": self.k(x), "value": self.v(x)}

    def __call__(self, x: jax.Array, kv: dict[str, jax.Array], mask: jax.Array,
                 bias: jax.Array | None = None) -> jax.Array:
        """x: [B, Lq, D], kv: {'key','value'} [B, Lk, H, Dh], mask: bool [B or 1, 1, Lq or 1, Lk],
        bias: float32 [1, H, Lq, Lk] or None -> [B, Lq, D]."""
        return self.o(dot_product_attention(self.q(x), kv["key"], kv["value"], mask=mask,
                                            bias=bias, scale=1.0, dtype=self.dtype))


class Mlp(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False,
                  kernel_init=KERNEL_INIT)
        act = ACTIVATIONS[cfg.activation]
        if cfg.is_gated:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi_0", **kw)(x)) \
                * dense(cfg.d_ff, ("embed", "mlp"), name="wi_1", **kw)(x)
        else:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi", **kw)(x))
        return dense(cfg.d_model, ("mlp", "embed"), name="wo", **kw)(h)


class Block(nn.Module):
    """Pre-norm block: self-attention, (decoder) cross-attention, FFN, each with a residual."""

    config: T5Config
    is_decoder: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda: RMSNorm(cfg.layer_norm_epsilon, **kw)  # noqa: E731
        self.self_attn_norm, self.self_attn = norm(), Attention(cfg, **kw)
        if self.is_decoder:
            self.cross_attn_norm, self.cross_attn = norm(), Attention(cfg, **kw)
        self.mlp_norm, self.mlp = norm(), Mlp(cfg, **kw)

    def cross_key_values(self, encoder_hidden: jax.Array) -> dict[str, jax.Array]:
        return self.cross_attn.key_values(encoder_hidden)

    def __call__(self, x: jax.Array, position_bias: jax.Array, self_mask: jax.Array, *,
                 layer_cache: dict | None = None, cache_index: jax.Array | None = None,
                 cross_kv: dict | None = None,
                 cross_mask: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """x: [B, L, D] -> ([B, L, D], updated layer cache or None)."""
        h = self.self_attn_norm(x)
        kv = self.self_attn.key_values(h)
        if layer_cache is not None:  # write this step's keys at cache_index, attend over all slots
            kv = layer_cache = write_kv_cache(layer_cache, kv, cache_index)
        x = x + self.self_attn(h, kv, self_mask, position_bias)
        if self.is_decoder:
            x = x + self.cross_attn(self.cross_attn_norm(x), cross_kv, cross_mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x, layer_cache
