"""Word (token) frequencies over a caption corpus: the column marginal of VLAP's Sinkhorn.

VLAP assigns representations to the LLM's words with optimal transport whose word marginal
follows each word's frequency in the training captions (CC3M). This file counts tokens with the
LLM's own tokenizer, turns counts into a smoothed probability vector, and saves / loads that
vector with a JSON sidecar saying where it came from (``save_marginal`` / ``load_marginal``).

``word_marginal`` resolves ``config.word_marginal.source``:
  'frequency' (default): the frequency of the training captions under the LLM's tokenizer,
      counted once and saved in a cache folder under a key of (data, split, number of captions,
      tokenizer identity, vocabulary size, smoothing); a later run with the same key loads it.
  'count': counted at start-up every time and not saved (small data such as the demo's).
  'uniform': 1 / V for every word (only when asked for).
  a path: a marginal saved by ``save_marginal`` (e.g. counted elsewhere over CC3M).

Host-side NumPy only: this runs once before training, not inside jit. Files go through
core/files.py, so the cache may be a bucket (gs://...) and readers never see a partial file.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lqae_vlap.core import files

__all__ = [
    "count_token_frequencies",
    "smooth_frequencies",
    "save_marginal",
    "load_marginal",
    "tokenizer_identity",
    "marginal_key",
    "default_cache_dir",
    "word_marginal",
    "SOURCES",
    "REQUIRED_META_KEYS",
]

# What a saved marginal must say about itself so a run can be reproduced from its workdir.
REQUIRED_META_KEYS = ("tokenizer", "dataset", "num_texts", "smoothing")
_FORMAT = "lqae_vlap.word_marginal/1"
SOURCES = ("frequency", "count", "uniform", "<path to a saved .npy>")
# What to write when the frequencies cannot be had; the line names every way to provide them.
_HOW_TO = ("give a saved marginal with --config.word_marginal.source=/path/to/marginal.npy, or "
           "point --config.data.train_path (config.data.name='cc3m' or 'jsonl') at the training "
           "captions so they can be counted, or ask for --config.word_marginal.source=uniform")


def _batch_encoder(tokenizer: Any, add_special_tokens: bool) -> Callable[[list[str]], Any]:
    """texts -> one id sequence per text.

    A Hugging Face fast tokenizer's Rust backend is called directly (``encode_batch_fast``: no
    offsets, no Python BatchEncoding; batches run on every core): the same ids as
    ``tokenizer(texts)``, which calls the same backend, checked in tests/ops/test_word_frequency.py.
    Anything else is called as ``tokenizer(texts, add_special_tokens=...)["input_ids"]``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    # A backend left truncating or padding by an earlier call would change the ids; the Python
    # call resets both, so use it then.
    if encode is not None and backend.truncation is None and backend.padding is None:
        return lambda batch: [e.ids for e in encode(batch, add_special_tokens=add_special_tokens)]
    return lambda batch: tokenizer(batch, add_special_tokens=add_special_tokens)["input_ids"]


