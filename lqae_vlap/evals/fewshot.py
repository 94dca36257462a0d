"""LQAE's N-way K-shot image classification: each image is written as its words, then classified.

LQAE quantizes an image into N word ids of a frozen BERT-family LM. This file evaluates those ids:
  * episodes: ``sample_episodes`` draws N classes, K support and Q query images per class;
  * LLM route (the paper's): ``image_text`` -> ``build_prompt`` ("Input: <words>, output: <class>"
    lines, then the query) -> ``score_classes``, the teacher-forced log-likelihood of each class
    name after the prompt under a causal LM of our zoo (``causal_lm_logprob_fn``);
  * prototype route (no causal LM): ``encoder_features`` (mean-pooled hidden states of the frozen
    encoder LM over the image's words) -> ``prototype_classify`` (nearest class mean by cosine);
  * ``run_fewshot``: accuracy over episodes with a 95% t-interval, plus a shuffled control in which
    every image carries another random image's words. If the words carry the image's content the
    control falls to chance; if it does not, the protocol leaks labels some other way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqae_vlap.evals.arrays import pad_rows, unit_rows
from lqae_vlap.evals.stats import chance_level, mean_confidence_interval
from lqae_vlap.ops import losses

LogprobFn = Callable[[np.ndarray, np.ndarray], Any]  # (ids [B, L], mask [B, L]) -> [B, L, V]
LMScorer = Callable[[str, Sequence[str]], np.ndarray]  # (prompt, class names) -> [n_way]


@dataclasses.dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode; all indices point into the dataset's label array.

    classes:       [n_way] dataset labels, in the episode's (shuffled) order; episode label i
                   means classes[i].
    support:       [n_way, k_shot] image indices, row i from classes[i].
    query:         [n_way * n_query] image indices, shuffled.
    query_labels:  [n_way * n_query] episode labels (0..n_way-1) of the queries.
    """
    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


def sample_episodes(labels: Sequence[int] | np.ndarray, n_way: int, k_shot: int, n_query: int,
                    num_episodes: int, seed: int) -> list[Episode]:
    """Draws episodes deterministically from ``seed``; support and query never share an image.

    labels: [N] int class of every image. Each class used must have >= k_shot + n_query images.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype "
                         f"{labels.dtype}; map class names to ids first")
    for name, v, lo in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1),
                        ("num_episodes", num_episodes, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v}")
    need = k_shot + n_query
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= need]
    if len(eligible) < n_way:
        raise ValueError(f"only {len(eligible)} classes have >= k_shot + n_query = {need} images, "
                         f"but n_way={n_way}; lower n_way, k_shot or n_query")
    members = {int(c): np.flatnonzero(labels == c) for c in eligible}
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(num_episodes):
        chosen = rng.choice(eligible, size=n_way, replace=False)  # random order = episode order
        support, query, qlab = [], [], []
        for i, c in enumerate(chosen):
            picked = rng.choice(members[int(c)], size=need, replace=False)
            support.append(picked[:k_shot])
            query.append(picked[k_shot:])
            qlab.append(np.full(n_query, i))
        order = rng.permutation(n_way * n_query)
        episodes.append(Episode(classes=chosen, support=np.stack(support),
                                query=np.concatenate(query)[order],
                                query_labels=np.concatenate(qlab)[order]))
    return episodes


def image_text(token_ids: Sequence[int] | np.ndarray, tokenizer: Any, mode: str = "decode") -> str:
    """The image's words as a string, special tokens ([CLS], <s>, <mask>, [PAD], ...) removed.

    token_ids: [N] ids of the encoder LM's vocabulary (the quantizer's indices).
    mode='decode': ``tokenizer.decode`` (word pieces merged: "##ing" joins its word, RoBERTa's "Ġ"
      becomes a space), the readable form. mode='tokens': ``convert_ids_to_tokens`` joined by single
      spaces, one entry per code, so the prompt shows exactly N pieces per image.
    """
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    ids = [int(i) for i in np.asarray(token_ids).ravel() if int(i) not in special]
    if mode == "decode":
        return tokenizer.decode(ids, skip_special_tokens=True,
                                clean_up_tokenization_spaces=False).strip()
    if mode == "tokens":
        return " ".join(tokenizer.convert_ids_to_tokens(ids))
    raise ValueError(f"image_text: mode must be 'decode' or 'tokens', got {mode!r}")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """LQAE's prompt format; ``example`` gets {text} and {label}, ``query`` gets {text}."""
    example: str = "Input: {text}, output: {label}"
    query: str = "Input: {text}, output:"
    separator: str = "\n"
    header: str = ""


