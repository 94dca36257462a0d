"""LQAE: Language Quantized AutoEncoder (Liu, Yan, Abbeel; arXiv 2302.00902).

image -> ViT encoder -> nearest word of a frozen BERT/RoBERTa's embedding table (cosine search on
L2-normalised vectors, the RAW word vector passed on with straight-through gradients) -> a random
fraction of positions replaced by the LM's <mask> embedding -> the frozen LM fills them in -> a ViT
decoder rebuilds the image, once from the quantized words and once from the LM's last hidden states.

Loss (weights in ``config.loss``; released-run values in configs/lqae_roberta.py):
  recon_quantized * mse(dec(q), x) + recon_lm * mse(dec(lm(mask(q))), x)
  + commitment * mean((sg(q) - z)^2) + mlm * CE(lm_logits[masked], word ids[masked])

The frozen LM sits outside the optimizer and outside autodiff (its weights are an argument that
``jax.grad`` does not differentiate); gradients still flow *through* it to the encoder.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap.data import batches as batches_lib
from lqae_vlap.data import preprocess as preprocess_lib
from lqae_vlap.models import hf_weights
from lqae_vlap.models import roberta
from lqae_vlap.models import vit
from lqae_vlap.ops import quantize as quantize_lib
from lqae_vlap.train import sharding as sharding_lib
from lqae_vlap.train.trainer import Method


class LQAEModel(nn.Module):
    """The trainable part: a ViT encoder into the LM's width and a ViT decoder back to pixels."""

    config: ml_collections.ConfigDict  # config.model
    lm_width: int
    dtype: Any = jnp.float32

    def setup(self):
        m = self.config
        self.encoder = vit.ViTEncoder(
            image_size=m.image_size, patch_size=m.patch_size, width=m.encoder.width,
            depth=m.encoder.depth, num_heads=m.encoder.num_heads, mlp_dim=m.encoder.mlp_dim,
            out_dim=self.lm_width, dtype=self.dtype, remat=m.get("remat", False))
        self.decoder = vit.ViTDecoder(
            image_size=m.image_size, patch_size=m.patch_size, channels=m.channels,
            width=m.decoder.width, depth=m.decoder.depth, num_heads=m.decoder.num_heads,
            mlp_dim=m.decoder.mlp_dim, dtype=self.dtype, remat=m.get("remat", False))

    def encode(self, images: jax.Array) -> jax.Array:
        """images: [B, H, W, C] in [-1, 1] -> z: [B, N, lm_width]."""
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


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean CE over positions where mask is True (0 when none). logits [B, N, V] float32 inside."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def forward(params, frozen, images, rng, *, model: LQAEModel, lm: roberta.MaskedLM,
            cfg: ml_collections.ConfigDict, with_mlm: bool):
    """The whole LQAE forward pass; returns a dict of intermediates (used by loss and evals).

    images: [B, H, W, C] uint8 (converted here, on the device) or float in [-1, 1].
    """
    if images.dtype == jnp.uint8:
        images = preprocess_lib.to_float(images)
    z = model.apply({"params": params}, images, method=LQAEModel.encode)
    b, n, _ = z.shape
    codebook = roberta.word_embedding_matrix(frozen["lm"])
    if cfg.quantizer.l2_normalize:
        # As the released run: the encoder output is unit-normalised before the straight-through
        # and commitment terms, so its scale cannot drift while the search is scale-blind.
        z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(z), -1, keepdims=True), 1e-12))
    q = quantize_lib.quantize(z, codebook, metric=cfg.quantizer.metric,
                              chunk_size=cfg.quantizer.chunk_size)
    mask = random_mask(rng, b, n, cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max)
    mask_vec = codebook[frozen["mask_token_id"]].astype(q.quantized_st.dtype)
    lm_in = jnp.where(mask[..., None], mask_vec, q.quantized_st)
    lm_out = lm.apply({"params": frozen["lm"]}, inputs_embeds=lm_in, with_lm_head=with_mlm)
    recon_q = model.apply({"params": params}, q.quantized_st, method=LQAEModel.decode)
    recon_lm = model.apply({"params": params}, lm_out["last_hidden_state"],
                           method=LQAEModel.decode)
    return dict(z=z, q=q, mask=mask, lm_out=lm_out, recon_q=recon_q, recon_lm=recon_lm)


