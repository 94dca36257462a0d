"""Frozen Llama-family decoder-only LM (Llama 2/3, SmolLM2, TinyLlama, ...) with a KV cache.

Matches transformers' ``LlamaForCausalLM`` in eval mode: pre-RMSNorm blocks, rotary positions
(rope_theta; rope scaling None / 'default' / 'linear' / 'llama3'), grouped-query attention, SwiGLU
MLP, optional q/k/v/o and MLP biases, tied or untied output embedding. No dropout: frozen only.

Param tree (``{'params': ...}``), names mirror the HF state dict:
  embed_tokens/embedding [vocab, embed]
  layers_{i}/input_layernorm/scale [norm], layers_{i}/post_attention_layernorm/scale [norm]
  layers_{i}/self_attn/{q,k,v}_proj/kernel [embed, heads, kv], .../o_proj/kernel [heads, kv, embed]
  layers_{i}/mlp/{gate,up}_proj/kernel [embed, mlp], layers_{i}/mlp/down_proj/kernel [mlp, embed]
  norm/scale [norm], lm_head/kernel [embed, vocab] (only when the head is untied)

KV cache: ``init_cache(config, batch, max_len, dtype)`` preallocates per-layer buffers
``{'layers_{i}': {'k': [B, T, kv_heads, head_dim], 'v': ...}}``; a call with ``cache`` and
``cache_index`` writes its L keys/values at slots [cache_index, cache_index + L) and attends to
every slot <= its own whose ``attention_mask`` [B, T] is 1.

Loading: ``load(folder)`` for a Hugging Face checkpoint folder, ``load_gguf(file)`` for a
llama.cpp GGUF file (dequantised by ``models/gguf.py``); both go through
``hf_weights.load_params`` with ``llama_name_map``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lqae_vlap.models.hf_weights import (Checkpoint, Copy, Linear, NameMap, Reshape, Source,
                                         load_params, open_checkpoint)
from lqae_vlap.models.layers import (ACTIVATIONS, RMSNorm, causal_visibility, check_activation,
                                     check_decoder_call, decoder_attention_mask, dense,
                                     dot_product_attention, embedding_lookup, heads_dense,
                                     heads_out_dense, kv_cache_zeros, logical_init, remat_layer,
                                     write_kv_cache)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # mistral without sliding window is the same network
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters (Hugging Face names). Rope scaling is flattened so the config stays hashable."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"  # 'default' | 'linear' | 'llama3'
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3 only
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported; use one of "
                             f"{ROPE_TYPES} (or None for no scaling)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary positions")
        check_activation(self.hidden_act)

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaConfig:
        """Reads a transformers ``LlamaConfig`` (v4 or v5 rope fields) or a plain dict of the same keys."""
        if isinstance(hf_config, Mapping):
            get = lambda k, d=None: hf_config.get(k, d)  # noqa: E731
        else:
            get = lambda k, d=None: getattr(hf_config, k, d)  # noqa: E731
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a Llama-family decoder; supported: "
                             f"{SUPPORTED_MODEL_TYPES}")
        if model_type == "mistral" and get("sliding_window") is not None:
            raise ValueError("mistral with sliding_window attention is not supported; set "
                             "sliding_window=None only if every sequence fits in the window")
        # transformers 5 keeps rope_theta inside rope_parameters; v4 configs carry rope_scaling.
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        theta = rope.get("rope_theta", get("rope_theta", 10000.0))
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        max_pos = int(get("max_position_embeddings", 2048))

        def token_id(key: str) -> int | None:
            v = get(key)
            if isinstance(v, (list, tuple)):  # several EOS ids: the first is the canonical one
                v = v[0] if v else None
            return None if v is None else int(v)

        return cls(
            vocab_size=int(get("vocab_size")), hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")), num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            hidden_act=str(get("hidden_act", "silu")), rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos, rope_theta=float(theta), rope_type=str(rope_type),
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", max_pos)),
            attention_bias=bool(get("attention_bias", False)), mlp_bias=bool(get("mlp_bias", False)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            bos_token_id=token_id("bos_token_id"), eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("pad_token_id"))


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32), as transformers' modeling_rope_utils computes them."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    if cfg.rope_type == "linear":
        return (inv / cfg.rope_factor).astype(np.float32)
    if cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [B, L, H, Dh], positions: [B, L] -> x rotated (HF's rotate_half layout: halves, not pairs)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    # HF casts cos/sin to the activation dtype before rotating; do the same for bf16 parity.
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, allowed: jax.Array,
                 cache: dict[str, jax.Array] | None, cache_index: jax.Array | None
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """x: [B, L, D], positions: [B, L], allowed: [B, 1, L, T] bool -> ([B, L, D], cache)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(heads: int, name: str) -> nn.DenseGeneral:
            return heads_dense(heads, cfg.head_dim, use_bias=cfg.attention_bias, name=name, **kw)

        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(proj(cfg.num_attention_heads, "q_proj")(x), positions, inv_freq)
        k = apply_rope(proj(cfg.num_key_value_heads, "k_proj")(x), positions, inv_freq)
        v = proj(cfg.num_key_value_heads, "v_proj")(x)
        if cache is not None:
            cache = write_kv_cache(cache, {"k": k, "v": v}, cache_index)
            k, v = cache["k"], cache["v"]
        ctx = dot_product_attention(q, k, v, mask=allowed, dtype=self.dtype)  # GQA inside
        out = heads_out_dense(cfg.hidden_size, use_bias=cfg.attention_bias, name="o_proj", **kw)
        return out(ctx), cache


