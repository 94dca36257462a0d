"""Image-caption sources for VLAP, and caption tokenisation.

Sources are random-access (``len(source)``, ``source[i] -> {'image': uint8 [H, W, 3],
'caption': str, ...}``) so ``data/batches.py IndexedBatches`` can read them; a ``preprocess`` turns
the caption string into fixed-length ids before batching (strings never reach the device).

  ``DigitCaptions``: scikit-learn's handwritten digits (``demo_images.DemoImages``) captioned from
      their labels, "a handwritten digit seven". For offline demos and tests only.
  ``JsonlCaptions``: a folder with ``*.jsonl`` files of ``{"image": path, "caption": str}`` lines
      (CC3M / COCO exported that way); image paths are relative to the folder (or absolute).
  ``tokenize_captions``: pad / truncate to ``max_len``, returns (ids, mask).

Full-size data lives next door: ``coco_captions.CocoCaptions`` (TFDS COCO, Karpathy splits),
``cc3m.Cc3m`` (an img2dataset download), ``vqa_source`` (VQAv2 questions). Every source also has
``fields_without_image(i)``: example ``i`` minus 'image', read without decoding the image, which
``feature_cache.CachedFeatures`` uses when the vision features are cached.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.data import demo_images
from lqae_vlap.data.images import read_image_file
from lqae_vlap.data.indexing import check_index

__all__ = ["digit_caption", "DigitCaptions", "JsonlCaptions", "tokenize_captions", "pad_id",
           "caption_example_fn"]


def digit_caption(label: int) -> str:
    """label 0..9 -> "a handwritten digit seven"."""
    label = operator.index(label)
    if not 0 <= label < len(demo_images.DIGIT_NAMES):
        raise ValueError(f"digit label must be in 0..9, got {label}")
    return f"a handwritten digit {demo_images.DIGIT_NAMES[label]}"


class DigitCaptions:
    """sklearn digits with captions from their labels: {'image', 'caption', 'label'}.

    Args: as ``demo_images.DemoImages`` (split 'train' = 1,500 scans, 'validation' = 297).
    """

    def __init__(self, split: str = "train", image_size: int = 16, resample: str = "bilinear") -> None:
        self.images = demo_images.DemoImages(split, image_size=image_size, resample=resample)
        self.class_names = self.images.class_names  # labelled too: LQAE's evaluations use them

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.images[index]
        return {**example, "caption": digit_caption(int(example["label"]))}

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image' (for cached vision features)."""
        return {k: v for k, v in self[index].items() if k != "image"}

    @property
    def captions(self) -> list[str]:
        """Every caption of the split, in order (e.g. for word frequencies)."""
        return [digit_caption(int(l)) for l in self.images.labels]


