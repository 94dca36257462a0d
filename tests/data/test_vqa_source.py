"""VQAv2, OK-VQA and digit-question sources (data/vqa_source.py) on tiny files in the official
formats."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.data.batches import IndexedBatches
from lqae_vlap.data.demo_images import DIGIT_NAMES, DemoImages
from lqae_vlap.data.vqa_source import (DIGIT_QUESTION, DigitQuestions, OkVqaSource, VqaV2Source,
                                       load_vqa, load_vqa_v2, shot_answer)
from lqae_vlap.evals.vqa import question_accuracy, vqa_accuracy

IMAGES = (42, 1234567)
QUESTIONS = [  # (question_id, image_id, question, answers)
    (420, 42, "What color is the bus?", ["red"] * 7 + ["orange", "red ", "dark red"]),
    (421, 42, "How many wheels?", ["4", "four", "4", "4", "6", "4", "4", "4", "4", "4"]),
    (1234567000, 1234567, "Is it raining?", ["no"] * 10),
]


def _pixels(image_id: int) -> np.ndarray:
    return np.random.default_rng(image_id).integers(0, 256, (9, 13, 3), dtype=np.uint8)


def _write(tmp_path, subtype="val2014", folder="val2014", with_annotations=True):
    qfile = tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    qfile.write_text(json.dumps({"data_subtype": subtype, "questions": [
        {"question_id": q, "image_id": i, "question": t} for q, i, t, _ in QUESTIONS]}))
    afile = None
    if with_annotations:
        afile = tmp_path / f"v2_mscoco_{subtype}_annotations.json"
        afile.write_text(json.dumps({"annotations": [
            {"question_id": q, "image_id": i, "question_type": "what", "answer_type": "other",
             "multiple_choice_answer": a[0],
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                         for k, x in enumerate(a)]} for q, i, _, a in QUESTIONS]}))
    image_dir = tmp_path / folder
    image_dir.mkdir(exist_ok=True)
    for image_id in IMAGES:  # PNG: lossless, so pixels compare exactly
        Image.fromarray(_pixels(image_id)).save(image_dir / f"COCO_{folder}_{image_id:012d}.jpg",
                                                format="PNG")
    return qfile, afile, image_dir


def test_examples_follow_the_files(tmp_path):
    qfile, afile, image_dir = _write(tmp_path)
    src = VqaV2Source(qfile, afile, image_dir)
    assert len(src) == 3 and src.image_subtype == "val2014"
    for k, (qid, image_id, text, answers) in enumerate(QUESTIONS):
        ex = src[k]
        assert ex["question"] == text and ex["answers"] == answers
        assert ex["question_id"] == qid and ex["image_id"] == image_id
        assert ex["question_id"].dtype == np.int64
        np.testing.assert_array_equal(ex["image"], _pixels(image_id))
        assert src.fields_without_image(k) == {n: v for n, v in ex.items() if n != "image"}
    assert src.questions == [q[2] for q in QUESTIONS]
    # The source feeds the official scorer directly: each question's most common answer.
    preds = {qid: max(set(a), key=a.count) for qid, _, _, a in QUESTIONS}
    acc = vqa_accuracy(preds, src.data.answers)
    want = np.mean([question_accuracy(preds[q], a) for q, _, _, a in QUESTIONS])
    assert acc["overall"] == pytest.approx(want, abs=1e-12)

    def pre(example, rng):
        return {"image": np.asarray(example["image"][:8, :8]), "answers": example["answers"]}

    batch = IndexedBatches(src, global_batch_size=3, seed=0, shuffle=False, preprocess=pre).batch_at(0)
    assert batch["image"].shape == (3, 8, 8, 3) and batch["answers"].shape == (3, 10)


def test_test_dev_questions_use_test2015_images_and_have_no_answers(tmp_path):
    qfile, _, image_dir = _write(tmp_path, subtype="test-dev2015", folder="test2015",
                                 with_annotations=False)
    src = VqaV2Source(qfile, None, image_dir)
    assert src.image_subtype == "test2015"
    assert src[0]["answers"] == [] and src.image_path(42).name == "COCO_test2015_000000000042.jpg"
    np.testing.assert_array_equal(src[2]["image"], _pixels(1234567))


def test_custom_pattern_and_parsed_dicts(tmp_path):
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    for image_id in IMAGES:
        buf = io.BytesIO()
        Image.fromarray(_pixels(image_id)).save(buf, format="PNG")
        (image_dir / f"{image_id}.png").write_bytes(buf.getvalue())
    questions = {"questions": [{"question_id": 1, "image_id": 42, "question": "q?"}]}
    src = VqaV2Source(questions, None, image_dir, image_pattern="{image_id}.png", image_subtype="x")
    np.testing.assert_array_equal(src[0]["image"], _pixels(42))


def test_errors_name_the_fix(tmp_path):
    qfile, afile, image_dir = _write(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError,
                       match="COCO_val2014_000000000042.jpg does not exist.*image_pattern"):
        VqaV2Source(qfile, afile, tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="not a folder.*val2014.zip"):
        VqaV2Source(qfile, afile, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="visualqa.org"):
        VqaV2Source(tmp_path / "missing.json", None, image_dir)
    with pytest.raises(ValueError, match="no 'data_subtype'.*image_subtype="):
        VqaV2Source({"questions": [{"question_id": 1, "image_id": 42, "question": "q"}]}, None, image_dir)
    short = json.loads(afile.read_text())
    short["annotations"][0]["answers"] = short["annotations"][0]["answers"][:3]
    with pytest.raises(ValueError, match=r"\[420\] have not 10 answers"):
        VqaV2Source(qfile, short, image_dir)


def test_digit_questions_stand_in():
    src = DigitQuestions("validation", image_size=8)
    ref = DemoImages("validation", image_size=8)
    assert len(src) == len(ref) == 297
    for k in (0, 100, 296):
        ex = src[k]
        name = DIGIT_NAMES[int(ref[k]["label"])]
        assert ex["question"] == DIGIT_QUESTION and ex["answers"] == [name] * 10
        assert ex["label"] == ref[k]["label"] and ex["question_id"] == k == ex["image_id"]
        np.testing.assert_array_equal(ex["image"], ref[k]["image"])
        assert question_accuracy(name, ex["answers"]) == 1.0
        assert question_accuracy(DIGIT_NAMES[(int(ex["label"]) + 1) % 10], ex["answers"]) == 0.0
    assert src.data.answers[5] == src[5]["answers"]
    with pytest.raises(IndexError, match="out of range"):
        src[297]


def test_load_vqa_v2(tmp_path):
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                 "questions": [{"image_id": 42, "question": "How many dogs?", "question_id": 420},
                               {"image_id": 7, "question": "Is it red?", "question_id": 70}]}
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["2"] * 9 + ["two"])]
    annotations = {"annotations": [{"question_id": 420, "image_id": 42, "question_type": "how many",
                                    "answer_type": "number", "multiple_choice_answer": "2",
                                    "answers": answers}]}
    qp, ap = tmp_path / "q.json", tmp_path / "a.json"
    qp.write_text(json.dumps(questions))
    ap.write_text(json.dumps(annotations))
    split = load_vqa_v2(qp, ap)
    assert split.questions == {420: "How many dogs?", 70: "Is it red?"}
    assert split.image_ids == {420: 42, 70: 7}
    assert split.answers == {420: ["2"] * 9 + ["two"]}
    assert split.answer_types == {420: "number"} and split.question_types == {420: "how many"}
    assert split.multiple_choice_answer == {420: "2"}
    # "two" normalises to "2" here because the humans disagree: all 10 match -> 1.0.
    assert vqa_accuracy({420: "two"}, split.answers)["overall"] == 1.0
    assert load_vqa_v2(questions).answers == {}  # test splits ship no annotations
    bad = {"annotations": [dict(annotations["annotations"][0], image_id=1)]}
    with pytest.raises(ValueError, match="different splits"):
        load_vqa_v2(questions, bad)
    with pytest.raises(ValueError, match="questions"):
        load_vqa_v2({"foo": []})


# --- OK-VQA -------------------------------------------------------------------------------------

OK_QUESTIONS = [  # (question_id, image_id, question, the 5 annotators' answers)
    (4200, 42, "What sport can you use this for?", ["surf", "surf", "surf", "swim", "surf"]),
    (12345670, 1234567, "Which country is this dish from?", ["italy", "italy", "spain",
                                                             "italy", "itali"]),
]


def _write_okvqa(tmp_path, duplicated=True):
    """OK-VQA's released layout: OpenEnded_mscoco_val2014_questions.json,
    mscoco_val2014_annotations.json (each annotator's answer listed twice, with raw_answer) and
    COCO val2014 JPEGs."""
    qfile = tmp_path / "OpenEnded_mscoco_val2014_questions.json"
    qfile.write_text(json.dumps({
        "license": {}, "data_subtype": "val2014", "task_type": "Open-Ended", "info": {},
        "data_type": "mscoco",
        "questions": [{"image_id": i, "question": t, "question_id": q}
                      for q, i, t, _ in OK_QUESTIONS]}))
    afile = tmp_path / "mscoco_val2014_annotations.json"
    anns = []
    for q, i, _, answers in OK_QUESTIONS:
        listed = [a for a in answers for _ in range(2 if duplicated else 1)]
        anns.append({"image_id": i, "answer_type": "other", "question_type": "one",
                     "question_id": q, "confidence": 3,
                     "answers": [{"answer_id": k + 1, "raw_answer": a.capitalize(),
                                  "answer_confidence": "yes", "answer": a}
                                 for k, a in enumerate(listed)]})
    afile.write_text(json.dumps({"license": {}, "data_subtype": "val2014", "info": {},
                                 "data_type": "mscoco", "annotations": anns,
                                 "question_types": {"one": "Vehicles and Transportation",
                                                    "other": "Other"}}))
    image_dir = tmp_path / "val2014"
    image_dir.mkdir(exist_ok=True)
    for image_id in IMAGES:
        Image.fromarray(_pixels(image_id)).save(image_dir / f"COCO_val2014_{image_id:012d}.jpg",
                                                format="JPEG", quality=95)
    return qfile, afile, image_dir


@pytest.mark.parametrize("duplicated", [True, False])
def test_okvqa_reads_the_released_files(tmp_path, duplicated):
    qfile, afile, image_dir = _write_okvqa(tmp_path, duplicated)
    src = OkVqaSource(qfile, afile, image_dir)
    assert len(src) == 2 and src.image_subtype == "val2014"
    for k, (qid, image_id, text, answers) in enumerate(OK_QUESTIONS):
        ex = src[k]
        want = [a for a in answers for _ in range(2)] if duplicated else answers
        assert ex["question"] == text and ex["answers"] == want  # "answer", not "raw_answer"
        assert ex["question_id"] == qid and ex["image_id"] == image_id
        # JPEG is lossy: the reference is PIL's decoding of the file written.
        path = image_dir / f"COCO_val2014_{image_id:012d}.jpg"
        np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(path).convert("RGB")))
        assert ex["image"].shape == (9, 13, 3)
    data = src.data
    assert data.answer_types == {4200: "other", 12345670: "other"}
    assert data.question_types == {4200: "one", 12345670: "one"}
    assert data.question_type_names["one"] == "Vehicles and Transportation"
    assert data.multiple_choice_answer == {4200: "", 12345670: ""}  # OK-VQA has none
    assert shot_answer(data, 4200) == "surf" and shot_answer(data, 12345670) == "italy"
    # 4 of 5 annotators (8 of 10 listed) said "surf": every leave-one-out subset keeps >= 3.
    assert vqa_accuracy({4200: "surf", 12345670: "spain"}, data.answers)["per_question"] == \
        pytest.approx({4200: 1.0, 12345670: question_accuracy("spain", want_spain(duplicated))})


def want_spain(duplicated):
    answers = OK_QUESTIONS[1][3]
    return [a for a in answers for _ in range(2)] if duplicated else answers


def test_okvqa_and_vqav2_errors_are_one_line_naming_the_file(tmp_path):
    qfile, afile, image_dir = _write_okvqa(tmp_path)
    missing = tmp_path / "OpenEnded_mscoco_train2014_questions.json"
    errors = []
    with pytest.raises(FileNotFoundError, match=f"OK-VQA questions file {missing} not found.*"
                       "okvqa.allenai.org") as e:
        OkVqaSource(missing, afile, image_dir)
    errors.append(e)
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [{"question_id": 4200,')
    with pytest.raises(ValueError, match=f"OK-VQA annotations file {broken} is not valid JSON"
                       ) as e:
        OkVqaSource(qfile, broken, image_dir)
    errors.append(e)
    no_answers = json.loads(afile.read_text())
    del no_answers["annotations"][1]["answers"]
    no_answers_file = tmp_path / "no_answers.json"
    no_answers_file.write_text(json.dumps(no_answers))
    with pytest.raises(ValueError, match=f"{no_answers_file}: annotation 1 is malformed "
                       r"\(KeyError: 'answers'\)") as e:
        OkVqaSource(qfile, no_answers_file, image_dir)
    errors.append(e)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(ValueError, match=f"VQAv2 questions file {listed} holds a list") as e:
        load_vqa(listed)
    errors.append(e)
    bad_question = tmp_path / "bad_question.json"
    bad_question.write_text(json.dumps({"questions": [{"question_id": 1, "question": "q"}]}))
    with pytest.raises(ValueError, match=f"{bad_question}: question 0 is malformed") as e:
        load_vqa(bad_question, dataset="okvqa")
    errors.append(e)
    three = json.loads(afile.read_text())
    three["annotations"][0]["answers"] = three["annotations"][0]["answers"][:3]
    with pytest.raises(ValueError, match=r"\[4200\] have not 5 or 10 answers.*OK-VQA") as e:
        OkVqaSource(qfile, three, image_dir)
    errors.append(e)
    assert all("\n" not in str(x.value) for x in errors)
