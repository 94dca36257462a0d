"""LQAE's baselines in the method: a learned codebook (a plain VQ-VAE, the authors' strawman
codebook) against NumPy, and training without the frozen LM (no masking, no refill)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.methods import lqae, lqae_evals
from lqae_vlap.models import roberta
from tests.helpers import tiny_config

# The VQ-VAE baseline as the study trains it: the decoder reads the codes, no LM in training.
LEARNED = {"quantizer.codebook": "learned", "loss.recon_quantized": 1.0, "loss.recon_lm": 0.0,
           "loss.mlm": 0.0, "loss.commitment": 0.3, "loss.codebook": 0.7,
           "quantizer.straight_through_on": "normalized"}


def _build(tiny_mlm_dir, **overrides):
    config = tiny_config(tiny_mlm_dir, **overrides)
    method = lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    return config, method, params, method.train_batches.batch_at(0)


@pytest.fixture(scope="module")
def learned(tiny_mlm_dir):
    return _build(tiny_mlm_dir, **LEARNED)


def _numpy_terms(config, method, params, batch):
    """float64 reference of the learned variant: (codes, s, table, x, recon_q)."""
    kw = method.loss_fn.keywords
    out = jax.device_get(lqae.forward(params, method.frozen, batch["image"],
                                      jax.random.PRNGKey(3), model=kw["model"], lm=kw["lm"],
                                      cfg=config, with_mlm=False, with_lm=False))
    table = np.asarray(params["codebook"], np.float64)
    z = np.asarray(out["z"], np.float64)
    s = z / np.linalg.norm(z, axis=-1, keepdims=True)  # straight_through_on='normalized'
    sims = s @ (table / np.linalg.norm(table, axis=-1, keepdims=True)).T
    idx = np.asarray(out["q"].indices)
    assert np.all(np.take_along_axis(sims, idx[..., None], -1)[..., 0] >= sims.max(-1) - 1e-5)
    x = batch["image"].astype(np.float64) / 255.0  # tiny config: pixel range (0, 1)
    return idx, s, table, x, np.asarray(out["recon_q"], np.float64)


def test_learned_codebook_is_a_trainable_table_of_the_lm_size(learned):
    """[V, D] = the frozen LM's word table's shape, normal(0.02) as the authors' strawman."""
    config, method, params, _ = learned
    words = roberta.word_embedding_matrix(method.frozen["lm"])
    assert params["codebook"].shape == words.shape
    std = float(np.std(np.asarray(params["codebook"])))
    assert std == pytest.approx(config.quantizer.learned_init_std, rel=0.02)


def test_learned_loss_is_the_numpy_vq_vae_loss(learned):
    """recon_q * mse + commitment * mean((sg(C[idx]) - s)^2) + codebook * mean((C[idx] - sg(s))^2),
    the nearest rows searched in the LEARNED table (cosine), no LM term."""
    config, method, params, batch = learned
    loss, aux = method.loss_fn(params, method.frozen, batch, jax.random.PRNGKey(3))
    idx, s, table, x, recon_q = _numpy_terms(config, method, params, batch)
    vq = np.mean((table[idx] - s) ** 2)
    rec = np.mean((recon_q - x) ** 2)
    w = config.loss
    np.testing.assert_allclose(float(aux["codebook_loss"]), vq, rtol=1e-4)
    np.testing.assert_allclose(float(aux["commitment"]), vq, rtol=1e-4)
    np.testing.assert_allclose(float(loss), w.recon_quantized * rec + (w.commitment + w.codebook)
                               * vq, rtol=1e-4)
    assert "recon_lm" not in aux


