"""Word (token) frequencies over a caption corpus: the column marginal of VLAP's Sinkhorn.

VLAP assigns representations to the LLM's words with optimal transport whose word marginal
follows each word's frequency in the training captions (CC3M). This file counts tokens with the
LLM's own tokenizer, turns counts into a smoothed probability vector, and saves / loads that
vector beside a run with a JSON sidecar saying where it came from.

Host-side NumPy only: this runs once before training, not inside jit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "count_token_frequencies",
    "smooth_frequencies",
    "save_marginal",
    "load_marginal",
    "word_marginal",
    "REQUIRED_META_KEYS",
]

# What a saved marginal must say about itself so a run can be reproduced from its workdir.
REQUIRED_META_KEYS = ("tokenizer", "dataset", "num_texts", "smoothing")
_FORMAT = "lqae_vlap.word_marginal/1"


def count_token_frequencies(
    texts: Iterable[str],
    tokenizer: Any,
    vocab_size: int,
    *,
    batch_size: int = 1024,
    add_special_tokens: bool = False,
) -> np.ndarray:
    """Counts how often each token id occurs when `tokenizer` encodes `texts`.

    Args:
      texts: any iterable of strings (a list, a generator over a dataset); read once.
      tokenizer: a Hugging Face tokenizer, or any callable `tokenizer(list_of_str,
        add_special_tokens=...)` returning a mapping with "input_ids" (one id list per text).
      vocab_size: length of the result; the LLM's embedding rows, which may exceed the
        tokenizer's own vocabulary (OPT: 50,272 rows, 50,265 tokens).
      batch_size: texts per tokenizer call (batched calls are much faster with fast tokenizers).
      add_special_tokens: count BOS/EOS/[CLS]/[SEP]... too. Off by default: they occur once per
        text and say nothing about the words.

    Returns:
      counts: [vocab_size] int64.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "count_token_frequencies: texts must be an iterable of strings, got a single string; "
            "wrap it in a list: [text]."
        )
    if int(vocab_size) < 1:
        raise ValueError(f"count_token_frequencies: vocab_size must be >= 1, got {vocab_size}.")
    if int(batch_size) < 1:
        raise ValueError(f"count_token_frequencies: batch_size must be >= 1, got {batch_size}.")
    vocab_size = int(vocab_size)
    counts = np.zeros((vocab_size,), np.int64)
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(batch, add_special_tokens=add_special_tokens)["input_ids"]
        ids = np.fromiter((i for seq in encoded for i in seq), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"count_token_frequencies: the tokenizer produced id {int(ids.max())} (min "
                f"{int(ids.min())}), outside [0, {vocab_size}); vocab_size must be at least the "
                "tokenizer's vocabulary: pass the LLM's embedding size for this tokenizer."
            )
        counts[:] += np.bincount(ids, minlength=vocab_size)
        batch.clear()

    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"count_token_frequencies: texts[{i}] is {type(text).__name__}, expected str."
            )
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return counts


def smooth_frequencies(
    counts: np.ndarray, *, alpha: float = 1.0, power: float = 1.0
) -> np.ndarray:
    """Additive (Laplace) smoothing, then a power, then normalisation:

        p_k = (n_k + alpha) ** power / sum_j (n_j + alpha) ** power

    alpha > 0 gives every word, even unseen ones, some mass (alpha = 0 keeps unseen words at
    exactly 0, which `sinkhorn` accepts: those columns get no mass). power = 1 keeps the
    smoothed frequencies; power < 1 flattens them (a temperature 1 / power), power = 0 is uniform
    over all words (0 ** 0 = 1).

    Args:
      counts: [V] non-negative counts (e.g. from `count_token_frequencies`).
      alpha: pseudo-count added to every word (>= 0).
      power: exponent (>= 0).

    Returns:
      [V] float64 probabilities summing to 1.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(
            f"smooth_frequencies: counts must be a non-empty [V] vector, got {counts.shape}."
        )
    counts = counts.astype(np.float64)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("smooth_frequencies: counts must be finite and >= 0.")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"smooth_frequencies: alpha must be >= 0, got {alpha}.")
    if not (np.isfinite(power) and power >= 0):
        raise ValueError(f"smooth_frequencies: power must be >= 0, got {power}.")
    weights = (counts + alpha) ** power
    total = weights.sum()
    if not total > 0:
        raise ValueError(
            "smooth_frequencies: all counts are 0 and alpha is 0, so there is no mass to "
            "normalise; use alpha > 0 or count a non-empty corpus."
        )
    return weights / total


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(vector .npy, sidecar .json) for a path given with or without the .npy suffix."""
    path = Path(path)
    if path.suffix not in ("", ".npy"):
        raise ValueError(
            f"word marginal path {str(path)!r} must end in .npy (or have no suffix); the JSON "
            "sidecar is written next to it."
        )
    data = path.with_suffix(".npy")
    return data, data.with_suffix(".json")


