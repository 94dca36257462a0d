"""Linear probe on LQAE's words: frozen-LM features of each image, then softmax regression.

Features are the frozen encoder LM's hidden states over the image's words, mean-pooled
(``fewshot.encoder_features``); they are computed once per (checkpoint step, layer, split) and
cached to an .npz. The classifier is one Dense layer trained with optax AdamW on standardised
features (mean and std from the training split only, so nothing of the validation set leaks in).

This is a simplified probe: LQAE's release concatenated per-layer token means of the ViT encoder
and of RoBERTa and trained LayerNorm + Dense with LARS; here one LM layer is probed at a time
(``config.eval.probe.layer``, transformers' hidden_states indexing).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lqae_vlap.core import files
import optax


def cache_key(step: int, layer: int, split: str) -> str:
    """Hex digest (16 chars) identifying the features of one checkpoint step, layer and split."""
    blob = json.dumps({"step": int(step), "layer": int(layer), "split": str(split)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_features(cache_dir: str | os.PathLike, *, step: int, layer: int, split: str,
                    compute_fn: Callable[[], tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Loads (features [N, D], labels [N]) from the cache, or computes and stores them.

    The file is ``<cache_dir>/features_<split>_<cache_key>.npz``; it is written to a temporary name
    and renamed, so an interrupted run never leaves a truncated cache behind.
    """
    key = cache_key(step, layer, split)
    path = files.join(cache_dir, f"features_{split}_{key}.npz")  # local or gs://
    if files.exists(path):
        with np.load(io.BytesIO(files.read_bytes(path))) as f:
            if str(f["key"]) != key:
                raise ValueError(f"feature cache {path} was written for another key; delete it")
            return f["features"], f["labels"]
    features, labels = compute_fn()
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"compute_fn must return features [N, D] and labels [N], got "
                         f"{features.shape} and {labels.shape}")
    files.makedirs(cache_dir)
    buffer = io.BytesIO()
    np.savez(buffer, features=features, labels=labels, key=np.asarray(key))
    files.write_bytes(path, buffer.getvalue())  # whole-file write: never a truncated cache
    return features, labels


class LinearProbe(nn.Module):
    """Softmax regression: x [B, D] -> logits [B, num_classes]. Classes sit on the 'vocab' axis."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(x)


def _check_xy(x: Any, y: Any, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.ndim != 2 or y.shape != x.shape[:1] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"train_linear_probe: {name} needs features [N, D] and integer labels "
                         f"[N], got {x.shape} and {y.shape} {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"train_linear_probe: {name} labels span [{y.min()}, {y.max()}], outside "
                         f"[0, num_classes={num_classes})")
    return x, y.astype(np.int32)


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                       val_y: np.ndarray, num_classes: int, *, epochs: int = 100,
                       batch_size: int | None = None, learning_rate: float = 1e-2,
                       weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Trains softmax regression on frozen features; reports top-1 accuracy.

    train_x: [N, D], train_y: [N] int in [0, num_classes); val_x: [M, D], val_y: [M].
    Features are standardised with the training mean and std. batch_size=None trains full-batch;
    otherwise each epoch visits a fresh permutation in batches of batch_size (the last partial batch
    is dropped, unless the whole set is smaller than one batch). AdamW decays the kernel only.
    Returns dict(top1=validation top-1, train_top1, train_loss=final full-train cross-entropy).
    """
    train_x, train_y = _check_xy(train_x, train_y, num_classes, "train")
    val_x, val_y = _check_xy(val_x, val_y, num_classes, "val")
    if val_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"train_linear_probe: val features have D={val_x.shape[1]}, train "
                         f"D={train_x.shape[1]}")
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6  # constant features stay finite (and at 0 after centring)
    tx_np, vx_np = (train_x - mean) / std, (val_x - mean) / std

    model = LinearProbe(num_classes)
    params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, train_x.shape[1]))))
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == "kernel", params)
    opt = optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def epoch(p, s, xb, yb):  # xb: [num_batches, bs, D], yb: [num_batches, bs]
        def step(carry, batch):
            p, s = carry
            grads = jax.grad(loss_fn)(p, *batch)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (p, s), (xb, yb))[0]

    n = len(tx_np)
    bs = n if batch_size is None else min(int(batch_size), n)
    if bs < 1:
        raise ValueError(f"train_linear_probe: batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    tx, ty = jnp.asarray(tx_np), jnp.asarray(train_y)
    for _ in range(int(epochs)):
        order = np.arange(n) if bs == n else rng.permutation(n)
        order = order[: (n // bs) * bs].reshape(-1, bs)
        params, opt_state = epoch(params, opt_state, tx[order], ty[order])

    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), axis=-1))
    top1 = float(np.mean(np.asarray(predict(params, jnp.asarray(vx_np))) == val_y))
    train_top1 = float(np.mean(np.asarray(predict(params, tx)) == train_y))
    return {"top1": top1, "train_top1": train_top1,
            "train_loss": float(jax.jit(loss_fn)(params, tx, ty))}
