"""The project's one loader of Hugging Face checkpoint folders into Flax param trees.

Four layers, so new families (OPT, T5, Llama, CLIP) only add a config reader and a name map:
  1. reading:    ``open_state_dict(folder)`` -> a lazy ``{pytorch_name: np.ndarray}`` over
                 safetensors, pytorch_model.bin or HF's flax_model.msgpack (flax_msgpack.py), each
                 single or sharded (flax renamed to PyTorch naming). Shapes come from headers
                 (msgpack: a walk of its structure); each tensor is read when asked for. bfloat16
                 reads via ml_dtypes.
  2. name map:   per family, ``{flax_param_path: Source(hf_keys, transform)}``; the first present
                 key of ``hf_keys`` wins, so tied or legacy names are simply alternatives.
  3. conversion: ``convert_checkpoint`` checks the map against ``jax.eval_shape(module.init)``
                 (missing, unexpected and mis-shaped keys all reported by name, before any tensor
                 is read), then converts leaf by leaf, casting and, given a mesh, placing each leaf
                 on its sharding at once so a big model never sits whole on the host twice.
  4. one load:   every family's ``load(path_or_name, *, dtype, mesh, abstract, hf_config)`` is
                 ``open_checkpoint`` -> its config and module -> ``load_params``; ``abstract=True``
                 reads no tensor (shapes and shardings only, for plan mode), from the folder's
                 config.json or from ``hf_config`` alone.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from lqae_vlap.core.sharding import boxed_shardings, fit_sharding_to_shape
from lqae_vlap.models.flax_msgpack import (FLAX_INDEX_NAME, flax_msgpack_entries, listing,
                                           sharded_flax_msgpack_entries)

# --------------------------------------------------------------------------------------------
# 1. Finding and reading a checkpoint folder
# --------------------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "flax_model.msgpack", FLAX_INDEX_NAME)
# owner/name or a bare name such as "roberta-base"; anything else is treated as a path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub name fetched with ``huggingface_hub.snapshot_download``.

    Raises FileNotFoundError naming ``path_or_name`` when it is neither an existing folder nor a
    hub name that can be fetched (no network, offline mode, unknown repository).
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"checkpoint {str(path)!r} is a file; pass the folder that holds "
                         "config.json and the weight files")
    name = str(path_or_name)
    if ".." in name or not _HUB_NAME.fullmatch(name):
        raise FileNotFoundError(f"checkpoint folder {name!r} does not exist; pass a local folder "
                                "holding config.json and the weights (or a hub name like 'roberta-base')")
    try:
        import huggingface_hub  # noqa: PLC0415  (only needed where there is a hub)

        # safetensors first; the legacy formats only when a repository has no safetensors.
        folder = Path(huggingface_hub.snapshot_download(
            name, allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"]))
        if not any((folder / f).exists() for f in WEIGHT_FILES):
            folder = Path(huggingface_hub.snapshot_download(
                name, allow_patterns=["*.json", "*.txt", "*.model", "*.bin", "*.msgpack"]))
    except Exception as e:  # noqa: BLE001  (every hub failure means the same thing to the caller)
        raise FileNotFoundError(
            f"checkpoint {name!r} is not a local folder and could not be fetched from the Hugging "
            f"Face hub ({type(e).__name__}: {e}); download it where there is network and pass the "
            "local folder instead") from e
    return folder


def import_transformers() -> None:
    """Imports transformers without its "PyTorch was not found" advice: the tokenizers and configs
    used here need no torch, which core installs do not have (later advice is left alone)."""
    if "transformers" in sys.modules:
        return
    quiet = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(quiet)
    os.environ[quiet] = "1"
    try:
        importlib.import_module("transformers")
    finally:
        if before is None:
            del os.environ[quiet]
        else:
            os.environ[quiet] = before


def read_hf_config(folder: str | os.PathLike) -> Any:
    """The folder's config.json as a transformers config object (no network).

    Raises FileNotFoundError when there is none, and ValueError naming the file when it is not a
    JSON object (with the JSON error's line and column) or transformers cannot read it.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder")
    read_config_json(path)  # transformers' own message for bad JSON is an OSError without where
    import_transformers()
    from transformers import AutoConfig  # noqa: PLC0415  (heavy import, only when loading)

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: transformers cannot read this config ({type(e).__name__}: "
                         f"{e}); fix it or re-download the checkpoint") from e


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not text (byte {e.start} is not UTF-8); it is damaged: fix "
                         "it or re-download the checkpoint") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} (line {e.lineno} column {e.colno}); "
                         "fix it or re-download the checkpoint") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of config "
                         "fields; fix it or re-download the checkpoint")
    return config


