"""The released LQAE ViT (models/vit_released.py): one block against NumPy float64, the conv
equivalences it relies on, its parameters, remat, and compiled FLOPs against the block's true count.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.models import vit, vit_released as vr

# 16x16 images, patch 4 -> a 4x4 grid of 16 tokens.
ENC = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=48)
DEC = dict(image_size=16, patch_size=4, channels=3, width=32, depth=2, num_heads=4, mlp_dim=48)


def _random_params(module, *args, seed=1):
    """Random params shaped like module.init's (LayerNorm scales near 1, biases non-zero), so a
    unit scale or zero bias cannot hide a wiring mistake."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(leaf.shape)
        if "scale" in name:
            z = 1.0 + 0.1 * z
        elif "bias" in name:
            z = 0.1 * z
        elif "['out']" in name:  # attention out kernel [heads, kv, embed]
            z = z / np.sqrt(leaf.shape[0] * leaf.shape[1])
        elif "dwconv" in name:
            z = z / 3.0
        elif leaf.ndim == 2 and "pos_embed" not in name:
            z = z / np.sqrt(leaf.shape[0])
        else:
            z = 0.5 * z
        return jnp.asarray(z, leaf.dtype)

    return abstract, jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


# ---------------------------------------------------------------- NumPy float64 reference


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_dwconv(y, k, h, w):
    """Depthwise 3x3 cross-correlation with zero padding, by explicit loops over the grid."""
    b, n, c = y.shape
    g = y.reshape(b, h, w, c)
    out = np.zeros_like(g)
    for i in range(h):
        for j in range(w):
            for a in range(3):
                for bb in range(3):
                    ii, jj = i + a - 1, j + bb - 1
                    if 0 <= ii < h and 0 <= jj < w:
                        out[:, i, j, :] += g[:, ii, jj, :] * k[a, bb, :]
    return out.reshape(b, n, c)


def _np_block(x, p, num_heads, h, w):
    b, n, d = x.shape
    hd = d // num_heads
    y = _ln(x, p["ln_attn"])
    a = p["attn"]
    heads = []
    for i in range(num_heads):
        q = y @ a["query"]["kernel"][:, i, :]
        k = y @ a["key"]["kernel"][:, i, :]
        v = y @ a["value"]["kernel"][:, i, :]
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        heads.append((s / s.sum(-1, keepdims=True)) @ v)
    att = np.concatenate(heads, -1) @ a["out"]["kernel"].reshape(d, d)
    x = x + _ln(att, p["ln_attn_out"])
    m = p["mlp"]
    y = _ln(x, m["ln_in"])
    y = _gelu_tanh(y @ m["fc1"]["kernel"]) * (y @ m["fc2"]["kernel"])
    y = _ln(_np_dwconv(y, m["dwconv"], h, w), m["ln_mid"])
    return x + y @ m["fc_out"]["kernel"]


