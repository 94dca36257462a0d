"""OPTForCausalLM against transformers' PyTorch OPT (the parity reference), float32, atol 1e-4.

Two tiny random layouts: pre-LayerNorm (OPT-125m/1.3b style) and post-LayerNorm with
project_in/project_out (the opt-350m style). Models are built once per module; forward passes
run eagerly on one batch shape so JAX's per-op compile cache is shared between tests.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import OPTConfig as HFOPTConfig

from lqae_vlap.models import opt
from tests.helpers import ALLOWED_AXES, OPT_TINY as TINY, assert_real_close, tiny_opt

ATOL = 1e-4  # float32 parity with PyTorch; observed differences are ~2e-6
LAYOUTS = {"pre_ln": {}, "post_ln_proj": dict(word_embed_proj_dim=16, do_layer_norm_before=False)}
BATCH, LENGTH = 3, 9


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{layout: (folder, torch model, module, variables)} for both OPT layouts."""
    out = {}
    for name, overrides in LAYOUTS.items():
        folder = tmp_path_factory.mktemp(name)
        model = tiny_opt(**overrides)
        model.save_pretrained(folder)
        module, variables, _ = opt.load(folder)
        out[name] = (folder, model, module, variables)
    return out


def padded_batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids [3, 9] (rows 1 and 2 padded, as generation batches are) and the mask."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, TINY["vocab_size"], size=(BATCH, LENGTH))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = TINY["pad_token_id"]
    return ids, mask


def torch_run(model, **kw) -> tuple[np.ndarray, np.ndarray]:
    kw = {k: torch.as_tensor(v) for k, v in kw.items()}
    with torch.no_grad():
        hidden = model.model.decoder(**kw).last_hidden_state.numpy()
        logits = model(**kw).logits.numpy()
    return hidden, logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_padded_batch_matches_pytorch(models, layout):
    _, model, module, variables = models[layout]
    assert module.config.projects == (layout == "post_ln_proj")
    ids, mask = padded_batch()
    hidden, logits = torch_run(model, input_ids=ids, attention_mask=mask)
    out = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    width = module.config.word_embed_proj_dim
    assert out["logits"].shape == (3, 9, 100) and out["logits"].dtype == jnp.float32
    assert out["hidden_states"].shape == (3, 9, width) and out["cache"] is None
    assert_real_close(out["hidden_states"], hidden, mask)
    assert_real_close(out["logits"], logits, mask)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_to_keep_matches_pytorch(models, layout):
    """Only the last n positions' logits (what generation's prefill asks for), as HF computes them."""
    _, model, module, variables = models[layout]
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         logits_to_keep=2).logits.numpy()
    out = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                       logits_to_keep=2)
    assert out["logits"].shape == (BATCH, 2, 100) and expected.shape == (BATCH, 2, 100)
    assert out["hidden_states"].shape[1] == LENGTH  # the hidden states stay whole
    np.testing.assert_allclose(out["logits"], expected, rtol=0, atol=ATOL)  # last slots are real
    with pytest.raises(ValueError, match="logits_to_keep must be a Python int >= 0"):
        module.apply(variables, jnp.asarray(ids), logits_to_keep=-1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inputs_embeds_match_pytorch(models, layout):
    _, model, module, variables = models[layout]
    width = module.config.word_embed_proj_dim
    embeds = np.random.RandomState(2).normal(0, 0.5, size=(BATCH, LENGTH, width)).astype(np.float32)
    _, mask = padded_batch()
    _, logits = torch_run(model, inputs_embeds=embeds, attention_mask=mask)
    out = module.apply(variables, inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(mask))
    assert_real_close(out["logits"], logits, mask)
    # embed_tokens is the lookup the module itself uses.
    ids, _ = padded_batch()
    a = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))["logits"]
    b = module.apply(variables, inputs_embeds=opt.embed_tokens(variables, jnp.asarray(ids)),
                     attention_mask=jnp.asarray(mask))["logits"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_incremental_decoding_equals_full_forward(models, layout):
    _, _, module, variables = models[layout]
    ids, mask = padded_batch()
    full = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))["logits"]
    # Prefill the first 5 slots, then feed one token at a time with the whole-cache mask.
    cache = opt.init_cache(module.config, BATCH, LENGTH)
    cache_mask = jnp.asarray(mask)
    out = module.apply(variables, jnp.asarray(ids[:, :5]), attention_mask=cache_mask, cache=cache,
                       cache_index=jnp.int32(0))
    steps, cache = [out["logits"]], out["cache"]
    assert cache["layers_0"]["k"].shape == (BATCH, LENGTH, 4, 8)
    for i in range(5, LENGTH):
        out = module.apply(variables, jnp.asarray(ids[:, i:i + 1]), attention_mask=cache_mask,
                           cache=cache, cache_index=jnp.int32(i))
        steps.append(out["logits"])
        cache = out["cache"]
    assert_real_close(jnp.concatenate(steps, axis=1), np.asarray(full), mask)


