"""VLAP's evaluations on a checkpoint: the frozen LLM reads the projected images.

The evaluations follow evals/runner.py: each is a function ``fn(ctx, step, workdir) -> (result,
lines)`` over the ``Evaluator`` of the run (its jitted encoders, the frozen LLM, and the
representations of the held-out images, computed once per run and shared by retrieval and
arithmetic), listed in ``EVALS``; the named ones write ``eval_<name>_<step>.json``, print their
lines and return scalars (written to the metrics files under ``eval/<name>/...``). Each runs
every ``config.eval.<name>.every`` steps (``runner.cadence``):
  loss        held-out L_map, L_cap and the agreement of the two modalities' argmax words;
  captioning  zero-shot captions after [visual prefix ; prompt], greedy and beam search
              (``eval.captioning.num_beams``), scored with pycocoevalcap's COCO metrics (BLEU-4,
              METEOR, ROUGE-L, CIDEr-D; SPICE when its jars are present) against every reference
              caption of the image; the captions go to ``captions_<decoding>_<step>.txt``. On
              NoCaps (``eval.captioning.source='nocaps'``, data/nocaps.py) also per domain
              (in-domain, near-domain, out-domain), each domain scored as a corpus of its own, so
              its CIDEr-D document frequencies come from that domain's references alone: what
              NoCaps' official evaluation reports per domain; 'all' is the 4,500 images together;
  retrieval   image->text and text->image Recall@1/5/10 (evals/retrieval.py) beside chance, each
              similarity of ``eval.retrieval.similarities`` side by side; on Flickr30k / COCO
              (``eval.retrieval.source``, data/karpathy_splits.py) over the whole split;
  vqa         zero- or n-shot VQA (VQAv2, OK-VQA, or the digits stand-in; ``eval.vqa.source``):
              [visual prefix ; "Question: ... Answer:"] -> a short greedy answer, after
              ``eval.vqa.shots`` solved train examples [prefix_i ; "Question: q_i Answer: a_i"]
              (seeded per question by ``eval.vqa.shot_seed``), scored with VQAv2's soft accuracy
              and answer normalisation (evals/vqa.py);
  arithmetic  visual semantic arithmetic in the LLM's input-embedding space: the nearest words of
              a few images, and image - word(a) + word(b) -> nearest image (evals/arithmetic.py).
              Where the evaluation images come in exact pairs (digit scenes' validation / test:
              data/digit_scenes.arithmetic_pairs, the same scene with digit a made b) it scores
              Recall@``eval.arithmetic.ks`` of that one target among the other evaluated images,
              beside chance and the controls word(b) alone and the image alone; elsewhere, for
              ``eval.arithmetic.pairs``, whether the nearest image's caption names b.

Retrieval similarities (``eval.retrieval.similarities``, each reported). The image
representation (mean of the projected tokens, LLM input space) and the text representation (the
frozen LLM's mean-pooled last hidden states, or T5's encoder states) live in different spaces, and
L_map aligns them only through their scores against the word embeddings.
  'word_scores' compares the two [V] score profiles by cosine: with unit rows W of the word
      embeddings, s = W x_hat, so <s_v, s_t> = x_v^T (W^T W) x_t, computed exactly through the
      [D, D] Gram matrix (no [N, V] matrix is formed). Scales to COCO 5k.
  'embedding' is the plain cosine of the two representations.
  'caption_likelihood' scores a pair by the LLM's mean log-likelihood of the caption after
      [image prefix ; prompt] (what L_cap trains). One LLM pass per (image, caption) pair, so it
      is for galleries (N_img x N_txt <= ``max_pairs``), not for COCO 5k x 25k.
Which similarity the VLAP paper ranks by is not known here: the authors' public code has no
evaluation code and ../shared/reference/methods.md records only "Recall@1/5/10 both ways", so
configs/vlap_opt.py reports 'word_scores' (first: its pictures) and 'embedding' side by side and
the JSON names them; verify against the paper (arXiv 2404.09632) before comparing numbers with
its tables.

Galleries. Flickr30k 1k and COCO 5k (``eval.retrieval.source`` 'flickr30k' | 'coco'): one gallery
of every image of the split and every caption of each image as its own column (5,000 / 25,010
captions; ``retrieval.every_caption``), the papers' protocol; ``eval.retrieval.gallery_size``
does not apply to them. For the images of ``eval.source`` (source ''), gallery_size 0 is that same
one gallery; a positive size splits them into galleries (``evals.retrieval.galleries``) in which no
caption text repeats, as needed when several images share a caption, e.g. the demo's "a
handwritten digit seven": galleries of 10 hold one image per digit. Recall is averaged over
galleries and chance is computed for the same galleries. ``eval_retrieval_<step>.json`` records
the protocol: dataset, split, images, captions, gallery, similarities.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap.core import files
from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.data import captions as captions_lib
from lqae_vlap.data import digit_scenes
from lqae_vlap.data import vqa_source
from lqae_vlap.evals import arithmetic as arithmetic_lib
from lqae_vlap.evals import captioning as captioning_lib
from lqae_vlap.evals import pictures
from lqae_vlap.evals import retrieval as retrieval_lib
from lqae_vlap.evals import runner as eval_runner
from lqae_vlap.evals import vqa as vqa_lib
from lqae_vlap.evals.arrays import pad_rows, unit_rows
from lqae_vlap.evals.runner import Row, pct

SIMILARITIES = ("word_scores", "embedding", "caption_likelihood")
_CONSOLE_EXAMPLES = 3  # captions printed; the picture shows eval.captioning.num_show of them
_TOP_K = 5  # results per query in the retrieval pictures


class Evaluator:
    """The context VLAP's evaluations share; ``run(params, frozen, step, workdir) -> scalars``.

    Args:
      cfg: the run's config (reads ``cfg.eval``, ``cfg.model``).
      llm: the ``methods.vlap_llm.FrozenLLM`` (generation, text states, word embeddings).
      visual_map: the trainable ``VisualMap`` module.
      vision_fn: (frozen['vision'], images) -> vision tokens [B, T, Dv] (images after
        ``host_image``), used when examples carry 'image' rather than cached 'vision_features'.
      host_image: host-side image preprocessing (CLIP resize + crop) or None.
      sources: {'images': random-access eval images with 'caption' or 'references',
        'captioning' / 'retrieval' (optional; None or absent = 'images'): those evaluations' own
        datasets (NoCaps; Flickr30k / COCO Karpathy test), 'vqa': questions with 'image', 'question', 'question_id', 'answers' (optional)}.
      loss_batches / loss_fn: held-out batches and the training loss (for 'loss').
      mesh: the device mesh (results are gathered replicated).

    During ``run``, ``params`` and ``frozen`` are the evaluated weights and ``cache`` holds what
    several evaluations of that run share (``visual_reprs``); all three are None between runs.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, llm: Any, visual_map: Any,
                 vision_fn: Callable, host_image: Callable | None, sources: dict[str, Any],
                 loss_batches: Any, loss_fn: Callable, mesh: Any) -> None:
        e = cfg.eval
        eval_runner.check_names(e.evals, EVALS)
        if "retrieval" in e.evals:
            bad = [x for x in e.retrieval.similarities if x not in SIMILARITIES]
            if bad or not e.retrieval.similarities:
                raise ValueError(f"config.eval.retrieval.similarities={e.retrieval.similarities!r}"
                                 f": choose one or more of {SIMILARITIES}")
        if "vqa" in e.evals and sources.get("vqa") is None:
            raise ValueError("config.eval.evals has 'vqa' but no VQA source is configured; set "
                             "config.eval.vqa.source ('digits', or 'vqav2' / 'okvqa' with its "
                             "paths) or drop 'vqa' from config.eval.evals")
        if "vqa" in e.evals and int(e.vqa.get("shots", 0)) and sources.get("vqa_shots") is None:
            raise ValueError(f"config.eval.vqa.shots={e.vqa.shots} but no shot pool is configured "
                             "(config.eval.vqa.shot_questions / shot_annotations / "
                             "shot_image_dir); set them or shots=0")
        self.cfg, self.llm, self.sources = cfg, llm, sources
        self.host_image, self.loss_batches = host_image, loss_batches
        self.params = self.frozen = self.cache = None
        rep = sharding_lib.replicated(mesh)

        def encode(params, frozen, x, *, from_features: bool):
            feats = x if from_features else vision_fn(frozen["vision"], x)
            return visual_map.apply({"params": params}, feats)  # [B, T, D]

        self._encode = {f: jax.jit(functools.partial(encode, from_features=f), out_shardings=rep)
                        for f in (False, True)}

        self._text = jax.jit(lambda frozen, ids, mask: llm.text_repr(frozen["llm"], ids, mask),
                             out_shardings=rep)

        def caption_nll(frozen, prefix, ids, mask):
            """Per-row mean NLL of each caption after its own prefix: [B]."""
            one = lambda p, i, m: llm.caption_loss(  # noqa: E731
                frozen["llm"], p[None], frozen["prompt_ids"], i[None], m[None])
            return jax.vmap(one)(prefix, ids, mask)

        self._caption_nll = jax.jit(caption_nll, out_shardings=rep)
        self.loss_step = jax.jit(loss_fn, out_shardings=rep)

    # -- entry point ----------------------------------------------------------------------------

    def run(self, params, frozen, step: int, workdir: str,
            names: Sequence[str] | None = None) -> dict[str, float]:
        """Runs ``names`` (None: every one of ``config.eval.evals``) through ``runner.run``."""
        self.params, self.frozen, self.cache = params, frozen, {}
        try:
            banner = self._banner()
            if banner and jax.process_index() == 0:
                print(f"  {banner}", flush=True)
            names = self.cfg.eval.evals if names is None else names
            return eval_runner.run(EVALS, names, self, step, workdir)
        finally:
            self.params = self.frozen = self.cache = None

    def _banner(self) -> str | None:
        v = self.cfg.model.vision
        if v.kind == "standin":
            return ("note: the vision encoder is a STAND-IN (a fixed random projection of "
                    f"{v.patch_size}x{v.patch_size} pixel patches, never trained), not CLIP; the "
                    f"LLM ({self.cfg.model.llm_path.split('/')[-1]}) and the images are real")
        return None

    # -- what the evaluations share -------------------------------------------------------------

    def limit(self, source) -> int:
        """How many of ``source``'s examples to evaluate (``eval.max_images``, 0 = all)."""
        n = int(self.cfg.eval.get("max_images", 0)) or len(source)
        return min(n, len(source))

    def _inputs(self, examples: list[dict]) -> tuple[np.ndarray, bool]:
        if "vision_features" in examples[0]:
            return np.stack([np.asarray(x["vision_features"]) for x in examples]), True
        images = [x["image"] for x in examples]
        if self.host_image is not None:
            images = [self.host_image(im) for im in images]
        return np.stack([np.asarray(im, np.uint8) for im in images]), False

    def batches(self, source, n: int) -> Iterator[tuple[list[int], list[dict], jax.Array]]:
        """Yields (indices, examples, prefix [bs, T, D] device array) over source[:n]; the last
        batch is padded to ``eval.batch_size`` rows, so keep prefix[:len(indices)]."""
        bs = int(self.cfg.eval.batch_size)
        for start in range(0, n, bs):
            idx = list(range(start, min(start + bs, n)))
            examples = [source[i] for i in idx]
            x, from_features = self._inputs(examples)
            yield idx, examples, self._encode[from_features](self.params, self.frozen,
                                                             pad_rows(x, bs))

    def visual_reprs(self, source, n: int, *, keep_prefix: bool = False
                     ) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
        """Image representations [n, D] (mean of projected tokens), the examples, and (with
        keep_prefix) the prefixes [n, T, D]; computed once per ``run`` and shared."""
        key = (id(source), n)
        cached = self.cache.get(key)
        if cached is None or (keep_prefix and cached[2] is None):
            reprs, examples, prefixes = [], [], []
            for idx, ex, prefix in self.batches(source, n):
                reprs.append(np.asarray(jnp.mean(prefix.astype(jnp.float32), 1))[:len(idx)])
                if keep_prefix:
                    prefixes.append(np.asarray(prefix)[:len(idx)])
                examples.extend(ex)
            cached = self.cache[key] = (np.concatenate(reprs), examples,
                                        np.concatenate(prefixes) if keep_prefix else None)
        return cached

    def likelihood_sim(self, prefixes: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """prefixes [n_img, T, D] -> [n_img, n_txt] mean log-likelihood of each caption after
        each image's prefix."""
        bs, max_len = int(self.cfg.eval.batch_size), int(self.cfg.model.max_caption_len)
        ids, mask = captions_lib.tokenize_captions(self.llm.tokenizer, list(texts), max_len)
        # Every (image, caption) pair, image-major: [n_img * n_txt].
        img = np.repeat(np.arange(len(prefixes)), len(texts))
        txt = np.tile(np.arange(len(texts)), len(prefixes))
        out = np.empty(len(img), np.float64)
        for start in range(0, len(img), bs):
            ii, jj = pad_rows(img[start:start + bs], bs), pad_rows(txt[start:start + bs], bs)
            nll = np.asarray(self._caption_nll(self.frozen, prefixes[ii], ids[jj], mask[jj]))
            out[start:start + bs] = -nll[:len(out[start:start + bs])]
        return out.reshape(len(prefixes), len(texts))

    def text_reprs(self, texts: Sequence[str]) -> np.ndarray:
        """Text representations [len(texts), D] from the frozen LLM."""
        bs, max_len = int(self.cfg.eval.batch_size), int(self.cfg.model.max_caption_len)
        out = []
        for start in range(0, len(texts), bs):
            chunk = list(texts[start:start + bs])
            ids, mask = captions_lib.tokenize_captions(self.llm.tokenizer, chunk, max_len)
            out.append(np.asarray(self._text(self.frozen, pad_rows(ids, bs),
                                             pad_rows(mask, bs)))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def generate(self, prefix, prompts: list[list[int]], *, max_new_tokens: int,
                 num_beams: int = 1) -> list[str]:
        """Continuations of [prefix [B, T, D] ; prompts[b]] as B strings."""
        tokens = self.llm.generate(self.frozen["llm"], prefix, prompts,
                                   max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   length_penalty=float(self.cfg.eval.captioning.length_penalty))
        return self.llm.decode(tokens)

    def prefixes(self, source, indices: Sequence[int]) -> jax.Array:
        """Visual prefixes [len(indices), T, D] of source[i] for i in indices (repeats allowed),
        in batches of ``eval.batch_size``."""
        bs, out = int(self.cfg.eval.batch_size), []
        for start in range(0, len(indices), bs):
            chunk = [source[int(i)] for i in indices[start:start + bs]]
            x, from_features = self._inputs(chunk)
            out.append(self._encode[from_features](self.params, self.frozen,
                                                   pad_rows(x, bs))[:len(chunk)])
        return jnp.concatenate(out)

    def generate_interleaved(self, rows: list[list[Any]], *, max_new_tokens: int) -> list[str]:
        """Greedy continuations of interleaved rows (prefixes [T, D] and token-id lists; see
        methods/vlap_llm.FrozenLLM.embed_segments) as strings."""
        return self.llm.decode(self.llm.generate_interleaved(
            self.frozen["llm"], rows, max_new_tokens=max_new_tokens))

    def word_embeddings(self, dtype=None) -> np.ndarray:
        """The frozen LLM's input word embeddings [V, D] on the host (dtype None: the LLM's)."""
        return np.asarray(jax.device_get(self.llm.word_embeddings(self.frozen["llm"])), dtype)


# ----------------------------------------------------------------------------------------------
# The evaluations: fn(ctx, step, workdir) -> (result, lines), ctx an Evaluator inside ``run``.


def loss(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, Any], list]:
    """The training loss's metrics averaged over ``eval.num_batches`` held-out batches."""
    n = int(ctx.cfg.eval.num_batches)
    sums: dict[str, float] = {}
    for i in range(n):
        batch = ctx.loss_batches.batch_at(i)
        _, aux = ctx.loss_step(ctx.params, ctx.frozen, batch, jax.random.PRNGKey(0))
        for k, v in jax.device_get(aux).items():
            sums[k] = sums.get(k, 0.0) + float(v) / n
    return sums, [Row(f"L_map ({n} held-out batches)", f"{sums['map']:.4f}"),
                  Row("L_cap", f"{sums['cap']:.4f}"),
                  Row("image/text argmax-word agreement", pct(sums["assign_agreement"]))]


def captioning(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, Any], list]:
    """Zero-shot captions of the held-out images per decoding, with COCO metrics."""
    c = ctx.cfg.eval.captioning
    source = ctx.sources.get("captioning")
    source = ctx.sources["images"] if source is None else source
    n = min(ctx.limit(source), int(c.get("max_images", 0)) or len(source))
    prompt = [int(t) for t in np.asarray(ctx.frozen["prompt_ids"])]
    refs: dict[int, list[str]] = {}
    preds: dict[str, dict[int, str]] = {}
    domains: dict[str, list[int]] = {}  # NoCaps: domain -> the evaluated images of it
    for idx, examples, prefix in ctx.batches(source, n):
        for i, ex in zip(idx, examples):
            refs[i] = captioning_lib.references(ex)
            if ex.get("domain"):
                domains.setdefault(str(ex["domain"]), []).append(i)
        prefix = prefix[:len(idx)]
        for beams in c.num_beams:
            texts = ctx.generate(prefix, [prompt] * len(idx),
                                 max_new_tokens=int(c.max_new_tokens), num_beams=int(beams))
            preds.setdefault(_decoding(beams), {}).update(zip(idx, texts))
    domains = {d: domains[d] for d in sorted(domains)}
    dataset, split = _dataset(ctx, "captioning")
    result: dict[str, Any] = {"num_images": n, "prompt": ctx.cfg.model.prompt, "protocol": {
        "dataset": dataset, "split": split, "num_images": n, "split_images": len(source),
        "domains": {d: len(ids) for d, ids in domains.items()},
        **({"domain_scores": "each domain scored as a corpus of its own (CIDEr-D document "
                             "frequencies from that domain's references), as NoCaps' official "
                             "evaluation"} if domains else {})}}
    rows, notes, skipped = [], [], {}
    for decoding, p in preds.items():
        # An empty caption is a legitimate (bad) prediction; the scorers need a token.
        scored = captioning_lib.caption_metrics({k: v or "." for k, v in p.items()}, refs,
                                                metrics=tuple(c.metrics),
                                                groups=domains or None)
        exact = float(np.mean([p[k].strip().lower() in {r.strip().lower() for r in refs[k]}
                               for k in p]))
        result[decoding] = {**scored["scores"], "exact_match": exact,
                            "skipped": scored["skipped"], "tokenizer": scored["tokenizer"]}
        if domains:
            result[decoding]["domains"] = scored["groups"]
        for m, v in scored["scores"].items():
            # NoCaps: overall, then each domain alone, side by side.
            value = "  ".join([f"{'all ' if domains else ''}{100 * v:5.1f}"] + [
                f"{d} {100 * g[m]:5.1f}" for d, g in scored.get("groups", {}).items() if m in g])
            rows.append(Row(f"{decoding} {m}", value))
        rows.append(Row(f"{decoding} exact match", pct(exact)))
        skipped.update(scored["skipped"])
        if jax.process_index() == 0:
            text = (f"# step {step}, {decoding}: prompt {ctx.cfg.model.prompt!r}; "
                    "generated | first reference\n")
            text += "".join(f"{p[k]} | {refs[k][0]}\n" for k in sorted(p))
            files.write_text(files.join(workdir, f"captions_{decoding}_{step:06d}.txt"), text)
    if skipped:
        notes.append(f"skipped: {', '.join(skipped)} (reasons in eval_captioning_{step:06d}.json)")
    first = next(iter(preds.values()))
    show = sorted(first)[:int(c.num_show)]
    result["examples"] = [{"index": k, "references": refs[k],
                           **{d: preds[d][k] for d in preds}} for k in show]
    picture = f"captions_{step:06d}.png"
    images = [_image(source, k) for k in show]
    if jax.process_index() == 0 and show and all(im is not None for im in images):
        pictures.captions_picture(images, {d: [preds[d][k] for k in show] for d in preds},
                                  [refs[k] for k in show], files.join(workdir, picture))
        notes.append(f"picture: {picture} ({len(show)} held-out images, "
                     f"{' / '.join(preds)} beside the references)")
    for k in show[:_CONSOLE_EXAMPLES]:
        gen = " / ".join(f"{d}: {preds[d][k]!r}" for d in preds)
        notes.append(f"image {k}: {gen}  (reference {refs[k][0]!r})")
    where = f"{dataset} {split}".strip()
    return result, [*rows, f"(COCO metrics x 100 on {n} images of {where}"
                    f"{'; beside: each domain scored alone' if domains else ''})", *notes]