def _f64(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def test_block_matches_numpy_float64():
    """One released block (width 32, 4 heads, mlp 48, 4x4 grid) against NumPy float64 at 1e-4."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 32)), jnp.float32)
    block = vr.Block(num_heads=4, mlp_dim=48, grid=(4, 4))
    _, params = _random_params(block, x)
    got = np.asarray(block.apply(params, x))
    want = _np_block(np.asarray(x, np.float64), _f64(params["params"]), 4, 4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_block_gradients_match_numpy_float64():
    """The block's gradients (its custom-VJP depthwise conv and the fused fc1|fc2 matmul
    included) against central differences of the NumPy float64 block: for the input and for
    every parameter leaf, <grad, v> along a random direction v, at 1e-3."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    block = vr.Block(num_heads=4, mlp_dim=48, grid=(4, 4))
    _, params = _random_params(block, x)
    weights = rng.standard_normal((2, 16, 32))  # loss = sum(out * weights)

    def np_loss(x64, p64):
        return float(np.sum(_np_block(x64, p64["params"], 4, 4, 4) * weights))

    gx, gp = jax.grad(lambda x, p: jnp.sum(block.apply(p, x) * weights), argnums=(0, 1))(x, params)
    x64, p64 = np.asarray(x, np.float64), _f64(params)
    eps = 1e-5
    vx = rng.standard_normal(x.shape)
    fd = (np_loss(x64 + eps * vx, p64) - np_loss(x64 - eps * vx, p64)) / (2 * eps)
    np.testing.assert_allclose(float(np.sum(np.asarray(gx, np.float64) * vx)), fd, rtol=1e-3)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(p64)
    grads = jax.tree.leaves(gp)
    assert len(grads) == len(leaves) == 16  # 4 LayerNorms x 2, q k v out, fc1 fc2 fc_out, conv
    for i, ((path, leaf), g) in enumerate(zip(leaves, grads)):
        v = rng.standard_normal(leaf.shape)

        def moved(sign):
            vals = [l + sign * eps * v if j == i else l for j, (_, l) in enumerate(leaves)]
            return jax.tree_util.tree_unflatten(treedef, vals)
        fd = (np_loss(x64, moved(1)) - np_loss(x64, moved(-1))) / (2 * eps)
        got = float(np.sum(np.asarray(g, np.float64) * v))
        np.testing.assert_allclose(got, fd, rtol=1e-3, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_block_has_no_biases_outside_layer_norms():
    x = jnp.zeros((1, 16, 32))
    abstract = nn.meta.unbox(jax.eval_shape(vr.Block(4, 48, (4, 4)).init, jax.random.key(0), x))
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)]
    biases = [n for n in names if "bias" in n]
    assert biases and all("['ln_" in n for n in biases), biases
    # Four LayerNorms: before attention, after it (NormFormer), before the GLU, after the conv.
    assert {n.split("']")[1 if "mlp" not in n else 2].strip("['") for n in biases} == {
        "ln_attn", "ln_attn_out", "ln_in", "ln_mid"}


# ---------------------------------------------------------------- the equivalences it relies on


def test_depthwise_conv_equals_grouped_conv():
    """The nine shifted products equal flax's depthwise nn.Conv (the released ``mid_ffn_conv``)."""
    rng = np.random.default_rng(1)
    y = jnp.asarray(rng.standard_normal((2, 3 * 5, 6)), jnp.float32)  # a 3x5 grid, 6 channels
    k = jnp.asarray(rng.standard_normal((3, 3, 6)), jnp.float32)
    conv = nn.Conv(6, (3, 3), padding="SAME", feature_group_count=6, use_bias=False)
    want = conv.apply({"params": {"kernel": k[:, :, None, :]}}, y.reshape(2, 3, 5, 6))
    got = vr.depthwise_conv3x3(y, k, (3, 5))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want).reshape(2, 15, 6),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got),
                               _np_dwconv(np.asarray(y, np.float64), np.asarray(k), 3, 5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 3])  # even: two chunks on XLA:CPU; odd: one
def test_glu_conv_value_and_gradients_equal_autodiff(batch):
    """glu_depthwise_conv3x3 (custom VJP, batch chunks) equals depthwise_conv3x3(gelu(gate) *
    linear) and its gradients w.r.t. z and the kernel equal autodiff of the plain expression."""
    rng = np.random.default_rng(2)
    c, grid = 6, (3, 4)
    z = jnp.asarray(rng.standard_normal((batch, 12, 2 * c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((batch, 12, c)), jnp.float32)

    def plain(z, k):  # autodiff all the way: the nine shifted products, no custom VJP
        y = jax.nn.gelu(z[..., :c], approximate=True) * z[..., c:]
        return vr._shifted_sum(y, k, grid)

    got = vr.glu_depthwise_conv3x3(z, k, grid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain(z, k)), rtol=1e-6, atol=1e-6)
    want_g = jax.grad(lambda z, k: jnp.sum(plain(z, k) * weights), argnums=(0, 1))(z, k)
    got_g = jax.grad(lambda z, k: jnp.sum(vr.glu_depthwise_conv3x3(z, k, grid) * weights),
                     argnums=(0, 1))(z, k)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="glu_depthwise_conv3x3"):
        vr.glu_depthwise_conv3x3(z[..., :-1], k, grid)


