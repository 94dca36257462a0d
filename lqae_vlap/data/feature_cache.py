"""Cache a frozen vision encoder's features on disk, computed once per (model, preprocessing, data).

VLAP never trains its vision encoder (CLIP ViT-B/32 or BEiT), so each image's token features are
a fixed function of the image: compute them once, store them as one ``.npy`` per dataset split,
and train on memory-mapped rows instead of decoding JPEGs and running the ViT every epoch.

The key says exactly what produced the features (:func:`cache_key`): the vision model (its path
and a fingerprint of its weight files, :func:`vision_identity`; or the config of a stand-in), the
preprocessing (name and parameters: e.g. CLIP's resize 224, crop 224, bicubic, mean / std), the
dataset, split and length, and the stored dtype. Anything that changes the features must change the
key; anything the key omits is the caller's promise that it does not matter.

Files in ``cache_dir``: ``<key>.npy`` (the features, [N, ...] as ``feature_fn`` returns them per
example, typically [N, T, Dv]) and ``<key>.json`` (the key's parts, shape, dtype, the sha256 of the
``.npy`` and the examples whose unreadable image was replaced, ``data/images.py``). The ``.npy`` is
written under a temporary name and renamed only when complete, after its ``.json``: an interrupted
run never leaves a file that looks complete (a killed run leaves ``<key>.npy.tmp-<pid>``, which is
safe to delete). In a multi-host run, compute on one host first (or let each host compute its own
copy on local disk); two hosts writing the same key race only for the final rename, which is atomic.

Checksums. Opening a cache reads the whole ``.npy`` once and compares its sha256 with the one
recorded when it was written (1.8 GB/s from the page cache on one core, else the disk's speed):
same-size garbage, a truncated or a replaced file is named, with the command that rebuilds it,
instead of training on it. A verified file's size, mtime and inode go into ``<key>.verified``
(once the file is over 2 s old: mtimes are coarse); later opens of the unchanged file skip the
full read (any write to the file changes its mtime and brings the full check back).

``CachedFeatures`` then wraps the original source: its examples are the source's fields minus
'image', plus 'vision_features'.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import operator
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lqae_vlap.data.batches import IndexedBatches
from lqae_vlap.data.indexing import check_index

REQUIRED_PARTS = ("vision", "preprocess", "dataset", "split", "num_examples", "dtype")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".npz", ".gguf", ".pt", ".pth", ".h5")
_MIB = 1 << 20
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_RACY_S = 2

__all__ = ["cache_key", "CacheKey", "vision_identity", "weights_fingerprint", "FeatureCache",
           "CachedFeatures", "cache_sources", "REQUIRED_PARTS"]


class CacheKey(str):
    """A cache key (64 hex digits) that remembers the parts it was made from (``.parts``)."""

    parts: dict[str, Any]


def _canonical(value: Any, where: str) -> Any:
    """JSON-ready copy: tuples -> lists, NumPy scalars -> Python, paths -> str; else a TypeError."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cache_key: {where} has a non-string key {k!r}; use string keys.")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not np.isfinite(value):
        raise TypeError(f"cache_key: {where} is {value}, which JSON cannot hold.")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cache_key: {where} is a {type(value).__name__}, which has no canonical JSON "
                    "form; pass plain numbers, strings, lists and dicts (e.g. dtype as 'float16').")


def cache_key(**parts: Any) -> CacheKey:
    """sha256 of the canonical JSON of ``parts`` (sorted keys, no whitespace).

    Required parts (so that no cache forgets one): ``vision`` (:func:`vision_identity`),
    ``preprocess`` (e.g. ``{'name': 'clip_resize_crop', 'size': 224, 'crop': 224, 'resample':
    'bicubic', 'mean': CLIP_MEAN, 'std': CLIP_STD}``), ``dataset``, ``split``, ``num_examples``
    and ``dtype`` (of the stored features, e.g. 'float16'). Extra parts (the layer read, a prompt)
    are hashed too.
    """
    missing = [p for p in REQUIRED_PARTS if p not in parts]
    if missing:
        raise ValueError(f"cache_key: missing parts {missing}; a key must name {list(REQUIRED_PARTS)} "
                         "so that features of different models, preprocessing or data never mix.")
    # np.float16, 'float16', 'f2' name one dtype, so one key; a bad dtype fails here, not later.
    canonical = _canonical({**parts, "dtype": np.dtype(parts["dtype"]).name}, "parts")
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    key = CacheKey(hashlib.sha256(text.encode("ascii")).hexdigest())
    key.parts = canonical
    return key


