"""ViT encoder and decoder that LQAE trains from scratch (pre-LayerNorm, no class token).

Architecture follows big_vision's ViT / MAE: pre-LN blocks
``x + MHSA(LN(x))`` then ``x + MLP(LN(x))`` with an exact (erf) GELU, LayerNorm epsilon 1e-6,
xavier-uniform Dense kernels, zero biases and a learned position embedding drawn from N(0, 0.02^2)
(learned rather than MAE's fixed 2-D sincos because the released LQAE code learns an N(0, 0.02^2)
table for both encoder and decoder).

This is LQAE's ``model.architecture='plain'`` (the paper's text says ViT-Base). The released
LQAE code (``base_vit.py``) uses NormFormer-style blocks (an extra LayerNorm after attention, a
GLU MLP with a depthwise 3x3 conv, no biases, LN epsilon 1e-5) and a ConvTranspose head: that is
models/vit_released.py (``'released'``, the paper config's default).
A Dense over the flattened patch equals a stride-p conv whose HWIO kernel is reshaped to
``[p*p*C, width]``, because ``patchify`` flattens each patch in (row, column, channel) order.

Per-layer states for the linear probe: the encoder sows its patch + position embeddings
(``embeddings``) and the Transformer each block's output (``block_outputs``) into the
``intermediates`` collection; ``module.apply(params, x, mutable=['intermediates'])`` returns them
and ``hidden_states`` orders them as transformers' ``hidden_states``. The default output and the
param names do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from lqae_vlap.models.layers import (dense, dot_product_attention, heads_dense, heads_out_dense,
                                     layer_norm, logical_init)

Dtype = Any

_xavier = nn.initializers.xavier_uniform()
_posemb_init = nn.initializers.normal(stddev=0.02)
# Every Dense here has a xavier kernel and a zero bias; every LayerNorm big_vision's epsilon.
_dense = functools.partial(dense, kernel_init=_xavier)
_layer_norm = functools.partial(layer_norm, epsilon=1e-6)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """Cuts images into non-overlapping square patches, each flattened in (row, col, channel) order.

    images: [batch, height, width, channels] -> [batch, (height/patch)*(width/patch), patch*patch*channels]
    Patches are ordered row-major over the patch grid.
    """
    if images.ndim != 4:
        raise ValueError(
            f"patchify expects images of shape [batch, height, width, channels], got shape "
            f"{tuple(images.shape)}; add a batch axis or move channels last")
    _, height, width, _ = images.shape
    if patch <= 0 or height % patch or width % patch:
        raise ValueError(
            f"image height x width {height}x{width} is not a multiple of the patch size {patch}; "
            f"resize or crop the images so both sides are multiples of {patch}, "
            "or choose a patch size that divides both")
    return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(patches: jax.Array, patch: int, height: int, width: int,
               channels: int) -> jax.Array:
    """Inverse of ``patchify``.

    patches: [batch, (height/patch)*(width/patch), patch*patch*channels] -> [batch, height, width, channels]
    """
    if height % patch or width % patch:
        raise ValueError(
            f"image height x width {height}x{width} is not a multiple of the patch size {patch}; "
            "pass the height and width that the patches were cut from")
    grid_h, grid_w = height // patch, width // patch
    expected = (grid_h * grid_w, patch * patch * channels)
    if patches.ndim != 3 or tuple(patches.shape[1:]) != expected:
        raise ValueError(
            f"unpatchify expects patches of shape [batch, {expected[0]}, {expected[1]}] for a "
            f"{height}x{width}x{channels} image with patch {patch}, got {tuple(patches.shape)}; "
            "check height, width, channels and patch against the encoder's")
    return einops.rearrange(patches, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c",
                            h=grid_h, w=grid_w, p1=patch, p2=patch, c=channels)


class SelfAttention(nn.Module):
    """Multi-head self-attention without a mask (every patch sees every patch).

    x: [batch, tokens, width] -> [batch, tokens, width]
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}; "
                             "choose num_heads that divides the width")
        head_dim = width // self.num_heads

        def proj(name: str, use_bias: bool = True) -> jax.Array:
            # DenseGeneral initialises on the flat [width, width] view, so xavier sees the true
            # fan-in/fan-out of a width x width projection (as big_vision's separate q, k, v).
            return heads_dense(self.num_heads, head_dim, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name, use_bias=use_bias,
                               kernel_init=_xavier)(x)

        # No key bias: it adds q.b to every logit of a query, which softmax ignores, so its
        # gradient is exactly zero and AdamW would only random-walk it on rounding noise.
        q, k, v = proj("query"), proj("key", use_bias=False), proj("value")
        out = dot_product_attention(q, k, v, dtype=self.dtype)
        return heads_out_dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="out",
                               kernel_init=_xavier)(out)


