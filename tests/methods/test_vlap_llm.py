"""FrozenLLM (methods/vlap_llm.py) against transformers' PyTorch models, and VLAP with T5.

References and tolerances:
  - caption_loss: transformers' own loss (T5ForConditionalGeneration(inputs_embeds=[prefix ;
    prompt], labels=caption with -100 on padding).loss), or for OPT / Llama a float64 NumPy
    cross-entropy on the PyTorch logits of [prefix ; prompt ; caption]: rtol 1e-5 (float32).
  - text_hidden: the PyTorch encoder's (T5) / decoder's (OPT, Llama) last_hidden_state on the
    padded caption batch, atol 1e-4 on real tokens (float32; observed ~3e-6; the loss ~3e-7).
  - generate: transformers' generate(inputs_embeds=[prefix ; prompt], do_sample=False), greedy
    and num_beams=3, run row by row WITHOUT padding, against one padded batch whose prompts differ
    in length: equal token for token. EOS is a token the reference emits, so rows stop early.
    generate_interleaved likewise on rows [block ; text ; block ; text] of different lengths
    (few-shot VQA), padded as a whole in our batch, each row alone and unpadded in transformers.
  - bfloat16 LLM (tiny T5): loss within rtol 5e-3 (observed 2e-4) and Dense gradients within 5e-2
    relative L2 (observed 2e-2) of the float32 run.
  - 8-device sharded train step with T5 equals one device within atol 1e-5 (tests/train).
Tiny random models (2 layers, width 32); module-scoped fixtures; each jitted search compiles once
per family and beam count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lqae_vlap.methods import vlap, vlap_llm
from lqae_vlap.models import hf_weights, llama, opt, t5
from lqae_vlap.core import sharding
from tests.helpers import (SMALL_EVAL, assert_sharded_step_matches_one_device, check_evaluation,
                           demo_config, load_config, tiny_llama, tiny_opt, tiny_t5)

NEW = 8  # generated tokens per row
PROMPT_LENGTHS = (3, 1, 5)  # one batch, prompts of different lengths
PREFIX = 4  # visual tokens


# --- tiny models -----------------------------------------------------------------------------------


ALL_MODELS = ["opt", "llama", "t5_relu", "t5_gated"]
GEN_MODELS = ["opt", "llama", "t5_gated"]  # generation: one T5 layout (the search code is shared)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> a tiny random LLM as dict(family, torch model, FrozenLLM, params, vocab), built on
    first use; T5 in both layouts (original: ReLU, tied head; v1.1 / Flan: gated-gelu, lm_head)."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            family = name.split("_")[0]
            if family == "t5":
                torch_model = tiny_t5(name.split("_")[1], folder)
            else:
                torch_model = {"opt": tiny_opt, "llama": tiny_llama}[family]()
                torch_model.save_pretrained(folder)
            loader = {"opt": opt.load, "llama": llama.load, "t5": t5.load}[family]
            module, variables, _ = loader(folder)
            cache[name] = dict(family=family, torch=torch_model,
                               llm=vlap_llm.make_llm(family, module, None),
                               params=variables["params"], vocab=module.config.vocab_size)
        return cache[name]
    return get


@pytest.fixture(params=ALL_MODELS)
def model(request, models):
    return models(request.param)


def inputs(m, seed=0):
    """prefix [3, 4, D] float32, prompt [3] ids, caption ids / mask [3, 7] right-padded."""
    rng = np.random.RandomState(seed)
    d = m["llm"].embed_dim
    prefix = rng.normal(0, 1, (3, PREFIX, d)).astype(np.float32)
    prompt = rng.randint(3, m["vocab"], 3).astype(np.int32)
    ids = rng.randint(3, m["vocab"], (3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = m["llm"].pad_token_id
    return prefix, prompt, ids, mask


def torch_words(torch_model):
    return torch_model.get_input_embeddings().weight.detach().numpy()


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --- caption_loss and text_hidden ---------------------------------------------------------------


def test_word_embeddings_are_the_input_table(model):
    words = np.asarray(model["llm"].word_embeddings({"params": model["params"]}))
    np.testing.assert_array_equal(words, torch_words(model["torch"]))
    assert words.shape == (model["vocab"], model["llm"].embed_dim)


def test_caption_loss_matches_transformers(model):
    llm, hf = model["llm"], model["torch"]
    prefix, prompt, ids, mask = inputs(model)
    got = float(jax.jit(llm.caption_loss)(model["params"], jnp.asarray(prefix), jnp.asarray(prompt),
                                          jnp.asarray(ids), jnp.asarray(mask)))
    words = torch_words(hf)
    prompt_embeds = np.broadcast_to(words[prompt], (3, len(prompt), words.shape[1]))
    with torch.no_grad():
        if model["family"] == "t5":
            labels = np.where(mask > 0, ids, -100)
            want = float(hf(inputs_embeds=torch.as_tensor(np.concatenate([prefix, prompt_embeds], 1)),
                            attention_mask=torch.ones((3, PREFIX + len(prompt)), dtype=torch.long),
                            labels=torch.as_tensor(labels, dtype=torch.long)).loss)
        else:
            embeds = np.concatenate([prefix, prompt_embeds, words[ids]], 1)
            attn = np.concatenate([np.ones((3, PREFIX + len(prompt)), np.int64), mask], 1)
            logits = hf(inputs_embeds=torch.as_tensor(embeds),
                        attention_mask=torch.as_tensor(attn)).logits.double().numpy()
            start = PREFIX + len(prompt) - 1  # the slot that predicts caption token 0
            logp = np_log_softmax(logits[:, start:start + ids.shape[1]])
            nll = -np.take_along_axis(logp, ids[..., None].astype(np.int64), -1)[..., 0]
            want = float((nll * mask).sum() / mask.sum())
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_text_hidden_matches_transformers(model):
    llm, hf = model["llm"], model["torch"]
    _, _, ids, mask = inputs(model, seed=1)
    got = np.asarray(jax.jit(llm.text_hidden)(model["params"], jnp.asarray(ids), jnp.asarray(mask)))
    kw = dict(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))
    with torch.no_grad():
        body = {"t5": lambda: hf.encoder, "opt": lambda: hf.model.decoder,
                "llama": lambda: hf.model}[model["family"]]()
        want = body(**kw).last_hidden_state.numpy()
    real = mask > 0
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)


def test_caption_loss_bad_inputs(model):
    llm = model["llm"]
    prefix, prompt, ids, mask = inputs(model)
    with pytest.raises(ValueError, match="word-embedding width"):
        llm.caption_loss(model["params"], jnp.asarray(prefix[..., :3]), prompt, ids, mask)
    with pytest.raises(ValueError, match="one prompt for the batch"):
        llm.caption_loss(model["params"], jnp.asarray(prefix), np.stack([prompt] * 3), ids, mask)


# --- generate ----------------------------------------------------------------------------------


def hf_row(m, prefix_row, prompt, eos, **kw):
    """transformers' new tokens for ONE unpadded row [prefix ; prompt], padded to NEW with pad."""
    hf, llm = m["torch"], m["llm"]
    embeds = np.concatenate([prefix_row, torch_words(hf)[np.asarray(prompt, np.int64)]], 0)[None]
    with torch.no_grad():
        out = hf.generate(inputs_embeds=torch.as_tensor(embeds),
                          attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                          pad_token_id=llm.pad_token_id, **kw).numpy()[0]
    if m["family"] == "t5":
        out = out[1:]  # the decoder-start token
    return np.pad(out, (0, NEW - len(out)), constant_values=llm.pad_token_id)


