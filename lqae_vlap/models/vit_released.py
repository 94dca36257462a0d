"""The ViT encoder and decoder of the released LQAE code (``architecture='released'``).

The authors' repository (language-quantized-autoencoders, lqae/models/base_vit.py) does not train
the plain ViT of models/vit.py. Its blocks, checked line by line there:

  * patches (``ConvPatches``): a p x p stride-p convolution, no bias, kernel N(0, 0.02^2); here a
    Dense over ``vit.patchify``'s (row, column, channel) flattening, which is the same map with
    the HWIO kernel reshaped to [p*p*C, width];
  * a learned position table over the patch grid (``pos_embedding`` [1, h, w, width],
    N(0, 0.02^2)); here [h*w, width] in row-major order, the same values;
  * each block (``TransformerBlock``), inside ``nn.remat`` (``Transformer``):
      x = x + LN(Attention(LN(x)))                       NormFormer's extra LayerNorm
      x = x + GLU(x), GLU(x) = fc_out(LN(dwconv3x3(gelu(fc1 LN(x)) * fc2 LN(x))))
    attention q, k, v, out without biases; fc1, fc2 [width, mlp_dim], fc_out [mlp_dim, width],
    no biases; the depthwise 3x3 convolution (``mid_ffn_conv``: SAME padding,
    ``feature_group_count=mlp_dim``, no bias) runs over the patch grid; every kernel N(0, 0.02^2);
    LayerNorms with epsilon 1e-5 and their usual scale and bias; GELU is flax's ``nn.gelu``,
    whose default is the tanh approximation;
  * no LayerNorm after the last block (``VitEncoder`` returns the last block's output);
  * the encoder has no output projection: its width is the LM's (768 for RoBERTa-base) and the
    quantizer reads the blocks' output directly; the decoder reads the LM-width words directly;
  * the decoder's pixels (``VitDecoder``): ``nn.ConvTranspose(3, p x p, stride p, VALID)`` with a
    bias (flax's default) and an N(0, 0.02^2) kernel. With kernel = stride every output pixel
    depends on one token only, so it equals a Dense [width, p*p*C] + ``vit.unpatchify`` with the
    ConvTranspose kernel flipped in both spatial axes (flax's ConvTranspose does not transpose
    the kernel) and the ConvTranspose's bias [C] added to every pixel, which is what is built
    here (the same N(0, 0.02^2) distribution at init, and the same parameter count).

Where the widths differ (the laptop configs pair a narrow ViT with a wider LM), a bias-free
``out_proj`` / ``in_proj`` Dense maps between them; with equal widths (the released run) there is
none, as released.

The depthwise convolution is written as nine shifted multiply-adds over the zero-padded grid
instead of ``lax.conv_general_dilated(feature_group_count=mlp_dim)``: the two compute the same
thing, but XLA:CPU lowers the grouped convolution's filter gradient as a dense
[mlp_dim x mlp_dim] convolution, ~mlp_dim/3.5 times the true work of the op (measured: a 3x3x256
depthwise conv on an 8x8 grid compiles to 73x the FLOPs of 3 x its forward; the shifted form to
1.1x; a whole ViT-B block (16x16 grid, width 768, GLU 3072) compiles to 3.66x of its true training
count with the grouped conv and 1.02x with the shifted one; tests/models/test_vit_released.py holds
the check on a small block).
The GLU's product and the conv share one custom VJP (``glu_depthwise_conv3x3``) so that the
gradient reaching the fused fc1|fc2 matmul is one concatenation, and on XLA:CPU their passes run
over two batch halves in a loop so that the conv's output and input gradient are computed once
(see ``_batch_chunks``; bench/RESULTS.md "Run 5" has the profile and the figures).

Per-layer states are sown into ``intermediates`` (``embeddings``, ``block_outputs``) as in
models/vit.py; ``vit.hidden_states`` orders them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lqae_vlap.models.layers import (dense, dot_product_attention, heads_dense, heads_out_dense,
                                     layer_norm, logical_init)
from lqae_vlap.models.vit import _check_grid, check_images, check_tokens, patchify, unpatchify

Dtype = Any

_init = nn.initializers.normal(stddev=0.02)  # every kernel and table of base_vit.py
_dense = functools.partial(dense, use_bias=False, kernel_init=_init)
_layer_norm = functools.partial(layer_norm, epsilon=1e-5)  # flax's default, as released


def _shifted_sum(x: jax.Array, kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """sum over the nine taps of the zero-padded grid shifted by (a - 1, b - 1), times kernel[a, b].

    x: [batch, h*w, channels], kernel: [3, 3, channels] -> [batch, h*w, channels].
    """
    h, w = grid
    b, n, c = x.shape
    xp = jnp.pad(x.reshape(b, h, w, c), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for da in range(3):
        for db in range(3):
            term = xp[:, da:da + h, db:db + w, :] * kernel[da, db]
            out = term if out is None else out + term
    return out.reshape(b, n, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dwconv(x: jax.Array, kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
    return _shifted_sum(x, kernel, grid)


def _dwconv_fwd(x, kernel, grid):
    return _shifted_sum(x, kernel, grid), (x, kernel)


def _kernel_grad(x: jax.Array, g: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """d(sum(g * _shifted_sum(x, kernel)))/d kernel: per tap, a sum over batch and grid.

    x, g: [batch, h*w, channels] -> [3, 3, channels].
    """
    h, w = grid
    b, n, c = x.shape
    xp = jnp.pad(x.reshape(b, h, w, c), ((0, 0), (1, 1), (1, 1), (0, 0)))
    g4 = g.reshape(b, h, w, c)
    return jnp.stack([jnp.stack([jnp.sum(xp[:, da:da + h, db:db + w, :] * g4, axis=(0, 1, 2))
                                 for db in range(3)]) for da in range(3)])


def _dwconv_bwd(grid, res, g):
    # Written out because autodiff of the shifted products transposes each slice into a pad of
    # the whole [batch, h+2, w+2, channels] grid (nine padded copies, then summed; measured as
    # the costliest fusions of the block's backward on XLA:CPU). The input gradient of a
    # cross-correlation is the cross-correlation of g with the kernel flipped in both spatial
    # axes (one padded copy of g); the kernel gradient is, per tap, a sum over batch and grid.
    x, kernel = res
    dx = _shifted_sum(g, kernel[::-1, ::-1], grid)
    return dx, _kernel_grad(x, g, grid).astype(kernel.dtype)


_dwconv.defvjp(_dwconv_fwd, _dwconv_bwd)


def _glu(z: jax.Array) -> jax.Array:
    """z: [..., 2 * c] (gate | linear) -> gelu(gate) * linear [..., c]."""
    c = z.shape[-1] // 2
    return jax.nn.gelu(z[..., :c], approximate=True) * z[..., c:]  # flax nn.gelu's default


def _batch_chunks(batch: int) -> int:
    """How many batch chunks ``_in_chunks`` splits the conv's passes into: 2 on XLA:CPU, else 1.

    XLA fuses cheap elementwise producers into every consumer, recomputing them: the conv's
    nine taps (and the GLU before them) were recomputed in each consumer of the conv's output
    (the LayerNorm's statistics, its normalisation, its backward) and of its input gradient
    (both halves of the GLU's gradient), and XLA:CPU's optimization barriers do not stop it.
    A loop's outputs are always materialised, so computing those values in a ``lax.map`` over
    two batch halves computes each once (measured at LQAE's tiny sizes, B 32, 8x8 grid, mlp
    1024: the GLU MLP's forward + backward 15% less CPU time and 30% less temporary memory,
    the same values, bit for bit in that measurement). XLA's cost analysis counts a loop body
    once, so the conv's elementwise FLOPs are half-counted there. Other backends' fusion costs
    differ; they run one chunk.
    """
    return 2 if batch % 2 == 0 and jax.default_backend() == "cpu" else 1


def _in_chunks(fn, chunks: int, *args: jax.Array):
    """fn(*args) for args [batch, ...], computed over ``chunks`` equal batch chunks in a
    ``lax.map`` when chunks > 1 (the same values; see ``_batch_chunks``)."""
    if chunks == 1:
        return fn(*args)
    b = args[0].shape[0]
    out = jax.lax.map(lambda xs: fn(*xs),
                      tuple(a.reshape(chunks, b // chunks, *a.shape[1:]) for a in args))
    return jax.tree.map(lambda o: o.reshape(b, *o.shape[2:]), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _glu_dwconv(z: jax.Array, kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
    return _glu_dwconv_fwd(z, kernel, grid)[0]


def _glu_dwconv_fwd(z, kernel, grid):
    out = _in_chunks(lambda zc: _shifted_sum(_glu(zc), kernel, grid), _batch_chunks(z.shape[0]),
                     z)
    return out, (z, kernel)


def _glu_dwconv_bwd(grid, res, g):
    # The gradient w.r.t. z is built as ONE concatenation [d gate | d linear]. Autodiff of the
    # two slices of z instead pads each half's gradient to the full [.., 2c] width and adds the
    # two: XLA:CPU then fuses the conv's input gradient (and the LayerNorm backward feeding it)
    # into both padded halves, computing it twice at twice the width (measured: the costliest
    # fusions of the whole train step). gelu(gate) * linear is recomputed from z (elementwise)
    # rather than stored, so this holds no more than autodiff of the conv alone did.
    z, kernel = res
    c = z.shape[-1] // 2

    def chunk(gc, zc):
        act, gelu_vjp = jax.vjp(lambda t: jax.nn.gelu(t, approximate=True), zc[..., :c])
        lin = zc[..., c:]
        dy = _shifted_sum(gc, kernel[::-1, ::-1], grid)
        dgate, = gelu_vjp(dy * lin)
        return jnp.concatenate([dgate, dy * act], axis=-1), act * lin

    dz, y = _in_chunks(chunk, _batch_chunks(z.shape[0]), g, z)
    return dz, _kernel_grad(y, g, grid)


_glu_dwconv.defvjp(_glu_dwconv_fwd, _glu_dwconv_bwd)


def glu_depthwise_conv3x3(z: jax.Array, kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """``depthwise_conv3x3(gelu(gate) * linear)`` for z = [gate | linear] (the GLU's fused fc1|fc2
    matmul output), gelu the tanh approximation, with a hand-written VJP (see ``_glu_dwconv_bwd``).

    z: [batch, h*w, 2 * channels], kernel: [3, 3, channels] -> [batch, h*w, channels].
    """
    h, w = grid
    b, n, c2 = z.shape
    if n != h * w or c2 % 2 or kernel.shape != (3, 3, c2 // 2):
        raise ValueError(f"glu_depthwise_conv3x3: z {z.shape} and kernel {kernel.shape} do not "
                         f"form [batch, {h}*{w}, 2c] and [3, 3, c]")
    return _glu_dwconv(z, kernel.astype(z.dtype), tuple(grid))


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """A 3x3 depthwise convolution over the patch grid, SAME (zero) padding, no bias.

    x: [batch, h*w, channels] (row-major grid), kernel: [3, 3, channels] -> [batch, h*w, channels].
    out[i, j, c] = sum_{a, b} x[i + a - 1, j + b - 1, c] * kernel[a, b, c] (cross-correlation, as
    ``nn.Conv``), written as nine shifted products so that its gradients cost what the op does
    (a custom VJP: see ``_dwconv_bwd``).
    """
    h, w = grid
    b, n, c = x.shape
    if n != h * w:
        raise ValueError(f"depthwise_conv3x3: {n} tokens do not form the {h}x{w} patch grid")
    return _dwconv(x, kernel.astype(x.dtype), tuple(grid))


class _Kernel(nn.Module):
    """A bias-free Dense's kernel alone (the same name, shape, init and logical axes as
    ``_dense(features, names)`` would create), for matmuls that concatenate kernels.

    () -> [in_features, features]
    """
    in_features: int
    features: int
    names: tuple[str | None, str | None]
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", logical_init(self.names, _init),
                          (self.in_features, self.features), self.param_dtype)


class Attention(nn.Module):
    """Bias-free multi-head self-attention (base_vit.py ``Attention``).

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
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False,
                  kernel_init=_init)
        head_dim = width // self.num_heads
        q, k, v = (heads_dense(self.num_heads, head_dim, name=n, **kw)(x)
                   for n in ("query", "key", "value"))
        out = dot_product_attention(q, k, v, dtype=self.dtype)
        return heads_out_dense(width, name="out", **kw)(out)


