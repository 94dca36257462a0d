"""T5 against transformers' PyTorch T5ForConditionalGeneration (the parity reference).

Two tiny random checkpoints (2 layers, d_model 32, d_kv 8, 4 heads, d_ff 64, vocab 128, 8 buckets):
  'relu':  original T5 (ReLU FFN, lm head tied to the shared embedding, d_model**-0.5 rescale);
  'gated': T5 v1.1 / Flan-T5 (gated-gelu FFN, own lm_head, no rescale).
float32 logits within 1e-4 (observed ~1e-5); decoding tokens must be identical. Each checkpoint is
built and loaded once per module; every jitted function is traced once per variant.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import BertConfig, T5Config as HFT5Config

from lqae_vlap.models import t5
from lqae_vlap.models.t5 import T5, T5Config, embed_tokens, init_cache
from tests.helpers import (ALLOWED_AXES, T5_MAX_NEW as MAX_NEW, T5_TINY as TINY,
                           T5_VARIANTS as VARIANTS, T5_VOCAB as VOCAB,
                           t5_encoder_batch as encoder_batch, tiny_t5)

ATOL = 1e-4


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    model = tiny_t5(kind, folder)
    module, variables, hf_config = t5.load(folder)
    return dict(kind=kind, folder=folder, torch=model, module=module, variables=variables,
                hf_config=hf_config, apply=jax.jit(module.apply))


def torch_forward(model, ids, mask, dec):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    decoder_input_ids=torch.as_tensor(dec))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def decoder_batch(seed: int = 2) -> np.ndarray:
    dec = np.random.RandomState(seed).randint(2, VOCAB, size=(3, 6))
    dec[:, 0] = 0
    return dec


def test_checkpoint_layout_and_tying(variant):
    keys = set(load_file(variant["folder"] / "model.safetensors"))
    # tied copies are never stored; the loader must take them from shared.weight
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    cfg = variant["module"].config
    params = variant["variables"]["params"]
    if variant["kind"] == "relu":
        assert "lm_head.weight" not in keys and cfg.tie_word_embeddings and cfg.scale_decoder_outputs
        assert "lm_head" not in params
    else:
        assert "lm_head.weight" in keys and not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs
        np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                      variant["torch"].lm_head.weight.detach().numpy().T)
    assert cfg.activation == ("relu" if variant["kind"] == "relu" else "gelu_new")


def prefixed_inputs(variables, ids, mask, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VLAP's encoder input: 2 free vectors (a visual prefix) then the text's own embeddings.

    Returns prefix [3, 2, 32], embeds [3, 11, 32] and the mask [3, 11]."""
    prefix = np.random.RandomState(seed).normal(0, 1, size=(3, 2, 32)).astype(np.float32)
    embeds = np.concatenate([prefix, np.asarray(embed_tokens(variables, jnp.asarray(ids)))], 1)
    return prefix, embeds, np.concatenate([np.ones((3, 2), mask.dtype), mask], 1)


def test_forward_matches_pytorch_with_padding(variant):
    # 'relu' runs from token ids, 'gated' from inputs_embeds with a prefix (one compile each).
    ids, mask = encoder_batch()
    dec = decoder_batch()
    if variant["kind"] == "relu":
        enc_ref, logits_ref = torch_forward(variant["torch"], ids, mask, dec)
        out = variant["apply"](variant["variables"], jnp.asarray(ids), jnp.asarray(dec),
                               attention_mask=jnp.asarray(mask))
    else:
        _, embeds, mask = prefixed_inputs(variant["variables"], ids, mask)
        with torch.no_grad():
            ref = variant["torch"](inputs_embeds=torch.as_tensor(embeds), attention_mask=torch.as_tensor(mask),
                                   decoder_input_ids=torch.as_tensor(dec))
        enc_ref, logits_ref = ref.encoder_last_hidden_state.numpy(), ref.logits.numpy()
        out = variant["apply"](variant["variables"], None, jnp.asarray(dec), inputs_embeds=jnp.asarray(embeds),
                               attention_mask=jnp.asarray(mask))
    assert out["logits"].shape == (3, 6, VOCAB) and out["logits"].dtype == jnp.float32
    real = mask.astype(bool)  # padded encoder positions are unspecified in both frameworks
    assert (~real).sum() >= 9  # padding really is present
    np.testing.assert_allclose(np.asarray(out["encoder_hidden"])[real], enc_ref[real], rtol=0, atol=ATOL)
    # every decoder position is real; the encoder padding enters through cross-attention
    np.testing.assert_allclose(out["logits"], logits_ref, rtol=0, atol=ATOL)
    assert np.abs(logits_ref).max() > 1.0  # the comparison is not between near-zero numbers