def count_token_frequencies(
    texts: Iterable[str],
    tokenizer: Any,
    vocab_size: int,
    *,
    batch_size: int = 8192,
    add_special_tokens: bool = False,
) -> np.ndarray:
    """Counts how often each token id occurs when `tokenizer` encodes `texts`.

    Args:
      texts: any iterable of strings (a list, a generator over a dataset); read once.
      tokenizer: a Hugging Face tokenizer, or any callable `tokenizer(list_of_str,
        add_special_tokens=...)` returning a mapping with "input_ids" (one id list per text).
      vocab_size: length of the result; the LLM's embedding rows, which may exceed the
        tokenizer's own vocabulary (OPT: 50,272 rows, 50,265 tokens).
      batch_size: texts per tokenizer call (a fast tokenizer spreads a batch over the cores).
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
    encode = _batch_encoder(tokenizer, add_special_tokens)
    batch: list[str] = []

    def flush() -> None:
        encoded = encode(batch)
        total = sum(len(seq) for seq in encoded)
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=total)
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


def _paths(path: str | os.PathLike) -> tuple[str, str]:
    """(vector .npy, sidecar .json) for a path given with or without the .npy suffix (a local
    path or a URL such as gs://bucket/marginal.npy)."""
    path = os.fspath(path)
    stem, suffix = os.path.splitext(path)
    if suffix not in ("", ".npy") or os.path.basename(stem) in ("", ".", ".."):
        raise ValueError(
            f"word marginal path {path!r} must end in .npy (or have no suffix); "
            "the JSON sidecar is written next to it."
        )
    return stem + ".npy", stem + ".json"


def save_marginal(
    path: str | os.PathLike, probs: np.ndarray, meta: Mapping[str, Any]
) -> str:
    """Saves a word marginal as `<path>.npy` (float64 [V]) plus `<path>.json` (its provenance).

    Each file is written whole (core/files.py: temp file + rename, or one object upload), the
    vector first and the sidecar last, so a sidecar is only ever next to a complete vector.

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
    parent = os.path.dirname(data_path)
    if parent:
        files.makedirs(parent)
    buffer = io.BytesIO()
    np.save(buffer, probs, allow_pickle=False)
    files.write_bytes(data_path, buffer.getvalue())
    files.write_text(meta_path, text + "\n")
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
    if not files.exists(data_path):
        raise FileNotFoundError(
            f"load_marginal: no word marginal at {data_path}; create it with "
            "count_token_frequencies -> smooth_frequencies -> save_marginal, or let a run count "
            "it (config.word_marginal.source='frequency')."
        )
    if not files.exists(meta_path):
        raise FileNotFoundError(
            f"load_marginal: {data_path} has no JSON sidecar {meta_path}; "
            "save it with save_marginal."
        )
    probs = np.load(io.BytesIO(files.read_bytes(data_path)), allow_pickle=False)
    meta = json.loads(files.read_text(meta_path))
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


def tokenizer_identity(tokenizer: Any, name: str = "") -> dict[str, Any]:
    """What fixes a tokenizer's ids: {'name' (for people), 'class', 'sha256', 'size'}.

    sha256 hashes a fast tokenizer's whole definition (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens: ``backend_tokenizer.to_str()`` without its truncation / padding
    state), else its ``get_vocab()``; so one tokenizer loaded from two folders has one identity
    and two that share a name but not their ids do not.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"name": str(name), "class": type(tokenizer).__name__,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "size": len(tokenizer)}


def marginal_key(dataset: Mapping[str, Any], tokenizer: Mapping[str, Any], vocab_size: int,
                 alpha: float, power: float) -> dict[str, Any]:
    """The key a saved frequency marginal is found by: the captions (dataset name, split, path,
    number of captions), the tokenizer's ids (``tokenizer_identity``'s sha256), the vocabulary
    size, the smoothing and how each caption is tokenised. Labels and names for people are not
    part of it."""
    return {"format": _FORMAT,
            "dataset": {k: dataset.get(k, "") for k in ("name", "split", "path", "num_texts")},
            "tokenizer_sha256": tokenizer["sha256"], "vocab_size": int(vocab_size),
            "smoothing": {"alpha": float(alpha), "power": float(power)},
            "text": "' ' + caption, no special tokens"}


def default_cache_dir() -> str:
    """Where frequency marginals are kept when config.word_marginal.cache_dir is '':
    $XDG_CACHE_HOME/lqae_vlap/word_marginals (~/.cache/lqae_vlap/word_marginals)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lqae_vlap", "word_marginals")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-")[:48] or "x"


def marginal_path(cache_dir: str, key: Mapping[str, Any], tokenizer_name: str) -> str:
    """``cache_dir/<data>-<split>-<tokenizer>-v<V>-<hash of the key>.npy`` (a readable name,
    the hash makes it unique)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    d = key["dataset"]
    name = (f"{_slug(d['name'])}-{_slug(d['split'])}-"
            f"{_slug(os.path.basename(str(tokenizer_name).rstrip('/')))}-v{key['vocab_size']}-"
            f"{digest}.npy")
    return files.join(cache_dir or default_cache_dir(), name)


def _describe(dataset: Mapping[str, Any], tokenizer_label: str, vocab_size: int) -> str:
    label = dataset.get("label") or f"{dataset.get('name', '?')} {dataset.get('split', '')}"
    return f"{label.strip()}, {tokenizer_label}, {int(vocab_size):,} words"


def _count(captions: Callable[[], Sequence[str] | None] | None, tokenizer: Any, vocab_size: int,
           alpha: float, power: float, source: str) -> tuple[np.ndarray, int, float]:
    texts = captions() if captions is not None else None
    if texts is None:
        raise ValueError(f"config.word_marginal.source={source!r} counts the training captions, "
                         f"but the training data lists none; {_HOW_TO}")
    start = time.perf_counter()
    # Each caption after a space, as it follows the prompt in training (data/captions.py).
    counts = count_token_frequencies((" " + c for c in texts), tokenizer, vocab_size)
    return smooth_frequencies(counts, alpha=alpha, power=power), len(texts), \
        time.perf_counter() - start


