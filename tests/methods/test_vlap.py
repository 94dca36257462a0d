"""VLAP's losses against NumPy float64 references and transformers' PyTorch Llama, gradients
reaching only the Dense, and a sharded train step equal to one device.

Tolerances: L_map against a textbook float64 log-domain Sinkhorn + cross-entropy, rtol 1e-5 (the
kernel computes in float32; logits are scores / 0.01, up to 100); its gradient w.r.t. the image
representation against the closed form with constant targets, atol 1e-5 relative to its scale;
the whole loss_fn against the PyTorch LlamaForCausalLM + NumPy, rtol 1e-4 (two float32 LLMs);
8-device vs 1-device steps, atol 1e-5 (as tests/train/test_trainer.py).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from lqae_vlap.data import captions as captions_lib
from lqae_vlap.evals import retrieval as retrieval_lib
from lqae_vlap.methods import vlap, vlap_evals, vlap_llm
from lqae_vlap.ops import losses
from lqae_vlap.core import sharding
from tests.helpers import (ALLOWED_AXES, SMALL_EVAL, assert_sharded_step_matches_one_device,
                           check_evaluation, demo_config, load_config, minilm_dir, run_steps)


# --- NumPy float64 references ---------------------------------------------------------------------


def np_logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log_softmax(x):
    return x - np_logsumexp(x, -1)[..., None]


def np_sinkhorn(scores, epsilon, num_iters, col=None):
    """Textbook log-domain Sinkhorn-Knopp, columns first; returns Q = B * P (rows sum to 1)."""
    b, k = scores.shape
    log_r = np.full(b, -np.log(b))
    log_c = np.full(k, -np.log(k)) if col is None else np.log(col / col.sum())
    log_k = scores / epsilon
    f, g = np.zeros(b), np.zeros(k)
    for _ in range(num_iters):
        g = log_c - np_logsumexp(log_k + f[:, None], 0)
        f = log_r - np_logsumexp(log_k + g[None, :], 1)
    return b * np.exp(log_k + f[:, None] + g[None, :])


def np_released(scores, epsilon, num_iters, freqs, prior_temperature):
    """The released code's loop: prior-weighted per-sample normalisation, num_iters times."""
    prior = np.exp(np_log_softmax(freqs / prior_temperature))
    q = np.exp(scores / epsilon - np.max(scores / epsilon, 1, keepdims=True))
    for _ in range(num_iters):
        q = q * prior[None, :]
        q = q / q.sum(1, keepdims=True)
    return q


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)  # zero rows stay 0


def np_map_loss(v, t, words, *, col, epsilon, num_iters, tau, mode="paper"):
    s_v, s_t = np_normalize(v) @ np_normalize(words).T, np_normalize(t) @ np_normalize(words).T
    if mode == "paper":
        q_v, q_t = (np_sinkhorn(s, epsilon, num_iters, col) for s in (s_v, s_t))
    else:
        q_v, q_t = (np_released(s, epsilon, num_iters, col, 0.25) for s in (s_v, s_t))
    ce = lambda q, s: -np.mean(np.sum(q * np_log_softmax(s / tau), -1))
    return 0.5 * (ce(q_t, s_v) + ce(q_v, s_t)), s_v, q_t


# --- L_map -----------------------------------------------------------------------------------------


def map_inputs(seed=0, b=6, d=16, v=40):
    rng = np.random.default_rng(seed)
    words = rng.standard_normal((v, d))
    # Representations near some words, so the assignments are peaked but not one-hot.
    visual = words[rng.integers(0, v, b)] + 0.7 * rng.standard_normal((b, d))
    text = words[rng.integers(0, v, b)] + 0.7 * rng.standard_normal((b, d))
    col = rng.uniform(0.1, 1.0, v)
    return visual, text, words, col / col.sum()


@pytest.mark.parametrize("mode,with_col", [("paper", True), ("paper", False),
                                           ("released_code", True)])
