"""Conceptual Captions 3M (CC3M) image-caption pairs from an img2dataset download, random access.

TFDS has no CC3M builder: the dataset is a list of 3.3M (caption, URL) pairs that everyone downloads
themselves, usually with img2dataset, and ~15-20% of the URLs are dead by now. Download it as:

  # Train_GCC-training.tsv from https://ai.google.com/research/ConceptualCaptions/download
  sed -i '1s/^/caption\\turl\\n/' Train_GCC-training.tsv      # img2dataset wants a header line
  img2dataset --url_list Train_GCC-training.tsv --input_format tsv --url_col url \\
      --caption_col caption --output_format webdataset --output_folder cc3m \\
      --processes_count 16 --thread_count 64 --image_size 256 --resize_mode keep_ratio

``Cc3m(manual_dir)`` reads either of img2dataset's two common output layouts (detected):
  'webdataset': ``00000.tar, 00001.tar, ...``, each holding ``000000123.jpg`` (or .png/.webp),
      ``000000123.txt`` (the caption) and ``000000123.json`` members. Random access: each tar's
      member table is read once with ``tarfile`` (headers only, the image data is skipped), and an
      image is later read as ``size`` bytes at its data offset. Tars must be uncompressed.
  'files': shard folders ``00000/, 00001/, ...`` holding the same files loose.
Keys are img2dataset's: shard number then the sample's number in the shard ("000420031").

Samples whose image or caption is missing (or whose caption is empty) are skipped; their number is
``num_skipped`` and one warning says so. Building the index reads every caption (3.3M small reads
for 'files'); pass ``cache_dir`` to persist it (an ``.npz`` of a few hundred MB for the full
dataset), rebuilt automatically when a shard's size or modification time changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.data.images import BadImage, decode_image
from lqae_vlap.data.indexing import check_index

LAYOUTS = ("webdataset", "files")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_INDEX_FORMAT = 1
_HOW_TO = (
    "Expected img2dataset's output: shard tars 00000.tar, 00001.tar, ... (--output_format "
    "webdataset) or shard folders 00000/, 00001/, ... (--output_format files), each sample a "
    "000000123.jpg with its 000000123.txt caption. Download CC3M with: img2dataset --url_list "
    "Train_GCC-training.tsv --input_format tsv --url_col url --caption_col caption "
    "--output_format webdataset --output_folder cc3m --image_size 256 --resize_mode keep_ratio "
    "(after adding the header line 'caption<TAB>url' to the tsv).")

__all__ = ["Cc3m", "LAYOUTS", "IMAGE_EXTS"]


def _is_shard(name: str) -> bool:
    return name.isdigit()


def detect_layout(manual_dir: Path) -> str:
    """'webdataset' or 'files', from what the folder holds (module docstring)."""
    tars = [p for p in manual_dir.glob("*.tar") if _is_shard(p.stem)]
    folders = [p for p in manual_dir.iterdir() if p.is_dir() and _is_shard(p.name)]
    if tars and folders:
        raise ValueError(f"Cc3m: {manual_dir} holds both shard tars and shard folders; pass "
                         "layout='webdataset' or layout='files' to choose.")
    if tars:
        return "webdataset"
    if folders:
        return "files"
    present = sorted(p.name for p in manual_dir.iterdir())[:10]
    raise FileNotFoundError(f"Cc3m: no CC3M shards in {manual_dir} (it holds {present}). {_HOW_TO}")


def _shards(manual_dir: Path, layout: str) -> list[Path]:
    if layout == "webdataset":
        found = [p for p in manual_dir.glob("*.tar") if _is_shard(p.stem)]
    else:
        found = [p for p in manual_dir.iterdir() if p.is_dir() and _is_shard(p.name)]
    if not found:
        raise FileNotFoundError(f"Cc3m: no {layout} shards in {manual_dir}. {_HOW_TO}")
    return sorted(found, key=lambda p: p.name)


def _fingerprint(shards: list[Path]) -> str:
    # Size and mtime of each shard (a folder's mtime changes when files are added or removed):
    # cheap to check at start, and a re-download or a finished shard invalidates the index.
    stats = [(p.name, p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns) for p in shards]
    return json.dumps(stats)


def _split_name(name: str) -> tuple[str, str]:
    stem, _, ext = os.path.basename(name).rpartition(".")
    return stem, ext.lower()


def _caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


class _Index:
    """Columns of all kept samples, compact enough for 3M of them."""

    def __init__(self) -> None:
        self.shard: list[int] = []
        self.keys: list[str] = []
        self.exts: list[str] = []   # 'files': the image file's extension
        self.offset: list[int] = []  # 'webdataset': image bytes [offset, offset + size) in the tar
        self.size: list[int] = []
        self.captions: list[str] = []
        self.skipped = 0


def _scan_tar(path: Path, shard: int, index: _Index) -> None:
    try:
        tar = tarfile.open(path, mode="r:")  # 'r:' = uncompressed only: offsets must be file offsets
    except tarfile.ReadError as e:
        raise ValueError(f"Cc3m: {path} is not an uncompressed tar ({e}); random access needs "
                         "plain .tar shards as img2dataset writes them.") from e
    samples: dict[str, dict[str, Any]] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, ext = _split_name(member.name)
            entry = samples.setdefault(stem, {})
            if ext in IMAGE_EXTS:
                entry["image"] = (member.offset_data, member.size)
            elif ext == "txt":
                entry["caption"] = _caption(tar.extractfile(member).read())
    for stem in sorted(samples):
        entry = samples[stem]
        if "image" not in entry or not entry.get("caption"):
            index.skipped += 1
            continue
        index.shard.append(shard)
        index.keys.append(stem)
        index.offset.append(entry["image"][0])
        index.size.append(entry["image"][1])
        index.captions.append(entry["caption"])


def _scan_folder(path: Path, shard: int, index: _Index) -> None:
    samples: dict[str, dict[str, str]] = {}
    with os.scandir(path) as it:
        for item in it:
            if item.is_file():
                stem, ext = _split_name(item.name)
                samples.setdefault(stem, {})[ext] = item.name
    for stem in sorted(samples):
        files = samples[stem]
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        caption = ""
        if "txt" in files:
            with open(path / files["txt"], "rb") as f:
                caption = _caption(f.read())
        if image_ext is None or not caption:
            index.skipped += 1
            continue
        index.shard.append(shard)
        index.keys.append(stem)
        index.exts.append(image_ext)
        index.captions.append(caption)


class Cc3m:
    """CC3M pairs from an img2dataset folder: ``src[i] -> {'image', 'caption', 'key'}``.

    Args:
      manual_dir: img2dataset's ``--output_folder`` (module docstring).
      cache_dir: folder for the persisted index (``.npz``); None keeps it in memory only.
      layout: 'webdataset', 'files', or None to detect it.
    """

    def __init__(self, manual_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 layout: str | None = None) -> None:
        self.manual_dir = Path(manual_dir).resolve()
        if not self.manual_dir.is_dir():
            raise FileNotFoundError(f"Cc3m: manual_dir {self.manual_dir} is not a folder. {_HOW_TO}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"Cc3m: unknown layout {layout!r}; use one of {LAYOUTS} or None (detect).")
        self.layout = layout or detect_layout(self.manual_dir)
        self.shards = _shards(self.manual_dir, self.layout)
        fingerprint = _fingerprint(self.shards)
        path = None
        if cache_dir is not None:
            tag = hashlib.sha256(f"{self.manual_dir}\n{self.layout}".encode()).hexdigest()[:16]
            path = Path(cache_dir) / f"cc3m_index_{self.layout}_{tag}.npz"
        if not (path is not None and self._load(path, fingerprint)):
            self._build()
            if path is not None:
                self._save(path, fingerprint)
        if len(self._shard) == 0:
            raise ValueError(f"Cc3m: every one of the {self.num_skipped} samples in "
                             f"{self.manual_dir} lacks its image or caption. {_HOW_TO}")
        if self.num_skipped:
            warnings.warn(f"Cc3m: skipped {self.num_skipped} samples of {self.manual_dir} whose "
                          f"image or caption is missing or empty; {len(self)} pairs remain.",
                          stacklevel=2)

    def _build(self) -> None:
        index = _Index()
        for k, shard in enumerate(self.shards):
            (_scan_tar if self.layout == "webdataset" else _scan_folder)(shard, k, index)
        self._shard = np.asarray(index.shard, np.int32)
        self._keys = np.asarray(index.keys, dtype=np.str_)
        self._exts = np.asarray(index.exts, dtype=np.str_)
        self._offset = np.asarray(index.offset, np.int64)
        self._size = np.asarray(index.size, np.int64)
        # Captions as one UTF-8 blob plus offsets: a tenth of the memory of 3M Python strings.
        encoded = [c.encode("utf-8") for c in index.captions]
        self._text_ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._text = np.frombuffer(b"".join(encoded), np.uint8)
        self.num_skipped = index.skipped

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"shard": self._shard, "keys": self._keys, "exts": self._exts, "offset": self._offset,
                "size": self._size, "text_ends": self._text_ends, "text": self._text}

    def _save(self, path: Path, fingerprint: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
        meta = json.dumps({"format": _INDEX_FORMAT, "manual_dir": str(self.manual_dir),
                           "layout": self.layout, "fingerprint": fingerprint,
                           "num_skipped": self.num_skipped})
        np.savez(tmp, meta=np.asarray(meta), **self._arrays())
        os.replace(tmp, path)  # never a half-written index under the final name

    def _load(self, path: Path, fingerprint: str) -> bool:
        if not path.is_file():
            return False
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            if meta.get("format") != _INDEX_FORMAT or meta.get("fingerprint") != fingerprint:
                return False  # shards changed since: rebuild (and overwrite)
            self._shard, self._keys, self._exts = saved["shard"], saved["keys"], saved["exts"]
            self._offset, self._size = saved["offset"], saved["size"]
            self._text_ends, self._text = saved["text_ends"], saved["text"]
        self.num_skipped = int(meta["num_skipped"])
        return True

    def __len__(self) -> int:
        return len(self._shard)

    def _check(self, index: int) -> int:
        return check_index(index, len(self), "Cc3m")

    def caption(self, index: int) -> str:
        i = self._check(index)
        start = int(self._text_ends[i - 1]) if i else 0
        return self._text[start:int(self._text_ends[i])].tobytes().decode("utf-8")

    @property
    def captions(self) -> list[str]:
        """Every caption, in index order (e.g. for word frequencies)."""
        blob = self._text.tobytes()
        starts = np.concatenate([[0], self._text_ends[:-1]])
        return [blob[s:e].decode("utf-8") for s, e in zip(starts.tolist(), self._text_ends.tolist())]

    def image_bytes(self, index: int) -> bytes:
        """The sample's encoded image, as img2dataset stored it."""
        i = self._check(index)
        shard = self.shards[int(self._shard[i])]
        if self.layout == "files":
            path = shard / f"{self._keys[i]}.{self._exts[i]}"
            try:
                return path.read_bytes()
            except OSError as e:
                raise BadImage(str(path), f"{type(e).__name__}: {e.strerror or e}") from e
        # A fresh handle per read keeps concurrent reads from IndexedBatches' threads independent.
        with open(shard, "rb") as f:
            f.seek(int(self._offset[i]))
            data = f.read(int(self._size[i]))
        if len(data) != int(self._size[i]):
            raise BadImage(f"{shard} sample {self._keys[i]}",
                           "the shard is shorter than its index says (truncated or replaced since "
                           "the index was built); delete the cached index to rebuild it")
        return data

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image', without reading the image (for cached features)."""
        i = self._check(index)
        return {"caption": self.caption(i), "key": str(self._keys[i])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check(index)
        where = f"{self.shards[int(self._shard[i])]} sample {self._keys[i]}"
        return {"image": decode_image(self.image_bytes(i), where), **self.fields_without_image(i)}
