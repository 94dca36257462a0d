"""Linear probe on LQAE: frozen features of each image, a LayerNorm + Dense head trained on them.

Two kinds of features (``config.eval.probe.features``):
  released   the released probe's (lqae/main/linear_main.py, ``last_embedding_layers='all'``):
             the output of EVERY ViT-encoder block (its ``VitEncoder`` returns the L block
             outputs, not the patch embeddings) and EVERY hidden state of the frozen LM
             (transformers' ``hidden_states``: the embedding output and each of its L layers),
             each averaged over the tokens after the first (``x[:, 1:, :]``; neither tower has a
             class token, so the first token is the top-left patch and its word) and concatenated
             (``token_means_after_first``). ViT-B + RoBERTa-base: 12 * 768 + 13 * 768 = 19,200
             values per image, 38,400 bytes in float16 (76,800 in float32); ImageNet's 1,281,167
             training images take 49.2 GB in float16.
  lm_layer   one hidden state of the frozen LM (``config.eval.probe.layer``, transformers'
             indexing) averaged over all the words (``fewshot.encoder_features``), D values.
Features are computed once per (checkpoint step, kind, layer, split, dtype, max_images) and cached
(``cached_features``), so the probe's epochs never rerun the backbone; the cache stores
``config.eval.probe.cache_dtype`` (float16 halves the bytes; the head computes in float32).

The head and optimiser follow linear_main.py: LayerNorm (epsilon 1e-6, learned scale and bias) +
Dense(classes) with flax's default init; ``optax.lars`` (trust coefficient 0.001, weight decay and
trust ratio on every leaf, momentum 0.9, as its defaults and the release's flags), peak learning
rate ``lr * batch / 256`` (lr 1e-4), no warm-up, cosine to 0 over every step, cross-entropy;
``optimizer='adamw'`` swaps in optax.adamw (decay on the kernel only) with the same schedule.

Known differences from the release, kept on purpose: the backbone is truly frozen (the release
hands the whole model to optax.lars: with a zero gradient its decayed weight wd * p, scaled by the
trust ratio 0.001 |p| / |wd * p|, is 0.001 * p, so every backbone weight shrinks by 1e-3 * lr per
step, x10 through the momentum: over the 200 cosine epochs a factor exp(-1e-2 * 1e-4 / 256 *
1,281,167 * 200 / 2) = exp(-0.50) = 0.61, whatever the batch size); the training
images are centre crops whose features are cached, where the release recomputes them on
RandomResizedCrop(256, scale (0.2, 1)) + flip views each step; this reports the final top-1, where
the release logs the best validation accuracy over the epochs (evaluated at the start of each one);
the LM reads the words at positions pad+1..pad+N, where the release derives positions from the
word ids (``create_position_ids_from_input_ids``), so a word equal to <pad> shifts the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqae_vlap.core import files

FEATURES = ("released", "lm_layer")
OPTIMIZERS = ("lars", "adamw")
CACHE_DTYPES = ("float16", "float32")
LR_BATCH = 256  # the peak learning rate is lr * batch / LR_BATCH, as released


def check_protocol(probe: Mapping[str, Any]) -> None:
    """One clear ValueError for an unknown ``config.eval.probe`` features / optimizer / dtype."""
    for key, allowed in (("features", FEATURES), ("optimizer", OPTIMIZERS),
                         ("cache_dtype", CACHE_DTYPES)):
        if probe[key] not in allowed:
            raise ValueError(f"config.eval.probe.{key}={probe[key]!r} is not one of {allowed}")
    for key in ("epochs", "batch_size"):
        if int(probe[key]) < 0:
            raise ValueError(f"config.eval.probe.{key}={probe[key]} must be >= 0")


def token_means_after_first(states: Sequence[jax.Array]) -> jax.Array:
    """Each state [B, T, D_i] averaged over tokens 1..T-1, concatenated: [B, sum_i D_i] float32.

    The released probe's pooling (``jnp.mean(x[:, 1:, :], axis=1)`` per state, then concatenate).
    """
    if not states:
        raise ValueError("token_means_after_first: no states given")
    for s in states:
        if s.ndim != 3 or s.shape[1] < 2:
            raise ValueError(f"token_means_after_first: each state must be [batch, tokens >= 2, "
                             f"dim], got {tuple(s.shape)}")
    return jnp.concatenate([jnp.mean(s[:, 1:, :].astype(jnp.float32), axis=1) for s in states],
                           axis=-1)


def cache_key(*, step: int, features: str, layer: int | str, split: str, dtype: str,
              max_images: int) -> str:
    """Hex digest (16 chars) of what the cached features are: checkpoint step, feature kind,
    layer ('all' for the released concat), split, stored dtype and the image limit."""
    blob = json.dumps({"step": int(step), "features": str(features), "layer": str(layer),
                       "split": str(split), "dtype": str(dtype), "max_images": int(max_images)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_features(cache_dir: str | os.PathLike, *, step: int, features: str, split: str,
                    compute_fn: Callable[[], tuple[np.ndarray, np.ndarray]],
                    layer: int | str = "all", dtype: str = "float32", max_images: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Loads (features [N, D] in ``dtype``, labels [N]) from the cache, or computes and stores them.

    The file is ``<cache_dir>/features_<split>_<cache_key>.npz``, written whole (never a
    truncated cache); ``compute_fn`` runs only when it is missing. The arrays are held in memory:
    N * D * (2 for float16, 4 for float32) bytes.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cached_features: dtype={dtype!r} is not one of {CACHE_DTYPES}")
    key = cache_key(step=step, features=features, layer=layer, split=split, dtype=dtype,
                    max_images=max_images)
    path = files.join(cache_dir, f"features_{split}_{key}.npz")  # local or gs://
    if files.exists(path):
        with np.load(io.BytesIO(files.read_bytes(path))) as f:
            if str(f["key"]) != key:
                raise ValueError(f"feature cache {path} was written for another key; delete it")
            return f["features"], f["labels"]
    x, labels = compute_fn()
    x, labels = np.asarray(x).astype(dtype), np.asarray(labels)
    if x.ndim != 2 or labels.shape != x.shape[:1]:
        raise ValueError(f"compute_fn must return features [N, D] and labels [N], got "
                         f"{x.shape} and {labels.shape}")
    files.makedirs(cache_dir)
    buffer = io.BytesIO()
    np.savez(buffer, features=x, labels=labels, key=np.asarray(key))
    files.write_bytes(path, buffer.getvalue())  # whole-file write: never a truncated cache
    return x, labels


class ProbeHead(nn.Module):
    """The released head: LayerNorm (epsilon 1e-6) then Dense: x [B, D] -> logits [B, classes].

    flax's defaults, as released: LayerNorm scale 1, bias 0; Dense kernel lecun_normal, bias 0.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.LayerNorm(
            epsilon=1e-6,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     ("embed", "vocab")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(x)


