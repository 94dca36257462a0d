"""LlamaForCausalLM against transformers' PyTorch LlamaForCausalLM (the parity reference).

Tiny random models (2 layers, width 32, 4 query heads / 2 kv heads, vocab 100), saved with
save_pretrained and loaded through llama.load. float32: atol 1e-4 on logits and final hidden states
at real positions (observed ~1e-6). The real SmolLM2-135M (GGUF) tests live in test_gguf.py.

Speed: models are built once per module; every forward is one jitted function per model variant on
the same [3, 9] batch, so each variant compiles once.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lqae_vlap.models import llama
from lqae_vlap.models.generate import greedy_search
from tests.helpers import (ALLOWED_AXES, LLAMA_TINY as TINY, LLAMA_VARIANTS as VARIANTS,
                           assert_real_close, tiny_llama)

ATOL = 1e-4
BATCH, LENGTH = 3, 9


def padded_batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [3, 9]: row 0 full, row 1 right-padded, row 2 left-padded; mask; per-row positions."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, TINY["vocab_size"], size=(BATCH, LENGTH))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = TINY["pad_token_id"]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """name -> (folder, torch model, our module, variables, jitted forward)."""
    out = {}
    for name, overrides in VARIANTS.items():
        model = tiny_llama(**overrides)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        module, variables, _ = llama.load(folder)
        out[name] = (folder, model, module, variables, jax.jit(module.apply))
    return out


def torch_run(model, ids, mask, positions) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_padded_batch_matches_pytorch(variants, name):
    _, model, _, variables, fwd = variants[name]
    ids, mask, positions = padded_batch()
    out = fwd(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
              positions=jnp.asarray(positions))
    hidden, logits = torch_run(model, ids, mask, positions)
    assert out["logits"].dtype == jnp.float32 and out["cache"] is None
    assert np.abs(logits).max() > 1.0  # the comparison is not between near-zero numbers
    assert_real_close(out["logits"], logits, mask)
    assert_real_close(out["hidden_states"], hidden, mask)


@pytest.mark.parametrize("name", ["untied_bias", "tied_linear"])
def test_logits_to_keep_matches_pytorch(variants, name):
    """Only the last n positions' logits (generation's prefill), as HF's logits_to_keep."""
    _, model, module, variables, _ = variants[name]
    ids, mask, positions = padded_batch()
    ids, mask, positions = ids[[0, 2]], mask[[0, 2]], positions[[0, 2]]  # last 3 slots real
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         position_ids=torch.as_tensor(positions), logits_to_keep=3).logits.numpy()
    fwd = jax.jit(functools.partial(module.apply, logits_to_keep=3))  # a Python int: static
    out = fwd(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
              positions=jnp.asarray(positions))
    assert out["logits"].shape == expected.shape == (2, 3, TINY["vocab_size"])
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=0, atol=ATOL)


def test_tied_head_is_absent_from_file_and_tied_on_load(variants):
    folder, _, _, variables, _ = variants["tied_linear"]
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert "lm_head" not in variables["params"]
    assert "lm_head" in variants["untied_bias"][3]["params"]


def test_rope_inv_freq_matches_transformers():
    for name in ("tied_linear", "llama3"):
        hf_cfg = HFLlamaConfig(**TINY, **VARIANTS[name])
        expected, _ = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, "cpu")
        got = llama.rope_inv_freq(llama.LlamaConfig.from_hf(hf_cfg))
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=0)
    # The llama3 case must exercise kept, smoothed and divided frequencies, or it tests little.
    base = llama.rope_inv_freq(llama.LlamaConfig.from_hf(HFLlamaConfig(**TINY, rope_theta=10.0)))
    ratio = base / llama.rope_inv_freq(llama.LlamaConfig.from_hf(HFLlamaConfig(**TINY, **VARIANTS["llama3"])))
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_cached_incremental_decoding_equals_full_forward(variants):
    """Prefill 5 slots, then feed the remaining 4 tokens one at a time through the cache."""
    _, _, module, variables, fwd = variants["untied_bias"]
    ids, mask, positions = padded_batch()
    ids, mask, positions = ids[[0, 2]], mask[[0, 2]], positions[[0, 2]]  # full and left-padded
    full = fwd(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
               positions=jnp.asarray(positions))["logits"]
    max_len, prefill = LENGTH + 3, 5  # spare slots never written stay masked by causality
    cache = llama.init_cache(module.config, 2, max_len, jnp.float32)
    cache_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, max_len - LENGTH)), constant_values=1))
    step = jax.jit(module.apply)
    got = []
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, LENGTH)]:
        out = step(variables, jnp.asarray(ids[:, start:stop]), attention_mask=cache_mask,
                   positions=jnp.asarray(positions[:, start:stop]), cache=cache,
                   cache_index=jnp.int32(start))
        cache = out["cache"]
        got.append(out["logits"])
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    assert cache["layers_0"]["k"].shape == (2, max_len, 2, 8)
    assert_real_close(got, np.asarray(full), mask, atol=1e-5)