class Mlp(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """SwiGLU: down(act(gate(x)) * up(x)); x: [B, L, D] -> [B, L, D]."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=cfg.mlp_bias)
        h = ACTIVATIONS[cfg.hidden_act](
            dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x))
        h = h * dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, allowed, cache, cache_index):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, cache = Attention(cfg, name="self_attn", **kw)(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x), positions, allowed, cache,
            cache_index)
        x = x + h
        x = x + Mlp(cfg, name="mlp", **kw)(
            RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
        return x, cache


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32, *,
               mesh: Mesh | None = None) -> dict[str, dict[str, jax.Array]]:
    """Zeroed KV buffers ``{'layers_{i}': {'k','v': [batch, max_len, kv_heads, head_dim]}}``.

    With ``mesh``, each buffer is created sharded: batch over ('data', 'fsdp'), kv heads over
    'tensor' (``layers.kv_cache_sharding``; replicated where 'tensor' does not divide them).
    """
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    return {f"layers_{i}": {"k": kv_cache_zeros(shape, dtype, mesh),
                            "v": kv_cache_zeros(shape, dtype, mesh)}
            for i in range(config.num_hidden_layers)}


def cache_fn(config: LlamaConfig, dtype: Any = jnp.float32, mesh: Mesh | None = None
             ) -> Callable[[int, int], Any]:
    """``init_cache`` with config, dtype (and mesh) bound: models/generate.py's ``init_cache_fn``."""
    return functools.partial(init_cache, config, dtype=dtype, mesh=mesh)


class LlamaForCausalLM(nn.Module):
    """Llama decoder + LM head; a pure function of its params (and of the cache, when given)."""

    config: LlamaConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    # Rematerialisation of each decoder layer when differentiated (layers.REMAT_POLICIES:
    # 'none' | 'dots' | 'full'); the params and the forward values do not depend on it.
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None,
                 cache: dict[str, Any] | None = None,
                 cache_index: jax.Array | int | None = None,
                 logits_to_keep: int = 0) -> dict[str, Any]:
        """Runs the decoder.

        Args:
          input_ids: [B, L] int token ids, or None when inputs_embeds is given.
          inputs_embeds: [B, L, D] vectors that replace the token lookup (VLAP's visual prefix).
          attention_mask: [B, L] without a cache, [B, T] (T = cache length) with one; 1 = real
            token, 0 = padding / not yet written. Default: all real.
          positions: [B, L] int32 rotary positions. Default, as in HF: cache_index + 0..L-1 for
            every row; left-padded prompts must pass per-row positions (e.g. cumsum(mask) - 1).
          cache: from ``init_cache``; this call's keys/values are written at ``cache_index``.
          cache_index: scalar int32 slot of this call's first token (required with a cache).
          logits_to_keep: 0 (default) for logits at every position; n > 0 for the last n only
            (transformers' ``logits_to_keep``): generation's prefill needs one position, and the
            vocabulary projection of the rest would be most of its cost.

        Returns:
          dict(logits=[B, L, V] (or [B, logits_to_keep, V]) float32,
               hidden_states=[B, L, D] after the final norm,
               cache=the updated cache or None).
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        who = "LlamaForCausalLM"
        b, length = check_decoder_call(who, input_ids, inputs_embeds, cfg.hidden_size,
                                       logits_to_keep, cache, cache_index)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                         embedding_init=logical_init(("vocab", "embed")), name="embed_tokens", **kw)
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        offset = jnp.int32(0) if cache is None else jnp.asarray(cache_index, jnp.int32)
        total = length if cache is None else next(iter(cache.values()))["k"].shape[1]
        attention_mask = decoder_attention_mask(who, attention_mask, b, total, cache is not None)
        if positions is None:
            positions = offset + jnp.arange(length, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(positions, (b, length))
        allowed = causal_visibility(attention_mask, offset, length)  # [B, 1, L, T]

        new_cache = {} if cache is not None else None
        layer_cls = remat_layer(DecoderLayer, self.remat, "LlamaForCausalLM.remat")
        for i in range(cfg.num_hidden_layers):
            name = f"layers_{i}"
            x, layer_cache = layer_cls(cfg, name=name, **kw)(
                x, positions, allowed, None if cache is None else cache[name], offset)
            if cache is not None:
                new_cache[name] = layer_cache
        x = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(x)
        h = x[:, -logits_to_keep:] if logits_to_keep else x
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)(h)
        return {"logits": logits.astype(jnp.float32), "hidden_states": x, "cache": new_cache}


def embed_tokens(params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """ids: [B, L] -> the input embeddings [B, L, D] (``{'params': ...}`` or the inner tree)."""
    return embedding_lookup(params, ("embed_tokens", "embedding"), ids,
                            "pass the tree from llama.load / load_gguf or LlamaForCausalLM.init")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def llama_name_map(cfg: LlamaConfig) -> NameMap:
    """Our param paths -> transformers LlamaForCausalLM state-dict names."""
    m: NameMap = {("embed_tokens", "embedding"): Source(("model.embed_tokens.weight",)),
                  ("norm", "scale"): Source(("model.norm.weight",))}

    def dense(path, hf, kernel, bias_transform, with_bias):
        m[path + ("kernel",)] = Source((f"{hf}.weight",), kernel)
        if with_bias:
            m[path + ("bias",)] = Source((f"{hf}.bias",), bias_transform)

    for i in range(cfg.num_hidden_layers):
        hf, fx = f"model.layers.{i}", (f"layers_{i}",)
        m[fx + ("input_layernorm", "scale")] = Source((f"{hf}.input_layernorm.weight",))
        m[fx + ("post_attention_layernorm", "scale")] = Source(
            (f"{hf}.post_attention_layernorm.weight",))
        for name in ("q_proj", "k_proj", "v_proj"):
            dense(fx + ("self_attn", name), f"{hf}.self_attn.{name}", Linear(), Reshape(),
                  cfg.attention_bias)
        dense(fx + ("self_attn", "o_proj"), f"{hf}.self_attn.o_proj", Linear(in_dims=2), Copy(),
              cfg.attention_bias)
        for name in ("gate_proj", "up_proj", "down_proj"):
            dense(fx + ("mlp", name), f"{hf}.mlp.{name}", Linear(), Copy(), cfg.mlp_bias)
    if not cfg.tie_word_embeddings:
        m[("lm_head", "kernel")] = Source(("lm_head.weight",), Linear())
    return m


def llama_ignored(cfg: LlamaConfig) -> tuple[str, ...]:
    """Checkpoint keys the model knowingly does not use."""
    ignored = [r"rotary_emb\.inv_freq$"]  # a buffer recomputed from the config
    if cfg.tie_word_embeddings:  # some tied checkpoints still store the (identical) head
        ignored.append(r"^lm_head\.weight$")
    return tuple(ignored)


def _load(ckpt: Checkpoint, dtype: Any, mesh: Mesh | None, abstract: bool
          ) -> tuple[LlamaForCausalLM, dict[str, Any], Any]:
    cfg = LlamaConfig.from_hf(ckpt.hf_config)
    module = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    variables = load_params(ckpt, shapes, lambda state: (llama_name_map(cfg), llama_ignored(cfg)),
                            dtype=dtype, mesh=mesh, abstract=abstract)
    return module, variables, ckpt.hf_config


def load(path_or_name: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
         mesh: Mesh | None = None, abstract: bool = False, hf_config: Any = None
         ) -> tuple[LlamaForCausalLM, dict[str, Any], Any]:
    """Loads a Hugging Face Llama checkpoint folder as a frozen LlamaForCausalLM.

    abstract=True reads no tensor (config.json only): the params are ``jax.ShapeDtypeStruct``s
    with their shardings when ``mesh`` is given, for planning. hf_config (abstract only): a
    transformers ``LlamaConfig`` to plan from instead of a folder (``path_or_name`` may be None).

    Returns:
      (module, {'params': params}, hf_config); ``module.apply(variables, ids, ...)`` runs it.
    """
    ckpt = open_checkpoint(path_or_name, abstract=abstract, hf_config=hf_config,
                           who="llama.load")
    return _load(ckpt, dtype, mesh, abstract)


def load_gguf(path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None,
              abstract: bool = False) -> tuple[LlamaForCausalLM, dict[str, Any], dict[str, Any]]:
    """Loads a llama.cpp GGUF file (any quantisation gguf can dequantise) as a LlamaForCausalLM.

    abstract=True reads the metadata only (shapes and shardings, for planning).

    Returns:
      (module, {'params': params}, hf_config dict read from the GGUF metadata).
    """
    from lqae_vlap.models.gguf import open_gguf  # noqa: PLC0415  (needs the optional gguf package)

    hf_config, state = open_gguf(path)
    return _load(Checkpoint(hf_config, state, str(path)), dtype, mesh, abstract)
