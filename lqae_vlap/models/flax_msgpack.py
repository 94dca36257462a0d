"""Hugging Face's flax_model.msgpack checkpoints (single or sharded), read lazily in PyTorch naming.

HF's flax checkpoints are ``flax.serialization.msgpack_serialize`` of the nested params dict: maps
of str keys whose leaves are msgpack ext type 1 = packb((shape, dtype name, raw C-order bytes)),
and arrays over 1 GiB split into {'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks':
{...}}. The walker below reads only the structure and records where each array's bytes lie, so
shapes are known without reading a tensor and each tensor is read (seek + read) only when asked
for. Leaves are renamed and transposed to PyTorch's names and layouts, so ``hf_weights``'s one
name map per family serves every format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

# transformers 4's FLAX_WEIGHTS_INDEX_NAME (Flax save_pretrained with max_shard_size); v5 has no Flax.
FLAX_INDEX_NAME = "flax_model.msgpack.index.json"
Entries = dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]


def listing(title: str, items: Sequence[str], limit: int = 20) -> str:
    """'title (n): a, b, ... and k more' for error messages that name what is wrong."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


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
        shape = tuple(int(d) for d in shape)
        if blob.length != np.dtype(dtype).itemsize * math.prod(shape):
            raise ValueError(f"{self.path}: the array at offset {start} is {np.dtype(dtype).name} "
                             f"{shape} but holds {blob.length:,} bytes; the file is damaged: "
                             "re-download the checkpoint")
        return _FlaxArray(shape, dtype, (blob,))


def _unchunk(node: Any, path: Path) -> Any:
    """flax's chunked-array dicts -> one _FlaxArray (the walk's counterpart of msgpack_restore)."""
    if not isinstance(node, dict):
        return node
    if "__msgpack_chunked_array__" in node:
        shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        array = _FlaxArray(shape, chunks[0].dtype, tuple(b for c in chunks for b in c.blobs))
        if sum(b.length for b in array.blobs) != np.dtype(array.dtype).itemsize * math.prod(shape):
            raise ValueError(f"{path}: a chunked array of shape {shape} holds "
                             f"{sum(b.length for b in array.blobs):,} bytes, not what its shape "
                             "needs; the file is damaged: re-download the checkpoint")
        return array
    return {k: _unchunk(v, path) for k, v in node.items()}


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
    try:
        with open(path, "rb") as f:
            tree = _unchunk(_MsgpackWalker(f, path).value(), path)
    except (UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError) as e:  # garbage bytes that happen to parse as msgpack for a while
        raise ValueError(f"{path} is not a flax checkpoint or is damaged ({type(e).__name__} "
                         "while reading its structure); re-download the checkpoint") from e
    flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {}
    bad = sorted("/".join(k) for k, v in flat.items() if not isinstance(v, _FlaxArray))
    if not flat or bad:
        raise ValueError(f"{path}: not a flax params checkpoint (expected a nested dict of arrays"
                         + (f"; non-array leaves: {', '.join(bad[:5])}" if bad else "") + ")")
    return flat


def flax_msgpack_entries(path: Path, tree: dict[tuple[str, ...], _FlaxArray] | None = None
                         ) -> Entries:
    entries = {}
    for flax_path, array in (_flax_msgpack_tree(path) if tree is None else tree).items():
        key, perm = _flax_leaf_layout(flax_path, len(array.shape))
        shape = array.shape if perm is None else tuple(array.shape[i] for i in perm)

        def read(array: _FlaxArray = array, perm: tuple[int, ...] | None = perm) -> np.ndarray:
            value = _read_flax_array(path, array)
            return value if perm is None else value.transpose(perm)

        entries[key] = (shape, read)
    return entries


def sharded_flax_msgpack_entries(folder: Path) -> Entries:
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
            raise ValueError(f"{index} says {shard} holds {listing('tensors', absent)}, but that "
                             "file does not; re-download the checkpoint")
        for key, value in flax_msgpack_entries(folder / shard, tree).items():
            if key in entries:
                raise ValueError(f"{folder}: tensor {key!r} is stored in more than one shard")
            entries[key] = value
    return entries