def test_cached_decoding_equals_full_forward(variant):
    module, variables = variant["module"], variant["variables"]
    ids, mask = encoder_batch()
    dec = decoder_batch()
    full = variant["apply"](variables, jnp.asarray(ids), jnp.asarray(dec), attention_mask=jnp.asarray(mask))
    enc = full["encoder_hidden"]
    cross = module.apply(variables, enc, method=T5.cross_key_values)
    step = jax.jit(lambda v, tok, cache, i: module.apply(v, tok, None, jnp.asarray(mask), cache=cache,
                                                         cache_index=i, cross_kv=cross, method=T5.decode))
    cache = init_cache(module.config, 3, 8, jnp.float32)  # longer than needed: unwritten slots unseen
    # chunks of 2 tokens (one compile) test multi-token writes at an offset; greedy and beam search
    # below cover single-token steps against transformers
    pieces = []
    for i in range(0, dec.shape[1], 2):
        out = step(variables, jnp.asarray(dec[:, i:i + 2]), cache, jnp.int32(i))
        pieces.append(out["logits"])
        cache = out["cache"]
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full["logits"], rtol=0, atol=1e-5)
    assert cache[0]["key"].shape == (3, 8, 4, 8)


def hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              do_sample=False, max_new_tokens=MAX_NEW, **kw)


def test_greedy_matches_transformers(variant):
    # 'relu' from token ids, 'gated' with an encoder prefix_embeds (VLAP's captioning path)
    ids, mask = encoder_batch()
    if variant["kind"] == "relu":
        prefix = None
        ref = hf_generate(variant["torch"], ids, mask).numpy()
    else:
        prefix, embeds, full_mask = prefixed_inputs(variant["variables"], ids, mask, seed=4)
        with torch.no_grad():
            ref = variant["torch"].generate(inputs_embeds=torch.as_tensor(embeds),
                                            attention_mask=torch.as_tensor(full_mask),
                                            do_sample=False, max_new_tokens=MAX_NEW).numpy()
        prefix = jnp.asarray(prefix)
    out = t5.greedy_generate(variant["module"], variant["variables"], jnp.asarray(ids), jnp.asarray(mask),
                             max_new_tokens=MAX_NEW, prefix_embeds=prefix)
    seqs, steps = np.asarray(out["sequences"]), int(out["num_steps"])
    eos = variant["module"].config.eos_token_id
    assert seqs.shape == (3, 1 + MAX_NEW) and (ref == eos).any(axis=1).sum() >= 1  # some row stops early
    assert steps == ref.shape[1] - 1
    np.testing.assert_array_equal(seqs[:, :ref.shape[1]], ref)
    assert (seqs[:, ref.shape[1]:] == 0).all()


