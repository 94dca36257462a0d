"""A STAND-IN for a pretrained vision encoder, for offline demos only: a FIXED random projection
of pixel patches, seeded and never trained.

No pretrained vision encoder installs offline, so the VLAP demo needs something in CLIP's place
that turns an image into tokens [B, N, width]. This is the simplest such map with no learned
weights: the ViT's patchify (models/vit.py) followed by a Gaussian projection. It is no model of
vision: say so wherever its results are shown.
"""

from __future__ import annotations

import jax
import numpy as np

from lqae_vlap.models.vit import patchify


def projection(seed: int, patch_dim: int, width: int) -> np.ndarray:
    """The fixed projection [patch_dim, width] float32, N(0, 1/patch_dim) from ``seed``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((patch_dim, width)) / np.sqrt(patch_dim)).astype(np.float32)


def features(proj: jax.Array, images: jax.Array, patch_size: int) -> jax.Array:
    """images: [B, H, W, C] float in [-1, 1] -> tokens [B, (H/p)(W/p), width] (row-major patches,
    each flattened in (row, column, channel) order, times ``proj`` [p*p*C, width])."""
    return patchify(images, patch_size) @ proj