def loss_fn(params, frozen, batch, rng, *, model, lm, cfg):
    w = cfg.loss
    with_mlm = w.mlm > 0
    out = forward(params, frozen, batch["image"], rng, model=model, lm=lm, cfg=cfg,
                  with_mlm=with_mlm)
    x = batch["image"]
    x = preprocess_lib.to_float(x) if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    rec_q = jnp.mean(jnp.square(out["recon_q"].astype(jnp.float32) - x))
    rec_lm = jnp.mean(jnp.square(out["recon_lm"].astype(jnp.float32) - x))
    q = out["q"]
    mlm = (masked_cross_entropy(out["lm_out"]["logits"], q.indices, out["mask"])
           if with_mlm else jnp.zeros(()))
    loss = (w.recon_quantized * rec_q + w.recon_lm * rec_lm + w.commitment * q.commitment
            + w.mlm * mlm)
    vocab = roberta.word_embedding_matrix(frozen["lm"]).shape[0]
    aux = {
        "recon_quantized": rec_q,
        "recon_lm": rec_lm,
        "commitment": q.commitment,
        "mlm": mlm,
        "codebook_usage": quantize_lib.codebook_usage(q.indices, vocab),
        "perplexity": quantize_lib.perplexity(q.indices, vocab),
        "mask_ratio": jnp.mean(out["mask"].astype(jnp.float32)),
    }
    return loss, aux


# ----------------------------------------------------------------------------------------------
# Data


def _sources(cfg: ml_collections.ConfigDict):
    d = cfg.data
    if d.name == "digits":
        from lqae_vlap.data import demo_images

        train = demo_images.DemoImages("train", image_size=cfg.model.image_size)
        val = demo_images.DemoImages("validation", image_size=cfg.model.image_size)
        return train, val, None, None
    if d.name == "imagenet":
        from lqae_vlap.data import imagenet

        kw = dict(data_dir=d.data_dir or None, manual_dir=d.manual_dir or None,
                  image_size=cfg.model.image_size)
        return (imagenet.imagenet_source("train", train=True, **kw),
                imagenet.imagenet_source("validation", train=False, **kw),
                imagenet.imagenet_preprocess(cfg.model.image_size, train=True),
                imagenet.imagenet_preprocess(cfg.model.image_size, train=False))
    raise ValueError(f"config.data.name={d.name!r} is not known; use 'digits' or 'imagenet'")


def _image_only(preprocess):
    # Images stay uint8 until they are on the device: a quarter of the host-to-device bytes.
    def fn(example, rng):
        if preprocess is not None:
            example = preprocess(example, rng)
        return {"image": example["image"]}
    return fn


# ----------------------------------------------------------------------------------------------
# Evaluation: reconstruction error on held-out images, a PNG grid and the words of a few images.


