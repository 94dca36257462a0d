"""recall_at_k: hand-computed cases (several captions per image, ties) and a brute-force loop."""

import itertools

import numpy as np
import pytest

from lqae_vlap.evals.retrieval import (chance_recall, every_caption, galleries, gallery_captions,
                                       recall_at_k, retrieval_ranks, word_score_embedding)


def test_hand_computed_two_captions_per_image():
    # image 0 owns captions {0, 1}, image 1 owns {2, 3}.
    sim = np.array([[0.2, 0.6, 0.7, 0.1],
                    [0.3, 0.4, 0.1, 0.35]])
    gt = [[0, 1], [2, 3]]
    # i2t: img0 best correct 0.6 < wrong 0.7 -> rank 1; img1 best 0.35 < wrong 0.4 -> rank 1.
    # t2i: cap0 0.2 < 0.3 -> 1; cap1 0.6 > 0.4 -> 0; cap2 0.1 < 0.7 -> 1; cap3 0.35 > 0.1 -> 0.
    i2t, t2i = retrieval_ranks(sim, gt)
    assert i2t.tolist() == [1, 1]
    assert t2i.tolist() == [1, 0, 1, 0]
    r = recall_at_k(sim, gt, ks=(1, 2))
    assert r == {"i2t_R@1": 0.0, "i2t_R@2": 1.0, "t2i_R@1": 0.5, "t2i_R@2": 1.0}


def test_ties_are_pessimistic():
    # Constant scores: every wrong candidate ties with the correct one and is ranked ahead of it.
    gt = [[0, 3], [1, 4], [2, 5]]
    i2t, t2i = retrieval_ranks(np.ones((3, 6)), gt)
    assert i2t.tolist() == [4, 4, 4]  # 6 captions - 2 correct
    assert t2i.tolist() == [2] * 6  # 3 images - 1 correct
    r = recall_at_k(np.ones((3, 6)), gt, ks=(1, 4, 5))
    assert r["i2t_R@1"] == 0.0 and r["i2t_R@4"] == 0.0 and r["i2t_R@5"] == 1.0
    assert r["t2i_R@1"] == 0.0 and r["t2i_R@5"] == 1.0

    # A wrong caption ties with the best correct one; a tie between two correct ones is harmless.
    sim = np.array([[0.5, 0.5, 0.5, 0.1],
                    [0.0, 0.0, 0.9, 0.9]])
    i2t, t2i = retrieval_ranks(sim, [[0, 1], [2, 3]])
    assert i2t.tolist() == [1, 0]
    # cap0, cap1: own 0.5 vs 0.0 -> 0; cap2: own 0.9 vs 0.5 -> 0; cap3: 0.9 vs 0.1 -> 0.
    assert t2i.tolist() == [0, 0, 0, 0]


def _brute_force(sim, gt, ks):
    owner = {c: i for i, caps in enumerate(gt) for c in caps}
    n_img, n_txt = sim.shape
    i2t = []
    for i in range(n_img):
        # Sort by score descending; at equal score put wrong candidates first (pessimistic).
        order = sorted(range(n_txt), key=lambda j: (-sim[i, j], owner[j] == i))
        i2t.append(next(pos for pos, j in enumerate(order) if owner[j] == i))
    t2i = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-sim[i, j], owner[j] == i))
        t2i.append(order.index(owner[j]))
    out = {f"i2t_R@{k}": sum(r < k for r in i2t) / n_img for k in ks}
    out.update({f"t2i_R@{k}": sum(r < k for r in t2i) / n_txt for k in ks})
    return np.array(i2t), np.array(t2i), out


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(3, 25))
    per_image = rng.integers(1, 6, size=n_img)  # 1..5 captions per image
    perm = rng.permutation(int(per_image.sum()))  # captions shuffled over the columns
    gt, start = [], 0
    for n in per_image:
        gt.append(set(perm[start:start + n].tolist()))
        start += n
    sim = rng.normal(size=(n_img, perm.size))
    if seed % 2:
        sim = np.round(sim, 1)  # many ties
    ks = (1, 2, 5, 10)
    i2t_ref, t2i_ref, ref = _brute_force(sim, gt, ks)
    i2t, t2i = retrieval_ranks(sim, gt)
    np.testing.assert_array_equal(i2t, i2t_ref)
    np.testing.assert_array_equal(t2i, t2i_ref)
    got = recall_at_k(sim, gt, ks)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_chunked_rows_match_brute_force(monkeypatch):
    import lqae_vlap.evals.retrieval as retrieval

    monkeypatch.setattr(retrieval, "_ROW_CHUNK", 3)  # several chunks, the last one partial
    rng = np.random.default_rng(7)
    gt = [[2 * i, 2 * i + 1] for i in range(10)]
    sim = np.round(rng.normal(size=(10, 20)), 1)
    i2t_ref, _, _ = _brute_force(sim, gt, (1,))
    np.testing.assert_array_equal(retrieval.retrieval_ranks(sim, gt)[0], i2t_ref)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="exactly one image"):
        recall_at_k(np.zeros((2, 2)), [[0, 1], [1]])
    with pytest.raises(ValueError, match="belong to no image"):
        recall_at_k(np.zeros((2, 3)), [[0], [1]])
    with pytest.raises(ValueError, match="one entry per image"):
        recall_at_k(np.zeros((3, 3)), [[0], [1, 2]])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(np.zeros((2, 2)), [[0], [5]])
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(np.zeros((2, 2)), [[0, 1], []])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.array([[np.nan, 0.0], [0.0, 0.0]]), [[0], [1]])
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(np.zeros((2, 2)), [[0], [1]], ks=(0,))