def support_shots(support_texts_by_class: Sequence[Sequence[str]], names: Sequence[str],
                  caller: str) -> int:
    """K, the support texts per class of a [n_way][k_shot] prompt table with one name per row;
    a ragged, empty or mis-sized table is refused naming ``caller``."""
    if len(support_texts_by_class) != len(names):
        raise ValueError(f"{caller}: {len(support_texts_by_class)} support rows for "
                         f"{len(names)} class names; pass one row of texts per class")
    shots = {len(row) for row in support_texts_by_class}
    if len(shots) != 1 or 0 in shots:
        raise ValueError(f"{caller}: every class needs the same number (>= 1) of support "
                         f"texts, got {sorted(shots)}")
    return shots.pop()


def build_prompt(support_texts_by_class: Sequence[Sequence[str]], class_names: Sequence[str],
                 query_text: str, template: PromptTemplate = PromptTemplate()) -> str:
    """The few-shot prompt: one example line per support image, then the query line.

    support_texts_by_class: [n_way][k_shot] texts; row i belongs to class_names[i]. Examples are
    interleaved shot by shot (class 0 shot 0, class 1 shot 0, ..., class 0 shot 1, ...), so no class
    owns all the lines nearest the query.
    """
    k_shot = support_shots(support_texts_by_class, class_names, "build_prompt")
    lines = [template.header] if template.header else []
    for k in range(k_shot):
        for row, name in zip(support_texts_by_class, class_names):
            lines.append(template.example.format(text=row[k], label=name))
    lines.append(template.query.format(text=query_text))
    return template.separator.join(lines)


