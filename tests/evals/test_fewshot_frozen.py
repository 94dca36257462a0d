"""Frozen's few-shot protocol: prompts against hand-written strings, exact-match scoring on
hand-made generations, seeded names and episodes, the long-prompt policy, and run_frozen_fewshot
with stand-in LMs that read the prompt (whitespace tokens as the token count)."""

import re

import numpy as np
import pytest

from lqae_vlap.evals import fewshot_frozen as ff


def test_build_frozen_prompt_exact():
    got = ff.build_frozen_prompt([["red sky", "pink sky"], ["a cat", "two cats"]],
                                 ["dax", "blicket"], "grey sky", repeats=1)
    want = ("Answer with dax or blicket.\n"
            "red sky This is a dax.\n"
            "a cat This is a blicket.\n"
            "pink sky This is a dax.\n"
            "two cats This is a blicket.\n"
            "red sky This is a dax.\n"
            "a cat This is a blicket.\n"
            "pink sky This is a dax.\n"
            "two cats This is a blicket.\n"
            "grey sky Q: What is this? A: This is a")
    assert got == want
    got = ff.build_frozen_prompt([["x"], ["y"], ["z"]], ["wug", "dax", "fep"], "q",
                                 task_induction=False)
    assert got == ("x This is a wug.\ny This is a dax.\nz This is a fep.\n"
                   "q Q: What is this? A: This is a")
    # Frozen's convention: repeats counts EXTRA copies; the default 0 shows each support once.
    assert ff.build_frozen_prompt([["x"], ["y"]], ["wug", "dax"], "q", task_induction=False) == (
        "x This is a wug.\ny This is a dax.\nq Q: What is this? A: This is a")
    assert ff.join_names(["dax", "blicket", "wug"]) == "dax, blicket or wug"
    with pytest.raises(ValueError, match="repeats"):
        ff.build_frozen_prompt([["x"], ["y"]], ["a", "b"], "q", repeats=-1)
    with pytest.raises(ValueError, match="same number"):
        ff.build_frozen_prompt([["x"], []], ["a", "b"], "q")


@pytest.mark.parametrize("generated, answer, want", [
    (" dax.", "dax", True),
    ("Dax", "dax", True),
    ("  DAX!\nQ: What is this?", "dax", True),
    (" dax blicket", "dax", True),          # only the first len(answer) words count
    (" daxes", "dax", False),               # a word, not a prefix
    (" blicket", "dax", False),
    ("", "dax", False),
    (" golden retriever.", "golden_retriever", True),   # '_' is a space
    (" Golden-Retriever", "golden retriever", True),    # '-' too
    (" golden", "golden retriever", False),
    (" jack o' lantern", "jack-o'-lantern", True),
    ("anything", "...", False),             # an empty answer never matches
])
def test_exact_match_after_normalisation(generated, answer, want):
    assert ff.exact_match(generated, answer) is want


def test_normalize_answer():
    assert ff.normalize_answer(" Dax.\n") == ["dax"]
    assert ff.normalize_answer("house_finch, linnet") == ["house", "finch", "linnet"]


def test_episode_names_seeded_distinct_and_real():
    classes = np.array([3, 0, 1])
    draw = lambda seed: [ff.episode_names(classes, None, "nonsense", rng)  # noqa: E731
                         for rng in [np.random.default_rng(seed)] for _ in range(20)]
    a, b, c = draw(0), draw(0), draw(1)
    assert a == b and a != c
    assert all(len(set(n)) == 3 and set(n) <= set(ff.NONSENSE_WORDS) for n in a)
    assert len({tuple(n) for n in a}) > 5  # reassigned per episode
    assert ff.episode_names(classes, ["zero", "one", "two", "three"], "real", None) == \
        ["three", "zero", "one"]
    with pytest.raises(ValueError, match="nonsense names"):
        ff.episode_names(np.arange(11), None, "nonsense", np.random.default_rng(0))
    with pytest.raises(ValueError, match="names must be"):
        ff.episode_names(classes, None, "fake", np.random.default_rng(0))


