"""The project's one loader of Hugging Face checkpoint folders into Flax param trees.

Three layers, so new families (OPT, T5, Llama, CLIP) only add a name map:
  1. reading:    ``open_state_dict(folder)`` -> a lazy ``{pytorch_name: np.ndarray}`` over
                 safetensors, pytorch_model.bin or HF's flax_model.msgpack, each single or sharded
                 (flax renamed to PyTorch naming). Shapes come from headers (msgpack: a walk of its
                 structure); each tensor is read when asked for. bfloat16 reads via ml_dtypes.
  2. name map:   per family, ``{flax_param_path: Source(hf_keys, transform)}``; the first present
                 key of ``hf_keys`` wins, so tied or legacy names are simply alternatives.
  3. conversion: ``convert_checkpoint`` checks the map against ``jax.eval_shape(module.init)``
                 (missing, unexpected and mis-shaped keys all reported by name, before any tensor
                 is read), then converts leaf by leaf, casting and, given a mesh, placing each leaf
                 on its sharding at once so a big model never sits whole on the host twice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct
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

# --------------------------------------------------------------------------------------------
# 1. Finding and reading a checkpoint folder
# --------------------------------------------------------------------------------------------

# transformers 4's FLAX_WEIGHTS_INDEX_NAME (Flax save_pretrained with max_shard_size); v5 has no Flax.
FLAX_INDEX_NAME = "flax_model.msgpack.index.json"
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


def read_hf_config(folder: str | os.PathLike) -> Any:
    """The folder's config.json as a transformers config object (no network)."""
    from transformers import AutoConfig  # noqa: PLC0415  (heavy import, only when loading)

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder")
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


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
    return np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _safetensors_entries(path: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    # The format is an 8-byte header length, a JSON header, then raw little-endian bytes; reading
    # it directly handles bfloat16 (safetensors' numpy API cannot) without torch or a device.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which this reader "
                             f"does not handle (known: {sorted(_SAFETENSORS_DTYPES)})")
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

    try:  # mmap keeps a big .bin on disk until each tensor is asked for
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # pre-zipfile (torch < 1.6) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (tuple(v.shape), functools.partial(_torch_to_numpy, v)) for k, v in state.items()}


