"""VQAv2 and OK-VQA questions as random-access sources, and a digit stand-in for the offline demo.

Files a user downloads (both datasets ask about COCO 2014 images, named
``COCO_<folder>_<image_id:012d>.jpg``; unzip COCO's ``val2014.zip`` / ``train2014.zip`` from
cocodataset.org into a folder each and pass that folder as ``image_dir``):

  VQAv2 (https://visualqa.org/download.html), ``VqaV2Source``:
    v2_OpenEnded_mscoco_<subtype>_questions.json   (Questions zip; subtype val2014, train2014,
                                                    test2015, test-dev2015)
    v2_mscoco_<subtype>_annotations.json           (Annotations zip; none for test splits)
  OK-VQA (https://okvqa.allenai.org/download.html), ``OkVqaSource``; its test split is COCO's
  val2014 (5,046 questions), its train split train2014 (9,009):
    OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json
    OpenEnded_mscoco_train2014_questions.json, mscoco_train2014_annotations.json

Both follow the VQA API's layout: the questions file holds {"data_subtype": "val2014",
"questions": [{"image_id", "question", "question_id"}, ...]}; the annotations file
{"annotations": [{"question_id", "image_id", "answers": [{"answer", "answer_confidence",
"answer_id", ...}], "answer_type", "question_type", ...}]}. VQAv2 has 10 human answers per
question and a "multiple_choice_answer". OK-VQA's annotators gave 5 answers each, released as 10
(each listed twice, with a "raw_answer" beside the processed "answer"), all answer_type "other",
question_type a knowledge-category code ("one" .. "ten", "other") named in the file's top-level
"question_types" map. We read "answer" (what OK-VQA's evaluation scores) and accept 5 or 10 answers:
evals/vqa.question_accuracy scores any number with the official formula (mean over leave-one-out
subsets of min(1, #matches / 3)); with the released 10 duplicated answers that is OK-VQA's own
evaluation (the VQA script run on its files).

One example per question, in the questions file's order::

  {'image': uint8 [H, W, 3], 'question': str, 'question_id': int64, 'image_id': int64,
   'answers': the human answers (an empty list for test splits, which ship none)}

The image folder name is taken from the questions file's ``data_subtype`` unless
``image_subtype`` is given; test-dev2015 questions use the test2015 images. A missing file, a file
that is not JSON, or an entry without the fields above stops with one line naming the file.

``DigitQuestions``: a STAND-IN, not VQA: scikit-learn's digits (``demo_images.DemoImages``) asked
"What digit is this?", all 10 answers the digit's name ("seven"). It exercises the VQA evaluation
end to end (prompting, answer normalisation, soft accuracy) offline and on a CPU; its numbers say
nothing about VQAv2. As in VQAv2, the 10 answers agree, so the official scorer does not normalise
them: "seven" scores 1, "7" scores 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lqae_vlap.data import demo_images
from lqae_vlap.data.images import read_image_file
from lqae_vlap.data.indexing import check_index

N_HUMAN_ANSWERS = 10  # human answers per annotated VQAv2 question
DEFAULT_IMAGE_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"
# Questions of these subtypes are asked about another subtype's images.
_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}
DIGIT_QUESTION = "What digit is this?"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What tells the official files of one VQA dataset apart."""

    name: str
    questions_file: str  # file name pattern, <subtype> for the split
    annotations_file: str
    url: str
    answer_counts: tuple[int, ...]  # human answers per annotated question


DATASETS = {
    "vqav2": Dataset("VQAv2", "v2_OpenEnded_mscoco_<subtype>_questions.json",
                     "v2_mscoco_<subtype>_annotations.json", "https://visualqa.org/download.html",
                     (N_HUMAN_ANSWERS,)),
    "okvqa": Dataset("OK-VQA", "OpenEnded_mscoco_<subtype>_questions.json",
                     "mscoco_<subtype>_annotations.json", "https://okvqa.allenai.org/download.html",
                     (5, 10)),
}

__all__ = ["VQAv2Split", "load_vqa", "load_vqa_v2", "VqaV2Source", "OkVqaSource",
           "DigitQuestions", "DEFAULT_IMAGE_PATTERN", "DIGIT_QUESTION", "DATASETS",
           "shot_answer"]


