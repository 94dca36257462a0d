"""Visual semantic arithmetic in the LLM's word-embedding space (VLAP's qualitative evaluation).

VLAP maps images into the frozen LLM's input-embedding space, so an image representation (the mean
of its projected tokens) can be added to and subtracted from word embeddings, e.g.
"image of a dog on grass" - "dog" + "cat" -> nearest images show a cat on grass, and
"image" - "grass" -> nearest words. As in word-analogy arithmetic (3CosAdd), every operand is
L2-normalised before combining so that a long vector (image tokens are not on the word scale)
does not dominate, the sum is normalised, and candidates are ranked by cosine similarity.
Ties in the top-k are broken by the lower candidate index (stable sort).

Exact targets (``target_recall``): where the evaluation images come in pairs that differ in one
word's worth of content (digit scenes: the same scene with digit a replaced by digit b), image(q)
- word(a) + word(b) has one right answer, image(t), and is scored as retrieval: Recall@K of t in
the gallery of every image but q, beside chance (K / (N - 1)) and two controls that see only part
of the query: word(b) alone (no image) and image(q) alone (no arithmetic; the target, one digit
away, is often its nearest neighbour already, so the arithmetic is read against it). Ties are
counted pessimistically, as in evals/retrieval.py: every other image scoring >= the target is
ranked ahead of it, so collapsed representations get recall 0, not a lucky hit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lqae_vlap.evals.arrays import EPS, unit_rows


def contains_word(text: str, word: str) -> bool:
    """Whether text holds word as a whole word, case-insensitively (does a caption name it?)."""
    return re.search(rf"\b{re.escape(word.lower())}\b", text.lower()) is not None


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    # An operand without direction would silently drop out of the sum: refuse it.
    if np.any(np.linalg.norm(x, axis=-1) < EPS):
        raise ValueError(f"{what} contains a zero vector; cosine arithmetic needs non-zero vectors")
    return unit_rows(x)


def _as_rows(vectors: Sequence[np.ndarray] | np.ndarray, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float64) if len(vectors) else np.zeros((0, dim))
    arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must be a list of [{dim}] vectors, got shape {arr.shape}")
    return arr


def combine(query: np.ndarray, plus: Sequence[np.ndarray] | np.ndarray = (),
            minus: Sequence[np.ndarray] | np.ndarray = ()) -> np.ndarray:
    """Unit vector of unit(query) + sum unit(plus) - sum unit(minus).

    Args:
      query: [D]; plus: list of [D] (or [P, D]); minus: list of [D] (or [Q, D]).

    Returns:
      [D] float64, L2 norm 1.
    """
    q = np.asarray(query, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"query must be one [D] vector, got shape {q.shape}")
    p = _as_rows(plus, q.shape[0], "plus")
    m = _as_rows(minus, q.shape[0], "minus")
    total = _unit(q, "query")
    if len(p):
        total = total + _unit(p, "plus").sum(axis=0)
    if len(m):
        total = total - _unit(m, "minus").sum(axis=0)
    if np.linalg.norm(total) < 1e-9:
        raise ValueError("the operands cancel out exactly (query + plus - minus = 0); the result "
                         "has no direction to search")
    return total / np.linalg.norm(total)


def arithmetic(query: np.ndarray, plus: Sequence[np.ndarray] | np.ndarray,
               minus: Sequence[np.ndarray] | np.ndarray, candidates: np.ndarray, top_k: int = 5,
               exclude: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Nearest candidates by cosine to normalised query + plus - minus.

    Args:
      query: [D]; plus, minus: lists of [D]; candidates: [M, D] (rows need not be normalised).
      top_k: how many to return (at most M - len(exclude)).
      exclude: candidate indices never returned (e.g. the words used as operands); zero
        candidate rows are never returned either.

    Returns:
      (indices [top_k] int64, cosine scores [top_k] float64), best first.
    """
    target = combine(query, plus, minus)
    cand = np.asarray(candidates, dtype=np.float64)
    if cand.ndim != 2 or cand.shape[1] != target.shape[0]:
        raise ValueError(f"candidates must be [M, {target.shape[0]}], got shape {cand.shape}")
    norms = np.linalg.norm(cand, axis=1)
    # A zero row has no direction (e.g. the padding word's embedding, zero in many checkpoints):
    # it is never an answer rather than an error.
    scores = unit_rows(cand) @ target
    keep = norms >= EPS
    excl = np.asarray(list(exclude), dtype=np.int64)
    if excl.size and (excl.min() < 0 or excl.max() >= cand.shape[0]):
        raise ValueError(f"exclude holds indices outside [0, {cand.shape[0]})")
    keep[excl] = False
    top_k = int(top_k)
    if not 1 <= top_k <= int(keep.sum()):
        raise ValueError(f"top_k must be in [1, {int(keep.sum())}] (candidates left after "
                         f"exclude), got {top_k}")
    idx = np.flatnonzero(keep)
    order = np.argsort(-scores[idx], kind="stable")[:top_k]
    return idx[order], scores[idx[order]]