def retrieval(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, Any], list]:
    """Recall@K both ways per similarity (side by side), over the full gallery or averaged over
    galleries, beside chance."""
    r = ctx.cfg.eval.retrieval
    dataset_source = ctx.sources.get("retrieval")
    source = ctx.sources["images"] if dataset_source is None else dataset_source
    n = ctx.limit(source)
    sims = tuple(r.similarities)
    v, examples, prefixes = ctx.visual_reprs(source, n, keep_prefix="caption_likelihood" in sims)
    caption_lists = [captioning_lib.references(ex) for ex in examples]
    # Flickr30k / COCO: the papers' one gallery of the whole split (module docstring).
    size = 0 if dataset_source is not None else int(r.gallery_size)
    if size == 0:
        groups, columns = [list(range(n))], [retrieval_lib.every_caption(caption_lists)]
    else:
        groups = retrieval_lib.galleries(caption_lists, size)
        if not groups or not groups[0]:
            raise ValueError(f"retrieval: no gallery of {size} images with distinct captions "
                             f"among the {n} evaluated images; lower "
                             "config.eval.retrieval.gallery_size")
        columns = [retrieval_lib.gallery_captions(caption_lists, m) for m in groups]
    ks = tuple(int(k) for k in r.ks)
    words = ctx.word_embeddings()
    # caption_likelihood costs one LLM pass per pair: it may rank smaller galleries of its own.
    lik_size = int(r.get("likelihood_gallery_size", 0))
    own_lik = lik_size > 0 and "caption_likelihood" in sims and len(sims) > 1
    main_sims = tuple(x for x in sims if not (own_lik and x == "caption_likelihood"))

    def likelihood(members: list[int], texts: list[str]) -> np.ndarray:
        if len(members) * len(texts) > int(r.max_pairs):
            raise ValueError(
                f"retrieval caption_likelihood needs one LLM pass per pair: "
                f"{len(members)} x {len(texts)} exceeds "
                f"config.eval.retrieval.max_pairs={r.max_pairs}; use galleries "
                "(eval.retrieval.gallery_size or likelihood_gallery_size) or drop it from "
                "config.eval.retrieval.similarities")
        return ctx.likelihood_sim(prefixes[members], texts)

    recalls: dict[str, list[dict]] = {x: [] for x in main_sims}
    chances = []
    shown = None  # (members, texts, gt, sim) of the first gallery by the first similarity
    for members, (texts, gt) in zip(groups, columns):
        chances.append(retrieval_lib.chance_recall(gt, len(texts), ks))
        t = ctx.text_reprs(texts) if set(main_sims) - {"caption_likelihood"} else None
        for name in main_sims:
            if name == "caption_likelihood":
                sim = likelihood(members, texts)
            elif name == "word_scores":
                sim = (unit_rows(retrieval_lib.word_score_embedding(v[members], words))
                       @ unit_rows(retrieval_lib.word_score_embedding(t, words)).T)
            else:
                sim = unit_rows(v[members]) @ unit_rows(t).T
            recalls[name].append(retrieval_lib.recall_at_k(sim, gt, ks))
            shown = shown or (members, texts, gt, sim)
    chance = {k: float(np.mean([x[k] for x in chances])) for k in chances[0]}
    dataset, split = _dataset(ctx, "retrieval")
    num_captions = sum(len(texts) for texts, _ in columns)
    result: dict[str, Any] = {"chance": chance, "num_galleries": len(groups),
                              "gallery_images": len(groups[0]), "protocol": {
                                  "dataset": dataset, "split": split, "num_images": n,
                                  "split_images": len(source), "num_captions": num_captions,
                                  "gallery": "full" if size == 0 else f"galleries of {size}",
                                  "gallery_images": len(groups[0]),
                                  "similarities": list(sims), "ks": list(ks)}}
    where = (f"{len(groups)} galleries of {len(groups[0])} images" if len(groups) > 1
             else f"{len(groups[0])} images x {num_captions} captions")
    rows = []
    for name in main_sims:
        result[name] = {k: float(np.mean([x[k] for x in recalls[name]]))
                        for k in recalls[name][0]}
    for d, arrow in (("i2t", "image->text"), ("t2i", "text->image")):
        for k in ks:
            value = "  ".join(f"{name} {pct(result[name][f'{d}_R@{k}']):>6}"
                              for name in main_sims)
            rows.append(Row(f"{arrow} R@{k}", value, f"chance {pct(chance[f'{d}_R@{k}'])}"))
    if own_lik:
        count = int(r.get("likelihood_galleries", 0))
        lik = retrieval_lib.galleries(caption_lists, lik_size)[:count or None]
        if not lik:
            raise ValueError(f"retrieval: no gallery of {lik_size} images with distinct captions "
                             f"among the {n} evaluated images; lower "
                             "config.eval.retrieval.likelihood_gallery_size")
        got, lik_chances = [], []
        for members in lik:
            texts, gt = retrieval_lib.gallery_captions(caption_lists, members)
            lik_chances.append(retrieval_lib.chance_recall(gt, len(texts), ks))
            got.append(retrieval_lib.recall_at_k(likelihood(members, texts), gt, ks))
        result["caption_likelihood"] = {k: float(np.mean([x[k] for x in got])) for k in got[0]}
        result["caption_likelihood_chance"] = {k: float(np.mean([x[k] for x in lik_chances]))
                                               for k in lik_chances[0]}
        result["protocol"]["likelihood_galleries"] = {"galleries": len(lik),
                                                      "gallery_images": lik_size}
        for d, arrow in (("i2t", "image->text"), ("t2i", "text->image")):
            for k in ks:
                rows.append(Row(f"{arrow} R@{k} caption_likelihood ({len(lik)} galleries of "
                                f"{lik_size})", pct(result["caption_likelihood"][f"{d}_R@{k}"]),
                                f"chance {pct(result['caption_likelihood_chance'][f'{d}_R@{k}'])}"))
    notes = [f"over {where} of {dataset} {split}".rstrip()]
    if dataset_source is not None and int(r.gallery_size):
        notes.append(f"(config.eval.retrieval.gallery_size={r.gallery_size} applies to "
                     f"source ''; {dataset} is ranked as one gallery)")
    if jax.process_index() == 0:
        notes += _retrieval_pictures(source, *shown, int(r.num_show), main_sims[0], step,
                                     workdir)
    return result, rows + notes


