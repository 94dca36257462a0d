"""VLAP's arithmetic evaluation on exact pairs (methods/vlap_evals.py): digit scenes' validation
pairs reach evals/arithmetic.target_recall, also behind a feature cache; hand-built
representations in which image - a + b is known to land on the target."""

import types

import ml_collections
import numpy as np
import pytest

from lqae_vlap.data import digit_scenes
from lqae_vlap.data.feature_cache import CachedFeatures
from lqae_vlap.evals import arithmetic as arithmetic_lib
from lqae_vlap.methods import vlap_evals

N = 16  # 8 validation pairs
NUISANCE = 32  # dimensions of each pair's own random "background"


class _DigitTokenizer:
    """' seven' -> [7]: one token per digit word (ids = the digit)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [digit_scenes.DIGIT_NAMES.index(text.strip())]}

    def decode(self, ids):
        return " ".join(digit_scenes.DIGIT_NAMES[i] for i in ids)


def _scene_reprs(source, n):
    """[n, 10 + NUISANCE]: a pair's shared random background (unit norm) plus 0.05 per digit it
    shows; the words are the 10 digit axes. image(q) - a + b then points at its target, whose
    background alone it shares; word(b) alone ties among all scenes showing b."""
    rng = np.random.default_rng(0)
    backgrounds = rng.normal(size=(n // 2, NUISANCE))
    backgrounds /= np.linalg.norm(backgrounds, axis=1, keepdims=True)
    v = np.zeros((n, 10 + NUISANCE))
    for i in range(n):
        for o in source.spec(i).objects:
            v[i, o.digit] += 0.05
        v[i, 10:] = backgrounds[i // 2]
    return v


def _ctx(source, v):
    cfg = ml_collections.ConfigDict({"eval": {"arithmetic": {
        "pairs": ("one->seven",), "top_k": 5, "num_show": 0, "ks": (1, 5)}}})
    examples = [source[i] for i in range(len(v))]
    return types.SimpleNamespace(
        cfg=cfg, sources={"images": source}, limit=lambda s: len(v),
        visual_reprs=lambda s, n: (v, examples, None),
        word_embeddings=lambda dtype=None: np.eye(10, v.shape[1]),
        llm=types.SimpleNamespace(tokenizer=_DigitTokenizer()))


def test_exact_pairs_found_through_a_feature_cache():
    scenes = digit_scenes.DigitScenes("validation", N, image_size=16)
    pairs = vlap_evals.exact_pairs(scenes, N)
    assert pairs == digit_scenes.arithmetic_pairs(scenes, range(N)) and pairs
    cached = CachedFeatures(scenes, np.zeros((N, 4, 8), np.float32))
    assert vlap_evals.exact_pairs(cached, N) == pairs
    # Training scenes are independent draws: no exact pairs, the caption-based score instead.
    assert vlap_evals.exact_pairs(digit_scenes.DigitScenes("train", N, image_size=16), N) is None
    assert vlap_evals.exact_pairs(scenes, 1) is None  # the partner is outside the n evaluated


def test_arithmetic_scores_the_exact_target():
    scenes = digit_scenes.DigitScenes("validation", N, image_size=16)
    v = _scene_reprs(scenes, N)
    result, lines = vlap_evals.arithmetic(_ctx(scenes, v), 0, "/nonexistent")
    pairs = digit_scenes.arithmetic_pairs(scenes, range(N))
    got = result["target"]
    assert got["num_queries"] == len(pairs) and got["gallery"] == N - 1
    assert got["chance"] == pytest.approx({"R@1": 1 / (N - 1), "R@5": 5 / (N - 1)})
    # By construction the arithmetic finds every target; the word alone cannot tell apart the
    # scenes that show b (ties count against it).
    assert got["arithmetic"]["R@1"] == 1.0
    assert got["word_only"]["R@1"] < 0.5
    # The same numbers as evals/arithmetic.py on the pairs with each digit word as its id.
    ids = digit_scenes.DIGIT_NAMES.index
    want = arithmetic_lib.target_recall(v, np.eye(10, v.shape[1]),
                                        [(q, [ids(a)], [ids(b)], t) for q, a, b, t in pairs])
    assert got == want
    assert "caption" not in str(result.get("protocol")) and "arithmetic_top1" not in result
    assert any("its target, R@1" in str(line) for line in lines)


def test_arithmetic_on_train_scenes_keeps_the_caption_score():
    scenes = digit_scenes.DigitScenes("train", N, image_size=16)
    v = _scene_reprs(scenes, N)
    result, _ = vlap_evals.arithmetic(_ctx(scenes, v), 0, "/nonexistent")
    assert "target" not in result
    assert result["pairs"] == ["one->seven"] and "arithmetic_top1" in result
