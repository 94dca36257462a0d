"""Frozen and trainable models, and the one entry point to load any supported checkpoint.

    module, variables, config = lqae_vlap.models.load_pretrained("facebook/opt-1.3b",
                                                                 dtype=jnp.bfloat16)
    logits = module.apply(variables, input_ids)["logits"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

# model_type in config.json -> the family module that loads it. A plain dict, no registry.
FAMILIES = {
    "bert": "roberta", "roberta": "roberta", "xlm-roberta": "roberta",
    "opt": "opt",
    "llama": "llama", "mistral": "llama",
    "t5": "t5",
    "clip": "clip", "clip_vision_model": "clip",
}


def _gguf_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); "
                             "pass the one to load")
    return None


def load_pretrained(path_or_name: str | os.PathLike, *, dtype: Any = jnp.float32,
                    mesh: Any = None) -> tuple[Any, dict[str, Any], Any]:
    """Reads config.json (or a GGUF file's metadata), picks the family, and loads the weights.

    Args:
      path_or_name: a checkpoint folder, a ``.gguf`` file (or a folder holding one), or a Hugging
        Face hub name where there is network.
      dtype: parameter and compute dtype (weights are cast as they load).
      mesh: place each weight on this mesh by its logical axis names as it loads.

    Returns:
      (module, {'params': ...}, config): the Flax module, its variables, and the transformers
      config (a dict for GGUF files).
    """
    from lqae_vlap.models import hf_weights  # noqa: PLC0415  (keeps `import lqae_vlap.models` light)

    gguf = _gguf_file(Path(path_or_name).expanduser())
    if gguf is not None:
        from lqae_vlap.models import llama  # noqa: PLC0415

        return llama.load_gguf(gguf, dtype=dtype, mesh=mesh)
    folder = hf_weights.resolve_checkpoint(path_or_name)
    model_type = hf_weights.read_hf_config(folder).model_type
    if model_type not in FAMILIES:
        raise ValueError(f"{folder}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    if family == "roberta":
        return hf_weights.load_masked_lm(folder, dtype=dtype, mesh=mesh)
    import importlib  # noqa: PLC0415

    module = importlib.import_module(f"lqae_vlap.models.{family}")
    return module.load(folder, dtype=dtype, mesh=mesh)


def load_tokenizer(path_or_name: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer (transformers AutoTokenizer; for GGUF, read from the file)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from lqae_vlap.models import hf_weights  # noqa: PLC0415

    gguf = _gguf_file(Path(path_or_name).expanduser())
    if gguf is not None:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return hf_weights.load_tokenizer(path_or_name)