class Block(nn.Module):
    """Pre-LayerNorm transformer block.

    x: [batch, tokens, width] -> [batch, tokens, width]
    """
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _layer_norm(name="ln_attn", **kw)(x)
        x = x + SelfAttention(self.num_heads, name="attn", **kw)(y)
        y = _layer_norm(name="ln_mlp", **kw)(x)
        y = _dense(self.mlp_dim, ("embed", "mlp"), name="mlp_in", **kw)(y)
        y = nn.gelu(y, approximate=False)
        y = _dense(x.shape[-1], ("mlp", "embed"), name="mlp_out", **kw)(y)
        return x + y


class Transformer(nn.Module):
    """``depth`` blocks then a final LayerNorm; sows each block's output.

    x: [batch, tokens, width] -> [batch, tokens, width]
    """
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # A python loop keeps per-block param names (block_0, ...); nn.remat keeps the same names,
        # so params are interchangeable between remat=True and remat=False.
        block_cls = nn.remat(Block) if self.remat else Block
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"block_{i}")(x)
            self.sow("intermediates", "block_outputs", x)
        return _layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final")(x)


def hidden_states(intermediates: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """An encoder's sown ``intermediates`` -> (embeddings, block 1, ..., block L), each
    [batch, tokens, width], in transformers' ``hidden_states`` indexing: [0] the patch + position
    embeddings, [i] the output of block i (before the plain ViT's final LayerNorm and any
    ``out_proj``). Works for ViTEncoder and vit_released.ReleasedViTEncoder."""
    return (intermediates["embeddings"][0], *intermediates["transformer"]["block_outputs"])


def _check_grid(image_size: int, patch_size: int, who: str) -> int:
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"{who}: image_size {image_size} is not a multiple of patch_size {patch_size}; "
            "set image_size to a multiple of patch_size")
    return (image_size // patch_size) ** 2


def check_images(images: jax.Array, image_size: int, who: str) -> None:
    """An encoder's input must be [batch, image_size, image_size, channels]."""
    if images.ndim != 4 or images.shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"{who} expects images [batch, {image_size}, {image_size}, channels], "
            f"got {tuple(images.shape)}; resize the images or set image_size to match")


def check_tokens(tokens: jax.Array, image_size: int, patch_size: int, who: str) -> int:
    """A decoder's input must be [batch, (image_size / patch_size)^2, dim]; returns that count."""
    num_patches = _check_grid(image_size, patch_size, who)
    if tokens.ndim != 3 or tokens.shape[1] != num_patches:
        raise ValueError(
            f"{who} expects tokens [batch, {num_patches}, dim] for image_size {image_size} and "
            f"patch_size {patch_size}, got {tuple(tokens.shape)}; use the same image_size and "
            "patch_size as the encoder")
    return num_patches


class ViTEncoder(nn.Module):
    """Images to one token per patch (no class token: LQAE quantizes every patch).

    images: [batch, image_size, image_size, channels], float (LQAE: in config.model.pixel_range)
      -> tokens: [batch, (image_size/patch_size)^2, out_dim or width]
    """
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    out_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        num_patches = _check_grid(self.image_size, self.patch_size, "ViTEncoder")
        check_images(images, self.image_size, "ViTEncoder")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = patchify(images, self.patch_size)
        x = _dense(self.width, ("patch", "embed"), name="patch_embed", **kw)(x)
        pos = self.param("pos_embed", logical_init(("position", "embed"), _posemb_init),
                         (num_patches, self.width), self.param_dtype)
        x = x + pos.astype(self.dtype)
        self.sow("intermediates", "embeddings", x)  # hidden_states[0], for the linear probe
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                        name="transformer", **kw)(x)
        if self.out_dim is not None:
            # The output width is the language model's, which has no logical name of its own here.
            x = _dense(self.out_dim, ("embed", None), name="out_proj", **kw)(x)
        return x


class ViTDecoder(nn.Module):
    """Tokens (one per patch) back to pixels.

    tokens: [batch, (image_size/patch_size)^2, in_dim] -> images: [batch, image_size, image_size, channels]
    No output activation: the reconstruction loss compares raw outputs with the target pixels, and
    a tanh or sigmoid would flatten gradients at saturated pixels; clip when displaying.
    """
    image_size: int
    patch_size: int
    channels: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        num_patches = check_tokens(tokens, self.image_size, self.patch_size, "ViTDecoder")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # The input width is the language model's, which has no logical name of its own here.
        x = _dense(self.width, (None, "embed"), name="in_proj", **kw)(tokens)
        pos = self.param("pos_embed", logical_init(("position", "embed"), _posemb_init),
                         (num_patches, self.width), self.param_dtype)
        x = x + pos.astype(self.dtype)
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                        name="transformer", **kw)(x)
        x = _dense(self.patch_size ** 2 * self.channels, ("embed", "patch"), name="to_pixels",
                   **kw)(x)
        return unpatchify(x, self.patch_size, self.image_size, self.image_size, self.channels)