def test_assignment_prediction_loss_matches_numpy(mode, with_col):
    visual, text, words, col = map_inputs()
    col = col if with_col else None
    kw = dict(epsilon=0.05, num_iters=3)
    want, _, _ = np_map_loss(visual, text, words, col=col, tau=0.1, mode=mode, **kw)
    got, aux = vlap.assignment_prediction_loss(
        jnp.float32(visual), jnp.float32(text), jnp.float32(words),
        col_marginal=None if col is None else jnp.float32(col), temperature=0.1,
        sinkhorn_mode=mode, **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(0.5 * (float(aux["map_v"]) + float(aux["map_t"])), want, rtol=1e-5)


def test_assignment_prediction_loss_vlap_settings_finite_and_exact():
    # epsilon = tau = 0.01 (VLAP): exp(100) overflows float32; the log domain must stay exact.
    visual, text, words, col = map_inputs(seed=1)
    want, _, _ = np_map_loss(visual, text, words, col=col, epsilon=0.01, num_iters=3, tau=0.01)
    got, _ = vlap.assignment_prediction_loss(
        jnp.float32(visual), jnp.float32(text), jnp.float32(words), col_marginal=jnp.float32(col),
        epsilon=0.01, num_iters=3, temperature=0.01)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_map_gradient_treats_assignments_as_constants():
    """d L_map / d visual equals the closed form in which Q_t and Q_v are constants."""
    visual, text, words, col = map_inputs(seed=2)
    tau, b = 0.1, visual.shape[0]
    _, s_v, q_t = np_map_loss(visual, text, words, col=col, epsilon=0.05, num_iters=3, tau=tau)
    g_s = 0.5 * (np.exp(np_log_softmax(s_v / tau)) - q_t) / (tau * b)  # d/ds_v of the first term
    n = np_normalize(visual)
    g_n = g_s @ np_normalize(words)
    norm = np.linalg.norm(visual, axis=-1, keepdims=True)
    want = (g_n - np.sum(g_n * n, -1, keepdims=True) * n) / norm  # through x / ||x||
    grad = jax.grad(lambda x: vlap.assignment_prediction_loss(
        x, jnp.float32(text), jnp.float32(words), col_marginal=jnp.float32(col), epsilon=0.05,
        num_iters=3, temperature=tau)[0])(jnp.float32(visual))
    np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_map_loss_bad_inputs():
    visual, text, words, _ = map_inputs()
    with pytest.raises(ValueError, match="sinkhorn_mode"):
        vlap.assignment_prediction_loss(visual, text, words, col_marginal=None, epsilon=0.1,
                                        num_iters=3, temperature=0.1, sinkhorn_mode="swav")
    with pytest.raises(ValueError, match="word_embeddings"):
        vlap.assignment_prediction_loss(visual, text, words[:, :3], col_marginal=None,
                                        epsilon=0.1, num_iters=3, temperature=0.1)


# --- L_cap -----------------------------------------------------------------------------------------


def test_captioning_loss_counts_only_caption_tokens():
    rng = np.random.default_rng(0)
    b, before, length, v = 3, 4, 5, 11
    ids = rng.integers(0, v, (b, length))
    mask = np.ones((b, length), np.int32)
    mask[1, 3:] = 0  # padding
    mask[2, 1:] = 0
    targets, loss_mask = map(np.asarray, vlap_llm.caption_targets(before, jnp.asarray(ids),
                                                                  jnp.asarray(mask)))
    n = before + length
    assert targets.shape == loss_mask.shape == (b, n)
    # Position before - 1 + j predicts caption token j; nothing else is a target.
    np.testing.assert_array_equal(targets[:, before - 1:before - 1 + length], ids)
    np.testing.assert_array_equal(loss_mask[:, before - 1:before - 1 + length], mask)
    assert loss_mask[:, :before - 1].sum() == 0 and loss_mask[:, -1].sum() == 0

    logits = rng.standard_normal((b, n, v))
    logp = np_log_softmax(logits)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want = np.sum(nll * loss_mask) / loss_mask.sum()
    got = float(losses.masked_cross_entropy(jnp.float32(logits), jnp.asarray(targets),
                                            jnp.asarray(loss_mask)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Scrambling logits and targets at prefix, prompt and padding positions changes nothing.
    off = loss_mask == 0
    logits2 = np.where(off[..., None], 50 * rng.standard_normal(logits.shape), logits)
    targets2 = np.where(off, rng.integers(0, v, targets.shape), targets)
    got2 = float(losses.masked_cross_entropy(jnp.float32(logits2), jnp.asarray(targets2),
                                             jnp.asarray(loss_mask)))
    np.testing.assert_allclose(got2, got, rtol=1e-6)


# --- the whole loss on a tiny Llama -------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tiny_llama_dir):
    config = demo_config(tiny_llama_dir, **SMALL_EVAL)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = vlap.build(config, mesh)
    params = jax.device_get(sharding.unbox(method.init_params(jax.random.PRNGKey(0))))
    # A non-zero bias and a larger kernel so the prefix matters and the bias gradient is real.
    params = jax.tree.map(lambda x: np.asarray(x) + 0.3, params)
    return config, method, params, method.train_batches.batch_at(0)


def test_visual_map_axes_and_shapes(built):
    config, method, _, _ = built
    boxed = method.init_params(jax.random.PRNGKey(0))
    names = jax.tree.leaves(jax.tree.map(lambda x: x.names, boxed,
                                         is_leaf=lambda x: hasattr(x, "names")))
    assert set(n for n in names if n is not None) <= ALLOWED_AXES
    shapes = jax.tree.map(np.shape, sharding.unbox(boxed))
    assert shapes == {"Dense_0": {"kernel": (config.model.vision.width, 32), "bias": (32,)}}


def test_loss_fn_matches_pytorch_llama(built, tiny_llama_dir):
    from transformers import LlamaForCausalLM as HFLlama

    config, method, params, batch = built
    batch = {k: batch[k] for k in ("image", "caption_ids", "caption_mask")}
    loss, aux = jax.jit(method.loss_fn)(params, method.frozen, batch, jax.random.PRNGKey(0))

    # Reference: the stand-in features in NumPy, the Dense by hand, PyTorch for the LLM.
    hf = HFLlama.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    words = hf.model.embed_tokens.weight.detach().double().numpy()
    proj = np.asarray(method.frozen["vision"]["projection"], np.float64)
    x = batch["image"].astype(np.float64) / 127.5 - 1.0
    b, p = x.shape[0], config.model.vision.patch_size
    h = x.shape[1] // p
    patches = x.reshape(b, h, p, h, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * h, -1)
    prefix = patches @ proj @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    prompt = np.asarray(method.frozen["prompt_ids"])
    with torch.no_grad():
        hidden = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask), output_hidden_states=True
                    ).hidden_states[-1].double().numpy()
        seq = np.concatenate([prefix, words[np.broadcast_to(prompt, (b, len(prompt)))],
                              words[ids]], 1)
        attn = np.concatenate([np.ones((b, prefix.shape[1] + len(prompt)), np.int64), mask], 1)
        logits = hf(inputs_embeds=torch.tensor(seq, dtype=torch.float32),
                    attention_mask=torch.tensor(attn)).logits.double().numpy()
    text = np.sum(hidden * mask[..., None], 1) / mask.sum(1, keepdims=True)
    col = np.asarray(method.frozen["word_marginal"], np.float64)
    s = config.sinkhorn
    want_map, _, _ = np_map_loss(prefix.mean(1), text, words, col=col, epsilon=s.epsilon,
                                 num_iters=s.num_iters, tau=config.loss.temperature)
    start = prefix.shape[1] + len(prompt) - 1  # the position that predicts caption token 0
    logp = np_log_softmax(logits[:, start:start + ids.shape[1]])
    nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    want_cap = np.sum(nll * mask) / mask.sum()
    np.testing.assert_allclose(float(aux["map"]), want_map, rtol=1e-4)
    np.testing.assert_allclose(float(aux["cap"]), want_cap, rtol=1e-4)
    np.testing.assert_allclose(float(loss), 0.1 * want_map + 1.0 * want_cap, rtol=1e-4)


def test_gradients_reach_only_the_dense(built):
    config, method, params, batch = built
    # Only L_map's first term reaches the Dense: with w_cap = 0 the gradient equals that of
    # w_map / 2 * CE(Q_t, softmax(s_v / tau)) alone.
    cfg0 = ml_collections.ConfigDict(config.to_dict())
    cfg0.loss.cap = 0.0
    kw = {**method.loss_fn.keywords, "cfg": cfg0}  # the same modules, cap weight 0
    no_cap = lambda p: vlap.loss_fn(p, method.frozen, batch, None, **kw)[0]
    first_term = lambda p: 0.5 * cfg0.loss.map * vlap.loss_fn(
        p, method.frozen, batch, None, **kw)[1]["map_v"]

    @jax.jit  # one compilation for all three gradients
    def all_grads(p):
        return (jax.grad(method.loss_fn, has_aux=True)(p, method.frozen, batch, None)[0],
                jax.grad(no_cap)(p), jax.grad(first_term)(p))

    grads, full, first = all_grads(params)
    # The gradient tree is the Dense and nothing else; the frozen tree is a separate argument
    # that jax.grad (argnums=0) never differentiates.
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), full, first)


