"""Few-shot VQA end to end (methods/vlap_evals.vqa) on the VLAP demo config with a tiny random
Llama and a tiny random T5: the interleaved prompt the frozen LLM receives equals one written by
hand from the files (each shot's visual prefix, its question and answer, then the query), and the
eval JSON records the protocol. The generation itself is checked against transformers in
tests/methods/test_vlap_llm.py (generate_interleaved)."""

import json

import jax
import numpy as np
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.data.demo_images import DIGIT_NAMES
from lqae_vlap.evals.vqa import first_answer, pick_shots
from lqae_vlap.methods import vlap
from tests.helpers import SMALL_EVAL, demo_config

SHOTS, SEED = 2, 5


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_two_shot_vqa_prompt_and_protocol(family, tiny_llama_dir, tiny_t5_dir, tmp_path,
                                          monkeypatch):
    folder = tiny_llama_dir if family == "llama" else tiny_t5_dir
    config = demo_config(folder, **{
        **SMALL_EVAL, "model.llm_family": family, "eval.evals": ("vqa",),
        "eval.vqa.max_questions": 4, "eval.vqa.shots": SHOTS, "eval.vqa.shot_seed": SEED})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = vlap.build(config, mesh)
    params = jax.device_get(sharding.unbox(method.init_params(jax.random.PRNGKey(0))))
    evaluator = method.evaluate.__self__
    llm = evaluator.llm
    calls = []
    real = llm.generate_interleaved

    def spy(llm_params, rows, **kw):
        tokens = real(llm_params, rows, **kw)
        calls.append((rows, tokens))
        return tokens

    monkeypatch.setattr(llm, "generate_interleaved", spy)
    scalars = method.evaluate(params, method.frozen, 3, str(tmp_path))
    result = json.loads((tmp_path / "eval_vqa_000003.json").read_text())
    assert {k: result[k] for k in ("dataset", "split", "shots", "template", "shot_seed",
                                   "shot_split", "num_questions", "num_annotated")} == {
        "dataset": "digits", "split": "validation", "shots": SHOTS,
        "template": "Question: {question} Answer:", "shot_seed": SEED, "shot_split": "train",
        "num_questions": 4, "num_annotated": 4}
    assert result["per_answer_type"].keys() == {"number"}
    assert scalars["vqa/accuracy"] == pytest.approx(result["accuracy"])
    assert len(calls) == 1 and len(calls[0][0]) == 4  # one batch of 4 questions

    # The first question's prompt, by hand: the shots pick_shots draws from the train digits.
    source, pool = evaluator.sources["vqa"], evaluator.sources["vqa_shots"]
    qid = int(source[0]["question_id"])
    picks = pick_shots(pool.question_ids, qid, SHOTS, SEED)
    assert result["shot_question_ids"][str(qid)] == [pool.question_ids[j] for j in picks]
    evaluator.params, evaluator.frozen, evaluator.cache = params, method.frozen, {}
    shot_prefix = np.asarray(evaluator.prefixes(pool, picks))
    query_prefix = np.asarray(evaluator.prefixes(source, [0]))[0]

    def ids(text):
        return list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])

    q = "Question: What digit is this? Answer:"
    want = []
    for k, j in enumerate(picks):
        want += [shot_prefix[k], ids(f"{q} {DIGIT_NAMES[int(pool[j]['label'])]}\n")]
    want += [query_prefix, ids(q)]
    rows, tokens = calls[0]
    assert len(rows[0]) == len(want)
    for got, expected in zip(rows[0], want):
        if isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(np.asarray(got), expected)
        else:
            assert list(got) == expected
    assert result["predictions"][str(qid)] == first_answer(llm.decode(tokens)[0])