def _retrieval_pictures(source, members: list[int], texts: list[str], gt: list[list[int]],
                        sim: np.ndarray, num_show: int, name: str, step: int,
                        workdir: str) -> list[str]:
    """Writes retrieval_{t2i,i2t}_<step>.png: the first ``num_show`` queries of one gallery
    (sim [n_img, n_txt] by similarity ``name``) with their top-5 results, the right ones
    framed green; returns the lines that name them."""
    images = [_image(source, i) for i in members]
    if num_show <= 0 or any(im is None for im in images):
        return []
    top = min(_TOP_K, len(members), len(texts))
    owner = retrieval_lib.caption_owner(gt, len(texts))
    order_t2i = np.argsort(-sim, axis=0, kind="stable")[:top]  # [top, n_txt] image ranks
    order_i2t = np.argsort(-sim, axis=1, kind="stable")[:, :top]  # [n_img, top] caption ranks
    q_t = range(min(num_show, len(texts)))
    q_i = range(min(num_show, len(members)))
    t2i, i2t = f"retrieval_t2i_{step:06d}.png", f"retrieval_i2t_{step:06d}.png"
    pictures.retrieval_picture(
        [texts[j] for j in q_t], [[images[i] for i in order_t2i[:, j]] for j in q_t],
        [[i == owner[j] for i in order_t2i[:, j]] for j in q_t], files.join(workdir, t2i))
    pictures.retrieval_picture(
        [images[i] for i in q_i], [[texts[j] for j in order_i2t[i]] for i in q_i],
        [[j in gt[i] for j in order_i2t[i]] for i in q_i], files.join(workdir, i2t))
    return [f"pictures: {t2i}, {i2t} (top {top} by {name}, the right one framed green)"]


