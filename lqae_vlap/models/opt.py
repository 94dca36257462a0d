"""Frozen OPT decoder-only language model (VLAP's OPT-1.3B, and every other OPT size) with a KV cache.

Matches transformers' ``OPTForCausalLM`` in eval mode, for both layouts OPT ships in:
  * pre-LayerNorm (``do_layer_norm_before=True``: 125m, 1.3b, 2.7b, ...) with a final LayerNorm;
  * post-LayerNorm (opt-350m: ``do_layer_norm_before=False``, no final LayerNorm) whose word
    embeddings are narrower than the model (``word_embed_proj_dim`` 512 < hidden 1024), bridged
    by ``project_in`` / ``project_out`` (bias-free).
Learned positions carry OPT's offset of 2 (fairseq reserved rows 0 and 1); ReLU FFN; attention
with biases; the LM head is tied to the word embeddings unless ``tie_word_embeddings=False``.
No dropout: the model is only ever run frozen.

Interface shared by every decoder-only model (``models/generate.py`` relies on it):
  ``__call__(input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
  cache=None, cache_index=None) -> dict(logits=[B, L, V] float32, hidden_states=[B, L, E],
  cache=new cache or None)``, ``init_cache(config, batch, max_len, dtype)`` and
  ``embed_tokens(params, ids)``. ``hidden_states`` is HF's ``last_hidden_state`` (after the final
  LayerNorm and ``project_out``), so its width E is the word-embedding width.

KV cache: ``{'layers_{i}': {'k': [B, T, heads, head_dim], 'v': ...}}``. A call with ``cache`` and
``cache_index`` writes its L keys/values at slots [cache_index, cache_index + L) and attends to
every slot j <= its own slot whose ``attention_mask[:, j]`` is 1, so slots not yet written are
excluded by causality alone.

Param tree (``{'params': ...}``), every leaf with logical axis names:
  embed_tokens/embedding [vocab, embed], embed_positions/embedding [position, embed]
  project_in/kernel [mlp, embed], project_out/kernel [embed, mlp] (opt-350m only)
  layers_{i}/self_attn/{q,k,v}_proj/{kernel [embed, heads, kv], bias [heads, kv]},
  layers_{i}/self_attn/out_proj/{kernel [heads, kv, embed], bias [embed]},
  layers_{i}/{self_attn_layer_norm, final_layer_norm}, layers_{i}/fc1 [embed, mlp], fc2 [mlp, embed]
  final_layer_norm (pre-LN models), lm_head/kernel [embed, vocab] (untied heads only)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lqae_vlap.models.hf_weights import (Linear, NameMap, Reshape, Source, dense_sources,
                                         detect_prefix, layer_norm_sources, load_params,
                                         open_checkpoint)
from lqae_vlap.models.layers import (ACTIVATIONS, causal_visibility, check_activation,
                                     check_decoder_call, check_heads_divide,
                                     decoder_attention_mask, dense, dot_product_attention,
                                     embedding_lookup, heads_dense, heads_out_dense,
                                     kv_cache_zeros, layer_norm, logical_init, remat_layer,
                                     write_kv_cache)

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding: position p reads row p + 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """Hyper-parameters of an OPT model (names follow the Hugging Face ``OPTConfig``)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    word_embed_proj_dim: int = 768  # < hidden_size only for opt-350m (then project_in/out exist)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True  # do_layer_norm_before and not _remove_final_layer_norm
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        check_activation(self.activation_function, "OPTConfig.activation_function")
        check_heads_divide(self.hidden_size, self.num_attention_heads, "OPTConfig: ")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def projects(self) -> bool:
        """Whether word embeddings are narrower than the model (project_in / project_out exist)."""
        return self.word_embed_proj_dim != self.hidden_size

    @classmethod
    def from_hf(cls, hf_config: Any) -> OPTConfig:
        """Reads a transformers ``OPTConfig``."""
        if getattr(hf_config, "model_type", None) != "opt":
            raise ValueError(f"model_type {getattr(hf_config, 'model_type', None)!r} is not OPT; "
                             "load it with its own family's loader")
        proj = getattr(hf_config, "word_embed_proj_dim", None) or hf_config.hidden_size
        pre_ln = bool(hf_config.do_layer_norm_before)

        def token_id(name: str, default: int) -> int:
            value = getattr(hf_config, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            return default if value is None else int(value)

        return cls(
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            word_embed_proj_dim=int(proj),
            num_hidden_layers=int(hf_config.num_hidden_layers),
            num_attention_heads=int(hf_config.num_attention_heads),
            ffn_dim=int(hf_config.ffn_dim),
            max_position_embeddings=int(hf_config.max_position_embeddings),
            do_layer_norm_before=pre_ln,
            final_layer_norm=pre_ln and not bool(getattr(hf_config, "_remove_final_layer_norm", False)),
            activation_function=str(hf_config.activation_function),
            enable_bias=bool(getattr(hf_config, "enable_bias", True)),
            layer_norm_elementwise_affine=bool(getattr(hf_config, "layer_norm_elementwise_affine", True)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            pad_token_id=token_id("pad_token_id", 1),
            bos_token_id=token_id("bos_token_id", 2),
            eos_token_id=token_id("eos_token_id", 2),
        )


def _layer_norm_module(cfg: OPTConfig, dtype: Any, param_dtype: Any, name: str) -> nn.LayerNorm:
    # torch.nn.LayerNorm's default eps (OPT's config has no field for it).
    return layer_norm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name,
                      use_affine=cfg.layer_norm_elementwise_affine)


def init_cache(config: OPTConfig, batch: int, max_len: int, dtype: Any = jnp.float32, *,
               mesh: Mesh | None = None) -> dict[str, dict[str, jax.Array]]:
    """Zeroed per-layer key/value buffers ``{'layers_{i}': {'k', 'v': [batch, max_len, H, Dh]}}``.

    With ``mesh``, each buffer is created sharded: batch over ('data', 'fsdp'), heads over
    'tensor' (``layers.kv_cache_sharding``).
    """
    shape = (batch, max_len, config.num_attention_heads, config.head_dim)
    return {f"layers_{i}": {"k": kv_cache_zeros(shape, dtype, mesh),
                            "v": kv_cache_zeros(shape, dtype, mesh)}
            for i in range(config.num_hidden_layers)}


class Attention(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cache: dict[str, jax.Array] | None,
                 cache_index: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """x: [B, L, D], mask: [B, 1, L, T] bool -> ([B, L, D], updated cache)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=cfg.enable_bias)
        proj = lambda name: heads_dense(cfg.num_attention_heads, cfg.head_dim, name=name, **kw)  # noqa: E731
        q, k, v = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)  # [B, L, H, Dh]
        if cache is not None:
            cache = write_kv_cache(cache, {"k": k, "v": v}, cache_index)
            k, v = cache["k"], cache["v"]
        ctx = dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
        return heads_out_dense(cfg.hidden_size, name="out_proj", **kw)(ctx), cache


class DecoderLayer(nn.Module):
    """OPTDecoderLayer: pre-LN (LN -> sublayer -> residual) or post-LN (sublayer -> residual -> LN)."""

    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cache: dict[str, jax.Array] | None,
                 cache_index: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pre = cfg.do_layer_norm_before
        attn_norm = _layer_norm_module(cfg, self.dtype, self.param_dtype, "self_attn_layer_norm")
        h, cache = Attention(cfg, name="self_attn", **kw)(attn_norm(x) if pre else x, mask, cache,
                                                          cache_index)
        x = x + h
        x = x if pre else attn_norm(x)
        ffn_norm = _layer_norm_module(cfg, self.dtype, self.param_dtype, "final_layer_norm")
        h = ffn_norm(x) if pre else x
        h = dense(cfg.ffn_dim, ("embed", "mlp"), use_bias=cfg.enable_bias, name="fc1", **kw)(h)
        h = ACTIVATIONS[cfg.activation_function](h)
        h = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=cfg.enable_bias, name="fc2", **kw)(h)
        x = x + h
        return (x if pre else ffn_norm(x)), cache


class OPTForCausalLM(nn.Module):
    """OPT decoder + LM head; a pure function of its params (and of the cache, when given)."""

    config: OPTConfig
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
          inputs_embeds: [B, L, word_embed_proj_dim] vectors replacing the token lookup (VLAP's
            visual prefix); project_in and positions are still applied.
          attention_mask: [B, L] without a cache, [B, T] (T = cache length) with one; 1 = real
            token, 0 = padding. Default: all real.
          positions: [B, L] int32 positions (OPT adds its offset of 2). Default, as in HF:
            cumsum(attention_mask) - 1 over the whole mask, sliced at this call's slots.
          cache: from ``init_cache``; this call's keys/values are written at ``cache_index``.
          cache_index: scalar int32 slot of this call's first token (required with a cache).
          logits_to_keep: 0 (default) for logits at every position; n > 0 for the last n only
            (transformers' ``logits_to_keep``): generation's prefill needs one position, and the
            vocabulary projection of the rest would be most of its cost.

        Returns:
          dict(logits=[B, L, V] (or [B, logits_to_keep, V]) float32,
               hidden_states=[B, L, word_embed_proj_dim],
               cache=the updated cache or None).
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        who = "OPTForCausalLM"
        batch, length = check_decoder_call(who, input_ids, inputs_embeds, cfg.word_embed_proj_dim,
                                           logits_to_keep, cache, cache_index,
                                           width_note=" (the word-embedding width)")
        total = length if cache is None else cache["layers_0"]["k"].shape[1]
        if total > cfg.max_position_embeddings:
            raise ValueError(f"{who}: {total} tokens exceed the {cfg.max_position_embeddings} "
                             "positions this checkpoint has; truncate the prompt or shrink the cache")
        if cache is not None and length > total:
            raise ValueError(f"{who}: {length} new tokens do not fit a cache of {total} slots")
        attention_mask = decoder_attention_mask(who, attention_mask, batch, total,
                                                cache is not None)
        offset = jnp.int32(0) if cache is None else jnp.asarray(cache_index, jnp.int32)
        if positions is None:  # HF: cumsum(mask) * mask - 1, so pads read position row 1
            mask = attention_mask.astype(jnp.int32)
            all_positions = jnp.cumsum(mask, axis=1) * mask - 1
            positions = jax.lax.dynamic_slice_in_dim(all_positions, offset, length, axis=1)
        positions = jnp.broadcast_to(positions, (batch, length))

        # Key slot j is visible to query slot i when j <= i and slot j holds a real token. Where
        # no key is visible (a padded query) the row's softmax is uniform: finite, and unused.
        visible = causal_visibility(attention_mask, offset, length)  # [B, 1, L, T]

        embed = nn.Embed(cfg.vocab_size, cfg.word_embed_proj_dim,
                         embedding_init=logical_init(("vocab", "embed")), name="embed_tokens", **kw)
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        if cfg.projects:  # a width change of the residual stream; 'mlp' names the narrow side
            x = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=False, name="project_in", **kw)(x)
        x = x + nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                         embedding_init=logical_init(("position", "embed")), name="embed_positions",
                         **kw)(positions + POSITION_OFFSET)

        new_cache = {} if cache is not None else None
        layer_cls = remat_layer(DecoderLayer, self.remat, "OPTForCausalLM.remat")
        for i in range(cfg.num_hidden_layers):
            name = f"layers_{i}"
            x, layer_cache = layer_cls(cfg, name=name, **kw)(
                x, visible, None if cache is None else cache[name], offset)
            if cache is not None:
                new_cache[name] = layer_cache
        if cfg.final_layer_norm:
            x = _layer_norm_module(cfg, self.dtype, self.param_dtype, "final_layer_norm")(x)
        if cfg.projects:
            x = dense(cfg.word_embed_proj_dim, ("embed", "mlp"), use_bias=False, name="project_out",
                      **kw)(x)
        h = x[:, -logits_to_keep:] if logits_to_keep else x
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)(h)
        return {"logits": logits.astype(jnp.float32), "hidden_states": x, "cache": new_cache}


def embed_tokens(params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """The input-embedding lookup: ids [B, L] -> [B, L, word_embed_proj_dim] (params' dtype).

    Accepts the variables dict ``{'params': ...}`` or the inner tree, boxed or not. VLAP
    concatenates its projected visual tokens in front of these and feeds ``inputs_embeds``.
    """
    return embedding_lookup(params, ("embed_tokens", "embedding"), ids,
                            "pass the tree returned by opt.load or OPTForCausalLM.init")


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------

# OPTForCausalLM keys carry 'model.decoder.', OPTModel keys 'decoder.', a bare OPTDecoder none.
PREFIXES = ("model.decoder.", "decoder.", "")


def opt_name_map(cfg: OPTConfig, prefix: str) -> NameMap:
    """Our OPTForCausalLM param paths -> transformers state-dict names."""
    p = prefix

    def dense(path: tuple[str, ...], hf: str, kernel: Any = Linear(), bias: Any = None) -> NameMap:
        m = dense_sources(path, hf, kernel, bias or Reshape())
        if not cfg.enable_bias:
            del m[path + ("bias",)]
        return m

    def norm(path: tuple[str, ...], hf: str) -> NameMap:
        return layer_norm_sources(path, hf) if cfg.layer_norm_elementwise_affine else {}

    m: NameMap = {
        ("embed_tokens", "embedding"): Source((f"{p}embed_tokens.weight",)),
        ("embed_positions", "embedding"): Source((f"{p}embed_positions.weight",)),
    }
    if cfg.projects:
        m[("project_in", "kernel")] = Source((f"{p}project_in.weight",), Linear())
        m[("project_out", "kernel")] = Source((f"{p}project_out.weight",), Linear())
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"{p}layers.{i}", (f"layers_{i}",)
        for name in ("q_proj", "k_proj", "v_proj"):
            m.update(dense(fx + ("self_attn", name), f"{hf}.self_attn.{name}"))
        m.update(dense(fx + ("self_attn", "out_proj"), f"{hf}.self_attn.out_proj", Linear(in_dims=2)))
        m.update(norm(fx + ("self_attn_layer_norm",), f"{hf}.self_attn_layer_norm"))
        m.update(dense(fx + ("fc1",), f"{hf}.fc1"))
        m.update(dense(fx + ("fc2",), f"{hf}.fc2"))
        m.update(norm(fx + ("final_layer_norm",), f"{hf}.final_layer_norm"))
    if cfg.final_layer_norm:
        m.update(norm(("final_layer_norm",), f"{p}final_layer_norm"))
    if not cfg.tie_word_embeddings:
        m[("lm_head", "kernel")] = Source(("lm_head.weight",), Linear())
    return m


def opt_ignored(cfg: OPTConfig) -> tuple[str, ...]:
    """Checkpoint keys an OPT model knowingly does not use."""
    # A tied head reuses embed_tokens; some checkpoints still store the duplicate lm_head.weight.
    return ("^" + re.escape("lm_head.weight") + "$",) if cfg.tie_word_embeddings else ()


def load(path_or_name: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
         mesh: Mesh | None = None, abstract: bool = False, hf_config: Any = None
         ) -> tuple[OPTForCausalLM, dict[str, Any], Any]:
    """Loads an OPT checkpoint (OPTForCausalLM or OPTModel, any size) as a frozen causal LM.

    Args:
      path_or_name: local checkpoint folder (or a hub name where there is network).
      dtype: param and compute dtype (e.g. jnp.bfloat16); logits are always float32.
      mesh: place every weight on this mesh by its logical axis names while loading.
      abstract: read no tensor: return ``jax.ShapeDtypeStruct`` leaves (with their shardings when
        ``mesh`` is given) for planning and compiling without the weights.
      hf_config: abstract only: a transformers ``OPTConfig`` to plan from instead of the folder's
        config.json (no folder is then opened; ``path_or_name`` may be None).

    Returns:
      (module, {'params': params}, hf_config). A tied head (lm_head.weight absent or duplicated)
      reuses embed_tokens; an OPTModel checkpoint (no head) gets the tied head, as HF does.
      Planning from config.json alone assumes a tied head.
    """
    ckpt = open_checkpoint(path_or_name, abstract=abstract, hf_config=hf_config, who="opt.load")
    cfg = OPTConfig.from_hf(ckpt.hf_config)
    if ckpt.state is not None and not cfg.tie_word_embeddings and "lm_head.weight" not in ckpt.state:
        raise ValueError(f"{ckpt.source}: config.json says tie_word_embeddings=False but the "
                         "checkpoint has no lm_head.weight; set tie_word_embeddings=true or use a "
                         "full OPTForCausalLM checkpoint")
    module = OPTForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]

    def name_map(state):
        return opt_name_map(cfg, detect_prefix(state, "embed_tokens.weight", PREFIXES)), \
            opt_ignored(cfg)

    variables = load_params(ckpt, shapes, name_map, dtype=dtype, mesh=mesh, abstract=abstract)
    return module, variables, ckpt.hf_config


def cache_fn(config: OPTConfig, dtype: Any = jnp.float32, mesh: Mesh | None = None
             ) -> Callable[[int, int], Any]:
    """``init_cache`` with config, dtype (and mesh) bound: models/generate.py's ``init_cache_fn``."""
    return functools.partial(init_cache, config, dtype=dtype, mesh=mesh)


__all__ = ["OPTConfig", "OPTForCausalLM", "init_cache", "embed_tokens", "load", "opt_name_map",
           "cache_fn"]