def test_subsample_codes_even_spacing():
    ids = np.arange(10, 26)  # T = 16
    np.testing.assert_array_equal(ff.subsample_codes(ids, 4), [10, 14, 18, 22])
    np.testing.assert_array_equal(ff.subsample_codes(ids, 16), ids)
    np.testing.assert_array_equal(ff.subsample_codes(ids, 5), ids[[0, 3, 6, 9, 12]])


def count_words(text):
    """Stand-in tokenizer: one token per whitespace-separated piece, plus a BOS."""
    return len(text.split()) + 1


def test_fit_words_per_image_truncates_and_errors():
    # 3 images; a prompt of n words per image is 10 + 3 * n tokens (10 of template).
    lengths = lambda n: [10 + 3 * n, 9 + 3 * n]  # noqa: E731
    assert ff.fit_words_per_image(16, 3, 100, lengths, "truncate_words") == (16, [58, 57])
    n, got = ff.fit_words_per_image(16, 3, 40, lengths, "truncate_words")
    assert n == (40 - 10) // 3 == 10 and got == [40, 39]
    # Words that take 2 tokens each: the first guess (10) overshoots; lowered until it fits.
    lengths2 = lambda n: [10 + 6 * n]  # noqa: E731
    n, got = ff.fit_words_per_image(16, 3, 40, lengths2, "truncate_words")
    assert n == 5 and got == [40]
    with pytest.raises(ValueError, match="58 tokens.*exceeds the 40.*truncate_words"):
        ff.fit_words_per_image(16, 3, 40, lengths, "error")
    with pytest.raises(ValueError, match="even at 1 word"):
        ff.fit_words_per_image(16, 3, 12, lengths, "truncate_words")
    with pytest.raises(ValueError, match="prompt_policy"):
        ff.fit_words_per_image(16, 3, 40, lengths, "drop")


