"""VLAP: Bridging Vision and Language Spaces with Assignment Prediction (Park, Lee, Sohn; ICLR 2024).

frozen vision encoder -> tokens [B, T, Dv] -> ONE trainable Dense(Dv -> D, with bias) on every
token -> the frozen LLM's input-embedding space, where the whole projected sequence is the LLM's
prefix. Nothing else is trained.

Loss = w_map * L_map + w_cap * L_cap  (0.1 and 1.0 in the paper; ``config.loss``):
  L_cap: the frozen LLM's cross-entropy on the caption tokens only (not the prefix, the prompt
         "A picture of" or padding). Decoder-only LLMs (OPT, Llama): next-token prediction on
         [projected visual tokens ; embedded prompt ; caption]. T5: the encoder reads
         [projected visual tokens ; embedded prompt] and the decoder is teacher-forced on the
         caption (transformers' labels= loss).
  L_map: assignment prediction. s = cosine similarity of a representation to every L2-normalised
         word embedding of the LLM ([B, V]). Image representation: mean of the projected tokens.
         Text representation: the frozen LLM's last hidden states on the caption alone (T5: the
         ENCODER's), mean-pooled over real tokens (constant: the LLM is frozen). Q_v, Q_t =
         Sinkhorn(s_v), Sinkhorn(s_t) (constant targets); swapped prediction
             L_map = 1/2 [CE(Q_t, softmax(s_v / tau)) + CE(Q_v, softmax(s_t / tau))],  tau 0.01.
         Only the first term reaches the Dense: s_t does not depend on it.

Sinkhorn (``config.sinkhorn.mode``, ops/sinkhorn.py ``assignments``): 'paper' is optimal
transport whose word marginal is the word frequency over the training captions; 'released_code'
is what the authors' released script computes, a prior-weighted softmax per sample that never
normalises over the words.

Frozen weights (the LLM, the vision encoder, the prompt ids, the word frequencies) live in a
separate ``frozen`` tree: the optimizer never sees them and ``jax.grad`` never differentiates
them (gradients still flow *through* the LLM to the Dense in L_cap).

This file holds the method and a build that only assembles: the LLM behind one interface
(methods/vlap_llm.py: OPT, Llama from HF folders or GGUF, T5 / Flan-T5, in
``config.model.llm_dtype``), the vision tower (methods/vlap_vision.py), the data
(data/sources.py; ``config.data.feature_cache``: data/feature_cache.py), the word marginal
(ops/word_frequency.py) and the evaluations (methods/vlap_evals.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.data import batches as batches_lib
from lqae_vlap.data import captions as captions_lib
from lqae_vlap.data import feature_cache
from lqae_vlap.data import sources as sources_lib
from lqae_vlap.evals import runner as eval_runner
from lqae_vlap.methods import vlap_evals, vlap_llm, vlap_vision
from lqae_vlap.methods.method import Method
from lqae_vlap.methods.vlap_llm import FrozenLLM
from lqae_vlap.ops import losses, word_frequency
from lqae_vlap.ops import sinkhorn as sinkhorn_lib

# The captioned data of data/sources.py.
DATA = ("digits", "digit_scenes", "jsonl", "coco_captions", "cc3m")


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


def word_scores(repr_: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    """Cosine similarities. repr_: [B, D], word_embeddings: [V, D] -> [B, V] float32."""
    return losses.l2_normalize(repr_) @ losses.l2_normalize(word_embeddings).T


def assignment_prediction_loss(
    visual_repr: jax.Array, text_repr: jax.Array, word_embeddings: jax.Array, *,
    col_marginal: jax.Array | None, epsilon: float, num_iters: int, temperature: float,
    sinkhorn_mode: str = "paper", prior_temperature: float = 0.25, sinkhorn_impl: str = "lax",
    sinkhorn_mesh: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VLAP's L_map (swapped assignment prediction over the LLM's words).

    Args:
      visual_repr: [B, D] image representations (mean of the projected visual tokens).
      text_repr: [B, D] text representations (the frozen LLM's mean-pooled caption states).
      word_embeddings: [V, D] the LLM's input word embeddings (L2-normalised here).
      col_marginal: [V] word marginal (word frequencies), or None for uniform.
      epsilon, num_iters: Sinkhorn temperature and iterations (0.01 and 3 in VLAP).
      temperature: tau of the predictions softmax(s / tau) (0.01 in VLAP).
      sinkhorn_mode, prior_temperature, sinkhorn_impl, sinkhorn_mesh: ops/sinkhorn.py
        ``assignments``' mode, prior_temperature, impl and mesh.

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
    assign = functools.partial(sinkhorn_lib.assignments, mode=sinkhorn_mode,
                               col_marginal=col_marginal, epsilon=epsilon, num_iters=num_iters,
                               prior_temperature=prior_temperature, impl=sinkhorn_impl,
                               mesh=sinkhorn_mesh)
    # Targets are constants (sinkhorn stop_gradients its scores), as in SwAV / VLAP.
    q_v, q_t = jax.lax.stop_gradient(assign(s_v)), jax.lax.stop_gradient(assign(s_t))
    map_v = losses.soft_cross_entropy(q_t, s_v / temperature)
    map_t = losses.soft_cross_entropy(q_v, s_t / temperature)
    agreement = jnp.mean((jnp.argmax(q_v, -1) == jnp.argmax(q_t, -1)).astype(jnp.float32))
    return 0.5 * (map_v + map_t), {"map_v": map_v, "map_t": map_t,
                                   "assign_agreement": agreement}


def forward(params, frozen, batch, *, visual_map: VisualMap, llm: FrozenLLM,
            vision_fn: Callable[[Any, jax.Array], jax.Array]) -> dict[str, jax.Array]:
    """Projected prefix, its mean, and the frozen LLM's text representation.

    batch: 'vision_features' [B, T, Dv] (precomputed frozen vision tokens) or 'image' (run
    through ``vision_fn``); 'caption_ids', 'caption_mask' [B, L].
    Returns prefix [B, T, D] (the Dense's dtype), visual_repr and text_repr [B, D] float32.
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
    # The text side is frozen and a constant target: no gradient through it at all
    # (decoder-only: the LM's last hidden states; T5: the encoder's).
    text_repr = jax.lax.stop_gradient(llm.text_repr(frozen["llm"], ids, mask))
    return {"prefix": prefix, "visual_repr": jnp.mean(prefix.astype(jnp.float32), axis=1),
            "text_repr": text_repr}


def loss_fn(params, frozen, batch, rng, *, visual_map: VisualMap, llm: FrozenLLM,
            vision_fn: Callable[[Any, jax.Array], jax.Array], cfg: ml_collections.ConfigDict,
            mesh: Any = None):
    """(params, frozen, batch, rng) -> (w_map * L_map + w_cap * L_cap, aux). rng is unused.

    frozen: {'llm': LLM params, 'prompt_ids': [P] int32, 'word_marginal': [V] float32,
    'vision': vision-encoder constants}. Losses are float32 whatever the LLM's dtype. mesh: the
    mesh the batch is split over (only the fused Sinkhorn, ``sinkhorn.impl='pallas'``, needs it).
    """
    del rng
    w, s = cfg.loss, cfg.sinkhorn
    out = forward(params, frozen, batch, visual_map=visual_map, llm=llm, vision_fn=vision_fn)
    words = llm.word_embeddings(frozen["llm"])  # [V, D], the LLM's input embeddings
    l_map, map_aux = assignment_prediction_loss(
        out["visual_repr"], out["text_repr"], words, col_marginal=frozen["word_marginal"],
        epsilon=s.epsilon, num_iters=s.num_iters, temperature=w.temperature,
        sinkhorn_mode=s.mode, prior_temperature=s.prior_temperature,
        sinkhorn_impl=s.get("impl", "lax"), sinkhorn_mesh=mesh)
    l_cap = llm.caption_loss(frozen["llm"], out["prefix"], frozen["prompt_ids"],
                             batch["caption_ids"], batch["caption_mask"])
    loss = w.map * l_map + w.cap * l_cap
    return loss, {"map": l_map, "cap": l_cap, **map_aux}


# ----------------------------------------------------------------------------------------------
# Assembly


_DATA_LABELS = {"cc3m": "CC3M", "coco_captions": "COCO", "jsonl": "JSONL captions",
                "digits": "digits", "digit_scenes": "digit scenes"}
_LLM_LABELS = {"opt": "OPT", "llama": "Llama", "t5": "T5"}


def word_marginal(config: ml_collections.ConfigDict, tokenizer: Any, vocab: int,
                  train: Any) -> tuple[np.ndarray, str]:
    """``config.word_marginal`` resolved over the training captions of ``train`` with the LLM's
    tokenizer (ops/word_frequency.py ``word_marginal``): ([V] float32, the start-up line)."""
    wm, d, m = config.word_marginal, config.data, config.model
    split = d.get("train_split", "train") if d.name == "coco_captions" else "train"
    path = d.get("train_path", "") if d.name in ("cc3m", "jsonl") else d.get("data_dir", "")
    dataset = {"name": d.name, "split": split,
               "path": os.path.abspath(os.path.expanduser(path)) if path else "",
               "num_texts": len(train), "label": f"{_DATA_LABELS.get(d.name, d.name)} {split}"}
    name = str(m.get("tokenizer_path") or m.llm_path)
    return word_frequency.word_marginal(
        wm.source, vocab, tokenizer=tokenizer, captions=lambda: getattr(train, "captions", None),
        dataset=dataset, tokenizer_name=name,
        tokenizer_label=f"{_LLM_LABELS.get(m.llm_family, m.llm_family)} tokenizer ({name})",
        cache_dir=str(wm.get("cache_dir", "")), alpha=wm.alpha, power=wm.power,
        write=jax.process_index() == 0)


def build_parts(config: ml_collections.ConfigDict, mesh, abstract: bool = False
                ) -> dict[str, Any]:
    """Everything VLAP is made of, for ``build`` and for evaluators that reuse it.

    Returns dict(llm: FrozenLLM (tokenizer None when abstract), visual_map: VisualMap,
      vision: vlap_vision.VisionTower, vision_width: its token width Dv, frozen: {'llm',
      'vision', 'prompt_ids' [P], 'word_marginal' [V]} on ``mesh`` (ShapeDtypeStructs when
      abstract), sources: data/sources.py's 'train', 'validation', 'images' (features instead
      of images with ``data.feature_cache.enabled``), 'vqa' and 'vqa_shots' (the solved
      examples of few-shot VQA, or None), and 'captioning' / 'retrieval' when those
      evaluations name their own dataset (None when abstract),
      marginal_from: where the word marginal came from (None when abstract)).
    """
    m, rep = config.model, sharding_lib.replicated(mesh)
    if config.sinkhorn.mode not in sinkhorn_lib.MODES:
        raise ValueError(f"config.sinkhorn.mode={config.sinkhorn.mode!r} is not known; use one of "
                         f"{sinkhorn_lib.MODES}")
    llm, llm_params = vlap_llm.load_llm(m, mesh, abstract=abstract)
    vocab = llm.word_embeddings(llm_params).shape[0]
    vision = vlap_vision.load_vision(config, mesh, abstract)
    parts = dict(llm=llm, visual_map=VisualMap(llm.embed_dim, jnp.dtype(m.get("dtype", "float32"))),
                 vision=vision, vision_width=vision.width, sources=None, marginal_from=None)
    if abstract:
        parts["frozen"] = {
            "llm": llm_params, "vision": vision.frozen,
            "prompt_ids": jax.ShapeDtypeStruct((vlap_llm.prompt_len(m),), jnp.int32, sharding=rep),
            "word_marginal": jax.ShapeDtypeStruct((vocab,), jnp.float32, sharding=rep)}
        return parts
    d, e = config.data, config.eval
    splits = sources_lib.open_sources(d, vision.image_size, supported=DATA)
    sources = {k: splits[k] for k in ("train", "validation", "images")}
    if e.get("source") and e.source.name:  # e.g. caption COCO's Karpathy test after CC3M
        sources["images"] = sources_lib.eval_images(e.source, d, splits)
    sources["vqa"] = (sources_lib.vqa_questions(e.vqa, vision.image_size) if e.get("vqa")
                      else None)
    sources["vqa_shots"] = (sources_lib.vqa_shot_pool(e.vqa, vision.image_size) if e.get("vqa")
                            else None)
    # NoCaps for captioning, Flickr30k / COCO for retrieval (None: sources['images']).
    own = {k: open_(e[k], d) for k, open_ in (("captioning", sources_lib.captioning_images),
                                              ("retrieval", sources_lib.retrieval_images))
           if k in e.evals and e.get(k)}
    c = d.get("feature_cache")
    if c and c.enabled:
        encode = jax.jit(lambda x: vision.encode(vision.frozen, x), out_shardings=rep)
        dataset = {"name": d.name, "train_path": str(d.get("train_path", "")),
                   "eval_path": str(d.get("eval_path", ""))}
        cache = dict(encode=encode, dtype=c.dtype, batch_size=c.batch_size,
                     preprocess=vision.host_image, num_workers=d.num_workers)
        sources = feature_cache.cache_sources(
            sources, c.dir, parts={**vision.cache_parts, "dataset": dataset}, **cache)
        for k, src in own.items():  # keyed by their own files, not by config.data's
            if src is not None:
                own[k] = feature_cache.cache_sources(
                    {k: src}, c.dir, parts={**vision.cache_parts, "dataset": {
                        x: str(e[k].get(x, "")) for x in ("source", "annotations", "image_dir",
                                                          "split")}}, **cache)[k]
    sources.update(own)
    marginal, marginal_from = word_marginal(config, llm.tokenizer, vocab, sources["train"])
    if jax.process_index() == 0:
        print(f"word marginal: {marginal_from}", flush=True)
    prompt_ids = np.asarray(llm.tokenizer(m.prompt, add_special_tokens=False)["input_ids"],
                            np.int32)
    parts.update(sources=sources, marginal_from=marginal_from, frozen={
        "llm": llm_params, "vision": vision.frozen, "prompt_ids": jax.device_put(prompt_ids, rep),
        "word_marginal": jax.device_put(marginal, rep)})
    return parts


def build(config: ml_collections.ConfigDict, mesh, *, abstract: bool = False) -> Method:
    """Loads the frozen LLM and vision encoder, builds the Dense, data and loss for the trainer.

    abstract=True reads no weights and no data (plan mode): ``frozen`` holds
    ``jax.ShapeDtypeStruct``s (LLM, vision, prompt ids [P], word marginal [V]) and ``batch_spec``
    the global batch (image [B, S, S, 3] uint8, caption_ids / caption_mask [B, L] int32).
    """
    m, d = config.model, config.data
    parts = build_parts(config, mesh, abstract=abstract)
    llm, visual_map, vision, frozen = (parts["llm"], parts["visual_map"], parts["vision"],
                                       parts["frozen"])
    vocab, prompt_len = llm.word_embeddings(frozen["llm"]).shape[0], frozen["prompt_ids"].shape[0]

    def init_params(rng):
        return visual_map.init(rng, jnp.zeros((1, 1, vision.width), jnp.float32))["params"]

    loss = functools.partial(loss_fn, visual_map=visual_map, llm=llm, vision_fn=vision.encode,
                             cfg=config, mesh=mesh)
    head = (f"frozen {m.vision.kind} vision (width {vision.width}) -> Dense -> frozen "
            f"{m.llm_family} {m.llm_path}")
    tail = (f"(vocab {vocab}, width {llm.embed_dim}, "
            f"{jnp.dtype(m.get('llm_dtype', 'float32')).name})")
    if abstract:
        cap, size = int(m.max_caption_len), vision.image_size
        batch_spec = {
            "image": jax.ShapeDtypeStruct((d.batch_size, size, size, 3), jnp.uint8),
            "caption_ids": jax.ShapeDtypeStruct((d.batch_size, cap), jnp.int32),
            "caption_mask": jax.ShapeDtypeStruct((d.batch_size, cap), jnp.int32)}
        arch = ("" if os.path.exists(os.path.expanduser(str(m.llm_path)))
                else " (architecture from config.model.llm_arch)")
        describe = (f"VLAP plan: {head}{arch} {tail}; prompt {prompt_len} tokens, captions {cap} "
                    "tokens")
        return Method(init_params=init_params, frozen=frozen, loss_fn=loss, batch_spec=batch_spec,
                      describe=describe)

    sources = parts["sources"]
    pre = captions_lib.caption_example_fn(llm.tokenizer, int(m.max_caption_len),
                                          vision.host_image)
    train_batches = batches_lib.IndexedBatches(
        sources["train"], global_batch_size=d.batch_size, seed=d.seed, shuffle=True,
        process_index=jax.process_index(), process_count=jax.process_count(), preprocess=pre,
        num_workers=d.num_workers, worker_processes=d.get("worker_processes", 0),
        batch_size_name="config.data.batch_size")
    loss_batches = batches_lib.IndexedBatches(
        sources["validation"], global_batch_size=config.eval.batch_size, seed=0, shuffle=False,
        preprocess=pre, num_workers=d.num_workers, batch_size_name="config.eval.batch_size")
    s = config.sinkhorn
    describe = (f"VLAP: {head} {tail}; prompt {m.prompt!r} = {prompt_len} tokens; sinkhorn "
                f"{s.mode} (eps {s.epsilon}, {s.num_iters} iters), word marginal "
                f"{config.word_marginal.source!r}; loss {config.loss.map} * map + "
                f"{config.loss.cap} * cap; data {d.name}: {len(sources['train'])} train / "
                f"{len(sources['validation'])} validation pairs"
                + (f"; {sources['train'].banner}" if hasattr(sources["train"], "banner") else ""))
    evaluator = vlap_evals.Evaluator(
        config, llm=llm, visual_map=visual_map, vision_fn=vision.encode,
        host_image=vision.host_image, sources=sources, loss_batches=loss_batches, loss_fn=loss,
        mesh=mesh)
    return Method(init_params=init_params, frozen=frozen, loss_fn=loss,
                  train_batches=train_batches, evaluate=evaluator.run,
                  eval_every=eval_runner.cadence(config), describe=describe)