class StateDict(Mapping):
    """A lazy ``{pytorch_name: np.ndarray}``: shapes are known up front, tensors read on access."""

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]],
                 source: str):
        self._entries = dict(entries)
        self.source = source  # for error messages

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][0]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._entries[key][1]()

    def __contains__(self, key: object) -> bool:
        # Mapping's default would read the tensor (``self[key]``) just to test for the key.
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_bytes(path: Path, start: int, end: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(start)
        buf = f.read(end - start)
    if len(buf) != end - start:  # the file shrank after its header was checked
        raise ValueError(f"{path} is truncated: a tensor's bytes end at offset {end:,}, the file "
                         f"holds {start + len(buf):,}; re-download it")
    return np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length n, the header's tensors) of a safetensors file, checked against its size:
    every tensor's ``data_offsets`` lie in the data region and span dtype size x prod(shape)."""
    size = path.stat().st_size
    redownload = "re-download it"
    if size < 8:
        raise ValueError(f"{path} is {size} bytes, too short for a safetensors file (an 8-byte "
                         f"header length, then a JSON header); it is damaged: {redownload}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: its first 8 bytes "
                             f"say a {n:,}-byte header, the file holds {size:,} bytes; {redownload}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e}); it is "
                         f"damaged: {redownload}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is a JSON "
                         f"{type(header).__name__}, not an object; {redownload}")
    header.pop("__metadata__", None)
    data_size, end_max = size - 8 - n, 0
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(start, int)
                  and isinstance(end, int) and 0 <= start <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: the header entry of tensor {key!r} is malformed ({info!r:.200}); "
                             f"the file is damaged: {redownload}")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, which this reader "
                             f"does not handle (known: {sorted(_SAFETENSORS_DTYPES)})")
        want = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize * math.prod(shape)
        if end - start != want:
            raise ValueError(f"{path}: tensor {key!r} ({dtype} {tuple(shape)}) needs {want:,} bytes "
                             f"but its header gives it {end - start:,}; the file is damaged: "
                             f"{redownload}")
        end_max = max(end_max, end)
    if end_max > data_size:
        raise ValueError(f"{path} is truncated: its header says {end_max:,} bytes of tensors, the "
                         f"file holds {data_size:,}; {redownload}")
    return n, header


def _safetensors_entries(path: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    # The format is an 8-byte header length, a JSON header, then raw little-endian bytes; reading
    # it directly handles bfloat16 (safetensors' numpy API cannot) without torch or a device.
    n, header = _safetensors_header(path)
    entries = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        entries[key] = (shape, functools.partial(_read_bytes, path, 8 + n + start, 8 + n + end,
                                                 _SAFETENSORS_DTYPES[info["dtype"]], shape))
    return entries


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch  # noqa: PLC0415

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _torch_bin_entries(path: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    import torch  # noqa: PLC0415  (only the legacy .bin format needs torch)

    try:
        try:  # mmap keeps a big .bin on disk until each tensor is asked for
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pre-zipfile (torch < 1.6) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip, pickle and EOF errors all mean a damaged file)
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated or "
                         "damaged: re-download it") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; "
                         "pass a checkpoint saved with model.save_pretrained")
    return {k: (tuple(v.shape), functools.partial(_torch_to_numpy, v)) for k, v in state.items()}


def _sharded(folder: Path, index_name: str, reader: Callable) -> dict:
    index = folder / index_name
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a shard index (a JSON object with a 'weight_map' of "
                         f"tensor -> file; {type(e).__name__}: {e}); re-download it") from e
    entries = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{index} lists shard {shard!r}, which is not in {folder}; "
                                    "download every shard of the checkpoint")
        entries.update(reader(folder / shard))
    return entries


def open_state_dict(folder: str | os.PathLike) -> StateDict:
    """Lazy PyTorch-named state dict of a checkpoint folder; formats tried in ``WEIGHT_FILES`` order."""
    folder = Path(folder)
    readers = {
        "model.safetensors": lambda: _safetensors_entries(folder / "model.safetensors"),
        "model.safetensors.index.json":
            lambda: _sharded(folder, "model.safetensors.index.json", _safetensors_entries),
        "pytorch_model.bin": lambda: _torch_bin_entries(folder / "pytorch_model.bin"),
        "pytorch_model.bin.index.json":
            lambda: _sharded(folder, "pytorch_model.bin.index.json", _torch_bin_entries),
        "flax_model.msgpack": lambda: flax_msgpack_entries(folder / "flax_model.msgpack"),
        FLAX_INDEX_NAME: lambda: sharded_flax_msgpack_entries(folder),
    }
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return StateDict(readers[name](), source=str(folder / name))
    raise FileNotFoundError(f"{folder} holds no weights: looked for {', '.join(WEIGHT_FILES)}")