_GEN_CASES = {}


def gen_case(models, name):
    """(model, prefix [3, 4, D], three prompts of different lengths, EOS, FrozenLLM stopping at
    it): EOS is the token row 0 greedily produces at step 2 when nothing stops it, so row 0 ends
    early. Cached per model (the jitted searches then compile once per model)."""
    m = models(name)
    if name not in _GEN_CASES:
        rng = np.random.RandomState(7)
        prefix = rng.normal(0, 1, (3, PREFIX, m["llm"].embed_dim)).astype(np.float32)
        prompts = [rng.randint(3, m["vocab"], n).tolist() for n in PROMPT_LENGTHS]
        free = hf_row(m, prefix[0], prompts[0], eos=m["vocab"] + 1)  # never emitted
        eos = int(free[2])
        llm = vlap_llm.make_llm(m["family"], m["llm"].module, None, eos_token_id=eos)
        _GEN_CASES[name] = (prefix, prompts, eos, llm)
    return (m, *_GEN_CASES[name])


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("name", GEN_MODELS)
def test_generate_matches_transformers_row_by_row(models, name, beams):
    m, prefix, prompts, eos, llm = gen_case(models, name)
    kw = {} if beams == 1 else dict(num_beams=3)
    want = np.stack([hf_row(m, prefix[i], prompts[i], eos, **kw) for i in range(3)])
    got = llm.generate(m["params"], prefix, prompts, max_new_tokens=NEW, num_beams=beams)
    assert got.shape == (3, NEW) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    if beams == 1:
        assert eos in want[0, :3]  # row 0 really stops early; after it, padding
        assert (want[0, list(want[0]).index(eos) + 1:] == llm.pad_token_id).all()