def _read(src: str | os.PathLike | Mapping[str, Any], what: str, dataset: Dataset
          ) -> tuple[Mapping[str, Any], str]:
    """(parsed file, how to name it in an error); ``what``: 'questions' or 'annotations'."""
    pattern = dataset.questions_file if what == "questions" else dataset.annotations_file
    if isinstance(src, Mapping):
        return src, f"the {dataset.name} {what} ({pattern})"
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{dataset.name} {what} file {path} not found; download "
                                f"{pattern} from {dataset.url} and unzip it there")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{dataset.name} {what} file {path} is not valid JSON ({e}); download "
                         f"{pattern} again from {dataset.url}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{dataset.name} {what} file {path} holds a {type(data).__name__}, not "
                         f"the official {pattern} object")
    return data, str(path)


def _entries(data: Mapping[str, Any], key: str, where: str) -> list:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"{where} has no '{key}' list; is it the official {key} file?")
    return entries


@dataclasses.dataclass(frozen=True)
class VQAv2Split:
    """One VQAv2 / OK-VQA split, keyed by question_id.

    questions: qid -> question text; image_ids: qid -> COCO image id; answers: qid -> the human
    answers (empty dict for test splits, which ship no annotations); answer_types / question_types:
    qid -> type strings (absent from the dicts when the file has none); multiple_choice_answer:
    qid -> the most common human answer ('' when the file has none); question_type_names: type
    -> name where the file names its types (OK-VQA's "question_types"), else empty.
    """

    questions: dict[int, str]
    image_ids: dict[int, int]
    answers: dict[int, list[str]]
    answer_types: dict[int, str]
    question_types: dict[int, str]
    multiple_choice_answer: dict[int, str]
    question_type_names: dict[str, str] = dataclasses.field(default_factory=dict)
    data_subtype: str = ""