def score_classes(logprob_fn: LogprobFn, prompt_ids: Sequence[int], class_ids_list:
                  Sequence[Sequence[int]], pad_id: int = 0, pad_multiple: int = 16) -> np.ndarray:
    """Teacher-forced log P(class name | prompt) for every class, in one padded batch.

    prompt_ids: [P] ids of the prompt. class_ids_list: [C][T_c] ids of each class name's tokens as
    they follow the prompt (tokenize " name" for BPE vocabularies). Rows are right-padded (with
    pad_id, masked out) to a multiple of pad_multiple, so a jitted logprob_fn compiles for few
    lengths; right padding never changes a causal LM's outputs at earlier positions.
    Returns [C] float64: sum over j of log p(class[j] | prompt, class[:j]).
    """
    prompt = [int(i) for i in prompt_ids]
    classes = [[int(i) for i in c] for c in class_ids_list]
    if not prompt or not classes or any(len(c) == 0 for c in classes):
        raise ValueError("score_classes needs a non-empty prompt and >= 1 token per class name")
    rows = [prompt + c for c in classes]
    length = -(-max(map(len, rows)) // pad_multiple) * pad_multiple
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    logp = np.asarray(logprob_fn(ids, mask), dtype=np.float64)  # [C, L, V]
    p = len(prompt)
    scores = np.empty(len(classes))
    for r, c in enumerate(classes):
        # Token c[j] sits at position p + j and is predicted from position p + j - 1.
        pos = np.arange(p - 1, p - 1 + len(c))
        scores[r] = logp[r, pos, np.asarray(c)].sum()
    return scores


def causal_lm_logprob_fn(module: Any, variables: Any) -> LogprobFn:
    """A jitted (ids [B, L], mask [B, L]) -> log-softmax [B, L, V] for our causal LMs.

    module: e.g. ``lqae_vlap.models.llama.LlamaForCausalLM`` (anything whose
    ``apply(variables, ids, attention_mask=mask)`` returns dict(logits=[B, L, V])).
    """
    @jax.jit
    def fn(ids, mask):
        logits = module.apply(variables, ids, attention_mask=mask)["logits"]
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    return lambda ids, mask: fn(jnp.asarray(ids), jnp.asarray(mask))


def make_lm_scorer(tokenizer: Any, logprob_fn: LogprobFn, class_prefix: str = " ",
                   pad_id: int | None = None, pad_multiple: int = 128) -> LMScorer:
    """(prompt, class_names) -> [n_way] log-likelihood scores, with the causal LM's tokenizer.

    The prompt is tokenized with the tokenizer's own special tokens (e.g. Llama's <s>); each class
    name is tokenized as ``class_prefix + name`` without special tokens, since it continues the
    prompt ("output:" is followed by " dog").
    """
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def scorer(prompt: str, class_names: Sequence[str]) -> np.ndarray:
        prompt_ids = tokenizer(prompt)["input_ids"]
        class_ids = [tokenizer(class_prefix + n, add_special_tokens=False)["input_ids"]
                     for n in class_names]
        # Few compiled shapes: prompts of 1-5 shots vary by hundreds of tokens.
        return score_classes(logprob_fn, prompt_ids, class_ids, pad_id=pad_id,
                             pad_multiple=pad_multiple)

    return scorer


def prototype_classify(support_features: np.ndarray, support_labels: Sequence[int] | np.ndarray,
                       query_features: np.ndarray) -> np.ndarray:
    """Nearest class mean by cosine similarity.

    support_features: [S, D]; support_labels: [S]; query_features: [Q, D]. Each class mean is taken
    over L2-normalised support features. Returns [Q] predicted labels (values of support_labels).
    """
    s = np.asarray(support_features, np.float64)
    q = np.asarray(query_features, np.float64)
    y = np.asarray(support_labels)
    if s.ndim != 2 or q.ndim != 2 or s.shape[1] != q.shape[1] or y.shape != (s.shape[0],):
        raise ValueError(f"prototype_classify expects support [S, D], labels [S], query [Q, D]; "
                         f"got {s.shape}, {y.shape}, {q.shape}")
    classes = np.unique(y)
    protos = unit_rows(np.stack([unit_rows(s[y == c]).mean(axis=0) for c in classes]))
    return classes[np.argmax(unit_rows(q) @ protos.T, axis=1)]


@functools.lru_cache(maxsize=8)
def _pooled_hidden_fn(lm_module: Any, layer: int) -> Callable:
    """Jitted (params, ids [B, T], mask [B, T]) -> masked mean of one layer's states [B, D].

    Cached per (module, layer) (linen modules hash by their config), so calls reuse compilations.
    """
    @jax.jit
    def pooled(params, ids, mask):
        positions = jnp.arange(ids.shape[1], dtype=jnp.int32) + lm_module.config.position_offset
        out = lm_module.apply(params, ids, attention_mask=mask, position_ids=positions,
                              with_lm_head=False, output_hidden_states=layer != -1)
        h = (out["last_hidden_state"] if layer == -1 else out["hidden_states"][layer])
        return losses.masked_mean(h, mask)

    return pooled


def encoder_features(lm_module: Any, lm_params: Any, token_ids: np.ndarray, layer: int = -1,
                     attention_mask: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
    """Mean-pooled hidden states of the frozen encoder LM over each image's words.

    lm_module: ``lqae_vlap.models.roberta.MaskedLM``; lm_params: its variables ({'params': ...}).
    token_ids: [N, T] the images' word ids, fed as they are (no [CLS]/<s> added), with positions
    position_offset + 0..T-1 as in LQAE's training, where the words enter as embeddings.
    layer: which hidden state, indexed as transformers' ``hidden_states``: 0 = the embedding
      output, i = after layer i, -1 = the last layer (negative indices count from the end).
    attention_mask: optional [N, T], 1 = real word; padding is left out of the mean.
    Returns [N, D] float32. Batches of batch_size share one compiled function (the last is padded).
    """
    num_states = lm_module.config.num_hidden_layers + 1
    if not -num_states <= layer < num_states:
        raise ValueError(f"encoder_features: layer={layer} is out of range; the LM has "
                         f"{num_states} hidden states (0 = embeddings .. {num_states - 1} = last)")
    layer = -1 if layer % num_states == num_states - 1 else layer % num_states
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"encoder_features: token_ids must be [N, T] integers, got {ids.shape} "
                         f"{ids.dtype}")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"encoder_features: attention_mask {mask.shape} != token_ids {ids.shape}")
    pooled = _pooled_hidden_fn(lm_module, layer)
    n = len(ids)
    bs = min(batch_size, n)
    out = []
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        i, m = pad_rows(ids[start:stop], bs), pad_rows(mask[start:stop], bs)
        h = pooled(lm_params, jnp.asarray(i, jnp.int32), jnp.asarray(m, jnp.int32))
        out.append(np.asarray(h)[:stop - start])
    return np.concatenate(out).astype(np.float32)


