"""Frozen BEiT vision tower (VLAP's second vision encoder) and its Hugging Face checkpoint loader.

Matches transformers' ``BeitModel`` in eval mode (no dropout, no drop-path, no position
interpolation: images must be ``image_size`` square):
  patches (stride-p conv WITH bias) [-> mask token where ``bool_masked_pos``] -> [cls; patches]
  [+ absolute positions] -> blocks ``x + lambda_1 * attn(LN_before(x), bias)``,
  ``x + lambda_2 * mlp(LN_after(x))`` -> ``layernorm`` (only when ``use_mean_pooling`` is False)
  -> last_hidden_state; pooled = pooler LN(mean of the patch tokens) with mean pooling, else the
  CLS token of last_hidden_state.
Attention: q and v with bias, k without; the logits get a T5-style relative position bias from a
table ``[(2W-1)^2 + 3, heads]`` (W = image_size / patch_size; the 3 extra rows are cls->token,
token->cls, cls->cls) shared by every layer (``use_shared_relative_position_bias``, the
pre-training layout) and/or one per layer (``use_relative_position_bias``, the fine-tuned
layout); both add when both are set, as in HF. ``lambda_*`` (layer scale) exist only when
``layer_scale_init_value > 0`` (else 1).

Which tokens VLAP uses: every one of ``last_hidden_state`` (1 + N, 197 for BEiT-Base at 224),
as the authors' train.py does (``BeitModel.from_pretrained("microsoft/beit-base-patch16-224-pt22k")
(**imgs).last_hidden_state`` into ``nn.Linear(768, ...)``). For that checkpoint
``use_mean_pooling`` is True (HF's conversion script leaves the default and loads the converted
weights strictly into ``BeitForMaskedImageModeling``, whose BeitModel then has no ``layernorm``),
so last_hidden_state is the LAST BLOCK'S OUTPUT WITH NO FINAL LayerNorm: the masked-image-modeling
head's own ``layernorm`` (BEiT's ``norm``) is not part of BeitModel and is not applied here either.

Images are channels-last ``[B, H, W, C]``, normalised as ``data/beit_preprocess.py`` does. The
patch conv is a Dense over ``vit.patchify``'s (row, col, channel) flattening (``clip.PatchConv``).

Param tree (``{'params': ...}``), every leaf with logical axis names:
  embeddings/{cls_token [embed], mask_token [embed] (use_mask_token),
              patch_embeddings/{kernel [patch, embed], bias [embed]},
              position_embeddings [position, embed] (use_absolute_position_embeddings)}
  shared_relative_position_bias/relative_position_bias_table [position, heads] (shared layout)
  layers_{i}/{layernorm_before, layernorm_after} ({scale, bias} [norm]), lambda_{1,2} [norm]
  layers_{i}/attention/{q_proj, k_proj (no bias), v_proj}/kernel [embed, heads, kv],
                       .../o_proj/kernel [heads, kv, embed]
  layers_{i}/relative_position_bias/relative_position_bias_table [position, heads] (per layer)
  layers_{i}/mlp/{fc1 [embed, mlp], fc2 [mlp, embed]}
  layernorm (without mean pooling), pooler/layernorm (with add_pooling_layer and mean pooling)

Checkpoint layouts (transformers 5.x save_pretrained writes the transformers-4 names, which are
also what the hub checkpoints hold; checked by saving tiny models):
  BeitModel:                   no prefix: "embeddings.cls_token", "encoder.layer.{i}.attention.
                               attention.query.weight", ..., "encoder.layer.{i}.attention.attention.
                               relative_position_bias.relative_position_bias_table",
                               "layernorm.*" or "pooler.layernorm.*"
  BeitForMaskedImageModeling   "beit.*" (+ "beit.embeddings.mask_token", "beit.encoder.
  (microsoft/beit-base-        relative_position_bias.relative_position_bias_table"), and the head's
  patch16-224-pt22k):          "layernorm.*" and "lm_head.*" (ignored here)
  BeitForImageClassification:  "beit.*" + "classifier.*" (ignored)
  Older checkpoints also carry "relative_position_index" buffers (ignored: rebuilt here).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

# The same patch conv and fc1 -> act -> fc2 MLP as CLIP (HF BeitIntermediate / BeitOutput).
from lqae_vlap.models.clip import Mlp, PatchConv
from lqae_vlap.models.hf_weights import (Linear, NameMap, Reshape, Source, dense_sources,
                                         detect_prefix, layer_norm_sources, load_params,
                                         open_checkpoint)
from lqae_vlap.models.layers import (check_activation, check_heads_divide, dense,
                                     dot_product_attention, heads_dense, heads_out_dense,
                                     layer_norm, logical_init)
from lqae_vlap.models.vit import patchify

_MODEL_TYPE = "beit"


def _square(value: Any, field: str) -> int:
    """HF allows ``image_size`` / ``patch_size`` as an int or a [height, width] pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"BEiT {field}={list(value)}: only square sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class BeitConfig:
    """Hyper-parameters of a BEiT tower (names follow transformers' BeitConfig; its defaults).

    ``add_pooling_layer`` is BeitModel's constructor argument: with mean pooling it adds
    ``pooler/layernorm`` (which a BeitForMaskedImageModeling checkpoint does not hold).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    use_mask_token: bool = False
    use_absolute_position_embeddings: bool = False
    use_relative_position_bias: bool = False
    use_shared_relative_position_bias: bool = False
    layer_scale_init_value: float = 0.1
    use_mean_pooling: bool = True
    add_pooling_layer: bool = False

    def __post_init__(self) -> None:
        check_activation(self.hidden_act)
        check_heads_divide(self.hidden_size, self.num_attention_heads, "BEiT: ")
        if self.image_size % self.patch_size:
            raise ValueError(f"BEiT image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window(self) -> int:
        """Patches per side (14 for patch 16 at 224)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.window ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens of last_hidden_state: the class token + one per patch (197 for BEiT-Base)."""
        return self.num_patches + 1

    @property
    def num_relative_distance(self) -> int:
        """Rows of a relative position bias table: (2W - 1)^2 offsets + 3 for the class token."""
        return (2 * self.window - 1) ** 2 + 3

    @classmethod
    def from_hf(cls, hf_config: Any, *, add_pooling_layer: bool = False) -> BeitConfig:
        """Reads a transformers ``BeitConfig`` (model_type 'beit')."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type != _MODEL_TYPE:
            raise ValueError(f"model_type {model_type!r} is not a BEiT checkpoint; expected "
                             f"{_MODEL_TYPE!r} (BeitModel / BeitForMaskedImageModeling)")
        return cls(
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_hidden_layers=int(hf_config.num_hidden_layers),
            num_attention_heads=int(hf_config.num_attention_heads),
            image_size=_square(hf_config.image_size, "image_size"),
            patch_size=_square(hf_config.patch_size, "patch_size"),
            num_channels=int(hf_config.num_channels),
            hidden_act=str(hf_config.hidden_act),
            layer_norm_eps=float(hf_config.layer_norm_eps),
            use_mask_token=bool(hf_config.use_mask_token),
            use_absolute_position_embeddings=bool(hf_config.use_absolute_position_embeddings),
            use_relative_position_bias=bool(hf_config.use_relative_position_bias),
            use_shared_relative_position_bias=bool(hf_config.use_shared_relative_position_bias),
            layer_scale_init_value=float(hf_config.layer_scale_init_value),
            use_mean_pooling=bool(hf_config.use_mean_pooling),
            add_pooling_layer=bool(add_pooling_layer),
        )


