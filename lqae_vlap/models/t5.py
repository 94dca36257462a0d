"""Frozen T5 encoder-decoder (T5, T5 v1.1, Flan-T5) with a decoder KV cache, greedy and beam search.

Matches transformers' ``T5ForConditionalGeneration`` in eval mode:
  - RMS-style T5LayerNorm (layers.RMSNorm: no mean, no bias; statistics in float32), pre-norm
    blocks.
  - No bias anywhere, and no 1/sqrt(d) on the attention scores (T5 folds it into the q init).
  - Relative position buckets: bidirectional in the encoder, causal in the decoder; one bias table
    per stack, stored in the first block of the checkpoint and shared by every layer.
  - FFN 'relu' (original T5) or 'gated-gelu' (v1.1 / Flan-T5: gelu_new(wi_0 x) * wi_1 x).
  - LM head: the shared embedding (tied) or its own ``lm_head`` (v1.1 checkpoints store one); the
    decoder output is multiplied by d_model**-0.5 first when ``scale_decoder_outputs`` (original
    T5, i.e. the HF config's ``tie_word_embeddings`` was not False).

VLAP puts its projected visual tokens in front of the text in the ENCODER input: ``encode`` takes
``inputs_embeds`` and the generators take ``prefix_embeds``. The config and the layers (attention,
FFN, block) are in ``t5_layers.py``; the generators run ``generate.py``'s decoding loops, the ones
the decoder-only models use, on T5's decoder step.

Param tree (``{'params': ...}``), every leaf with logical axis names:
  shared/embedding [vocab, embed]; lm_head/kernel [embed, vocab] only when untied
  {encoder,decoder}/relative_attention_bias/embedding [position, heads]
  {encoder,decoder}/block_{i}/{self_attn,cross_attn}/{q,k,v}/kernel [embed, heads, kv], o/kernel [heads, kv, embed]
  {encoder,decoder}/block_{i}/{self_attn_norm,cross_attn_norm,mlp_norm}/scale [norm]
  {encoder,decoder}/block_{i}/mlp/{wi | wi_0, wi_1}/kernel [embed, mlp], mlp/wo/kernel [mlp, embed]
  {encoder,decoder}/final_norm/scale
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lqae_vlap.models.generate import (STOP_MODES, StepFn, beam_loop, check_beam_args, eos_array,
                                       greedy_loop)
from lqae_vlap.models.hf_weights import Linear, NameMap, Source, load_params, open_checkpoint
from lqae_vlap.models.layers import (RMSNorm, causal_visibility, constrain_kv_cache, dense,
                                     embedding_lookup, kv_cache_zeros, logical_init, padding_mask,
                                     remat_layer)
from lqae_vlap.models.t5_layers import KERNEL_INIT, Block, T5Config, relative_position_bucket

# Cache pytree: one {'key', 'value'} per decoder layer, each [batch, max_len, heads, head_dim].
Cache = tuple[dict[str, jax.Array], ...]


class T5(nn.Module):
    """T5ForConditionalGeneration; a pure function of its params."""

    config: T5Config
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    # Rematerialisation of each encoder and decoder block when differentiated
    # (layers.REMAT_POLICIES: 'none' | 'dots' | 'full'); params and forward values do not depend
    # on it. The decoder's cross-attention keys / values are computed outside the blocks, so
    # they are stored whatever the policy.
    remat: str = "none"

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model,
                               embedding_init=logical_init(("vocab", "embed"), nn.initializers.normal(1.0)),
                               **kw)
        bias_table = lambda name: nn.Embed(  # noqa: E731  ([buckets, heads])
            cfg.relative_attention_num_buckets, cfg.num_heads,
            embedding_init=logical_init(("position", "heads"), KERNEL_INIT), name=name, **kw)
        self.encoder_relative_bias = bias_table("encoder_relative_attention_bias")
        self.decoder_relative_bias = bias_table("decoder_relative_attention_bias")
        block = remat_layer(Block, self.remat, "T5.remat")
        self.encoder_blocks = [block(cfg, False, name=f"encoder_block_{i}", **kw) for i in range(cfg.num_layers)]
        self.decoder_blocks = [block(cfg, True, name=f"decoder_block_{i}", **kw)
                               for i in range(cfg.num_decoder_layers)]
        self.encoder_final_norm = RMSNorm(cfg.layer_norm_epsilon, **kw)
        self.decoder_final_norm = RMSNorm(cfg.layer_norm_epsilon, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                 kernel_init=KERNEL_INIT, **kw)

    def _position_bias(self, table: nn.Embed, q_pos: jax.Array, k_pos: jax.Array,
                       bidirectional: bool) -> jax.Array:
        """q_pos: [Lq], k_pos: [Lk] -> [1, H, Lq, Lk] float32."""
        cfg = self.config
        buckets = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None], bidirectional=bidirectional,
            num_buckets=cfg.relative_attention_num_buckets, max_distance=cfg.relative_attention_max_distance)
        return table(buckets).astype(jnp.float32).transpose(2, 0, 1)[None]

    def encode(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None) -> jax.Array:
        """Runs the encoder.

        Args:
          input_ids: [B, L] int, or None when inputs_embeds is given.
          attention_mask: [B, L], 1 = real token, 0 = padding. Default: all real.
          inputs_embeds: [B, L, D] vectors replacing the embedding lookup (VLAP: visual prefix + text).

        Returns:
          hidden: [B, L, D] after the final norm.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("T5.encode: pass exactly one of input_ids [B, L] or inputs_embeds [B, L, D]")
        if inputs_embeds is not None:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.d_model:
                raise ValueError(f"T5.encode: inputs_embeds must be [batch, length, {cfg.d_model}], "
                                 f"got shape {inputs_embeds.shape}")
            x = inputs_embeds.astype(self.dtype)
        else:
            if input_ids.ndim != 2:
                raise ValueError(f"T5.encode: input_ids must be [batch, length], got {input_ids.shape}")
            x = self.shared(input_ids)
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if attention_mask.shape != (batch, length):
            raise ValueError(f"T5.encode: attention_mask must be [batch, length] = {(batch, length)}, "
                             f"got {attention_mask.shape}")
        pos = jnp.arange(length)
        bias = self._position_bias(self.encoder_relative_bias, pos, pos, True)
        mask = padding_mask(attention_mask)
        for block in self.encoder_blocks:
            x, _ = block(x, bias, mask)
        return self.encoder_final_norm(x)

    def cross_key_values(self, encoder_hidden: jax.Array) -> Cache:
        """Every decoder layer's cross-attention keys/values, computed once per generation.

        encoder_hidden: [B, Le, D] -> tuple of {'key','value'} [B, Le, H, Dh].
        """
        return tuple(block.cross_key_values(encoder_hidden) for block in self.decoder_blocks)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array | None,
               encoder_mask: jax.Array, *, cache: Cache | None = None,
               cache_index: jax.Array | int | None = None,
               decoder_attention_mask: jax.Array | None = None,
               cross_kv: Cache | None = None) -> dict[str, Any]:
        """Runs the decoder and the lm head.

        Args:
          decoder_input_ids: [B, L] int (starts with decoder_start_token_id).
          encoder_hidden: [B, Le, D] from ``encode`` (may be None when cross_kv is given).
          encoder_mask: [B, Le], 1 = real encoder token.
          cache: from ``init_cache``; the L new keys/values are written at slots
            cache_index..cache_index+L-1 and attention covers every slot up to the query (causal),
            so unwritten later slots are never seen.
          cache_index: scalar int32 write offset (= decoder position of decoder_input_ids[:, 0]).
          decoder_attention_mask: [B, Lk] (Lk = max_len with a cache, else L), 0 = ignore that key.
          cross_kv: precomputed ``cross_key_values(encoder_hidden)``.

        Returns:
          dict(logits=[B, L, V] float32, hidden_states=[B, L, D], cache=new cache or None).
        """
        cfg = self.config
        if decoder_input_ids.ndim != 2:
            raise ValueError(f"T5.decode: decoder_input_ids must be [batch, length], got {decoder_input_ids.shape}")
        if cache is not None and cache_index is None:
            raise ValueError("T5.decode: a cache needs cache_index (the scalar write offset)")
        if cache is not None and len(cache) != cfg.num_decoder_layers:
            raise ValueError(f"T5.decode: cache has {len(cache)} layers, the model {cfg.num_decoder_layers}; "
                             "build it with init_cache(config, ...)")
        if cross_kv is None:
            if encoder_hidden is None:
                raise ValueError("T5.decode: pass encoder_hidden [B, Le, D] or cross_kv")
            cross_kv = self.cross_key_values(encoder_hidden)
        length = decoder_input_ids.shape[1]
        offset = jnp.asarray(0 if cache is None else cache_index, jnp.int32)
        q_pos = offset + jnp.arange(length, dtype=jnp.int32)
        k_pos = jnp.arange(length if cache is None else cache[0]["key"].shape[1], dtype=jnp.int32)
        self_bias = self._position_bias(self.decoder_relative_bias, q_pos, k_pos, False)
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones((1, k_pos.shape[0]), jnp.int32)
        self_mask = causal_visibility(decoder_attention_mask, offset, length)
        cross_mask = padding_mask(encoder_mask)

        x = self.shared(decoder_input_ids)
        new_cache = []
        for i, block in enumerate(self.decoder_blocks):
            x, layer_cache = block(x, self_bias, self_mask,
                                   layer_cache=None if cache is None else cache[i],
                                   cache_index=offset, cross_kv=cross_kv[i], cross_mask=cross_mask)
            new_cache.append(layer_cache)
        hidden = self.decoder_final_norm(x)
        h = hidden * (cfg.d_model ** -0.5) if cfg.scale_decoder_outputs else hidden
        logits = self.shared.attend(h) if cfg.tie_word_embeddings else self.lm_head(h)
        return {"logits": logits.astype(jnp.float32), "hidden_states": hidden,
                "cache": None if cache is None else tuple(new_cache)}

    def __call__(self, input_ids: jax.Array | None = None, decoder_input_ids: jax.Array | None = None, *,
                 attention_mask: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
                 decoder_attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """Encoder then decoder (teacher forcing).

        Returns dict(logits=[B, Ld, V] float32, hidden_states=[B, Ld, D] decoder,
        encoder_hidden=[B, Le, D]).
        """
        if decoder_input_ids is None:
            raise ValueError("T5: decoder_input_ids [B, Ld] are required (start with decoder_start_token_id)")
        enc = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds)
        if attention_mask is None:
            attention_mask = jnp.ones(enc.shape[:2], jnp.int32)
        out = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask=decoder_attention_mask)
        return {"logits": out["logits"], "hidden_states": out["hidden_states"], "encoder_hidden": enc}