def probe_optimizer(name: str, *, lr: float, batch_size: int, total_steps: int,
                    weight_decay: float, momentum: float, params: Any
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule): peak ``lr * batch_size / 256``, cosine to 0 over ``total_steps``
    from step 0 (the release's warmup_cosine_decay_schedule with 0 warm-up steps and end 0).

    'lars': optax.lars as released (weight decay and trust ratio on every leaf, trust coefficient
    0.001); 'adamw': optax.adamw with the decay on the Dense kernel only.
    """
    schedule = optax.cosine_decay_schedule(float(lr) * batch_size / LR_BATCH, max(total_steps, 1))
    if name == "lars":
        return optax.lars(schedule, weight_decay=weight_decay, momentum=momentum), schedule
    if name == "adamw":
        mask = jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key == "kernel", params)
        return optax.adamw(schedule, weight_decay=weight_decay, mask=mask), schedule
    raise ValueError(f"train_linear_probe: optimizer={name!r} is not one of {OPTIMIZERS}")


def _check_xy(x: Any, y: Any, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if (x.ndim != 2 or y.shape != x.shape[:1] or not np.issubdtype(y.dtype, np.integer)
            or not np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"train_linear_probe: {name} needs float features [N, D] and integer "
                         f"labels [N], got {x.shape} {x.dtype} and {y.shape} {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"train_linear_probe: {name} labels span [{y.min()}, {y.max()}], outside "
                         f"[0, num_classes={num_classes})")
    return x, y.astype(np.int32)


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                       val_y: np.ndarray, num_classes: int, *, optimizer: str = "lars",
                       lr: float = 1e-4, epochs: int = 200, batch_size: int | None = None,
                       weight_decay: float = 1e-4, momentum: float = 0.9, seed: int = 0,
                       eval_chunk: int = 8192) -> dict[str, float]:
    """Trains ``ProbeHead`` on frozen features with cross-entropy; reports top-1 accuracy.

    train_x: [N, D] float16/32, train_y: [N] int in [0, num_classes); val_x: [M, D], val_y: [M].
    batch_size None or 0: full batch; larger than N: N. Each epoch visits a fresh permutation in
    N // batch batches (the last partial batch dropped, as the release's drop_last). The peak
    learning rate is ``lr * batch / 256``, decayed by a cosine to 0 over epochs * (N // batch)
    steps from the first (no warm-up). The features stay on the device in their dtype (N * D *
    itemsize bytes) and each batch is cast to float32.
    Returns dict(top1 (validation), train_top1, train_loss (final full-train cross-entropy),
    lr_peak, batch_size, steps).
    """
    train_x, train_y = _check_xy(train_x, train_y, num_classes, "train")
    val_x, val_y = _check_xy(val_x, val_y, num_classes, "val")
    if val_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"train_linear_probe: val features have D={val_x.shape[1]}, train "
                         f"D={train_x.shape[1]}")
    n = len(train_x)
    bs = n if not batch_size else min(int(batch_size), n)
    if bs < 1:
        raise ValueError(f"train_linear_probe: needs >= 1 training example and batch_size >= 0, "
                         f"got N={n}, batch_size={batch_size}")
    steps_per_epoch = n // bs
    total_steps = steps_per_epoch * int(epochs)
    model = ProbeHead(num_classes)
    params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, train_x.shape[1]))))
    opt, schedule = probe_optimizer(optimizer, lr=lr, batch_size=bs, total_steps=total_steps,
                                    weight_decay=weight_decay, momentum=momentum, params=params)
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        logits = model.apply(p, x.astype(jnp.float32))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def epoch(p, s, x, y, order):  # x: [N, D] on the device, order: [steps, bs] row indices
        def step(carry, idx):
            p, s = carry
            grads = jax.grad(loss_fn)(p, x[idx], y[idx])
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (p, s), order)[0]

    rng = np.random.default_rng(seed)
    tx, ty = jnp.asarray(train_x), jnp.asarray(train_y)
    for _ in range(int(epochs)):
        order = np.arange(n) if bs == n else rng.permutation(n)
        order = order[: steps_per_epoch * bs].reshape(steps_per_epoch, bs)
        params, opt_state = epoch(params, opt_state, tx, ty, jnp.asarray(order, jnp.int32))

    train_top1, train_loss = _score(model, params, train_x, train_y, eval_chunk)
    top1, _ = _score(model, params, val_x, val_y, eval_chunk)
    return {"top1": top1, "train_top1": train_top1, "train_loss": train_loss,
            "lr_peak": float(schedule(0)), "batch_size": bs, "steps": total_steps}


def _score(model: ProbeHead, params: Any, x: np.ndarray, y: np.ndarray,
           chunk: int) -> tuple[float, float]:
    """(top-1, mean cross-entropy) over x [N, D] in row chunks (one compile: the last is padded)."""
    if len(x) == 0:
        return float("nan"), float("nan")

    @jax.jit
    def chunk_stats(p, xb, yb, valid):
        logits = model.apply(p, xb.astype(jnp.float32))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        hit = jnp.argmax(logits, axis=-1) == yb
        return jnp.sum(jnp.where(valid, hit, False)), jnp.sum(jnp.where(valid, ce, 0.0))

    size = min(chunk, len(x))
    hits = loss = 0.0
    for start in range(0, len(x), size):
        xb, yb = x[start:start + size], y[start:start + size]
        valid = np.arange(size) < len(xb)
        pad = size - len(xb)
        xb = np.concatenate([xb, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else xb
        yb = np.concatenate([yb, np.zeros(pad, y.dtype)]) if pad else yb
        h, c = chunk_stats(params, jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(valid))
        hits, loss = hits + float(h), loss + float(c)
    return hits / len(x), loss / len(x)
