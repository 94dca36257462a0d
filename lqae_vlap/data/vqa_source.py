"""VQAv2 questions as a random-access source, and a digit stand-in for the offline demo.

``VqaV2Source``: the official VQAv2 files (``v2_OpenEnded_mscoco_<subtype>_questions.json``,
``v2_mscoco_<subtype>_annotations.json``, read by ``load_vqa_v2``) and the COCO image
folder, one example per question in the questions file's order::

  {'image': uint8 [H, W, 3], 'question': str, 'question_id': int64, 'image_id': int64,
   'answers': the 10 human answers (an empty list for test splits, which ship none)}

COCO's official image names are ``COCO_<folder>_<image_id:012d>.jpg`` with ``<folder>`` one of
train2014, val2014, test2015; test-dev2015 questions use the test2015 images. The folder name is
taken from the questions file's ``data_subtype`` unless ``image_subtype`` is given.

``DigitQuestions``: a STAND-IN, not VQA: scikit-learn's digits (``demo_images.DemoImages``) asked
"What digit is this?", all 10 answers the digit's name ("seven"). It exercises the VQA evaluation
end to end (prompting, answer normalisation, soft accuracy) offline and on a CPU; its numbers say
nothing about VQAv2. As in VQAv2, the 10 answers agree, so the official scorer does not normalise
them: "seven" scores 1, "7" scores 0.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.data import demo_images
from lqae_vlap.data.images import read_image_file

N_HUMAN_ANSWERS = 10  # human answers per annotated VQAv2 question
DEFAULT_IMAGE_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"
# Questions of these subtypes are asked about another subtype's images.
_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}
DIGIT_QUESTION = "What digit is this?"

__all__ = ["VQAv2Split", "load_vqa_v2", "VqaV2Source", "DigitQuestions", "DEFAULT_IMAGE_PATTERN",
           "DIGIT_QUESTION"]


def _read(src: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(src, Mapping):
        return src
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"VQAv2 file {path} not found; download the questions/annotations "
                                "zips from https://visualqa.org/download.html and unzip them.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class VQAv2Split:
    """One VQAv2 split, keyed by question_id.

    questions: qid -> question text; image_ids: qid -> COCO image id; answers: qid -> the 10 human
    answers (empty dict for test splits, which ship no annotations); answer_types / question_types:
    qid -> type strings; multiple_choice_answer: qid -> the most common human answer.
    """

    questions: dict[int, str]
    image_ids: dict[int, int]
    answers: dict[int, list[str]]
    answer_types: dict[int, str]
    question_types: dict[int, str]
    multiple_choice_answer: dict[int, str]


def load_vqa_v2(questions_json: str | os.PathLike | Mapping[str, Any],
                annotations_json: str | os.PathLike | Mapping[str, Any] | None = None
                ) -> VQAv2Split:
    """Read the official VQAv2 files (v2_OpenEnded_mscoco_<split>_questions.json and
    v2_mscoco_<split>_annotations.json), given as paths or already-parsed dicts.

    The questions file holds {"questions": [{"question_id", "image_id", "question"}, ...]}; the
    annotations file {"annotations": [{"question_id", "image_id", "question_type", "answer_type",
    "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}]}.
    """
    qdata = _read(questions_json)
    if "questions" not in qdata:
        raise ValueError("questions_json has no 'questions' list; pass the official "
                         "v2_OpenEnded_mscoco_<split>_questions.json")
    questions, image_ids = {}, {}
    for q in qdata["questions"]:
        qid = int(q["question_id"])
        questions[qid] = q["question"]
        image_ids[qid] = int(q["image_id"])
    answers: dict[int, list[str]] = {}
    answer_types: dict[int, str] = {}
    question_types: dict[int, str] = {}
    mc: dict[int, str] = {}
    if annotations_json is not None:
        adata = _read(annotations_json)
        if "annotations" not in adata:
            raise ValueError("annotations_json has no 'annotations' list; pass the official "
                             "v2_mscoco_<split>_annotations.json")
        for a in adata["annotations"]:
            qid = int(a["question_id"])
            if qid not in questions:
                raise ValueError(f"annotation for question {qid} has no question in "
                                 "questions_json; the two files must be of the same split")
            if int(a["image_id"]) != image_ids[qid]:
                raise ValueError(f"question {qid}: image_id {a['image_id']} in the annotations "
                                 f"but {image_ids[qid]} in the questions; different splits?")
            answers[qid] = [d["answer"] for d in a["answers"]]
            answer_types[qid] = a["answer_type"]
            question_types[qid] = a["question_type"]
            mc[qid] = a.get("multiple_choice_answer", "")
    return VQAv2Split(questions, image_ids, answers, answer_types, question_types, mc)


class _Questions:
    """Shared by both sources: examples by question position, images looked up per subclass."""

    question_ids: list[int]
    data: VQAv2Split

    def __len__(self) -> int:
        return len(self.question_ids)

    def _check(self, index: int) -> int:
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        return i % len(self)

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image', without reading the image (for cached features)."""
        qid = self.question_ids[self._check(index)]
        return {"question": self.data.questions[qid], "question_id": np.int64(qid),
                "image_id": np.int64(self.data.image_ids[qid]),
                "answers": list(self.data.answers.get(qid, []))}

    @property
    def questions(self) -> list[str]:
        return [self.data.questions[q] for q in self.question_ids]


class VqaV2Source(_Questions):
    """VQAv2 questions with their COCO images; see the module docstring.

    Args:
      questions_json: the questions file (path or parsed dict).
      annotations_json: the annotations file, or None for test / test-dev (answers then empty).
      image_dir: the folder of that subtype's COCO images (e.g. ``val2014/``).
      image_pattern: file name of an image, formatted with ``subtype`` and ``image_id``.
      image_subtype: the ``subtype`` in file names; None = from the questions file.

    ``data`` is the ``VQAv2Split`` (answers, answer types) that ``evals/vqa.vqa_accuracy`` scores.
    """

    def __init__(self, questions_json: str | os.PathLike | Mapping[str, Any],
                 annotations_json: str | os.PathLike | Mapping[str, Any] | None,
                 image_dir: str | os.PathLike, *, image_pattern: str = DEFAULT_IMAGE_PATTERN,
                 image_subtype: str | None = None) -> None:
        qdata = _read(questions_json)
        adata = None if annotations_json is None else _read(annotations_json)
        self.data = load_vqa_v2(qdata, adata)
        self.question_ids = list(self.data.questions)
        if not self.question_ids:
            raise ValueError("VqaV2Source: the questions file lists no questions.")
        bad = [q for q, a in self.data.answers.items() if len(a) != N_HUMAN_ANSWERS]
        if bad:
            raise ValueError(f"VqaV2Source: questions {bad[:5]} have not {N_HUMAN_ANSWERS} answers; "
                             "is this the VQAv2 annotations file?")
        if image_subtype is None:
            subtype = qdata.get("data_subtype")
            if not subtype:
                raise ValueError("VqaV2Source: the questions file has no 'data_subtype'; pass "
                                 "image_subtype='val2014' (or train2014, test2015).")
            image_subtype = _IMAGE_SUBTYPE.get(subtype, subtype)
        self.image_subtype = image_subtype
        self.image_dir = Path(image_dir)
        self.image_pattern = image_pattern
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"VqaV2Source: image_dir {self.image_dir} is not a folder; "
                                    f"unzip COCO's {image_subtype}.zip (cocodataset.org) there.")
        # One look at the first image catches a wrong folder or pattern now, not mid-evaluation.
        first = self.image_path(self.data.image_ids[self.question_ids[0]])
        if not first.is_file():
            raise FileNotFoundError(
                f"VqaV2Source: {first} does not exist. image_dir must hold the {image_subtype} "
                f"images named like {image_pattern!r}; pass image_pattern / image_subtype if yours "
                "are named differently.")

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.image_pattern.format(subtype=self.image_subtype,
                                                          image_id=int(image_id))

    def __getitem__(self, index: int) -> dict[str, Any]:
        fields = self.fields_without_image(index)
        return {"image": read_image_file(self.image_path(int(fields["image_id"]))), **fields}


class DigitQuestions(_Questions):
    """Stand-in VQA over sklearn digits (module docstring): "What digit is this?" -> "seven".

    Args: as ``demo_images.DemoImages``. Question and image ids are the digit's index in the split.
    """

    def __init__(self, split: str = "validation", image_size: int = 16,
                 resample: str = "bilinear") -> None:
        self.images = demo_images.DemoImages(split, image_size=image_size, resample=resample)
        ids = list(range(len(self.images)))
        names = [demo_images.DIGIT_NAMES[int(label)] for label in self.images.labels]
        self.question_ids = ids
        self.data = VQAv2Split(
            questions={i: DIGIT_QUESTION for i in ids}, image_ids={i: i for i in ids},
            answers={i: [n] * N_HUMAN_ANSWERS for i, n in zip(ids, names)},
            answer_types={i: "number" for i in ids}, question_types={i: "what digit" for i in ids},
            multiple_choice_answer=dict(zip(ids, names)))

    def fields_without_image(self, index: int) -> dict[str, Any]:
        fields = super().fields_without_image(index)
        return {**fields, "label": self.images.labels[int(fields["image_id"])]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        fields = self.fields_without_image(index)
        return {"image": self.images[int(fields["image_id"])]["image"], **fields}
