"""Visual semantic arithmetic: orthogonal-basis cases with known answers, a brute-force loop."""

import math

import numpy as np
import pytest

from lqae_vlap.evals.arithmetic import (arithmetic, combine, contains_word, nearest_images,
                                        nearest_words, target_ranks, target_recall)

# Orthogonal "concepts": dog, grass, cat, sofa (basis vectors of R^4).
DOG, GRASS, CAT, SOFA = np.eye(4)


def test_swap_object_keeps_background():
    # Images as concept sums: 0 dog-on-grass, 1 cat-on-grass, 2 cat-on-sofa, 3 dog-on-sofa.
    bank = np.stack([DOG + GRASS, CAT + GRASS, CAT + SOFA, DOG + SOFA])
    # By hand: t = unit(dog+grass) - dog + cat = (1/sqrt2 - 1, 1/sqrt2, 1, 0).
    t = np.array([1 / math.sqrt(2) - 1, 1 / math.sqrt(2), 1.0, 0.0])
    tn = math.sqrt(float(t @ t))
    expected = {1: (t[1] + t[2]) / (math.sqrt(2) * tn), 2: t[2] / (math.sqrt(2) * tn),
                0: (t[0] + t[1]) / (math.sqrt(2) * tn), 3: t[0] / (math.sqrt(2) * tn)}
    idx, scores = arithmetic(5.0 * bank[0], [CAT], [DOG], bank, top_k=4)
    assert idx.tolist() == [1, 2, 0, 3]  # cat-on-grass first
    np.testing.assert_allclose(scores, [expected[i] for i in idx.tolist()], atol=1e-12)


def test_nearest_words_on_a_basis_vocabulary():
    vocab = np.eye(4)  # word ids 0 dog, 1 grass, 2 cat, 3 sofa
    image = 3.0 * (DOG + GRASS)  # image scale must not matter
    ids, scores = nearest_words(image, vocab, minus_ids=[1], top_k=2)
    # unit(dog+grass) - grass = (0.707, -0.293, 0, 0): dog first; grass excluded; cat/sofa tie at 0
    # and the lower id (cat) wins the tie.
    assert ids.tolist() == [0, 2]
    n = math.hypot(1 / math.sqrt(2), 1 / math.sqrt(2) - 1)
    np.testing.assert_allclose(scores, [1 / math.sqrt(2) / n, 0.0], atol=1e-12)
    # Without excluding operands the subtracted word is ranked last, not dropped.
    ids, _ = nearest_words(image, vocab, minus_ids=[1], top_k=4, exclude_operands=False)
    assert ids.tolist() == [0, 2, 3, 1]
    # image + cat, cat excluded: dog and grass tie (equal share of the image) -> lower id first.
    ids, _ = nearest_words(image, vocab, plus_ids=[2], top_k=2)
    assert ids.tolist() == [0, 1]


def test_nearest_images_excludes_the_query():
    bank = np.stack([DOG + GRASS, CAT + GRASS, CAT + SOFA, DOG + SOFA])
    ids, _ = nearest_images(bank[0], np.eye(4), bank, plus_ids=[3], minus_ids=[1], top_k=1,
                            exclude=[0])
    assert ids.tolist() == [3]  # dog-on-grass - grass + sofa = dog-on-sofa


def _brute_force(query, plus, minus, cand, top_k, exclude=()):
    def unit(v):
        return v / math.sqrt(sum(x * x for x in v))

    t = list(unit(query))
    for v in plus:
        t = [a + b for a, b in zip(t, unit(v))]
    for v in minus:
        t = [a - b for a, b in zip(t, unit(v))]
    t = unit(np.array(t))
    scored = []
    for j, c in enumerate(cand):
        if j in exclude:
            continue
        scored.append((-sum(a * b for a, b in zip(t, unit(c))), j))
    scored.sort()
    return [j for _, j in scored[:top_k]], [-s for s, _ in scored[:top_k]]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    d, m = 16, 40
    query = rng.normal(size=d) * rng.uniform(0.1, 10)
    plus = [rng.normal(size=d) for _ in range(seed % 3)]
    minus = [rng.normal(size=d) * 7 for _ in range((seed + 1) % 3)]
    cand = rng.normal(size=(m, d)) * rng.uniform(0.5, 3, size=(m, 1))
    exclude = [int(i) for i in rng.choice(m, 3, replace=False)]
    idx, scores = arithmetic(query, plus, minus, cand, top_k=7, exclude=exclude)
    ref_idx, ref_scores = _brute_force(query, plus, minus, cand, 7, set(exclude))
    assert idx.tolist() == ref_idx
    np.testing.assert_allclose(scores, ref_scores, atol=1e-12)