def nearest_words(image: np.ndarray, word_embeddings: np.ndarray, plus_ids: Sequence[int] = (),
                  minus_ids: Sequence[int] = (), top_k: int = 5, exclude_operands: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Words nearest to image + words(plus_ids) - words(minus_ids).

    Args:
      image: [D] image representation in the LLM's input space (VLAP: mean of projected tokens).
      word_embeddings: [V, D] the LLM's input embedding matrix (the candidates).
      plus_ids, minus_ids: token ids of the words to add / subtract.
      exclude_operands: drop plus/minus ids from the answers (an added word is trivially near).

    Returns:
      (token ids [top_k], cosine scores [top_k]); decode the ids with the LLM's tokenizer.
    """
    emb = np.asarray(word_embeddings, dtype=np.float64)
    _check_ids(plus_ids, emb.shape[0], "plus_ids")
    _check_ids(minus_ids, emb.shape[0], "minus_ids")
    excl = sorted(set(plus_ids) | set(minus_ids)) if exclude_operands else ()
    return arithmetic(image, emb[list(plus_ids)], emb[list(minus_ids)], emb, top_k, excl)


def nearest_images(image: np.ndarray, word_embeddings: np.ndarray, image_bank: np.ndarray,
                   plus_ids: Sequence[int] = (), minus_ids: Sequence[int] = (), top_k: int = 5,
                   exclude: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Images nearest to image + words(plus_ids) - words(minus_ids).

    Args:
      image: [D] query image representation.
      word_embeddings: [V, D] LLM input embeddings (source of the plus/minus word vectors).
      image_bank: [N, D] representations of the searchable images.
      exclude: bank indices to skip (e.g. the query image itself when it is in the bank).

    Returns:
      (bank indices [top_k], cosine scores [top_k]).
    """
    emb = np.asarray(word_embeddings, dtype=np.float64)
    _check_ids(plus_ids, emb.shape[0], "plus_ids")
    _check_ids(minus_ids, emb.shape[0], "minus_ids")
    return arithmetic(image, emb[list(plus_ids)], emb[list(minus_ids)], image_bank, top_k, exclude)


def _check_ids(ids: Sequence[int], vocab: int, what: str) -> None:
    bad = [i for i in ids if not 0 <= int(i) < vocab]
    if bad:
        raise ValueError(f"{what} {bad} are outside the vocabulary [0, {vocab}); pass token ids")


TARGET_MODES = ("arithmetic", "word_only", "image_only")


def target_ranks(images: np.ndarray, word_embeddings: np.ndarray,
                 pairs: Sequence[tuple[int, Sequence[int], Sequence[int], int]]
                 ) -> dict[str, np.ndarray]:
    """0-based rank of each pair's target among the other images, per mode of ``TARGET_MODES``.

    Args:
      images: [N, D] image representations (the gallery; rows need not be normalised).
      word_embeddings: [V, D] the LLM's input embeddings (source of the word vectors).
      pairs: (query, minus_ids, plus_ids, target): image indices and the token ids of word(a)
        and word(b); the query is never a candidate.

    Returns:
      {mode: ranks [len(pairs)] int64}: 'arithmetic' ranks by cos(image(q) - a + b, .),
      'word_only' by cos(b, .), 'image_only' by cos(image(q), .); rank = how many other
      candidates score >= the target (pessimistic ties).
    """
    bank = np.asarray(images, dtype=np.float64)
    emb = np.asarray(word_embeddings, dtype=np.float64)
    if bank.ndim != 2 or emb.ndim != 2 or bank.shape[1] != emb.shape[1]:
        raise ValueError(f"images [N, D] and word_embeddings [V, D] must share D, got shapes "
                         f"{bank.shape} and {emb.shape}")
    n = bank.shape[0]
    unit_bank = unit_rows(bank)
    ranks: dict[str, list[int]] = {m: [] for m in TARGET_MODES}
    for q, minus_ids, plus_ids, t in pairs:
        q, t = int(q), int(t)
        if not (0 <= q < n and 0 <= t < n) or q == t:
            raise ValueError(f"pair ({q}, ..., {t}): query and target must be two different "
                             f"images in [0, {n})")
        _check_ids(minus_ids, emb.shape[0], "minus_ids")
        _check_ids(plus_ids, emb.shape[0], "plus_ids")
        if not len(plus_ids):
            raise ValueError(f"pair ({q}, ..., {t}) has no plus_ids: word(b) is needed")
        plus, minus = emb[list(plus_ids)], emb[list(minus_ids)]
        queries = {"arithmetic": combine(bank[q], plus, minus),
                   "word_only": combine(_unit(plus, "plus").sum(axis=0)),
                   "image_only": combine(bank[q])}
        for mode, vec in queries.items():
            scores = unit_bank @ vec
            others = np.ones(n, bool)
            others[[q, t]] = False
            ranks[mode].append(int(np.sum(scores[others] >= scores[t])))
    return {m: np.asarray(r, dtype=np.int64) for m, r in ranks.items()}


def target_recall(images: np.ndarray, word_embeddings: np.ndarray,
                  pairs: Sequence[tuple[int, Sequence[int], Sequence[int], int]],
                  ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Recall@K of the exact target per mode (``target_ranks``), beside chance.

    Returns:
      {mode: {'R@k': fraction}, 'chance': {'R@k': k / (N - 1)}, 'num_queries': len(pairs),
      'gallery': N - 1 (the candidates of each query)}.
    """
    if not pairs:
        raise ValueError("target_recall needs at least one (query, minus, plus, target) pair")
    n = int(np.shape(images)[0])
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    ranks = target_ranks(images, word_embeddings, pairs)
    out: dict[str, Any] = {m: {f"R@{k}": float(np.mean(r < k)) for k in ks}
                           for m, r in ranks.items()}
    out["chance"] = {f"R@{k}": min(1.0, k / (n - 1)) for k in ks}
    out.update(num_queries=len(pairs), gallery=n - 1)
    return out
