"""LQAE's evaluations on a checkpoint: the image's words put to work.

The evaluations follow evals/runner.py: each is a function ``fn(ctx, step, workdir) -> (result,
lines)`` over the ``Evaluator`` of the run (its jitted encoder, the frozen LM, and the words of
each split, computed once per run and shared), listed in ``EVALS``; the named ones write
``eval_<name>_<step>.json``, print their lines and return scalars (written to the metrics files).
Each runs every ``config.eval.<name>.every`` steps (``runner.cadence``):
  reconstruction  MSE, PSNR and SSIM on validation images (from the quantized words, and after the
                  frozen LM refills the masked half), on pixels mapped to [0, 1] whatever the
                  model's ``config.model.pixel_range`` (so runs with either range compare, and
                  SSIM has its usual non-negative intensities), codebook usage and perplexity, a
                  picture (evals/pictures.py) of a few images beside their reconstructions,
                  upsampled to >= 64 pixels without smoothing, with the words each became;
  fewshot         N-way K-shot classification by nearest class prototype of the frozen encoder
                  LM's features of each image's words, beside chance and the shuffled-words control;
  fewshot_llm     the same episodes by prompting a causal LLM (``eval.llm_path``: any
                  ``models.load_pretrained`` checkpoint or GGUF file) and scoring each class name
                  by log-likelihood;
  fewshot_frozen  Frozen's protocol (Tsimpoukelli et al. 2021; evals/fewshot_frozen.py) with the
                  same LLM: nonsense ('dax', 'blicket') or real names per episode, task induction,
                  repeats; the LLM generates the answer (exact match), the likelihood ranking of the
                  episode's names beside it; long prompts by ``eval.fewshot_frozen.prompt_policy``;
  linear_probe    the released linear probe (evals/linear_probe.py): LayerNorm + Dense trained
                  with LARS on every ViT-encoder block's and every LM hidden state's token means
                  (``eval.probe.features='released'``) or on one LM layer's ('lm_layer'), features
                  computed once per checkpoint step and cached in the workdir (its knobs are
                  ``eval.probe``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap.core import files
from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.evals import fewshot as fewshot_lib
from lqae_vlap.evals import fewshot_frozen as frozen_lib
from lqae_vlap.evals import linear_probe as probe_lib
from lqae_vlap.evals import pictures
from lqae_vlap.evals import reconstruction as recon_lib
from lqae_vlap.evals import runner as eval_runner
from lqae_vlap.evals.runner import Row, pct
from lqae_vlap.evals.arrays import pad_rows
from lqae_vlap.models import roberta, vit
from lqae_vlap.ops import pixels
from lqae_vlap.ops import quantize as quantize_lib


# config.quantizer.codebook: the frozen LM's word embeddings (LQAE) or a trained table of the same
# [V, D] (a plain VQ-VAE, methods/lqae.py), whose code i the LM reads as its word i.
CODEBOOKS = ("lm", "learned")


def search_codebook(params, frozen, cfg: ml_collections.ConfigDict) -> jax.Array:
    """The [V, D] table the encoder's vectors are quantized to: ``params['codebook']`` for
    ``quantizer.codebook='learned'``, else the frozen LM's word embeddings."""
    if cfg.quantizer.codebook == "learned":
        return params["codebook"]
    return roberta.word_embedding_matrix(frozen["lm"])


def released_probe_features(params, frozen, images, *, model, lm, cfg) -> jax.Array:
    """images [B, H, W, C] uint8 -> the released linear probe's features [B, L_enc * W_enc +
    (L_lm + 1) * D_lm] float32 (lqae/main/linear_main.py ``combine_representation`` with
    ``last_embedding_layers='all'``).

    The ViT encoder's block outputs 1..L (its patch embeddings are not among the released
    ``encoder_embedding``) and the frozen LM's hidden states 0..L over the quantized words, no
    masking, each averaged over the tokens after the first and concatenated in that order. (A
    learned codebook's codes reach the LM as its words of the same ids.)
    """
    x = pixels.to_float(images, tuple(cfg.model.pixel_range))
    z, state = model.apply({"params": params}, x, method="encode", mutable=["intermediates"])
    encoder_states = vit.hidden_states(state["intermediates"]["encoder"])[1:]
    words = roberta.word_embedding_matrix(frozen["lm"])
    q = quantize_lib.quantize(z, search_codebook(params, frozen, cfg),
                              metric=cfg.quantizer.metric, chunk_size=cfg.quantizer.chunk_size,
                              straight_through_on=cfg.quantizer.straight_through_on)
    lm_out = lm.apply({"params": frozen["lm"]}, inputs_embeds=words[q.indices],
                      with_lm_head=False, output_hidden_states=True)
    return probe_lib.token_means_after_first([*encoder_states, *lm_out["hidden_states"]])