def _flax_leaf_layout(path: Sequence[str], ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """(PyTorch name, axis permutation or None) of one HF-flax leaf ('bert', ..., 'kernel')."""
    *parents, leaf = path
    perm = None
    if leaf == "kernel":
        leaf = "weight"
        if ndim == 2:  # Dense [in, out] -> Linear [out, in]
            perm = (1, 0)
        elif ndim == 4:  # Conv [h, w, in, out] -> [out, in, h, w]
            perm = (3, 2, 0, 1)
    elif leaf in ("embedding", "scale"):
        leaf = "weight"
    return ".".join([*parents, leaf]), perm


def flax_to_pytorch_name(path: Sequence[str], value: np.ndarray) -> tuple[str, np.ndarray]:
    """One HF-flax leaf ('bert','encoder','layer','0',...,'kernel') in PyTorch naming and layout."""
    name, perm = _flax_leaf_layout(path, value.ndim)
    return name, (value if perm is None else value.transpose(perm))


# HF's flax checkpoints are flax.serialization.msgpack_serialize of the nested params dict: maps of
# str keys whose leaves are msgpack ext type 1 = packb((shape, dtype name, raw C-order bytes)), and
# arrays over 1 GiB split into {'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}.
# The walker below reads only the structure and records where each array's bytes lie, so shapes
# are known without reading a tensor and each tensor is read (seek + read) only when asked for.
_FLAX_NDARRAY_EXT, _FLAX_NPSCALAR_EXT = 1, 3


@dataclasses.dataclass(frozen=True)
class _Blob:
    """A msgpack bin payload left on disk: ``length`` bytes at ``offset``."""

    offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class _FlaxArray:
    shape: tuple[int, ...]
    dtype: Any
    blobs: tuple[_Blob, ...]  # one per chunk, concatenated in order (flattened, C order)


class _MsgpackWalker:
    """Just enough of msgpack (https://github.com/msgpack/msgpack/blob/master/spec.md) to walk a
    flax checkpoint: values are parsed except bin payloads, which become ``_Blob``s."""

    def __init__(self, f: Any, path: Path):
        self.f, self.path, self.size = f, path, os.fstat(f.fileno()).st_size

    def _read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError(f"{self.path}: truncated msgpack file (wanted {n} bytes at offset "
                             f"{self.f.tell() - len(b)}); re-download the checkpoint")
        return b

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._read(n), "big")

    def _blob(self, n: int) -> _Blob:
        blob = _Blob(self.f.tell(), n)
        if blob.offset + n > self.size:  # a seek past the end would not notice a cut-off file
            raise ValueError(f"{self.path}: truncated msgpack file ({n} bytes of data at offset "
                             f"{blob.offset}, file size {self.size}); re-download the checkpoint")
        self.f.seek(n, os.SEEK_CUR)
        return blob

    def value(self) -> Any:
        t = self._read(1)[0]
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if 0x80 <= t <= 0x8F:
            return self._map(t & 0x0F)
        if 0x90 <= t <= 0x9F:
            return [self.value() for _ in range(t & 0x0F)]
        if 0xA0 <= t <= 0xBF:
            return self._read(t & 0x1F).decode()
        fixed = {0xC0: None, 0xC2: False, 0xC3: True}
        if t in fixed:
            return fixed[t]
        sizes = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
        if t in sizes:
            return self._uint(sizes[t])
        sizes = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
        if t in sizes:
            return int.from_bytes(self._read(sizes[t]), "big", signed=True)
        if t in (0xCA, 0xCB):
            return struct.unpack(">f" if t == 0xCA else ">d", self._read(4 if t == 0xCA else 8))[0]
        sizes = {0xC4: 1, 0xC5: 2, 0xC6: 4}
        if t in sizes:
            return self._blob(self._uint(sizes[t]))
        sizes = {0xD9: 1, 0xDA: 2, 0xDB: 4}
        if t in sizes:
            return self._read(self._uint(sizes[t])).decode()
        if t in (0xDC, 0xDD):
            return [self.value() for _ in range(self._uint(2 if t == 0xDC else 4))]
        if t in (0xDE, 0xDF):
            return self._map(self._uint(2 if t == 0xDE else 4))
        sizes = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
        if t in sizes:
            return self._ext(sizes[t])
        sizes = {0xC7: 1, 0xC8: 2, 0xC9: 4}
        if t in sizes:
            return self._ext(self._uint(sizes[t]))
        raise ValueError(f"{self.path}: byte 0x{t:02x} at offset {self.f.tell() - 1} is not "
                         "msgpack; the file is not a flax checkpoint (or is corrupt)")

    def _map(self, n: int) -> dict[str, Any]:
        return {str(self.value()): self.value() for _ in range(n)}

    def _ext(self, length: int) -> _FlaxArray:
        code, start = self._read(1)[0], self.f.tell()
        if code not in (_FLAX_NDARRAY_EXT, _FLAX_NPSCALAR_EXT):
            raise ValueError(f"{self.path}: msgpack extension type {code} at offset {start} is not "
                             "an array; only flax array leaves are supported in weight files")
        shape, dtype, blob = self.value()  # flax's _ndarray_to_bytes: (shape, dtype name, bytes)
        if self.f.tell() != start + length or not isinstance(blob, _Blob):
            raise ValueError(f"{self.path}: malformed flax array at offset {start}")
        dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        return _FlaxArray(tuple(int(d) for d in shape), dtype, (blob,))


def _unchunk(node: Any) -> Any:
    """flax's chunked-array dicts -> one _FlaxArray (the walk's counterpart of msgpack_restore)."""
    if not isinstance(node, dict):
        return node
    if "__msgpack_chunked_array__" in node:
        shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        return _FlaxArray(shape, chunks[0].dtype, tuple(b for c in chunks for b in c.blobs))
    return {k: _unchunk(v) for k, v in node.items()}