class JsonlCaptions:
    """Image-caption pairs listed in ``folder/*.jsonl`` (files in sorted order, lines in order).

    Each line: ``{"image": "relative/or/absolute/path.jpg", "caption": "..."}``. Images are decoded
    to RGB uint8 on access (resize / crop them in the ``preprocess`` of ``IndexedBatches``).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"JsonlCaptions: {self.folder} is not a folder; point config.data.path at a folder "
                "holding *.jsonl files of {\"image\": path, \"caption\": text} lines.")
        files = sorted(self.folder.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"JsonlCaptions: no *.jsonl files in {self.folder}.")
        self.entries: list[tuple[str, str]] = []
        for file in files:
            with open(file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        image, caption = record["image"], record["caption"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(
                            f"JsonlCaptions: {file}:{n} is not a JSON object with 'image' and "
                            f"'caption' keys ({e!r}).") from e
                    if not isinstance(image, str) or not isinstance(caption, str):
                        raise ValueError(f"JsonlCaptions: {file}:{n}: 'image' and 'caption' must be "
                                         "strings.")
                    self.entries.append((image, caption))
        if not self.entries:
            raise ValueError(f"JsonlCaptions: the *.jsonl files in {self.folder} hold no lines.")

    def __len__(self) -> int:
        return len(self.entries)

    def _entry(self, index: int) -> tuple[str, str]:
        i = check_index(index, len(self), "JsonlCaptions")
        return self.entries[i]

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image', without opening the image (for cached features)."""
        return {"caption": self._entry(index)[1]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, caption = self._entry(index)
        path = Path(image) if os.path.isabs(image) else self.folder / image
        return {"image": read_image_file(path), "caption": caption}

    @property
    def captions(self) -> list[str]:
        return [c for _, c in self.entries]


class ImagesWithReferences:
    """One example per distinct image of a ``JsonlCaptions``, with all its captions.

    ``src[i] -> {'image', 'caption' (the first), 'references' (every caption of that image, in
    file order)}``; images in order of first appearance. For captioning and retrieval evaluation.
    """

    def __init__(self, pairs: JsonlCaptions) -> None:
        self.pairs = pairs
        group: dict[str, int] = {}  # image path -> its group
        self.groups: list[list[str]] = []
        self.first_entry: list[int] = []  # pair index holding each group's image
        for n, (image, caption) in enumerate(pairs.entries):
            if image not in group:
                group[image] = len(self.groups)
                self.groups.append([])
                self.first_entry.append(n)
            self.groups[group[image]].append(caption)

    def __len__(self) -> int:
        return len(self.first_entry)

    def fields_without_image(self, index: int) -> dict[str, Any]:
        refs = self.groups[operator.index(index)]
        return {"caption": refs[0], "references": list(refs)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        fields = self.fields_without_image(index)
        return {"image": self.pairs[self.first_entry[operator.index(index)]]["image"], **fields}

    @property
    def captions(self) -> list[str]:
        return [c for refs in self.groups for c in refs]


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_len: int, *,
                      add_eos: bool = True, leading_space: bool = True
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises captions to fixed-length, right-padded ids.

    Args:
      tokenizer: a Hugging Face tokenizer (called with add_special_tokens=False: no BOS, the
        visual prefix and prompt come first in VLAP).
      captions: N strings.
      max_len: output length; longer captions are truncated (the EOS then falls off too).
      add_eos: append the tokenizer's EOS, so the LLM learns where a caption ends.
      leading_space: tokenise " " + caption: after a prompt such as "A picture of" the caption is
        a continuation, and byte-level BPE tokenisers encode a word with its space.

    Returns:
      ids: [N, max_len] int32 (padding = ``pad_id(tokenizer)``), mask: [N, max_len] int32
      (1 = real token).
    """
    if isinstance(captions, (str, bytes)):
        raise TypeError("tokenize_captions: captions must be a list of strings; wrap one in [text].")
    if operator.index(max_len) < 1:
        raise ValueError(f"tokenize_captions: max_len must be >= 1, got {max_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("tokenize_captions: add_eos=True but the tokenizer has no eos_token_id; "
                         "pass add_eos=False.")
    texts = [(" " + c) if leading_space else c for c in captions]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids = np.full((len(texts), max_len), pad_id(tokenizer), np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, seq in enumerate(encoded):
        seq = (list(seq) + ([int(eos)] if add_eos else []))[:max_len]
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    return ids, mask


def caption_example_fn(tokenizer: Any, max_len: int, host_image: Callable[[Any], Any] | None
                       ) -> Callable[[dict[str, Any], Any], dict[str, np.ndarray]]:
    """The per-example ``preprocess(example, rng)`` of VLAP's batches: the caption tokenised to
    ``caption_ids`` / ``caption_mask`` [max_len] (``tokenize_captions``) and the image through
    ``host_image`` as uint8, or the cached 'vision_features' [T, Dv] float32 as they are."""

    def fn(example: dict[str, Any], rng: Any) -> dict[str, np.ndarray]:
        del rng
        ids, mask = tokenize_captions(tokenizer, [example["caption"]], max_len)
        out = {"caption_ids": ids[0], "caption_mask": mask[0]}
        if "vision_features" in example:  # from the feature cache
            out["vision_features"] = np.asarray(example["vision_features"], np.float32)
        else:
            image = example["image"] if host_image is None else host_image(example["image"])
            out["image"] = np.asarray(image, np.uint8)
        return out

    return fn