def vqa(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, Any], list]:
    """Zero- or few-shot short greedy answers (``eval.vqa.shots`` solved train examples, each its
    own visual prefix, before the query; evals/vqa.fewshot_prompt), VQAv2's soft accuracy (also
    per answer and question type where the annotations give them) beside a constant-answer
    control."""
    q = ctx.cfg.eval.vqa
    source = ctx.sources["vqa"]
    n = min(len(source), int(q.get("max_questions", 0)) or len(source))
    shots, seed = int(q.get("shots", 0)), int(q.get("shot_seed", 0))
    separator = str(q.get("shot_separator", "\n"))
    pool = ctx.sources.get("vqa_shots") if shots else None
    tok = ctx.llm.tokenizer

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    preds, answers, shown = {}, {}, {}
    for idx, examples, prefix in ctx.batches(source, n):
        qids = [int(ex.get("question_id", i)) for i, ex in zip(idx, examples)]
        picks = [vqa_lib.pick_shots(pool.question_ids, qid, shots, seed) if shots else []
                 for qid in qids]
        prompts = [vqa_lib.fewshot_prompt(
            q.template, ex["question"],
            [(j, pool.data.questions[pool.question_ids[j]],
              vqa_source.shot_answer(pool.data, pool.question_ids[j])) for j in pick],
            separator) for ex, pick in zip(examples, picks)]
        if shots:
            # Every shot's image, in prompt order: [sum(len(pick)), T, D].
            shot_prefix = iter(ctx.prefixes(pool, [j for pick in picks for j in pick]))
            rows = [[ids(value) if kind == "text" else
                     prefix[b] if value == "query" else next(shot_prefix)
                     for kind, value in segments] for b, segments in enumerate(prompts)]
            texts = ctx.generate_interleaved(rows, max_new_tokens=int(q.max_new_tokens))
        else:  # [prefix ; template]: the zero-shot path captioning uses too
            texts = ctx.generate(prefix[:len(idx)], [ids(p[-1][1]) for p in prompts],
                                 max_new_tokens=int(q.max_new_tokens))
        for qid, ex, text, pick in zip(qids, examples, texts, picks):
            preds[qid] = vqa_lib.first_answer(text)
            answers[qid] = list(ex.get("answers") or [])
            if shots:
                shown[str(qid)] = [int(pool.question_ids[j]) for j in pick]
    data = getattr(source, "data", None)
    result: dict[str, Any] = {
        "dataset": q.source, "split": _vqa_split(source), "num_questions": n, "shots": shots,
        "template": q.template, "shot_seed": seed, "shot_separator": separator,
        "shot_split": _vqa_split(pool) if pool is not None else None,
        "predictions": {str(k): v for k, v in preds.items()}}
    if shots:
        result["shot_question_ids"] = shown
    annotated = {k: a for k, a in answers.items() if a}
    if not annotated:
        return result, [f"vqa: {n} questions answered, none annotated (test split); "
                        f"predictions in eval_vqa_{step:06d}.json"]
    types = {}  # scored per type where the annotations type every question
    for key in ("answer_types", "question_types"):
        found = getattr(data, key, None) or {}
        if all(k in found for k in annotated):
            types[key] = {k: found[k] for k in annotated}
    acc = vqa_lib.vqa_accuracy({k: preds[k] for k in annotated}, annotated, **types)
    # Control: answering every question with the most common human answer of the set.
    # Raw answers: the official scorer normalises only when the humans disagree.
    counts: dict[str, int] = {}
    for a in annotated.values():
        for x in a:
            counts[x.strip().lower()] = counts.get(x.strip().lower(), 0) + 1
    top = max(counts, key=counts.get)
    constant = vqa_lib.vqa_accuracy({k: top for k in annotated}, annotated)["overall"]
    names = getattr(data, "question_type_names", None) or {}
    result.update(accuracy=acc["overall"], num_annotated=len(annotated), constant_answer=top,
                  constant_answer_accuracy=constant,
                  per_answer_type=acc.get("per_answer_type", {}),
                  per_question_type=acc.get("per_question_type", {}))
    if names:
        result["question_type_names"] = names
    how = f"{shots}-shot" if shots else "zero-shot"
    lines = [Row(f"{how} accuracy on {len(annotated)} questions", pct(acc["overall"]),
                 f"always answering {top!r}: {pct(constant)}")]
    if len(acc.get("per_answer_type", {})) > 1:
        lines += [Row(f"  answer type {t!r}", pct(v)) for t, v in acc["per_answer_type"].items()]
    for k in list(annotated)[:int(q.num_show)]:
        lines.append(f"question {k}: answered {preds[k]!r} (humans: {annotated[k][0]!r})")
    return result, lines