def _read_flax_array(path: Path, array: _FlaxArray) -> np.ndarray:
    parts = []
    with open(path, "rb") as f:
        for blob in array.blobs:
            f.seek(blob.offset)
            parts.append(f.read(blob.length))
    data = b"".join(parts) if len(parts) > 1 else parts[0]
    return np.frombuffer(data, dtype=np.dtype(array.dtype).newbyteorder("<")).reshape(array.shape)


def _flax_msgpack_tree(path: Path) -> dict[tuple[str, ...], _FlaxArray]:
    """The flattened {flax path: _FlaxArray} of one flax msgpack file; no tensor is read."""
    with open(path, "rb") as f:
        tree = _unchunk(_MsgpackWalker(f, path).value())
    flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {}
    bad = sorted("/".join(k) for k, v in flat.items() if not isinstance(v, _FlaxArray))
    if not flat or bad:
        raise ValueError(f"{path}: not a flax params checkpoint (expected a nested dict of arrays"
                         + (f"; non-array leaves: {', '.join(bad[:5])}" if bad else "") + ")")
    return flat


def _flax_msgpack_entries(path: Path, tree: dict[tuple[str, ...], _FlaxArray] | None = None
                          ) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    entries = {}
    for flax_path, array in (_flax_msgpack_tree(path) if tree is None else tree).items():
        key, perm = _flax_leaf_layout(flax_path, len(array.shape))
        shape = array.shape if perm is None else tuple(array.shape[i] for i in perm)

        def read(array: _FlaxArray = array, perm: tuple[int, ...] | None = perm) -> np.ndarray:
            value = _read_flax_array(path, array)
            return value if perm is None else value.transpose(perm)

        entries[key] = (shape, read)
    return entries


def _sharded_flax_msgpack_entries(folder: Path) -> dict:
    """HF flax ``save_pretrained`` with shards: the index maps '/'-joined flax paths to shard files."""
    index = folder / FLAX_INDEX_NAME
    weight_map = json.loads(index.read_text())["weight_map"]
    entries: dict = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{index} lists shard {shard!r}, which is not in {folder}; "
                                    "download every shard of the checkpoint")
        tree = _flax_msgpack_tree(folder / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(listed - {"/".join(p) for p in tree})
        if absent:  # a stale index or a partial shard: fail before loading anything
            raise ValueError(f"{index} says {shard} holds {_listing('tensors', absent)}, but that "
                             "file does not; re-download the checkpoint")
        for key, value in _flax_msgpack_entries(folder / shard, tree).items():
            if key in entries:
                raise ValueError(f"{folder}: tensor {key!r} is stored in more than one shard")
            entries[key] = value
    return entries


def _sharded(folder: Path, index_name: str, reader: Callable) -> dict:
    weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    entries = {}
    for shard in sorted(set(weight_map.values())):
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
        "flax_model.msgpack": lambda: _flax_msgpack_entries(folder / "flax_model.msgpack"),
        FLAX_INDEX_NAME: lambda: _sharded_flax_msgpack_entries(folder),
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


def _listing(title: str, items: Sequence[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


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
                         + "; ".join(filter(None, [uncovered and _listing("params with no source", uncovered),
                                                   stale and _listing("sources for no param", stale)])))

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
        problems = [missing and _listing("missing keys", sorted(missing)),
                    unexpected and _listing("unexpected keys", unexpected),
                    mismatched and _listing("shape mismatches", mismatched)]
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
# Public entry points
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


def load_masked_lm(path_or_name: str | os.PathLike, *, dtype: Any = jnp.float32,
                   mesh: Mesh | None = None, abstract: bool = False) -> tuple[Any, dict[str, Any], Any]:
    """Loads a BERT / RoBERTa / XLM-R checkpoint as a frozen MaskedLM: ``roberta.load`` (kept here
    because callers reach it through this module; the family's name map lives in roberta.py)."""
    from lqae_vlap.models import roberta  # noqa: PLC0415  (roberta imports this module)

    return roberta.load(path_or_name, dtype=dtype, mesh=mesh, abstract=abstract)


def load_tokenizer(path_or_name: str | os.PathLike) -> Any:
    """The checkpoint's transformers tokenizer (AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(resolve_checkpoint(path_or_name)), local_files_only=True)