@pytest.mark.parametrize("name", ["opt", "t5_gated"])
def test_generate_reuses_compilations(models, name):
    """Prompt lengths that round up to the same multiple of 8 reuse the jitted search."""
    from lqae_vlap.models import generate as gen_lib

    m, prefix, prompts, _, llm = gen_case(models, name)
    jitted = t5.greedy_generate if m["family"] == "t5" else gen_lib._greedy
    before = jitted._cache_size()
    shorter = [p[:1] for p in prompts[:2]] + [prompts[2] * 2]  # lengths 1, 1, 10 -> 16 slots
    llm.generate(m["params"], prefix, shorter, max_new_tokens=NEW)
    llm.generate(m["params"], prefix, [p + [5] for p in shorter], max_new_tokens=NEW)
    assert jitted._cache_size() == before + 1  # 16 slots once; the second call hit the cache


def test_generate_bad_inputs(models):
    m, prefix, prompts, _, llm = gen_case(models, "opt")
    with pytest.raises(ValueError, match="list of 3 token-id lists"):
        llm.generate(m["params"], prefix, prompts[:2], max_new_tokens=NEW)
    with pytest.raises(ValueError, match="prefix must be"):
        llm.generate(m["params"], prefix[..., :5], prompts, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="at least one prompt token"):
        llm.generate(m["params"], prefix, [[], [4], [5]], max_new_tokens=NEW)


# --- interleaved rows (few-shot VQA) -----------------------------------------------------------


def interleaved_case(m, seed=3):
    """Three rows [block ; text ; block ; text] with texts of different lengths (a 2-image
    few-shot prompt): the segments and each row's unpadded embeddings [n, D] (NumPy)."""
    rng = np.random.RandomState(seed)
    d, words = m["llm"].embed_dim, torch_words(m["torch"])
    rows, flat = [], []
    for a, b in ((2, 3), (5, 1), (1, 4)):
        p1, p2 = (rng.normal(0, 1, (PREFIX, d)).astype(np.float32) for _ in range(2))
        t1, t2 = (rng.randint(3, m["vocab"], n).tolist() for n in (a, b))
        rows.append([p1, t1, p2, t2])
        flat.append(np.concatenate([p1, words[t1], p2, words[t2]], 0))
    return rows, flat