def test_learned_codebook_gradient_is_only_the_codebook_term(learned):
    """d loss / d C = codebook * 2 / M * sum_{i: idx_i = k} (C_k - s_i) exactly (NumPy): the
    straight-through passes the decoder's gradient to the encoder, none to the table."""
    config, method, params, batch = learned
    grads = jax.grad(lambda p: method.loss_fn(p, method.frozen, batch,
                                              jax.random.PRNGKey(3))[0])(params)
    idx, s, table, _, _ = _numpy_terms(config, method, params, batch)
    want = np.zeros_like(table)
    diff = (table[idx] - s).reshape(-1, table.shape[1])
    np.add.at(want, idx.reshape(-1), 2.0 * config.loss.codebook * diff / diff.size)
    np.testing.assert_allclose(np.asarray(grads["codebook"]), want, rtol=1e-4, atol=1e-9)
    enc = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["encoder"]))
    assert enc > 0


def test_without_the_lm_term_the_frozen_lm_is_not_run(learned, tiny_mlm_dir):
    """loss.recon_lm=0 and mlm=0: the loss is finite with the LM's layers set to NaN (they are
    never read); with recon_lm > 0 the same weights make it NaN (the test can fail)."""
    config, method, params, batch = learned

    def poisoned(tree):
        out = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), tree)
        out["embeddings"]["word_embeddings"] = tree["embeddings"]["word_embeddings"]
        return out

    frozen = {**method.frozen, "lm": poisoned(method.frozen["lm"])}
    loss, _ = method.loss_fn(params, frozen, batch, jax.random.PRNGKey(3))
    assert np.isfinite(float(loss))
    kw = method.loss_fn.keywords
    cfg = config.copy_and_resolve_references()
    cfg.loss.recon_lm = 1.0
    with_lm = functools.partial(lqae.loss_fn, model=kw["model"], lm=kw["lm"], cfg=cfg)
    assert not np.isfinite(float(with_lm(params, frozen, batch, jax.random.PRNGKey(3))[0]))


def test_no_refill_variant_on_the_lm_words_skips_the_lm(tiny_mlm_dir):
    """Variant (c): the LM's words, no masking, no refill: the loss is the direct
    reconstruction and the commitment (NumPy), no LM term, and no trainable codebook."""
    config, method, params, batch = _build(tiny_mlm_dir, **{
        "loss.recon_quantized": 1.0, "loss.recon_lm": 0.0, "loss.mlm": 0.0,
        "loss.mask_ratio_min": 0.0, "loss.mask_ratio_max": 0.0})
    assert "codebook" not in params
    loss, aux = method.loss_fn(params, method.frozen, batch, jax.random.PRNGKey(3))
    assert "recon_lm" not in aux and "codebook_loss" not in aux
    assert float(aux["mask_ratio"]) == 0.0
    w = config.loss
    np.testing.assert_allclose(float(loss), w.recon_quantized * float(aux["recon_quantized"])
                               + w.commitment * float(aux["commitment"]), rtol=1e-6)


def test_learned_codes_reach_the_lm_as_its_words(learned):
    """encode_words searches the learned table (the codes the loss used), and the probe's LM
    features are those of the LM's words of the same ids."""
    config, method, params, batch = learned
    kw = method.loss_fn.keywords
    images = batch["image"]
    ids = np.asarray(lqae_evals.encode_words(params, method.frozen, images, model=kw["model"],
                                             cfg=config))
    idx, *_ = _numpy_terms(config, method, params, batch)
    np.testing.assert_array_equal(ids, idx)
    words = roberta.word_embedding_matrix(method.frozen["lm"])
    feats = np.asarray(lqae_evals.released_probe_features(params, method.frozen, images,
                                                          model=kw["model"], lm=kw["lm"],
                                                          cfg=config))
    lm_out = kw["lm"].apply({"params": method.frozen["lm"]}, inputs_embeds=words[ids],
                            with_lm_head=False, output_hidden_states=True)
    last = np.asarray(lm_out["hidden_states"][-1])[:, 1:].mean(1)
    np.testing.assert_allclose(feats[:, -last.shape[1]:], last, rtol=1e-4, atol=1e-5)


def test_unknown_codebook_is_named(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir, **{"quantizer.codebook": "ema"})
    with pytest.raises(ValueError, match="config.quantizer.codebook='ema'"):
        lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))