def relative_position_index(window: int) -> np.ndarray:
    """[1 + W^2, 1 + W^2] int32: the bias-table row of each (query, key) token pair.

    Patch pairs index their (row, col) offset, shifted to be >= 0 and flattened row-major over
    the (2W - 1) x (2W - 1) offsets; the class token's pairs take the table's last three rows
    (cls -> patch: R - 3, patch -> cls: R - 2, cls -> cls: R - 1), as HF's
    ``generate_relative_position_index``.
    """
    rows = (2 * window - 1) ** 2 + 3
    grid = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack(grid).reshape(2, -1)  # [2, W^2]: (row, col) of each patch, row-major
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, W^2, W^2], >= 0
    index = np.zeros((window * window + 1,) * 2, np.int32)
    index[1:, 1:] = rel[0] * (2 * window - 1) + rel[1]
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


class RelativePositionBias(nn.Module):
    """A learned bias table and its lookup: -> [heads, T, T] float32 attention-logit bias."""

    config: BeitConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.config
        table = self.param("relative_position_bias_table",
                           logical_init(("position", "heads"), nn.initializers.zeros),
                           (cfg.num_relative_distance, cfg.num_attention_heads), self.param_dtype)
        index = relative_position_index(cfg.window)  # static: a constant gather in the graph
        bias = jnp.take(table.astype(jnp.float32), jnp.asarray(index.reshape(-1)), axis=0)
        return bias.reshape(cfg.num_tokens, cfg.num_tokens, -1).transpose(2, 0, 1)


