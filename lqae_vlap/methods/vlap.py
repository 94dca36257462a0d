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

The family-specific parts (word embeddings, text states, L_cap, generation, decoding) sit behind
one interface, ``methods/vlap_llm.py``'s FrozenLLM, so this file never branches on the family.

Sinkhorn (``config.sinkhorn.mode``): 'paper' is optimal transport whose word marginal is the
word frequency over the training captions (ops/sinkhorn.py ``sinkhorn``); 'released_code' is what
the authors' released script computes, a prior-weighted softmax per sample that never normalises
over the words (``sinkhorn_released_code`` with prior softmax(frequency / 0.25)).

Frozen weights (the LLM, the vision encoder, the prompt ids, the word frequencies) live in a
separate ``frozen`` tree: the optimizer never sees them and ``jax.grad`` never differentiates
them (gradients still flow *through* the LLM to the Dense in L_cap).

Frozen LLMs: 'opt', 'llama' (HF folder or GGUF file) and 't5' (T5, T5 v1.1, Flan-T5), in
``config.model.llm_dtype`` (e.g. bfloat16: weights cast on load, the LLM computes in it; the
losses are float32). ``build_parts`` returns the pieces (FrozenLLM, VisualMap, vision function,
frozen tree, data sources) so evaluators can reuse them; ``build`` turns them into a Method.

Data (``config.data.name``): 'digits' (demo), 'jsonl' folders, 'coco_captions' (TFDS, Karpathy
splits), 'cc3m' (img2dataset output). ``config.data.feature_cache``: the frozen vision encoder's
features computed once and stored, keyed by model + preprocessing + data (data/feature_cache.py).
Evaluations (``config.eval.evals``; methods/vlap_evals.py): held-out loss, zero-shot captioning
(greedy and beam, COCO metrics), retrieval Recall@K, zero-shot VQA and semantic arithmetic.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.data import batches as batches_lib
from lqae_vlap.data import captions as captions_lib
from lqae_vlap.evals import runner as eval_runner
from lqae_vlap.methods import vlap_evals, vlap_llm
from lqae_vlap.methods.method import Method
from lqae_vlap.methods.vlap_llm import (FrozenLLM,  # noqa: F401  (re-exported: VLAP's loss pieces)
                                        caption_targets, captioning_loss, make_llm)
from lqae_vlap.ops import pixels
from lqae_vlap.ops import sinkhorn as sinkhorn_lib

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
                prior_temperature: float = 0.25, sinkhorn_impl: str = "lax",
                sinkhorn_mesh: Any = None) -> jax.Array:
    """Constant word assignments Q [B, V] (rows sum to 1) from scores [B, V].

    sinkhorn_mode 'paper': optimal transport with word marginal ``col_marginal`` (uniform if
    None). 'released_code': the authors' released computation, a per-sample softmax weighted by
    the prior softmax(col_marginal / prior_temperature) (uniform if None); it does not enforce
    the word marginal. sinkhorn_impl: ops/sinkhorn.py's ``impl`` ('lax', 'pallas', 'auto');
    sinkhorn_mesh: the mesh the batch is split over (the fused kernel's cross-device column sums).
    """
    if sinkhorn_mode == "paper":
        return sinkhorn_lib.sinkhorn(scores, epsilon=epsilon, num_iters=num_iters,
                                     col_marginal=col_marginal, impl=sinkhorn_impl,
                                     mesh=sinkhorn_mesh)
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
      sinkhorn_mode: 'paper' or 'released_code' (see ``assignments``).
      prior_temperature: temperature of the released code's word prior (0.25).
      sinkhorn_impl: 'lax', 'pallas' (fused kernel) or 'auto' (ops/sinkhorn.py ``impl``).

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
              sinkhorn_mode=sinkhorn_mode, prior_temperature=prior_temperature,
              sinkhorn_impl=sinkhorn_impl, sinkhorn_mesh=sinkhorn_mesh)
    # Targets are constants (sinkhorn stop_gradients its scores), as in SwAV / VLAP.
    q_v = jax.lax.stop_gradient(assignments(s_v, **kw))
    q_t = jax.lax.stop_gradient(assignments(s_t, **kw))
    map_v = _soft_cross_entropy(q_t, s_v / temperature)
    map_t = _soft_cross_entropy(q_v, s_t / temperature)
    agreement = jnp.mean((jnp.argmax(q_v, -1) == jnp.argmax(q_t, -1)).astype(jnp.float32))
    return 0.5 * (map_v + map_t), {"map_v": map_v, "map_t": map_t,
                                   "assign_agreement": agreement}


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
    x = pixels.to_float(images) if images.dtype == jnp.uint8 else images
    return patchify(x, patch_size) @ frozen_vision["projection"]