def test_evaluate_runs_every_evaluation(built, tmp_path):
    config, method, params, _ = built
    check_evaluation(config, method, params, tmp_path)


def test_caption_likelihood_similarity_is_the_per_pair_caption_loss(built):
    """The batched, padded pair scoring equals L_cap of each (image, caption) pair alone."""
    config, method, params, _ = built
    evaluator = method.evaluate.__self__
    llm = method.loss_fn.keywords["llm"]
    evaluator.params, evaluator.frozen, evaluator.cache = params, method.frozen, {}
    _, _, prefixes = evaluator.visual_reprs(evaluator.sources["images"], 3, keep_prefix=True)
    texts = ["a handwritten digit one", "a handwritten digit seven", "a b c d e"]
    sim = evaluator.likelihood_sim(prefixes, texts)  # 9 pairs in batches of 8: padding used
    ids, mask = captions_lib.tokenize_captions(llm.tokenizer, texts, config.model.max_caption_len)
    for i in range(3):
        for j in range(3):
            want = llm.caption_loss(method.frozen["llm"], prefixes[i:i + 1],
                                    method.frozen["prompt_ids"], ids[j:j + 1], mask[j:j + 1])
            np.testing.assert_allclose(sim[i, j], -float(want), rtol=1e-5, atol=1e-5)