def test_combine_is_unit_and_accepts_float32():
    v = combine(np.ones(3, np.float32), np.ones((1, 3), np.float32), [])
    np.testing.assert_allclose(v, np.ones(3) / math.sqrt(3), atol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="zero vector"):
        arithmetic(np.zeros(4), [], [], np.eye(4))
    with pytest.raises(ValueError, match="cancel out"):
        arithmetic(DOG, [], [DOG], np.eye(4))
    with pytest.raises(ValueError, match="candidates must be"):
        arithmetic(DOG, [], [], np.eye(3))
    with pytest.raises(ValueError, match="top_k"):
        arithmetic(DOG, [], [], np.eye(4), top_k=4, exclude=[0])
    with pytest.raises(ValueError, match="plus must be"):
        arithmetic(DOG, [np.ones(3)], [], np.eye(4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nearest_words(DOG, np.eye(4), plus_ids=[9])


def test_zero_candidate_rows_are_never_returned():
    cand = np.eye(4)
    cand[1] = 0.0  # e.g. a padding word's zero embedding
    idx, _ = arithmetic(DOG, [], [], cand, top_k=3)
    assert 1 not in idx.tolist() and len(idx) == 3
    with pytest.raises(ValueError, match="top_k"):
        arithmetic(DOG, [], [], cand, top_k=4)  # only 3 non-zero rows


def test_contains_word():
    assert contains_word("A handwritten digit Seven", "seven")
    assert not contains_word("a handwritten digit seventeen", "seven")


# --- exact targets --------------------------------------------------------------------------------

# Word ids 0 dog, 1 grass, 2 cat, 3 sofa. Images: 0 dog-on-grass (query), 1 cat-on-grass (its
# target), 2 dog-on-grass with a little sofa (the query's near-duplicate), 3 a cat alone.
TARGET_BANK = np.stack([DOG + GRASS, CAT + GRASS, DOG + GRASS + 0.2 * SOFA, CAT])
TARGET_PAIRS = [(0, [0], [2], 1), (1, [2], [0], 0)]  # dog->cat and back


def test_target_ranks_by_hand():
    # Pair 0, by hand (axes dog, grass, cat, sofa): t = unit(dog+grass) - dog + cat =
    # (1/sqrt2 - 1, 1/sqrt2, 1, 0); cos(t, image 1) = 1.707/(1.414|t|) beats image 3's 1/|t|
    # and image 2's 0.414/(1.428|t|): rank 0. cat alone: image 3 (cos 1) before 1 (0.707): rank 1.
    # The query alone: image 2 (cos 0.99) before 1 (0.5): rank 1.
    # Pair 1: unit(cat+grass) - cat + dog: image 0 (1.707/1.414) before 2 (1.707/1.428): rank 0.
    # dog alone: image 0 (0.707) before image 2 (1/1.428 = 0.700): rank 0. Image 1 alone: image 3
    # (0.707) before 0 (0.5): rank 1.
    ranks = target_ranks(3.0 * TARGET_BANK, np.eye(4), TARGET_PAIRS)  # scale must not matter
    assert {m: r.tolist() for m, r in ranks.items()} == {
        "arithmetic": [0, 0], "word_only": [1, 0], "image_only": [1, 1]}
    got = target_recall(TARGET_BANK, np.eye(4), TARGET_PAIRS, ks=(1, 2))
    assert got["arithmetic"] == {"R@1": 1.0, "R@2": 1.0}
    assert got["word_only"] == {"R@1": 0.5, "R@2": 1.0}
    assert got["image_only"] == {"R@1": 0.0, "R@2": 1.0}
    # Each query ranks the 3 other images: chance K / 3.
    assert got["chance"] == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3})
    assert (got["num_queries"], got["gallery"]) == (2, 3)


def test_target_ties_count_against_the_target():
    # Identical images: every other candidate ties with the target and is ranked ahead of it.
    bank = np.ones((5, 4))
    ranks = target_ranks(bank, np.eye(4), [(0, [0], [1], 3)])
    assert all(r.tolist() == [3] for r in ranks.values())
    assert target_recall(bank, np.eye(4), [(0, [0], [1], 3)], ks=(1,))["arithmetic"]["R@1"] == 0.0


def _brute_force_rank(bank, words, q, minus, plus, t, mode):
    def unit(v):
        return v / math.sqrt(sum(x * x for x in v))

    vec = [0.0] * bank.shape[1]
    if mode != "word_only":
        vec = list(unit(bank[q]))
    if mode != "image_only":
        for i in plus:
            vec = [a + b for a, b in zip(vec, unit(words[i]))]
    if mode == "arithmetic":
        for i in minus:
            vec = [a - b for a, b in zip(vec, unit(words[i]))]
    cos = [sum(a * b for a, b in zip(unit(row), vec)) / math.sqrt(sum(x * x for x in vec))
           for row in bank]
    return sum(1 for j in range(len(bank)) if j not in (q, t) and cos[j] >= cos[t])


@pytest.mark.parametrize("seed", [0, 1])
def test_target_ranks_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    bank, words = rng.normal(size=(12, 5)), rng.normal(size=(7, 5))
    # Multi-token words: two ids for word(a) in one pair, two for word(b) in another.
    pairs = [(0, [1], [2], 5), (3, [4, 6], [0], 7), (11, [2], [5, 3], 1)]
    ranks = target_ranks(bank, words, pairs)
    for mode, got in ranks.items():
        want = [_brute_force_rank(bank, words, q, m, p, t, mode) for q, m, p, t in pairs]
        assert got.tolist() == want, mode


def test_target_bad_inputs():
    with pytest.raises(ValueError, match="two different images"):
        target_ranks(TARGET_BANK, np.eye(4), [(0, [0], [2], 0)])
    with pytest.raises(ValueError, match="two different images"):
        target_ranks(TARGET_BANK, np.eye(4), [(0, [0], [2], 4)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target_ranks(TARGET_BANK, np.eye(4), [(0, [9], [2], 1)])
    with pytest.raises(ValueError, match="share D"):
        target_ranks(TARGET_BANK, np.eye(3), TARGET_PAIRS)
    with pytest.raises(ValueError, match="at least one"):
        target_recall(TARGET_BANK, np.eye(4), [])
