"""Read a llama.cpp GGUF file as a Hugging Face-named, dequantised, lazy state dict.

Decoding is the ``gguf`` package's (``GGUFReader`` memory-maps the file, ``gguf.quants.dequantize``
turns any supported block quantisation into float32); this file only renames and un-permutes, so
the result feeds ``hf_weights.convert_checkpoint`` exactly like a safetensors folder.

The name map and the q/k un-permutation follow transformers' GGUF integration
(transformers/integrations/ggml.py: ``GGUF_CONFIG_MAPPING``; transformers/modeling_gguf_pytorch_utils.py:
``LlamaTensorProcessor._reverse_permute_weights``), which undoes llama.cpp's ``LlamaModel.permute``
in convert_hf_to_gguf.py: llama.cpp stores each q/k head with its rotary pairs interleaved
(GPT-J layout); Hugging Face keeps the two halves separate (rotate_half layout).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.models.hf_weights import StateDict

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF metadata "<arch>.<key>" -> HF config key (transformers GGUF_CONFIG_MAPPING["llama"]).
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
               "padding_token_id": "pad_token_id"}

# GGUF tensor names -> HF LlamaForCausalLM names (gguf's TensorNameMap for MODEL_ARCH.LLAMA).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; unknown names unchanged
    (so the converter reports them as unexpected keys rather than dropping them silently)."""
    if m := _BLOCK.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
        return gguf_name
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    return gguf_name


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation; w: [n_head * head_dim, ...] (weight or bias).

    As transformers' LlamaTensorProcessor._reverse_permute_weights: per head, the [head_dim/2, 2]
    interleaved rows become [2, head_dim/2] (first halves, then second halves).
    """
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: Any) -> dict[str, Any]:
    """The HF-style config dict (LlamaConfig keys) from a GGUFReader's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; this reader handles "
                         f"{SUPPORTED_ARCHITECTURES} (Llama-family decoders)")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama3-style GGUFs bake the rope scaling into a frequency-factor tensor instead of metadata.
        raise ValueError("this GGUF carries a 'rope_freqs.weight' tensor (Llama-3.1 rope scaling), "
                         "which this reader does not map back to rope_scaling; load the Hugging Face "
                         "checkpoint folder with llama.load instead")
    config: dict[str, Any] = {"model_type": "llama", "hidden_act": "silu",
                              "tie_word_embeddings": "output.weight" not in tensor_names,
                              "attention_bias": "blk.0.attn_q.bias" in tensor_names,
                              "mlp_bias": "blk.0.ffn_up.bias" in tensor_names}
    for key, hf_key in _CONFIG_KEYS.items():
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            config[hf_key] = value
    for key, hf_key in _TOKEN_KEYS.items():
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)
    if "vocab_size" not in config:  # older files: the vocabulary is the token list
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {
            "rope_type": scaling, "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}
        orig = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    for k in ("max_position_embeddings", "num_hidden_layers", "intermediate_size", "hidden_size",
              "head_dim", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if k in config:
            config[k] = int(config[k])
    return config


def open_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], StateDict]:
    """(HF-style config dict, lazy float32 state dict in HF LlamaForCausalLM naming) of a GGUF file.

    Each tensor is dequantised (and q/k un-permuted) only when read, so peak host memory is one
    float32 tensor on top of the memory-mapped file.
    """
    try:
        from gguf import GGUFReader  # noqa: PLC0415  (optional dependency)
        from gguf.quants import dequantize  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; pass the path of a .gguf file")
    reader = GGUFReader(path)
    config = read_config(reader)
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config.get("num_key_value_heads", config["num_attention_heads"])}

    def load(tensor: Any, name: str) -> np.ndarray:
        w = dequantize(tensor.data, tensor.tensor_type)
        w = np.asarray(w, np.float32).reshape(shape_of(tensor))
        for proj, n in heads.items():
            if f".{proj}." in name:
                w = reverse_permute(w, n)
        return w

    def shape_of(tensor: Any) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first (ggml ne[]); numpy / torch order is the reverse.
        return tuple(int(d) for d in reversed(tensor.shape.tolist()))

    entries = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name in entries:
            raise ValueError(f"{path}: two GGUF tensors map to {name!r}")
        entries[name] = (shape_of(tensor), lambda t=tensor, n=name: load(t, n))
    return config, StateDict(entries, source=str(path))