def class_data(num_classes=4, per_class=12, words=8, seed=0):
    """Images whose words are drawn from their class's own 5 words: a prompt-reader can name
    the query from the support lines."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    ids = np.stack([rng.choice(np.arange(5) + 5 * c, words) for c in labels])
    return ids, labels


def text_fn(row):
    return " ".join(f"w{i}" for i in row)


def oracle(prompt):
    """The name on the support line sharing most words with the query (a reading LM)."""
    lines = prompt.split("\n")
    query = set(re.fullmatch(r"(.*) Q: What is this\? A: This is a", lines[-1]).group(1).split())
    best = {}
    for line in lines[1:-1]:
        words, name = re.fullmatch(r"(.*) This is a (\w+)\.", line).groups()
        best[name] = best.get(name, 0) + len(query & set(words.split()))
    return max(best, key=best.get)


def oracle_generate(prompts, max_new_tokens):
    assert max_new_tokens == 4
    return [f" {oracle(p)}. Q:" for p in prompts]


def oracle_scorer(prompt, names):
    return np.array([float(n == oracle(prompt)) for n in names])


def test_run_frozen_fewshot_with_a_reading_lm():
    ids, labels = class_data()
    kw = dict(generate_fn=oracle_generate, count_tokens=count_words, lm_scorer=oracle_scorer,
              context_length=1000, n_way=2, inner_shots=3, repeats=1, num_episodes=15,
              max_new_tokens=4)
    out = ff.run_frozen_fewshot(labels, ["a", "b", "c", "d"], ids, text_fn, seed=3, **kw)
    assert out["accuracy"] == 1.0 and out["ranking_accuracy"] == 1.0 and out["chance"] == 0.5
    assert out["words_per_image"] == out["words_per_image_full"] == 8  # fits: nothing cut
    # 13 images of 8 words + induction (5) + 12 x 4 + query 8 template words + BOS.
    assert out["prompt_tokens_max"] == 13 * 8 + 5 + 12 * 4 + 8 + 1
    assert all(e["match"] and e["answer"] in ff.NONSENSE_WORDS for e in out["examples"])
    # A seed gives the same episodes and names; another seed others.
    again = ff.run_frozen_fewshot(labels, ["a", "b", "c", "d"], ids, text_fn, seed=3, **kw)
    other = ff.run_frozen_fewshot(labels, ["a", "b", "c", "d"], ids, text_fn, seed=4, **kw)
    assert again["examples"] == out["examples"] and other["examples"] != out["examples"]
    # An LM that answers with another episode's word scores 0; 'real' names are the classes'.
    wrong = ff.run_frozen_fewshot(labels, ["a", "b", "c", "d"], ids, text_fn, seed=3,
                                  **{**kw, "generate_fn": lambda p, n: [" zzz"] * len(p)})
    assert wrong["accuracy"] == 0.0 and wrong["ranking_accuracy"] == 1.0
    real = ff.run_frozen_fewshot(labels, ["a", "b", "c", "d"], ids, text_fn, seed=3,
                                 names="real", **kw)
    assert real["accuracy"] == 1.0 and {e["answer"] for e in real["examples"]} <= set("abcd")


def test_run_frozen_fewshot_truncates_to_the_context():
    ids, labels = class_data(words=16)
    seen = []

    def generate(prompts, max_new_tokens):
        seen.extend(count_words(p) for p in prompts)
        return oracle_generate(prompts, max_new_tokens)

    # 2-way 2-shot x 1 = 5 images of 16 words: 80 + 5 + 4 x 4 + 8 + 1 = 110 tokens > 64 - 4.
    out = ff.run_frozen_fewshot(labels, list("abcd"), ids, text_fn, generate_fn=generate,
                                count_tokens=count_words, lm_scorer=None, context_length=64,
                                n_way=2, inner_shots=2, num_episodes=6, seed=0, max_new_tokens=4)
    # overhead = 5 + 16 + 8 + 1 = 30 -> floor((60 - 30) / 5) = 6 words per image, 60 tokens.
    assert out["words_per_image"] == 6 and out["words_per_image_full"] == 16
    assert out["prompt_tokens_max"] == 60 == max(seen) and "ranking_accuracy" not in out
    with pytest.raises(ValueError, match="110 tokens.*exceeds the 60"):
        ff.run_frozen_fewshot(labels, list("abcd"), ids, text_fn, generate_fn=generate,
                              count_tokens=count_words, lm_scorer=None, context_length=64,
                              n_way=2, inner_shots=2, num_episodes=2, seed=0, max_new_tokens=4,
                              prompt_policy="error")


def test_protocol_record():
    p = ff.protocol(names="nonsense", ways=(2, 5), inner_shots=(1,), repeats=1, queries=1,
                    episodes=20, seed=0, task_induction=True, max_new_tokens=8,
                    prompt_policy="truncate_words", context_length=2048, split="mini_imagenet")
    assert p["name"] == "frozen_open_ended" and p["ways"] == [2, 5]
    assert p["nonsense_words"][:2] == ["dax", "blicket"]
    assert ff.protocol(**{**{k: p[k] for k in ("names", "ways", "inner_shots", "repeats",
                                                "episodes", "seed", "task_induction",
                                                "max_new_tokens", "prompt_policy",
                                                "context_length", "split")},
                          "names": "real", "queries": 1})["name"] == "frozen_real_name"


GOOD = dict(names="nonsense", ways=(2, 5), inner_shots=(1, 3, 5), repeats=0, queries=1,
            episodes=20, max_new_tokens=8, prompt_policy="truncate_words")


def test_check_protocol_names_the_bad_knob():
    ff.check_protocol(GOOD)
    ff.check_protocol({**GOOD, "repeats": 2, "names": "real", "prompt_policy": "error"})
    for key, value, match in [
            ("repeats", -1, r"repeats=-1: must be an integer >= 0 \(extra copies"),
            ("repeats", 1.5, "repeats=1.5: must be an integer"),
            ("ways", (1, 5), r"ways=\(1, 5\): must be a non-empty tuple of integers >= 2"),
            ("ways", (), "ways=()"),
            ("inner_shots", (0,), "inner_shots=\\(0,\\)"),
            ("episodes", 0, "episodes=0: must be an integer >= 1"),
            ("queries", True, "queries=True"),
            ("names", "made_up", "names='made_up' is not one of"),
            ("prompt_policy", "drop", "prompt_policy='drop' is not one of")]:
        with pytest.raises(ValueError, match=f"config.eval.fewshot_frozen.{match}"):
            ff.check_protocol({**GOOD, key: value})