def weights_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """A file's size and the sha256 of its first and last MiB: cheap for multi-GB checkpoints,
    and a re-saved, re-trained or truncated file changes it (its header or its tail)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(size - _MIB, _MIB))
            digest.update(f.read(_MIB))
    return {"name": path.name, "size": size, "head_tail_sha256": digest.hexdigest()}


def vision_identity(model_path: str | os.PathLike | None = None, *,
                    config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``vision`` part of a cache key.

    model_path: a checkpoint file, or a Hugging Face folder (its weight files are fingerprinted and
      its config.json hashed whole). config: for a stand-in encoder without weights on disk (its
      full config, including the seed its weights are drawn from).
    """
    if (model_path is None) == (config is None):
        raise ValueError("vision_identity: pass exactly one of model_path (weights on disk) or "
                         "config (a stand-in's full config, seed included).")
    if config is not None:
        return {"config": _canonical(dict(config), "config")}
    path = Path(model_path).resolve()
    if path.is_file():
        return {"path": str(path), "weights": [weights_fingerprint(path)]}
    if not path.is_dir():
        raise FileNotFoundError(f"vision_identity: {path} is neither a checkpoint file nor a folder.")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise FileNotFoundError(f"vision_identity: no weight files ({', '.join(WEIGHT_SUFFIXES)}) "
                                f"in {path}.")
    out: dict[str, Any] = {"path": str(path), "weights": [weights_fingerprint(p) for p in weights]}
    if (path / "config.json").is_file():
        out["config_sha256"] = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return out


def _rerun() -> str:
    """The command that started this run, when it is the CLI (the cache is rebuilt by it)."""
    if sys.argv and sys.argv[0].replace(os.sep, "/").endswith("lqae_vlap/main.py"):
        return "python -m lqae_vlap.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return ""


def _corrupt(path: Path, problem: str) -> ValueError:
    # A ValueError: main prints it as one line (it is bad input, not a bug).
    files = " ".join(shlex.quote(str(p)) for p in
                     (path, path.with_suffix(".json"), path.with_suffix(".verified")))
    rerun = _rerun()
    how = (f"rm -f {files} && {rerun}" if rerun else
           f"rm -f {files}, then run again")
    return ValueError(f"corrupt feature cache: {path} {problem}. Rebuild it: {how} (the features "
                      "are recomputed and stored)")


