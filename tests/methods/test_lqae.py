"""LQAE loss terms on tiny shapes against NumPy, and the straight-through gradient path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.methods import lqae
from lqae_vlap.models import roberta
from lqae_vlap.core import sharding
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def built(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir)
    config.loss.mlm = 0.1  # the tiny BERT has its masked-LM head: exercise every term
    config.loss.commitment = 0.3
    config.loss.recon_lm = 0.7
    config.loss.recon_quantized = 0.4  # (0 in the paper config) exercise the direct term too
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = lqae.build(config, mesh)
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    batch = method.train_batches.batch_at(0)
    return config, method, params, batch


def test_random_mask_counts():
    for lo, hi in [(0.5, 0.5), (0.25, 0.75), (0.0, 0.0)]:
        m = np.asarray(lqae.random_mask(jax.random.PRNGKey(1), 64, 16, lo, hi))
        counts = m.sum(1)
        assert counts.min() >= round(lo * 16) and counts.max() <= round(hi * 16)
        if lo == hi:
            assert (counts == round(lo * 16)).all()
    # positions differ between samples
    m = np.asarray(lqae.random_mask(jax.random.PRNGKey(2), 8, 16, 0.5, 0.5))
    assert len({tuple(r) for r in m}) > 1


def test_loss_is_weighted_sum_of_numpy_terms(built):
    config, method, params, batch = built
    rng = jax.random.PRNGKey(3)
    loss, aux = method.loss_fn(params, method.frozen, batch, rng)
    kw = method.loss_fn.keywords
    out = jax.device_get(lqae.forward(params, method.frozen, batch["image"], rng,
                                      model=kw["model"], lm=kw["lm"], cfg=config, with_mlm=True))
    assert tuple(config.model.pixel_range) == (0.0, 1.0)
    x = batch["image"].astype(np.float64) / 255.0  # the released loader's [0, 1] pixels
    codebook = np.asarray(roberta.word_embedding_matrix(method.frozen["lm"]), np.float64)
    z = np.asarray(out["z"], np.float64)
    idx = np.asarray(out["q"].indices)
    # nearest word by cosine, brute force in float64
    zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
    cn = codebook / np.maximum(np.linalg.norm(codebook, axis=-1, keepdims=True), 1e-12)  # [PAD] row is 0
    sims = zn @ cn.T
    best = sims.max(-1)
    assert np.all(np.take_along_axis(sims, idx[..., None], -1)[..., 0] >= best - 1e-5)
    rec_q = np.mean((out["recon_q"] - x) ** 2)
    rec_lm = np.mean((out["recon_lm"] - x) ** 2)
    # The raw encoder output, as the released quantizer (not z / |z|).
    assert config.quantizer.straight_through_on == "raw"
    z_enc = np.asarray(kw["model"].apply({"params": params}, jnp.asarray(x, jnp.float32),
                                         method=lqae.LQAEModel.encode), np.float64)
    np.testing.assert_allclose(z, z_enc, rtol=1e-5, atol=1e-5)
    commit = np.mean((codebook[idx] - z) ** 2)
    logits = np.asarray(out["lm_out"]["logits"], np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    mask = np.asarray(out["mask"])
    mlm = -np.take_along_axis(lp, idx[..., None], -1)[..., 0][mask].mean()
    w = config.loss
    want = (w.recon_quantized * rec_q + w.recon_lm * rec_lm + w.commitment * commit + w.mlm * mlm)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(aux["commitment"]), commit, rtol=1e-4)
    np.testing.assert_allclose(float(aux["mlm"]), mlm, rtol=1e-4)
    assert float(aux["mask_ratio"]) == pytest.approx(0.5)
    assert 0 < float(aux["codebook_usage"]) <= 1


def test_straight_through_reaches_encoder(built):
    config, method, params, batch = built
    # Only the reconstruction from the quantized words: without the straight-through estimator
    # the encoder would get no gradient at all from it.
    cfg = config.copy_and_resolve_references()
    cfg.loss.update(dict(recon_lm=0.0, commitment=0.0, mlm=0.0))
    kw = method.loss_fn.keywords
    loss = functools.partial(lqae.loss_fn, model=kw["model"], lm=kw["lm"], cfg=cfg)
    grads = jax.grad(lambda p: loss(p, method.frozen, batch, jax.random.PRNGKey(0))[0])(params)
    enc = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads["encoder"])))
    dec = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads["decoder"])))
    assert float(enc) > 0 and float(dec) > 0
    # the frozen LM is an argument jax.grad does not differentiate: its tree is not in grads
    assert set(grads) == {"encoder", "decoder"}


def test_zero_direct_weight_skips_the_direct_reconstruction(built):
    """recon_quantized=0 (the paper config): the loss is the LM-path terms alone, and the decoder
    is not run on the quantized words (its term is absent, not multiplied by 0)."""
    config, method, params, batch = built
    cfg = config.copy_and_resolve_references()
    cfg.loss.recon_quantized = 0.0
    kw = method.loss_fn.keywords
    loss = functools.partial(lqae.loss_fn, model=kw["model"], lm=kw["lm"], cfg=cfg)
    rng = jax.random.PRNGKey(3)
    value, aux = loss(params, method.frozen, batch, rng)
    assert "recon_quantized" not in aux
    w = cfg.loss
    want = w.recon_lm * aux["recon_lm"] + w.commitment * aux["commitment"] + w.mlm * aux["mlm"]
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    _, full = method.loss_fn(params, method.frozen, batch, rng)
    np.testing.assert_allclose(float(full["recon_lm"]), float(aux["recon_lm"]), rtol=1e-6)


def test_encoder_gradient_only_through_the_lm_when_direct_weight_is_zero(built):
    """With recon_quantized=0 and no commitment, the encoder's gradient is exactly the one that
    passes through the frozen LM: zero once the LM path's weight is zero too."""
    config, method, params, batch = built
    kw = method.loss_fn.keywords

    def enc_grad_norm(**weights):
        cfg = config.copy_and_resolve_references()
        cfg.loss.update(dict(recon_quantized=0.0, commitment=0.0, mlm=0.0, **weights))
        loss = functools.partial(lqae.loss_fn, model=kw["model"], lm=kw["lm"], cfg=cfg)
        g = jax.grad(lambda p: loss(p, method.frozen, batch, jax.random.PRNGKey(0))[0])(params)
        return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g["encoder"]))))

    assert enc_grad_norm(recon_lm=1.0) > 0
    assert enc_grad_norm(recon_lm=0.0) == 0.0