def test_caption_likelihood_can_rank_smaller_galleries_of_its_own(built, tmp_path):
    """likelihood_gallery_size: caption_likelihood (one LLM pass per pair) ranks the first
    likelihood_galleries galleries of that size; the cosine similarities keep gallery_size."""
    config, method, params, _ = built
    evaluator = method.evaluate.__self__
    r = evaluator.cfg.eval.retrieval
    saved = (r.similarities, r.likelihood_gallery_size, r.likelihood_galleries)
    r.similarities, r.likelihood_gallery_size, r.likelihood_galleries = (
        ("word_scores", "caption_likelihood"), 4, 2)
    evaluator.params, evaluator.frozen, evaluator.cache = params, method.frozen, {}
    try:
        result, _ = vlap_evals.retrieval(evaluator, 0, str(tmp_path))
        source = evaluator.sources["images"]
        _, examples, prefixes = evaluator.visual_reprs(source, evaluator.limit(source),
                                                       keep_prefix=True)
        caption_lists = [[ex["caption"]] for ex in examples]
        groups = retrieval_lib.galleries(caption_lists, 4)[:2]
        want, chance = [], []
        for members in groups:
            texts, gt = retrieval_lib.gallery_captions(caption_lists, members)
            want.append(retrieval_lib.recall_at_k(
                evaluator.likelihood_sim(prefixes[members], texts), gt, (1, 5)))
            chance.append(retrieval_lib.chance_recall(gt, len(texts), (1, 5)))
    finally:
        r.similarities, r.likelihood_gallery_size, r.likelihood_galleries = saved
        evaluator.params = evaluator.frozen = evaluator.cache = None
    assert len(groups) == 2 and result["protocol"]["likelihood_galleries"] == {
        "galleries": 2, "gallery_images": 4}
    for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5"):
        assert result["caption_likelihood"][key] == pytest.approx(np.mean([w[key] for w in want]))
    assert result["caption_likelihood_chance"]["t2i_R@1"] == pytest.approx(1 / 4)
    assert result["caption_likelihood_chance"] == {
        k: pytest.approx(np.mean([c[k] for c in chance])) for k in chance[0]}
    assert result["chance"]["t2i_R@1"] == pytest.approx(1 / 10)  # word_scores: galleries of 10
    assert "word_scores" in result and result["gallery_images"] == 10