def check_beam_search(variant, ids, mask, beams: int = 3, **options) -> tuple[int, int, int]:
    """Compares every returned hypothesis and score; returns (hypotheses ending on EOS, HF length,
    our decoder steps run). options: beam-search settings given to both (early_stopping,
    length_penalty, eos_token_id)."""
    ref = hf_generate(variant["torch"], ids, mask, num_beams=beams, num_return_sequences=beams,
                      output_scores=True, return_dict_in_generate=True, **options)
    ref_seqs = ref.sequences.numpy().reshape(3, beams, -1)
    ref_scores = ref.sequences_scores.numpy().reshape(3, beams)
    out = t5.beam_search(variant["module"], variant["variables"], jnp.asarray(ids), jnp.asarray(mask),
                         max_new_tokens=MAX_NEW, num_beams=beams, **options)
    seqs, scores = np.asarray(out["sequences"]), np.asarray(out["scores"])
    assert seqs.shape == (3, beams, 1 + MAX_NEW)
    eos = options.get("eos_token_id", variant["module"].config.eos_token_id)
    eos = set(eos) if isinstance(eos, list) else {eos}
    ended_early = 0
    for b in range(3):
        for k in range(beams):
            row = list(ref_seqs[b, k])
            # transformers fills after EOS with EOS (or pad); compare up to and including the
            # first EOS
            ends = [i for i, t in enumerate(row) if i >= 1 and t in eos]
            n = ends[0] + 1 if ends else len(row)
            ended_early += bool(ends)
            np.testing.assert_array_equal(seqs[b, k, :n], ref_seqs[b, k, :n], err_msg=f"example {b} beam {k}")
            assert (seqs[b, k, n:] == 0).all()
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=ATOL)
    return ended_early, ref_seqs.shape[-1], int(out["num_steps"])


def test_beam_search_matches_transformers(variant):
    ids, mask = encoder_batch()
    ended_early, _, _ = check_beam_search(variant, ids, mask)
    assert ended_early > 0  # some hypotheses finished on EOS, others ran to the length limit
    # Example 1 repeated (same shapes: no recompile). For 'gated' every example can stop early, so
    # transformers' "no running beam can beat the finished ones" heuristic ends the search.
    _, length, steps = check_beam_search(variant, ids[[1, 1, 1]], mask[[1, 1, 1]])
    if variant["kind"] == "gated":
        assert length < 1 + MAX_NEW and length - 1 <= steps < MAX_NEW


@pytest.mark.parametrize("options", [
    dict(early_stopping=True, length_penalty=2.0),
    dict(early_stopping="never", length_penalty=2.0),
    dict(early_stopping="never", length_penalty=0.5),
    dict(early_stopping=False, length_penalty=-1.0),
])
def test_beam_search_options_match_transformers(variant, options):
    """The shared beam step (models/generate.py) gives T5 transformers' early_stopping modes and
    length penalties, and several EOS ids: a second, common token ends hypotheses too."""
    ids, mask = encoder_batch()
    check_beam_search(variant, ids, mask, **options)
    _, _, steps = check_beam_search(variant, ids[[1, 1, 1]], mask[[1, 1, 1]], **options)
    if variant["kind"] == "gated" and options["early_stopping"] is True:
        assert steps < MAX_NEW  # stopped once num_beams hypotheses were finished
    if variant["kind"] == "gated" and options == dict(early_stopping="never", length_penalty=2.0):
        # 'never' with a penalty that favours length bounds the running beams at the longest
        # length, so it searches on where False (the bound at the current length) stops.
        _, _, steps_false = check_beam_search(variant, ids[[1, 1, 1]], mask[[1, 1, 1]],
                                              early_stopping=False, length_penalty=2.0)
        assert steps_false < steps
    # A frequent token of the search as a second EOS id: more hypotheses end on an EOS id.
    eos = variant["module"].config.eos_token_id
    plain = t5.beam_search(variant["module"], variant["variables"], jnp.asarray(ids),
                           jnp.asarray(mask), max_new_tokens=MAX_NEW, num_beams=3)
    tokens = np.asarray(plain["sequences"])[:, :, 1:].ravel()
    common = int(np.bincount(tokens[tokens != eos]).argmax())
    ended, _, _ = check_beam_search(variant, ids, mask, eos_token_id=[eos, common], **options)
    assert ended > 0