class Embeddings(nn.Module):
    """Patch projection (with bias), optional mask token, class token, optional positions."""

    config: BeitConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, bool_masked_pos: jax.Array | None) -> jax.Array:
        """images: [B, H, W, C], bool_masked_pos: [B, N] or None -> [B, 1 + N, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        zeros = logical_init(("embed",), nn.initializers.zeros)
        token = lambda name: self.param(name, zeros, (cfg.hidden_size,),  # noqa: E731
                                        self.param_dtype).astype(self.dtype)
        patches = patchify(images.astype(self.dtype), cfg.patch_size)  # [B, N, p*p*C]
        x = dense(cfg.hidden_size, ("patch", "embed"), name="patch_embeddings", **kw)(patches)
        cls = token("cls_token")
        if cfg.use_mask_token:
            mask_token = token("mask_token")
            if bool_masked_pos is not None:
                m = bool_masked_pos.astype(self.dtype)[..., None]
                x = x * (1 - m) + mask_token * m
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.hidden_size)), x], axis=1)
        if cfg.use_absolute_position_embeddings:
            pos = self.param("position_embeddings",
                             logical_init(("position", "embed"), nn.initializers.zeros),
                             (cfg.num_tokens, cfg.hidden_size), self.param_dtype)
            x = x + pos.astype(self.dtype)[None]
        return x


class Attention(nn.Module):
    config: BeitConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """x: [B, T, D], bias: [H, T, T] float32 or None -> [B, T, D]; no mask (no padding)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = lambda name, use_bias=True: heads_dense(  # noqa: E731
            cfg.num_attention_heads, cfg.head_dim, name=name, use_bias=use_bias, **kw)
        q, k, v = proj("q_proj")(x), proj("k_proj", False)(x), proj("v_proj")(x)  # [B, T, H, Dh]
        ctx = dot_product_attention(q, k, v, bias=None if bias is None else bias[None],
                                    dtype=self.dtype)
        return heads_out_dense(cfg.hidden_size, name="o_proj", **kw)(ctx)


class Layer(nn.Module):
    """Pre-LN block with layer scale: x += lambda_1 * attn(LN(x)); x += lambda_2 * mlp(LN(x))."""

    config: BeitConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, shared_bias: jax.Array | None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layer_norm_eps
        bias = shared_bias
        if cfg.use_relative_position_bias:
            own = RelativePositionBias(cfg, name="relative_position_bias", **kw)()
            bias = own if bias is None else bias + own

        def scale(name: str, h: jax.Array) -> jax.Array:
            if cfg.layer_scale_init_value <= 0:  # HF then uses the constant 1.0
                return h
            init = nn.initializers.constant(cfg.layer_scale_init_value)
            lam = self.param(name, logical_init(("norm",), init), (cfg.hidden_size,),
                             self.param_dtype)
            return lam.astype(self.dtype) * h

        h = layer_norm(epsilon=eps, name="layernorm_before", **kw)(x)
        x = x + scale("lambda_1", Attention(cfg, name="attention", **kw)(h, bias))
        h = layer_norm(epsilon=eps, name="layernorm_after", **kw)(x)
        return x + scale("lambda_2", Mlp(cfg, name="mlp", **kw)(h))


