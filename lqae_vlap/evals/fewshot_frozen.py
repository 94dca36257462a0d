"""Frozen's few-shot protocol (Tsimpoukelli et al., NeurIPS 2021, arXiv 2106.13884) on LQAE's words.

Frozen puts each image in a causal LM's prompt as embeddings; LQAE writes each image as words, so
here every image is its words (``fewshot.image_text``) and the LM reads plain text. Per episode
(``fewshot.sample_episodes``: N classes, K "inner shots" and Q queries per class):

  * names: 'nonsense' (Open-Ended miniImageNet): the episode's classes get nonsense words drawn
    per episode from a seeded rng (``NONSENSE_WORDS``); 'real' (Real-Name miniImageNet): their
    true names (the dataset's ``class_names``);
  * prompt (``build_frozen_prompt``): optionally Frozen's task induction sentence ("Answer with
    dax or blicket."), then every support image as "<words> This is a <name>." (shot by shot,
    classes interleaved, the whole block 1 + ``repeats`` times), then the query "<words> Q: What is
    this? A: This is a";
  * answer: the LM GENERATES greedily (``max_new_tokens``) after the query, scored by
    ``exact_match`` after ``normalize_answer``; beside it, the log-likelihood ranking of the
    episode's names after the same prompt (``fewshot.make_lm_scorer``), a second score;
  * long prompts (``prompt_policy``): 'error' stops with the prompt's length, 'truncate_words'
    keeps n evenly spaced words of each image (``subsample_codes``), n = floor((context -
    overhead) / images), lowered until every prompt of the cell fits (``fit_words_per_image``).

Repeats follow Frozen's convention: ``repeats`` = how many EXTRA times the support block is
written (0 = each support image shown once), as a reproduction of Frozen's Open-Ended
miniImageNet reads its Table 3 (secondary source; the paper itself was not readable here). Frozen
scores an answer only when the model generates exactly the name and then ends; ``exact_match``
here is a little more lenient: the first words of the generation (as many as the name has) must
equal the name, so " dax. dax" counts. The templates and the nonsense words beyond
"dax"/"blicket" are to verify against the paper (arXiv 2106.13884, its Fig. 4 / Table 3 text);
Frozen's benchmark also ships fixed episodes (``<task>_<shots>_<ways>_all_questions.json``,
fh295.github.io/frozen.html) that this module does not read: its episodes are sampled, seeded.
Nothing here imports a model: generation, token counting and likelihood scoring are passed in.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lqae_vlap.evals.fewshot import Episode, LMScorer, sample_episodes, support_shots
from lqae_vlap.evals.stats import chance_level, mean_confidence_interval

# (prompts [B], max_new_tokens) -> [B] generated texts (the continuation only, greedy).
GenerateFn = Callable[[Sequence[str], int], Sequence[str]]
CountFn = Callable[[str], int]  # prompt -> its length in the LM's tokens (special tokens included)
TextFn = Callable[[np.ndarray], str]  # one image's word ids [n] -> its text (fewshot.image_text)

# "dax" and "blicket" are the two nonsense names Frozen's figure shows (as quoted in the issue);
# the rest are our choice of nonce words from child word-learning studies ("wug": Berko 1958;
# "toma": Baldwin 1993; "modi", "fep", "zav", "tufa", "gazzer", "kiki": same literature). Frozen's
# own list is to verify against the paper. Each is one lowercase word, none a prefix of another.
NONSENSE_WORDS: tuple[str, ...] = ("dax", "blicket", "wug", "toma", "fep", "zav", "modi", "tufa",
                                   "gazzer", "kiki")
NAMES_MODES = ("nonsense", "real")
PROMPT_POLICIES = ("truncate_words", "error")
PROTOCOL_NAMES = {"nonsense": "frozen_open_ended", "real": "frozen_real_name"}


@dataclasses.dataclass(frozen=True)
class FrozenTemplate:
    """Frozen's prompt pieces; ``example`` gets {text} and {label}, ``query`` {text},
    ``task_induction`` {names} (``join_names``)."""
    task_induction: str = "Answer with {names}."
    example: str = "{text} This is a {label}."
    query: str = "{text} Q: What is this? A: This is a"
    separator: str = "\n"


def join_names(names: Sequence[str]) -> str:
    """'dax' | 'dax or blicket' | 'dax, blicket or wug': the names as the induction lists them."""
    names = list(names)
    if len(names) < 2:
        return "".join(names)
    return ", ".join(names[:-1]) + " or " + names[-1]


def build_frozen_prompt(support_texts_by_class: Sequence[Sequence[str]], names: Sequence[str],
                        query_text: str, *, repeats: int = 0, task_induction: bool = True,
                        template: FrozenTemplate = FrozenTemplate()) -> str:
    """The prompt of one query: [induction] support lines (x (1 + repeats)), the query line.

    support_texts_by_class: [n_way][k_shot] texts; row i is named names[i]. Lines go shot by shot
    (class 0 shot 0, class 1 shot 0, ..., class 0 shot 1, ...) and the whole block is written
    1 + ``repeats`` times, so n_way * k_shot * (1 + repeats) support images precede the query.
    """
    k_shot = support_shots(support_texts_by_class, names, "build_frozen_prompt")
    if int(repeats) != repeats or repeats < 0:
        raise ValueError(f"build_frozen_prompt: repeats (extra copies of the support block, 0 = "
                         f"shown once) must be an integer >= 0, got {repeats}")
    lines = [template.task_induction.format(names=join_names(names))] if task_induction else []
    block = [template.example.format(text=row[k], label=name)
             for k in range(k_shot) for row, name in zip(support_texts_by_class, names)]
    lines += block * (1 + int(repeats))
    lines.append(template.query.format(text=query_text))
    return template.separator.join(lines)


def normalize_answer(text: str) -> list[str]:
    """The words of an answer as exact match compares them: lowercased, every character that is
    not a letter or digit (punctuation, '_', '-', apostrophes) made a space, split on whitespace.

    ' Dax.' -> ['dax']; 'golden_retriever' -> ['golden', 'retriever']; "jack-o'-lantern" ->
    ['jack', 'o', 'lantern'].
    """
    return re.sub(r"[\W_]+", " ", str(text).lower()).split()


def exact_match(generated: str, answer: str) -> bool:
    """Whether the first len(answer) normalised words of ``generated`` equal the normalised
    ``answer``: ' dax. Q: What' matches 'dax'; ' daxes' and ' blicket' do not; an answer that
    normalises to no word never matches."""
    want = normalize_answer(answer)
    return bool(want) and normalize_answer(generated)[:len(want)] == want


def episode_names(classes: np.ndarray, class_names: Sequence[str], mode: str,
                  rng: np.random.Generator, nonsense_words: Sequence[str] = NONSENSE_WORDS
                  ) -> list[str]:
    """The name of each of the episode's classes, in episode order: their true names ('real'), or
    distinct nonsense words drawn from ``rng`` ('nonsense'), so a name carries no class prior."""
    if mode == "real":
        return [str(class_names[int(c)]) for c in classes]
    if mode != "nonsense":
        raise ValueError(f"names must be one of {NAMES_MODES}, got {mode!r}")
    if len(classes) > len(nonsense_words):
        raise ValueError(f"{len(classes)}-way episodes need {len(classes)} nonsense names but the "
                         f"list has {len(nonsense_words)}; lower ways or pass more words")
    return [str(w) for w in rng.choice(np.asarray(nonsense_words, dtype=object), len(classes),
                                       replace=False)]


def subsample_codes(token_ids: np.ndarray, n: int) -> np.ndarray:
    """n of an image's T word ids, evenly spaced in raster order (ids[floor(i * T / n)]), so a
    truncated image still covers all of its rows; n >= T returns all of them."""
    ids = np.asarray(token_ids)
    t = ids.shape[-1]
    if n >= t:
        return ids
    return ids[..., (np.arange(n) * t) // n]


@dataclasses.dataclass(frozen=True)
class _Query:
    prompt: str
    answer_index: int  # episode label of the query


def _episode_queries(ep: Episode, names: Sequence[str], texts: Callable[[int], str], *,
                     repeats: int, task_induction: bool, template: FrozenTemplate) -> list[_Query]:
    support = [[texts(int(i)) for i in row] for row in ep.support]
    return [_Query(build_frozen_prompt(support, names, texts(int(q)), repeats=repeats,
                                       task_induction=task_induction, template=template), int(y))
            for q, y in zip(ep.query, ep.query_labels)]


def fit_words_per_image(full_words: int, num_images: int, limit: int,
                        prompt_lengths: Callable[[int], Sequence[int]], policy: str
                        ) -> tuple[int, list[int]]:
    """The words per image n under which every prompt is at most ``limit`` tokens.

    full_words: T, the words of an image. num_images: images per prompt. limit: the tokens a
    prompt may hold (context minus what the answer needs). prompt_lengths(n): the token length of
    every prompt with n words per image (n = 0: the overhead, the prompt without any image words).
    policy 'error': n = T or a ValueError; 'truncate_words': n = T when that fits, else first
    floor((limit - overhead) / num_images) (overhead = the longest prompt at n = 0), lowered in
    proportion to the excess (by >= 1) until every prompt fits.
    Returns (n, the prompt lengths at n).
    """
    if policy not in PROMPT_POLICIES:
        raise ValueError(f"prompt_policy must be one of {PROMPT_POLICIES}, got {policy!r}")
    lengths = list(prompt_lengths(full_words))
    if max(lengths) <= limit:
        return full_words, lengths
    if policy == "error":
        raise ValueError(f"a prompt of {max(lengths)} tokens ({num_images} images of {full_words} "
                         f"words) exceeds the {limit} the LLM's context leaves; set prompt_policy"
                         "='truncate_words', or lower ways, inner_shots or repeats")
    overhead = max(prompt_lengths(0))
    n = min(full_words - 1, (limit - overhead) // num_images)
    while n >= 1:
        lengths = list(prompt_lengths(n))
        longest = max(lengths)
        if longest <= limit:
            return n, lengths
        n = min(n - 1, (n * (limit - overhead)) // (longest - overhead))
    raise ValueError(f"{num_images} images do not fit the {limit} prompt tokens the LLM's context "
                     f"leaves even at 1 word each (the prompt without words is {overhead} tokens); "
                     "lower ways, inner_shots or repeats, or use an LLM with a longer context")


def run_frozen_fewshot(labels: Sequence[int] | np.ndarray, class_names: Sequence[str],
                       token_ids: np.ndarray, text_fn: TextFn, *, generate_fn: GenerateFn,
                       count_tokens: CountFn, lm_scorer: LMScorer | None, context_length: int,
                       n_way: int, inner_shots: int, repeats: int = 0, n_query: int = 1,
                       num_episodes: int = 20, seed: int = 0, names: str = "nonsense",
                       task_induction: bool = True, max_new_tokens: int = 8,
                       prompt_policy: str = "truncate_words",
                       nonsense_words: Sequence[str] = NONSENSE_WORDS,
                       template: FrozenTemplate = FrozenTemplate(),
                       num_examples: int = 3) -> dict[str, Any]:
    """One (ways, inner shots) cell of Frozen's protocol.

    labels: [N] class ids indexing class_names. token_ids: [N, T] each image's word ids, written
    by text_fn (after ``subsample_codes`` when the prompt policy truncates). generate_fn,
    count_tokens: the causal LM's greedy continuation and token count; lm_scorer: the
    log-likelihood of each name after the prompt (None: no ranking score). context_length: the
    LM's positions (its config's max_position_embeddings); a prompt may take all but
    max(max_new_tokens, the longest name's tokens) of them.
    Names per episode come from default_rng([seed, 2]) in episode order, so a seed gives the same
    episodes (``sample_episodes(seed)``) and names every run.

    Returns dict(accuracy, ci95 (exact match of the generation), ranking_accuracy, ranking_ci95
    (argmax log-likelihood of the episode's names), chance, num_episodes, words_per_image
    (used), words_per_image_full, prompt_tokens_max, prompt_tokens_mean, examples: the first
    num_examples queries' answer, generation and match).
    """
    labels = np.asarray(labels)
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or len(ids) != len(labels):
        raise ValueError(f"run_frozen_fewshot: token_ids must be [N={len(labels)}, T], got "
                         f"{ids.shape}")
    if labels.size and labels.max() >= len(class_names):
        raise ValueError(f"run_frozen_fewshot: label {labels.max()} has no entry in the "
                         f"{len(class_names)} class_names")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    episodes = sample_episodes(labels, n_way, inner_shots, n_query, num_episodes, seed)
    name_rng = np.random.default_rng([seed, 2])
    ep_names = [episode_names(ep.classes, class_names, names, name_rng, nonsense_words)
                for ep in episodes]
    longest_name = max(count_tokens(n) for row in ep_names for n in row)
    limit = int(context_length) - max(int(max_new_tokens), longest_name)
    text_cache: dict[tuple[int, int], str] = {}

    def texts_at(n: int) -> Callable[[int], str]:
        def text(i: int) -> str:
            if n == 0:
                return ""
            if (i, n) not in text_cache:
                text_cache[(i, n)] = text_fn(subsample_codes(ids[i], n))
            return text_cache[(i, n)]
        return text

    def queries_at(n: int) -> list[list[_Query]]:
        return [_episode_queries(ep, nm, texts_at(n), repeats=repeats,
                                 task_induction=task_induction, template=template)
                for ep, nm in zip(episodes, ep_names)]

    def lengths_at(n: int) -> list[int]:
        return [count_tokens(q.prompt) for qs in queries_at(n) for q in qs]

    num_images = n_way * inner_shots * (1 + repeats) + 1
    words, lengths = fit_words_per_image(ids.shape[1], num_images, limit, lengths_at,
                                         prompt_policy)
    match_acc, rank_acc, examples = [], [], []
    for qs, nm in zip(queries_at(words), ep_names):
        generated = list(generate_fn([q.prompt for q in qs], int(max_new_tokens)))
        hits = [exact_match(g, nm[q.answer_index]) for g, q in zip(generated, qs)]
        match_acc.append(float(np.mean(hits)))
        if lm_scorer is not None:
            rank_acc.append(float(np.mean([int(np.argmax(lm_scorer(q.prompt, nm))) == q.answer_index
                                           for q in qs])))
        for g, q, h in zip(generated, qs, hits):
            if len(examples) < num_examples:
                examples.append({"answer": nm[q.answer_index], "generated": g, "match": h})
    acc, ci = mean_confidence_interval(match_acc)
    out: dict[str, Any] = {"accuracy": acc, "ci95": ci}
    if rank_acc:
        out["ranking_accuracy"], out["ranking_ci95"] = mean_confidence_interval(rank_acc)
    out.update(chance=chance_level(n_way), num_episodes=float(num_episodes),
               words_per_image=float(words), words_per_image_full=float(ids.shape[1]),
               prompt_tokens_max=float(max(lengths)), prompt_tokens_mean=float(np.mean(lengths)),
               examples=examples)
    return out


def check_protocol(fz: Mapping[str, Any]) -> None:
    """One clear ValueError for a bad ``config.eval.fewshot_frozen`` knob, at build time (before
    training, not after it)."""
    def ints(key: str, least: int, many: bool = False) -> None:
        values = list(fz[key]) if many else [fz[key]]
        if (many and not values) or any(isinstance(v, bool) or int(v) != v or v < least
                                        for v in values):
            raise ValueError(f"config.eval.fewshot_frozen.{key}={fz[key]!r}: must be "
                             f"{'a non-empty tuple of integers' if many else 'an integer'} >= "
                             f"{least}" + (" (extra copies of the support block, 0 = shown once)"
                                           if key == "repeats" else ""))
    if fz["names"] not in NAMES_MODES:
        raise ValueError(f"config.eval.fewshot_frozen.names={fz['names']!r} is not one of "
                         f"{NAMES_MODES}")
    if fz["prompt_policy"] not in PROMPT_POLICIES:
        raise ValueError(f"config.eval.fewshot_frozen.prompt_policy={fz['prompt_policy']!r} is not "
                         f"one of {PROMPT_POLICIES}")
    ints("ways", 2, many=True)
    ints("inner_shots", 1, many=True)
    ints("repeats", 0)
    for key in ("queries", "episodes", "max_new_tokens"):
        ints(key, 1)


def protocol(*, names: str, ways: Sequence[int], inner_shots: Sequence[int], repeats: int,
             queries: int, episodes: int, seed: int, task_induction: bool, max_new_tokens: int,
             prompt_policy: str, context_length: int, split: str,
             nonsense_words: Sequence[str] = NONSENSE_WORDS,
             template: FrozenTemplate = FrozenTemplate()) -> dict[str, Any]:
    """The protocol a result was measured under, as the eval JSON records it beside the scores."""
    if names not in NAMES_MODES:
        raise ValueError(f"names must be one of {NAMES_MODES}, got {names!r}")
    return {"name": PROTOCOL_NAMES[names], "reference": "Tsimpoukelli et al. 2021 (Frozen), "
            "arXiv 2106.13884", "names": names, "ways": list(ways),
            "inner_shots": list(inner_shots), "repeats": int(repeats),
            "queries_per_class": int(queries), "episodes": int(episodes), "seed": int(seed),
            "task_induction": bool(task_induction),
            "task_induction_template": template.task_induction if task_induction else "",
            "example_template": template.example, "query_template": template.query,
            "nonsense_words": list(nonsense_words) if names == "nonsense" else [],
            "max_new_tokens": int(max_new_tokens), "prompt_policy": prompt_policy,
            "context_length": int(context_length), "split": split,
            "scoring": "greedy generation after the query; exact match of its first len(answer) "
                       "words, lowercased, non-alphanumerics as spaces (normalize_answer); "
                       "ranking: argmax log-likelihood of the episode's names"}