def test_bfloat16_stays_close(variant):
    if variant["kind"] != "gated":
        pytest.skip("one variant is enough: gated has the larger logits (untied head, no rescale)")
    ids, mask = encoder_batch()
    dec = decoder_batch()
    module, variables, _ = t5.load(variant["folder"], dtype=jnp.bfloat16)
    assert jax.tree.leaves(variables)[0].dtype == jnp.bfloat16
    out = jax.jit(module.apply)(variables, jnp.asarray(ids), jnp.asarray(dec), attention_mask=jnp.asarray(mask))
    _, ref = torch_forward(variant["torch"], ids, mask, dec)
    # bfloat16 keeps 8 mantissa bits (~0.4% per rounding; one ulp is 0.125 at |logit| 28 here),
    # compounded over 4 blocks and the head: we allow a max error of 10% of the largest |logit| and a
    # mean error of 2%, and require the top prediction to survive for most positions.
    err, scale = np.abs(np.asarray(out["logits"]) - ref), np.abs(ref).max()
    assert err.max() < 0.1 * scale and err.mean() < 0.02 * scale, (err.max(), err.mean(), scale)
    agree = (np.asarray(out["logits"]).argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.8, agree


def test_every_weight_has_allowed_logical_axes():
    for kind in VARIANTS:
        cfg = T5Config.from_hf(HFT5Config(**TINY, **VARIANTS[kind]),
                               tie_word_embeddings=VARIANTS[kind]["tie_word_embeddings"])
        leaves = jax.tree.leaves(t5.abstract_params(T5(cfg)),
                                 is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        n_ffn = 3 if kind == "gated" else 2
        # shared, 2 bias tables, 2 final norms; per block: attentions (q,k,v,o + norm), FFN + norm
        expected = 1 + 2 + 2 + 2 * (4 + 1 + n_ffn + 1) + 2 * (2 * 5 + n_ffn + 1) + (kind == "gated")
        assert len(leaves) == expected, (kind, len(leaves))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert set(leaf.names) <= ALLOWED_AXES and len(leaf.names) == leaf.value.ndim, leaf.names
            assert len(set(leaf.names)) == len(leaf.names), leaf.names


def test_load_errors_name_missing_and_unexpected_keys(variant, tmp_path):
    if variant["kind"] != "gated":
        pytest.skip("one variant is enough")
    state = load_file(variant["folder"] / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((variant["folder"] / "config.json").read_text())
    state.pop("decoder.block.1.layer.1.EncDecAttention.k.weight")
    state["decoder.block.9.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys.*decoder\.block\.1\.layer\.1\.EncDecAttention\.k\.weight"
                                         r".*unexpected keys.*decoder\.block\.9\.extra\.weight"):
        t5.load(broken)


def test_bad_calls_raise_clear_errors(variant):
    if variant["kind"] != "relu":
        pytest.skip("one variant is enough")
    with pytest.raises(ValueError, match="not a T5 checkpoint"):
        T5Config.from_hf(BertConfig())
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-swishy")
    module, variables = variant["module"], variant["variables"]
    ids = jnp.zeros((2, 4), jnp.int32)
    shape_of = lambda f: jax.eval_shape(f, variables)  # noqa: E731  (traces, compiles nothing)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        shape_of(lambda v: module.apply(v, ids, inputs_embeds=jnp.zeros((2, 4, 32)), method=T5.encode))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, length, 32\]"):
        shape_of(lambda v: module.apply(v, None, inputs_embeds=jnp.zeros((2, 4, 16)), method=T5.encode))
    with pytest.raises(ValueError, match="needs cache_index"):
        shape_of(lambda v: module.apply(v, ids, jnp.zeros((2, 4, 32)), jnp.ones((2, 4)),
                                        cache=init_cache(module.config, 2, 4), method=T5.decode))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        shape_of(lambda v: module.apply(v, ids))
    with pytest.raises(ValueError, match=r"prefix_embeds must be \[2, prefix, 32\]"):
        t5.greedy_generate(module, variables, ids, max_new_tokens=2, prefix_embeds=jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        t5.beam_search(module, variables, ids, max_new_tokens=0, num_beams=2)
    # the checks above are not blanket failures
    assert shape_of(lambda v: module.apply(v, ids, ids))["logits"].shape == (2, 4, VOCAB)
