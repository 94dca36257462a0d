"""VLAP: Bridging Vision and Language Spaces with Assignment Prediction (Park, Lee, Sohn; ICLR 2024).

frozen vision encoder -> tokens [B, T, Dv] -> ONE trainable Dense(Dv -> D, with bias) on every
token -> the frozen LLM's input-embedding space, where the whole projected sequence is the LLM's
prefix. Nothing else is trained.

Loss = w_map * L_map + w_cap * L_cap  (0.1 and 1.0 in the paper; ``config.loss``):
  L_cap: next-token cross-entropy of the frozen LLM on the caption, with input
         [projected visual tokens ; embedded prompt "A picture of" ; caption]; only caption tokens
         count (not the prefix, the prompt or padding).
  L_map: assignment prediction. s = cosine similarity of a representation to every L2-normalised
         word embedding of the LLM ([B, V]). Image representation: mean of the projected tokens.
         Text representation: the frozen LLM's last hidden states on the caption alone,
         mean-pooled over real tokens (constant: the LLM is frozen). Q_v, Q_t = Sinkhorn(s_v),
         Sinkhorn(s_t) (constant targets); swapped prediction
             L_map = 1/2 [CE(Q_t, softmax(s_v / tau)) + CE(Q_v, softmax(s_t / tau))],  tau 0.01.
         Only the first term reaches the Dense: s_t does not depend on it.

Sinkhorn (``config.sinkhorn.mode``): 'paper' is optimal transport whose word marginal is the
word frequency over the training captions (ops/sinkhorn.py ``sinkhorn``); 'released_code' is what
the authors' released script computes, a prior-weighted softmax per sample that never normalises
over the words (``sinkhorn_released_code`` with prior softmax(frequency / 0.25)).

Frozen weights (the LLM, the vision encoder, the prompt ids, the word frequencies) live in a
separate ``frozen`` tree: the optimizer never sees them and ``jax.grad`` never differentiates
them (gradients still flow *through* the LLM to the Dense in L_cap).

Decoder-only LLMs (Llama-family from an HF folder or a GGUF file, OPT) are supported; T5 is not
wired up yet (``build`` raises NotImplementedError naming what is missing).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap.data import batches as batches_lib
from lqae_vlap.data import captions as captions_lib
from lqae_vlap.data import preprocess as preprocess_lib
from lqae_vlap.ops import sinkhorn as sinkhorn_lib
from lqae_vlap.train import sharding as sharding_lib
from lqae_vlap.train.trainer import Method

SINKHORN_MODES = ("paper", "released_code")


class VisualMap(nn.Module):
    """The only trainable part: one Dense(vision_width -> llm_width, with bias) on every token.

    The vision width has no logical name of its own (replicated); the output side is the LLM's
    model width, 'embed' (sharded over fsdp like the LLM's own embed axes).
    """

    llm_width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, T, Dv] vision features -> [B, T, llm_width] prefix embeddings."""
        return nn.Dense(
            self.llm_width, use_bias=True, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="Dense_0")(tokens)


# ----------------------------------------------------------------------------------------------
# Losses


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| along the last axis (zero vectors stay zero), in float32 at least."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps))


def word_scores(repr_: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    """Cosine similarities. repr_: [B, D], word_embeddings: [V, D] -> [B, V] float32."""
    return l2_normalize(repr_) @ l2_normalize(word_embeddings).T


def _soft_cross_entropy(target: jax.Array, logits: jax.Array) -> jax.Array:
    """mean_b -sum_k target[b, k] log softmax(logits)[b, k]; target: [B, V] constant."""
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def assignments(scores: jax.Array, *, col_marginal: jax.Array | None, epsilon: float,
                num_iters: int, sinkhorn_mode: str = "paper",
                prior_temperature: float = 0.25) -> jax.Array:
    """Constant word assignments Q [B, V] (rows sum to 1) from scores [B, V].

    sinkhorn_mode 'paper': optimal transport with word marginal ``col_marginal`` (uniform if
    None). 'released_code': the authors' released computation, a per-sample softmax weighted by
    the prior softmax(col_marginal / prior_temperature) (uniform if None); it does not enforce
    the word marginal.
    """
    if sinkhorn_mode == "paper":
        return sinkhorn_lib.sinkhorn(scores, epsilon=epsilon, num_iters=num_iters,
                                     col_marginal=col_marginal)
    if sinkhorn_mode == "released_code":
        if col_marginal is None:
            prior = jnp.ones((scores.shape[1],), jnp.float32)
        else:
            prior = sinkhorn_lib.released_code_word_prior(col_marginal, prior_temperature)
        return sinkhorn_lib.sinkhorn_released_code(scores, epsilon=epsilon, prior=prior,
                                                   num_iters=num_iters)
    raise ValueError(f"sinkhorn_mode={sinkhorn_mode!r} is not known; use one of {SINKHORN_MODES} "
                     "(config.sinkhorn.mode)")


def assignment_prediction_loss(
    visual_repr: jax.Array, text_repr: jax.Array, word_embeddings: jax.Array, *,
    col_marginal: jax.Array | None, epsilon: float, num_iters: int, temperature: float,
    sinkhorn_mode: str = "paper", prior_temperature: float = 0.25,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VLAP's L_map (swapped assignment prediction over the LLM's words).

    Args:
      visual_repr: [B, D] image representations (mean of the projected visual tokens).
      text_repr: [B, D] text representations (the frozen LLM's mean-pooled caption states).
      word_embeddings: [V, D] the LLM's input word embeddings (L2-normalised here).
      col_marginal: [V] word marginal (word frequencies), or None for uniform.
      epsilon, num_iters: Sinkhorn temperature and iterations (0.01 and 3 in VLAP).
      temperature: tau of the predictions softmax(s / tau) (0.01 in VLAP).
      sinkhorn_mode: 'paper' or 'released_code' (see ``assignments``).
      prior_temperature: temperature of the released code's word prior (0.25).

    Returns:
      (L_map scalar, aux dict: 'map_v' = CE(Q_t, softmax(s_v / tau)), 'map_t' = CE(Q_v,
      softmax(s_t / tau)), 'assign_agreement' = fraction of samples whose argmax word is the
      same under Q_v and Q_t).
    """
    if visual_repr.ndim != 2 or visual_repr.shape != text_repr.shape:
        raise ValueError(f"assignment_prediction_loss: visual_repr and text_repr must both be "
                         f"[batch, dim], got {visual_repr.shape} and {text_repr.shape}")
    if word_embeddings.ndim != 2 or word_embeddings.shape[1] != visual_repr.shape[1]:
        raise ValueError(f"assignment_prediction_loss: word_embeddings must be [vocab, "
                         f"{visual_repr.shape[1]}], got {word_embeddings.shape}")
    s_v = word_scores(visual_repr, word_embeddings)
    s_t = word_scores(text_repr, word_embeddings)
    kw = dict(col_marginal=col_marginal, epsilon=epsilon, num_iters=num_iters,
              sinkhorn_mode=sinkhorn_mode, prior_temperature=prior_temperature)
    # Targets are constants (sinkhorn stop_gradients its scores), as in SwAV / VLAP.
    q_v = jax.lax.stop_gradient(assignments(s_v, **kw))
    q_t = jax.lax.stop_gradient(assignments(s_t, **kw))
    map_v = _soft_cross_entropy(q_t, s_v / temperature)
    map_t = _soft_cross_entropy(q_v, s_t / temperature)
    agreement = jnp.mean((jnp.argmax(q_v, -1) == jnp.argmax(q_t, -1)).astype(jnp.float32))
    return 0.5 * (map_v + map_t), {"map_v": map_v, "map_t": map_t,
                                   "assign_agreement": agreement}


def captioning_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over positions where loss_mask is 1 (0 when none).

    logits: [B, N, V] (position i predicts targets[:, i]; the caller shifts), targets: [B, N]
    int, loss_mask: [B, N] (1 on caption tokens only: prefix, prompt and padding are 0).
    """
    if logits.shape[:2] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"captioning_loss: logits [B, N, V], targets [B, N] and loss_mask [B, N] "
                         f"must agree, got {logits.shape}, {targets.shape}, {loss_mask.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def caption_targets(num_before: int, caption_ids: jax.Array, caption_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Shifted targets for the sequence [num_before prefix/prompt slots ; caption (L)].

    Position i predicts token i + 1, so caption token j is the target of position
    num_before + j - 1. Returns (targets [B, num_before + L] int32, mask [B, num_before + L]).
    """
    if num_before < 1:
        raise ValueError("caption_targets: need at least one slot before the caption (the visual "
                         "prefix) to predict its first token")
    b = caption_ids.shape[0]
    head = jnp.zeros((b, num_before - 1), jnp.int32)
    tail = jnp.zeros((b, 1), jnp.int32)
    targets = jnp.concatenate([head, caption_ids.astype(jnp.int32), tail], axis=1)
    mask = jnp.concatenate([head, caption_mask.astype(jnp.int32), tail], axis=1)
    return targets, mask


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D], mask: [B, L] -> mean over real tokens [B, D] (float32)."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


# ----------------------------------------------------------------------------------------------
# The demo's stand-in vision encoder


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images: [B, H, W, C] -> [B, (H/p)(W/p), p*p*C] non-overlapping patches, row-major."""
    _, h, w, _ = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patchify: image {h}x{w} is not divisible by patch_size {patch_size}")
    return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size,
                            q=patch_size)


def standin_projection(seed: int, patch_dim: int, vision_width: int) -> np.ndarray:
    """The stand-in's FIXED random projection [patch_dim, vision_width] (seeded, never trained)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((patch_dim, vision_width)) / np.sqrt(patch_dim)).astype(np.float32)


def standin_features(frozen_vision: dict[str, jax.Array], images: jax.Array, *,
                     patch_size: int) -> jax.Array:
    """A STAND-IN for a pretrained vision encoder (demos only): uint8 images [B, H, W, C] ->
    pixels in [-1, 1] -> patches -> a fixed random projection -> tokens [B, N, vision_width]."""
    x = preprocess_lib.to_float(images) if images.dtype == jnp.uint8 else images
    return patchify(x, patch_size) @ frozen_vision["projection"]


def clip_features(frozen_vision: dict[str, Any], images: jax.Array, *, module: Any) -> jax.Array:
    """Frozen CLIP vision tower: uint8 [B, 224, 224, 3] (resized and cropped on the host) ->
    last hidden states [B, 1 + N, width] (CLS + patch tokens, 50 for ViT-B/32)."""
    from lqae_vlap.data import clip_preprocess  # noqa: PLC0415

    x = clip_preprocess.clip_normalize(images) if images.dtype == jnp.uint8 else images
    return module.apply({"params": frozen_vision["params"]}, x)["last_hidden_state"]


# ----------------------------------------------------------------------------------------------
# The loss the trainer differentiates


def forward(params, frozen, batch, *, visual_map: VisualMap, llm: nn.Module,
            vision_fn: Callable[[Any, jax.Array], jax.Array]) -> dict[str, jax.Array]:
    """Projected prefix, its mean, and the frozen LLM's text representation.

    batch: 'vision_features' [B, T, Dv] (precomputed frozen vision tokens) or 'image' (run
    through ``vision_fn``); 'caption_ids', 'caption_mask' [B, L].
    """
    if "vision_features" in batch:
        feats = batch["vision_features"]
    elif "image" in batch:
        feats = vision_fn(frozen["vision"], batch["image"])
    else:
        raise ValueError("VLAP batch needs 'vision_features' [B, T, Dv] or 'image' [B, H, W, C]; "
                         f"got keys {sorted(batch)}")
    feats = jax.lax.stop_gradient(feats)  # the vision encoder is frozen
    prefix = visual_map.apply({"params": params}, feats)  # [B, T, D]
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    # The text side is frozen and a constant target: no gradient through it at all.
    text_hidden = llm.apply({"params": frozen["llm"]}, ids, attention_mask=mask)["hidden_states"]
    text_repr = jax.lax.stop_gradient(masked_mean(text_hidden, mask))
    return {"prefix": prefix, "visual_repr": jnp.mean(prefix.astype(jnp.float32), axis=1),
            "text_repr": text_repr}


def loss_fn(params, frozen, batch, rng, *, visual_map: VisualMap, llm: nn.Module,
            vision_fn: Callable[[Any, jax.Array], jax.Array], cfg: ml_collections.ConfigDict):
    """(params, frozen, batch, rng) -> (w_map * L_map + w_cap * L_cap, aux). rng is unused.

    frozen: {'llm': LLM params, 'prompt_ids': [P] int32, 'word_marginal': [V] float32,
    'vision': vision-encoder constants}.
    """
    del rng
    w, s = cfg.loss, cfg.sinkhorn
    out = forward(params, frozen, batch, visual_map=visual_map, llm=llm, vision_fn=vision_fn)
    words = frozen["llm"]["embed_tokens"]["embedding"]  # [V, D], the LLM's input embeddings
    l_map, map_aux = assignment_prediction_loss(
        out["visual_repr"], out["text_repr"], words, col_marginal=frozen["word_marginal"],
        epsilon=s.epsilon, num_iters=s.num_iters, temperature=w.temperature,
        sinkhorn_mode=s.mode, prior_temperature=s.prior_temperature)

    prefix, ids, mask = out["prefix"], batch["caption_ids"], batch["caption_mask"]
    b, t = prefix.shape[:2]
    prompt = jnp.broadcast_to(frozen["prompt_ids"][None, :], (b, frozen["prompt_ids"].shape[0]))
    text_embeds = jnp.take(words, jnp.concatenate([prompt, ids], axis=1), axis=0)
    inputs = jnp.concatenate([prefix.astype(text_embeds.dtype), text_embeds], axis=1)
    before = t + prompt.shape[1]
    attn = jnp.concatenate([jnp.ones((b, before), jnp.int32), mask.astype(jnp.int32)], axis=1)
    # Right padding only: positions 0..N-1 are the real positions for every real token.
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), attn.shape)
    logits = llm.apply({"params": frozen["llm"]}, inputs_embeds=inputs, attention_mask=attn,
                       positions=positions)["logits"]
    targets, loss_mask = caption_targets(before, ids, mask)
    l_cap = captioning_loss(logits, targets, loss_mask)
    loss = w.map * l_map + w.cap * l_cap
    return loss, {"map": l_map, "cap": l_cap, **map_aux}


# ----------------------------------------------------------------------------------------------
# Building: LLM, vision encoder, data


def _is_local(path: str) -> bool:
    return bool(path) and os.path.exists(os.path.expanduser(str(path)))


def _arch_config(arch: Any, field: str, path: str) -> Any:
    """A transformers config object from ``arch`` (a dict of HF config fields with model_type)."""
    from transformers import AutoConfig  # noqa: PLC0415

    arch = arch.to_dict() if isinstance(arch, ml_collections.ConfigDict) else dict(arch or {})
    if "model_type" not in arch:
        raise ValueError(f"plan mode: {path!r} is not a local checkpoint folder and {field} gives "
                         "no architecture to plan from; pass the local folder, or set "
                         f"{field} to the HF config fields incl. model_type (see "
                         "configs/vlap_opt.py)")
    return AutoConfig.for_model(**arch)


def _load_llm(m: ml_collections.ConfigDict, mesh, abstract: bool = False):
    """Returns (module, params, tokenizer) for config.model.llm_*.

    abstract=True reads no tensor and returns no tokenizer (None): params are ShapeDtypeStructs,
    built from the checkpoint's config.json when ``llm_path`` is local, else from
    ``config.model.llm_arch``.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415

    dtype = jnp.dtype(m.get("llm_dtype", "float32"))
    family, path = m.llm_family, m.llm_path
    if family == "t5":
        raise NotImplementedError(
            "VLAP with T5 is not wired up yet: methods/vlap.py needs a T5 loss path (text "
            "representation from t5.encode, captioning through the decoder with the visual prefix "
            "as encoder input). Use config.model.llm_family='opt' or 'llama' for now.")
    if family not in ("opt", "llama"):
        raise ValueError(f"config.model.llm_family={family!r} is not known; use 'opt', 'llama' "
                         "(HF folder or .gguf file) or 't5'")
    models = importlib.import_module(f"lqae_vlap.models.{family}")
    if abstract:
        if str(path).endswith(".gguf"):
            from lqae_vlap.models.gguf import open_gguf  # noqa: PLC0415  (metadata only)

            hf_config, _ = open_gguf(path)
        elif _is_local(path):
            hf_config = None  # the folder's own config.json
        else:
            hf_config = _arch_config(m.get("llm_arch"), "config.model.llm_arch", path)
        module, variables, _ = models.load(None if hf_config is not None else path, dtype=dtype,
                                           mesh=mesh, abstract=True, hf_config=hf_config)
        return module, variables["params"], None
    if family == "llama" and str(path).endswith(".gguf"):
        module, variables, _ = models.load_gguf(path, dtype=dtype, mesh=mesh)
        folder, name = os.path.split(str(path))
        tok = AutoTokenizer.from_pretrained(m.get("tokenizer_path") or folder, gguf_file=(
            None if m.get("tokenizer_path") else name))
    else:
        module, variables, _ = models.load(path, dtype=dtype, mesh=mesh)
        tok = AutoTokenizer.from_pretrained(m.get("tokenizer_path") or path, local_files_only=True)
    return module, variables["params"], tok


def _vision(config: ml_collections.ConfigDict, mesh, abstract: bool = False):
    """Returns (vision_fn, frozen vision tree, vision_width, host image preprocess, image size).

    abstract=True: the frozen tree holds ShapeDtypeStructs (CLIP from ``vision.arch`` when
    ``vision.path`` is not a local folder).
    """
    v = config.model.vision
    if v.kind == "standin":
        size, patch = int(config.model.image_size), int(v.patch_size)
        rep = sharding_lib.replicated(mesh)
        if abstract:
            proj = jax.ShapeDtypeStruct((patch * patch * 3, int(v.width)), jnp.float32,
                                        sharding=rep)
        else:
            proj = jax.device_put(standin_projection(int(v.seed), patch * patch * 3,
                                                     int(v.width)), rep)
        return (functools.partial(standin_features, patch_size=patch), {"projection": proj},
                int(v.width), None, size)
    if v.kind == "clip":
        from lqae_vlap.data import clip_preprocess  # noqa: PLC0415
        from lqae_vlap.models import clip  # noqa: PLC0415

        hf_config = None
        if abstract and not _is_local(v.path):
            hf_config = _arch_config(v.get("arch"), "config.model.vision.arch", v.path)
        module, variables, _ = clip.load(None if hf_config is not None else v.path,
                                         dtype=jnp.dtype(v.get("dtype", "float32")), mesh=mesh,
                                         with_projection=False, abstract=abstract,
                                         hf_config=hf_config)
        size = module.config.image_size
        host = functools.partial(clip_preprocess.clip_resize_crop, size=size, crop=size)
        return (functools.partial(clip_features, module=module), {"params": variables["params"]},
                module.config.hidden_size, host, size)
    raise ValueError(f"config.model.vision.kind={v.kind!r} is not known; use 'standin' (demo "
                     "only) or 'clip'")


def _sources(config):
    d = config.data
    if d.name == "digits":
        size = int(config.model.image_size)
        return (captions_lib.DigitCaptions("train", image_size=size),
                captions_lib.DigitCaptions("validation", image_size=size))
    if d.name == "jsonl":
        return captions_lib.JsonlCaptions(d.train_path), captions_lib.JsonlCaptions(d.eval_path)
    raise ValueError(f"config.data.name={d.name!r} is not known; use 'digits' or 'jsonl' (folders "
                     "of {\"image\", \"caption\"} lines)")


def _word_marginal(config, tokenizer, vocab: int, train_src) -> tuple[np.ndarray, str]:
    """The Sinkhorn word marginal [V] float32 and where it came from."""
    from lqae_vlap.ops import word_frequency  # noqa: PLC0415

    wm = config.word_marginal
    if wm.source == "uniform":
        return np.full((vocab,), 1.0 / vocab, np.float32), "uniform"
    if wm.source == "count":
        if not hasattr(train_src, "captions"):
            raise ValueError("config.word_marginal.source='count' needs a source that lists its "
                             "captions; save one with ops/word_frequency.py and pass its path")
        texts = [" " + c for c in train_src.captions]
        counts = word_frequency.count_token_frequencies(texts, tokenizer, vocab)
        probs = word_frequency.smooth_frequencies(counts, alpha=wm.alpha, power=wm.power)
        return probs.astype(np.float32), f"counted over {len(texts)} training captions"
    probs, meta = word_frequency.load_marginal(wm.source, vocab_size=vocab)
    return probs.astype(np.float32), f"{wm.source} ({meta.get('dataset')})"


def _make_preprocess(tokenizer, max_len: int, host_image: Callable | None):
    def fn(example, rng):
        del rng
        ids, mask = captions_lib.tokenize_captions(tokenizer, [example["caption"]], max_len)
        image = example["image"] if host_image is None else host_image(example["image"])
        return {"image": np.asarray(image, np.uint8), "caption_ids": ids[0],
                "caption_mask": mask[0]}
    return fn


def make_evaluate(config, visual_map, llm, vision_fn, tokenizer, eval_batches, mesh):
    """Held-out losses plus greedy captions of a few validation images (written to a file)."""
    from lqae_vlap.models import generate  # noqa: PLC0415

    loss = jax.jit(functools.partial(loss_fn, visual_map=visual_map, llm=llm,
                                     vision_fn=vision_fn, cfg=config),
                   out_shardings=sharding_lib.replicated(mesh))
    num_batches, max_new = int(config.eval.num_batches), int(config.eval.max_new_tokens)
    family = config.model.llm_family
    models = importlib.import_module(f"lqae_vlap.models.{family}")
    apply_fn = llm.apply
    init_cache_fn = functools.partial(models.init_cache, llm.config)
    embed_fn = models.embed_tokens

    @jax.jit
    def prefixes(params, frozen, images):
        feats = vision_fn(frozen["vision"], images)
        return visual_map.apply({"params": params}, feats)

    def evaluate(params, frozen, step, workdir):
        sums: dict[str, float] = {}
        for i in range(num_batches):
            batch = eval_batches.batch_at(i)
            _, aux = loss(params, frozen, batch, jax.random.PRNGKey(0))
            for k, v in jax.device_get(aux).items():
                sums[k] = sums.get(k, 0.0) + float(v) / num_batches
        batch = eval_batches.batch_at(0)
        k = min(int(config.eval.num_captions), batch["image"].shape[0])
        prefix = prefixes(params, frozen, jnp.asarray(batch["image"][:k]))
        prompt = jnp.broadcast_to(frozen["prompt_ids"][None], (k, frozen["prompt_ids"].shape[0]))
        out = generate.greedy_search(
            apply_fn, {"params": frozen["llm"]}, input_ids=prompt,
            attention_mask=jnp.ones_like(prompt), max_new_tokens=max_new,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=captions_lib.pad_id(tokenizer),
            prefix_embeds=prefix, embed_fn=embed_fn, init_cache_fn=init_cache_fn)
        out = np.asarray(jax.device_get(out))
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        refs = [tokenizer.decode(ids[m > 0], skip_special_tokens=True)
                for ids, m in zip(batch["caption_ids"][:k], batch["caption_mask"][:k])]
        sums["caption_exact"] = float(np.mean([a.strip() == b.strip()
                                               for a, b in zip(texts, refs)]))
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"captions_{step:06d}.txt"), "w") as f:
                f.write(f"# step {step}: prompt {config.model.prompt!r}; generated | reference\n")
                for a, b in zip(texts, refs):
                    f.write(" ".join(a.split()) + " | " + " ".join(b.split()) + "\n")
            with open(os.path.join(workdir, f"eval_{step:06d}.json"), "w") as f:
                json.dump({"step": step, **sums, "captions": texts}, f, indent=1)
        return sums

    return evaluate