@pytest.mark.parametrize("key,value,match", [
    ("model.architecture", "normformer", "config.model.architecture='normformer'"),
    ("model.pixel_range", (1.0, 0.0), "config.model.pixel_range"),
    ("quantizer.straight_through_on", "unit", "config.quantizer.straight_through_on='unit'"),
])
def test_bad_settings_are_named(tiny_mlm_dir, key, value, match):
    config = tiny_config(tiny_mlm_dir, **{key: value})
    with pytest.raises(ValueError, match=match):
        lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))


def test_released_architecture_trains_through_the_method(tiny_mlm_dir):
    """The paper config's ViT (model.architecture='released') built by the method on tiny sizes:
    the encoder's blocks are the released ones and the loss has a finite, non-zero gradient."""
    config = tiny_config(tiny_mlm_dir, **{"model.architecture": "released",
                                          "model.remat": True})
    method = lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    block = params["encoder"]["transformer"]["block_0"]
    assert {"ln_attn_out", "mlp"} <= set(block) and "dwconv" in block["mlp"]
    batch = method.train_batches.batch_at(0)
    (value, _), grads = jax.value_and_grad(method.loss_fn, has_aux=True)(
        params, method.frozen, batch, jax.random.PRNGKey(1))
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads["encoder"]))))
    assert np.isfinite(float(value)) and np.isfinite(norm) and norm > 0


def test_spread_weight_adds_the_pairwise_cosine_penalty(built):
    """loss.spread > 0 adds spread * mean_{i,j} cos(z_i, z_j)^2 over the batch's tokens (NumPy
    on the encoder output); at 0 (the default) the term is absent and the loss unchanged."""
    config, method, params, batch = built
    kw = method.loss_fn.keywords
    rng = jax.random.PRNGKey(3)

    def run(weight):
        cfg = config.copy_and_resolve_references()
        cfg.loss.spread = weight
        loss = functools.partial(lqae.loss_fn, model=kw["model"], lm=kw["lm"], cfg=cfg)
        return loss(params, method.frozen, batch, rng)

    assert config.loss.spread == 0.0
    base, base_aux = run(0.0)
    assert "spread" not in base_aux
    value, aux = run(2.5)
    z = np.asarray(lqae.forward(params, method.frozen, batch["image"], rng, model=kw["model"],
                                lm=kw["lm"], cfg=config, with_mlm=False)["z"], np.float64)
    u = z.reshape(-1, z.shape[-1])
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    want = np.mean((u @ u.T) ** 2)
    np.testing.assert_allclose(float(aux["spread"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(value), float(base) + 2.5 * want, rtol=1e-4)
