"""Frozen CLIP vision tower (VLAP's vision encoder) and its Hugging Face checkpoint loader.

Matches transformers' ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` and
``CLIPModel.get_image_features`` in eval mode:
  patches (stride-p conv, no bias) -> [class token; patches] + learned positions -> pre_layrnorm
  -> pre-LN blocks ``x + attn(LN1(x))``, ``x + mlp(LN2(x))`` (hidden_act, quick_gelu for OpenAI CLIP)
  -> last_hidden_state; pooled = post_layernorm(last_hidden_state[:, 0]);
  image_embeds = visual_projection(pooled) (no bias) when the checkpoint has a projection.
``last_hidden_state`` is NOT post-LayerNormed (as in HF); VLAP feeds all 1 + N of its tokens
(50 for ViT-B/32 at 224) through its Dense into the LLM.

Images are channels-last ``[B, H, W, C]`` like the rest of the project. The patch conv is a Dense over
``vit.patchify``'s (row, col, channel) flattening, so its kernel is the torch conv weight
``[D, C, p, p]`` transposed to ``[p, p, C, D]`` and reshaped to ``[p*p*C, D]``.

Param tree (``{'params': ...}``), every leaf with logical axis names:
  embeddings/{class_embedding [embed], patch_embedding/kernel [patch, embed],
              position_embedding/embedding [position, embed]}
  pre_layrnorm, post_layernorm ({scale,bias} [norm])
  layers_{i}/{layer_norm1, layer_norm2}
  layers_{i}/self_attn/{q_proj,k_proj,v_proj}/kernel [embed, heads, kv], .../out_proj/kernel [heads, kv, embed]
  layers_{i}/mlp/{fc1 [embed, mlp], fc2 [mlp, embed]}
  visual_projection/kernel [embed, mlp] (only with a projection; 'mlp' since 'embed' may occur once)

Checkpoint layouts in transformers 5 (checked by saving tiny models with 5.23):
  CLIPVisionModel:               keys without prefix ("embeddings.patch_embedding.weight", ...)
  CLIPVisionModelWithProjection: "vision_model.*" + "visual_projection.weight"
  CLIPModel (e.g. openai/clip-vit-base-patch32): "vision_model.*" + "visual_projection.weight"
                                 + text tower / text_projection / logit_scale (ignored here)
  transformers 4 CLIPVisionModel checkpoints carry "vision_model." and a position_ids buffer.
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

from lqae_vlap.models.hf_weights import (Linear, NameMap, Reshape, Source, dense_sources,
                                         detect_prefix, layer_norm_sources, load_params,
                                         open_checkpoint)
from lqae_vlap.models.layers import (ACTIVATIONS, check_activation, check_heads_divide, dense,
                                     dot_product_attention, heads_dense, heads_out_dense,
                                     layer_norm, logical_init)
from lqae_vlap.models.vit import patchify

# HF model_type of a vision-only config and of a full (vision + text) CLIP config.
_VISION_TYPE, _FULL_TYPE = "clip_vision_model", "clip"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower (names follow transformers' CLIPVisionConfig).

    ``projection_dim=None`` builds the tower without ``visual_projection``.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        check_activation(self.hidden_act)
        check_heads_divide(self.hidden_size, self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens of last_hidden_state: the class token + one per patch (50 for ViT-B/32 at 224)."""
        return self.num_patches + 1

    @classmethod
    def from_hf(cls, hf_config: Any, *, with_projection: bool = True) -> CLIPVisionConfig:
        """Reads a transformers ``CLIPVisionConfig`` or the ``vision_config`` of a ``CLIPConfig``.

        The projection width is the full config's ``projection_dim`` (the vision config's own
        ``projection_dim`` for a vision-only checkpoint).
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type == _FULL_TYPE:
            vision, projection_dim = hf_config.vision_config, hf_config.projection_dim
        elif model_type == _VISION_TYPE:
            vision, projection_dim = hf_config, getattr(hf_config, "projection_dim", None)
        else:
            raise ValueError(f"model_type {model_type!r} is not a CLIP checkpoint; expected "
                             f"{_FULL_TYPE!r} (CLIPModel) or {_VISION_TYPE!r} (CLIPVisionModel)")
        if with_projection and projection_dim is None:
            raise ValueError("with_projection=True but the config has no projection_dim")
        return cls(
            hidden_size=int(vision.hidden_size),
            intermediate_size=int(vision.intermediate_size),
            num_hidden_layers=int(vision.num_hidden_layers),
            num_attention_heads=int(vision.num_attention_heads),
            image_size=int(vision.image_size),
            patch_size=int(vision.patch_size),
            num_channels=int(vision.num_channels),
            hidden_act=str(vision.hidden_act),
            layer_norm_eps=float(vision.layer_norm_eps),
            projection_dim=int(projection_dim) if with_projection else None,
        )


class Embeddings(nn.Module):
    """Patch projection, class token and learned positions."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: [B, H, W, C] -> [B, 1 + N, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patches = patchify(images.astype(self.dtype), cfg.patch_size)  # [B, N, p*p*C]
        x = dense(cfg.hidden_size, ("patch", "embed"), use_bias=False, name="patch_embedding",
                  **kw)(patches)
        cls = self.param("class_embedding", logical_init(("embed",)), (cfg.hidden_size,),
                         self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        positions = nn.Embed(cfg.num_tokens, cfg.hidden_size,
                             embedding_init=logical_init(("position", "embed")),
                             name="position_embedding", **kw)
        return x + positions(jnp.arange(cfg.num_tokens))[None]


class SelfAttention(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]; every token attends to every token (no mask in CLIP vision)."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = lambda name: heads_dense(cfg.num_attention_heads, cfg.head_dim, name=name, **kw)  # noqa: E731
        q, k, v = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)  # [B, T, H, Dh]
        ctx = dot_product_attention(q, k, v, dtype=self.dtype)
        return heads_out_dense(cfg.hidden_size, name="out_proj", **kw)(ctx)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (CLIP's and BEiT's MLP; any config with intermediate_size,
    hidden_size and hidden_act)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = ACTIVATIONS[cfg.hidden_act](h)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
    """Pre-LN block: x = x + attn(LN1(x)); x = x + mlp(LN2(x)), as in CLIPEncoderLayer."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layer_norm_eps
        x = x + SelfAttention(cfg, name="self_attn", **kw)(
            layer_norm(epsilon=eps, name="layer_norm1", **kw)(x))
        return x + Mlp(cfg, name="mlp", **kw)(layer_norm(epsilon=eps, name="layer_norm2", **kw)(x))


class CLIPVision(nn.Module):
    """CLIP vision transformer (+ optional visual projection); a pure function of its params."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *,
                 output_hidden_states: bool = False) -> dict[str, Any]:
        """Encodes CLIP-normalised images (``data/clip_preprocess.py``).

        Args:
          images: [B, H, W, C] float, channels last, H = W = config.image_size.
          output_hidden_states: also return ``hidden_states``, a tuple of num_hidden_layers + 1
            arrays [B, 1+N, D] (after pre_layrnorm, then after each block), as HF does.

        Returns:
          dict(last_hidden_state=[B, 1+N, D], pooled=[B, D],
               image_embeds=[B, P] only when config.projection_dim is set,
               hidden_states=tuple only when output_hidden_states).
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            hint = (" (channels first? move them last: images.transpose(0, 2, 3, 1))"
                    if images.ndim == 4 and images.shape[1] == cfg.num_channels else "")
            raise ValueError(f"CLIPVision expects images [batch, {want[0]}, {want[1]}, {want[2]}], got "
                             f"shape {tuple(images.shape)}{hint}; resize and crop with "
                             "lqae_vlap.data.clip_preprocess first")
        x = Embeddings(cfg, name="embeddings", **kw)(images)
        x = layer_norm(epsilon=cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        hidden = [x]
        for i in range(cfg.num_hidden_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}", **kw)(x)
            hidden.append(x)
        pooled = layer_norm(epsilon=cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        out: dict[str, Any] = {"last_hidden_state": x, "pooled": pooled}
        if cfg.projection_dim is not None:
            out["image_embeds"] = dense(cfg.projection_dim, ("embed", "mlp"), use_bias=False,
                                        name="visual_projection", **kw)(pooled)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden)
        return out


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatchConv:
    """torch Conv2d weight [D, C, p, p] -> Dense kernel [p*p*C, D] over ``patchify``'s layout.

    A small generic addition to hf_weights' transforms (Copy / Linear / Reshape).
    """

    patch: int
    channels: int

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        return (target[-1], self.channels, self.patch, self.patch)

    def __call__(self, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        return np.transpose(x, (2, 3, 1, 0)).reshape(target)


def clip_vision_name_map(cfg: CLIPVisionConfig, prefix: str) -> NameMap:
    """Our CLIPVision param paths -> transformers state-dict names (``prefix``: 'vision_model.' or '')."""
    p = prefix
    m: NameMap = {
        ("embeddings", "class_embedding"): Source((f"{p}embeddings.class_embedding",)),
        ("embeddings", "patch_embedding", "kernel"):
            Source((f"{p}embeddings.patch_embedding.weight",),
                   PatchConv(cfg.patch_size, cfg.num_channels)),
        ("embeddings", "position_embedding", "embedding"):
            Source((f"{p}embeddings.position_embedding.weight",)),
        **layer_norm_sources(("pre_layrnorm",), f"{p}pre_layrnorm"),
        **layer_norm_sources(("post_layernorm",), f"{p}post_layernorm"),
    }
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"{p}encoder.layers.{i}", (f"layers_{i}",)
        for name in ("q_proj", "k_proj", "v_proj"):
            m.update(dense_sources(fx + ("self_attn", name), f"{hf}.self_attn.{name}", bias=Reshape()))
        m.update(dense_sources(fx + ("self_attn", "out_proj"), f"{hf}.self_attn.out_proj",
                        Linear(in_dims=2)))
        m.update(layer_norm_sources(fx + ("layer_norm1",), f"{hf}.layer_norm1"))
        m.update(layer_norm_sources(fx + ("layer_norm2",), f"{hf}.layer_norm2"))
        m.update(dense_sources(fx + ("mlp", "fc1"), f"{hf}.mlp.fc1"))
        m.update(dense_sources(fx + ("mlp", "fc2"), f"{hf}.mlp.fc2"))
    if cfg.projection_dim is not None:  # never prefixed, in every layout
        m[("visual_projection", "kernel")] = Source(("visual_projection.weight",), Linear())
    return m


def clip_vision_ignored(with_projection: bool) -> tuple[str, ...]:
    """Regexes of checkpoint keys the vision tower knowingly does not use."""
    ignored = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$",  # CLIPModel's text side
               r"(^|\.)embeddings\.position_ids$"]  # a buffer in transformers 4 checkpoints
    if not with_projection:
        ignored.append(r"^visual_projection\.weight$")
    return tuple(ignored)


def load(path_or_name: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
         mesh: Mesh | None = None, abstract: bool = False, hf_config: Any = None,
         with_projection: bool | None = None) -> tuple[CLIPVision, dict[str, Any], Any]:
    """Loads a CLIPVisionModel(/WithProjection) or full CLIPModel checkpoint as a frozen CLIPVision.

    Args:
      path_or_name: local checkpoint folder (or a hub name such as 'openai/clip-vit-base-patch32'
        where there is network).
      dtype: param and compute dtype (e.g. jnp.bfloat16).
      mesh: place every weight on this mesh by its logical axis names while loading.
      abstract: read no tensor: return ``jax.ShapeDtypeStruct`` leaves (with their shardings when
        ``mesh`` is given) for planning and compiling without the weights.
      hf_config: abstract only: a transformers ``CLIPVisionConfig`` / ``CLIPConfig`` to plan from
        instead of the folder's config.json (``path_or_name`` may be None).
      with_projection: build ``visual_projection`` (image_embeds). None: exactly when the
        checkpoint holds ``visual_projection.weight`` (abstract without weight files: when the
        config has a ``projection_dim``). True on a checkpoint without one raises a ValueError
        naming the missing key.

    Returns:
      (module, {'params': params}, hf_config); ``module.apply(variables, images)`` runs it.
    """
    ckpt = open_checkpoint(path_or_name, abstract=abstract, hf_config=hf_config, who="clip.load")
    if with_projection is None:
        with_projection = ("visual_projection.weight" in ckpt.state if ckpt.state is not None else
                           getattr(ckpt.hf_config, "projection_dim", None) is not None)
    cfg = CLIPVisionConfig.from_hf(ckpt.hf_config, with_projection=with_projection)
    module = CLIPVision(cfg, dtype=dtype, param_dtype=dtype)
    shape = (1, cfg.image_size, cfg.image_size, cfg.num_channels)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape, dtype))["params"]

    def name_map(state):
        prefix = detect_prefix(state, "embeddings.patch_embedding.weight", ("vision_model.", ""))
        return clip_vision_name_map(cfg, prefix), clip_vision_ignored(with_projection)

    variables = load_params(ckpt, shapes, name_map, dtype=dtype, mesh=mesh, abstract=abstract)
    return module, variables, ckpt.hf_config