def file_sha256(path: str | os.PathLike, chunk: int = 16 * _MIB) -> str:
    """sha256 of a file's bytes, read in chunks (a cache file can be far larger than memory)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _write_stamp(path: Path, sha256: str) -> None:
    """Records that ``path`` as it is now (size, mtime, inode) has the bytes of ``sha256``.

    Not for a file modified in the last ``_RACY_S`` seconds: mtimes are coarse (a few ms), so a
    write just after this check could leave the same mtime (git's "racily clean" index entries);
    such a file is verified in full again at its next open.
    """
    if time.time_ns() - path.stat().st_mtime_ns < _RACY_S * 1e9:
        return
    stamp_path = path.with_suffix(".verified")
    tmp = stamp_path.with_name(f"{stamp_path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({**_stamp(path), "sha256": sha256}), encoding="utf-8")
        os.replace(tmp, stamp_path)
    except OSError:  # a read-only cache is still usable; it is verified in full at every open
        tmp.unlink(missing_ok=True)


class FeatureCache:
    """Features stored as ``cache_dir/<key>.npy`` + ``<key>.json`` (module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)

    def paths(self, key: str) -> tuple[Path, Path]:
        """(features .npy, metadata .json) of ``key``."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"FeatureCache: {key!r} is not a cache key; make one with cache_key(...).")
        return self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"

    def get(self, key: str, verify: bool = True) -> np.ndarray | None:
        """The stored features of ``key`` (read-only memory map), or None when not computed.

        verify: compare the file's sha256 with the recorded one (module docstring); a damaged
        file raises a ValueError that names it and the command that rebuilds it.
        """
        path, meta_path = self.paths(key)
        if not path.is_file():
            return None
        if not meta_path.is_file():
            raise _corrupt(path, f"has no metadata file {meta_path.name}")
        meta = self._metadata(path, meta_path)
        expected = (tuple(meta["shape"]), np.dtype(meta["dtype"]), meta["key"])
        try:
            features = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _corrupt(path, f"cannot be read as .npy ({e!r})") from e
        if expected[2] != key:
            raise _corrupt(path, f"has metadata for key {expected[2]!r}")
        if (features.shape, features.dtype) != expected[:2]:
            raise _corrupt(path, f"holds {features.dtype} {features.shape} but its metadata says "
                           f"{expected[1]} {expected[0]}")
        if verify:
            self._verify(path, meta)
        return features

    @staticmethod
    def _metadata(path: Path, meta_path: Path) -> dict[str, Any]:
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            meta["shape"], meta["dtype"] = list(meta["shape"]), np.dtype(meta["dtype"]).name
            if not isinstance(meta["key"], str):
                raise TypeError(f"key {meta['key']!r} is not a string")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _corrupt(path, f"has an unreadable metadata file {meta_path.name} ({e!r})") from e
        return meta

    def metadata(self, key: str) -> dict[str, Any]:
        """The ``.json`` written beside ``key``'s features (after ``get`` found them)."""
        path, meta_path = self.paths(key)
        return self._metadata(path, meta_path)

    @staticmethod
    def _verify(path: Path, meta: dict[str, Any]) -> None:
        """The file's sha256 against the one recorded at writing, unless ``<key>.verified`` says
        this very file (size, mtime, inode) was verified before."""
        recorded = meta.get("sha256")
        if not isinstance(recorded, str):
            raise _corrupt(path, "has no checksum in its metadata (written before checksums were "
                           "recorded, or the metadata was edited), so it cannot be verified")
        stamp_path = path.with_suffix(".verified")
        stamp = {**_stamp(path), "sha256": recorded}
        try:
            if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
                return
        except (OSError, ValueError):
            pass  # no stamp yet, or a damaged one: verify in full
        actual = file_sha256(path)
        if actual != recorded:
            raise _corrupt(path, f"does not match the checksum recorded when it was written "
                           f"(sha256 {actual[:12]}... instead of {recorded[:12]}...): its bytes "
                           "changed on disk (damaged, overwritten or truncated)")
        _write_stamp(path, recorded)

    def get_or_compute(self, key: str, source: Any,
                       feature_fn: Callable[[np.ndarray], Any], *, batch_size: int,
                       preprocess: Callable[[np.ndarray], np.ndarray] | None,
                       dtype: Any = None, num_workers: int = 0) -> np.ndarray:
        """The features of every example of ``source``, computed now unless already stored.

        Args:
          key: from :func:`cache_key` (its parts are recorded); a plain 64-hex string works too.
          source: random access, ``source[i]['image']`` uint8 [H, W, 3]; len must equal the key's
            ``num_examples`` when the key has parts.
          feature_fn: images [batch_size, S, S, 3] (as ``preprocess`` makes them) -> features
            [batch_size, ...], e.g. a jitted frozen CLIP returning [B, T, Dv]; runs on the device.
            Every call gets a full batch (the last one is padded with the first examples, so a
            jitted function compiles once); padded rows are dropped.
          batch_size: images per ``feature_fn`` call.
          preprocess: image uint8 [H, W, 3] -> model input [S, S, 3] on the host (e.g.
            ``functools.partial(clip_resize_crop, size=224, crop=224)``); None = as stored.
          dtype: stored dtype; None = the key's ``dtype`` part (else float32).
          num_workers: threads that decode and preprocess images ahead of the device.

        Returns:
          [N, ...] read-only memory map of the stored features.
        """
        parts = getattr(key, "parts", None)
        stored = np.dtype(dtype if dtype is not None else (parts or {}).get("dtype", "float32"))
        if parts is not None and np.dtype(parts["dtype"]) != stored:
            raise ValueError(f"get_or_compute: dtype {stored} disagrees with the key's dtype "
                             f"{parts['dtype']}; make the key with the dtype you store.")
        n = len(source)
        if parts is not None and parts["num_examples"] != n:
            raise ValueError(f"get_or_compute: the source has {n} examples but the key says "
                             f"{parts['num_examples']}; make the key from this source.")
        existing = self.get(key)
        if existing is not None:
            return existing
        if operator.index(batch_size) < 1 or n == 0:
            raise ValueError(f"get_or_compute: need batch_size >= 1 and a non-empty source, got "
                             f"batch_size={batch_size}, {n} examples.")
        path, meta_path = self.paths(key)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            shape = self._compute(tmp, source, feature_fn, min(int(batch_size), n), preprocess,
                                  stored, num_workers)
            replaced = dict(getattr(source, "replacements", None) or {})
            meta = {"key": str(key), "parts": parts, "shape": list(shape), "dtype": stored.name,
                    "num_examples": n, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "sha256": file_sha256(tmp),
                    # example -> the example whose image stands in for its unreadable one
                    "replaced": {str(i): int(j) for i, j in sorted(replaced.items())}}
            meta_tmp = meta_path.with_name(f"{meta_path.name}.tmp-{os.getpid()}")
            with open(meta_tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            os.replace(meta_tmp, meta_path)
            os.replace(tmp, path)  # last: only a complete file ever carries the final name
        except BaseException:
            for leftover in (tmp, meta_path.with_name(f"{meta_path.name}.tmp-{os.getpid()}")):
                leftover.unlink(missing_ok=True)
            raise
        result = self.get(key, verify=False)  # its bytes were just hashed
        assert result is not None
        return result

    @staticmethod
    def _compute(tmp: Path, source: Any, feature_fn: Callable[[np.ndarray], Any], batch: int,
                 preprocess: Callable[[np.ndarray], np.ndarray] | None, dtype: np.dtype,
                 num_workers: int) -> tuple[int, ...]:
        def load(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
            del rng  # deterministic: the cache must not depend on an augmentation draw
            image = example["image"]
            return {"image": np.asarray(image if preprocess is None else preprocess(image))}

        n = len(source)
        steps = -(-n // batch)
        out = None
        # In order, no shuffling; the last batch runs into the next "epoch" = the first examples.
        batches = IndexedBatches(source, global_batch_size=batch, seed=0, shuffle=False,
                                 preprocess=load, num_workers=num_workers, prefetch=2)
        stream = batches.iterate(0, steps)
        try:
            for step, data in stream:
                features = np.asarray(feature_fn(data["image"]))
                if features.ndim < 1 or features.shape[0] != batch:
                    raise ValueError(f"feature_fn returned shape {features.shape} for {batch} "
                                     "images; it must return [batch, ...].")
                start = step * batch
                take = min(batch, n - start)
                rows = features[:take].astype(dtype)
                if not np.all(np.isfinite(rows)):
                    raise FloatingPointError(
                        f"feature_fn gave non-finite features for examples {start}..{start + take - 1}"
                        f" (stored as {dtype}); check the model, or store a wider dtype.")
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                    shape=(n, *features.shape[1:]))
                elif features.shape[1:] != out.shape[1:]:
                    raise ValueError(f"feature_fn returned per-example shape {features.shape[1:]} at "
                                     f"batch {step} but {out.shape[1:]} before.")
                out[start:start + take] = rows
            assert out is not None
            out.flush()
            return tuple(out.shape)
        finally:
            stream.close()  # stops the prefetch thread now, not when the traceback is collected
            batches.close()
            del out  # closes the memory map before the rename (or the unlink on failure)


class _MappedFile(NamedTuple):
    """Where a memory-mapped array lies: enough to map it again in another process."""

    filename: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    order: str


class CachedFeatures:
    """``source`` with its images replaced by stored features.

    ``src[i] -> source's fields minus 'image' + {'vision_features': features[i]}`` ([T, Dv]). The
    fields come from ``source.fields_without_image(i)`` when the source has it (no image is read);
    other attributes (``captions``, ``references``, ...) are the source's. ``replaced``: example ->
    the example whose image stood in for its unreadable one when the features were computed
    (``images.ReplaceBadImages``); such an example takes that one's fields too, as it would
    without the cache.
    """

    def __init__(self, source: Any, features: np.ndarray,
                 replaced: Mapping[int, int] | None = None) -> None:
        if len(source) != len(features):
            raise ValueError(f"CachedFeatures: the source has {len(source)} examples but the "
                             f"features {len(features)} rows; were they computed for another split?")
        self.source = source
        self.features = features
        self.replaced = {int(i): int(j) for i, j in (replaced or {}).items()}

    @property
    def num_bad_images(self) -> int:
        """Examples whose image could not be read when the features were computed."""
        return len(self.replaced)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(index, len(self), "CachedFeatures")
        j = self.replaced.get(i, i)
        fields = getattr(self.source, "fields_without_image", None)
        if fields is not None:
            example = dict(fields(j))
        else:
            example = {k: v for k, v in self.source[j].items() if k != "image"}
        example["vision_features"] = np.asarray(self.features[i])
        return example

    def __getstate__(self) -> dict[str, Any]:
        # A memory map would pickle as its whole contents (a cache can be ~TB): send where it
        # lies instead, and map the file again on unpickling (data/batches.py's worker processes).
        state = dict(self.__dict__)
        f = self.features
        if isinstance(f, np.memmap) and isinstance(f.base, mmap.mmap) and f.filename:
            state["features"] = _MappedFile(f.filename, f.dtype.str, tuple(f.shape), int(f.offset),
                                            "F" if f.flags.f_contiguous and not f.flags.c_contiguous
                                            else "C")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        f = state["features"]
        if isinstance(f, _MappedFile):
            state["features"] = np.memmap(f.filename, dtype=np.dtype(f.dtype), mode="r",
                                          offset=f.offset, shape=f.shape, order=f.order)
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "features", "replaced"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.source, name)


def cache_sources(sources: Mapping[str, Any], cache_dir: str | os.PathLike, *,
                  parts: Mapping[str, Any], encode: Callable[[np.ndarray], Any],
                  dtype: str = "float32", batch_size: int = 256,
                  preprocess: Callable[[Any], np.ndarray] | None = None,
                  num_workers: int = 0) -> dict[str, Any]:
    """Every source's images replaced by ``encode``'s features (``CachedFeatures``), each split
    computed once and stored in ``cache_dir`` under a key of ``parts`` (vision, preprocess,
    dataset) + split + length + dtype; later runs find and reuse them.

    One source listed under two names (e.g. digits' validation = images) is computed and stored
    once; None entries stay None. ``preprocess``: the host-side image preprocessing (e.g. CLIP's
    resize and crop) ``encode`` expects.
    """
    if not cache_dir:
        raise ValueError("config.data.feature_cache.enabled needs config.data.feature_cache.dir "
                         "(a folder for the .npy features)")
    if "://" in str(cache_dir):
        raise ValueError(f"config.data.feature_cache.dir={cache_dir!r}: the features are "
                         "memory-mapped, so the cache must be on a local disk (each host keeps "
                         "its own copy)")
    cache = FeatureCache(cache_dir)
    wrapped: dict[int, Any] = {}
    for name, src in sources.items():
        if src is not None and id(src) not in wrapped:
            key = cache_key(**parts, split=name, num_examples=len(src), dtype=dtype)
            feats = cache.get_or_compute(key, src, encode, batch_size=int(batch_size),
                                         preprocess=preprocess, num_workers=int(num_workers))
            replaced = cache.metadata(key).get("replaced") or {}
            if replaced:
                print(f"data: {name}: {len(replaced)} examples with an unreadable image are "
                      f"replaced in the cached features (listed in {cache.paths(key)[1]})",
                      flush=True)
            wrapped[id(src)] = CachedFeatures(src, feats, replaced)
    return {name: None if src is None else wrapped[id(src)] for name, src in sources.items()}
