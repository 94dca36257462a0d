"""COCO 2014 captions with the Karpathy splits, read by random access from a prepared TFDS copy.

Storage. TFDS ``coco_captions`` (config ``2014``) prepared in the ``array_record`` file format; its
splits are Karpathy and Li's: 'train' (82,783 images), 'restval' (30,504), 'val' (5,000) and
'test' (5,000), each image with 5 (a few with 6-7) human captions. 'train+restval' (113k images,
TFDS split arithmetic) is the usual captioning training set; 'test' is the "Karpathy test" that
captioning and retrieval papers report on. Each record holds ``image`` (JPEG), ``image/id``,
``image/filename``, ``objects`` (boxes, labels) and ``captions`` ({'text', 'id'} per caption).

Preparing (once). ``tfds build coco_captions --data_dir=DATA_DIR --file_format=array_record``
downloads COCO 2014 (~20 GB) and the Karpathy split file and converts them. The TFDS builder code
needs TensorFlow for that (``pip install tensorflow``); reading the prepared copy needs neither:
this module opens it from its own metadata (``dataset_info.json``, ``features.json``) with TFDS's
``read_only_builder.builder_from_files``, never running the builder code (whose ``_info`` touches
``tf.int64``, so ``tfds.builder('coco_captions')`` fails without TensorFlow even when prepared).

Modes.
  'pairs'  : one example per (image, caption): training. ``{'image', 'caption', 'image_id'}``.
  'images' : one example per image: captioning / retrieval evaluation. ``{'image', 'caption'
             (its first reference), 'references': list[str], 'image_id'}``. The references differ
             in number per image, so drop them in the ``preprocess`` before ``IndexedBatches``
             stacks a batch, and look them up by index with :attr:`CocoCaptions.references`.

The caption index. Pairs mode needs every image's caption count before the first example is read.
An array_record data source can only return whole records, so building the index reads every
record once, JPEG bytes included (images are not decoded: ``SkipDecoding``). That is one
sequential pass over the split, ~13 GB for 'train' (minutes on a local SSD, longer on network
storage). Pass ``index_cache_dir`` to write the index (captions and image ids, a few tens of MB
for 'train+restval') as JSON and skip the pass next time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.data.images import decode_image
from lqae_vlap.data.indexing import check_index

DATASET_NAME = "coco_captions"
SPLITS = ("train", "restval", "val", "test")
MODES = ("pairs", "images")
_INDEX_CHUNK = 256  # records per __getitems__ call while indexing (array_record reads them in parallel)
_INDEX_FORMAT = 1

__all__ = ["CocoCaptions", "open_coco_data_source", "DATASET_NAME", "SPLITS", "MODES"]


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # optional: only reading a prepared copy needs it
    except ImportError as e:
        raise ImportError(
            "COCO captions are read through tensorflow-datasets, which is not installed: "
            "pip install tensorflow-datasets array_record") from e
    return tfds


def _split_parts(split: str) -> list[str]:
    # 'train+restval', 'val[:100]': the named splits behind TFDS split arithmetic and slicing.
    return [p.split("[", 1)[0].strip() for p in split.split("+")]


def open_coco_data_source(split: str, data_dir: str | os.PathLike | None = None, *,
                          dataset_name: str = DATASET_NAME) -> Sequence[dict[str, Any]]:
    """The TFDS array_record data source of a prepared ``coco_captions`` split.

    Records: ``{'image': JPEG bytes, 'image/id': int, 'captions': {'text': [bytes], ...}, ...}``.
    ``data_dir`` None = TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    """
    tfds = _import_tfds()
    from tensorflow_datasets.core import read_only_builder, registered  # noqa: PLC0415

    where = "TFDS's default data_dir" if data_dir is None else repr(os.fspath(data_dir))
    kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    try:
        builder = read_only_builder.builder_from_files(dataset_name, **kwargs)
    except registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"{dataset_name} is not prepared under {where}. Prepare it once (needs TensorFlow and "
            f"downloads COCO 2014, ~20 GB): pip install tensorflow && tfds build {dataset_name} "
            f"--data_dir=DATA_DIR --file_format=array_record; then pass data_dir=DATA_DIR.") from e
    available = list(builder.info.splits)
    missing = [p for p in _split_parts(split) if p not in available]
    if missing:
        raise ValueError(f"split {split!r} not found in {dataset_name} at {where}; available: "
                         f"{available} (TFDS slicing and '+' allowed, e.g. 'train+restval').")
    decoders = None
    if isinstance(builder.info.features["image"], tfds.features.Image):
        # Decoded later with PIL, in the batch iterator's threads, and only when needed.
        decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        return builder.as_data_source(split, decoders=decoders)
    except NotImplementedError as e:
        raise NotImplementedError(
            f"{dataset_name} under {where} is not stored as array_record, which random access "
            "needs. Convert it: tfds convert_format --dataset_version_dir=<that version folder> "
            "--out_file_format=array_record") from e


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _record_captions(record: Any, position: int) -> tuple[int, list[str]]:
    try:
        image_id = int(np.asarray(record["image/id"]))
        texts = record["captions"]["text"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"COCO record {position} lacks 'image/id' or 'captions'/'text' ({e!r}); is this a "
            "coco_captions dataset?") from e
    return image_id, [_text(t).strip() for t in np.asarray(texts, dtype=object).reshape(-1)]


def _read_index(data_source: Sequence[Any]) -> tuple[list[int], list[list[str]]]:
    """One pass over all records: (image ids [N], captions per image [N][k])."""
    n = len(data_source)
    getitems = getattr(data_source, "__getitems__", None)
    image_ids, captions = [], []
    for start in range(0, n, _INDEX_CHUNK):
        keys = list(range(start, min(start + _INDEX_CHUNK, n)))
        records = getitems(keys) if getitems is not None else [data_source[k] for k in keys]
        for k, record in zip(keys, records):
            image_id, texts = _record_captions(record, k)
            image_ids.append(image_id)
            captions.append(texts)
    return image_ids, captions


def _index_path(index_cache_dir: str | os.PathLike, dataset_name: str, split: str,
                num_images: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{dataset_name}_{split}")
    return Path(index_cache_dir) / f"{safe}_{num_images}.captions.json"


class CocoCaptions:
    """COCO Karpathy-split images with their captions; see the module docstring.

    Args:
      split: 'train', 'restval', 'val' or 'test', TFDS slices and sums allowed
        ('train+restval', 'val[:500]').
      data_dir: the TFDS data_dir holding the prepared copy (None: TFDS's default).
      mode: 'pairs' (one example per caption) or 'images' (one per image, with 'references').
      dataset_name: the TFDS name (another prepared builder with the same features works too).
      data_source: a ready random-access sequence of records (as TFDS returns them); when given,
        ``data_dir`` and ``dataset_name`` are not used. For tests and custom storage.
      index_cache_dir: folder for the caption index (JSON); None keeps it in memory only.
    """

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None,
                 mode: str = "pairs", *, dataset_name: str = DATASET_NAME,
                 data_source: Sequence[Any] | None = None,
                 index_cache_dir: str | os.PathLike | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"CocoCaptions: unknown mode {mode!r}; use 'pairs' (training, one "
                             "example per caption) or 'images' (evaluation, one per image).")
        if dataset_name == DATASET_NAME:
            bad = [p for p in _split_parts(split) if p not in SPLITS]
            if bad:
                raise ValueError(f"CocoCaptions: unknown split {split!r}; coco_captions has the "
                                 f"Karpathy splits {SPLITS} ('validation' is 'val').")
        self.split, self.mode = split, mode
        if data_source is None:
            data_source = open_coco_data_source(split, data_dir, dataset_name=dataset_name)
        self.data_source = data_source
        self.image_ids, self.references = self._load_index(dataset_name, index_cache_dir)
        empty = [i for i, refs in enumerate(self.references) if not refs]
        if empty and mode == "images":
            raise ValueError(f"CocoCaptions: images {empty[:5]} of split {split!r} have no "
                             "captions; evaluation needs references for every image.")
        counts = np.asarray([len(r) for r in self.references], np.int64)
        # pair p -> (image, caption): image_of_pair[p], caption_of_pair[p]
        self.image_of_pair = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        self.caption_of_pair = np.arange(int(counts.sum()), dtype=np.int64) - starts[self.image_of_pair]

    def _load_index(self, dataset_name: str, index_cache_dir: str | os.PathLike | None
                    ) -> tuple[list[int], list[list[str]]]:
        n = len(self.data_source)
        path = None if index_cache_dir is None else _index_path(index_cache_dir, dataset_name,
                                                                 self.split, n)
        if path is not None and path.is_file():
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if (saved.get("format") == _INDEX_FORMAT and saved.get("num_images") == n
                    and len(saved.get("image_ids", ())) == n):
                return [int(i) for i in saved["image_ids"]], saved["captions"]
        image_ids, captions = _read_index(self.data_source)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": _INDEX_FORMAT, "dataset": dataset_name, "split": self.split,
                           "num_images": n, "image_ids": image_ids, "captions": captions}, f)
            os.replace(tmp, path)  # a reader never sees half an index
        return image_ids, captions

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def captions(self) -> list[str]:
        """Every caption of the split (image order, then caption order), e.g. for word frequencies."""
        return [c for refs in self.references for c in refs]

    def __len__(self) -> int:
        return len(self.image_of_pair) if self.mode == "pairs" else len(self.image_ids)

    def _check(self, index: int) -> int:
        return check_index(index, len(self), f"CocoCaptions({self.split!r}, mode={self.mode!r})")

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image', without reading the record (for cached features)."""
        i = self._check(index)
        if self.mode == "pairs":
            image, cap = int(self.image_of_pair[i]), int(self.caption_of_pair[i])
            return {"caption": self.references[image][cap], "image_id": np.int64(self.image_ids[image])}
        refs = self.references[i]
        return {"caption": refs[0], "references": list(refs), "image_id": np.int64(self.image_ids[i])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check(index)
        image = int(self.image_of_pair[i]) if self.mode == "pairs" else i
        record = self.data_source[image]
        where = f"COCO {self.split} image id {self.image_ids[image]}"
        return {"image": decode_image(record["image"], where), **self.fields_without_image(i)}
