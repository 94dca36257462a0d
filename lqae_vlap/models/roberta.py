"""Frozen BERT / RoBERTa masked language model (the LQAE codebook and its "filler").

Matches transformers' ``BertForMaskedLM`` / ``RobertaForMaskedLM`` (and plain ``BertModel`` /
``RobertaModel`` with ``has_lm_head=False``) in eval mode: post-LayerNorm encoder, learned absolute
positions, token-type embeddings, and an MLM head whose decoder is tied to the word embeddings.
No dropout: the model is only ever run frozen.

Param tree (``{'params': ...}``), every leaf with logical axis names:
  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, embeddings/layer_norm
  layer_{i}/attention/{query,key,value}/kernel [embed, heads, kv], .../out/kernel [heads, kv, embed]
  layer_{i}/attention_norm, layer_{i}/mlp/{wi,wo}, layer_{i}/mlp_norm
  lm_head/{dense,layer_norm,bias} (+ lm_head/decoder/kernel only when the head is untied)

Checkpoint loading: ``load(folder)`` (``models.load_pretrained`` picks it for bert / roberta /
xlm-roberta) with ``encoder_lm_name_map`` through ``hf_weights.load_params``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lqae_vlap.models.hf_weights import (Linear, NameMap, Reshape, Source, dense_sources,
                                         detect_prefix, layer_norm_sources, load_params,
                                         open_checkpoint)

from lqae_vlap.models.layers import (ACTIVATIONS, check_activation, check_heads_divide, dense,
                                     dot_product_attention, heads_dense, heads_out_dense,
                                     layer_norm, logical_init, padding_mask, remat_layer)

# Families with this exact architecture; the value is the family whose position scheme they use.
SUPPORTED_MODEL_TYPES: dict[str, str] = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}

@dataclasses.dataclass(frozen=True)
class EncoderLMConfig:
    """Hyper-parameters of a BERT-family encoder (names follow the Hugging Face config)."""

    model_type: str = "roberta"  # 'bert' | 'roberta' (xlm-roberta maps to 'roberta')
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    has_lm_head: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in ("bert", "roberta"):
            raise ValueError(
                f"EncoderLMConfig.model_type={self.model_type!r} is not supported; use one of "
                f"{sorted(SUPPORTED_MODEL_TYPES)} (build it with EncoderLMConfig.from_hf)")
        check_activation(self.hidden_act)
        check_heads_divide(self.hidden_size, self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """First position id of a real token: RoBERTa reserves 0..pad for padding (fairseq legacy)."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @classmethod
    def from_hf(cls, hf_config: Any, *, has_lm_head: bool = True) -> EncoderLMConfig:
        """Reads a transformers ``BertConfig`` / ``RobertaConfig`` / ``XLMRobertaConfig``."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a BERT-family encoder this module implements; "
                f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")
        pos_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
        if pos_type != "absolute":
            raise ValueError(f"position_embedding_type={pos_type!r} is not supported; only "
                             "'absolute' learned positions are implemented")
        if getattr(hf_config, "is_decoder", False):
            raise ValueError("hf_config.is_decoder=True (causal attention) is not supported; "
                             "this is a bidirectional masked-LM encoder")
        pad = hf_config.pad_token_id
        return cls(
            model_type=SUPPORTED_MODEL_TYPES[model_type],
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            num_hidden_layers=int(hf_config.num_hidden_layers),
            num_attention_heads=int(hf_config.num_attention_heads),
            intermediate_size=int(hf_config.intermediate_size),
            hidden_act=str(hf_config.hidden_act),
            layer_norm_eps=float(hf_config.layer_norm_eps),
            max_position_embeddings=int(hf_config.max_position_embeddings),
            type_vocab_size=int(hf_config.type_vocab_size),
            pad_token_id=int(pad if pad is not None else 0),
            has_lm_head=has_lm_head,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        )


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm. ``attend`` is the tied decoder."""

    config: EncoderLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                                        embedding_init=logical_init(("vocab", "embed")), **kw)
        self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                            embedding_init=logical_init(("position", "embed")), **kw)
        # A (tiny) vocabulary of segment ids, hence 'vocab'; fit_sharding_to_shape replicates it.
        self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                              embedding_init=logical_init(("vocab", "embed")), **kw)
        self.layer_norm = layer_norm(epsilon=cfg.layer_norm_eps, name="layer_norm", **kw)

    def __call__(self, word_vectors: jax.Array | None, input_ids: jax.Array | None,
                 position_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """word_vectors: [B, L, D] or None (then looked up from input_ids: [B, L]) -> [B, L, D]."""
        if word_vectors is None:
            word_vectors = self.word_embeddings(input_ids)
        x = (word_vectors.astype(self.dtype) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.layer_norm(x)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, V] against the word-embedding table."""
        return self.word_embeddings.attend(x)


class SelfAttention(nn.Module):
    config: EncoderLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, L, D], mask: [B, 1, 1, L] bool (True = real key) -> [B, L, D]."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = lambda name: heads_dense(cfg.num_attention_heads, cfg.head_dim, name=name, **kw)  # noqa: E731
        q, k, v = qkv("query")(x), qkv("key")(x), qkv("value")(x)  # [B, L, H, Dh]
        ctx = dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
        return heads_out_dense(cfg.hidden_size, name="out", **kw)(ctx)


class Mlp(nn.Module):
    config: EncoderLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), name="wi", **kw)(x)
        h = ACTIVATIONS[cfg.hidden_act](h)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="wo", **kw)(h)


class EncoderLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x)), as in BertLayer."""

    config: EncoderLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layer_norm_eps
        x = layer_norm(epsilon=eps, name="attention_norm", **kw)(
            x + SelfAttention(cfg, name="attention", **kw)(x, mask))
        return layer_norm(epsilon=eps, name="mlp_norm", **kw)(x + Mlp(cfg, name="mlp", **kw)(x))


class LMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> vocab logits (decoder tied to the word embeddings + bias)."""

    config: EncoderLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, embeddings: Embeddings) -> jax.Array:
        """x: [B, L, D] -> logits [B, L, V]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # A D->D map; 'mlp' on the output side because one array cannot name 'embed' twice.
        x = dense(cfg.hidden_size, ("embed", "mlp"), name="dense", **kw)(x)
        # BERT's head uses hidden_act; RobertaLMHead hard-codes the exact gelu.
        act = cfg.hidden_act if cfg.model_type == "bert" else "gelu"
        x = ACTIVATIONS[act](x)
        x = layer_norm(epsilon=cfg.layer_norm_eps, name="layer_norm", **kw)(x)
        if cfg.tie_word_embeddings:
            logits = embeddings.attend(x)
        else:
            logits = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="decoder",
                           **kw)(x)
        bias = self.param("bias", logical_init(("vocab",), nn.initializers.zeros), (cfg.vocab_size,),
                          self.param_dtype)
        return logits + bias.astype(self.dtype)