def _vqa_split(source) -> str:
    """The questions' split as the files name it ('val2014'), or the stand-in's ('validation')."""
    data = getattr(source, "data", None)
    return str(getattr(data, "data_subtype", "") or getattr(source, "split", "") or "")


def exact_pairs(source, n: int) -> list[tuple[int, str, str, int]] | None:
    """(query, word a, word b, target) among source[:n] where the source pairs its images
    exactly (digit scenes' validation / test, also behind a feature cache), else None."""
    inner = getattr(source, "source", source)  # data/feature_cache.CachedFeatures keeps it
    if isinstance(inner, digit_scenes.DigitScenes) and inner.paired:
        return digit_scenes.arithmetic_pairs(inner, range(n)) or None
    return None


def arithmetic(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, Any], list]:
    """Nearest words of a few images; image - word(a) + word(b) -> the exact target image where
    the source has one (``exact_pairs``), else does the nearest image show b?"""
    a = ctx.cfg.eval.arithmetic
    source = ctx.sources["images"]
    n = ctx.limit(source)
    v, examples, _ = ctx.visual_reprs(source, n)
    caps = [" ".join(captioning_lib.references(ex)) for ex in examples]
    words = ctx.word_embeddings(np.float64)
    tok = ctx.llm.tokenizer

    def ids(word: str) -> list[int]:
        return list(tok(" " + word, add_special_tokens=False)["input_ids"])

    def name(i: int) -> str:
        return tok.decode([int(i)]).strip() or repr(tok.decode([int(i)]))

    lines, result = [], {}
    shown = []
    for i in range(min(int(a.num_show), n)):
        top, _ = arithmetic_lib.nearest_words(v[i], words, top_k=int(a.top_k))
        shown.append({"index": i, "caption": caps[i], "nearest_words": [name(t) for t in top]})
        lines.append(f"image {i} ({caps[i]!r}) nearest words: "
                     f"{', '.join(name(t) for t in top)}")
    result["nearest_words"] = shown
    exact = exact_pairs(source, n)
    if exact is not None:
        return _exact_arithmetic(v, words, exact, ids, a, n, result, lines)
    pairs = [tuple(p.split("->")) for p in a.pairs]
    bad = [p for p in a.pairs if len(p.split("->")) != 2]
    if bad:
        raise ValueError(f"config.eval.arithmetic.pairs {bad} must be 'minus->plus' strings, "
                         "e.g. 'dog->cat'")
    hits = {"arithmetic": [], "image_only": [], "word_only": []}
    chance = []
    for minus, plus in pairs:
        queries = [i for i in range(n) if arithmetic_lib.contains_word(caps[i], minus)]
        good = np.array([arithmetic_lib.contains_word(c, plus) for c in caps])
        for i in queries:
            others = good.sum() - good[i]
            chance.append(others / (n - 1))
            for mode, (p_ids, m_ids) in (("arithmetic", (ids(plus), ids(minus))),
                                         ("image_only", ((), ()))):
                top, _ = arithmetic_lib.nearest_images(v[i], words, v, p_ids, m_ids, top_k=1,
                                                       exclude=[i])
                hits[mode].append(bool(good[top[0]]))
            # Control: the added word alone, without the image.
            word = words[ids(plus)].sum(0)
            top, _ = arithmetic_lib.nearest_images(word, words, v, top_k=1, exclude=[i])
            hits["word_only"].append(bool(good[top[0]]))
    if chance:
        acc = {k: float(np.mean(x)) for k, x in hits.items()}
        result.update({f"{k}_top1": x for k, x in acc.items()}, chance=float(np.mean(chance)),
                      num_queries=len(chance), pairs=list(a.pairs))
        lines = [Row(f"image - a + b -> nearest image shows b ({len(chance)} queries)",
                     pct(acc["arithmetic"]), f"chance {pct(np.mean(chance))}"),
                 Row("control: the image alone", pct(acc["image_only"])),
                 Row("control: word(b) alone", pct(acc["word_only"])), *lines]
    return result, lines


