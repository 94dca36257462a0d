"""Cross-modal retrieval Recall@K (image->text and text->image), as VLAP reports on COCO/Flickr.

Conventions (those of VSE++/CLIP-style evaluations on COCO 5k, where each image has ~5 captions and
each caption belongs to exactly one image):
  * image->text: an image is a hit at K when ANY of its captions is among the K highest-scoring
    captions, i.e. its rank is that of its best-scoring caption;
  * text->image: a caption is a hit at K when its one image is among the K highest-scoring images.

Ties are counted pessimistically: every wrong candidate whose score is >= the best correct score is
ranked ahead of it. A model that gives every candidate the same score therefore gets recall 0
instead of a lucky 100% (an optimistic or index-order tie-break would reward collapsed embeddings,
a real failure mode of a mis-trained projection). Ties among correct candidates do not matter.

Recalls are fractions in [0, 1]; multiply by 100 for the percentages of the papers' tables.

Galleries: when several images share a caption text (e.g. the VLAP demo's "a handwritten digit
seven"), ``galleries`` splits the images into galleries in which no caption text repeats, so each
caption has one owner, and ``chance_recall`` is the recall of a random ranking of such a gallery.
``every_caption`` is the papers' one gallery instead: all images, every caption its own column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from lqae_vlap.evals.arrays import unit_rows

DEFAULT_KS = (1, 5, 10)
_ROW_CHUNK = 1024  # rows of the [N_img, N_txt] masks built at once: bounds memory on COCO 5k x 25k


def caption_owner(gt: Sequence[Iterable[int]], n_txt: int) -> np.ndarray:
    """Image index of every caption.

    Args:
      gt: for each image, the indices (columns of ``sim``) of its captions.
      n_txt: number of captions.

    Returns:
      owner: [n_txt] int64, owner[j] = the image that caption j describes.
    """
    owner = np.full(n_txt, -1, dtype=np.int64)
    for i, caps in enumerate(gt):
        caps = [int(c) for c in caps]
        if not caps:
            raise ValueError(f"image {i} has no caption in gt; give every image >= 1 caption")
        for c in caps:
            if not 0 <= c < n_txt:
                raise ValueError(f"gt[{i}] holds caption index {c}, outside [0, {n_txt}); the "
                                 "indices must be columns of sim")
            if owner[c] not in (-1, i):
                raise ValueError(f"caption {c} is listed for images {owner[c]} and {i}; each "
                                 "caption must belong to exactly one image")
            owner[c] = i
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        raise ValueError(f"{missing.size} captions (e.g. {missing[:5].tolist()}) belong to no "
                         "image in gt; drop those columns of sim or list them in gt")
    return owner


def retrieval_ranks(sim: np.ndarray, gt: Sequence[Iterable[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Pessimistic 0-based ranks of the best correct candidate, both directions.

    Args:
      sim: [N_img, N_txt] similarity, higher = more similar (e.g. cosine).
      gt: length N_img; gt[i] = the caption indices of image i (COCO: 5 each).

    Returns:
      (i2t_rank [N_img], t2i_rank [N_txt]), int64; rank 0 = retrieved first.
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be [N_img, N_txt], got shape {sim.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("sim holds NaN/inf; check the embeddings (zero vectors give NaN cosines)")
    n_img, n_txt = sim.shape
    if len(gt) != n_img:
        raise ValueError(f"gt lists {len(gt)} images but sim has {n_img} rows; one entry per image")
    owner = caption_owner(gt, n_txt)

    # text->image: the caption's own image score vs every other image in its column.
    own = sim[owner, np.arange(n_txt)]  # [N_txt]
    # ">= own" also counts the correct image itself once; subtract it.
    t2i = (sim >= own[None, :]).sum(axis=0) - 1

    # image->text: best correct caption per row vs the wrong captions of that row.
    i2t = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, _ROW_CHUNK):
        rows = np.arange(start, min(start + _ROW_CHUNK, n_img))
        correct = owner[None, :] == rows[:, None]  # [chunk, N_txt]
        block = sim[rows]
        best = np.where(correct, block, -np.inf).max(axis=1)
        i2t[rows] = ((block >= best[:, None]) & ~correct).sum(axis=1)
    return i2t, t2i.astype(np.int64)


def recall_at_k(sim: np.ndarray, gt: Sequence[Iterable[int]],
                ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K in both directions.

    Args:
      sim: [N_img, N_txt] image-text similarity (any array-like; computed in float64).
      gt: length N_img; gt[i] = iterable of the caption indices of image i.
      ks: the K values.

    Returns:
      {'i2t_R@k': fraction of images with a correct caption in the top k, 't2i_R@k': fraction of
      captions whose image is in the top k} for every k in ks, ties pessimistic (module docstring).
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}; e.g. (1, 5, 10)")
    i2t, t2i = retrieval_ranks(sim, gt)
    out = {f"i2t_R@{k}": float(np.mean(i2t < k)) for k in ks}
    out.update({f"t2i_R@{k}": float(np.mean(t2i < k)) for k in ks})
    return out


def galleries(caption_lists: Sequence[Sequence[str]], size: int) -> list[list[int]]:
    """Splits images into retrieval galleries in which no caption text repeats.

    Args:
      caption_lists: per image, its captions.
      size: images per gallery; 0 = one gallery of every image (a caption text already used by
        an earlier image is dropped from later ones; images left with none are skipped).

    Returns:
      galleries: lists of image indices; an image joins the first gallery holding none of its
      captions, and with size > 0 only full galleries are returned.
    """
    if size < 0:
        raise ValueError(f"eval.retrieval.gallery_size must be >= 0, got {size}")
    if size == 0:
        seen: set[str] = set()
        keep = []
        for i, caps in enumerate(caption_lists):
            if any(c not in seen for c in caps):
                keep.append(i)
                seen.update(caps)
        return [keep]
    open_: list[tuple[list[int], set[str]]] = []
    for i, caps in enumerate(caption_lists):
        caps_set = set(caps)
        for members, texts in open_:
            if len(members) < size and not texts & caps_set:
                members.append(i)
                texts.update(caps_set)
                break
        else:
            open_.append(([i], set(caps_set)))
    return [members for members, _ in open_ if len(members) == size]


def gallery_captions(caption_lists: Sequence[Sequence[str]], members: Sequence[int]
                     ) -> tuple[list[str], list[list[int]]]:
    """The captions of one gallery, and each member's columns among them.

    Args:
      caption_lists: per image, its captions.
      members: the gallery's image indices (one list of ``galleries``).

    Returns:
      (texts: each caption text once, its first owner keeping it; gt: per member, the indices
      of its captions in texts, as ``recall_at_k`` takes them).
    """
    texts: list[str] = []
    owner: dict[str, int] = {}
    gt: list[list[int]] = []
    for i in members:
        cols = []
        for c in caption_lists[i]:
            if c not in owner:
                owner[c] = len(texts)
                texts.append(c)
                cols.append(owner[c])
        gt.append(cols)
    return texts, gt


def every_caption(caption_lists: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """Every caption of every image as its own column, repeated texts included: the COCO 5k
    (25,010 captions) and Flickr30k 1k (5,000) protocol, where a caption that two images share
    word for word is two queries, each with its own image.

    Returns (texts, gt) as ``gallery_captions`` does, for one gallery of all the images.
    """
    texts: list[str] = []
    gt: list[list[int]] = []
    for caps in caption_lists:
        gt.append(list(range(len(texts), len(texts) + len(caps))))
        texts.extend(caps)
    return texts, gt


def chance_recall(gt: Sequence[Sequence[int]], n_txt: int, ks: Sequence[int]) -> dict[str, float]:
    """Expected Recall@K of a random ranking (same keys as ``recall_at_k``).

    gt: per image, the indices of its captions; n_txt: the number of captions. image->text:
    1 - C(n_txt - c, K) / C(n_txt, K) for an image with c captions; text->image: K / n_img.
    """
    n_img = len(gt)
    out = {}
    for k in ks:
        i2t = [1.0 - (math.comb(n_txt - len(c), k) / math.comb(n_txt, k) if k <= n_txt else 0.0)
               for c in gt]
        out[f"i2t_R@{k}"] = float(np.mean(i2t))
        out[f"t2i_R@{k}"] = min(k, n_img) / n_img
    return out


def word_score_embedding(x: np.ndarray, word_embeddings: np.ndarray) -> np.ndarray:
    """Maps representations so that their dot products equal those of their word-score profiles.

    x: [N, D], word_embeddings: [V, D] -> [N, D] float64 rows f with <f_a, f_b> = <s_a, s_b>
    where s = unit(W) @ unit(x) (the cosine scores L_map uses); unit-normalise f for cosines.
    """
    w, x = unit_rows(word_embeddings), unit_rows(x)
    evals, evecs = np.linalg.eigh(w.T @ w)  # Gram = W^T W, symmetric PSD
    root = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    return x @ root
