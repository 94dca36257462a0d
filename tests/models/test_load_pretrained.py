"""load_pretrained picks the family from config.json / GGUF and returns a working module."""

import pathlib

import jax.numpy as jnp
import pytest
import torch
import transformers

from lqae_vlap import models
from lqae_vlap.models import clip, llama, opt, roberta, t5
from tests.helpers import smollm2_dir

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64)
CASES = {
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(**TINY)),
             roberta.MaskedLM),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
        word_embed_proj_dim=32)), opt.OPTForCausalLM),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **TINY, num_key_value_heads=2)), llama.LlamaForCausalLM),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        decoder_start_token_id=0)), t5.T5),
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=8)), clip.CLIPVision),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_dispatch(tmp_path, family):
    make, cls = CASES[family]
    torch.manual_seed(0)
    make().save_pretrained(tmp_path)
    module, variables, config = models.load_pretrained(tmp_path, dtype=jnp.float32)
    assert isinstance(module, cls)
    assert set(variables) == {"params"} and variables["params"]
    assert config.model_type in models.FAMILIES


def test_unsupported_family_names_it(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        models.load_pretrained(tmp_path)


def _smollm2_gguf() -> pathlib.Path:
    files = sorted(pathlib.Path(smollm2_dir()).rglob("*.gguf"))
    assert len(files) == 1, files
    return files[0]


def test_gguf_dispatch_and_tokenizer(monkeypatch):
    gguf = _smollm2_gguf()
    calls = []
    monkeypatch.setattr(llama, "load_gguf", lambda path, **kw: calls.append(path) or "loaded")
    assert models.load_pretrained(gguf) == "loaded"  # the file itself
    assert models.load_pretrained(gguf.parent) == "loaded"  # a folder holding one GGUF file
    assert calls == [gguf, gguf]
    tok = models.load_tokenizer(gguf)  # read from the GGUF metadata
    ids = tok("A photo of a cat", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4 and tok.decode(ids) == "A photo of a cat"