def test_sharded_step_matches_one_device(tiny_llama_dir):
    assert_sharded_step_matches_one_device(demo_config(tiny_llama_dir), build=vlap.build)


def test_build_errors(tiny_llama_dir):
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    with pytest.raises(ValueError, match="GGUF"):  # the demo's llm_path default is a .gguf
        vlap.build(demo_config("smollm2.gguf", **{"model.llm_family": "t5"}), mesh)
    with pytest.raises(ValueError, match="sinkhorn.mode"):
        vlap.build(demo_config(tiny_llama_dir, **{"sinkhorn.mode": "swav"}), mesh)
    with pytest.raises(ValueError, match="llm_family"):
        vlap.build(demo_config(tiny_llama_dir, **{"model.llm_family": "gpt"}), mesh)


def test_demo_captions_tokenised_with_eos(built):
    _, method, _, batch = built
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    assert ids.dtype == np.int32 and ids.shape == mask.shape
    # Every demo caption fits: the last real token is EOS.
    last = ids[np.arange(len(ids)), mask.sum(1) - 1]
    assert np.all(mask.sum(1) < ids.shape[1])
    np.testing.assert_array_equal(last, 102)  # MiniLM's [SEP], set as EOS above
    assert captions_lib.digit_caption(7) == "a handwritten digit seven"


def test_feature_cache_gives_the_same_loss_and_is_reused(built, tiny_llama_dir, tmp_path):
    config, method, params, batch = built
    cached_config = demo_config(tiny_llama_dir, **SMALL_EVAL, **{
        "data.feature_cache.enabled": True, "data.feature_cache.dir": str(tmp_path / "fc"),
        "data.feature_cache.batch_size": 64})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    cached = vlap.build(cached_config, mesh)
    cached_batch = cached.train_batches.batch_at(0)
    assert "vision_features" in cached_batch and "image" not in cached_batch
    np.testing.assert_array_equal(cached_batch["caption_ids"], batch["caption_ids"])
    loss_fn = jax.jit(method.loss_fn)
    want, _ = loss_fn(params, method.frozen, batch, jax.random.PRNGKey(0))
    got, _ = loss_fn(params, cached.frozen, cached_batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Train and validation splits each stored once; a second build reuses them.
    files = sorted(p.name for p in (tmp_path / "fc").glob("*.npy"))
    assert len(files) == 3  # train, validation (= images), vqa
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "fc").glob("*.npy")}
    vlap.build(cached_config, mesh)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fc").glob("*.npy")} == stamps


def test_fused_sinkhorn_in_the_sharded_vlap_step(tiny_llama_dir):
    """config.sinkhorn.impl='pallas' (the fused kernel; Pallas interpreter on CPU) in the 8-device
    sharded train step, its column sums combined across devices, equals the lax step on one."""
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    losses_lax, params_lax, _ = run_steps(demo_config(tiny_llama_dir), one, 2, vlap.build)
    losses_fused, params_fused, _ = run_steps(
        demo_config(tiny_llama_dir, **{"sinkhorn.impl": "pallas"}), eight, 2, vlap.build)
    np.testing.assert_allclose(losses_fused, losses_lax, rtol=0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-5),
                 params_lax, params_fused)


# --- the defaults of configs/vlap_opt.py (and vlap_t5.py through it) ------------------------------


@pytest.mark.parametrize("name", ["vlap_opt", "vlap_t5"])
def test_default_word_marginal_is_the_caption_frequency(name):
    # The paper's transport has a word-frequency marginal; uniform only when asked for.
    wm = load_config(name).word_marginal
    assert wm.source == "frequency" and wm.cache_dir == ""
    assert (wm.alpha, wm.power) == (1.0, 1.0)
    assert load_config("vlap_demo").word_marginal.source == "count"  # offline, no file written


