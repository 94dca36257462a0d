"""LQAE's evaluations on a checkpoint: the image's words put to work.

Each evaluation named in ``config.eval.evals`` runs on the current params and returns scalars
(written to the metrics files) and a JSON file ``eval_<name>_<step>.json`` in the workdir:
  reconstruction  MSE, PSNR and SSIM on validation images (from the quantized words, and after the
                  frozen LM refills the masked half), codebook usage and perplexity, a PNG grid
                  and the words of a few images;
  fewshot         N-way K-shot classification by nearest class prototype of the frozen encoder
                  LM's features of each image's words, beside chance and the shuffled-words control;
  fewshot_llm     the same episodes by prompting a causal LLM (``eval.llm_path``: any
                  ``models.load_pretrained`` checkpoint or GGUF file) and scoring each class name
                  by log-likelihood;
  linear_probe    a linear classifier (optax) on the frozen LM's mean-pooled features of the words,
                  features computed once per checkpoint step and cached in the workdir.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from lqae_vlap.core import files
from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.evals import fewshot as fewshot_lib
from lqae_vlap.evals import linear_probe as probe_lib
from lqae_vlap.evals import reconstruction as recon_lib
from lqae_vlap.evals import runner as eval_runner
from lqae_vlap.models import roberta
from lqae_vlap.ops import pixels
from lqae_vlap.ops import quantize as quantize_lib

EVALS = ("reconstruction", "fewshot", "fewshot_llm", "linear_probe")


def encode_words(params, frozen, images, *, model, cfg) -> jax.Array:
    """images: [B, H, W, C] uint8 -> the words they become: token ids [B, N]."""
    z = model.apply({"params": params}, pixels.to_float(images), method="encode")
    codebook = roberta.word_embedding_matrix(frozen["lm"])
    return quantize_lib.quantize(z, codebook, metric=cfg.quantizer.metric,
                                 chunk_size=cfg.quantizer.chunk_size).indices


def _summary(name: str, r: dict) -> list[str]:
    """Human-readable lines: accuracy beside chance and the shuffled-words control."""
    if name.startswith("fewshot"):
        lines = []
        for key in sorted(k for k in r if k.endswith("_accuracy") and "shuffled" not in k):
            cell = key[: -len("_accuracy")]
            acc, ci, chance = r[key], r[f"{cell}_ci95"], r[f"{cell}_chance"]
            sh, sh_ci = r[f"{cell}_shuffled_accuracy"], r[f"{cell}_shuffled_ci95"]
            verdict = ("above chance" if acc - ci > chance
                       else "not distinguishable from chance")
            lines.append(f"{name} {cell.replace('_', ' ')}: {100 * acc:.1f}% +- {100 * ci:.1f} "
                         f"(95% CI) vs chance {100 * chance:.0f}%, shuffled words {100 * sh:.1f}% "
                         f"+- {100 * sh_ci:.1f}: {verdict} ({100 * (acc - chance):+.1f} points)")
        return lines
    if name == "linear_probe":
        return [f"linear probe top-1 {100 * r['top1']:.1f}% vs majority class "
                f"{100 * r['chance']:.1f}% (train {100 * r['train_top1']:.1f}%)"]
    if name == "reconstruction":
        return [f"reconstruction PSNR {r['psnr_quantized']:.2f} dB / SSIM {r['ssim_quantized']:.3f}"
                f" from the words, {r['psnr_lm_filled']:.2f} dB / {r['ssim_lm_filled']:.3f} after "
                f"the LM refills half; codebook usage {100 * r['usage']:.2f}%, perplexity "
                f"{r['perplexity']:.1f}"]
    return []


class Evaluator:
    """Runs the configured evaluations; ``run(params, frozen, step, workdir) -> scalars``."""

    def __init__(self, cfg: ml_collections.ConfigDict, model, lm, tokenizer, sources: dict, mesh,
                 forward):
        unknown = set(cfg.eval.evals) - set(EVALS)
        if unknown:
            raise ValueError(f"config.eval.evals has unknown evaluations {sorted(unknown)}; "
                             f"choose from {EVALS}")
        self.cfg, self.model, self.lm, self.tokenizer, self.sources = cfg, model, lm, tokenizer, sources
        replicated = sharding_lib.replicated(mesh)
        self._forward = jax.jit(forward, out_shardings=replicated)
        self._words = jax.jit(functools.partial(encode_words, model=model, cfg=cfg),
                              out_shardings=replicated)
        self._llm = None

    def run(self, params, frozen, step: int, workdir: str, names=None) -> dict[str, float]:
        scalars: dict[str, float] = {}
        words: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in (self.cfg.eval.evals if names is None else names):
            result = getattr(self, f"_{name}")(params, frozen, step, workdir, words)
            eval_runner.write_eval_json(workdir, name, step, result)
            if jax.process_index() == 0:
                for line in _summary(name, result):
                    print(f"  {line}", flush=True)
            scalars.update({f"{name}/{k}": v for k, v in result.items()
                            if isinstance(v, (int, float))})
        return scalars

    # -- the words of a whole split, once per call --------------------------------------------

    def _split_words(self, params, frozen, split: str, words: dict):
        if split not in words:
            source = self.sources[split]
            bs = int(self.cfg.eval.batch_size)
            limit = int(self.cfg.eval.get("max_images", 0)) or len(source)
            ids, labels = [], []
            for start in range(0, min(limit, len(source)), bs):
                idx = range(start, min(start + bs, limit, len(source)))
                images = np.stack([source[i]["image"] for i in idx])
                pad = bs - len(images)  # one compiled shape: pad the last batch
                images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
                ids.append(np.asarray(self._words(params, frozen, images))[:len(idx)])
                labels.extend(int(source[i]["label"]) for i in idx)
            words[split] = (np.concatenate(ids), np.asarray(labels))
        return words[split]

    def _features(self, frozen, token_ids: np.ndarray, layer: int) -> np.ndarray:
        return fewshot_lib.encoder_features(self.lm, {"params": frozen["lm"]}, token_ids,
                                            layer=layer)

    # -- evaluations --------------------------------------------------------------------------

    def _reconstruction(self, params, frozen, step, workdir, words):
        source = self.sources["validation"]
        bs, n = int(self.cfg.eval.batch_size), int(self.cfg.eval.num_batches)
        rng = jax.random.PRNGKey(self.cfg.seed + 2)  # fixed masks: comparable across steps
        sums: dict[str, float] = {}
        all_idx, first = [], None
        for b in range(n):
            idx = [(b * bs + i) % len(source) for i in range(bs)]
            images = np.stack([source[i]["image"] for i in idx])
            out = jax.device_get(self._forward(params, frozen, images, jax.random.fold_in(rng, b)))
            x = pixels.to_float(images)
            for tag, rec in (("quantized", out["recon_q"]), ("lm_filled", out["recon_lm"])):
                rec = np.clip(rec, -1, 1)
                metrics = {f"mse_{tag}": float(np.mean((rec - x) ** 2)),
                           f"psnr_{tag}": recon_lib.psnr(rec, x, data_range=2.0)[1],
                           f"ssim_{tag}": recon_lib.ssim(rec, x, data_range=2.0)[1]}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v / n
            all_idx.append(np.asarray(out["q"].indices))
            first = first or (x, out)
        vocab = roberta.word_embedding_matrix(frozen["lm"]).shape[0]
        result = {**sums, **recon_lib.codebook_stats(np.concatenate(all_idx), vocab)}
        if jax.process_index() == 0:
            x, out = first
            k = min(int(self.cfg.eval.num_images), x.shape[0])
            recon_lib.png_grid([x[:k], np.clip(out["recon_q"][:k], -1, 1),
                                np.clip(out["recon_lm"][:k], -1, 1)],
                               files.join(workdir, f"reconstructions_{step:06d}.png"))
            ids = np.asarray(out["q"].indices)
            lines = [f"# step {step}: the words each validation image became ({ids.shape[1]} "
                     "tokens, patches in row-major order)"]
            lines += [f"image {j}: " + " ".join(self.tokenizer.convert_ids_to_tokens(
                [int(t) for t in ids[j]])) for j in range(k)]
            files.write_text(files.join(workdir, f"words_{step:06d}.txt"), "\n".join(lines) + "\n")
        return result

    def _episodes(self, run_one) -> dict[str, float]:
        fs = self.cfg.eval.fewshot
        result = {}
        for n_way in fs.ways:
            for k_shot in fs.shots:
                r = run_one(n_way, k_shot)
                for k, v in r.items():
                    result[f"{n_way}way_{k_shot}shot_{k}"] = float(v)
        return result

    def _fewshot(self, params, frozen, step, workdir, words):
        ids, labels = self._split_words(params, frozen, self.cfg.eval.fewshot.split, words)
        fs = self.cfg.eval.fewshot
        features = self._features(frozen, ids, fs.layer)
        class_names = self.sources[fs.split].class_names
        return self._episodes(lambda n, k: fewshot_lib.run_fewshot(
            labels, class_names, n_way=n, k_shot=k, n_query=fs.queries,
            num_episodes=fs.episodes, seed=fs.seed, features=features))

    def _fewshot_llm(self, params, frozen, step, workdir, words):
        from lqae_vlap import models  # noqa: PLC0415  (loads a causal LLM only when asked)

        fs = self.cfg.eval.fewshot
        if not self.cfg.eval.llm_path:
            raise ValueError("config.eval.evals has 'fewshot_llm' but config.eval.llm_path is "
                             "empty; point it at a causal LM folder or GGUF file")
        if self._llm is None:
            module, variables, _ = models.load_pretrained(self.cfg.eval.llm_path)
            tok = models.load_tokenizer(self.cfg.eval.llm_path)
            self._llm = fewshot_lib.make_lm_scorer(
                tok, fewshot_lib.causal_lm_logprob_fn(module, variables))
        ids, labels = self._split_words(params, frozen, fs.split, words)
        texts = [fewshot_lib.image_text(row, self.tokenizer) for row in ids]
        class_names = self.sources[fs.split].class_names
        return self._episodes(lambda n, k: fewshot_lib.run_fewshot(
            labels, class_names, n_way=n, k_shot=k, n_query=fs.queries,
            num_episodes=fs.llm_episodes, seed=fs.seed, texts=texts, lm_scorer=self._llm))

    def _linear_probe(self, params, frozen, step, workdir, words):
        p = self.cfg.eval.probe
        cache = files.join(workdir, "probe_features")

        def features(split):
            def compute():
                ids, labels = self._split_words(params, frozen, split, words)
                return self._features(frozen, ids, p.layer), labels
            return probe_lib.cached_features(cache, step=step, layer=p.layer, split=split,
                                             compute_fn=compute)

        (tx, ty), (vx, vy) = features("train"), features("validation")
        num_classes = len(self.sources["validation"].class_names)
        result = probe_lib.train_linear_probe(tx, ty, vx, vy, num_classes, epochs=p.epochs,
                                              learning_rate=p.lr, weight_decay=p.weight_decay)
        result["chance"] = float(np.bincount(vy).max() / len(vy))  # majority class
        return result
