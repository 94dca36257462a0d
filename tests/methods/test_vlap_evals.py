"""The pure pieces of VLAP's evaluator, against brute force and hand-computed cases."""

import itertools

import numpy as np
import pytest

from lqae_vlap.evals import retrieval as retrieval_lib
from lqae_vlap.methods import vlap_evals


def test_references_prefers_the_list_and_names_missing_keys():
    assert vlap_evals.references({"references": ["a", "b"], "caption": "c"}) == ["a", "b"]
    assert vlap_evals.references({"caption": "c"}) == ["c"]
    with pytest.raises(ValueError, match="'references'"):
        vlap_evals.references({"image": None})


def test_galleries_hold_distinct_captions_and_only_full_ones_are_kept():
    caps = [["one"], ["two"], ["one"], ["three"], ["two"], ["one"], ["three"]]
    groups = vlap_evals.galleries(caps, 3)
    # Greedy: [0, 1, 3] (one, two, three), then [2, 4, 6]; image 5 ("one") opens a third
    # gallery that never fills and is dropped.
    assert groups == [[0, 1, 3], [2, 4, 6]]
    for g in groups:
        texts = [c for i in g for c in caps[i]]
        assert len(texts) == len(set(texts))


def test_one_gallery_drops_repeated_caption_texts():
    caps = [["a", "b"], ["b"], ["c", "a"]]
    assert vlap_evals.galleries(caps, 0) == [[0, 2]]  # image 1's only caption is taken
    texts, gt = vlap_evals.gallery_captions(caps, [0, 2])
    assert texts == ["a", "b", "c"] and gt == [[0, 1], [2]]
    with pytest.raises(ValueError, match="gallery_size"):
        vlap_evals.galleries(caps, -1)


@pytest.mark.parametrize("per_image", [(1, 1, 1, 1), (2, 1, 3, 1)])
def test_chance_recall_equals_the_mean_over_every_ranking(per_image):
    """Exact chance vs recall_at_k averaged over all permutations of a constant-free ranking."""
    gt, col = [], 0
    for c in per_image:
        gt.append(list(range(col, col + c)))
        col += c
    n_img, n_txt = len(gt), col
    ks = (1, 2, 5)
    # Every joint ordering of distinct scores is a random ranking in both directions: average
    # over all text orders for i2t (rows share the same random text order is NOT random per row,
    # so draw each row's order independently by averaging per row over permutations).
    i2t = {k: 0.0 for k in ks}
    perms = list(itertools.permutations(range(n_txt)))
    for perm in perms:
        sim = np.tile(np.asarray(perm, float), (n_img, 1))  # same order for every row is fine:
        ranks, _ = retrieval_lib.retrieval_ranks(sim, gt)  # recall averages rows separately
        for k in ks:
            i2t[k] += np.mean(ranks < k) / len(perms)
    t2i = {k: 0.0 for k in ks}
    img_perms = list(itertools.permutations(range(n_img)))
    for perm in img_perms:
        sim = np.tile(np.asarray(perm, float)[:, None], (1, n_txt))
        _, ranks = retrieval_lib.retrieval_ranks(sim, gt)
        for k in ks:
            t2i[k] += np.mean(ranks < k) / len(img_perms)
    chance = vlap_evals.chance_recall(gt, n_txt, ks)
    for k in ks:
        assert chance[f"i2t_R@{k}"] == pytest.approx(i2t[k], abs=1e-12)
        assert chance[f"t2i_R@{k}"] == pytest.approx(t2i[k], abs=1e-12)


def test_word_score_embedding_reproduces_word_score_dot_products():
    rng = np.random.default_rng(0)
    words = rng.standard_normal((50, 6))
    x = rng.standard_normal((7, 6)) * 3.0
    f = vlap_evals.word_score_embedding(x, words)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    s = unit(x) @ unit(words).T  # [7, 50] the cosine scores L_map uses
    np.testing.assert_allclose(f @ f.T, s @ s.T, rtol=1e-10, atol=1e-10)


def test_first_answer_and_contains_word():
    assert vlap_evals.first_answer(" seven\nQuestion: what") == "seven"
    assert vlap_evals.first_answer("two dogs Question: x") == "two dogs"
    assert vlap_evals.contains_word("A handwritten digit Seven", "seven")
    assert not vlap_evals.contains_word("a handwritten digit seventeen", "seven")


def test_flat_scalars_keeps_numbers_and_nests_names():
    r = {"a": 1, "b": {"c": 2.5, "skipped": {"x": 1}}, "s": "text", "l": [1], "t": True}
    assert vlap_evals._flat_scalars("cap", r) == {"cap/a": 1.0, "cap/b/c": 2.5}
