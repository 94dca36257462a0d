"""Which data a run reads: ``config.data.name`` -> its opener, in one plain dict both methods use.

An opener takes ``config.data`` and the model's image size and returns the run's splits, each a
random-access source (``len(src)``, ``src[i] -> dict``):

  'train'        what the loss reads (ImageNet's: full-size images with an ``augment(example,
                 rng)`` that crops and flips them per step)
  'validation'   held-out examples
  'train_eval'   the training split without augmentation, for evaluations (default: 'train')
  'images'       one example per held-out image with all its 'references', for captioning and
                 retrieval (default: 'validation')

Examples carry what their data has: 'image' (uint8) always, 'label' with ``src.class_names`` on
labelled data, 'caption' on captioned data; the digits carry both, so both methods run on them,
and so do 'digit_scenes' (data/digit_scenes.py: synthetic scenes of real digits, knobs in
``config.data.scenes``, with a 'test' split besides).
Each method says which names it can train on (a method needing captions refuses ImageNet).
``eval_images`` and ``vqa_questions`` open the evaluation-only sources a VLAP config names.

Sources read from files are wrapped in ``images.ReplaceBadImages``: an example whose image is
missing or cannot be decoded is replaced by the next readable one and counted
(``config.data.on_bad_image='skip'``, the default), or stops the run ('fail'). The in-memory
digits never are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from lqae_vlap.data import captions as captions_lib
from lqae_vlap.data import images as images_lib

Splits = dict[str, Any]


def _digits(d: ml_collections.ConfigDict, image_size: int) -> Splits:
    return {"train": captions_lib.DigitCaptions("train", image_size=image_size),
            "validation": captions_lib.DigitCaptions("validation", image_size=image_size)}


def _digit_scenes(d: ml_collections.ConfigDict, image_size: int) -> Splits:
    from lqae_vlap.data import digit_scenes  # noqa: PLC0415

    s = d.get("scenes") or {}
    return digit_scenes.scene_splits(
        image_size, num_train=int(s.get("num_train", 0)),
        num_validation=int(s.get("num_validation", 0)), num_test=int(s.get("num_test", 0)),
        seed=int(s.get("seed", 0)), two_digit_fraction=float(s.get("two_digit_fraction", 0.75)))


def _imagenet(d: ml_collections.ConfigDict, image_size: int) -> Splits:
    from lqae_vlap.data import imagenet  # noqa: PLC0415  (tensorflow-datasets, optional)

    kw = dict(data_dir=d.data_dir or None, manual_dir=d.manual_dir or None, image_size=image_size)
    return {"train": imagenet.imagenet_source("train", train=True, **kw),
            "validation": imagenet.imagenet_source("validation", train=False, **kw),
            "train_eval": imagenet.imagenet_source("train", train=False, **kw)}


def _jsonl(d: ml_collections.ConfigDict, image_size: int) -> Splits:
    val = captions_lib.JsonlCaptions(d.eval_path)
    return {"train": captions_lib.JsonlCaptions(d.train_path), "validation": val,
            "images": captions_lib.ImagesWithReferences(val)}


def _coco_captions(d: ml_collections.ConfigDict, image_size: int) -> Splits:
    from lqae_vlap.data.coco_captions import CocoCaptions  # noqa: PLC0415  (tfds, optional)

    kw = dict(data_dir=d.get("data_dir") or None, index_cache_dir=d.get("index_cache_dir") or None)
    return {"train": CocoCaptions(d.train_split, mode="pairs", **kw),
            "validation": CocoCaptions(d.eval_split, mode="pairs", **kw),
            "images": CocoCaptions(d.eval_split, mode="images", **kw)}


def _cc3m(d: ml_collections.ConfigDict, image_size: int) -> Splits:
    from lqae_vlap.data.cc3m import Cc3m  # noqa: PLC0415

    if not d.train_path or not d.eval_path:
        raise ValueError("config.data.name='cc3m' needs config.data.train_path and "
                         "config.data.eval_path: img2dataset output folders of CC3M's "
                         "training and validation TSVs")
    cache = d.get("index_cache_dir") or None
    return {"train": Cc3m(d.train_path, cache_dir=cache),
            "validation": Cc3m(d.eval_path, cache_dir=cache)}


SOURCES: dict[str, Callable[[ml_collections.ConfigDict, int], Splits]] = {
    "digits": _digits,
    "digit_scenes": _digit_scenes,
    "imagenet": _imagenet,
    "jsonl": _jsonl,
    "coco_captions": _coco_captions,
    "cc3m": _cc3m,
}


def open_sources(d: ml_collections.ConfigDict, image_size: int,
                 supported: tuple[str, ...] = tuple(SOURCES)) -> Splits:
    """The splits of ``config.data`` (module docstring); ``supported``: the names the calling
    method can train on (others are refused by name)."""
    if d.name not in SOURCES:
        raise ValueError(f"config.data.name={d.name!r} is not known; use one of {supported}")
    if d.name not in supported:
        raise ValueError(f"config.data.name={d.name!r} lacks what this method trains on; use one "
                         f"of {supported}")
    splits = SOURCES[d.name](d, int(image_size))
    splits.setdefault("train_eval", splits["train"])
    splits.setdefault("images", splits["validation"])
    if d.name in FILE_BACKED:
        splits = replace_bad_images(splits, d.get("on_bad_image", "skip"))
    return splits


FILE_BACKED = ("imagenet", "jsonl", "coco_captions", "cc3m")


def replace_bad_images(splits: Splits, on_bad_image: str) -> Splits:
    """Each split in ``images.ReplaceBadImages`` (one wrapper per source object, so a source
    listed under two names stays one object with one count)."""
    wrapped: dict[int, Any] = {}
    for name, src in splits.items():
        if src is not None and id(src) not in wrapped:
            wrapped[id(src)] = images_lib.ReplaceBadImages(src, on_bad_image, name=name)
    return {name: None if src is None else wrapped[id(src)] for name, src in splits.items()}


def eval_images(source: ml_collections.ConfigDict, d: ml_collections.ConfigDict,
                own: Splits | None = None) -> Any:
    """``config.eval.source``'s held-out images with their references (e.g. COCO's Karpathy
    test split while training on CC3M), or None for '' (the training data's own). A source
    named as ``config.data`` itself (e.g. 'digit_scenes' with split 'test') is that split of
    ``own``, the training data's splits (``open_sources``)."""
    on_bad = d.get("on_bad_image", "skip")
    if own is not None and source.name == d.name:
        split = source.get("split", "") or "validation"
        if split == "train" or own.get(split) is None:
            known = sorted(k for k, v in own.items() if v is not None and k != "train")
            raise ValueError(f"config.eval.source.split={split!r}: {d.name} has no held-out split "
                             f"of that name; use one of {known}")
        return own[split]
    if source.name == "coco_captions":
        from lqae_vlap.data.coco_captions import CocoCaptions  # noqa: PLC0415

        return images_lib.ReplaceBadImages(
            CocoCaptions(source.split, data_dir=d.get("data_dir") or None, mode="images",
                         index_cache_dir=d.get("index_cache_dir") or None), on_bad, name="images")
    if source.name == "jsonl":
        return images_lib.ReplaceBadImages(
            captions_lib.ImagesWithReferences(captions_lib.JsonlCaptions(source.path)), on_bad,
            name="images")
    if source.name:
        raise ValueError(f"config.eval.source.name={source.name!r} is not known; use '' (the "
                         "training data's held-out split), 'coco_captions', 'jsonl' or "
                         f"config.data.name ({d.name!r}) with a split")
    return None


CAPTIONING_SOURCES = ("", "nocaps")
RETRIEVAL_SOURCES = ("", "flickr30k", "coco")


def _own_source(section: ml_collections.ConfigDict, eval_name: str, known: tuple[str, ...]) -> str:
    """``config.eval.<eval_name>.source``, checked against ``known``."""
    name = section.get("source", "")
    if name not in known:
        raise ValueError(f"config.eval.{eval_name}.source={name!r} is not known; use one of "
                         f"{known} ('' = config.eval.source's images)")
    return name


def captioning_images(c: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> Any:
    """``config.eval.captioning.source``'s images: 'nocaps' (NoCaps validation from
    ``c.annotations`` and ``c.image_dir``, data/nocaps.py), or None for '' (``eval_images``')."""
    name = _own_source(c, "captioning", CAPTIONING_SOURCES)
    if not name:
        return None
    from lqae_vlap.data.nocaps import NoCapsValidation  # noqa: PLC0415

    return images_lib.ReplaceBadImages(NoCapsValidation(c.annotations, c.image_dir),
                                       d.get("on_bad_image", "skip"), name="captioning")


def retrieval_images(r: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> Any:
    """``config.eval.retrieval.source``'s images, or None for '' (``eval_images``'): 'flickr30k'
    (Karpathy's dataset_flickr30k.json in ``r.annotations``, flickr30k-images/ in ``r.image_dir``)
    or 'coco' (Karpathy's dataset_coco.json and the folder holding val2014/ when
    ``r.annotations`` is set, else TFDS coco_captions from ``config.data.data_dir``, whose
    'test' split is Karpathy's); split ``r.split`` (data/karpathy_splits.py)."""
    name = _own_source(r, "retrieval", RETRIEVAL_SOURCES)
    if not name:
        return None
    split = r.get("split", "test")
    if name == "coco" and not r.get("annotations"):
        from lqae_vlap.data.coco_captions import CocoCaptions  # noqa: PLC0415

        src = CocoCaptions(split, data_dir=d.get("data_dir") or None, mode="images",
                           index_cache_dir=d.get("index_cache_dir") or None)
    else:
        from lqae_vlap.data.karpathy_splits import KarpathySplit  # noqa: PLC0415

        src = KarpathySplit(r.get("annotations", ""), r.get("image_dir", ""), split,
                            dataset=name)
    return images_lib.ReplaceBadImages(src, d.get("on_bad_image", "skip"), name="retrieval")


VQA_SOURCES = ("", "digits", "vqav2", "okvqa")


def _vqa_files(vqa: ml_collections.ConfigDict, questions: str, annotations: str, image_dir: str,
               on_bad_image: str, name: str) -> Any:
    from lqae_vlap.data.vqa_source import OkVqaSource, VqaV2Source  # noqa: PLC0415

    cls = OkVqaSource if vqa.source == "okvqa" else VqaV2Source
    return images_lib.ReplaceBadImages(cls(questions, annotations or None, image_dir),
                                       on_bad_image, name=name)


def vqa_questions(vqa: ml_collections.ConfigDict, image_size: int,
                  on_bad_image: str = "skip") -> Any:
    """``config.eval.vqa.source``'s questions, or None for '' (no VQA); VQAv2's and OK-VQA's
    images are read from files, so ``on_bad_image`` applies to them (``images.ReplaceBadImages``)."""
    if vqa.source not in VQA_SOURCES:
        raise ValueError(f"config.eval.vqa.source={vqa.source!r} is not known; use one of "
                         f"{VQA_SOURCES} ('' = no VQA)")
    if vqa.source == "digits":
        from lqae_vlap.data.vqa_source import DigitQuestions  # noqa: PLC0415

        return DigitQuestions("validation", image_size=int(image_size))
    if vqa.source:
        return _vqa_files(vqa, vqa.questions, vqa.annotations, vqa.image_dir, on_bad_image, "vqa")
    return None


def vqa_shot_pool(vqa: ml_collections.ConfigDict, image_size: int,
                  on_bad_image: str = "skip") -> Any:
    """The solved examples few-shot VQA shows (``config.eval.vqa.shots`` > 0), or None: the
    train split of the same dataset, ``eval.vqa.shot_questions`` / ``shot_annotations`` /
    ``shot_image_dir`` (e.g. OK-VQA's OpenEnded_mscoco_train2014_questions.json,
    mscoco_train2014_annotations.json and COCO's train2014/); the digits' train split for
    'digits'."""
    if not vqa.source or int(vqa.get("shots", 0)) <= 0:
        return None
    if vqa.source == "digits":
        from lqae_vlap.data.vqa_source import DigitQuestions  # noqa: PLC0415

        return DigitQuestions("train", image_size=int(image_size))
    missing = [k for k in ("shot_questions", "shot_annotations", "shot_image_dir")
               if not vqa.get(k)]
    if missing:
        raise ValueError(f"config.eval.vqa.shots={vqa.shots} needs the train split's files: set "
                         f"config.eval.vqa.{', '.join(missing)} (questions / annotations JSON and "
                         "the COCO train2014 image folder), or shots=0")
    return _vqa_files(vqa, vqa.shot_questions, vqa.shot_annotations, vqa.shot_image_dir,
                      on_bad_image, "vqa_shots")