def _png_grid(rows: list[np.ndarray], path: str) -> None:
    """rows: list of [n, H, W, C] float images in [-1, 1]; one row each, written as a PNG."""
    from PIL import Image

    n, h, w, c = rows[0].shape
    pad = 2
    grid = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), np.float32)
    for r, imgs in enumerate(rows):
        for i, img in enumerate(imgs):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y:y + h, x:x + w] = (np.clip(img, -1, 1) + 1) / 2
    grid = (grid * 255).round().astype(np.uint8)
    scale = max(1, 256 // max(h, 1))
    im = Image.fromarray(grid if c == 3 else grid[..., 0])
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = np.mean((np.clip(a, -1, 1) - b) ** 2)
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def make_evaluate(cfg, model, lm, tokenizer, eval_batches, mesh):
    # Replicated outputs: every process can read them (multi-host), process 0 writes the files.
    fwd = jax.jit(functools.partial(forward, model=model, lm=lm, cfg=cfg, with_mlm=False),
                  out_shardings=sharding_lib.replicated(mesh))
    num_batches = int(cfg.eval.num_batches)

    def evaluate(params, frozen, step, workdir):
        rng = jax.random.PRNGKey(cfg.seed + 2)  # fixed masks: comparable across steps
        sums = {"recon_quantized": 0.0, "recon_lm": 0.0, "psnr_quantized": 0.0}
        first = None
        for i in range(num_batches):
            batch = eval_batches.batch_at(i)
            out = fwd(params, frozen, batch["image"], jax.random.fold_in(rng, i))
            out = jax.device_get({k: out[k] for k in ("recon_q", "recon_lm", "mask")}
                                 | {"indices": out["q"].indices})
            x = preprocess_lib.to_float(batch["image"])
            sums["recon_quantized"] += float(np.mean((out["recon_q"] - x) ** 2))
            sums["recon_lm"] += float(np.mean((out["recon_lm"] - x) ** 2))
            sums["psnr_quantized"] += _psnr(out["recon_q"], x)
            first = first or (x, out)
        scalars = {k: v / num_batches for k, v in sums.items()}
        x, out = first
        idx = out["indices"]
        vocab = roberta.word_embedding_matrix(frozen["lm"]).shape[0]
        scalars["codebook_usage"] = float(len(np.unique(idx)) / vocab)
        if jax.process_index() == 0:
            k = min(int(cfg.eval.num_images), x.shape[0])
            _png_grid([x[:k], out["recon_q"][:k], out["recon_lm"][:k]],
                      os.path.join(workdir, f"reconstructions_{step:06d}.png"))
            lines = [f"# step {step}: the words each validation image became "
                     f"({idx.shape[1]} tokens, patches in row-major order)"]
            for j in range(k):
                words = tokenizer.convert_ids_to_tokens([int(t) for t in idx[j]])
                lines.append(f"image {j}: " + " ".join(words))
            with open(os.path.join(workdir, f"words_{step:06d}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
            with open(os.path.join(workdir, f"eval_{step:06d}.json"), "w") as f:
                json.dump({"step": step, **scalars}, f, indent=1)
        return scalars

    return evaluate


# ----------------------------------------------------------------------------------------------


def build(config: ml_collections.ConfigDict, mesh, *, abstract: bool = False) -> Method:
    """Loads the frozen LM, builds the trainable model, data and loss for the trainer.

    abstract=True reads no weights and no data (plan mode): ``frozen`` holds
    ``jax.ShapeDtypeStruct``s and ``batch_spec`` the global batch's shapes.
    """
    m = config.model
    dtype = jnp.dtype(m.get("dtype", "float32"))
    lm, lm_variables, hf_config = hf_weights.load_masked_lm(
        m.lm_path, dtype=jnp.dtype(m.get("lm_dtype", "float32")), mesh=mesh, abstract=abstract)
    lm_params = lm_variables["params"]
    if config.loss.mlm > 0 and not lm.config.has_lm_head:
        raise ValueError(
            f"config.loss.mlm={config.loss.mlm} needs a masked-LM head, but {m.lm_path} has none "
            "(a plain encoder checkpoint); set --config.loss.mlm=0 or use a *ForMaskedLM checkpoint")
    lm_width = lm.config.hidden_size
    model = LQAEModel(config=m, lm_width=lm_width, dtype=dtype)
    replicated = sharding_lib.replicated(mesh)

    def init_params(rng):
        dummy = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
        return model.init(rng, dummy)["params"]

    loss = functools.partial(loss_fn, model=model, lm=lm, cfg=config)
    describe = (f"LQAE: ViT {m.encoder.width}x{m.encoder.depth} enc / {m.decoder.width}x"
                f"{m.decoder.depth} dec, patch {m.patch_size} on {m.image_size}px, frozen "
                f"{hf_config.model_type} from {m.lm_path} (vocab {lm.config.vocab_size}, width "
                f"{lm_width})")
    if abstract:
        frozen = {"lm": lm_params,
                  "mask_token_id": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
        image = (config.data.batch_size, m.image_size, m.image_size, m.channels)
        return Method(init_params=init_params, frozen=frozen,
                      frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen), loss_fn=loss,
                      train_batches=None, batch_spec={"image": jax.ShapeDtypeStruct(image, jnp.uint8)},
                      describe=describe)

    tokenizer = hf_weights.load_tokenizer(m.lm_path)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"the tokenizer of {m.lm_path} has no mask token; LQAE needs one")
    mask_token_id = np.asarray(tokenizer.mask_token_id, np.int32)
    frozen = {"lm": lm_params, "mask_token_id": jax.device_put(mask_token_id, replicated)}
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

    train_src, val_src, train_pre, val_pre = _sources(config)
    pid, pcount = jax.process_index(), jax.process_count()
    train_batches = batches_lib.IndexedBatches(
        train_src, global_batch_size=config.data.batch_size, seed=config.data.seed,
        shuffle=True, process_index=pid, process_count=pcount,
        preprocess=_image_only(train_pre), num_workers=config.data.num_workers)
    eval_batches = batches_lib.IndexedBatches(
        val_src, global_batch_size=config.eval.batch_size, seed=0, shuffle=False,
        process_index=0, process_count=1, preprocess=_image_only(val_pre),
        num_workers=config.data.num_workers)
    describe += (f"; data {config.data.name}: {len(train_src)} train / {len(val_src)} "
                 "validation images")
    return Method(init_params=init_params, frozen=frozen, frozen_shardings=frozen_shardings,
                  loss_fn=loss, train_batches=train_batches, eval_batches=eval_batches,
                  evaluate=make_evaluate(config, model, lm, tokenizer, eval_batches, mesh),
                  describe=describe)
