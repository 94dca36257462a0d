"""Read a llama.cpp GGUF file as a Hugging Face-named, dequantised, lazy state dict.

Decoding is the ``gguf`` package's (``GGUFReader`` memory-maps the file, ``gguf.quants.dequantize``
turns any supported block quantisation into float32); this file only renames and un-permutes, so
the result feeds ``hf_weights.convert_checkpoint`` exactly like a safetensors folder.

The name map and the q/k un-permutation follow transformers' GGUF integration
(transformers/integrations/ggml.py: ``GGUF_CONFIG_MAPPING``; transformers/modeling_gguf_pytorch_utils.py:
``LlamaTensorProcessor._reverse_permute_weights``), which undoes llama.cpp's ``LlamaModel.permute``
in convert_hf_to_gguf.py: llama.cpp stores each q/k head with its rotary pairs interleaved
(GPT-J layout); Hugging Face keeps the two halves separate (rotate_half layout).

Llama 3.x files carry ``rope_freqs.weight`` (llama3 rope scaling baked into per-frequency
divisors, with no scaling metadata): ``read_config`` checks it against the llama3 scaling that
``llama.rope_inv_freq`` computes and returns that scaling as ``rope_scaling``; the tensor itself
is then dropped from the state dict.
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

ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) bakes Llama 3.x rope scaling
# into this tensor and writes no scaling metadata; where metadata is silent it assumes these
# values (the hparams defaults it uses, which are Llama 3.1/3.2's own).
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
ROPE_FREQS_RTOL = 1e-4  # float32 round-off of the factors is ~1e-7; a wrong parameter is >> 1e-3


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
    if ROPE_FREQS in tensor_names:
        config["rope_scaling"] = llama3_scaling_from_rope_freqs(reader, arch, config)
    return config


def _tensor_array(reader: Any, name: str) -> np.ndarray:
    from gguf.quants import dequantize  # noqa: PLC0415

    (tensor,) = [t for t in reader.tensors if t.name == name]
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(-1)


def llama3_scaling_from_rope_freqs(reader: Any, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The rope_scaling dict (HF llama3 keys) that the file's ``rope_freqs.weight`` encodes.

    Parameters come from the GGUF metadata where present (``rope.scaling.factor``,
    ``rope.scaling.original_context_length``, and ``rope.scaling.{low,high}_freq_factor`` should a
    writer add them), else llama.cpp's converter defaults (``LLAMA3_DEFAULTS``), with the factor
    read off the tensor (its largest entry: the low-frequency band is divided by the factor). The
    tensor must then equal, within ``ROPE_FREQS_RTOL``, what ``llama.rope_inv_freq`` computes from
    those parameters (llama.cpp divides each base frequency by its entry); anything else raises a
    ValueError naming the mismatch, as does scaling metadata of another type.
    """
    from lqae_vlap.models.llama import LlamaConfig, rope_inv_freq  # noqa: PLC0415  (llama imports us lazily)

    declared = _field(reader, f"{arch}.rope.scaling.type")
    if declared not in (None, "none", "llama3"):
        raise ValueError(f"GGUF declares rope scaling {declared!r} but also carries {ROPE_FREQS!r} "
                         "(llama3-style frequency factors); the two conflict, so this file cannot "
                         "be read unambiguously")
    factors = _tensor_array(reader, ROPE_FREQS)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"GGUF {ROPE_FREQS!r} has {factors.size} entries; head_dim {head_dim} "
                         f"needs {head_dim // 2} (one per rotary frequency)")
    meta = {k: _field(reader, f"{arch}.rope.scaling.{key}") for k, key in (
        ("factor", "factor"), ("low_freq_factor", "low_freq_factor"),
        ("high_freq_factor", "high_freq_factor"),
        ("original_max_position_embeddings", "original_context_length"))}
    scaling = {"rope_type": "llama3",
               "factor": float(meta["factor"] if meta["factor"] is not None else factors.max())}
    for k, default in LLAMA3_DEFAULTS.items():
        scaling[k] = type(default)(meta[k] if meta[k] is not None else default)
    base = dict(model_type="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1,
                num_hidden_layers=1, num_attention_heads=1, head_dim=head_dim,
                rope_theta=float(config.get("rope_theta", 10000.0)))
    plain = rope_inv_freq(LlamaConfig.from_hf(base))
    scaled = rope_inv_freq(LlamaConfig.from_hf({**base, "rope_scaling": scaling}))
    expected = plain / scaled  # llama.cpp: theta_i = position * base_freq_i / factor_i
    err = np.abs(factors - expected) / np.abs(expected)
    if not np.all(err <= ROPE_FREQS_RTOL):
        i = int(np.argmax(err))
        raise ValueError(
            f"GGUF {ROPE_FREQS!r} does not match llama3 rope scaling {scaling} (from the file's "
            f"metadata, else llama.cpp's defaults): entry {i} is {factors[i]:.6g}, expected "
            f"{expected[i]:.6g} (max relative error {err.max():.3g} > {ROPE_FREQS_RTOL}); load the "
            "Hugging Face checkpoint folder with llama.load, whose config.json states the scaling")
    return scaling