def test_word_marginal_of_the_training_captions(tmp_path):
    """The digits' 1,500 training captions under MiniLM's tokenizer (as the LLM's): the start-up
    line names data, tokenizer and words; the file is found by the next run."""
    from lqae_vlap import models

    config = load_config("vlap_demo", **{"word_marginal.source": "frequency",
                                         "word_marginal.cache_dir": str(tmp_path),
                                         "model.tokenizer_path": minilm_dir()})
    tok = models.load_tokenizer(minilm_dir())
    train = captions_lib.DigitCaptions("train")
    probs, line = vlap.word_marginal(config, tok, len(tok), train)
    saved = list(tmp_path.glob("*.npy"))
    assert len(saved) == 1 and saved[0].name.startswith("digits-train-model-v30522-")
    assert line.startswith(f"digits train, Llama tokenizer ({minilm_dir()}), 30,522 words, "
                           "counted over 1,500 captions in ")
    assert line.endswith(f"saved at {saved[0]}")
    counts = np.zeros(len(tok))
    for caption in train.captions:
        for i in tok(" " + caption, add_special_tokens=False)["input_ids"]:
            counts[i] += 1
    np.testing.assert_allclose(probs, (counts + 1) / (counts + 1).sum(), rtol=1e-6)
    again, line2 = vlap.word_marginal(config, tok, len(tok), train)
    np.testing.assert_array_equal(again, probs)
    assert f"loaded from {saved[0]}" in line2


def test_optimizer_is_torch_adamw_with_its_default_decay():
    """The released script: torch.optim.AdamW(model.parameters(), lr), so weight decay 0.01 on
    the kernel AND the bias. One step on zero gradients moves only by the decay, p * (1 - lr *
    0.01) (Adam's m / (sqrt(v) + eps) is 0 / eps = 0); lr = 1 at step 0 (no warm-up) to see it."""
    import optax

    from lqae_vlap.train import trainer

    optim = load_config("vlap_opt").optim
    assert (optim.weight_decay, optim.weight_decay_mask) == (0.01, "all")
    assert (optim.b1, optim.b2, optim.eps, optim.grad_clip) == (0.9, 0.999, 1e-8, 0.0)
    optim.update(dict(lr=1.0, warmup_steps=0))
    tx, schedule = trainer.make_optimizer(optim, total_steps=10, global_batch_size=256)
    assert float(schedule(0)) == 1.0
    params = {"Dense_0": {"kernel": np.full((3, 4), 2.0, np.float32),
                          "bias": np.full((4,), 3.0, np.float32)}}
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["Dense_0"]["kernel"], 2.0 * (1 - 0.01), rtol=1e-6)
    np.testing.assert_allclose(new["Dense_0"]["bias"], 3.0 * (1 - 0.01), rtol=1e-6)


def test_optimizer_steps_equal_torch_adamw_on_the_dense():
    """Three steps of our optimizer on vlap_opt's optim equal torch.optim.AdamW(params, lr) with
    torch's defaults, its lr set per step from the schedule as the released script does."""
    import optax

    from lqae_vlap.train import trainer

    optim = load_config("vlap_opt").optim
    optim.update(dict(lr=1e-2, warmup_steps=2))
    tx, schedule = trainer.make_optimizer(optim, total_steps=6, global_batch_size=256)
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(5, 3)), rng.normal(size=(3,))
    grads = [(rng.normal(size=(5, 3)), rng.normal(size=(3,))) for _ in range(3)]
    params = {"Dense_0": {"kernel": np.float32(kernel), "bias": np.float32(bias)}}
    state = tx.init(params)
    linear = torch.nn.Linear(5, 3)  # torch's weight is the transposed kernel
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(kernel.T))
        linear.bias.copy_(torch.tensor(bias))
    torch_opt = torch.optim.AdamW(linear.parameters(), lr=float(schedule(0)))
    for step, (gk, gb) in enumerate(grads):
        g = {"Dense_0": {"kernel": np.float32(gk), "bias": np.float32(gb)}}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        for group in torch_opt.param_groups:
            group["lr"] = float(schedule(step))
        linear.weight.grad = torch.tensor(np.float32(gk.T))
        linear.bias.grad = torch.tensor(np.float32(gb))
        torch_opt.step()
    np.testing.assert_allclose(params["Dense_0"]["kernel"], linear.weight.detach().numpy().T,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["Dense_0"]["bias"], linear.bias.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    assert float(schedule(1)) > 0  # the steps really moved the weights
