"""Test-wide setup: 8 fake CPU devices for the sharding tests, set before JAX is imported; the
tiny checkpoints several test modules train or evaluate on (built once per session)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.helpers import minilm_checkpoint


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory) -> str:
    """A tiny random BertForMaskedLM (2 layers, width 32) with MiniLM's real tokenizer.

    Saved with transformers' save_pretrained (safetensors), as users' checkpoints are.
    """
    return minilm_checkpoint(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random HF Llama (2 layers, width 32) with MiniLM's real tokenizer (+ EOS = [SEP])."""
    return minilm_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    """A tiny random HF T5 (original layout) with MiniLM's real tokenizer; EOS = [SEP]."""
    return minilm_checkpoint(tmp_path_factory.mktemp("tiny_t5"), "t5")