def encode_words(params, frozen, images, *, model, cfg) -> jax.Array:
    """images: [B, H, W, C] uint8 -> the words they become: token ids [B, N]."""
    z = model.apply({"params": params}, pixels.to_float(images, tuple(cfg.model.pixel_range)),
                    method="encode")
    return quantize_lib.quantize(z, search_codebook(params, frozen, cfg),
                                 metric=cfg.quantizer.metric,
                                 chunk_size=cfg.quantizer.chunk_size,
                                 straight_through_on=cfg.quantizer.straight_through_on).indices


class Evaluator:
    """The context LQAE's evaluations share; ``run(params, frozen, step, workdir) -> scalars``.

    Args:
      cfg: the run's config (reads ``cfg.eval``, ``cfg.quantizer``, ``cfg.seed``).
      model: the LQAE module (its ``encode`` gives the vectors quantized into words).
      lm: the frozen ``roberta.MaskedLM`` whose features of the words are classified.
      tokenizer: the LM's tokenizer (word ids -> tokens).
      sources: {'train', 'validation', optionally 'mini_imagenet'}: random-access images with
        'image' [H, W, C] uint8 and 'label', and ``class_names``.
      mesh: the device mesh (results are gathered replicated).
      forward: (params, frozen, images, rng) -> LQAE's forward dict ('recon_q', 'recon_lm', 'q').

    During ``run``, ``params`` and ``frozen`` are the evaluated weights and ``words`` the split
    words of that run (``split_words``); all three are None between runs.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, model, lm, tokenizer, sources: dict, mesh,
                 forward: Callable):
        eval_runner.check_names(cfg.eval.evals, EVALS)
        self.cfg, self.lm, self.tokenizer, self.sources = cfg, lm, tokenizer, sources
        replicated = sharding_lib.replicated(mesh)
        self.forward = jax.jit(forward, out_shardings=replicated)
        self._words = jax.jit(functools.partial(encode_words, model=model, cfg=cfg),
                              out_shardings=replicated)
        if "linear_probe" in cfg.eval.evals:
            probe_lib.check_protocol(cfg.eval.probe)
        if "fewshot_frozen" in cfg.eval.evals:
            frozen_lib.check_protocol(cfg.eval.fewshot_frozen)
        self._probe_features = jax.jit(
            functools.partial(released_probe_features, model=model, lm=lm, cfg=cfg),
            out_shardings=replicated)
        self.causal = None  # the causal LLM of eval.llm_path (CausalLM), loaded on first use
        self.params = self.frozen = self.words = None

    def run(self, params, frozen, step: int, workdir: str,
            names: Sequence[str] | None = None) -> dict[str, float]:
        """Runs ``names`` (None: every one of ``config.eval.evals``) through ``runner.run``."""
        self.params, self.frozen, self.words = params, frozen, {}
        try:
            names = self.cfg.eval.evals if names is None else names
            return eval_runner.run(EVALS, names, self, step, workdir)
        finally:
            self.params = self.frozen = self.words = None

    def split_words(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(word ids [N, tokens], labels [N]) of the first ``eval.max_images`` (0 = all) images
        of ``sources[split]``; computed once per ``run`` and shared."""
        if split not in self.words:
            source = self.sources[split]
            bs = int(self.cfg.eval.batch_size)
            limit = int(self.cfg.eval.get("max_images", 0)) or len(source)
            ids, labels = [], []
            for start in range(0, min(limit, len(source)), bs):
                idx = range(start, min(start + bs, limit, len(source)))
                images = pad_rows(np.stack([source[i]["image"] for i in idx]), bs)
                ids.append(np.asarray(self._words(self.params, self.frozen, images))[:len(idx)])
                labels.extend(int(source[i]["label"]) for i in idx)
            self.words[split] = (np.concatenate(ids), np.asarray(labels))
        return self.words[split]

    def released_probe_features(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(``released_probe_features`` [N, D] float32, labels [N]) of the first
        ``eval.max_images`` (0 = all) images of ``sources[split]``, in ``eval.batch_size``s."""
        source = self.sources[split]
        bs = int(self.cfg.eval.batch_size)
        n = min(int(self.cfg.eval.get("max_images", 0)) or len(source), len(source))
        out, labels = [], []
        for start in range(0, n, bs):
            examples = [source[i] for i in range(start, min(start + bs, n))]
            images = pad_rows(np.stack([e["image"] for e in examples]), bs)
            out.append(np.asarray(self._probe_features(self.params, self.frozen,
                                                       images))[:len(examples)])
            labels.extend(int(e["label"]) for e in examples)
        return np.concatenate(out), np.asarray(labels)

    def features(self, token_ids: np.ndarray, layer: int) -> np.ndarray:
        """token_ids [N, T] -> the frozen LM's mean-pooled features [N, D] float32."""
        return fewshot_lib.encoder_features(self.lm, {"params": self.frozen["lm"]}, token_ids,
                                            layer=layer)


# ----------------------------------------------------------------------------------------------
# The evaluations: fn(ctx, step, workdir) -> (result, lines), ctx an Evaluator inside ``run``.
# Every result is a flat {name: float}, so its scalars are its keys.


def reconstruction(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, float], list]:
    """Reconstruction quality and codebook use; writes a picture of a few reconstructions beside
    their originals and words (``reconstructions_<step>.png``) and the words as text."""
    cfg = ctx.cfg
    source = ctx.sources["validation"]
    bs, n = int(cfg.eval.batch_size), int(cfg.eval.num_batches)
    rng = jax.random.PRNGKey(cfg.seed + 2)  # fixed masks: comparable across steps
    value_range = tuple(cfg.model.pixel_range)
    sums: dict[str, float] = {}
    all_idx, first = [], None
    window = None
    for b in range(n):
        idx = [(b * bs + i) % len(source) for i in range(bs)]
        images = np.stack([source[i]["image"] for i in idx])
        out = jax.device_get(ctx.forward(ctx.params, ctx.frozen, images,
                                         jax.random.fold_in(rng, b)))
        x = images.astype(np.float64) / 255.0
        window = recon_lib.ssim_filter_size(*x.shape[1:3])
        for tag, rec in (("quantized", out["recon_q"]), ("lm_filled", out["recon_lm"])):
            rec = np.clip(pixels.to_unit(rec, value_range), 0.0, 1.0)
            metrics = {f"mse_{tag}": float(np.mean((rec - x) ** 2)),
                       f"psnr_{tag}": recon_lib.psnr(rec, x, data_range=1.0)[1],
                       f"ssim_{tag}": recon_lib.ssim(rec, x, data_range=1.0,
                                                     filter_size=window)[1]}
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / n
        all_idx.append(np.asarray(out["q"].indices))
        first = first or (images, out)
    vocab = roberta.word_embedding_matrix(ctx.frozen["lm"]).shape[0]
    r = {**sums, **recon_lib.codebook_stats(np.concatenate(all_idx), vocab),
         "ssim_filter_size": window}
    picture = f"reconstructions_{step:06d}.png"
    if jax.process_index() == 0:
        images, out = first
        k = min(int(cfg.eval.num_images), images.shape[0])
        ids = np.asarray(out["q"].indices)
        words = [" ".join(ctx.tokenizer.convert_ids_to_tokens([int(t) for t in ids[j]]))
                 for j in range(k)]
        pictures.reconstructions_picture(
            images[:k], {"from the words": pixels.to_uint8(out["recon_q"][:k], value_range),
                         "after the LM": pixels.to_uint8(out["recon_lm"][:k], value_range)},
            words, files.join(workdir, picture))
        text = [f"# step {step}: the words each validation image became ({ids.shape[1]} "
                "tokens, patches in row-major order)"]
        text += [f"image {j}: {w}" for j, w in enumerate(words)]
        files.write_text(files.join(workdir, f"words_{step:06d}.txt"), "\n".join(text) + "\n")
    rows = [Row(f"{name} {where}", value)
            for where, tag in (("from the words", "quantized"), ("after the LM", "lm_filled"))
            for name, value in (("PSNR", f"{r[f'psnr_{tag}']:.2f} dB"),
                                ("SSIM", f"{r[f'ssim_{tag}']:.3f}"))]
    rows += [Row("codebook usage", pct(r["usage"], 2), f"of {vocab} words"),
             Row("codebook perplexity", f"{r['perplexity']:.1f}", "effective words used")]
    return r, rows + [f"picture: {picture}"]