class MaskedLM(nn.Module):
    """BERT / RoBERTa encoder with an optional masked-LM head; a pure function of its params."""

    config: EncoderLMConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    # Rematerialisation of each encoder layer when differentiated (layers.REMAT_POLICIES:
    # 'none' | 'dots' | 'full'); the params and the forward values do not depend on it.
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None,
                 position_ids: jax.Array | None = None,
                 with_lm_head: bool = True,
                 logits_at: jax.Array | None = None,
                 output_hidden_states: bool = False) -> dict[str, jax.Array]:
        """Runs the encoder.

        Args:
          input_ids: [B, L] int token ids, or None when inputs_embeds is given.
          inputs_embeds: [B, L, D] vectors that REPLACE the word-embedding lookup (LQAE feeds its
            quantized word vectors here); positions and token types are still added.
          attention_mask: [B, L], 1 = real token, 0 = padding. Default: all real.
          token_type_ids: [B, L] segment ids. Default: zeros.
          position_ids: [B, L] or [L]. Default as in HF: BERT 0..L-1; RoBERTa counts non-pad
            tokens from pad_token_id+1 for input_ids, and pad+1..pad+L for inputs_embeds.
          with_lm_head: also return the MLM logits.
          logits_at: [B, K] int positions: the MLM logits only there ([B, K, V]; LQAE scores
            only its masked positions, and the head over every position would cost L / K times
            the FLOPs and memory). Default: every position.
          output_hidden_states: also return every layer's output, as transformers does.

        Returns:
          dict(last_hidden_state=[B, L, D], logits=[B, L, V] (or [B, K, V]) only when
          with_lm_head,
          hidden_states=(embeddings, layer 1, ..., layer N) each [B, L, D] only when asked).
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MaskedLM: pass exactly one of input_ids [B, L] or inputs_embeds [B, L, D]")
        if with_lm_head and not cfg.has_lm_head:
            raise ValueError("MaskedLM: this checkpoint has no masked-LM head (has_lm_head=False, e.g. a "
                             "plain BertModel); call with with_lm_head=False for hidden states only")
        if inputs_embeds is not None:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"MaskedLM: inputs_embeds must be [batch, length, {cfg.hidden_size}], "
                                 f"got shape {inputs_embeds.shape}")
            shape = inputs_embeds.shape[:2]
        else:
            if input_ids.ndim != 2:
                raise ValueError(f"MaskedLM: input_ids must be [batch, length], got {input_ids.shape}")
            shape = input_ids.shape
        batch, length = shape
        max_length = cfg.max_position_embeddings - cfg.position_offset
        if length > max_length:
            raise ValueError(f"MaskedLM: length {length} exceeds the {max_length} positions this "
                             "checkpoint has; truncate the sequences")

        if position_ids is None:
            position_ids = self._default_positions(input_ids, length)
        position_ids = jnp.broadcast_to(position_ids, shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.int32)
        mask = padding_mask(attention_mask)

        embeddings = Embeddings(cfg, name="embeddings", **kw)
        x = embeddings(inputs_embeds, input_ids, position_ids, token_type_ids)
        hidden = [x]
        layer_cls = remat_layer(EncoderLayer, self.remat, "MaskedLM.remat")
        for i in range(cfg.num_hidden_layers):
            x = layer_cls(cfg, name=f"layer_{i}", **kw)(x, mask)
            hidden.append(x)
        out = {"last_hidden_state": x}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden)
        if with_lm_head:
            at = x
            if logits_at is not None:
                if logits_at.ndim != 2 or logits_at.shape[0] != batch:
                    raise ValueError(f"MaskedLM: logits_at must be [batch={batch}, K] positions, "
                                     f"got shape {logits_at.shape}")
                at = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1)
            out["logits"] = LMHead(cfg, name="lm_head", **kw)(at, embeddings)
        return out

    def _default_positions(self, input_ids: jax.Array | None, length: int) -> jax.Array:
        cfg = self.config
        if cfg.model_type == "roberta" and input_ids is not None:
            # HF create_position_ids_from_input_ids: pads keep position pad_token_id.
            real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        return jnp.arange(length, dtype=jnp.int32) + cfg.position_offset


def word_embedding_matrix(params: Mapping[str, Any]) -> jax.Array:
    """The frozen word-embedding table [V, D] (LQAE's codebook) from a MaskedLM params tree.

    Accepts either the variables dict ``{'params': ...}`` or the inner params tree, boxed or not.
    """
    tree = params["params"] if "params" in params else params
    try:
        table = tree["embeddings"]["word_embeddings"]["embedding"]
    except (KeyError, TypeError) as e:
        raise ValueError("word_embedding_matrix: params lack embeddings/word_embeddings/embedding; "
                         "pass the tree returned by roberta.load or MaskedLM.init") from e
    return nn.meta.unbox(table)


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------

# Heads of BertForMaskedLM / RobertaForMaskedLM: they never carry the base-model prefix.
_MLM_HEAD_KEYS = {
    "bert": dict(dense="cls.predictions.transform.dense", norm="cls.predictions.transform.LayerNorm",
                 bias="cls.predictions.bias", decoder="cls.predictions.decoder"),
    "roberta": dict(dense="lm_head.dense", norm="lm_head.layer_norm", bias="lm_head.bias",
                    decoder="lm_head.decoder"),
}


def encoder_lm_has_head(keys: Iterable[str], model_type: str) -> bool:
    """Whether a BERT-family checkpoint carries a masked-LM head (BertModel/MiniLM do not)."""
    return f"{_MLM_HEAD_KEYS[model_type]['dense']}.weight" in set(keys)


def encoder_lm_name_map(cfg: EncoderLMConfig, prefix: str) -> NameMap:
    """BERT / RoBERTa: our MaskedLM param paths -> transformers state-dict names."""
    p = prefix
    m: NameMap = {
        ("embeddings", "word_embeddings", "embedding"): Source((f"{p}embeddings.word_embeddings.weight",)),
        ("embeddings", "position_embeddings", "embedding"):
            Source((f"{p}embeddings.position_embeddings.weight",)),
        ("embeddings", "token_type_embeddings", "embedding"):
            Source((f"{p}embeddings.token_type_embeddings.weight",)),
        **layer_norm_sources(("embeddings", "layer_norm"), f"{p}embeddings.LayerNorm"),
    }
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"{p}encoder.layer.{i}", (f"layer_{i}",)
        for name in ("query", "key", "value"):
            m.update(dense_sources(fx + ("attention", name), f"{hf}.attention.self.{name}",
                                   bias=Reshape()))
        m.update(dense_sources(fx + ("attention", "out"), f"{hf}.attention.output.dense",
                               Linear(in_dims=2)))
        m.update(layer_norm_sources(fx + ("attention_norm",), f"{hf}.attention.output.LayerNorm"))
        m.update(dense_sources(fx + ("mlp", "wi"), f"{hf}.intermediate.dense"))
        m.update(dense_sources(fx + ("mlp", "wo"), f"{hf}.output.dense"))
        m.update(layer_norm_sources(fx + ("mlp_norm",), f"{hf}.output.LayerNorm"))
    if cfg.has_lm_head:
        head = _MLM_HEAD_KEYS[cfg.model_type]
        m.update(dense_sources(("lm_head", "dense"), head["dense"]))
        m.update(layer_norm_sources(("lm_head", "layer_norm"), head["norm"]))
        # Tied heads share one bias stored as either or both names; an untied head (transformers 5)
        # also unties the bias and its forward adds decoder.bias.
        bias_keys = (head["bias"], f"{head['decoder']}.bias")
        m[("lm_head", "bias")] = Source(bias_keys if cfg.tie_word_embeddings else bias_keys[::-1])
        if not cfg.tie_word_embeddings:
            m[("lm_head", "decoder", "kernel")] = Source(
                (f"{head['decoder']}.weight", f"{p}embeddings.word_embeddings.weight"), Linear())
    return m


def encoder_lm_ignored(cfg: EncoderLMConfig) -> tuple[str, ...]:
    """Regexes of checkpoint keys a BERT-family MaskedLM knowingly does not use."""
    head = _MLM_HEAD_KEYS[cfg.model_type]
    ignored = [r"(^|\.)embeddings\.(position_ids|token_type_ids)$",  # buffers, not weights
               r"(^|\.)pooler\.",  # the [CLS] pooler of BertModel / BertForPreTraining
               r"^cls\.seq_relationship\."]  # BERT's next-sentence head
    if cfg.tie_word_embeddings:  # the decoder reuses the word embeddings
        ignored.append("^" + re.escape(f"{head['decoder']}.weight") + "$")
    return tuple(ignored)


def load(path_or_name: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
         mesh: Mesh | None = None, abstract: bool = False, hf_config: Any = None
         ) -> tuple[MaskedLM, dict[str, Any], Any]:
    """Loads a BERT / RoBERTa / XLM-R checkpoint (with or without its MLM head) as a frozen MaskedLM.

    Args:
      path_or_name: local checkpoint folder (or a hub name where there is network).
      dtype: param and compute dtype (e.g. jnp.bfloat16).
      mesh: place every weight on this mesh by its logical axis names while loading.
      abstract: read no tensor: return ``jax.ShapeDtypeStruct`` leaves (with their shardings when
        ``mesh`` is given) for planning and compiling without the weights.
      hf_config: abstract only: a transformers config to plan from instead of a folder.

    Returns:
      (module, variables, hf_config): ``module.apply(variables, input_ids, ...)`` runs it;
      ``variables = {'params': ...}`` holds plain jax arrays. Checkpoints without a head
      (e.g. a plain BertModel) load with ``config.has_lm_head=False``; planning from a config
      alone assumes the full masked LM.
    """
    ckpt = open_checkpoint(path_or_name, abstract=abstract, hf_config=hf_config,
                           who="roberta.load")
    cfg = EncoderLMConfig.from_hf(ckpt.hf_config)  # raises for other families
    if ckpt.state is not None:
        cfg = dataclasses.replace(cfg, has_lm_head=encoder_lm_has_head(ckpt.state, cfg.model_type))
    module = MaskedLM(cfg, dtype=dtype, param_dtype=dtype)
    shapes = jax.eval_shape(functools.partial(module.init, with_lm_head=cfg.has_lm_head),
                            jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]

    def name_map(state):
        prefix = detect_prefix(state, "embeddings.word_embeddings.weight", ("bert.", "roberta.", ""))
        return encoder_lm_name_map(cfg, prefix), encoder_lm_ignored(cfg)

    variables = load_params(ckpt, shapes, name_map, dtype=dtype, mesh=mesh, abstract=abstract)
    return module, variables, ckpt.hf_config