def read_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder in PyTorch naming, read into host memory."""
    state = open_state_dict(folder)
    return {k: np.array(state[k]) for k in state}


# --------------------------------------------------------------------------------------------
# 2. Name maps: how one Flax leaf is made from one HF tensor
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Copy:
    """Same layout in both frameworks (embeddings, LayerNorm, plain biases)."""

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(target)

    def __call__(self, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        return x


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight [out, in] -> DenseGeneral kernel [*in_dims, *out_dims]."""

    in_dims: int = 1  # how many leading kernel dims are the input (2 for an attention output)

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(target[self.in_dims:]), math.prod(target[:self.in_dims]))

    def __call__(self, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        return x.T.reshape(target)


@dataclasses.dataclass(frozen=True)
class Reshape:
    """A flat torch bias [H * Dh] -> [H, Dh]."""

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(target),)

    def __call__(self, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        return x.reshape(target)


Transform = Copy | Linear | Reshape


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one Flax leaf comes from: the first of ``keys`` present in the checkpoint."""

    keys: tuple[str, ...]
    transform: Transform = Copy()


NameMap = dict[tuple[str, ...], Source]


def detect_prefix(keys: Iterable[str], anchor: str, prefixes: Sequence[str]) -> str:
    """Which of ``prefixes`` ('bert.', 'roberta.', '') the base model's keys carry."""
    keys = set(keys)
    for prefix in prefixes:
        if prefix + anchor in keys:
            return prefix
    raise ValueError(f"checkpoint has no {anchor!r} under any of the prefixes {list(prefixes)}; "
                     "it is not a checkpoint of this model family")


def layer_norm_sources(flax_path: tuple[str, ...], hf: str) -> NameMap:
    """A LayerNorm's name-map entries: Flax ``scale``/``bias`` <- HF ``weight``/``bias``."""
    # '.gamma'/'.beta' are the names of the original TF-converted BERT checkpoints.
    return {flax_path + ("scale",): Source((f"{hf}.weight", f"{hf}.gamma")),
            flax_path + ("bias",): Source((f"{hf}.bias", f"{hf}.beta"))}


def dense_sources(flax_path: tuple[str, ...], hf: str, kernel: Transform = Linear(),
                  bias: Transform = Copy()) -> NameMap:
    """A dense layer's name-map entries: Flax ``kernel``/``bias`` <- HF ``weight``/``bias``."""
    return {flax_path + ("kernel",): Source((f"{hf}.weight",), kernel),
            flax_path + ("bias",): Source((f"{hf}.bias",), bias)}



# --------------------------------------------------------------------------------------------
# 3. Conversion engine
# --------------------------------------------------------------------------------------------


def convert_checkpoint(state: StateDict, name_map: NameMap, abstract_params: Any, *,
                       dtype: Any = None, mesh: Mesh | None = None,
                       ignored: Sequence[str] = ()) -> dict[str, Any]:
    """Builds a plain (unboxed) Flax params tree from a checkpoint.

    Args:
      state: the checkpoint (``open_state_dict``).
      name_map: Flax param path (inside 'params') -> Source.
      abstract_params: ``jax.eval_shape(module.init, ...)['params']``, boxed with logical names.
      dtype: cast floating leaves to this dtype (default: the abstract leaf's dtype).
      mesh: when given, each leaf goes straight to its NamedSharding from the logical names.
      ignored: regexes of checkpoint keys that may stay unused.

    Raises:
      ValueError naming every missing, unexpected and mis-shaped key, before any tensor is read.
    """
    targets = traverse_util.flatten_dict(nn.meta.unbox(abstract_params))
    uncovered = sorted("/".join(k) for k in set(targets) - set(name_map))
    stale = sorted("/".join(k) for k in set(name_map) - set(targets))
    if uncovered or stale:  # a bug in a family's name map, not in the checkpoint
        raise ValueError("name map and model disagree: "
                         + "; ".join(filter(None, [uncovered and listing("params with no source", uncovered),
                                                   stale and listing("sources for no param", stale)])))

    available, chosen, missing, mismatched = set(state), {}, [], []
    consumed: set[str] = set()
    for path, src in name_map.items():
        present = [k for k in src.keys if k in available]
        consumed.update(present)  # alternatives of one tensor are all accounted for
        if not present:
            missing.append(src.keys[0])
            continue
        chosen[path] = present[0]
        want = src.transform.source_shape(tuple(targets[path].shape))
        if tuple(state.shape(present[0])) != want:
            mismatched.append(f"{present[0]} has shape {tuple(state.shape(present[0]))}, "
                              f"expected {want} for {'/'.join(path)}")
    patterns = [re.compile(r) for r in ignored]
    unexpected = sorted(k for k in available - consumed if not any(r.search(k) for r in patterns))
    if missing or unexpected or mismatched:
        problems = [missing and listing("missing keys", sorted(missing)),
                    unexpected and listing("unexpected keys", unexpected),
                    mismatched and listing("shape mismatches", mismatched)]
        raise ValueError(f"checkpoint {state.source} does not fit the model: "
                         + "; ".join(p for p in problems if p)
                         + ". Check that config.json matches the weights and the model family.")

    shardings = None
    if mesh is not None:
        shardings = traverse_util.flatten_dict(boxed_shardings(abstract_params, mesh))
    out = {}
    for path, key in chosen.items():
        target = targets[path]
        leaf = name_map[path].transform(state[key], tuple(target.shape))
        cast = dtype is not None and jnp.issubdtype(target.dtype, jnp.floating)
        leaf = np.asarray(leaf).astype(dtype if cast else target.dtype, copy=False)
        if shardings is not None:
            out[path] = jax.device_put(leaf, fit_sharding_to_shape(shardings[path], leaf.shape))
        else:
            out[path] = jax.device_put(leaf)
        del leaf  # the host copy goes as soon as the device holds it
    return traverse_util.unflatten_dict(out)


# --------------------------------------------------------------------------------------------
# 4. The one load of every family
# --------------------------------------------------------------------------------------------


def abstract_on_mesh(abstract_params: Any, mesh: Mesh | None) -> Any:
    """Boxed abstract params -> plain ``jax.ShapeDtypeStruct``s carrying their mesh shardings."""
    plain = nn.meta.unbox(abstract_params)
    if mesh is None:
        return plain
    shardings = boxed_shardings(abstract_params, mesh)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                          sharding=fit_sharding_to_shape(s, a.shape)),
        plain, shardings, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def as_hf_config(hf_config: Any) -> Any:
    """A transformers config object from itself or from a dict of its fields with 'model_type'
    (e.g. an experiment config's architecture preset)."""
    if hasattr(hf_config, "to_dict") and hasattr(hf_config, "model_type"):
        return hf_config
    fields = dict(hf_config.items() if hasattr(hf_config, "items") else hf_config)
    if "model_type" not in fields:
        raise ValueError(f"an architecture needs 'model_type' beside its Hugging Face config "
                         f"fields; got keys {sorted(fields)}")
    import_transformers()
    from transformers import AutoConfig  # noqa: PLC0415  (heavy import, only when loading)

    return AutoConfig.for_model(**fields)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a family's ``load`` starts from (``open_checkpoint``).

    hf_config: the architecture (a transformers config; a dict for GGUF files).
    state: the lazy weights, or None when planning without them (config.json alone, hf_config=).
    source: the folder or file, for error messages (None for an architecture alone).
    """

    hf_config: Any
    state: StateDict | None
    source: str | None


def open_checkpoint(path_or_name: str | os.PathLike | None, *, abstract: bool = False,
                    hf_config: Any = None, who: str = "load") -> Checkpoint:
    """A checkpoint folder's (or hub name's) config and lazy weights, or an architecture alone.

    abstract=True reads no tensor and accepts a folder with config.json and no weight files;
    hf_config (abstract only: a transformers config or a dict of its fields) replaces the folder.
    """
    if hf_config is not None:
        if not abstract:
            raise ValueError(f"{who}: hf_config= builds the architecture only; pass abstract=True, "
                             "or a checkpoint folder to load real weights")
        return Checkpoint(as_hf_config(hf_config), None, None)
    folder = resolve_checkpoint(path_or_name)
    has_weights = any((folder / f).exists() for f in WEIGHT_FILES)
    state = open_state_dict(folder) if not abstract or has_weights else None
    return Checkpoint(read_hf_config(folder), state, str(folder))


def load_params(checkpoint: Checkpoint, abstract_params: Any,
                name_map: Callable[[StateDict], tuple[NameMap, Sequence[str]]], *,
                dtype: Any = None, mesh: Mesh | None = None, abstract: bool = False
                ) -> dict[str, Any]:
    """``{'params': ...}`` of a family's module, the last step of every ``load``.

    Args:
      checkpoint: from ``open_checkpoint`` (or a GGUF file's config and state).
      abstract_params: ``jax.eval_shape(module.init, ...)['params']``, boxed with logical names.
      name_map: state -> (the family's name map, regexes of keys it knowingly ignores); called
        only when tensors are read (the map may depend on the checkpoint's key prefix).
      dtype, mesh: cast floating leaves to ``dtype``; place each on its sharding on ``mesh``.
      abstract: return ``jax.ShapeDtypeStruct`` leaves (with their shardings) and read nothing.
    """
    if abstract:
        return {"params": abstract_on_mesh(abstract_params, mesh)}
    names, ignored = name_map(checkpoint.state)
    return {"params": convert_checkpoint(checkpoint.state, names, abstract_params, dtype=dtype,
                                         mesh=mesh, ignored=ignored)}