def test_galleries_hold_distinct_captions_and_only_full_ones_are_kept():
    caps = [["one"], ["two"], ["one"], ["three"], ["two"], ["one"], ["three"]]
    groups = galleries(caps, 3)
    # Greedy: [0, 1, 3] (one, two, three), then [2, 4, 6]; image 5 ("one") opens a third
    # gallery that never fills and is dropped.
    assert groups == [[0, 1, 3], [2, 4, 6]]
    for g in groups:
        texts = [c for i in g for c in caps[i]]
        assert len(texts) == len(set(texts))


def test_one_gallery_drops_repeated_caption_texts():
    caps = [["a", "b"], ["b"], ["c", "a"]]
    assert galleries(caps, 0) == [[0, 2]]  # image 1's only caption is taken
    texts, gt = gallery_captions(caps, [0, 2])
    assert texts == ["a", "b", "c"] and gt == [[0, 1], [2]]
    with pytest.raises(ValueError, match="gallery_size"):
        galleries(caps, -1)


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
        ranks, _ = retrieval_ranks(sim, gt)  # recall averages rows separately
        for k in ks:
            i2t[k] += np.mean(ranks < k) / len(perms)
    t2i = {k: 0.0 for k in ks}
    img_perms = list(itertools.permutations(range(n_img)))
    for perm in img_perms:
        sim = np.tile(np.asarray(perm, float)[:, None], (1, n_txt))
        _, ranks = retrieval_ranks(sim, gt)
        for k in ks:
            t2i[k] += np.mean(ranks < k) / len(img_perms)
    chance = chance_recall(gt, n_txt, ks)
    for k in ks:
        assert chance[f"i2t_R@{k}"] == pytest.approx(i2t[k], abs=1e-12)
        assert chance[f"t2i_R@{k}"] == pytest.approx(t2i[k], abs=1e-12)


def test_word_score_embedding_reproduces_word_score_dot_products():
    rng = np.random.default_rng(0)
    words = rng.standard_normal((50, 6))
    x = rng.standard_normal((7, 6)) * 3.0
    f = word_score_embedding(x, words)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    s = unit(x) @ unit(words).T  # [7, 50] the cosine scores L_map uses
    np.testing.assert_allclose(f @ f.T, s @ s.T, rtol=1e-10, atol=1e-10)


def test_every_caption_keeps_repeated_texts_as_their_own_columns():
    # COCO 5k / Flickr30k 1k: 5N columns even when two images share a caption word for word
    # (the one gallery of galleries(caps, 0) drops the repeat instead).
    caps = [["a dog", "a red ball"], ["a cat", "a dog"], ["a bird"]]
    texts, gt = every_caption(caps)
    assert texts == ["a dog", "a red ball", "a cat", "a dog", "a bird"]
    assert gt == [[0, 1], [2, 3], [4]]
    assert len(gallery_captions(caps, galleries(caps, 0)[0])[0]) == 4
    # Both "a dog" columns are queries with their own image: column 3 finds image 1 (0.95 > 0.9).
    # Image 0 ties its own "a dog" (0.9) with image 1's (0.9): pessimistic, a miss at R@1.
    sim = np.array([[0.9, 0.8, 0.0, 0.9, 0.0], [0.5, 0.0, 0.7, 0.95, 0.0], [0, 0, 0, 0, 1.0]])
    out = recall_at_k(sim, gt, ks=(1,))
    assert out["t2i_R@1"] == pytest.approx(1.0)
    assert out["i2t_R@1"] == pytest.approx(2 / 3)