def fewshot(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, float], list]:
    """N-way K-shot episodes classified by prototypes of the frozen LM's features."""
    fs = ctx.cfg.eval.fewshot
    ids, labels = ctx.split_words(fs.split)
    features = ctx.features(ids, fs.layer)
    class_names = ctx.sources[fs.split].class_names
    return _episodes(fs, lambda n, k: fewshot_lib.run_fewshot(
        labels, class_names, n_way=n, k_shot=k, n_query=fs.queries,
        num_episodes=fs.episodes, seed=fs.seed, features=features))


class CausalLM:
    """The causal LLM of ``eval.llm_path`` as the few-shot evaluations use it: a likelihood
    ``scorer``, a greedy ``generate(prompts, max_new_tokens) -> texts``, ``count_tokens`` and its
    ``context_length`` (the config's max_position_embeddings)."""

    def __init__(self, path: str, pad_multiple: int = 64):
        from lqae_vlap import models  # noqa: PLC0415  (loads a causal LLM only when asked)
        from lqae_vlap.models import generate as gen  # noqa: PLC0415

        family = models.checkpoint_family(path)
        if family not in (None, "opt", "llama"):
            raise ValueError(f"config.eval.llm_path={path!r} holds a {family} model; the few-shot "
                             "prompts need a causal LM (OPT or Llama family, or a GGUF file)")
        module, variables, hf_config = models.load_pretrained(path)
        family = family or models.family(hf_config, where=path)
        self.tokenizer = tok = models.load_tokenizer(path)
        self.context_length = int(module.config.max_position_embeddings)
        # Score rows are right-padded to a multiple of 64: within OPT's 2048 positions.
        self.scorer = fewshot_lib.make_lm_scorer(
            tok, fewshot_lib.causal_lm_logprob_fn(module, variables), pad_multiple=pad_multiple)
        self._gen, self._pad_multiple = gen, pad_multiple
        # Static arguments of generate.py's jit: built once, so every call hits the same cache.
        self._apply = module.apply
        self._cache_fn = models.family_module(family).cache_fn(module.config, dtype=module.dtype)
        self._variables = variables
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos_id = tok.eos_token_id

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as a prompt (with the tokenizer's special tokens, as scored)."""
        return len(self.tokenizer(text)["input_ids"])

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of the prompts (one left-padded batch), decoded up to EOS."""
        rows = [self.tokenizer(p)["input_ids"] for p in prompts]
        longest = max(map(len, rows))
        # Few compiled shapes, never more cache slots than the model has positions.
        length = -(-longest // self._pad_multiple) * self._pad_multiple
        length = max(longest, min(length, self.context_length - max_new_tokens))
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for r, row in enumerate(rows):
            ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
        out = np.asarray(self._gen.greedy_search(
            self._apply, self._variables, input_ids=jnp.asarray(ids),
            attention_mask=jnp.asarray(mask), max_new_tokens=int(max_new_tokens),
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, init_cache_fn=self._cache_fn))
        texts = []
        for row in out.tolist():
            if self.eos_id is not None and self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts


def causal_lm(ctx: Evaluator, eval_name: str) -> CausalLM:
    """The run's causal LLM (``eval.llm_path``), loaded once and shared by the evaluations."""
    if not ctx.cfg.eval.llm_path:
        raise ValueError(f"config.eval.evals has {eval_name!r} but config.eval.llm_path is "
                         "empty; point it at a causal LM folder or GGUF file")
    if ctx.causal is None:
        ctx.causal = CausalLM(ctx.cfg.eval.llm_path)
    return ctx.causal


def fewshot_llm(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, float], list]:
    """The same episodes, classified by prompting the causal LLM at ``eval.llm_path``."""
    fs = ctx.cfg.eval.fewshot
    scorer = causal_lm(ctx, "fewshot_llm").scorer
    ids, labels = ctx.split_words(fs.split)
    texts = [fewshot_lib.image_text(row, ctx.tokenizer) for row in ids]
    class_names = ctx.sources[fs.split].class_names
    return _episodes(fs, lambda n, k: fewshot_lib.run_fewshot(
        labels, class_names, n_way=n, k_shot=k, n_query=fs.queries,
        num_episodes=fs.llm_episodes, seed=fs.seed, texts=texts, lm_scorer=scorer))


