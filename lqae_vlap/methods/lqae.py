"""LQAE: Language Quantized AutoEncoder (Liu, Yan, Abbeel; arXiv 2302.00902).

image -> ViT encoder -> nearest word of a frozen BERT/RoBERTa's embedding table (cosine search on
L2-normalised vectors, the RAW word vector passed on with straight-through gradients) -> a random
fraction of positions replaced by the LM's <mask> embedding -> the frozen LM fills them in -> a ViT
decoder rebuilds the image from the LM's last hidden states (and, when its weight is not 0, once
more straight from the quantized words).

Loss (weights in ``config.loss``; released-run values in configs/lqae_roberta.py):
  recon_quantized * mse(dec(q), x) + recon_lm * mse(dec(lm(mask(q))), x)
  + commitment * mean((sg(q) - z)^2) + mlm * CE(lm_logits[masked], word ids[masked])
  + spread * mean_{i,j} cos(z_i, z_j)^2 over the batch's tokens (ops/quantize.spread_penalty;
    0 in the released run: a regulariser against codebook collapse, configs/lqae_scenes.py)
The released run (README flags, lqae/main/lqae_main.py get_loss) weighs the first term 0.0
(``nochannel_image_loss_weight``) and the second 1.0 (``bert_channel_image_loss_weight``), so every
gradient to the encoder's words passes through the frozen LM; with weight 0 the decoder is not run
on q at all in training (the evaluations still show both reconstructions).

z is the raw encoder output (``config.quantizer.straight_through_on='raw'``, as the released
LanguageQuantizer, which L2-normalises only the copy it searches with) or z / |z| ('normalized').
Pixels are floats in ``config.model.pixel_range``: (0, 1) in the released run (its ImageNet loader
does ToTensor and no mean/std), both as the encoder's input and as the reconstruction target.

The frozen LM sits outside the optimizer and outside autodiff (its weights are an argument that
``jax.grad`` does not differentiate); gradients still flow *through* it to the encoder.

The paper's baseline, a plain VQ-VAE (``config.quantizer.codebook='learned'``; the authors' code
calls its table the "strawman codebook"): the nearest rows of a TRAINED [V, D] table of the frozen
LM's vocabulary size and width replace the LM's words, initialised normal(``quantizer
.learned_init_std``, 0.02 as the authors' strawman_codebook) and trained by the VQ-VAE codebook
term ``loss.codebook * mean((C[idx] - sg(s))^2)`` (gradient descent, not EMA; the authors'
q_latent_loss), s being what the straight-through sees. Where the LM reads the codes (the refill
path, the probe, the few-shot prompts), code id i is written as the LM's word i. With
``loss.recon_lm=0`` and ``loss.mlm=0`` the frozen LM is not run in training at all.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap import models
from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.data import batches as batches_lib
from lqae_vlap.data import mini_imagenet
from lqae_vlap.data import sources as sources_lib
from lqae_vlap.evals import runner as eval_runner
from lqae_vlap.methods import lqae_evals
from lqae_vlap.methods.method import Method
from lqae_vlap.models import layers, roberta, vit, vit_released
from lqae_vlap.ops import losses, pixels
from lqae_vlap.ops import quantize as quantize_lib


# config.model.architecture -> (encoder, decoder) classes, which take the same arguments.
ARCHITECTURES = {
    # lqae/models/base_vit.py: NormFormer blocks, GLU + depthwise conv, no biases, remat per block.
    "released": (vit_released.ReleasedViTEncoder, vit_released.ReleasedViTDecoder),
    # A plain pre-LayerNorm ViT (big_vision / MAE), as the paper's "ViT-Base" reads.
    "plain": (vit.ViTEncoder, vit.ViTDecoder),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """One clear ValueError for an unknown architecture, pixel range or straight-through mode."""
    m = config.model
    if m.architecture not in ARCHITECTURES:
        raise ValueError(f"config.model.architecture={m.architecture!r} is not one of "
                         f"{sorted(ARCHITECTURES)}; 'released' is the authors' ViT, 'plain' a "
                         "pre-LayerNorm ViT")
    pixels.check_range(m.pixel_range, "config.model.pixel_range")
    mode = config.quantizer.straight_through_on
    if mode not in quantize_lib.STRAIGHT_THROUGH_ON:
        raise ValueError(f"config.quantizer.straight_through_on={mode!r} is not one of "
                         f"{quantize_lib.STRAIGHT_THROUGH_ON} ('raw' as released)")
    if config.quantizer.codebook not in lqae_evals.CODEBOOKS:
        raise ValueError(f"config.quantizer.codebook={config.quantizer.codebook!r} is not one of "
                         f"{lqae_evals.CODEBOOKS}: 'lm' = the frozen LM's words (LQAE), 'learned' "
                         "= a trained table of the same size (a plain VQ-VAE)")


def to_model_pixels(images: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """uint8 images -> float32 in config.model.pixel_range; float images pass as float32."""
    if images.dtype == jnp.uint8:
        return pixels.to_float(images, tuple(cfg.model.pixel_range))
    return images.astype(jnp.float32)


class LQAEModel(nn.Module):
    """The trainable part: a ViT encoder into the LM's width and a ViT decoder back to pixels."""

    config: ml_collections.ConfigDict  # config.model
    lm_width: int
    dtype: Any = jnp.float32
    # quantizer.codebook='learned': the trained codebook's rows (the LM's vocabulary size), 0 none.
    codebook_size: int = 0
    codebook_init_std: float = 0.02

    def setup(self):
        m = self.config
        encoder_cls, decoder_cls = ARCHITECTURES[m.architecture]
        self.encoder = encoder_cls(
            image_size=m.image_size, patch_size=m.patch_size, width=m.encoder.width,
            depth=m.encoder.depth, num_heads=m.encoder.num_heads, mlp_dim=m.encoder.mlp_dim,
            out_dim=self.lm_width, dtype=self.dtype, remat=m.get("remat", False))
        self.decoder = decoder_cls(
            image_size=m.image_size, patch_size=m.patch_size, channels=m.channels,
            width=m.decoder.width, depth=m.decoder.depth, num_heads=m.decoder.num_heads,
            mlp_dim=m.decoder.mlp_dim, dtype=self.dtype, remat=m.get("remat", False))
        if self.codebook_size:
            # [V, D] float32, read as params["codebook"] by forward (searched, never through here).
            self.codebook = self.param(
                "codebook", layers.logical_init(("vocab", "embed"),
                                                nn.initializers.normal(self.codebook_init_std)),
                (self.codebook_size, self.lm_width), jnp.float32)

    def encode(self, images: jax.Array) -> jax.Array:
        """images: [B, H, W, C] float in config.pixel_range -> z: [B, N, lm_width]."""
        return self.encoder(images)

    def decode(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, N, lm_width] -> images [B, H, W, C]."""
        return self.decoder(tokens)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images))


def random_mask(rng: jax.Array, batch: int, tokens: int, min_ratio: float,
                max_ratio: float) -> jax.Array:
    """Per sample, masks round(r * tokens) random positions, r ~ U[min_ratio, max_ratio].

    Returns a bool mask [batch, tokens] (True = replaced by <mask>).
    """
    r_rng, p_rng = jax.random.split(rng)
    ratio = jax.random.uniform(r_rng, (batch, 1), minval=min_ratio, maxval=max_ratio)
    count = jnp.round(ratio * tokens)
    # The rank of each position in a random order: the lowest `count` ranks are masked.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(p_rng, (batch, tokens)), axis=1), axis=1)
    return ranks < count


def forward(params, frozen, images, rng, *, model: LQAEModel, lm: roberta.MaskedLM,
            cfg: ml_collections.ConfigDict, with_mlm: bool, with_recon_q: bool = True,
            logits_at_masked: bool = False, with_lm: bool = True):
    """The whole LQAE forward pass; returns a dict of intermediates (used by loss and evals).

    images: [B, H, W, C] uint8 (converted here, on the device) or float in config.model
    .pixel_range. with_recon_q=False skips the decoder on the quantized words ('recon_q' None);
    with_lm=False skips the frozen LM and the decoder on its output ('lm_out', 'recon_lm' None).
    logits_at_masked: the MLM head runs only at the masked positions, gathered to a static
    bound K = ceil(mask_ratio_max * N) ('mlm_at' [B, K] positions, 'mlm_valid' [B, K]): the loss
    scores only those, and the head's [B, N, V] logits would cost N / K times the FLOPs and memory.
    """
    images = to_model_pixels(images, cfg)
    z = model.apply({"params": params}, images, method=LQAEModel.encode)
    b, n, _ = z.shape
    words = roberta.word_embedding_matrix(frozen["lm"])
    # Released (lqae/models/lqae.py LanguageQuantizer.__call__): the search is on L2-normalised
    # copies (cosine), the straight-through and commitment on the raw z; 'normalized' is an option.
    q = quantize_lib.quantize(z, lqae_evals.search_codebook(params, frozen, cfg),
                              metric=cfg.quantizer.metric, chunk_size=cfg.quantizer.chunk_size,
                              straight_through_on=cfg.quantizer.straight_through_on)
    mask = random_mask(rng, b, n, cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max)
    at = valid = lm_out = recon_lm = None
    if with_lm:
        # A learned codebook's code i reaches the LM as the LM's word i (no gradient path).
        lm_words = (q.quantized_st if cfg.quantizer.codebook == "lm"
                    else jnp.take(words, q.indices, axis=0).astype(q.quantized_st.dtype))
        mask_vec = words[frozen["mask_token_id"]].astype(lm_words.dtype)
        lm_in = jnp.where(mask[..., None], mask_vec, lm_words)
        if with_mlm and logits_at_masked:
            at, valid = losses.masked_positions(mask,
                                                losses.max_masked(n, cfg.loss.mask_ratio_max))
        lm_out = lm.apply({"params": frozen["lm"]}, inputs_embeds=lm_in, with_lm_head=with_mlm,
                          logits_at=at)
        recon_lm = model.apply({"params": params}, lm_out["last_hidden_state"],
                               method=LQAEModel.decode)
    recon_q = (model.apply({"params": params}, q.quantized_st, method=LQAEModel.decode)
               if with_recon_q else None)
    return dict(z=z, q=q, mask=mask, lm_out=lm_out, recon_q=recon_q, recon_lm=recon_lm,
                mlm_at=at, mlm_valid=valid)


def loss_fn(params, frozen, batch, rng, *, model, lm, cfg):
    w = cfg.loss
    with_mlm = w.mlm > 0
    # A zero weight would still cost the decoder's forward and backward on q: skip the pass;
    # likewise the frozen LM when neither the refill reconstruction nor the masked LM reads it.
    with_recon_q = w.recon_quantized != 0
    with_lm = w.recon_lm != 0 or with_mlm
    out = forward(params, frozen, batch["image"], rng, model=model, lm=lm, cfg=cfg,
                  with_mlm=with_mlm, with_recon_q=with_recon_q, logits_at_masked=True,
                  with_lm=with_lm)
    x = to_model_pixels(batch["image"], cfg)
    q = out["q"]
    mlm = (losses.masked_cross_entropy(out["lm_out"]["logits"],
                                       jnp.take_along_axis(q.indices, out["mlm_at"], axis=1),
                                       out["mlm_valid"])
           if with_mlm else jnp.zeros(()))
    aux = {}
    if with_lm:
        aux["recon_lm"] = jnp.mean(jnp.square(out["recon_lm"].astype(jnp.float32) - x))
        loss = w.recon_lm * aux["recon_lm"] + w.commitment * q.commitment + w.mlm * mlm
    else:
        loss = w.commitment * q.commitment + w.mlm * mlm
    vocab = roberta.word_embedding_matrix(frozen["lm"]).shape[0]
    aux.update({
        "commitment": q.commitment,
        "mlm": mlm,
        "codebook_usage": quantize_lib.codebook_usage(q.indices, vocab),
        "perplexity": quantize_lib.perplexity(q.indices, vocab),
        "mask_ratio": jnp.mean(out["mask"].astype(jnp.float32)),
    })
    if cfg.quantizer.codebook == "learned":
        target = quantize_lib.straight_through_input(out["z"], cfg.quantizer.straight_through_on)
        aux["codebook_loss"] = quantize_lib.codebook_loss(params["codebook"], q.indices, target)
        loss = loss + w.codebook * aux["codebook_loss"]
    if w.get("spread", 0.0):
        aux["spread"] = quantize_lib.spread_penalty(out["z"])
        loss = loss + w.spread * aux["spread"]
    if with_recon_q:
        aux["recon_quantized"] = jnp.mean(jnp.square(out["recon_q"].astype(jnp.float32) - x))
        loss = loss + w.recon_quantized * aux["recon_quantized"]
    return loss, aux


# ----------------------------------------------------------------------------------------------
# Assembly

DATA = ("digits", "digit_scenes", "imagenet")  # the labelled image data of data/sources.py


def _image_only(preprocess):
    # Images stay uint8 until they are on the device: a quarter of the host-to-device bytes.
    def fn(example, rng):
        if preprocess is not None:
            example = preprocess(example, rng)
        return {"image": example["image"]}
    return fn


def build(config: ml_collections.ConfigDict, mesh, *, abstract: bool = False) -> Method:
    """Loads the frozen LM, builds the trainable model, data and loss for the trainer.

    abstract=True reads no weights and no data (plan mode): ``frozen`` holds
    ``jax.ShapeDtypeStruct``s and ``batch_spec`` the global batch's shapes.
    """
    m = config.model
    check_config(config)
    dtype = jnp.dtype(m.get("dtype", "float32"))
    # A local folder is checked before any weight is read, a hub name once it is loaded.
    held = models.checkpoint_family(m.lm_path)
    if held in (None, "roberta"):
        lm, lm_variables, hf_config = models.load_pretrained(
            m.lm_path, dtype=jnp.dtype(m.get("lm_dtype", "float32")), mesh=mesh, abstract=abstract)
        held = models.family(hf_config)
    if held != "roberta":
        raise ValueError(f"config.model.lm_path {m.lm_path} holds a {held!r}-family model; "
                         "LQAE's codebook is the word-embedding table of a BERT / RoBERTa masked LM")
    lm_params = lm_variables["params"]
    if config.loss.mlm > 0 and not lm.config.has_lm_head:
        raise ValueError(
            f"config.loss.mlm={config.loss.mlm} needs a masked-LM head, but {m.lm_path} has none "
            "(a plain encoder checkpoint); set --config.loss.mlm=0 or use a *ForMaskedLM checkpoint")
    lm_width = lm.config.hidden_size
    vocab = roberta.word_embedding_matrix(lm_params).shape[0]
    learned = config.quantizer.codebook == "learned"
    model = LQAEModel(config=m, lm_width=lm_width, dtype=dtype,
                      codebook_size=vocab if learned else 0,
                      codebook_init_std=float(config.quantizer.learned_init_std))
    replicated = sharding_lib.replicated(mesh)

    def init_params(rng):
        dummy = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
        return model.init(rng, dummy)["params"]

    loss = functools.partial(loss_fn, model=model, lm=lm, cfg=config)
    describe = (f"LQAE: {m.architecture} ViT {m.encoder.width}x{m.encoder.depth} enc / "
                f"{m.decoder.width}x{m.decoder.depth} dec, patch {m.patch_size} on "
                f"{m.image_size}px, frozen {hf_config.model_type} from {m.lm_path} (vocab "
                f"{lm.config.vocab_size}, width {lm_width})")
    if learned:
        describe += (f"; codebook: LEARNED [{vocab}, {lm_width}] (a plain VQ-VAE; the LM reads "
                     "its code ids as its own words)")
    if abstract:
        frozen = {"lm": lm_params,
                  "mask_token_id": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
        image = (config.data.batch_size, m.image_size, m.image_size, m.channels)
        return Method(init_params=init_params, frozen=frozen, loss_fn=loss,
                      batch_spec={"image": jax.ShapeDtypeStruct(image, jnp.uint8)},
                      describe=describe)

    tokenizer = models.load_tokenizer(m.lm_path)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"the tokenizer of {m.lm_path} has no mask token; LQAE needs one")
    mask_token_id = np.asarray(tokenizer.mask_token_id, np.int32)
    frozen = {"lm": lm_params, "mask_token_id": jax.device_put(mask_token_id, replicated)}
    splits = sources_lib.open_sources(config.data, m.image_size, supported=DATA)
    train_src, val_src = splits["train"], splits["validation"]
    # Evaluations read deterministic, labelled images (centre crops, no augmentation).
    eval_sources = {"train": splits["train_eval"], "validation": val_src}
    if config.eval.get("mini_imagenet_root", ""):
        names_file = config.eval.get("mini_imagenet_label_names", "")
        eval_sources["mini_imagenet"] = mini_imagenet.MiniImageNet(
            config.eval.mini_imagenet_root, split="test", image_size=m.image_size,
            label_names=mini_imagenet.read_label_names(names_file) if names_file else None)
    train_batches = batches_lib.IndexedBatches(
        train_src, global_batch_size=config.data.batch_size, seed=config.data.seed,
        shuffle=True, process_index=jax.process_index(), process_count=jax.process_count(),
        preprocess=_image_only(getattr(train_src, "augment", None)),
        num_workers=config.data.num_workers,
        worker_processes=config.data.get("worker_processes", 0))
    describe += (f"; data {config.data.name}: {len(train_src)} train / {len(val_src)} "
                 "validation images")
    if hasattr(train_src, "banner"):
        describe += f"; {train_src.banner}"
    return Method(init_params=init_params, frozen=frozen, loss_fn=loss,
                  train_batches=train_batches, eval_every=eval_runner.cadence(config),
                  evaluate=lqae_evals.Evaluator(
                      config, model, lm, tokenizer, eval_sources, mesh,
                      functools.partial(forward, model=model, lm=lm, cfg=config,
                                        with_mlm=False)).run,
                  describe=describe)