def save_marginal(
    path: str | os.PathLike, probs: np.ndarray, meta: Mapping[str, Any]
) -> Path:
    """Saves a word marginal as `<path>.npy` (float64 [V]) plus `<path>.json` (its provenance).

    Args:
      path: file path, with or without the .npy suffix (e.g. `workdir / "word_marginal"`).
      probs: [V] non-negative, sums to 1 (from `smooth_frequencies`).
      meta: JSON-serialisable dict with at least REQUIRED_META_KEYS: "tokenizer" (name or path),
        "dataset", "num_texts" (how many texts were counted), "smoothing" (e.g.
        {"alpha": 1.0, "power": 1.0}). "vocab_size" and "format" are added here.

    Returns:
      The path of the .npy file.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 1 or probs.size == 0:
        raise ValueError(f"save_marginal: probs must be a non-empty [V] vector, got {probs.shape}.")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("save_marginal: probs must be finite and >= 0.")
    if abs(probs.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"save_marginal: probs sum to {probs.sum():.8g}, not 1; "
            "pass smooth_frequencies(counts)."
        )
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise ValueError(
            f"save_marginal: meta lacks {missing}; a saved marginal must record "
            f"{list(REQUIRED_META_KEYS)} so the run can be reproduced."
        )
    data_path, meta_path = _paths(path)
    sidecar = {**dict(meta), "vocab_size": int(probs.size), "format": _FORMAT}
    try:
        text = json.dumps(sidecar, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"save_marginal: meta must be JSON-serialisable: {e}") from e
    data_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(data_path, probs)
    meta_path.write_text(text + "\n")
    return data_path


def load_marginal(
    path: str | os.PathLike, *, vocab_size: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Loads a marginal written by `save_marginal`.

    Args:
      path: the .npy path (or the same path without suffix) given to `save_marginal`.
      vocab_size: if given, the number of words of the model it will be used with; a vector of
        another length is an error (it was counted with a different tokenizer / vocabulary).

    Returns:
      (probs [V] float64, meta dict from the JSON sidecar).
    """
    data_path, meta_path = _paths(path)
    if not data_path.is_file():
        raise FileNotFoundError(
            f"load_marginal: no word marginal at {data_path}; create it with "
            "count_token_frequencies -> smooth_frequencies -> save_marginal."
        )
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"load_marginal: {data_path} has no JSON sidecar {meta_path}; "
            "save it with save_marginal."
        )
    probs = np.load(data_path, allow_pickle=False)
    meta = json.loads(meta_path.read_text())
    if probs.ndim != 1:
        raise ValueError(f"load_marginal: {data_path} holds shape {probs.shape}, expected [V].")
    if meta.get("vocab_size") != probs.size:
        raise ValueError(
            f"load_marginal: {data_path} has {probs.size} entries but its sidecar says "
            f"vocab_size={meta.get('vocab_size')}; the two files do not belong together."
        )
    if vocab_size is not None and probs.size != int(vocab_size):
        raise ValueError(
            f"load_marginal: the word marginal at {data_path} has {probs.size} entries (tokenizer "
            f"{meta.get('tokenizer')!r}) but the model's vocabulary has {int(vocab_size)} words; "
            "recount it with this model's tokenizer and count_token_frequencies(..., "
            f"vocab_size={int(vocab_size)})."
        )
    return probs.astype(np.float64), meta


def word_marginal(source: str, vocab_size: int, *, tokenizer: Any = None,
                  captions: Iterable[str] | None = None, alpha: float = 1.0,
                  power: float = 1.0) -> tuple[np.ndarray, str]:
    """The Sinkhorn word marginal [V] float32 of ``config.word_marginal`` and where it came from.

    source: 'uniform'; 'count' (count ``captions`` now with ``tokenizer``, each with its leading
    space as it follows the prompt, then ``smooth_frequencies(alpha, power)``); or the path of a
    marginal saved by ``save_marginal``.
    """
    if source == "uniform":
        return np.full((vocab_size,), 1.0 / vocab_size, np.float32), "uniform"
    if source == "count":
        if captions is None:
            raise ValueError("config.word_marginal.source='count' needs a source that lists its "
                             "captions; save one with ops/word_frequency.py and pass its path")
        texts = [" " + c for c in captions]
        counts = count_token_frequencies(texts, tokenizer, vocab_size)
        probs = smooth_frequencies(counts, alpha=alpha, power=power)
        return probs.astype(np.float32), f"counted over {len(texts)} training captions"
    probs, meta = load_marginal(source, vocab_size=vocab_size)
    return probs.astype(np.float32), f"{source} ({meta.get('dataset')})"
