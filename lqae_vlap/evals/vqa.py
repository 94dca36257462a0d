"""VQAv2 soft accuracy and answer normalisation, ported from the official evaluation script.

Source: vqaEval.py of the VQA API (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
vqaEval.py, author aagrawal). The word lists and regular expressions below are copied from it,
including its quirks, so our numbers are comparable with published VQAv2 accuracies:
  * accuracy of an answer = mean over the 10 leave-one-out subsets of 9 human answers of
    min(1, #matching humans in the subset / 3); with n of the 10 humans agreeing this is
    0, 0.3, 0.6, 0.9, 1.0 for n = 0, 1, 2, 3, >= 4;
  * answers are stripped of newlines/tabs always, but punctuation/digit/article/contraction
    normalisation is applied ONLY when the 10 human answers are not all identical (official
    behaviour: a model saying "two" to a question all humans answered "2" scores 0);
  * the final comparison is case-insensitive;
  * ``_PERIOD_STRIP`` keeps the script's typo ``(?!<=\\d)`` (meant as a look-behind) and its call
    ``sub("", text, re.UNICODE)``, which passes re.UNICODE (= 32) as the replacement COUNT.

Accuracies are returned as fractions in [0, 1] (the official script prints 100x, rounded to 2
decimals); multiply by 100 for the papers' tables. OK-VQA is scored the same way, on its own
answers (5 annotators, released as 10; data/vqa_source.py).

Few-shot prompts (``fewshot_prompt``, ``pick_shots``), as MAGMA and LiMBeR evaluate: n solved
examples from the TRAIN split, each its own image and "template + answer", then the query's image
and template; the model continues with the answer:

  [image_1] "Question: q_1 Answer: a_1\n" ... [image_n] "Question: q_n Answer: a_n\n"
  [image_q] "Question: q Answer:"
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# --- Official lists (vqaEval.py) -----------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_OFFICIAL_SUB_COUNT = int(re.UNICODE)  # the script's sub("", text, re.UNICODE): count = 32


def process_punctuation(text: str) -> str:
    """vqaEval.py processPunctuation: delete or space out punctuation, strip non-decimal periods."""
    out = text
    for p in PUNCT:
        # Tested on the ORIGINAL text, as in the script.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py processDigitArticle: lowercase, number words -> digits, drop articles, fix
    contractions ("isnt" -> "isn't")."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer (whitespace, punctuation, digits, articles)."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official soft accuracy of one predicted answer.

    Args:
      prediction: the model's answer string.
      human_answers: the 10 human answers of the question.

    Returns:
      mean over leave-one-out subsets of min(1, #matches among the other answers / 3).
    """
    if isinstance(human_answers, str) or len(human_answers) == 0:
        raise ValueError("human_answers must be a non-empty list of strings (VQAv2: 10 per "
                         f"question), got {human_answers!r}")
    gts = [_clean_whitespace(a) for a in human_answers]
    res = _clean_whitespace(prediction)
    if len(set(gts)) > 1:  # official: normalise only when the humans disagree
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    res = res.lower()
    matches = [a.lower() == res for a in gts]
    total = sum(matches)
    # Leaving out answer k removes k's own match (the script drops that one answer record).
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def first_answer(text: str) -> str:
    """The answer part of a generated continuation: its first line, before any new 'Question'."""
    text = text.split("\n", 1)[0]
    return re.split(r"\bQuestion\b", text, maxsplit=1)[0].strip()


def vqa_accuracy(predictions: Mapping[Any, str], annotations: Mapping[Any, Sequence[str]],
                 answer_types: Mapping[Any, str] | None = None,
                 question_types: Mapping[Any, str] | None = None) -> dict[str, Any]:
    """VQAv2 accuracy over a set of questions.

    Args:
      predictions: question_id -> predicted answer. Must cover every annotated question (the
        official script refuses partial results too).
      annotations: question_id -> the human answers (10 per question in VQAv2).
      answer_types: optional question_id -> 'yes/no' | 'number' | 'other'.
      question_types: optional question_id -> question type (e.g. 'what color is the').

    Returns:
      {'overall': mean accuracy, 'per_question': {qid: acc}} plus 'per_answer_type' and
      'per_question_type' ({type: mean acc}) when the types are given. Fractions in [0, 1].
    """
    if not annotations:
        raise ValueError("annotations is empty; load them with data/vqa_source.load_vqa_v2(...)")
    missing = [q for q in annotations if q not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} annotated questions have no prediction (e.g. "
                         f"{missing[:5]}); predict every question or subset the annotations")
    per_q = {q: question_accuracy(predictions[q], ans) for q, ans in annotations.items()}
    out: dict[str, Any] = {"overall": sum(per_q.values()) / len(per_q), "per_question": per_q}
    for key, types in (("per_answer_type", answer_types), ("per_question_type", question_types)):
        if types is None:
            continue
        groups: dict[str, list[float]] = {}
        for q, acc in per_q.items():
            if q not in types:
                raise ValueError(f"question {q} has no entry in {key[4:]}s; give a type for every "
                                 "annotated question or pass None")
            groups.setdefault(types[q], []).append(acc)
        out[key] = {t: sum(v) / len(v) for t, v in groups.items()}
    return out


def pick_shots(pool_question_ids: Sequence[int], query_id: int, n: int, seed: int) -> list[int]:
    """Positions in the shot pool of the ``n`` solved examples shown before question ``query_id``.

    Drawn without replacement by a generator seeded with (seed, query_id), so a question gets the
    same shots whatever else is evaluated and in whatever order; never the query's own question
    (a pool entry with its question_id), which matters when the pool is the evaluated split.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"config.eval.vqa.shots={n} must be >= 0")
    if n == 0:
        return []
    size = len(pool_question_ids)
    rng = np.random.default_rng([int(seed), int(query_id)])
    # n + 1 distinct candidates: at most one of them can be the query itself.
    take = min(n + 1, size)
    candidates = [int(i) for i in rng.choice(size, size=take, replace=False)]
    chosen = [i for i in candidates if int(pool_question_ids[i]) != int(query_id)][:n]
    if len(chosen) < n:
        raise ValueError(f"config.eval.vqa.shots={n}: the shot pool has only {size} questions "
                         f"({len(chosen)} usable for question {query_id}); lower shots")
    return chosen


def fewshot_prompt(template: str, question: str, shots: Sequence[tuple[Any, str, str]],
                   separator: str = "\n", query_image: Any = "query") -> list[tuple[str, Any]]:
    """The interleaved prompt as segments ('image', key) / ('text', str), in order.

    Args:
      template: the question template with ``{question}``, e.g. 'Question: {question} Answer:'.
      question: the query's question.
      shots: (image key, question, answer) of each solved example, shown first.
      separator: text after each shown answer (it marks where an answer ends).
      query_image: the key of the query's image.
    """
    if "{question}" not in template:
        raise ValueError(f"config.eval.vqa.template={template!r} has no '{{question}}' to fill")
    out: list[tuple[str, Any]] = []
    for key, q, a in shots:
        out += [("image", key), ("text", f"{template.format(question=q)} {a}{separator}")]
    return out + [("image", query_image), ("text", template.format(question=question))]