def _prompt_len(m: ml_collections.ConfigDict) -> int:
    """Prompt tokens in plan mode: tokenised with a local tokenizer folder, else prompt_len."""
    folder = m.get("tokenizer_path") or m.llm_path
    if _is_local(folder) and os.path.isdir(folder):
        from transformers import AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return len(tok(m.prompt, add_special_tokens=False)["input_ids"])
    if int(m.get("prompt_len", 0)) < 1:
        raise ValueError("plan mode: no local tokenizer to count the prompt's tokens; set "
                         "config.model.prompt_len to their number (3 for 'A picture of' in OPT)")
    return int(m.prompt_len)


def build(config: ml_collections.ConfigDict, mesh, *, abstract: bool = False) -> Method:
    """Loads the frozen LLM and vision encoder, builds the Dense, data and loss for the trainer.

    abstract=True reads no weights and no data (plan mode): ``frozen`` holds
    ``jax.ShapeDtypeStruct``s (LLM, vision, prompt ids [P], word marginal [V]) and ``batch_spec``
    the global batch (image [B, S, S, 3] uint8, caption_ids / caption_mask [B, L] int32).
    """
    m = config.model
    if config.sinkhorn.mode not in SINKHORN_MODES:
        raise ValueError(f"config.sinkhorn.mode={config.sinkhorn.mode!r} is not known; use one of "
                         f"{SINKHORN_MODES}")
    llm, llm_params, tokenizer = _load_llm(m, mesh, abstract=abstract)
    words = llm_params["embed_tokens"]["embedding"]
    vocab, llm_width = words.shape
    vision_fn, frozen_vision, vision_width, host_image, image_size = _vision(config, mesh,
                                                                            abstract)
    visual_map = VisualMap(llm_width=llm_width, dtype=jnp.dtype(m.get("dtype", "float32")))
    rep = sharding_lib.replicated(mesh)

    def init_params(rng):
        return visual_map.init(rng, jnp.zeros((1, 1, vision_width), jnp.float32))["params"]

    loss = functools.partial(loss_fn, visual_map=visual_map, llm=llm, vision_fn=vision_fn,
                             cfg=config)
    d = config.data
    if abstract:
        prompt_len, cap = _prompt_len(m), int(m.max_caption_len)
        frozen = {"llm": llm_params, "vision": frozen_vision,
                  "prompt_ids": jax.ShapeDtypeStruct((prompt_len,), jnp.int32, sharding=rep),
                  "word_marginal": jax.ShapeDtypeStruct((vocab,), jnp.float32, sharding=rep)}
        batch_spec = {
            "image": jax.ShapeDtypeStruct((d.batch_size, image_size, image_size, 3), jnp.uint8),
            "caption_ids": jax.ShapeDtypeStruct((d.batch_size, cap), jnp.int32),
            "caption_mask": jax.ShapeDtypeStruct((d.batch_size, cap), jnp.int32)}
        arch = "" if _is_local(m.llm_path) else " (architecture from config.model.llm_arch)"
        describe = (f"VLAP plan: frozen {m.vision.kind} vision (width {vision_width}) -> Dense -> "
                    f"frozen {m.llm_family} {m.llm_path}{arch} (vocab {vocab}, width "
                    f"{llm_width}); prompt {prompt_len} tokens, captions {cap} tokens")
        return Method(init_params=init_params, frozen=frozen,
                      frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen), loss_fn=loss,
                      train_batches=None, batch_spec=batch_spec, describe=describe)

    train_src, val_src = _sources(config)
    marginal, marginal_from = _word_marginal(config, tokenizer, vocab, train_src)
    prompt_ids = np.asarray(tokenizer(m.prompt, add_special_tokens=False)["input_ids"], np.int32)
    frozen = {"llm": llm_params, "vision": frozen_vision,
              "prompt_ids": jax.device_put(prompt_ids, rep),
              "word_marginal": jax.device_put(marginal, rep)}
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

    pre = _make_preprocess(tokenizer, int(m.max_caption_len), host_image)
    pid, pcount = jax.process_index(), jax.process_count()
    train_batches = batches_lib.IndexedBatches(
        train_src, global_batch_size=d.batch_size, seed=d.seed, shuffle=True,
        process_index=pid, process_count=pcount, preprocess=pre, num_workers=d.num_workers)
    eval_batches = batches_lib.IndexedBatches(
        val_src, global_batch_size=config.eval.batch_size, seed=0, shuffle=False,
        preprocess=pre, num_workers=d.num_workers)

    describe = (f"VLAP: frozen {m.vision.kind} vision (width {vision_width}) -> Dense -> frozen "
                f"{m.llm_family} {m.llm_path} (vocab {vocab}, width {llm_width}); prompt "
                f"{m.prompt!r} = {len(prompt_ids)} tokens; sinkhorn {config.sinkhorn.mode} "
                f"(eps {config.sinkhorn.epsilon}, {config.sinkhorn.num_iters} iters), word "
                f"marginal {marginal_from}; loss {config.loss.map} * map + {config.loss.cap} * cap"
                f"; data {d.name}: {len(train_src)} train / {len(val_src)} validation pairs")
    return Method(init_params=init_params, frozen=frozen, frozen_shardings=frozen_shardings,
                  loss_fn=loss, train_batches=train_batches, eval_batches=eval_batches,
                  evaluate=make_evaluate(config, visual_map, llm, vision_fn, tokenizer,
                                         eval_batches, mesh),
                  describe=describe)