def test_loader_ties_lm_head_and_reads_opt_model_prefix(models, tmp_path):
    folder, model, module, variables = models["pre_ln"]
    with safe_open(folder / "model.safetensors", "np") as f:
        keys = list(f.keys())
    assert "lm_head.weight" not in keys and "model.decoder.embed_tokens.weight" in keys
    assert module.config.tie_word_embeddings and "lm_head" not in variables["params"]
    # An OPTModel checkpoint: keys under 'decoder.', no head; the head is tied as in HF.
    model.model.save_pretrained(tmp_path / "opt_model")
    with safe_open(tmp_path / "opt_model" / "model.safetensors", "np") as f:
        assert all(k.startswith("decoder.") for k in f.keys())
    _, bare_vars, _ = opt.load(tmp_path / "opt_model")
    for a, b in zip(jax.tree.leaves(bare_vars), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_untied_head_matches_pytorch(tmp_path):
    model = tiny_opt(seed=3, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    module, variables, _ = opt.load(tmp_path)
    kernel = variables["params"]["lm_head"]["kernel"]
    np.testing.assert_array_equal(kernel, model.lm_head.weight.detach().numpy().T)
    ids, mask = padded_batch()
    _, logits = torch_run(model, input_ids=ids, attention_mask=mask)
    out = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert_real_close(out["logits"], logits, mask)


def test_missing_and_unexpected_keys_are_named(models, tmp_path):
    folder, _, _, _ = models["pre_ln"]
    with safe_open(folder / "model.safetensors", "np") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    del state["model.decoder.layers.1.fc2.bias"]
    state["model.decoder.stray.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing keys \(1\): model\.decoder\.layers\.1\.fc2\.bias"
                                         r".*unexpected keys \(1\): model\.decoder\.stray\.weight"):
        opt.load(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no lm_head.weight"):
        opt.load(tmp_path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_weight_has_allowed_logical_axes(layout):
    cfg = opt.OPTConfig.from_hf(HFOPTConfig(**TINY, **LAYOUTS[layout], tie_word_embeddings=False))
    boxed = jax.eval_shape(opt.OPTForCausalLM(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    per_layer = 4 * 2 + 2 * 2 + 2 * 2  # q,k,v,out; fc1, fc2; two LayerNorms
    # post-LN: project_in/out kernels; pre-LN: the final LayerNorm's scale and bias.
    extra = 2
    assert ("project_in" in boxed["params"]) == cfg.projects
    assert ("final_layer_norm" in boxed["params"]) == (not cfg.projects)
    assert len(leaves) == 2 + 2 * per_layer + extra + 1  # embeddings, layers, extra, lm_head
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert set(leaf.names) <= ALLOWED_AXES and len(leaf.names) == leaf.value.ndim, leaf.names
        assert len(set(leaf.names)) == len(leaf.names), leaf.names


def test_bfloat16_forward_stays_close(models):
    folder, _, module, variables = models["post_ln_proj"]
    bf_module, bf_vars, _ = opt.load(folder, dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf_vars)[0].dtype == jnp.bfloat16
    ids, mask = padded_batch()
    ref = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    out = jax.jit(bf_module.apply)(bf_vars, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out["hidden_states"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32
    # bfloat16 keeps 8 mantissa bits (~0.4% per rounding) through 2 layers; logits reach ~3.4
    # and the observed worst error is ~0.03 (0.06 for the pre-LN layout); 0.2 leaves margin.
    assert_real_close(out["logits"], np.asarray(ref["logits"]), mask, atol=0.2)


def test_bad_calls_raise_clear_errors():
    with pytest.raises(ValueError, match="not OPT"):
        opt.OPTConfig.from_hf(type("C", (), {"model_type": "llama"})())
    with pytest.raises(ValueError, match="activation_function"):
        opt.OPTConfig(activation_function="tanh")
    cfg = opt.OPTConfig.from_hf(HFOPTConfig(**TINY))
    module = opt.OPTForCausalLM(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), ids)
    apply = lambda *a, **kw: jax.eval_shape(lambda v: module.apply(v, *a, **kw), variables)  # noqa: E731
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        apply(ids, inputs_embeds=jnp.zeros((1, 4, 32)))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, length, 32\]"):
        apply(inputs_embeds=jnp.zeros((1, 4, 16)))
    with pytest.raises(ValueError, match="exceed the 40 positions"):
        apply(jnp.zeros((1, 41), jnp.int32))
    with pytest.raises(ValueError, match="cache and cache_index together"):
        apply(ids, cache=opt.init_cache(cfg, 1, 8))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, cache length\]"):
        apply(ids, cache=opt.init_cache(cfg, 1, 8), cache_index=0, attention_mask=jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="embed_tokens/embedding"):
        opt.embed_tokens({"params": {}}, ids)
    assert apply(ids)["logits"].shape == (1, 4, 100)  # the checks above are not blanket failures