# tokenizer.ggml.<key> -> the tokenizer_config name of the special token it holds the id of
# (transformers/integrations/gguf/gguf_tokenizer_mapping.py: _SPECIAL_TOKENS).
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def tokenizer_metadata(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, tokenizer fields, tokenizer_config) of a GGUF file, as transformers'
    ``integrations.gguf.get_gguf_tokenizer`` returns them, read with the numpy-only ``gguf``
    package instead of transformers' reader, which imports torch."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # noqa: PLC0415
        GGUF_TOKENIZER_MAPPING)

    reader = _reader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items()
                if k.startswith("tokenizer.") or k == "general.architecture"}
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens); pass "
                         "config.model.tokenizer_path, a folder with the model's tokenizer files")
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    # As transformers' get_gguf_tokenizer: llama.cpp adds BOS to a sentencepiece vocabulary that
    # does not say otherwise; gemma4's chat template writes <bos> itself.
    if tokenizer.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer.get("tokenizer_type") == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return metadata.get("general.architecture", ""), tokenizer, tokenizer_config


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer a GGUF file's metadata describes, as transformers' ``AutoTokenizer`` builds it
    from ``gguf_file=`` (the same ids, special tokens and decoding), without importing torch: a
    ``PreTrainedTokenizerFast`` over transformers' own GGUF tokenizer conversion."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # noqa: PLC0415
        convert_gguf_tokenizer)

    architecture, fields, tokenizer_config = tokenizer_metadata(path)
    backend, extra = convert_gguf_tokenizer(architecture, fields)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _reader(path: str | os.PathLike) -> Any:
    """A GGUFReader over ``path``; a missing, truncated or foreign file is named in a ValueError."""
    try:
        from gguf import GGUFReader  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; pass the path of a .gguf file")
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001  (gguf raises ValueError, struct/numpy errors on damage)
        raise ValueError(f"{path} cannot be read as a GGUF file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated or damaged: "
                         "re-download it") from e


def open_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], StateDict]:
    """(HF-style config dict, lazy float32 state dict in HF LlamaForCausalLM naming) of a GGUF file.

    Each tensor is dequantised (and q/k un-permuted) only when read, so peak host memory is one
    float32 tensor on top of the memory-mapped file.
    """
    reader = _reader(path)
    from gguf.quants import dequantize  # noqa: PLC0415  (present: _reader imported gguf)

    path = Path(path).expanduser()
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
        if tensor.name == ROPE_FREQS:  # checked by read_config and folded into rope_scaling
            continue
        name = hf_tensor_name(tensor.name)
        if name in entries:
            raise ValueError(f"{path}: two GGUF tensors map to {name!r}")
        entries[name] = (shape_of(tensor), lambda t=tensor, n=name: load(t, n))
    return config, StateDict(entries, source=str(path))