@pytest.mark.parametrize("name", ["opt", "t5_gated"])
def test_embed_segments_pads_each_row_as_a_whole(models, name):
    m = models(name)
    rows, flat = interleaved_case(m)
    embeds, mask = m["llm"].embed_segments(m["params"], rows)
    lengths = [len(f) for f in flat]  # 15, 14, 13 -> 16 slots
    assert embeds.shape == (3, 16, m["llm"].embed_dim) and mask.shape == (3, 16)
    for b, n in enumerate(lengths):
        real = slice(16 - n, 16) if m["family"] != "t5" else slice(0, n)  # left / right padding
        np.testing.assert_array_equal(mask[b, real], 1)
        assert mask[b].sum() == n
        np.testing.assert_allclose(np.asarray(embeds[b, real]), flat[b], rtol=0, atol=0)
    with pytest.raises(ValueError, match="embedded segment must be"):
        m["llm"].embed_segments(m["params"], [[np.zeros((2, 5), np.float32), [4]]])


@pytest.mark.parametrize("name,beams", [("opt", 1), ("llama", 1), ("t5_gated", 1), ("opt", 3),
                                        ("t5_gated", 3)])
def test_generate_interleaved_matches_transformers_row_by_row(models, name, beams):
    """One padded batch of interleaved rows == transformers on each unpadded row alone."""
    m, _, _, eos, llm = gen_case(models, name)
    rows, flat = interleaved_case(m)
    kw = {} if beams == 1 else dict(num_beams=3)
    want = []
    for f in flat:
        with torch.no_grad():
            out = m["torch"].generate(inputs_embeds=torch.as_tensor(f[None]),
                                      attention_mask=torch.ones((1, len(f)), dtype=torch.long),
                                      do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                                      pad_token_id=llm.pad_token_id, **kw).numpy()[0]
        out = out[1:] if m["family"] == "t5" else out
        want.append(np.pad(out, (0, NEW - len(out)), constant_values=llm.pad_token_id))
    got = llm.generate_interleaved(m["params"], rows, max_new_tokens=NEW, num_beams=beams)
    np.testing.assert_array_equal(got, np.stack(want))


def test_pad_prompts_sides_and_rounding():
    ids, mask = vlap_llm.pad_prompts([[5, 6, 7], [8]], 0, left=True)
    np.testing.assert_array_equal(ids, [[0] * 5 + [5, 6, 7], [0] * 7 + [8]])
    np.testing.assert_array_equal(mask, [[0] * 5 + [1] * 3, [0] * 7 + [1]])
    ids, mask = vlap_llm.pad_prompts([[5] * 9, []], 1, left=False)
    assert ids.shape == (2, 16) and mask.sum(1).tolist() == [9, 0]
    np.testing.assert_array_equal(ids[0], [5] * 9 + [1] * 7)


def test_make_llm_rejects_unknown_family(models):
    with pytest.raises(ValueError, match="family 'gpt'"):
        vlap_llm.make_llm("gpt", models("opt")["llm"].module, None)


# --- VLAP with a tiny T5 -------------------------------------------------------------------------


def t5_config(folder, **overrides):
    return demo_config(folder, **{"model.llm_family": "t5", **overrides})


@pytest.fixture(scope="module")
def built_t5(tiny_t5_dir):
    """Builds VLAP with the tiny T5 in float32 and bfloat16; one (loss, aux), grads each."""
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    out = {}
    for dtype in ("float32", "bfloat16"):
        config = t5_config(tiny_t5_dir, **{"model.llm_dtype": dtype, **SMALL_EVAL})
        method = vlap.build(config, mesh)
        if dtype == "float32":
            params = jax.device_get(sharding.unbox(method.init_params(jax.random.PRNGKey(0))))
            params = jax.tree.map(lambda x: np.asarray(x) + 0.3, params)  # a prefix that matters
            batch = method.train_batches.batch_at(0)
        (loss, aux), grads = jax.jit(jax.value_and_grad(method.loss_fn, has_aux=True))(
            params, method.frozen, batch, jax.random.PRNGKey(0))
        out[dtype] = dict(config=config, method=method, loss=loss, aux=aux, grads=grads)
    return out, params, batch


