"""VLAP's frozen vision encoders, one record each: ``config.model.vision.kind`` -> its tower.

  'clip'     a CLIP vision tower (models.load_pretrained): images resized and centre-cropped on
             the host, CLIP-normalised on the device; its last hidden states (CLS + patches, 50
             tokens for ViT-B/32) are the tokens.
  'beit'     a BEiT tower (models/beit.py): images resized to a square on the host (bilinear, no
             crop, as microsoft/beit-base-patch16-224-pt22k's processor), normalised to [-1, 1] on
             the device; its last hidden states (CLS + patches, 197 tokens for BEiT-Base/16 at
             224; no final LayerNorm for the pt22k checkpoint, as the authors' BeitModel) are the
             tokens.
  'lqae'     this project's own LQAE encoder, trained without captions (configs/lqae_scenes.py),
             read from ``config.model.vision.workdir`` at ``.step`` (-1: the newest;
             methods/lqae_checkpoint.py): images in its pixel range, its ViT encoder's patch
             features [B, N, lm width] before quantization (``.output='encoder'``, default) or
             the raw word vectors they snap to (``.output='quantized'``: the frozen LM's
             codebook rows, by the run's own quantizer settings) are the tokens.
  'standin'  the demo's STAND-IN (models/standin.py): a fixed random projection of pixel
             patches, never trained; no model of vision.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap import models
from lqae_vlap.core import files
from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.data import beit_preprocess, clip_preprocess
from lqae_vlap.data import feature_cache as fc
from lqae_vlap.methods import lqae, lqae_checkpoint
from lqae_vlap.models import roberta, standin
from lqae_vlap.ops import pixels
from lqae_vlap.ops import quantize as quantize_lib


@dataclasses.dataclass(frozen=True)
class VisionTower:
    """encode: (frozen['vision'], images [B, S, S, 3] uint8 after ``host_image``) -> tokens
    [B, T, width]; frozen: its weights on the mesh (ShapeDtypeStructs when abstract);
    host_image: host-side preprocessing of one image, or None; cache_parts: what the feature
    cache keys on besides the data (the model and the preprocessing)."""

    encode: Callable[[Any, jax.Array], jax.Array]
    frozen: Any
    width: int
    image_size: int
    host_image: Callable[[Any], Any] | None
    cache_parts: dict[str, Any]


def _clip_tokens(frozen: Any, images: jax.Array, *, module: Any) -> jax.Array:
    x = clip_preprocess.clip_normalize(images) if images.dtype == jnp.uint8 else images
    return module.apply({"params": frozen["params"]}, x)["last_hidden_state"]


def _beit_tokens(frozen: Any, images: jax.Array, *, module: Any) -> jax.Array:
    x = beit_preprocess.beit_normalize(images) if images.dtype == jnp.uint8 else images
    return module.apply({"params": frozen["params"]}, x)["last_hidden_state"]


def _pretrained(config: ml_collections.ConfigDict, mesh: Any, abstract: bool, family: str,
                **options: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(module, variables, the cache's 'vision' identity) of a checkpoint of ``family``."""
    v = config.model.vision
    local = bool(v.path) and os.path.exists(os.path.expanduser(str(v.path)))
    arch = models.plan_architecture(v.path, v.get("arch"), "config.model.vision.arch") \
        if abstract else None
    held = models.family(arch) if arch else models.checkpoint_family(v.path)
    if held not in (None, family):
        raise ValueError(f"config.model.vision.kind={v.kind!r} but {v.path} holds a {held!r}-"
                         f"family model; point config.model.vision.path at a {family.upper()} checkpoint "
                         "or set config.model.vision.kind to match it")
    module, variables, _ = models.load_pretrained(
        None if arch else v.path, dtype=jnp.dtype(v.get("dtype", "float32")), mesh=mesh,
        abstract=abstract, hf_config=arch, **options)
    # The kind is in the key so that two towers' features never share a cache entry.
    identity = {"kind": v.kind, "dtype": v.dtype, "output": "last_hidden_state"}
    identity = ({**fc.vision_identity(v.path), **identity} if local
                else fc.vision_identity(config={"path": str(v.path), **identity}))
    return module, variables, identity


def _clip(config: ml_collections.ConfigDict, mesh: Any, abstract: bool) -> VisionTower:
    module, variables, identity = _pretrained(config, mesh, abstract, "clip",
                                              with_projection=False)
    size = module.config.image_size
    preprocess = {"name": "clip_resize_crop", "size": size, "crop": size, "resample": "bicubic",
                  "mean": list(clip_preprocess.CLIP_MEAN), "std": list(clip_preprocess.CLIP_STD)}
    return VisionTower(
        encode=functools.partial(_clip_tokens, module=module),
        frozen={"params": variables["params"]},
        width=module.config.hidden_size, image_size=size,
        host_image=functools.partial(clip_preprocess.clip_resize_crop, size=size, crop=size),
        cache_parts={"vision": identity, "preprocess": preprocess})


