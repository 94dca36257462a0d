"""ViT encoder/decoder: patching, shapes, dtypes, numerics against NumPy float64, axis names, remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from lqae_vlap.models.vit import ViTDecoder, ViTEncoder, hidden_states, patchify, unpatchify
from lqae_vlap.core import sharding

ALLOWED_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "patch", "position", "norm", None}

# Small config used throughout: 16x16 images, patch 4 -> 16 tokens.
ENC = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
DEC = dict(image_size=16, patch_size=4, channels=3, width=32, depth=2, num_heads=4, mlp_dim=64)


def _images(batch=2, size=16, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1.0, 1.0, (batch, size, size, channels)), jnp.float32)


def _random_params(module, x, seed=1):
    """Random params shaped (and typed) like module.init's, drawn in NumPy (no init compile).

    Biases and LayerNorm params are random too, so zero biases / unit scales cannot hide a
    wiring mistake. Returns (boxed abstract tree, plain params).
    """
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(leaf.shape)
        if "scale" in name:
            z = 1.0 + 0.1 * z
        elif "kernel" in name:
            # Unit-variance fan-in scaling keeps activations O(1); the attention output kernel
            # [heads, kv, embed] contracts over its first two axes.
            fan_in = leaf.shape[0] * (leaf.shape[1] if "['attn']['out']" in name else 1)
            z = z / np.sqrt(fan_in)
        else:
            z = 0.1 * z
        return jnp.asarray(z, leaf.dtype)

    return abstract, jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


# ---------------------------------------------------------------- NumPy float64 reference


def _np_layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_block(x, p, num_heads):
    b, n, d = x.shape
    hd = d // num_heads
    y = _np_layer_norm(x, p["ln_attn"])
    a = p["attn"]
    heads = []
    for h in range(num_heads):
        wq = a["query"]["kernel"][:, h, :]
        wk = a["key"]["kernel"][:, h, :]
        wv = a["value"]["kernel"][:, h, :]
        q = y @ wq + a["query"]["bias"][h]
        k = y @ wk  # the key projection has no bias (softmax would ignore it)
        v = y @ wv + a["value"]["bias"][h]
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        heads.append(s @ v)  # [b, n, hd]
    concat = np.concatenate(heads, axis=-1)  # head-major, matching kernel [heads, kv, embed]
    x = x + concat @ a["out"]["kernel"].reshape(d, d) + a["out"]["bias"]
    y = _np_layer_norm(x, p["ln_mlp"])
    y = y @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"]
    y = 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))
    return x + y @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]


def _np_transformer(x, p, depth, num_heads):
    for i in range(depth):
        x = _np_block(x, p[f"block_{i}"], num_heads)
    return _np_layer_norm(x, p["ln_final"])


def _np_patchify(images, patch):
    b, h, w, c = images.shape
    out = np.zeros((b, (h // patch) * (w // patch), patch * patch * c), images.dtype)
    for bi in range(b):
        for gi in range(h // patch):
            for gj in range(w // patch):
                t = gi * (w // patch) + gj
                f = 0
                for r in range(patch):
                    for s in range(patch):
                        for ch in range(c):
                            out[bi, t, f] = images[bi, gi * patch + r, gj * patch + s, ch]
                            f += 1
    return out


def _f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ---------------------------------------------------------------- patchify


def test_patchify_matches_loop_and_round_trips():
    images = np.random.default_rng(0).standard_normal((2, 12, 8, 3)).astype(np.float32)
    patches = patchify(jnp.asarray(images), 4)
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(np.asarray(patches), _np_patchify(images, 4))
    back = unpatchify(patches, 4, 12, 8, 3)
    np.testing.assert_array_equal(np.asarray(back), images)


@pytest.mark.parametrize("shape", [(1, 10, 8, 3), (1, 8, 10, 3)])
def test_patchify_rejects_non_multiple(shape):
    with pytest.raises(ValueError, match=r"not a multiple of the patch size 4"):
        patchify(jnp.zeros(shape), 4)


def test_unpatchify_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"unpatchify expects patches of shape \[batch, 4, 48\]"):
        unpatchify(jnp.zeros((1, 5, 48)), 4, 8, 8, 3)


# ---------------------------------------------------------------- shapes, dtypes, errors


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
    images = _images()
    enc = ViTEncoder(**ENC, out_dim=24, dtype=dtype)
    abstract, enc_params = _random_params(enc, images)
    # Params stay in param_dtype (float32) whatever the compute dtype.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    tokens = enc.apply(enc_params, images)
    assert tokens.shape == (2, 16, 24) and tokens.dtype == dtype

    dec = ViTDecoder(**DEC, dtype=dtype)
    _, dec_params = _random_params(dec, tokens)
    out = dec.apply(dec_params, tokens)
    assert out.shape == images.shape and out.dtype == dtype

    if dtype == jnp.bfloat16:
        # bfloat16 compute stays close to float32 compute with the same params: relative norm
        # error under 3e-2 (bfloat16 has an 8-bit mantissa, ~4e-3 per rounding, over 2 blocks).
        ref = ViTEncoder(**ENC, out_dim=24).apply(enc_params, images)
        err = np.linalg.norm(np.asarray(tokens, np.float32) - np.asarray(ref))
        assert err / np.linalg.norm(np.asarray(ref)) < 3e-2


def test_no_projection_and_bf16_params():
    images = _images()
    enc = ViTEncoder(**ENC, out_dim=None, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    abstract = jax.eval_shape(enc.init, jax.random.key(0), images)
    assert "out_proj" not in abstract["params"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    _, params = _random_params(enc, images)
    assert enc.apply(params, images).shape == (2, 16, ENC["width"])


def test_bad_inputs_raise_clear_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"expects images \[batch, 16, 16, channels\]"):
        jax.eval_shape(ViTEncoder(**ENC).init, key, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"image_size 18 is not a multiple of patch_size 4"):
        jax.eval_shape(ViTEncoder(**{**ENC, "image_size": 18}).init, key, jnp.zeros((1, 18, 18, 3)))
    with pytest.raises(ValueError, match=r"not divisible by num_heads 5"):
        jax.eval_shape(ViTEncoder(**{**ENC, "num_heads": 5}).init, key, _images())
    with pytest.raises(ValueError, match=r"expects tokens \[batch, 16, dim\]"):
        jax.eval_shape(ViTDecoder(**DEC).init, key, jnp.zeros((1, 15, 8)))


# ---------------------------------------------------------------- numerics


def test_encoder_matches_numpy_float64():
    """Full forward (depth 2, width 32, 4 heads) against NumPy float64; tolerance 1e-4 (float32)."""
    images = _images()
    enc = ViTEncoder(**ENC, out_dim=24)
    _, params = _random_params(enc, images)
    got = np.asarray(enc.apply(params, images))

    p = _f64(params["params"])
    x = _np_patchify(np.asarray(images, np.float64), ENC["patch_size"])
    x = x @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"] + p["pos_embed"]
    x = _np_transformer(x, p["transformer"], ENC["depth"], ENC["num_heads"])
    want = x @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_decoder_matches_numpy_float64():
    """Decoder forward against NumPy float64 (same block math); tolerance 1e-4 (float32)."""
    tokens = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 24)), jnp.float32)
    dec = ViTDecoder(**DEC)
    _, params = _random_params(dec, tokens)
    got = np.asarray(dec.apply(params, tokens))

    p = _f64(params["params"])
    x = np.asarray(tokens, np.float64) @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
    x = _np_transformer(x + p["pos_embed"], p["transformer"], DEC["depth"], DEC["num_heads"])
    x = x @ p["to_pixels"]["kernel"] + p["to_pixels"]["bias"]
    # Independent inverse of the (row, col, channel) patch order.
    g, q, c = 4, 4, 3
    want = x.reshape(2, g, g, q, q, c).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, c)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_init_follows_big_vision():
    """Zero biases, unit LN scales, N(0, 0.02^2) positions, xavier-uniform kernels."""
    enc = ViTEncoder(**{**ENC, "width": 64, "mlp_dim": 128, "depth": 1}, out_dim=24)
    p = nn.meta.unbox(jax.jit(enc.init)(jax.random.key(0), _images()))["params"]
    blk = p["transformer"]["block_0"]
    for leaf in [blk["attn"]["query"]["bias"], blk["mlp_in"]["bias"], p["patch_embed"]["bias"]]:
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    np.testing.assert_array_equal(np.asarray(blk["ln_attn"]["scale"]), 1.0)
    pos = np.asarray(p["pos_embed"])
    assert abs(pos.std() - 0.02) < 0.003  # 1024 draws: std of the estimate ~0.0004
    # Xavier on the flat [fan_in, fan_out] view: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
    for kernel, fan_in, fan_out in [(blk["attn"]["query"]["kernel"], 64, 64),
                                    (blk["attn"]["out"]["kernel"], 64, 64),
                                    (blk["mlp_in"]["kernel"], 64, 128)]:
        w = np.asarray(kernel)
        a = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= a
        assert abs(w.std() - a / np.sqrt(3.0)) < 0.1 * a / np.sqrt(3.0)


# ---------------------------------------------------------------- partitioning, remat


def test_logical_axis_names_are_allowed_and_shard():
    images = _images(batch=8)
    for module, x in [(ViTEncoder(**ENC, out_dim=24), images),
                      (ViTDecoder(**DEC), jnp.zeros((8, 16, 24)))]:
        abstract = jax.eval_shape(module.init, jax.random.key(0), x)
        specs = nn.get_partition_spec(abstract)
        boxed = jax.tree.leaves(abstract, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
        # Every leaf is boxed: an unnamed weight would silently be replicated.
        assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)
        for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)):
            assert set(spec) <= ALLOWED_NAMES, spec
        # The params lay out on an 8-device data x fsdp x tensor mesh.
        mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        shardings = sharding.boxed_shardings(abstract, mesh)
        params = sharding.shard_tree(_random_params(module, x)[1], shardings)
        kernel = params["params"]["transformer"]["block_0"]["mlp_in"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_remat_gives_identical_outputs_and_gradients():
    images = _images()
    plain = ViTEncoder(**ENC, out_dim=24)
    remat = ViTEncoder(**ENC, out_dim=24, remat=True)
    _, params = _random_params(plain, images)
    _, remat_params = _random_params(remat, images)
    # Same param tree, so checkpoints move freely between remat on and off.
    assert jax.tree.structure(params) == jax.tree.structure(remat_params)

    def loss(module):
        return lambda p: jnp.mean(module.apply(p, images) ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(loss(plain)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(loss(remat)))(params)
    # Recomputation runs the same ops; allow only float32 rounding from a different fusion.
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_block_outputs_are_sown():
    images = _images()
    enc = ViTEncoder(**ENC)
    _, params = _random_params(enc, images)
    _, state = enc.apply(params, images, mutable=["intermediates"])
    outs = state["intermediates"]["transformer"]["block_outputs"]
    assert len(outs) == ENC["depth"] and all(o.shape == (2, 16, ENC["width"]) for o in outs)


def test_hidden_states_match_numpy_float64():
    """hidden_states = (patch + position embeddings, after block 1, ..., after block L), each
    against NumPy float64; the default output and the param tree are unchanged by the sowing."""
    images = _images()
    enc = ViTEncoder(**ENC, out_dim=24)
    _, params = _random_params(enc, images)
    out, state = enc.apply(params, images, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(enc.apply(params, images)))
    assert set(state) == {"intermediates"}
    got = hidden_states(state["intermediates"])
    p = _f64(params["params"])
    want = [_np_patchify(np.asarray(images, np.float64), 4) @ p["patch_embed"]["kernel"]
            + p["patch_embed"]["bias"] + p["pos_embed"]]
    for i in range(ENC["depth"]):
        want.append(_np_block(want[-1], p["transformer"][f"block_{i}"], ENC["num_heads"]))
    assert len(got) == ENC["depth"] + 1
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)
    # The last state is the one before the final LayerNorm and the output projection.
    final = _np_layer_norm(want[-1], p["transformer"]["ln_final"]) @ p["out_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(out), final + p["out_proj"]["bias"], rtol=1e-4,
                               atol=1e-4)
