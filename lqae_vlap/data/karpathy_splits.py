"""Flickr30k and COCO in Karpathy & Fei-Fei's splits (CVPR 2015), from their official files, for
image-text retrieval (Flickr30k 1k test images, COCO 5k test images, ~5 captions each).

What to download, and where it goes (nothing is downloaded here):

  * Karpathy's split files, ``caption_datasets.zip`` (cs.stanford.edu/people/karpathy/deepimagesent;
    mirrored on Kaggle and Hugging Face), which holds ``dataset_flickr30k.json`` and
    ``dataset_coco.json``: ``{'images': [{'filename', 'split' ('train' | 'val' | 'test', COCO also
    'restval'), 'sentences': [{'raw', 'tokens', ...}], 'imgid', ...}], 'dataset': ...}``; COCO's
    images also carry 'filepath' ('val2014' | 'train2014') and 'cocoid'. Any path:
    ``config.eval.retrieval.annotations``.
  * The images, in ``config.eval.retrieval.image_dir``:
      Flickr30k: the folder ``flickr30k-images/`` of ``flickr30k-images.tar.gz`` (the Flickr30k
        request form, shannon.cs.illinois.edu/DenotationGraph), holding ``<filename>``;
      COCO: the folder that holds ``val2014/`` (and ``train2014/``) as COCO's zips unpack
        (cocodataset.org); an image is ``image_dir/<filepath>/<filename>``. Karpathy's test
        images all come from val2014.

``KarpathySplit(annotations, image_dir, split='test')``: one example per image of ``split``, in the
file's order: ``src[i] -> {'image': uint8 [H, W, 3], 'caption' (the first), 'references' (its
'raw' sentences, file order), 'image_id' (COCO: 'cocoid', else 'imgid'), 'filename'}``;
``fields_without_image(i)`` skips the image. ``dataset`` is the file's 'dataset' name.

A missing or malformed file stops at construction with one line naming it (``json_files``), as
does an image folder that lacks the split's first image; an image that goes missing later is
handled by ``images.ReplaceBadImages`` (``config.data.on_bad_image``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.data import json_files
from lqae_vlap.data.images import read_image_file
from lqae_vlap.data.indexing import check_index

FILES = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
IMAGE_FOLDERS = {"flickr30k": "flickr30k-images/", "coco": "the folder holding val2014/"}
# Images per split in the published files (what the papers' "1k" and "5k" test sets are).
TEST_IMAGES = {"flickr30k": 1000, "coco": 5000}

__all__ = ["KarpathySplit", "FILES", "TEST_IMAGES"]


def _how_to(dataset: str) -> str:
    return (f"download Karpathy's caption_datasets.zip and pass the path of its {FILES[dataset]} "
            "as config.eval.retrieval.annotations")


class KarpathySplit:
    """One split of a Karpathy caption dataset file (module docstring).

    Args:
      annotations: path of ``dataset_flickr30k.json`` or ``dataset_coco.json``.
      image_dir: Flickr30k's ``flickr30k-images/``, or COCO's folder holding ``val2014/``.
      split: 'test' (the retrieval protocol), 'val', 'train' or (COCO) 'restval'.
      dataset: 'flickr30k' or 'coco', for the messages (the file's own 'dataset' is kept as
        ``self.dataset`` when it has one).
    """

    def __init__(self, annotations: str | os.PathLike, image_dir: str | os.PathLike,
                 split: str = "test", *, dataset: str = "flickr30k") -> None:
        if dataset not in FILES:
            raise ValueError(f"KarpathySplit: dataset {dataset!r} is not one of {tuple(FILES)}")
        path = os.fspath(annotations)
        how_to = _how_to(dataset)
        data = json_files.read_json(path, what=f"Karpathy {dataset} split", how_to=how_to)
        where = f"Karpathy split file {path}"
        if not isinstance(data, dict):
            raise ValueError(f"{where} holds a JSON {type(data).__name__}, not Karpathy's "
                             f"{{'images': [...]}}; {how_to}")
        images = json_files.field(data, "images", list, where=where)
        self.dataset = str(data.get("dataset") or dataset)
        self.split = split
        self.filenames: list[str] = []
        self.relative: list[str] = []  # path under image_dir
        self.image_ids: list[int] = []
        self.references: list[list[str]] = []
        splits_seen: set[str] = set()
        for n, im in enumerate(images):
            at = f"{where}: images[{n}]"
            im_split = json_files.field(im, "split", str, where=at)
            splits_seen.add(im_split)
            if im_split != split:
                continue
            filename = json_files.field(im, "filename", str, where=at)
            sentences = json_files.field(im, "sentences", list, where=at)
            refs = [json_files.field(s, "raw", str, where=f"{at}.sentences[{k}]").strip()
                    for k, s in enumerate(sentences)]
            if not refs:
                raise ValueError(f"{at} ({filename}) has no sentences")
            filepath = im.get("filepath") or ""
            self.filenames.append(filename)
            self.relative.append(os.path.join(str(filepath), filename) if filepath else filename)
            self.image_ids.append(int(im.get("cocoid", im.get("imgid", n))))
            self.references.append(refs)
        if not self.filenames:
            raise ValueError(f"{where} has no image of split {split!r} (its splits: "
                             f"{sorted(splits_seen)})")
        self.image_dir = Path(image_dir)
        if not str(image_dir) or not self.image_dir.is_dir():
            raise FileNotFoundError(f"{dataset} image folder {str(image_dir)!r} is not a folder; "
                                    f"pass {IMAGE_FOLDERS[dataset]} as "
                                    "config.eval.retrieval.image_dir")
        first = self.image_dir / self.relative[0]
        if not first.is_file():
            raise FileNotFoundError(f"{dataset} image {first} not found: "
                                    f"config.eval.retrieval.image_dir must be "
                                    f"{IMAGE_FOLDERS[dataset]} (module lqae_vlap/data/"
                                    "karpathy_splits.py)")

    def __len__(self) -> int:
        return len(self.filenames)

    def _index(self, index: int) -> int:
        return check_index(index, len(self), "KarpathySplit")

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image', without reading the image (for cached features)."""
        i = self._index(index)
        return {"caption": self.references[i][0], "references": list(self.references[i]),
                "image_id": np.int64(self.image_ids[i]), "filename": self.filenames[i]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._index(index)
        return {"image": read_image_file(self.image_dir / self.relative[i]),
                **self.fields_without_image(i)}

    @property
    def captions(self) -> list[str]:
        return [c for refs in self.references for c in refs]