def init_cache(config: T5Config, batch: int, max_len: int, dtype: Any = jnp.float32, *,
               mesh: Mesh | None = None) -> Cache:
    """Zeroed decoder self-attention buffers: per layer {'key','value'} [batch, max_len, heads, d_kv].

    With ``mesh``, each buffer is created sharded: batch over ('data', 'fsdp'), heads over
    'tensor' (``layers.kv_cache_sharding``).
    """
    shape = (batch, max_len, config.num_heads, config.d_kv)
    return tuple({"key": kv_cache_zeros(shape, dtype, mesh), "value": kv_cache_zeros(shape, dtype, mesh)}
                 for _ in range(config.num_decoder_layers))


def embed_tokens(params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """The (unscaled) input-embedding lookup. params: variables or the inner tree; ids: [B, L] -> [B, L, D]."""
    return embedding_lookup(params, ("shared", "embedding"), ids,
                            "pass the tree from t5.load or T5.init")


# --------------------------------------------------------------------------------------------
# Generation: the whole loop in one jit (lax.while_loop over a preallocated cache)
# --------------------------------------------------------------------------------------------


def _encoder_inputs(module: T5, variables: Any, input_ids: jax.Array, attention_mask: jax.Array | None,
                    prefix_embeds: jax.Array | None, prefix_mask: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """Encoder hidden [B, P+L, D] and mask [B, P+L]; prefix_embeds [B, P, D] go before the text,
    all real unless prefix_mask [B, P] (1 = real) says otherwise."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if prefix_embeds is None:
        return module.apply(variables, input_ids, attention_mask, method=T5.encode), attention_mask
    embeds = jnp.concatenate([prefix_embeds.astype(module.dtype),
                              embed_tokens(variables, input_ids).astype(module.dtype)], axis=1)
    pm = (jnp.ones(prefix_embeds.shape[:2], attention_mask.dtype) if prefix_mask is None
          else prefix_mask.astype(attention_mask.dtype))
    mask = jnp.concatenate([pm, attention_mask], axis=1)
    return module.apply(variables, None, mask, inputs_embeds=embeds, method=T5.encode), mask


def _check_generate_args(module: T5, input_ids: jax.Array, max_new_tokens: int,
                         prefix_embeds: jax.Array | None,
                         prefix_mask: jax.Array | None = None) -> None:
    if not isinstance(module, T5):
        raise TypeError(f"generation needs a T5 module, got {type(module).__name__}")
    if input_ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [batch, length], got {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefix_embeds is not None and (prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != input_ids.shape[0]
                                      or prefix_embeds.shape[2] != module.config.d_model):
        raise ValueError(f"generate: prefix_embeds must be [{input_ids.shape[0]}, prefix, "
                         f"{module.config.d_model}], got {prefix_embeds.shape}")
    if prefix_mask is not None and (prefix_embeds is None
                                    or prefix_mask.shape != prefix_embeds.shape[:2]):
        raise ValueError(f"generate: prefix_mask {prefix_mask.shape} must be [batch, prefix] of "
                         "prefix_embeds (1 = real slot)")


def _first_step(module: T5, variables: Any, input_ids: jax.Array,
                attention_mask: jax.Array | None, prefix_embeds: jax.Array | None,
                max_new_tokens: int, mesh: Mesh | None, prefix_mask: jax.Array | None = None
                ) -> tuple[StepFn, Any, jax.Array, Cache]:
    """Encodes once and feeds decoder_start_token_id at decoder slot 0.

    Returns what ``generate.greedy_loop`` / ``beam_loop`` take: the step (token t - 1 goes into
    slot t), its context (cross-attention keys/values, encoder mask), the logits [B, V], the cache.
    """
    cfg, batch = module.config, input_ids.shape[0]
    enc, enc_mask = _encoder_inputs(module, variables, input_ids, attention_mask, prefix_embeds,
                                    prefix_mask)
    cross_kv = constrain_kv_cache(module.apply(variables, enc, method=T5.cross_key_values), mesh)

    def step(context, tokens, t, cache):
        cross_kv, enc_mask = context
        out = module.apply(variables, tokens[:, None], None, enc_mask, cache=cache, cache_index=t,
                           cross_kv=cross_kv, method=T5.decode)
        return out["logits"][:, -1], out["cache"]

    start = jnp.full((batch,), cfg.decoder_start_token_id, jnp.int32)
    logits, cache = step((cross_kv, enc_mask), start, jnp.int32(0),
                         init_cache(cfg, batch, max_new_tokens, module.dtype, mesh=mesh))
    return step, (cross_kv, enc_mask), logits, constrain_kv_cache(cache, mesh)


def _with_start(cfg: T5Config, tokens: jax.Array) -> jax.Array:
    """tokens: [..., N] -> [..., 1 + N] led by decoder_start_token_id (transformers' output)."""
    start = jnp.full(tokens.shape[:-1] + (1,), cfg.decoder_start_token_id, jnp.int32)
    return jnp.concatenate([start, tokens], axis=-1)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "mesh"))
def greedy_generate(module: T5, variables: Any, input_ids: jax.Array,
                    attention_mask: jax.Array | None = None, *, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None,
                    prefix_embeds: jax.Array | None = None,
                    mesh: Mesh | None = None,
                    prefix_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Greedy decoding, as transformers' ``generate(do_sample=False)`` (``generate.greedy_loop``).

    Args:
      input_ids: [B, L] encoder token ids; attention_mask: [B, L] (1 = real).
      max_new_tokens: decoder steps at most; the loop stops early once every row emitted EOS.
      eos_token_id: an id or ids that end a row (traced: new ids do not recompile); None:
        config.eos_token_id; () never ends early.
      prefix_embeds: optional [B, P, D] encoder inputs placed before the embedded input_ids.
      prefix_mask: optional [B, P], 1 = real prefix slot (default all real). T5's relative
        positions count slots, so keep every row's real slots first (pad on the right only).
      mesh: keep the decoder cache and the cross-attention keys/values sharded on it (batch over
        ('data', 'fsdp'), heads over 'tensor') through the loop; pass params placed on the same
        mesh (``t5.load(..., mesh=mesh)``).

    Returns:
      dict(sequences=[B, 1 + max_new_tokens] starting with decoder_start_token_id, then the
      generated tokens; after a row's EOS (and past the last step run) filled with pad_token_id;
      num_steps=scalar int32 steps run, so sequences[:, :1 + num_steps] is transformers' output).
    """
    _check_generate_args(module, input_ids, max_new_tokens, prefix_embeds, prefix_mask)
    cfg = module.config
    first = _first_step(module, variables, input_ids, attention_mask, prefix_embeds,
                        max_new_tokens, mesh, prefix_mask)
    eos = eos_array(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    tokens, steps = greedy_loop(*first, eos, max_new_tokens=max_new_tokens,
                                pad_token_id=cfg.pad_token_id, mesh=mesh)
    return {"sequences": _with_start(cfg, tokens), "num_steps": steps}


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "num_beams",
                                             "early_stopping", "mesh"))
def beam_search(module: T5, variables: Any, input_ids: jax.Array,
                attention_mask: jax.Array | None = None, *, max_new_tokens: int,
                num_beams: int = 4, length_penalty: float = 1.0,
                early_stopping: bool | str = False,
                eos_token_id: int | Sequence[int] | None = None,
                prefix_embeds: jax.Array | None = None,
                mesh: Mesh | None = None,
                prefix_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Beam search, transformers' vectorised ``_beam_search`` (``generate.beam_step``).

    Every step keeps the best (1 + n_eos) * num_beams continuations; those ending in EOS (or at
    the length limit) among the first num_beams compete for the finished slots with score
    sum(log p) / generated_length**length_penalty; the rest continue. ``early_stopping`` as in
    transformers: False stops when no running beam can beat the worst finished one (best running
    score / current length), True once num_beams are finished, 'never' judges the running beams
    at max length when length_penalty > 0. ``eos_token_id``, ``length_penalty`` (traced) and
    ``mesh`` (the cache rows are batch x beams) as in ``greedy_generate``.

    Returns:
      dict(sequences=[B, num_beams, 1 + max_new_tokens] best first, pad_token_id after each EOS;
      scores=[B, num_beams] the length-normalised scores (transformers' sequences_scores);
      num_steps=scalar int32 decoder steps run).
    """
    _check_generate_args(module, input_ids, max_new_tokens, prefix_embeds, prefix_mask)
    check_beam_args(num_beams, early_stopping)
    cfg = module.config
    first = _first_step(module, variables, input_ids, attention_mask, prefix_embeds,
                        max_new_tokens, mesh, prefix_mask)
    eos = eos_array(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    out = beam_loop(*first, eos, jnp.asarray(length_penalty, jnp.float32),
                    jnp.int32(STOP_MODES[early_stopping]), num_beams=num_beams,
                    max_new_tokens=max_new_tokens, pad_token_id=cfg.pad_token_id, mesh=mesh)
    return {**out, "sequences": _with_start(cfg, out["sequences"])}


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------


def t5_name_map(cfg: T5Config) -> NameMap:
    """Our T5 param paths -> transformers ``T5ForConditionalGeneration`` state-dict names."""
    # The embedding is stored once as 'shared' (tied copies under encoder/decoder.embed_tokens are
    # dropped by safetensors); any of the three names supplies it.
    m: NameMap = {("shared", "embedding"): Source(("shared.weight", "encoder.embed_tokens.weight",
                                                   "decoder.embed_tokens.weight"))}
    if not cfg.tie_word_embeddings:
        m[("lm_head", "kernel")] = Source(("lm_head.weight",), Linear())
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        m[(f"{stack}_relative_attention_bias", "embedding")] = Source(
            (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",))
        m[(f"{stack}_final_norm", "scale")] = Source((f"{stack}.final_layer_norm.weight",))
        for i in range(n_layers):
            hf, fx = f"{stack}.block.{i}.layer", (f"{stack}_block_{i}",)
            attn = [("self_attn", f"{hf}.0.SelfAttention", f"{hf}.0.layer_norm")]
            if stack == "decoder":
                attn.append(("cross_attn", f"{hf}.1.EncDecAttention", f"{hf}.1.layer_norm"))
            for name, hf_attn, hf_norm in attn:
                for p in ("q", "k", "v"):
                    m[fx + (name, p, "kernel")] = Source((f"{hf_attn}.{p}.weight",), Linear())
                m[fx + (name, "o", "kernel")] = Source((f"{hf_attn}.o.weight",), Linear(in_dims=2))
                m[fx + (f"{name}_norm", "scale")] = Source((f"{hf_norm}.weight",))
            ff = f"{hf}.{2 if stack == 'decoder' else 1}"
            m[fx + ("mlp_norm", "scale")] = Source((f"{ff}.layer_norm.weight",))
            for p in (("wi_0", "wi_1") if cfg.is_gated else ("wi",)) + ("wo",):
                m[fx + ("mlp", p, "kernel")] = Source((f"{ff}.DenseReluDense.{p}.weight",), Linear())
    return m


def t5_ignored(cfg: T5Config) -> tuple[str, ...]:
    """Regexes of checkpoint keys a T5 model knowingly does not use."""
    # Some conversions repeat the (unused) relative bias in later blocks.
    return (r"^(encoder|decoder)\.block\.[1-9]\d*\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",)


def abstract_params(module: T5) -> Any:
    """Boxed ShapeDtypeStructs of every param (nothing computed or allocated)."""
    def init(rng):
        ids = jnp.zeros((1, 1), jnp.int32)
        return module.init(rng, ids, ids)
    return jax.eval_shape(init, jax.random.key(0))["params"]


def load(path_or_name: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
         mesh: Mesh | None = None, abstract: bool = False, hf_config: Any = None
         ) -> tuple[T5, dict[str, Any], Any]:
    """Loads a T5 / T5 v1.1 / Flan-T5 checkpoint folder as a frozen T5.

    The lm head is tied to the shared embedding unless the checkpoint stores ``lm_head.weight``;
    planning without weights (config.json alone, or ``hf_config`` with ``abstract=True``) unties
    it when the config says ``tie_word_embeddings=False`` (v1.1 / Flan-T5). abstract=True reads
    no tensor: the params are ``jax.ShapeDtypeStruct``s with their shardings on ``mesh``.

    Returns:
      (module, {'params': params}, hf_config).
    """
    ckpt = open_checkpoint(path_or_name, abstract=abstract, hf_config=hf_config, who="t5.load")
    if ckpt.state is not None:
        tied = "lm_head.weight" not in ckpt.state
    else:
        tied = getattr(ckpt.hf_config, "tie_word_embeddings", True) is not False
    cfg = T5Config.from_hf(ckpt.hf_config, tie_word_embeddings=tied)
    module = T5(cfg, dtype=dtype, param_dtype=dtype)
    variables = load_params(ckpt, abstract_params(module), lambda state: (t5_name_map(cfg),
                                                                          t5_ignored(cfg)),
                            dtype=dtype, mesh=mesh, abstract=abstract)
    return module, variables, ckpt.hf_config