def test_batch_chunks_compute_the_same():
    """_in_chunks over two batch halves (a lax.map) gives fn's values (to float32 rounding: the
    loop is compiled, fn here runs op by op)."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 12, 5)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(4).standard_normal((3, 3, 5)), jnp.float32)

    def fn(v):
        return vr._shifted_sum(v, k, (3, 4)), v * 2.0

    for a, b in zip(vr._in_chunks(fn, 2, x), fn(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert vr._batch_chunks(3) == 1


def test_patch_embedding_is_the_bias_free_conv():
    images = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (2, 16, 16, 3)), jnp.float32)
    enc = vr.ReleasedViTEncoder(**{**ENC, "depth": 0})
    _, params = _random_params(enc, images)
    got = enc.apply(params, images)
    p = params["params"]
    kernel = p["patch_embed"]["kernel"].reshape(4, 4, 3, 32)  # HWIO
    conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = conv.reshape(2, 16, 32) + p["pos_embed"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert "bias" not in p["patch_embed"] and "out_proj" not in p  # width == out_dim: none


def test_decoder_head_is_the_released_conv_transpose():
    """Dense + unpatchify equals flax's nn.ConvTranspose (p x p, stride p) with the kernel
    flipped in both spatial axes; the bias is the ConvTranspose's."""
    tokens = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 32)), jnp.float32)
    dec = vr.ReleasedViTDecoder(**{**DEC, "depth": 0})
    _, params = _random_params(dec, tokens)
    got = dec.apply(params, tokens)
    p = params["params"]
    grid = (tokens + p["pos_embed"]).reshape(2, 4, 4, 32)
    kernel = p["to_pixels"]["kernel"].reshape(32, 4, 4, 3).transpose(1, 2, 0, 3)[::-1, ::-1]
    head = nn.ConvTranspose(3, (4, 4), strides=(4, 4), padding="VALID")
    want = head.apply({"params": {"kernel": kernel, "bias": p["pixel_bias"]}}, grid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert "in_proj" not in p and "bias" not in p["to_pixels"]


# ---------------------------------------------------------------- shapes, init, remat


def test_shapes_projections_and_init():
    images = jnp.zeros((2, 16, 16, 3))
    enc = vr.ReleasedViTEncoder(**{**ENC, "depth": 1}, out_dim=24, remat=False)
    p = nn.meta.unbox(enc.init(jax.random.key(0), images))["params"]
    assert enc.apply({"params": p}, images).shape == (2, 16, 24)
    assert "bias" not in p["out_proj"]  # a bias-free map to a wider or narrower LM
    dec = vr.ReleasedViTDecoder(**{**DEC, "depth": 1}, remat=False)
    dp = nn.meta.unbox(dec.init(jax.random.key(0), jnp.zeros((2, 16, 24))))["params"]
    assert dec.apply({"params": dp}, jnp.zeros((2, 16, 24))).shape == (2, 16, 16, 3)
    assert "in_proj" in dp and "ln_final" not in dp["transformer"]
    # normal(0.02) everywhere (kernels, positions, conv taps).
    mlp = p["transformer"]["block_0"]["mlp"]
    for leaf in (p["pos_embed"], mlp["fc1"]["kernel"], mlp["dwconv"], p["patch_embed"]["kernel"]):
        assert abs(float(np.std(np.asarray(leaf))) - 0.02) < 0.004


def test_remat_same_outputs_gradients_and_params():
    images = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (2, 16, 16, 3)), jnp.float32)
    args = {**ENC, "depth": 1}
    on, off = vr.ReleasedViTEncoder(**args), vr.ReleasedViTEncoder(**args, remat=False)
    assert on.remat  # released: every block rematerialised
    _, params = _random_params(on, images)
    assert jax.tree.structure(params) == jax.tree.structure(_random_params(off, images)[1])

    def loss(module):
        return lambda p: jnp.mean(module.apply(p, images) ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(loss(off)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(loss(on)))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_block_outputs_are_sown():
    images = jnp.zeros((2, 16, 16, 3))
    enc = vr.ReleasedViTEncoder(**ENC)
    _, params = _random_params(enc, images)
    _, state = enc.apply(params, images, mutable=["intermediates"])
    assert len(state["intermediates"]["transformer"]["block_outputs"]) == ENC["depth"]


def test_hidden_states_match_numpy_float64():
    """vit.hidden_states of the released encoder: (bias-free patch embedding + positions, after
    block 1, ..., after block L) against NumPy float64; the default output is unchanged and is
    the last state (no final LayerNorm, no projection at equal widths)."""
    images = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (2, 16, 16, 3)), jnp.float32)
    enc = vr.ReleasedViTEncoder(**ENC)
    _, params = _random_params(enc, images)
    out, state = enc.apply(params, images, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(enc.apply(params, images)))
    got = vit.hidden_states(state["intermediates"])
    p = _f64(params["params"])
    x = np.asarray(vit.patchify(images, 4), np.float64)  # patchify is checked in test_vit.py
    want = [x @ p["patch_embed"]["kernel"] + p["pos_embed"]]
    for i in range(ENC["depth"]):
        want.append(_np_block(want[-1], p["transformer"][f"block_{i}"], 4, 4, 4))
    assert len(got) == ENC["depth"] + 1
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got[-1]), np.asarray(out))