_WORDNET_ID = re.compile(r"n\d{8}")


def fewshot_frozen(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, Any], list]:
    """Frozen's open-ended / real-name few-shot protocol (``eval.fewshot_frozen``) on the words,
    with the causal LLM at ``eval.llm_path`` generating each answer."""
    fz = ctx.cfg.eval.fewshot_frozen
    llm = causal_lm(ctx, "fewshot_frozen")
    ids, labels = ctx.split_words(fz.split)
    class_names = ctx.sources[fz.split].class_names
    if fz.names == "real" and any(_WORDNET_ID.fullmatch(str(n)) for n in class_names):
        raise ValueError(f"eval.fewshot_frozen.names='real' but the {fz.split!r} classes are named "
                         f"by WordNet ids ({class_names[0]!r}, ...); set "
                         "config.eval.mini_imagenet_label_names to a synset-to-name file")
    proto = frozen_lib.protocol(
        names=fz.names, ways=fz.ways, inner_shots=fz.inner_shots, repeats=fz.repeats,
        queries=fz.queries, episodes=fz.episodes, seed=fz.seed, task_induction=fz.task_induction,
        max_new_tokens=fz.max_new_tokens, prompt_policy=fz.prompt_policy,
        context_length=llm.context_length, split=fz.split)
    mode = fz.get("text_mode", "decode")
    r: dict[str, Any] = {"protocol": proto}
    rows: list = []
    for n_way in fz.ways:
        for k_shot in fz.inner_shots:
            cell = frozen_lib.run_frozen_fewshot(
                labels, class_names, ids, lambda row: fewshot_lib.image_text(
                    row, ctx.tokenizer, mode=mode), generate_fn=llm.generate,
                count_tokens=llm.count_tokens,
                # The ranking scores ways x ways prompt rows per episode, the generation ways.
                lm_scorer=llm.scorer if fz.get("ranking", True) else None,
                context_length=llm.context_length, n_way=n_way, inner_shots=k_shot,
                repeats=fz.repeats, n_query=fz.queries, num_episodes=fz.episodes, seed=fz.seed,
                names=fz.names, task_induction=fz.task_induction,
                max_new_tokens=fz.max_new_tokens, prompt_policy=fz.prompt_policy)
            key = f"{n_way}way_{k_shot}shot"
            r[key] = cell
            words = int(cell["words_per_image"])
            ranking = (f"ranking {pct(cell['ranking_accuracy'])} +- "
                       f"{100 * cell['ranking_ci95']:.1f}, " if "ranking_accuracy" in cell else "")
            rows.append(Row(f"{n_way}way {k_shot}shot", f"{pct(cell['accuracy'])} +- "
                            f"{100 * cell['ci95']:.1f}",
                            f"chance {pct(cell['chance'], 0)}, {ranking}{words} words/image, "
                            f"<= {int(cell['prompt_tokens_max'])} tokens"))
    return r, rows + [
        f"({proto['name']}: {fz.names} names, repeats {fz.repeats}, task induction "
        f"{'on' if fz.task_induction else 'off'}, policy {fz.prompt_policy})",
        "(value: exact match of the generated answer; ranking: likelihood of the names; +- 95% "
        "CI over episodes)"]