def _beit(config: ml_collections.ConfigDict, mesh: Any, abstract: bool) -> VisionTower:
    module, variables, identity = _pretrained(config, mesh, abstract, "beit")
    size, resample = module.config.image_size, beit_preprocess.PT22K_RESAMPLE
    preprocess = {"name": "beit_resize", "size": size, "resample": resample,
                  "mean": list(beit_preprocess.BEIT_MEAN), "std": list(beit_preprocess.BEIT_STD)}
    return VisionTower(
        encode=functools.partial(_beit_tokens, module=module),
        frozen={"params": variables["params"]},
        width=module.config.hidden_size, image_size=size,
        host_image=functools.partial(beit_preprocess.beit_resize, size=size, resample=resample),
        cache_parts={"vision": identity, "preprocess": preprocess})


def _standin_tokens(frozen: Any, images: jax.Array, *, patch_size: int) -> jax.Array:
    x = pixels.to_float(images) if images.dtype == jnp.uint8 else images
    return standin.features(frozen["projection"], x, patch_size)


def _standin(config: ml_collections.ConfigDict, mesh: Any, abstract: bool) -> VisionTower:
    v, size = config.model.vision, int(config.model.image_size)
    patch, width = int(v.patch_size), int(v.width)
    rep = sharding_lib.replicated(mesh)
    shape = (patch * patch * 3, width)
    proj = (jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rep) if abstract
            else jax.device_put(standin.projection(int(v.seed), *shape), rep))
    identity = fc.vision_identity(config={"kind": v.kind, "patch_size": patch, "width": width,
                                          "seed": int(v.seed)})
    return VisionTower(
        encode=functools.partial(_standin_tokens, patch_size=patch), frozen={"projection": proj},
        width=width, image_size=size, host_image=None,
        cache_parts={"vision": identity, "preprocess": {"name": "demo_images", "size": size}})


LQAE_OUTPUTS = ("encoder", "quantized")


def _lqae_tokens(frozen: Any, images: jax.Array, *, model: Any, cfg: ml_collections.ConfigDict,
                 output: str) -> jax.Array:
    z = model.apply({"params": frozen["params"]}, lqae.to_model_pixels(images, cfg),
                    method=lqae.LQAEModel.encode)  # [B, N, lm width]
    if output == "encoder":
        return z
    q = cfg.quantizer
    return quantize_lib.quantize(z, frozen["codebook"], metric=q.metric, chunk_size=q.chunk_size,
                                 straight_through_on=q.straight_through_on).quantized


def _tree_sha256(tree: Any) -> str:
    """A hash of every leaf's path, dtype, shape and bytes: a workdir retrained to the same
    step must not reuse the old features from the cache."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _lqae(config: ml_collections.ConfigDict, mesh: Any, abstract: bool) -> VisionTower:
    v = config.model.vision
    output = v.get("output", "encoder")
    if output not in LQAE_OUTPUTS:
        raise ValueError(f"config.model.vision.output={output!r} is not known; use one of "
                         f"{LQAE_OUTPUTS}")
    # The weights are read even when abstract: a tiny encoder, and its shapes are in them.
    run, params, step = lqae_checkpoint.read_lqae(str(v.workdir), int(v.get("step", -1)))
    lqae.check_config(run)
    # The LM's width, which the encoder maps into (no out_proj where the widths are equal).
    enc = params["encoder"]
    width = int(enc["out_proj"]["kernel"].shape[-1] if "out_proj" in enc
                else run.model.encoder.width)
    model = lqae.LQAEModel(config=run.model, lm_width=width)
    rep = sharding_lib.replicated(mesh)
    frozen = {"params": jax.device_put(params, rep)}
    if output == "quantized":
        _, lm_variables, _ = models.load_pretrained(run.model.lm_path, mesh=mesh)
        frozen["codebook"] = roberta.word_embedding_matrix(lm_variables["params"])
    if abstract:
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                              frozen)
    size = int(run.model.image_size)
    identity = fc.vision_identity(config={
        "kind": v.kind, "workdir": files.normalize(str(v.workdir)),
        "step": step, "output": output, "params_sha256": _tree_sha256(params)})
    return VisionTower(
        encode=functools.partial(_lqae_tokens, model=model, cfg=run, output=output),
        frozen=frozen, width=width, image_size=size, host_image=None,
        cache_parts={"vision": identity, "preprocess": {"name": "lqae_pixels", "size": size,
                                                        "range": list(run.model.pixel_range)}})


TOWERS: dict[str, Callable[[ml_collections.ConfigDict, Any, bool], VisionTower]] = {
    "clip": _clip,
    "beit": _beit,
    "lqae": _lqae,
    "standin": _standin,
}


def load_vision(config: ml_collections.ConfigDict, mesh: Any, abstract: bool = False
                ) -> VisionTower:
    """The frozen vision tower of ``config.model.vision`` on ``mesh`` (abstract: no weights)."""
    kind = config.model.vision.kind
    if kind not in TOWERS:
        raise ValueError(f"config.model.vision.kind={kind!r} is not known; use 'clip', 'beit', "
                         "'lqae' (an LQAE workdir) or 'standin' (demo only)")
    return TOWERS[kind](config, mesh, abstract)