# ---------------------------------------------------------------- compiled FLOPs


def block_flops(batch, tokens, width, mlp):
    """The block's forward FLOPs: its matmuls (2 per multiply-add) and the depthwise conv."""
    proj = 4 * 2 * batch * tokens * width * width  # q, k, v, out
    attn = 2 * 2 * batch * tokens * tokens * width  # q k^T and weights @ v
    glu = 3 * 2 * batch * tokens * width * mlp  # fc1, fc2, fc_out
    conv = 9 * 2 * batch * tokens * mlp
    return proj + attn + glu + conv


def test_compiled_train_flops_close_to_the_true_count():
    """value_and_grad of one block (batch 2, 8x8 grid, width 64, mlp 256, no remat) compiles on
    CPU to between 0.9x and 1.5x of 3 x the forward count (forward + two backward products per
    matmul; the rest is elementwise work). A grouped-conv formulation, whose filter gradient
    XLA:CPU lowers as a dense 256 x 256 convolution, compiles to 3.2x and fails this."""
    b, side, width, mlp = 2, 8, 64, 256
    block = vr.Block(num_heads=4, mlp_dim=mlp, grid=(side, side))
    x = jnp.ones((b, side * side, width), jnp.float32)
    params = jax.eval_shape(block.init, jax.random.key(0), x)

    def loss(p, x):
        return jnp.sum(block.apply(p, x) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratio = float(cost["flops"]) / (3 * block_flops(b, side * side, width, mlp))
    assert 0.9 <= ratio <= 1.5, ratio


@pytest.mark.parametrize("cls,args", [(vr.ReleasedViTEncoder, ENC), (vr.ReleasedViTDecoder, DEC)])
def test_bad_shapes_raise_clear_errors(cls, args):
    with pytest.raises(ValueError, match="expects"):
        x = jnp.zeros((1, 8, 8, 3)) if cls is vr.ReleasedViTEncoder else jnp.zeros((1, 15, 32))
        jax.eval_shape(cls(**args).init, jax.random.key(0), x)