def test_vlap_t5_parts_and_loss(built_t5):
    runs, _, _ = built_t5
    r = runs["float32"]
    method = r["method"]
    llm = method.loss_fn.keywords["llm"]
    assert isinstance(llm, vlap_llm.EncoderDecoderLLM) and llm.eos_token_id == 102
    assert set(method.frozen) == {"llm", "vision", "prompt_ids", "word_marginal"}
    assert "shared" in method.frozen["llm"]
    np.testing.assert_array_equal(method.frozen["prompt_ids"], [1037, 3861, 1997])  # a picture of
    # L_cap itself is checked against transformers above; here the weighting.
    np.testing.assert_allclose(float(r["loss"]), r["config"].loss.map * float(r["aux"]["map"])
                               + r["config"].loss.cap * float(r["aux"]["cap"]), rtol=1e-6)
    parts = vlap.build_parts(r["config"], sharding.make_mesh({"data": -1}, jax.devices()[:1]),
                             abstract=True)
    assert parts["llm"].family == "t5" and parts["llm"].tokenizer is None
    assert parts["visual_map"].llm_width == 32 and parts["vision_width"] == 24


def test_vlap_t5_gradients_reach_only_the_dense(built_t5):
    runs, params, _ = built_t5
    grads = runs["float32"]["grads"]
    assert jax.tree.structure(grads) == jax.tree.structure(params)  # the Dense, nothing else
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0


def test_bfloat16_llm_close_to_float32(built_t5):
    runs, _, _ = built_t5
    r32, r16 = runs["float32"], runs["bfloat16"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(r16["method"].frozen["llm"]))
    assert r16["loss"].dtype == jnp.float32 and np.isfinite(float(r16["loss"]))
    np.testing.assert_allclose(float(r16["loss"]), float(r32["loss"]), rtol=5e-3)
    np.testing.assert_allclose(float(r16["aux"]["cap"]), float(r32["aux"]["cap"]), rtol=5e-3)
    for a, b in zip(jax.tree.leaves(r16["grads"]), jax.tree.leaves(r32["grads"])):
        assert a.dtype == b.dtype == jnp.float32 and np.all(np.isfinite(a))
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b)


def test_decode_cuts_at_eos(built_t5):
    runs, _, _ = built_t5
    llm = runs["float32"]["method"].loss_fn.keywords["llm"]
    tok = llm.tokenizer
    words = tok("a handwritten   digit", add_special_tokens=False)["input_ids"]
    seven = tok("seven", add_special_tokens=False)["input_ids"]
    rows = np.full((2, 12), llm.pad_token_id, np.int32)
    rows[0, :len(words) + 2 + len(seven)] = words + [llm.eos_token_id, seven[0]] + seven
    rows[1, :1 + len(seven)] = [tok.cls_token_id] + seven  # no EOS: the whole row, specials gone
    assert llm.decode(rows) == ["a handwritten digit", "seven"]


def test_vlap_t5_evaluate_runs_every_evaluation(built_t5, tmp_path):
    runs, params, _ = built_t5
    config, method = runs["float32"]["config"], runs["float32"]["method"]
    check_evaluation(config, method, params, tmp_path)


def test_vlap_t5_sharded_step_matches_one_device(tiny_t5_dir):
    assert_sharded_step_matches_one_device(t5_config(tiny_t5_dir, **{"data.batch_size": 8}),
                                           build=vlap.build)


# --- plan mode and the T5 presets ---------------------------------------------------------------