class GLUConvMLP(nn.Module):
    """LN -> gelu(fc1 x) * fc2 x -> depthwise 3x3 conv over the grid -> LN -> fc_out (``GLU``).

    x: [batch, h*w, width] -> [batch, h*w, width]
    """
    mlp_dim: int
    grid: tuple[int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _layer_norm(name="ln_in", **kw)(x)
        # fc1 and fc2 (kept as two Dense kernels, as released) run as ONE matmul over their
        # concatenation: with two, XLA:CPU fuses the conv's input gradient into the transposed
        # copy that each of their kernel gradients reads, computing it twice at a strided write
        # (measured: the block's costliest fusions).
        kernels = [_Kernel(x.shape[-1], self.mlp_dim, ("embed", "mlp"), self.param_dtype,
                           name=name)() for name in ("fc1", "fc2")]
        z = jnp.dot(y.astype(self.dtype), jnp.concatenate(kernels, axis=1).astype(self.dtype))
        kernel = self.param("dwconv", logical_init((None, None, "mlp"), _init),
                            (3, 3, self.mlp_dim), self.param_dtype)
        y = glu_depthwise_conv3x3(z, kernel, self.grid)  # dwconv(gelu(z @ fc1) * (z @ fc2))
        y = _layer_norm(name="ln_mid", **kw)(y)
        return _dense(x.shape[-1], ("mlp", "embed"), name="fc_out", **kw)(y)


class Block(nn.Module):
    """NormFormer block of base_vit.py ``TransformerBlock``.

    x: [batch, h*w, width] -> [batch, h*w, width]
    """
    num_heads: int
    mlp_dim: int
    grid: tuple[int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _layer_norm(name="ln_attn", **kw)(x)
        y = Attention(self.num_heads, name="attn", **kw)(y)
        x = x + _layer_norm(name="ln_attn_out", **kw)(y)  # NormFormer's post-attention norm
        return x + GLUConvMLP(self.mlp_dim, self.grid, name="mlp", **kw)(x)


class Transformer(nn.Module):
    """``depth`` blocks, each rematerialised when ``remat`` (as released); no final LayerNorm.

    x: [batch, h*w, width] -> [batch, h*w, width]; sows each block's output.
    """
    depth: int
    num_heads: int
    mlp_dim: int
    grid: tuple[int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = nn.remat(Block) if self.remat else Block  # same param names either way
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, self.grid, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"block_{i}")(x)
            self.sow("intermediates", "block_outputs", x)
        return x


def _grid(image_size: int, patch_size: int, who: str) -> tuple[int, int]:
    _check_grid(image_size, patch_size, who)
    side = image_size // patch_size
    return side, side


class ReleasedViTEncoder(nn.Module):
    """Images to one LM-width vector per patch, as base_vit.py ``VitEncoder``.

    images: [batch, image_size, image_size, channels] float
      -> [batch, (image_size/patch_size)^2, out_dim or width]
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
    remat: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        grid = _grid(self.image_size, self.patch_size, "ReleasedViTEncoder")
        check_images(images, self.image_size, "ReleasedViTEncoder")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _dense(self.width, ("patch", "embed"), name="patch_embed", **kw)(
            patchify(images, self.patch_size))
        pos = self.param("pos_embed", logical_init(("position", "embed"), _init),
                         (grid[0] * grid[1], self.width), self.param_dtype)
        x = x + pos.astype(self.dtype)
        self.sow("intermediates", "embeddings", x)  # hidden_states[0], for the linear probe
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, grid, remat=self.remat,
                        name="transformer", **kw)(x)
        if self.out_dim is not None and self.out_dim != self.width:
            x = _dense(self.out_dim, ("embed", None), name="out_proj", **kw)(x)
        return x


class ReleasedViTDecoder(nn.Module):
    """Words (one per patch) back to pixels, as base_vit.py ``VitDecoder``.

    tokens: [batch, (image_size/patch_size)^2, in_dim] -> [batch, image_size, image_size, channels]
    No output activation (released: the loss compares raw outputs; pictures are clipped).
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
    remat: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        grid = _grid(self.image_size, self.patch_size, "ReleasedViTDecoder")
        check_tokens(tokens, self.image_size, self.patch_size, "ReleasedViTDecoder")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = tokens.astype(self.dtype)
        if tokens.shape[-1] != self.width:
            x = _dense(self.width, (None, "embed"), name="in_proj", **kw)(x)
        pos = self.param("pos_embed", logical_init(("position", "embed"), _init),
                         (grid[0] * grid[1], self.width), self.param_dtype)
        x = x + pos.astype(self.dtype)
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, grid, remat=self.remat,
                        name="transformer", **kw)(x)
        # The ConvTranspose head: kernel N(0, 0.02^2) and one zero-initialised bias per channel,
        # shared by the p x p pixels of every patch (a conv's bias, not a Dense's).
        x = _dense(self.patch_size ** 2 * self.channels, ("embed", "patch"), name="to_pixels",
                   **kw)(x)
        bias = self.param("pixel_bias", logical_init((None,), nn.initializers.zeros),
                          (self.channels,), self.param_dtype)
        x = unpatchify(x, self.patch_size, self.image_size, self.image_size, self.channels)
        return x + bias.astype(self.dtype)
