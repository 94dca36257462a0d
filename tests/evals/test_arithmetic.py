"""Visual semantic arithmetic: orthogonal-basis cases with known answers, a brute-force loop."""

import math

import numpy as np
import pytest

from lqae_vlap.evals.arithmetic import (arithmetic, combine, contains_word, nearest_images,
                                        nearest_words)

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
