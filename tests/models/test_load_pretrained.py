"""load_pretrained picks the family from config.json / GGUF and returns a working module; its
abstract mode gives every family's shapes and shardings without reading a tensor."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from lqae_vlap import models
from lqae_vlap.core.sharding import make_mesh
from lqae_vlap.models import clip, hf_weights, llama, opt, roberta, t5
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


def _spec(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)


@pytest.mark.parametrize("family", sorted(CASES))
def test_abstract_load_equals_the_real_load(tmp_path, monkeypatch, family):
    """abstract=True gives the real load's shapes, dtypes and shardings, for every family the
    same way: from the folder, from config.json alone, and from the architecture alone."""
    make, _ = CASES[family]
    torch.manual_seed(0)
    make().save_pretrained(tmp_path)
    mesh = make_mesh({"data": 1, "fsdp": 8})
    options = {"with_projection": False} if family == "clip" else {}
    _, real, hf_config = models.load_pretrained(tmp_path, dtype=jnp.bfloat16, mesh=mesh, **options)

    def no_reads(*args):
        raise AssertionError("abstract=True read a tensor")

    monkeypatch.setattr(hf_weights.StateDict, "__getitem__", no_reads)
    kw = dict(dtype=jnp.bfloat16, mesh=mesh, abstract=True, **options)
    assert _spec(models.load_pretrained(tmp_path, **kw)[1]) == _spec(real)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()  # config.json alone
    assert _spec(models.load_pretrained(tmp_path, **kw)[1]) == _spec(real)
    assert _spec(models.load_pretrained(hf_config=hf_config, **kw)[1]) == _spec(real)
    arch = {k: v for k, v in hf_config.to_dict().items() if not k.startswith("_")}
    assert _spec(models.load_pretrained(hf_config=arch, **kw)[1]) == _spec(real)  # a plain dict
    with pytest.raises(ValueError, match="abstract=True"):
        models.load_pretrained(hf_config=hf_config)


def test_abstract_gguf_reads_metadata_only(monkeypatch):
    gguf = _smollm2_gguf()
    monkeypatch.setattr(hf_weights.StateDict, "__getitem__",
                        lambda *a: pytest.fail("abstract=True read a tensor"))
    module, variables, hf_config = models.load_pretrained(gguf, abstract=True)
    assert isinstance(module, llama.LlamaForCausalLM) and hf_config["model_type"] == "llama"
    embed = variables["params"]["embed_tokens"]["embedding"]
    assert isinstance(embed, jax.ShapeDtypeStruct)
    assert embed.shape == (hf_config["vocab_size"], hf_config["hidden_size"])


def test_checkpoint_family_without_reading_weights(tmp_path):
    assert models.checkpoint_family("nowhere/smollm2.gguf") == "llama"  # by its suffix alone
    assert models.checkpoint_family("facebook/opt-1.3b") is None  # a hub name: not knowable
    transformers.T5Config(num_layers=1, d_model=8, d_kv=4, d_ff=8, num_heads=2).save_pretrained(
        tmp_path)
    assert models.checkpoint_family(tmp_path) == "t5"
    with pytest.raises(ValueError, match="model family 'gpt' is not known"):
        models.family_module("gpt")
