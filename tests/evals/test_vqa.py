"""VQAv2 soft accuracy: hand-computed leave-one-out values, official normalisation; OK-VQA's 5
answers (released as 10); few-shot prompts and their seeded shot selection."""

import random
from fractions import Fraction

import pytest

from lqae_vlap.evals.vqa import (fewshot_prompt, first_answer, normalize_answer, pick_shots,
                                 process_punctuation, question_accuracy, vqa_accuracy)


def _expected(n_agree: int) -> Fraction:
    """By hand: of the 10 leave-one-out subsets, n_agree drop a matching human (n_agree - 1
    matches left) and 10 - n_agree drop another one (n_agree matches left)."""
    f = lambda m: min(Fraction(1), Fraction(m, 3))  # noqa: E731
    return (n_agree * f(n_agree - 1) + (10 - n_agree) * f(n_agree)) / 10


def test_hand_values_of_the_subset_average():
    # 1 human: 9 subsets x 1/3 -> 3/10; 2: (2 x 1/3 + 8 x 2/3)/10 = 6/10;
    # 3: (3 x 2/3 + 7 x 1)/10 = 9/10; 4: all subsets keep >= 3 matches -> 1.
    assert [_expected(n) for n in range(6)] == [0, Fraction(3, 10), Fraction(6, 10),
                                                Fraction(9, 10), 1, 1]


@pytest.mark.parametrize("n_agree", range(11))
def test_accuracy_by_number_of_agreeing_humans(n_agree):
    humans = ["red"] * n_agree + ["blue", "green", "purple", "pink", "black", "white", "grey",
                                  "brown", "tan", "teal"][: 10 - n_agree]
    random.Random(n_agree).shuffle(humans)
    assert question_accuracy("red", humans) == pytest.approx(float(_expected(n_agree)), abs=1e-12)


def test_normalisation_cases():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("isnt") == "isn't"
    assert normalize_answer("It isn't") == "it isn't"
    assert normalize_answer("A dog") == "dog"
    assert normalize_answer("the man and an apple") == "man and apple"
    assert normalize_answer("  Ten\t") == "10"
    assert normalize_answer("none") == "0"
    # Punctuation next to a space is deleted, otherwise replaced by a space.
    assert process_punctuation("yes, it is") == "yes it is"
    assert process_punctuation("black/white") == "black white"
    # A digit,digit pattern anywhere deletes all punctuation: "3,000" -> "3000".
    assert process_punctuation("3,000") == "3000"
    # Periods are kept before a digit (decimals), stripped elsewhere.
    assert normalize_answer("1.5") == "1.5"
    assert normalize_answer("yes.") == "yes"


def test_normalisation_is_applied_when_humans_disagree():
    humans = ["2"] * 3 + ["3"] * 7
    assert question_accuracy("Two.", humans) == pytest.approx(0.9, abs=1e-12)
    humans = ["isn't"] * 4 + ["no"] * 6
    assert question_accuracy("isnt", humans) == pytest.approx(1.0, abs=1e-12)
    assert question_accuracy("The Dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6, abs=1e-12)


def test_official_quirk_no_normalisation_when_humans_agree():
    # vqaEval.py normalises only if len(set(gtAnswers)) > 1; case is still ignored.
    assert question_accuracy("two", ["2"] * 10) == 0.0
    assert question_accuracy("YES", ["yes"] * 10) == 1.0


def _official_loop(pred, humans):
    """Transcription of the accuracy loop of vqaEval.py on its answer records (dicts with ids)."""
    proc = lambda a: normalize_answer(a)  # noqa: E731  (the script's two processing steps)
    recs = [{"answer": a.strip(), "answer_id": i + 1} for i, a in enumerate(humans)]
    res = pred.strip()
    if len({r["answer"] for r in recs}) > 1:
        for r in recs:
            r["answer"] = proc(r["answer"])
        res = proc(res)
    accs = []
    for gt in recs:
        other = [r for r in recs if r != gt]
        matching = [r for r in other if r["answer"].lower() == res.lower()]
        accs.append(min(1, float(len(matching)) / 3))
    return sum(accs) / len(accs)


def test_matches_official_loop_on_random_questions():
    rng = random.Random(0)
    vocab = ["yes", "Yes", "no", "2", "two", "a dog", "dog", "isnt", "isn't", "red.", "red"]
    for _ in range(300):
        humans = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        assert question_accuracy(pred, humans) == pytest.approx(_official_loop(pred, humans),
                                                                abs=1e-12)


def test_vqa_accuracy_overall_and_per_type():
    ann = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] + ["blue"] * 9}
    pred = {1: "yes", 2: "two", 3: "red", 99: "extra predictions are ignored"}
    types = {1: "yes/no", 2: "number", 3: "other"}
    qtypes = {1: "is the", 2: "how many", 3: "what color"}
    out = vqa_accuracy(pred, ann, answer_types=types, question_types=qtypes)
    assert out["per_question"] == pytest.approx({1: 1.0, 2: 0.6, 3: 0.3}, abs=1e-12)
    assert out["overall"] == pytest.approx((1.0 + 0.6 + 0.3) / 3, abs=1e-12)
    assert out["per_answer_type"] == pytest.approx({"yes/no": 1.0, "number": 0.6, "other": 0.3})
    assert out["per_question_type"]["how many"] == pytest.approx(0.6)
    assert "per_answer_type" not in vqa_accuracy(pred, ann)
    with pytest.raises(ValueError, match="no prediction"):
        vqa_accuracy({1: "yes"}, ann)
    with pytest.raises(ValueError, match="non-empty list"):
        question_accuracy("yes", "yes")