def test_greedy_search_matches_transformers_generate(variants):
    _, model, module, variables, _ = variants["untied_bias"]
    ids, mask, _ = padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # generate needs left padding
    with torch.no_grad():
        expected = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                  max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[:, LENGTH:].numpy()
    got = greedy_search(module.apply, variables, input_ids=jnp.asarray(ids),
                        attention_mask=jnp.asarray(mask), max_new_tokens=6, eos_token_id=None,
                        pad_token_id=0,
                        init_cache_fn=functools.partial(llama.init_cache, module.config,
                                                        dtype=jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_inputs_embeds_equal_input_ids(variants):
    _, _, _, variables, fwd = variants["llama3"]
    ids, mask, positions = padded_batch()
    kw = dict(attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
    a = fwd(variables, jnp.asarray(ids), **kw)["logits"]
    embeds = llama.embed_tokens(variables, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(
        variables["params"]["embed_tokens"]["embedding"])[ids])
    b = fwd(variables, inputs_embeds=embeds, **kw)["logits"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_bfloat16_forward_stays_close(variants):
    # bf16 carries 8 mantissa bits; through 2 layers the logits (|max| ~10) drift by ~1e-1.
    folder, model, _, _, _ = variants["untied_bias"]
    module, variables, _ = llama.load(folder, dtype=jnp.bfloat16)
    assert variables["params"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    ids, mask, positions = padded_batch()
    out = jax.jit(module.apply)(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                positions=jnp.asarray(positions))
    _, logits = torch_run(model, ids, mask, positions)
    assert out["logits"].dtype == jnp.float32
    err = np.abs(np.asarray(out["logits"]) - logits)[mask.astype(bool)]
    scale = np.abs(logits).max()
    assert err.max() < 0.05 * scale, (err.max(), scale)
    assert err.mean() < 0.01 * scale, (err.mean(), scale)


def test_every_weight_has_allowed_logical_axes(variants):
    _, _, module, _, _ = variants["untied_bias"]
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert set(leaf.names) <= ALLOWED_AXES and len(set(leaf.names)) == len(leaf.names)
        assert len(leaf.names) == leaf.value.ndim


def test_load_on_mesh_places_weights_by_logical_axes(variants):
    from lqae_vlap.core.sharding import make_mesh  # noqa: PLC0415

    folder, _, _, reference, fwd = variants["untied_bias"]
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    _, variables, _ = llama.load(folder, mesh=mesh)
    q = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [embed, heads, kv]
    assert q.sharding.spec[:2] == ("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_and_unexpected_keys_are_named(variants, tmp_path):
    folder, _, _, _, _ = variants["untied_bias"]
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys.*model\.layers\.1\.mlp\.up_proj\.weight"
                                         r".*unexpected keys.*model\.layers\.0\.extra\.weight"):
        llama.load(tmp_path)


def test_bad_config_and_calls_raise_clear_errors(variants):
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        llama.LlamaConfig.from_hf(HFLlamaConfig(**TINY, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="not a Llama-family decoder"):
        llama.LlamaConfig.from_hf({"model_type": "opt"})
    _, _, module, variables, _ = variants["untied_bias"]
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        jax.eval_shape(module.apply, variables)
    with pytest.raises(ValueError, match="cache and cache_index together"):
        jax.eval_shape(functools.partial(module.apply, cache=llama.init_cache(module.config, 1, 8)),
                       variables, ids)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, cache length\]"):
        jax.eval_shape(functools.partial(module.apply, cache=llama.init_cache(module.config, 1, 8),
                                         cache_index=0, attention_mask=jnp.ones((1, 4))),
                       variables, ids)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        jax.eval_shape(functools.partial(module.apply, inputs_embeds=jnp.zeros((1, 4, 5))), variables)