def linear_probe(ctx: Evaluator, step: int, workdir: str) -> tuple[dict[str, Any], list]:
    """The linear probe of ``eval.probe`` (evals/linear_probe.py) on cached frozen features; the
    JSON records the protocol that ran beside top-1 and the majority-class chance."""
    p = ctx.cfg.eval.probe
    probe_lib.check_protocol(p)
    released = p.features == "released"
    max_images = int(ctx.cfg.eval.get("max_images", 0))

    def features(split):
        def compute():
            if released:
                return ctx.released_probe_features(split)
            ids, labels = ctx.split_words(split)
            return ctx.features(ids, p.layer), labels
        return probe_lib.cached_features(
            files.join(workdir, "probe_features"), step=step, features=p.features, split=split,
            layer="all" if released else int(p.layer), dtype=p.cache_dtype,
            max_images=max_images, compute_fn=compute)

    (tx, ty), (vx, vy) = features("train"), features("validation")
    num_classes = len(ctx.sources["validation"].class_names)
    r = probe_lib.train_linear_probe(tx, ty, vx, vy, num_classes, optimizer=p.optimizer,
                                     lr=p.lr, epochs=p.epochs, batch_size=p.batch_size,
                                     weight_decay=p.weight_decay, momentum=p.momentum,
                                     seed=ctx.cfg.seed)
    r["chance"] = float(np.bincount(vy).max() / len(vy))  # majority class
    m, lm_layers = ctx.cfg.model, ctx.lm.config.num_hidden_layers
    layers = (f"ViT encoder blocks 1..{m.encoder.depth} + LM hidden states 0..{lm_layers}"
              if released else f"LM hidden state {int(p.layer)}")
    r["protocol"] = dict(
        features=p.features, layers=layers, width=int(tx.shape[1]), cache_dtype=p.cache_dtype,
        pooling="mean over the tokens after the first" if released else "mean over all tokens",
        head="LayerNorm + Dense", optimizer=p.optimizer, lr_per_256=float(p.lr),
        lr_peak=r.pop("lr_peak"), schedule="cosine to 0, no warm-up", epochs=int(p.epochs),
        batch_size=r.pop("batch_size"), steps=r.pop("steps"),
        weight_decay=float(p.weight_decay), momentum=float(p.momentum),
        train_images=len(ty), validation_images=len(vy))
    return r, [Row("top-1 (validation)", pct(r["top1"]), f"majority class {pct(r['chance'])}"),
               Row("top-1 (train)", pct(r["train_top1"])),
               f"{p.features} features ({layers}, {tx.shape[1]} wide), {p.optimizer}, "
               f"{p.epochs} epochs"]