def test_first_answer():
    assert first_answer(" seven\nQuestion: what") == "seven"
    assert first_answer("two dogs Question: x") == "two dogs"


@pytest.mark.parametrize("n_agree", range(6))
def test_okvqa_five_answers_and_their_released_duplicates(n_agree):
    """5 annotators: mean over the 5 leave-one-out subsets of 4 of min(1, matches / 3), by hand;
    OK-VQA's released file lists each answer twice (10), which the 10-answer formula scores."""
    humans = ["paris"] * n_agree + ["rome", "london", "oslo", "bern", "nice"][: 5 - n_agree]
    f = lambda m: min(Fraction(1), Fraction(m, 3))  # noqa: E731
    want5 = (n_agree * f(n_agree - 1) + (5 - n_agree) * f(n_agree)) / 5
    assert question_accuracy("paris", humans) == pytest.approx(float(want5), abs=1e-12)
    doubled = [a for a in humans for _ in range(2)]
    assert question_accuracy("paris", doubled) == pytest.approx(float(_expected(2 * n_agree)),
                                                                abs=1e-12)


def test_fewshot_prompt_is_the_hand_written_sequence():
    shots = [(7, "What is on the table?", "cake"), ("b", "How many dogs?", "2")]
    got = fewshot_prompt("Question: {question} Answer:", "Is it raining?", shots)
    assert got == [("image", 7), ("text", "Question: What is on the table? Answer: cake\n"),
                   ("image", "b"), ("text", "Question: How many dogs? Answer: 2\n"),
                   ("image", "query"), ("text", "Question: Is it raining? Answer:")]
    assert fewshot_prompt("Q: {question} A:", "Why?", [], separator=" ") == [
        ("image", "query"), ("text", "Q: Why? A:")]
    with pytest.raises(ValueError, match="has no '{question}'"):
        fewshot_prompt("Answer:", "Why?", [])


def test_pick_shots_seeded_per_question_and_never_the_query():
    pool = [100 + i for i in range(12)]
    a = [pick_shots(pool, q, 4, seed=3) for q in pool]
    assert a == [pick_shots(pool, q, 4, seed=3) for q in pool]  # reproducible
    assert [pick_shots(pool, q, 4, seed=3) for q in reversed(pool)] == a[::-1]  # order-free
    for q, pick in zip(pool, a):
        assert len(set(pick)) == 4 and all(0 <= j < 12 for j in pick)
        assert q not in [pool[j] for j in pick]  # never the query's own question
    assert a != [pick_shots(pool, q, 4, seed=4) for q in pool]  # the seed matters
    # A pool of 5 with the query among them: 4 shots are all the others, every time.
    small = pool[:5]
    for seed in range(20):
        assert sorted(pick_shots(small, 102, 4, seed)) == [0, 1, 3, 4]
    assert pick_shots(pool, 5, 0, 0) == []
    with pytest.raises(ValueError, match="only 5 questions"):
        pick_shots(small, 102, 5, 0)
    with pytest.raises(ValueError, match="shots=-1"):
        pick_shots(pool, 5, -1, 0)