def load_vqa(questions_json: str | os.PathLike | Mapping[str, Any],
             annotations_json: str | os.PathLike | Mapping[str, Any] | None = None, *,
             dataset: str = "vqav2") -> VQAv2Split:
    """Read one split's official files (module docstring), given as paths or parsed dicts.

    dataset: 'vqav2' or 'okvqa' (only the file names and the download page in errors differ).
    """
    ds = DATASETS[dataset]
    qdata, qwhere = _read(questions_json, "questions", ds)
    questions, image_ids = {}, {}
    for k, q in enumerate(_entries(qdata, "questions", qwhere)):
        try:
            qid = int(q["question_id"])
            questions[qid] = str(q["question"])
            image_ids[qid] = int(q["image_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{qwhere}: question {k} is malformed ({type(e).__name__}: {e}); "
                             "each needs question_id, image_id and question") from None
    answers: dict[int, list[str]] = {}
    answer_types: dict[int, str] = {}
    question_types: dict[int, str] = {}
    mc: dict[int, str] = {}
    names: dict[str, str] = {}
    if annotations_json is not None:
        adata, awhere = _read(annotations_json, "annotations", ds)
        for k, a in enumerate(_entries(adata, "annotations", awhere)):
            try:
                qid = int(a["question_id"])
                image_id = int(a["image_id"])
                found = [str(d["answer"]) for d in a["answers"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{awhere}: annotation {k} is malformed ({type(e).__name__}: "
                                 f"{e}); each needs question_id, image_id and answers "
                                 "[{answer, ...}]") from None
            if qid not in questions:
                raise ValueError(f"{awhere}: annotation for question {qid} has no question in "
                                 f"{qwhere}; the two files must be of the same split")
            if image_id != image_ids[qid]:
                raise ValueError(f"{awhere}: question {qid} has image_id {image_id} but "
                                 f"{image_ids[qid]} in {qwhere}; different splits?")
            answers[qid] = found
            if a.get("answer_type"):
                answer_types[qid] = str(a["answer_type"])
            if a.get("question_type"):
                question_types[qid] = str(a["question_type"])
            mc[qid] = str(a.get("multiple_choice_answer", ""))
        if isinstance(adata.get("question_types"), Mapping):
            names = {str(k): str(v) for k, v in adata["question_types"].items()}
    return VQAv2Split(questions, image_ids, answers, answer_types, question_types, mc, names,
                      str(qdata.get("data_subtype", "")))


def load_vqa_v2(questions_json: str | os.PathLike | Mapping[str, Any],
                annotations_json: str | os.PathLike | Mapping[str, Any] | None = None
                ) -> VQAv2Split:
    """``load_vqa`` of the VQAv2 files (v2_OpenEnded_mscoco_<split>_questions.json and
    v2_mscoco_<split>_annotations.json)."""
    return load_vqa(questions_json, annotations_json, dataset="vqav2")


def shot_answer(data: VQAv2Split, qid: int) -> str:
    """The answer a solved few-shot example shows: VQAv2's multiple_choice_answer, else the most
    common human answer (OK-VQA; ties: the first listed)."""
    if data.multiple_choice_answer.get(qid):
        return data.multiple_choice_answer[qid]
    counts = Counter(data.answers[qid])
    return max(data.answers[qid], key=lambda x: counts[x])


class _Questions:
    """Shared by both sources: examples by question position, images looked up per subclass."""

    question_ids: list[int]
    data: VQAv2Split

    def __len__(self) -> int:
        return len(self.question_ids)

    def _check(self, index: int) -> int:
        return check_index(index, len(self), type(self).__name__)

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

    dataset = "vqav2"

    def __init__(self, questions_json: str | os.PathLike | Mapping[str, Any],
                 annotations_json: str | os.PathLike | Mapping[str, Any] | None,
                 image_dir: str | os.PathLike, *, image_pattern: str = DEFAULT_IMAGE_PATTERN,
                 image_subtype: str | None = None) -> None:
        ds = DATASETS[self.dataset]
        who = type(self).__name__
        self.data = load_vqa(questions_json, annotations_json, dataset=self.dataset)
        self.question_ids = list(self.data.questions)
        if not self.question_ids:
            raise ValueError(f"{who}: the questions file lists no questions.")
        bad = [q for q, a in self.data.answers.items() if len(a) not in ds.answer_counts]
        if bad:
            counts = " or ".join(map(str, ds.answer_counts))
            raise ValueError(f"{who}: questions {bad[:5]} have not {counts} answers; is this the "
                             f"{ds.name} annotations file ({ds.annotations_file})?")
        if image_subtype is None:
            subtype = self.data.data_subtype
            if not subtype:
                raise ValueError(f"{who}: the questions file has no 'data_subtype'; pass "
                                 "image_subtype='val2014' (or train2014, test2015).")
            image_subtype = _IMAGE_SUBTYPE.get(subtype, subtype)
        self.image_subtype = image_subtype
        self.image_dir = Path(image_dir)
        self.image_pattern = image_pattern
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{who}: image_dir {self.image_dir} is not a folder; "
                                    f"unzip COCO's {image_subtype}.zip (cocodataset.org) there.")
        # One look at the first image catches a wrong folder or pattern now, not mid-evaluation.
        first = self.image_path(self.data.image_ids[self.question_ids[0]])
        if not first.is_file():
            raise FileNotFoundError(
                f"{who}: {first} does not exist. image_dir must hold the {image_subtype} "
                f"images named like {image_pattern!r}; pass image_pattern / image_subtype if yours "
                "are named differently.")

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.image_pattern.format(subtype=self.image_subtype,
                                                          image_id=int(image_id))

    def __getitem__(self, index: int) -> dict[str, Any]:
        fields = self.fields_without_image(index)
        return {"image": read_image_file(self.image_path(int(fields["image_id"]))), **fields}


class OkVqaSource(VqaV2Source):
    """OK-VQA questions with their COCO images (module docstring): the arguments of
    ``VqaV2Source``, with OK-VQA's files (OpenEnded_mscoco_val2014_questions.json,
    mscoco_val2014_annotations.json) and 5 or 10 answers per question."""

    dataset = "okvqa"


class DigitQuestions(_Questions):
    """Stand-in VQA over sklearn digits (module docstring): "What digit is this?" -> "seven".

    Args: as ``demo_images.DemoImages``. Question and image ids are the digit's index in the split.
    """

    def __init__(self, split: str = "validation", image_size: int = 16,
                 resample: str = "bilinear") -> None:
        self.split = split
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