def _episodes(fs: Any, run_one: Callable[[int, int], dict[str, float]]
              ) -> tuple[dict[str, float], list]:
    """Every (ways, shots) cell of ``eval.fewshot`` as '<n>way_<k>shot_<key>' floats, and a line
    per cell: accuracy beside chance and the shuffled-words control."""
    r = {}
    for n_way in fs.ways:
        for k_shot in fs.shots:
            for k, v in run_one(n_way, k_shot).items():
                r[f"{n_way}way_{k_shot}shot_{k}"] = float(v)
    rows = []
    for key in sorted(k for k in r if k.endswith("_accuracy") and "shuffled" not in k):
        cell = key[: -len("_accuracy")]
        acc, ci, chance = r[key], r[f"{cell}_ci95"], r[f"{cell}_chance"]
        sh, sh_ci = r[f"{cell}_shuffled_accuracy"], r[f"{cell}_shuffled_ci95"]
        verdict = "above chance" if acc - ci > chance else "not above chance"
        rows.append(Row(cell.replace("_", " "), f"{pct(acc)} +- {100 * ci:.1f}",
                        f"chance {pct(chance, 0)}, shuffled words {pct(sh)} +- {100 * sh_ci:.1f}"
                        f": {verdict}"))
    return r, rows + ["(accuracy +- 95% CI over episodes)"]


EVALS: dict[str, eval_runner.Evaluation] = {
    "reconstruction": reconstruction, "fewshot": fewshot, "fewshot_llm": fewshot_llm,
    "fewshot_frozen": fewshot_frozen, "linear_probe": linear_probe}
