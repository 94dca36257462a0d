"""MaskedLM against transformers' PyTorch BERT / RoBERTa (the parity reference), float32, atol 1e-4.

Speed: every tiny-model test runs eagerly on the same [3, 9] batch so JAX's per-op compile cache
is shared across tests (a fresh jax.jit would cost ~2 s of compiling per test on 2 cores); error
checks trace with jax.eval_shape and compile nothing.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertModel, GPT2Config

from lqae_vlap.models import load_tokenizer, roberta
from lqae_vlap.models.roberta import EncoderLMConfig, MaskedLM, word_embedding_matrix
from tests.helpers import (ALLOWED_AXES, MASKED_LM_TINY as TINY,
                           assert_real_close as assert_real_tokens_close,
                           masked_lm_batch as padded_batch, masked_lm_torch_run as torch_run,
                           minilm_dir, tiny_masked_lm)


def save_tiny(tmp_path: Path, kind: str, **overrides) -> tuple[Path, torch.nn.Module]:
    model = tiny_masked_lm(kind, **overrides)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    return folder, model


BATCH, LENGTH = 3, 9  # masked_lm_batch's shape


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_padded_batch_matches_pytorch(tmp_path, kind):
    folder, model = save_tiny(tmp_path, kind)
    # The head is tied: the saved file has no decoder weight, so the loader must reuse the embeddings.
    with safe_open(folder / "model.safetensors", "np") as f:
        assert not any("decoder.weight" in k for k in f.keys())
    module, variables, hf_config = roberta.load(folder)
    assert module.config.has_lm_head and module.config.model_type == kind
    ids, mask, types = padded_batch(hf_config.pad_token_id)
    kw = dict(input_ids=ids, attention_mask=mask)
    if kind == "bert":
        kw["token_type_ids"] = types
    hidden, logits = torch_run(model, **kw)
    out = module.apply(variables, **{k: jnp.asarray(v) for k, v in kw.items()})
    assert out["last_hidden_state"].shape == (3, 9, 32) and out["logits"].shape == (3, 9, 100)
    assert_real_tokens_close(out["last_hidden_state"], hidden, mask)
    assert_real_tokens_close(out["logits"], logits, mask)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_every_hidden_state_matches_pytorch(tmp_path, kind):
    folder, model = save_tiny(tmp_path, kind)
    module, variables, hf_config = roberta.load(folder)
    ids, mask, _ = padded_batch(hf_config.pad_token_id)
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     output_hidden_states=True).hidden_states
    got = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                       with_lm_head=False, output_hidden_states=True)["hidden_states"]
    assert len(got) == len(want) == hf_config.num_hidden_layers + 1
    for g, w in zip(got, want):
        assert_real_tokens_close(g, w.numpy(), mask)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_inputs_embeds_matches_pytorch(tmp_path, kind):
    folder, model = save_tiny(tmp_path, kind)
    module, variables, _ = roberta.load(folder)
    embeds = np.random.RandomState(2).normal(0, 0.5, size=(BATCH, LENGTH, 32)).astype(np.float32)
    _, mask, _ = padded_batch(0)
    hidden, logits = torch_run(model, inputs_embeds=embeds, attention_mask=mask)
    out = module.apply(variables, inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(mask))
    assert_real_tokens_close(out["last_hidden_state"], hidden, mask)
    assert_real_tokens_close(out["logits"], logits, mask)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_looked_up_embeds_equal_input_ids(tmp_path, kind):
    # Without padding both position schemes agree between the two paths, so feeding the looked-up
    # codebook rows (what LQAE does) must reproduce the input_ids path exactly.
    folder, _ = save_tiny(tmp_path, kind)
    module, variables, _ = roberta.load(folder)
    ids = jnp.asarray(np.random.RandomState(3).randint(3, 100, size=(BATCH, LENGTH)))
    table = word_embedding_matrix(variables)
    assert table.shape == (100, 32)
    a = module.apply(variables, ids)
    b = module.apply(variables, inputs_embeds=table[ids])
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-6)


def test_untied_head_matches_pytorch(tmp_path):
    folder, model = save_tiny(tmp_path, "roberta", tie_word_embeddings=False)
    module, variables, hf_config = roberta.load(folder)
    assert "decoder" in variables["params"]["lm_head"]
    ids, mask, _ = padded_batch(hf_config.pad_token_id)
    _, logits = torch_run(model, input_ids=ids, attention_mask=mask)
    out = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert_real_tokens_close(out["logits"], logits, mask)


def test_every_weight_has_allowed_logical_axes():
    cfg = EncoderLMConfig(model_type="roberta", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                          tie_word_embeddings=False)
    boxed = jax.eval_shape(MaskedLM(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == 5 + 2 * 16 + 6  # embeddings, 2 layers, untied head
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert set(leaf.names) <= ALLOWED_AXES and len(leaf.names) == leaf.value.ndim, leaf.names


def test_bfloat16_forward_stays_close(tmp_path):
    folder, _ = save_tiny(tmp_path, "bert")
    ids, mask, _ = padded_batch(0)
    f32_module, f32_vars, _ = roberta.load(folder)
    bf_module, bf_vars, _ = roberta.load(folder, dtype=jnp.bfloat16)
    ref = f32_module.apply(f32_vars, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    # New dtype, so no cached eager ops: one jit compile is cheaper here.
    out = jax.jit(bf_module.apply)(bf_vars, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits (~0.4% per rounding); LayerNormed states are O(1).
    assert_real_tokens_close(out["last_hidden_state"].astype(jnp.float32),
                             np.asarray(ref["last_hidden_state"]), mask, atol=0.15)


def test_bad_calls_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="supported.*bert.*roberta"):
        EncoderLMConfig.from_hf(GPT2Config(n_layer=1))
    with pytest.raises(ValueError, match="model_type"):
        EncoderLMConfig(model_type="gpt2")
    cfg = EncoderLMConfig.from_hf(BertConfig(**TINY))
    module = MaskedLM(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), ids)
    apply = lambda *a, **kw: jax.eval_shape(lambda v: module.apply(v, *a, **kw), variables)  # noqa: E731
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        apply(ids, inputs_embeds=jnp.zeros((1, 4, 32)))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        apply()
    with pytest.raises(ValueError, match="exceeds the 40 positions"):
        apply(jnp.zeros((1, 41), jnp.int32))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, length, 32\]"):
        apply(inputs_embeds=jnp.zeros((1, 4, 16)))
    assert apply(ids)["logits"].shape == (1, 4, 100)  # the checks above are not blanket failures


def test_real_minilm_matches_bert_model():
    folder = minilm_dir()
    module, variables, _ = roberta.load(folder)
    assert not module.config.has_lm_head  # a plain BertModel checkpoint, keys without 'bert.'
    tok = load_tokenizer(folder)
    batch = tok(["A cat sits on the warm windowsill.", "Hello world"], padding=True, return_tensors="np")
    assert batch["attention_mask"].min() == 0  # the second sentence really is padded
    reference = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    apply = jax.jit(module.apply, static_argnames="with_lm_head")  # new shapes: one compile
    out = apply(variables, **{k: jnp.asarray(v) for k, v in batch.items()}, with_lm_head=False)
    assert_real_tokens_close(out["last_hidden_state"], expected, batch["attention_mask"])
    with pytest.raises(ValueError, match="no masked-LM head"):
        jax.eval_shape(module.apply, variables, jnp.asarray(batch["input_ids"]))


def test_logits_at_and_remat_equal_the_full_head(tmp_path):
    """logits_at gathers the head's positions (equal to the full logits there, atol 1e-6); every
    remat policy gives the same input gradients as 'none' (float32, relative L2 error < 1e-6;
    the gradient sums large terms of both signs, so single entries near 0 differ by ~2e-5 of the
    largest entries: float32 rounding of reordered sums)."""
    folder, _ = save_tiny(tmp_path, "roberta")
    module, variables, _ = roberta.load(folder)
    embeds = jnp.asarray(np.random.RandomState(3).normal(0, 0.5, (BATCH, LENGTH, 32)), jnp.float32)
    at = jnp.asarray(np.random.RandomState(4).randint(0, LENGTH, (BATCH, 4)), jnp.int32)
    full = module.apply(variables, inputs_embeds=embeds)["logits"]
    part = module.apply(variables, inputs_embeds=embeds, logits_at=at)["logits"]
    assert part.shape == (BATCH, 4, full.shape[-1])
    np.testing.assert_allclose(np.asarray(part),
                               np.take_along_axis(np.asarray(full), np.asarray(at)[..., None], 1),
                               atol=1e-6)

    def grad(policy):
        m = module.clone(remat=policy)
        return jax.jit(jax.grad(lambda e: jnp.sum(
            m.apply(variables, inputs_embeds=e, logits_at=at)["logits"] ** 2)))(embeds)

    want = grad("none")
    for policy in ("dots", "full"):
        got = np.asarray(grad(policy))
        assert np.linalg.norm(got - want) < 1e-6 * np.linalg.norm(want), policy
    with pytest.raises(ValueError, match="logits_at"):
        module.apply(variables, inputs_embeds=embeds, logits_at=at[0])
