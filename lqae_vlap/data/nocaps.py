"""NoCaps validation (Agrawal et al., ICCV 2019) from its official files, for zero-shot captioning.

What to download, and where it goes (nothing is downloaded here):

  * ``nocaps_val_4500_captions.json`` from https://nocaps.org/download: COCO-format, with
    ``'images'``: [{'id', 'open_images_id', 'file_name' ("0013ea2087020901.jpg"), 'domain'
    ('in-domain' | 'near-domain' | 'out-domain'), 'height', 'width', 'coco_url', ...}] (4,500) and
    ``'annotations'``: [{'image_id', 'id', 'caption'}] (10 per image). Any path:
    ``config.eval.captioning.annotations``.
  * The 4,500 images, from Open Images V6's validation split (they are named
    ``<open_images_id>.jpg``, which is each image's 'file_name'; every image's 'coco_url' in the
    json is a copy of it), in one folder: ``config.eval.captioning.image_dir``. The whole Open
    Images validation folder works too (the other images are never read).

``NoCapsValidation(annotations, image_dir)`` is a random-access source in the json's image order:
``src[i] -> {'image': uint8 [H, W, 3], 'caption' (the first reference), 'references' (every
caption of the image, file order), 'image_id', 'open_images_id', 'domain'}``;
``fields_without_image(i)`` skips the image. ``domains`` lists every image's domain.

A missing or malformed file stops at construction with one line naming it (``json_files``); so
does an image folder that lacks the first image (a wrong folder); an image that goes missing later
is handled by ``images.ReplaceBadImages`` (``config.data.on_bad_image``). The test split's
references live on the evaluation server only, so a file without 'annotations' is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.data import json_files
from lqae_vlap.data.images import read_image_file
from lqae_vlap.data.indexing import check_index

DOMAINS = ("in-domain", "near-domain", "out-domain")
ANNOTATIONS_FILE = "nocaps_val_4500_captions.json"
_HOW_TO = (f"download {ANNOTATIONS_FILE} from https://nocaps.org/download and pass its path as "
           "config.eval.captioning.annotations")

__all__ = ["NoCapsValidation", "DOMAINS", "ANNOTATIONS_FILE"]


class NoCapsValidation:
    """NoCaps validation images with their references and domains (module docstring).

    Args:
      annotations: path of ``nocaps_val_4500_captions.json``.
      image_dir: the folder holding the images under their 'file_name'.
    """

    def __init__(self, annotations: str | os.PathLike, image_dir: str | os.PathLike) -> None:
        path = os.fspath(annotations)
        data = json_files.read_json(path, what="NoCaps annotations", how_to=_HOW_TO)
        where = f"NoCaps annotations file {path}"
        if not isinstance(data, dict):
            raise ValueError(f"{where} holds a JSON {type(data).__name__}, not the COCO-format "
                             f"object of {ANNOTATIONS_FILE}")
        if "annotations" not in data and "images" in data:
            raise ValueError(f"{where} has no 'annotations' (the test split's captions are on the "
                             f"evaluation server only); {_HOW_TO}")
        images = json_files.field(data, "images", list, where=where)
        annotations_ = json_files.field(data, "annotations", list, where=where)
        self.image_ids: list[int] = []
        self.file_names: list[str] = []
        self.open_images_ids: list[str] = []
        self.domains: list[str] = []
        position: dict[int, int] = {}
        for n, im in enumerate(images):
            at = f"{where}: images[{n}]"
            image_id = json_files.field(im, "id", int, where=at)
            domain = json_files.field(im, "domain", str, where=at)
            if domain not in DOMAINS:
                raise ValueError(f"{at}: domain {domain!r} is not one of {DOMAINS}")
            if image_id in position:
                raise ValueError(f"{at}: image id {image_id} is listed twice")
            position[image_id] = n
            self.image_ids.append(image_id)
            self.file_names.append(json_files.field(im, "file_name", str, where=at))
            self.open_images_ids.append(str(im.get("open_images_id", "")))
            self.domains.append(domain)
        if not self.image_ids:
            raise ValueError(f"{where} lists no images")
        self.references: list[list[str]] = [[] for _ in self.image_ids]
        for n, a in enumerate(annotations_):
            at = f"{where}: annotations[{n}]"
            image_id = json_files.field(a, "image_id", int, where=at)
            if image_id not in position:
                raise ValueError(f"{at}: image_id {image_id} is not in 'images'")
            self.references[position[image_id]].append(
                json_files.field(a, "caption", str, where=at).strip())
        empty = [self.image_ids[i] for i, r in enumerate(self.references) if not r]
        if empty:
            raise ValueError(f"{where}: images {empty[:5]} have no caption in 'annotations'")
        self.image_dir = Path(image_dir)
        if not str(image_dir) or not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"NoCaps image folder {str(image_dir)!r} is not a folder; put the Open Images "
                "validation images (<open_images_id>.jpg) in one folder and pass it as "
                "config.eval.captioning.image_dir")
        first = self.image_dir / self.file_names[0]
        if not first.is_file():
            raise FileNotFoundError(
                f"NoCaps image {first} not found: config.eval.captioning.image_dir must hold the "
                f"images under their 'file_name' in {ANNOTATIONS_FILE} (Open Images validation)")

    def __len__(self) -> int:
        return len(self.image_ids)

    def _index(self, index: int) -> int:
        return check_index(index, len(self), "NoCapsValidation")

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image', without reading the image (for cached features)."""
        i = self._index(index)
        refs = self.references[i]
        return {"caption": refs[0], "references": list(refs),
                "image_id": np.int64(self.image_ids[i]),
                "open_images_id": self.open_images_ids[i], "domain": self.domains[i]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._index(index)
        return {"image": read_image_file(self.image_dir / self.file_names[i]),
                **self.fields_without_image(i)}

    @property
    def captions(self) -> list[str]:
        return [c for refs in self.references for c in refs]