class Beit(nn.Module):
    """BEiT vision transformer (BeitModel); a pure function of its params."""

    config: BeitConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, bool_masked_pos: jax.Array | None = None,
                 output_hidden_states: bool = False) -> dict[str, Any]:
        """Encodes BEiT-normalised images (``data/beit_preprocess.py``).

        Args:
          images: [B, H, W, C] float, channels last, H = W = config.image_size.
          bool_masked_pos: [B, N] bool, patches replaced by the mask token (masked image
            modeling; needs use_mask_token). None for plain encoding, as VLAP does.
          output_hidden_states: also return ``hidden_states``, a tuple of num_hidden_layers + 1
            arrays [B, 1+N, D] (the embeddings, then each block's output), as HF does.

        Returns:
          dict(last_hidden_state=[B, 1+N, D], pooled=[B, D] only with add_pooling_layer,
               hidden_states=tuple only when output_hidden_states).
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            hint = (" (channels first? move them last: images.transpose(0, 2, 3, 1))"
                    if images.ndim == 4 and images.shape[1] == cfg.num_channels else "")
            raise ValueError(f"Beit expects images [batch, {want[0]}, {want[1]}, {want[2]}], got "
                             f"shape {tuple(images.shape)}{hint}; resize with "
                             "lqae_vlap.data.beit_preprocess first")
        if bool_masked_pos is not None:
            if not cfg.use_mask_token:
                raise ValueError("Beit: bool_masked_pos needs a checkpoint with use_mask_token "
                                 "(e.g. microsoft/beit-base-patch16-224-pt22k)")
            if tuple(bool_masked_pos.shape) != (images.shape[0], cfg.num_patches):
                raise ValueError(f"Beit: bool_masked_pos must be [batch, {cfg.num_patches}], got "
                                 f"{tuple(bool_masked_pos.shape)}")
        x = Embeddings(cfg, name="embeddings", **kw)(images, bool_masked_pos)
        shared = (RelativePositionBias(cfg, name="shared_relative_position_bias", **kw)()
                  if cfg.use_shared_relative_position_bias else None)
        hidden = [x]
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, name=f"layers_{i}", **kw)(x, shared)
            hidden.append(x)
        if not cfg.use_mean_pooling:
            x = layer_norm(epsilon=cfg.layer_norm_eps, name="layernorm", **kw)(x)
        out: dict[str, Any] = {"last_hidden_state": x}
        if cfg.add_pooling_layer:
            if cfg.use_mean_pooling:
                out["pooled"] = Pooler(cfg, name="pooler", **kw)(x)
            else:
                out["pooled"] = x[:, 0]
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden)
        return out


class Pooler(nn.Module):
    """Mean of the patch tokens (not the class token), then a LayerNorm (BeitPooler)."""

    config: BeitConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, 1+N, D] -> [B, D]."""
        mean = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1).astype(self.dtype)
        return layer_norm(epsilon=self.config.layer_norm_eps, name="layernorm", dtype=self.dtype,
                          param_dtype=self.param_dtype)(mean)


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeadingOnes:
    """A torch tensor with leading size-1 axes (cls_token [1, 1, D], position_embeddings
    [1, T, D]) -> the Flax leaf without them."""

    count: int

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * self.count + tuple(target)

    def __call__(self, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        return x.reshape(target)


def beit_name_map(cfg: BeitConfig, prefix: str) -> NameMap:
    """Our Beit param paths -> transformers state-dict names (``prefix``: 'beit.' or '')."""
    p, e = prefix, f"{prefix}embeddings"
    table = "relative_position_bias_table"
    m: NameMap = {
        ("embeddings", "cls_token"): Source((f"{e}.cls_token",), LeadingOnes(2)),
        **dense_sources(("embeddings", "patch_embeddings"), f"{e}.patch_embeddings.projection",
                        PatchConv(cfg.patch_size, cfg.num_channels)),
    }
    if cfg.use_mask_token:
        m[("embeddings", "mask_token")] = Source((f"{e}.mask_token",), LeadingOnes(2))
    if cfg.use_absolute_position_embeddings:
        m[("embeddings", "position_embeddings")] = Source((f"{e}.position_embeddings",),
                                                          LeadingOnes(1))
    if cfg.use_shared_relative_position_bias:
        m[("shared_relative_position_bias", table)] = Source(
            (f"{p}encoder.relative_position_bias.{table}",))
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"{p}encoder.layer.{i}", (f"layers_{i}",)
        att = f"{hf}.attention.attention"
        m.update(dense_sources(fx + ("attention", "q_proj"), f"{att}.query", bias=Reshape()))
        m[fx + ("attention", "k_proj", "kernel")] = Source((f"{att}.key.weight",), Linear())
        m.update(dense_sources(fx + ("attention", "v_proj"), f"{att}.value", bias=Reshape()))
        m.update(dense_sources(fx + ("attention", "o_proj"), f"{hf}.attention.output.dense",
                               Linear(in_dims=2)))
        m.update(layer_norm_sources(fx + ("layernorm_before",), f"{hf}.layernorm_before"))
        m.update(layer_norm_sources(fx + ("layernorm_after",), f"{hf}.layernorm_after"))
        m.update(dense_sources(fx + ("mlp", "fc1"), f"{hf}.intermediate.dense"))
        m.update(dense_sources(fx + ("mlp", "fc2"), f"{hf}.output.dense"))
        if cfg.layer_scale_init_value > 0:
            m[fx + ("lambda_1",)] = Source((f"{hf}.lambda_1",))
            m[fx + ("lambda_2",)] = Source((f"{hf}.lambda_2",))
        if cfg.use_relative_position_bias:
            m[fx + ("relative_position_bias", table)] = Source(
                (f"{att}.relative_position_bias.{table}",))
    if not cfg.use_mean_pooling:
        m.update(layer_norm_sources(("layernorm",), f"{p}layernorm"))
    if cfg.add_pooling_layer and cfg.use_mean_pooling:
        m.update(layer_norm_sources(("pooler", "layernorm"), f"{p}pooler.layernorm"))
    return m


def beit_ignored(cfg: BeitConfig, prefix: str) -> tuple[str, ...]:
    """Regexes of checkpoint keys BeitModel knowingly does not use."""
    ignored = [r"(^|\.)relative_position_index$",  # buffers of older checkpoints
               r"^lm_head\.", r"^classifier\."]  # the masked-image-modeling / classifier heads
    if prefix:  # a task model: its own top-level LayerNorm is the head's (MIM 'norm')
        ignored.append(r"^layernorm\.")
    if not (cfg.add_pooling_layer and cfg.use_mean_pooling):
        ignored.append(r"(^|\.)pooler\.layernorm\.")
    return tuple(ignored)


def load(path_or_name: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
         mesh: Mesh | None = None, abstract: bool = False, hf_config: Any = None,
         add_pooling_layer: bool = False) -> tuple[Beit, dict[str, Any], Any]:
    """Loads a BeitModel / BeitForMaskedImageModeling / BeitForImageClassification checkpoint as
    a frozen Beit (the BeitModel part; task heads are ignored).

    Args:
      path_or_name: local checkpoint folder (or a hub name such as
        'microsoft/beit-base-patch16-224-pt22k' where there is network).
      dtype: param and compute dtype (e.g. jnp.bfloat16).
      mesh: place every weight on this mesh by its logical axis names while loading.
      abstract: read no tensor: return ``jax.ShapeDtypeStruct`` leaves (with their shardings when
        ``mesh`` is given) for planning and compiling without the weights.
      hf_config: abstract only: a transformers ``BeitConfig`` to plan from instead of the
        folder's config.json (``path_or_name`` may be None).
      add_pooling_layer: also build the pooled output; with mean pooling this needs the
        checkpoint's ``pooler.layernorm`` (a BeitModel's; a missing key error names it otherwise).

    Returns:
      (module, {'params': params}, hf_config); ``module.apply(variables, images)`` runs it.
    """
    ckpt = open_checkpoint(path_or_name, abstract=abstract, hf_config=hf_config, who="beit.load")
    cfg = BeitConfig.from_hf(ckpt.hf_config, add_pooling_layer=add_pooling_layer)
    module = Beit(cfg, dtype=dtype, param_dtype=dtype)
    shape = (1, cfg.image_size, cfg.image_size, cfg.num_channels)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape, dtype))["params"]

    def name_map(state):
        prefix = detect_prefix(state, "embeddings.patch_embeddings.projection.weight",
                               ("beit.", ""))
        return beit_name_map(cfg, prefix), beit_ignored(cfg, prefix)

    variables = load_params(ckpt, shapes, name_map, dtype=dtype, mesh=mesh, abstract=abstract)
    return module, variables, ckpt.hf_config