def _episode_accuracy(ep: Episode, class_names: Sequence[str], features: np.ndarray | None,
                      texts: Sequence[str] | None, lm_scorer: LMScorer | None,
                      template: PromptTemplate) -> float:
    if features is not None:
        s_lab = np.repeat(np.arange(len(ep.classes)), ep.support.shape[1])
        pred = prototype_classify(features[ep.support.ravel()], s_lab, features[ep.query])
    else:
        names = [class_names[int(c)] for c in ep.classes]
        support = [[texts[int(i)] for i in row] for row in ep.support]
        pred = np.array([int(np.argmax(lm_scorer(build_prompt(support, names, texts[int(q)],
                                                               template), names)))
                         for q in ep.query])
    return float(np.mean(pred == ep.query_labels))


def run_fewshot(labels: Sequence[int] | np.ndarray, class_names: Sequence[str], *, n_way: int,
                k_shot: int, n_query: int = 1, num_episodes: int = 100, seed: int = 0,
                features: np.ndarray | None = None, texts: Sequence[str] | None = None,
                lm_scorer: LMScorer | None = None,
                template: PromptTemplate = PromptTemplate()) -> dict[str, float]:
    """N-way K-shot accuracy over episodes, and the shuffled-words control on the same episodes.

    labels: [N] class ids indexing class_names. Give exactly one representation per image:
      features: [N, D] (prototype route, e.g. from ``encoder_features``), or
      texts: [N] strings (``image_text``) with lm_scorer (``make_lm_scorer``), the LLM route.
    The control permutes the representations across all N images (seed-derived permutation), so
    each image carries another random image's words in both support and query.

    Returns dict(accuracy, ci95, chance, shuffled_accuracy, shuffled_ci95, num_episodes); ci95 is
    the half-width of the 95% Student-t interval over episodes.
    """
    labels = np.asarray(labels)
    if (features is None) == (texts is None):
        raise ValueError("run_fewshot: pass exactly one of features [N, D] (prototype) or texts "
                         "[N] with lm_scorer (LLM prompting)")
    if texts is not None and lm_scorer is None:
        raise ValueError("run_fewshot: texts need lm_scorer (build one with make_lm_scorer)")
    rep = np.asarray(features) if features is not None else list(texts)
    if len(rep) != len(labels):
        raise ValueError(f"run_fewshot: {len(rep)} representations for {len(labels)} labels")
    if labels.size and labels.max() >= len(class_names):
        raise ValueError(f"run_fewshot: label {labels.max()} has no entry in the "
                         f"{len(class_names)} class_names")
    episodes = sample_episodes(labels, n_way, k_shot, n_query, num_episodes, seed)
    perm = np.random.default_rng([seed, 1]).permutation(len(labels))
    shuffled = rep[perm] if features is not None else [rep[i] for i in perm]

    def evaluate(r):
        f, t = (r, None) if features is not None else (None, r)
        return [_episode_accuracy(ep, class_names, f, t, lm_scorer, template) for ep in episodes]

    acc, ci = mean_confidence_interval(evaluate(rep))
    sacc, sci = mean_confidence_interval(evaluate(shuffled))
    return {"accuracy": acc, "ci95": ci, "chance": chance_level(n_way), "shuffled_accuracy": sacc,
            "shuffled_ci95": sci, "num_episodes": float(num_episodes)}