def word_marginal(source: str, vocab_size: int, *, tokenizer: Any = None,
                  captions: Callable[[], Sequence[str] | None] | Sequence[str] | None = None,
                  dataset: Mapping[str, Any] | None = None, tokenizer_name: str = "",
                  tokenizer_label: str = "", cache_dir: str = "", alpha: float = 1.0,
                  power: float = 1.0, write: bool = True) -> tuple[np.ndarray, str]:
    """The Sinkhorn word marginal [V] float32 of ``config.word_marginal`` and one line saying
    where it came from ("CC3M train, OPT tokenizer (facebook/opt-1.3b), 50,272 words, ...").

    Args:
      source: 'frequency', 'count', 'uniform' or the path of a marginal saved by
        ``save_marginal`` (module docstring).
      vocab_size: V, the LLM's embedding rows.
      tokenizer: the LLM's tokenizer ('frequency' / 'count').
      captions: the training captions, or a function returning them (None when the data cannot
        list them); called only when they must be counted.
      dataset: {'name', 'split', 'path', 'num_texts', 'label'} of the training captions (the key;
        'label' only names them in the line).
      tokenizer_name, tokenizer_label: the tokenizer's name or path (recorded), and how the line
        names it ("OPT tokenizer (facebook/opt-1.3b)").
      cache_dir: where 'frequency' keeps its files ('' = ``default_cache_dir()``).
      alpha, power: ``smooth_frequencies``' smoothing.
      write: save a newly counted marginal (False on every process but one).
    """
    source, vocab_size, dataset = str(source), int(vocab_size), dict(dataset or {})
    if not callable(captions):
        listed = captions
        captions = lambda: listed  # noqa: E731
    label = tokenizer_label or f"tokenizer {tokenizer_name}"
    if source == "uniform":
        return (np.full((vocab_size,), 1.0 / vocab_size, np.float32),
                f"uniform over {vocab_size:,} words (asked for: word_marginal.source='uniform')")
    if source == "count":
        probs, n, secs = _count(captions, tokenizer, vocab_size, alpha, power, source)
        return probs.astype(np.float32), (
            f"{_describe(dataset, label, vocab_size)}, counted over {n:,} captions in {secs:.1f} s "
            "(not saved: word_marginal.source='count')")
    if source == "frequency":
        ident = tokenizer_identity(tokenizer, tokenizer_name)
        key = marginal_key(dataset, ident, vocab_size, alpha, power)
        path = marginal_path(cache_dir, key, tokenizer_name)
        what = _describe(dataset, label, vocab_size)
        if files.exists(path) and files.exists(os.path.splitext(path)[0] + ".json"):
            try:
                probs, meta = load_marginal(path, vocab_size=vocab_size)
            except (ValueError, OSError):  # unreadable: counted again and rewritten below
                meta = {}
            if meta.get("key") == key:
                return probs.astype(np.float32), (
                    f"{what}, loaded from {path} (counted {meta.get('counted_at', '?')})")
        probs, n, secs = _count(captions, tokenizer, vocab_size, alpha, power, source)
        where = f"process 0 saves it at {path}"
        if write:
            meta = {"key": key, "dataset": {**dataset, "num_texts": n}, "tokenizer": ident,
                    "num_texts": n, "smoothing": key["smoothing"], "seconds": round(secs, 2),
                    "counted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                where = f"saved at {save_marginal(path, probs, meta)}"
            except OSError as e:  # an unwritable cache costs a recount next time, not the run
                where = (f"NOT saved at {path} ({e}); set --config.word_marginal.cache_dir to a "
                         "writable folder to keep it")
        return probs.astype(np.float32), (
            f"{what}, counted over {n:,} captions in {secs:.1f} s, {where}")
    if not (source.endswith(".npy") or os.sep in source or "://" in source):
        raise ValueError(f"config.word_marginal.source={source!r} is not known; use one of "
                         f"{SOURCES}")
    probs, meta = load_marginal(source, vocab_size=vocab_size)
    ds, tok = meta.get("dataset"), meta.get("tokenizer")
    ds = ds.get("label") or ds.get("name") if isinstance(ds, dict) else ds
    tok = tok.get("name") if isinstance(tok, dict) else tok
    return probs.astype(np.float32), (
        f"{ds}, tokenizer {tok}, {vocab_size:,} words, loaded from {source}")
