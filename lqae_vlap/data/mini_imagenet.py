"""mini-ImageNet (Vinyals et al. 2016), Ravi & Larochelle (2017) split files, from a local folder.

Expected layout (the usual distribution of the split; nothing is downloaded):

    <root>/train.csv, <root>/val.csv, <root>/test.csv   header "filename,label"; label = WordNet id
    <root>/images/<filename>                              e.g. n0153282900000005.jpg (84x84 RGB)

The 64 / 16 / 20 classes of train / val / test are disjoint; LQAE's few-shot evaluation samples
episodes from one split. ``MiniImageNet`` is a random-access source like ``DemoImages``:
``source[i] -> {'image': uint8 [S, S, 3], 'label': int32}`` with labels indexing ``class_names``
(sorted WordNet ids of the split, or human-readable names when ``label_names`` maps them).
Images are decoded lazily; ``labels`` is available without touching any image.
"""

from __future__ import annotations

import csv
import json
import operator
import os
from collections.abc import Mapping

import numpy as np

from lqae_vlap.data.images import read_image_file
from lqae_vlap.data.indexing import check_index
from lqae_vlap.data.preprocess import center_crop, resize_shorter_side

SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "validation": "val.csv", "test": "test.csv"}


def read_split_csv(path: str) -> tuple[list[str], list[str]]:
    """(filenames, WordNet ids) of one Ravi & Larochelle split file with header filename,label."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
            raise ValueError(f"{path} must start with the header 'filename,label' (the Ravi & "
                             f"Larochelle split format), got {header}")
        files, wnids = [], []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}:{line_no}: expected 'filename,label', got {row}")
            files.append(row[0].strip())
            wnids.append(row[1].strip())
    if not files:
        raise ValueError(f"{path} lists no images")
    return files, wnids


def read_label_names(path: str) -> dict[str, str]:
    """{WordNet id: name} from a synset mapping file, for ``MiniImageNet(label_names=...)``.

    Two formats: a JSON object {"n01532829": "house finch", ...}, or text lines "<wnid> <names>"
    as ImageNet's LOC_synset_mapping.txt ("n01532829 house finch, linnet"), where the first of the
    comma-separated names is kept.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        names = json.loads(text)
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise ValueError(f"{path}: a JSON label-name file maps WordNet ids to strings, e.g. "
                             '{"n01532829": "house finch"}')
        return dict(names)
    names = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        name = rest.split(",")[0].strip()
        if not name:
            raise ValueError(f"{path}:{line_no}: expected '<wnid> <name>[, <synonym> ...]', got "
                             f"{line!r}")
        names[wnid] = name
    if not names:
        raise ValueError(f"{path} maps no WordNet id to a name")
    return names


class MiniImageNet:
    """One split of mini-ImageNet read from ``root``.

    Args:
      root: folder with the split CSVs and images/.
      split: 'train', 'val' (alias 'validation') or 'test'.
      image_size: output side S: the shorter side is resized to S (bicubic), then centre-cropped.
      label_names: optional {WordNet id: name} for class_names (e.g. for LLM prompts); ids
        missing from it keep their WordNet id.
    """

    def __init__(self, root: str | os.PathLike, split: str = "test", image_size: int = 84,
                 label_names: Mapping[str, str] | None = None) -> None:
        root = os.fspath(root)
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r}; mini-ImageNet has splits "
                             f"{sorted(SPLIT_FILES)}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"mini-ImageNet folder {root!r} does not exist; point root at "
                                    "the folder holding train.csv/val.csv/test.csv and images/")
        csv_path = os.path.join(root, SPLIT_FILES[split])
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(f"{csv_path} not found; mini-ImageNet needs the Ravi & "
                                    "Larochelle split files (train.csv, val.csv, test.csv) in root")
        self.image_dir = os.path.join(root, "images")
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"{self.image_dir} not found; the split files' images must be "
                                    f"in {root}/images/")
        self.image_size = operator.index(image_size)
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.split = split
        self.filenames, wnids = read_split_csv(csv_path)
        self.wnids: tuple[str, ...] = tuple(sorted(set(wnids)))
        names = label_names or {}
        self.class_names: tuple[str, ...] = tuple(names.get(w, w) for w in self.wnids)
        self.num_classes = len(self.wnids)
        index = {w: i for i, w in enumerate(self.wnids)}
        self.labels: np.ndarray = np.array([index[w] for w in wnids], np.int32)  # [N]
        self.labels.setflags(write=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = check_index(index, len(self), f"MiniImageNet({self.split!r})")
        path = os.path.join(self.image_dir, self.filenames[i])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in {SPLIT_FILES[self.split]} but missing; "
                                    "check that images/ holds the whole split")
        image = center_crop(resize_shorter_side(read_image_file(path), self.image_size), self.image_size)
        return {"image": image, "label": self.labels[i]}
