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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

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