def _exact_arithmetic(v: np.ndarray, words: np.ndarray, pairs: list[tuple[int, str, str, int]],
                      ids: Callable[[str], list[int]], a: ml_collections.ConfigDict, n: int,
                      result: dict[str, Any], lines: list) -> tuple[dict[str, Any], list]:
    """Recall@K of each exact pair's target (evals/arithmetic.target_recall) among the n images
    v [n, D], beside chance and the word-only / image-only controls."""
    ks = tuple(int(k) for k in a.get("ks", (1, 5)))
    scored = arithmetic_lib.target_recall(
        v, words, [(q, ids(minus), ids(plus), t) for q, minus, plus, t in pairs], ks)
    result.update(target=scored, protocol={
        "pairs": "exact: data/digit_scenes.arithmetic_pairs (the same scene, one digit a -> b)",
        "num_images": n, "num_queries": len(pairs), "gallery": n - 1, "ks": list(ks),
        "ties": "pessimistic (every other image scoring >= the target is ahead of it)"})
    rows = []
    for k in ks:
        key = f"R@{k}"
        rows += [Row(f"image - a + b -> its target, R@{k} ({len(pairs)} queries, {n - 1} "
                     "candidates)", pct(scored["arithmetic"][key]),
                     f"chance {pct(scored['chance'][key])}"),
                 Row(f"  control: word(b) alone, R@{k}", pct(scored["word_only"][key])),
                 Row(f"  control: the image alone, R@{k}", pct(scored["image_only"][key]))]
    return result, [*rows, *lines]


