"""Frozen and trainable models, and the one entry point to load any supported checkpoint.

    module, variables, config = lqae_vlap.models.load_pretrained("facebook/opt-1.3b",
                                                                 dtype=jnp.bfloat16)
    logits = module.apply(variables, input_ids)["logits"]

Every family file (roberta.py, opt.py, llama.py, t5.py, clip.py, beit.py) has the same
``load(path_or_name, *, dtype, mesh, abstract, hf_config)`` built on ``hf_weights``; this file
picks the family from the checkpoint's config.json (or a GGUF file's metadata) and calls it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax.numpy as jnp

# model_type in config.json -> the family file that loads it. A plain dict, no registry.
FAMILIES = {
    "bert": "roberta", "roberta": "roberta", "xlm-roberta": "roberta",
    "opt": "opt",
    "llama": "llama", "mistral": "llama",
    "t5": "t5",
    "clip": "clip", "clip_vision_model": "clip",
    "beit": "beit",
}


def _gguf_file(path: Path) -> Path | None:
    if path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            raise ValueError(f"{path} holds several GGUF files ({names}); pass the one to load")
    return None


def family(hf_config: Any, where: str = "") -> str:
    """'roberta' | 'opt' | 'llama' | 't5' | 'clip' | 'beit': the family file for a config's
    model_type (a transformers config or a dict, as GGUF metadata is read)."""
    model_type = (hf_config.get("model_type") if isinstance(hf_config, Mapping)
                  else getattr(hf_config, "model_type", None))
    if model_type not in FAMILIES:
        raise ValueError(f"{where + ': ' if where else ''}model_type {model_type!r} is not "
                         f"supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_module(name: str) -> ModuleType:
    """The family file ``lqae_vlap.models.<name>`` ('opt', 'llama', ...): its module classes,
    ``load``, and for decoders ``embed_tokens`` / ``init_cache``."""
    if name not in set(FAMILIES.values()):
        raise ValueError(f"model family {name!r} is not known; use one of "
                         f"{sorted(set(FAMILIES.values()))}")
    return importlib.import_module(f"lqae_vlap.models.{name}")


def checkpoint_family(path_or_name: str | os.PathLike) -> str | None:
    """The family a checkpoint holds, known without reading a tensor: 'llama' for a GGUF file,
    a local folder's config.json model_type, or None (a hub name not downloaded yet)."""
    path = Path(path_or_name).expanduser()
    if _gguf_file(path) is not None:
        return "llama"  # GGUF files here hold Llama-family decoders (models/gguf.py)
    if (path / "config.json").is_file():
        from lqae_vlap.models import hf_weights  # noqa: PLC0415  (keeps `import models` light)

        return family(hf_weights.read_hf_config(path), where=str(path))
    return None


def plan_architecture(path_or_name: str | os.PathLike, arch: Any, field: str
                      ) -> dict[str, Any] | None:
    """What an abstract load (plan mode) builds from: None when ``path_or_name`` is on this
    machine (its own config.json or GGUF metadata), else ``arch`` as a plain dict of Hugging Face
    config fields with 'model_type'; ``field`` names the config key that holds it, for the error
    when it holds none."""
    if os.path.exists(os.path.expanduser(str(path_or_name))):
        return None
    arch = arch.to_dict() if hasattr(arch, "to_dict") else dict(arch or {})
    if "model_type" not in arch:
        raise ValueError(f"plan mode: {str(path_or_name)!r} is not a local checkpoint folder and "
                         f"{field} gives no architecture to plan from; pass the local folder, or "
                         f"set {field} to the HF config fields incl. model_type (see "
                         "configs/vlap_opt.py)")
    return arch


def load_pretrained(path_or_name: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
                    mesh: Any = None, abstract: bool = False, hf_config: Any = None,
                    **options: Any) -> tuple[Any, dict[str, Any], Any]:
    """Reads config.json (or a GGUF file's metadata), picks the family, and loads the weights.

    Args:
      path_or_name: a checkpoint folder, a ``.gguf`` file (or a folder holding one), or a Hugging
        Face hub name where there is network. None with ``hf_config``.
      dtype: parameter and compute dtype (weights are cast as they load).
      mesh: place each weight on this mesh by its logical axis names as it loads.
      abstract: read no tensor: the params are ``jax.ShapeDtypeStruct``s with their shardings
        (plan mode); a folder may then hold config.json alone.
      hf_config: abstract only: the architecture to build instead of a checkpoint's (a
        transformers config, or a dict of its fields with 'model_type').
      **options: family options, e.g. ``with_projection=False`` for CLIP.

    Returns:
      (module, {'params': ...}, config): the Flax module, its variables, and the transformers
      config (a dict for GGUF files).
    """
    from lqae_vlap.models import hf_weights  # noqa: PLC0415  (keeps `import models` light)

    kw = dict(dtype=dtype, mesh=mesh, abstract=abstract, **options)
    if hf_config is not None:
        hf_config = hf_weights.as_hf_config(hf_config)
        return family_module(family(hf_config)).load(None, hf_config=hf_config, **kw)
    if path_or_name is None:
        raise ValueError("load_pretrained: pass a checkpoint folder, GGUF file or hub name "
                         "(or hf_config= with abstract=True)")
    gguf = _gguf_file(Path(path_or_name).expanduser())
    if gguf is not None:
        return family_module("llama").load_gguf(gguf, **kw)
    folder = hf_weights.resolve_checkpoint(path_or_name)
    name = family(hf_weights.read_hf_config(folder), where=str(folder))
    return family_module(name).load(folder, **kw)


def load_tokenizer(path_or_name: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer (transformers AutoTokenizer, local files only; for a GGUF file,
    built from its metadata without torch: ``gguf.load_tokenizer``)."""
    from lqae_vlap.models import hf_weights  # noqa: PLC0415  (keeps `import models` light)

    hf_weights.import_transformers()
    gguf = _gguf_file(Path(path_or_name).expanduser())
    if gguf is not None:
        from lqae_vlap.models import gguf as gguf_lib  # noqa: PLC0415

        return gguf_lib.load_tokenizer(gguf)
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(hf_weights.resolve_checkpoint(path_or_name)),
                                         local_files_only=True)