def clip_features(frozen_vision: dict[str, Any], images: jax.Array, *, module: Any) -> jax.Array:
    """Frozen CLIP vision tower: uint8 [B, 224, 224, 3] (resized and cropped on the host) ->
    last hidden states [B, 1 + N, width] (CLS + patch tokens, 50 for ViT-B/32)."""
    from lqae_vlap.data import clip_preprocess  # noqa: PLC0415

    x = clip_preprocess.clip_normalize(images) if images.dtype == jnp.uint8 else images
    return module.apply({"params": frozen_vision["params"]}, x)["last_hidden_state"]


# ----------------------------------------------------------------------------------------------
# The loss the trainer differentiates


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


def _abstract_t5(path: str, hf_config: Any, dtype: Any, mesh):
    """(module, params as ShapeDtypeStructs) of a T5 without reading a tensor.

    models/t5.py's ``load`` has no abstract mode, so it is built here the way that loader builds
    it: the lm head is untied when the checkpoint stores ``lm_head.weight`` (only its key list is
    read), else when the config says ``tie_word_embeddings=False`` (v1.1 / Flan-T5).
    """
    from lqae_vlap.models import hf_weights, t5  # noqa: PLC0415

    tied = getattr(hf_config, "tie_word_embeddings", True) is not False
    if hf_config is None or path is not None:
        folder = hf_weights.resolve_checkpoint(path)
        hf_config = hf_weights.read_hf_config(folder)
        tied = getattr(hf_config, "tie_word_embeddings", True) is not False
        if any((folder / f).exists() for f in hf_weights.WEIGHT_FILES):
            tied = "lm_head.weight" not in hf_weights.open_state_dict(folder)
    cfg = t5.T5Config.from_hf(hf_config, tie_word_embeddings=tied)
    module = t5.T5(cfg, dtype=dtype, param_dtype=dtype)
    return module, hf_weights.abstract_on_mesh(t5.abstract_params(module), mesh)