def _dataset(ctx: Evaluator, name: str) -> tuple[str, str]:
    """(dataset, split) evaluation ``name`` ('captioning' | 'retrieval') reads, for its JSON."""
    e = ctx.cfg.eval
    section = e.get(name) or {}
    if ctx.sources.get(name) is not None:  # its own source: nocaps, flickr30k, coco
        source = section.get("source", "")
        split = "validation" if source == "nocaps" else section.get("split", "test")
        return source, split
    if e.get("source") and e.source.name:
        return e.source.name, e.source.get("split", "")
    d = ctx.cfg.data
    return d.name, "validation" if d.name == "digits" else d.get("eval_split", "")


def _image(source, index: int) -> np.ndarray | None:
    """Example ``index``'s image for a picture: the source's, or that of the source a feature
    cache stands in for (data/feature_cache.CachedFeatures keeps it as ``.source``); None when
    neither has one."""
    example = source[index]
    if "image" not in example:
        inner = getattr(source, "source", None)
        example = inner[index] if inner is not None else {}
    image = example.get("image")
    return None if image is None else np.asarray(image, np.uint8)


def _decoding(beams: int) -> str:
    return "greedy" if int(beams) == 1 else f"beam{int(beams)}"


EVALS: dict[str, eval_runner.Evaluation] = {
    "loss": loss, "captioning": captioning, "retrieval": retrieval, "vqa": vqa,
    "arithmetic": arithmetic}