def test_abstract_t5_equals_the_real_load(tiny_t5_dir, tmp_path):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)  # noqa: E731
    _, real, _ = t5.load(tiny_t5_dir, mesh=mesh)
    config = t5_config(tiny_t5_dir)
    abstract = vlap.build(config, mesh, abstract=True)
    assert spec(abstract.frozen["llm"]) == spec(real["params"])
    assert abstract.frozen["prompt_ids"].shape == (3,)
    # From the architecture alone (no folder): the same tree.
    hf_config = hf_weights.read_hf_config(tiny_t5_dir)
    config.model.llm_path = "nonexistent-org/tiny-t5"
    config.model.llm_arch = {k: v for k, v in hf_config.to_dict().items()
                             if k in ("model_type", "vocab_size", "d_model", "d_kv", "d_ff",
                                      "num_layers", "num_heads", "feed_forward_proj",
                                      "relative_attention_num_buckets",
                                      "relative_attention_max_distance")}
    config.model.prompt_len = 3
    assert spec(vlap.build(config, mesh, abstract=True).frozen["llm"]) == spec(real["params"])


@pytest.mark.parametrize("name", ["t5-base", "google/flan-t5-base"])
def test_t5_presets_match_transformers_parameter_counts(name):
    """The presets' architectures give transformers' parameter count (built on the meta device:
    no memory) and the abstract tree has exactly that many parameters."""
    import transformers

    config = load_config(f"vlap_t5:{name}")
    arch = config.model.llm_arch.to_dict()
    hf_config = transformers.AutoConfig.for_model(**arch)
    with torch.device("meta"):
        ref = transformers.T5ForConditionalGeneration(hf_config)
    want = sum(p.numel() for p in ref.parameters())  # tied tensors are counted once
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    llm, params = vlap_llm.load_llm(config.model, one, abstract=True)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == want
    assert llm.embed_dim == 768 and llm.family == "t5"
    assert config.optim.lr == 1e-2


# --- memory levers: rematerialisation and the chunked caption loss ------------------------------
# Each equals the unoptimised path (remat 'none', full logits) in float32: loss rtol 1e-6,
# gradient w.r.t. the prefix rtol 1e-5 + atol 1e-6 (observed <= 1.2e-6 absolute: one float32 ulp
# of the largest entries, from XLA reordering the recomputed sums).


@pytest.mark.parametrize("remat,chunk", [("full", 0), ("dots", 0), ("none", 3), ("full", 2)])
def test_remat_and_chunked_caption_loss_equal_the_plain_path(model, remat, chunk):
    prefix, prompt, ids, mask = map(jnp.asarray, inputs(model))
    plain = model["llm"]
    lever = vlap_llm.make_llm(model["family"], plain.module, None, remat=remat, loss_chunk=chunk)

    def run(llm):
        return jax.jit(jax.value_and_grad(
            lambda p: llm.caption_loss(model["params"], p, prompt, ids, mask)))(prefix)

    want, want_grad = run(plain)
    got, got_grad = run(lever)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-5, atol=1e-6)


def test_remat_recomputes_in_the_backward_pass(models):
    """The levers really change the compiled step: 'full' adds FLOPs (the recomputed forward)."""
    m = models("opt")
    prefix, prompt, ids, mask = map(jnp.asarray, inputs(m))

    def flops(remat):
        llm = vlap_llm.make_llm("opt", m["llm"].module, None, remat=remat)
        step = jax.jit(jax.grad(lambda p: llm.caption_loss(m["params"], p, prompt, ids, mask)))
        cost = step.lower(prefix).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    assert flops("full") > 1.1 * flops("none")


def test_bad_memory_settings_are_named(models):
    module = models("opt")["llm"].module
    with pytest.raises(ValueError, match="llm_remat='auto' is for plan mode"):
        vlap_llm.make_llm("opt", module, None, remat="auto")
    with pytest.raises(ValueError, match="llm_remat='some'"):
        vlap_llm.make_llm("opt", module, None, remat="some")
    with pytest.raises(ValueError, match="caption_loss_chunk=-1"):
        vlap_llm.make_llm("opt", module, None, loss_chunk=-1)