def _load_llm(m: ml_collections.ConfigDict, mesh, abstract: bool = False
              ) -> tuple[FrozenLLM, Any]:
    """Returns (FrozenLLM, params) for config.model.llm_* (weights cast to ``llm_dtype``).

    abstract=True reads no tensor and loads no tokenizer (``llm.tokenizer`` is None): params are
    ShapeDtypeStructs, built from the checkpoint's config.json when ``llm_path`` is local, else
    from ``config.model.llm_arch``.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415

    from lqae_vlap.models import hf_weights  # noqa: PLC0415

    dtype = jnp.dtype(m.get("llm_dtype", "float32"))
    family, path = m.llm_family, m.llm_path
    if family not in vlap_llm.FAMILIES:
        raise ValueError(f"config.model.llm_family={family!r} is not known; use 'opt', 'llama' "
                         "(HF folder or .gguf file) or 't5'")
    if family == "t5" and str(path).endswith(".gguf"):
        raise ValueError("config.model.llm_path: GGUF files hold decoder-only models; give T5 a "
                         "Hugging Face checkpoint folder")
    models = importlib.import_module(f"lqae_vlap.models.{family}")
    if abstract:
        if str(path).endswith(".gguf"):
            from lqae_vlap.models.gguf import open_gguf  # noqa: PLC0415  (metadata only)

            hf_config, _ = open_gguf(path)
        elif _is_local(path):
            hf_config = None  # the folder's own config.json
        else:
            hf_config = _arch_config(m.get("llm_arch"), "config.model.llm_arch", path)
        if family == "t5":
            module, params = _abstract_t5(None if hf_config is not None else path, hf_config,
                                          dtype, mesh)
            return make_llm(family, module, None), params
        module, variables, _ = models.load(None if hf_config is not None else path, dtype=dtype,
                                           mesh=mesh, abstract=True, hf_config=hf_config)
        return make_llm(family, module, None), variables["params"]
    if family == "llama" and str(path).endswith(".gguf"):
        module, variables, _ = models.load_gguf(path, dtype=dtype, mesh=mesh)
        folder, name = os.path.split(str(path))
        tok = AutoTokenizer.from_pretrained(m.get("tokenizer_path") or folder, gguf_file=(
            None if m.get("tokenizer_path") else name))
    else:
        module, variables, _ = models.load(path, dtype=dtype, mesh=mesh)
        # A hub name resolves to the same downloaded folder as the weights (hf_weights).
        tok = hf_weights.load_tokenizer(m.get("tokenizer_path") or path)
    return make_llm(family, module, tok, mesh=mesh), variables["params"]


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


DATA_SOURCES = ("digits", "jsonl", "coco_captions", "cc3m")
VQA_SOURCES = ("", "digits", "vqav2")


def _sources(config) -> dict[str, Any]:
    """Random-access sources: 'train' and 'validation' (image-caption pairs, for the losses),
    'images' (one example per held-out image with all its 'references', for captioning,
    retrieval and arithmetic: the data's held-out split, or ``config.eval.source``) and 'vqa'
    (questions, or None)."""
    d = config.data
    size = int(config.model.image_size)
    if d.name == "digits":
        train = captions_lib.DigitCaptions("train", image_size=size)
        val = captions_lib.DigitCaptions("validation", image_size=size)
        out = {"train": train, "validation": val, "images": val}
    elif d.name == "jsonl":
        val = captions_lib.JsonlCaptions(d.eval_path)
        out = {"train": captions_lib.JsonlCaptions(d.train_path), "validation": val,
               "images": captions_lib.ImagesWithReferences(val)}
    elif d.name == "coco_captions":
        from lqae_vlap.data.coco_captions import CocoCaptions  # noqa: PLC0415  (tfds, optional)

        kw = dict(data_dir=d.get("data_dir") or None,
                  index_cache_dir=d.get("index_cache_dir") or None)
        out = {"train": CocoCaptions(d.train_split, mode="pairs", **kw),
               "validation": CocoCaptions(d.eval_split, mode="pairs", **kw),
               "images": CocoCaptions(d.eval_split, mode="images", **kw)}
    elif d.name == "cc3m":
        from lqae_vlap.data.cc3m import Cc3m  # noqa: PLC0415

        if not d.train_path or not d.eval_path:
            raise ValueError("config.data.name='cc3m' needs config.data.train_path and "
                             "config.data.eval_path: img2dataset output folders of CC3M's "
                             "training and validation TSVs")
        val = Cc3m(d.eval_path, cache_dir=d.get("index_cache_dir") or None)
        out = {"train": Cc3m(d.train_path, cache_dir=d.get("index_cache_dir") or None),
               "validation": val, "images": val}
    else:
        raise ValueError(f"config.data.name={d.name!r} is not known; use one of {DATA_SOURCES}")
    e = config.eval.get("source", ml_collections.ConfigDict({"name": ""}))
    if e.name == "coco_captions":  # e.g. train on CC3M, caption COCO's Karpathy test zero-shot
        from lqae_vlap.data.coco_captions import CocoCaptions  # noqa: PLC0415

        out["images"] = CocoCaptions(e.split, data_dir=d.get("data_dir") or None, mode="images",
                                     index_cache_dir=d.get("index_cache_dir") or None)
    elif e.name == "jsonl":
        out["images"] = captions_lib.ImagesWithReferences(captions_lib.JsonlCaptions(e.path))
    elif e.name:
        raise ValueError(f"config.eval.source.name={e.name!r} is not known; use '' (the "
                         "training data's held-out split), 'coco_captions' or 'jsonl'")
    q = config.eval.get("vqa", ml_collections.ConfigDict({"source": ""}))
    if q.source not in VQA_SOURCES:
        raise ValueError(f"config.eval.vqa.source={q.source!r} is not known; use one of "
                         f"{VQA_SOURCES} ('' = no VQA)")
    out["vqa"] = None
    if q.source == "digits":
        from lqae_vlap.data.vqa_source import DigitQuestions  # noqa: PLC0415

        out["vqa"] = DigitQuestions("validation", image_size=size)
    elif q.source == "vqav2":
        from lqae_vlap.data.vqa_source import VqaV2Source  # noqa: PLC0415

        out["vqa"] = VqaV2Source(q.questions, q.annotations or None, q.image_dir)
    return out


def _cache_features(config, sources: dict[str, Any], vision_fn, frozen_vision, host_image,
                    mesh) -> dict[str, Any]:
    """Replaces every source's images by the frozen vision encoder's features, computed once
    and stored in ``config.data.feature_cache.dir`` under a key of model + preprocessing + data
    (data/feature_cache.py); training then never decodes an image or runs the vision tower."""
    from lqae_vlap.data import feature_cache as fc  # noqa: PLC0415

    c, v, d = config.data.feature_cache, config.model.vision, config.data
    if not c.dir:
        raise ValueError("config.data.feature_cache.enabled needs config.data.feature_cache.dir "
                         "(a folder for the .npy features)")
    if "://" in str(c.dir):
        raise ValueError(f"config.data.feature_cache.dir={c.dir!r}: the features are memory-mapped,"
                         " so the cache must be on a local disk (each host keeps its own copy)")
    if v.kind == "clip":
        from lqae_vlap.data import clip_preprocess  # noqa: PLC0415

        vision = fc.vision_identity(v.path if _is_local(v.path) else None,
                                    config={"path": str(v.path), "dtype": v.dtype,
                                            "output": "last_hidden_state"})
        size = int(config.model.image_size)
        preprocess = {"name": "clip_resize_crop", "size": size, "crop": size,
                      "resample": "bicubic", "mean": list(clip_preprocess.CLIP_MEAN),
                      "std": list(clip_preprocess.CLIP_STD)}
    else:
        vision = fc.vision_identity(config={"kind": v.kind, "patch_size": int(v.patch_size),
                                            "width": int(v.width), "seed": int(v.seed)})
        preprocess = {"name": "demo_images", "size": int(config.model.image_size)}
    dataset = {"name": d.name, "train_path": str(d.get("train_path", "")),
               "eval_path": str(d.get("eval_path", ""))}
    encode = jax.jit(lambda images: vision_fn(frozen_vision, images),
                     out_shardings=sharding_lib.replicated(mesh))
    cache = fc.FeatureCache(c.dir)
    wrapped: dict[int, Any] = {}  # one source under two names (digits: validation = images)
    for name, src in sources.items():
        if src is not None and id(src) not in wrapped:
            key = fc.cache_key(vision=vision, preprocess=preprocess, dataset=dataset, split=name,
                               num_examples=len(src), dtype=c.dtype)
            feats = cache.get_or_compute(key, src, encode, batch_size=int(c.batch_size),
                                         preprocess=host_image, num_workers=int(d.num_workers))
            wrapped[id(src)] = fc.CachedFeatures(src, feats)
    return {name: None if src is None else wrapped[id(src)] for name, src in sources.items()}


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
        out = {"caption_ids": ids[0], "caption_mask": mask[0]}
        if "vision_features" in example:  # from the feature cache
            out["vision_features"] = np.asarray(example["vision_features"], np.float32)
        else:
            image = example["image"] if host_image is None else host_image(example["image"])
            out["image"] = np.asarray(image, np.uint8)
        return out
    return fn


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


def build_parts(config: ml_collections.ConfigDict, mesh, abstract: bool = False
                ) -> dict[str, Any]:
    """Everything VLAP is made of, for ``build`` and for evaluators that reuse it.

    Returns dict(
      llm: FrozenLLM (tokenizer None when abstract), visual_map: VisualMap,
      vision_fn: (frozen['vision'], images [B, H, W, 3]) -> tokens [B, T, Dv],
      vision_width: Dv, frozen: {'llm', 'vision', 'prompt_ids' [P], 'word_marginal' [V]} placed
      on ``mesh`` (ShapeDtypeStructs when abstract), host_image: host-side image preprocess or
      None, image_size: S, sources: {'train', 'validation', 'images', 'vqa'} (see
      ``_sources``; features instead of images when ``data.feature_cache.enabled``; None when
      abstract), train_src / val_src: sources['train'] / ['validation'],
      marginal_from: where the word marginal came from (None when abstract)).
    """
    m = config.model
    if config.sinkhorn.mode not in SINKHORN_MODES:
        raise ValueError(f"config.sinkhorn.mode={config.sinkhorn.mode!r} is not known; use one of "
                         f"{SINKHORN_MODES}")
    llm, llm_params = _load_llm(m, mesh, abstract=abstract)
    vocab = llm.word_embeddings(llm_params).shape[0]
    vision_fn, frozen_vision, vision_width, host_image, image_size = _vision(config, mesh,
                                                                            abstract)
    visual_map = VisualMap(llm_width=llm.embed_dim, dtype=jnp.dtype(m.get("dtype", "float32")))
    rep = sharding_lib.replicated(mesh)
    parts = dict(llm=llm, visual_map=visual_map, vision_fn=vision_fn, vision_width=vision_width,
                 host_image=host_image, image_size=image_size, sources=None, train_src=None,
                 val_src=None,
                 marginal_from=None)
    if abstract:
        parts["frozen"] = {
            "llm": llm_params, "vision": frozen_vision,
            "prompt_ids": jax.ShapeDtypeStruct((_prompt_len(m),), jnp.int32, sharding=rep),
            "word_marginal": jax.ShapeDtypeStruct((vocab,), jnp.float32, sharding=rep)}
        return parts
    sources = _sources(config)
    if config.data.get("feature_cache") and config.data.feature_cache.enabled:
        sources = _cache_features(config, sources, vision_fn, frozen_vision, host_image, mesh)
    train_src, val_src = sources["train"], sources["validation"]
    marginal, marginal_from = _word_marginal(config, llm.tokenizer, vocab, train_src)
    prompt_ids = np.asarray(llm.tokenizer(m.prompt, add_special_tokens=False)["input_ids"],
                            np.int32)
    parts.update(sources=sources, train_src=train_src, val_src=val_src,
                 marginal_from=marginal_from, frozen={
        "llm": llm_params, "vision": frozen_vision, "prompt_ids": jax.device_put(prompt_ids, rep),
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
    llm, visual_map, vision_fn = parts["llm"], parts["visual_map"], parts["vision_fn"]
    frozen, vision_width = parts["frozen"], parts["vision_width"]
    vocab, llm_width = llm.word_embeddings(frozen["llm"]).shape[0], llm.embed_dim

    def init_params(rng):
        return visual_map.init(rng, jnp.zeros((1, 1, vision_width), jnp.float32))["params"]

    loss = functools.partial(loss_fn, visual_map=visual_map, llm=llm, vision_fn=vision_fn,
                             cfg=config, mesh=mesh)
    prompt_len = frozen["prompt_ids"].shape[0]
    if abstract:
        cap, size = int(m.max_caption_len), parts["image_size"]
        batch_spec = {
            "image": jax.ShapeDtypeStruct((d.batch_size, size, size, 3), jnp.uint8),
            "caption_ids": jax.ShapeDtypeStruct((d.batch_size, cap), jnp.int32),
            "caption_mask": jax.ShapeDtypeStruct((d.batch_size, cap), jnp.int32)}
        arch = "" if _is_local(m.llm_path) else " (architecture from config.model.llm_arch)"
        describe = (f"VLAP plan: frozen {m.vision.kind} vision (width {vision_width}) -> Dense -> "
                    f"frozen {m.llm_family} {m.llm_path}{arch} (vocab {vocab}, width "
                    f"{llm_width}, {jnp.dtype(m.get('llm_dtype', 'float32')).name}); "
                    f"prompt {prompt_len} tokens, captions {cap} tokens")
        return Method(init_params=init_params, frozen=frozen, loss_fn=loss, batch_spec=batch_spec,
                      describe=describe)

    train_src, val_src = parts["train_src"], parts["val_src"]
    pre = _make_preprocess(llm.tokenizer, int(m.max_caption_len), parts["host_image"])
    pid, pcount = jax.process_index(), jax.process_count()
    train_batches = batches_lib.IndexedBatches(
        train_src, global_batch_size=d.batch_size, seed=d.seed, shuffle=True,
        process_index=pid, process_count=pcount, preprocess=pre, num_workers=d.num_workers)
    eval_batches = batches_lib.IndexedBatches(
        val_src, global_batch_size=config.eval.batch_size, seed=0, shuffle=False,
        preprocess=pre, num_workers=d.num_workers)

    describe = (f"VLAP: frozen {m.vision.kind} vision (width {vision_width}) -> Dense -> frozen "
                f"{m.llm_family} {m.llm_path} (vocab {vocab}, width {llm_width}, "
                f"{jnp.dtype(m.get('llm_dtype', 'float32')).name}); prompt {m.prompt!r} = "
                f"{prompt_len} tokens; sinkhorn {config.sinkhorn.mode} "
                f"(eps {config.sinkhorn.epsilon}, {config.sinkhorn.num_iters} iters), word "
                f"marginal {parts['marginal_from']}; loss {config.loss.map} * map + "
                f"{config.loss.cap} * cap; data {d.name}: {len(train_src)} train / "
                f"{len(val_src)} validation pairs")
    return Method(init_params=init_params, frozen=frozen, loss_fn=loss,
                  train_batches=train_batches, eval_every=eval_runner.cadence(config),
                  evaluate=vlap_evals.Evaluator(
                      config, llm=llm, visual_map=visual_map, vision_fn=vision_fn,
                      host_image=parts["host_image"], sources=parts["sources"],
                      loss_batches=eval_batches, loss_fn=loss, mesh=mesh).run,
                  describe=describe)
