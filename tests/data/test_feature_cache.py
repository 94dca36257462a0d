"""Vision-feature cache (data/feature_cache.py): keys, reuse, atomic writes, corruption, values.

The "vision model" is a jitted JAX patch embedding (4x4 patches -> fixed random Dense) so the
cached values can be checked against a float64 NumPy computation of the same map.
"""

from __future__ import annotations

import functools
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.data.batches import IndexedBatches
from lqae_vlap.data.clip_preprocess import CLIP_MEAN, CLIP_STD, clip_resize_crop
from lqae_vlap.data.feature_cache import (CachedFeatures, FeatureCache, cache_key, vision_identity,
                                          weights_fingerprint)

N, S, P, DV = 11, 8, 4, 6  # examples, image side, patch side, feature width
W = np.random.default_rng(1).normal(size=(P * P * 3, DV))


class Images:
    """Random images of varied sizes with captions; counts image reads."""

    def __init__(self, n: int = N) -> None:
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (S + k % 4, S + 2 * (k % 3), 3), dtype=np.uint8)
                       for k in range(n)]
        self.image_reads = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.image_reads += 1
        return {"image": self.images[i], "caption": f"picture {i}", "index": np.int32(i)}

    @property
    def captions(self):
        return [f"picture {i}" for i in range(len(self))]


def patches_np(images: np.ndarray) -> np.ndarray:
    b = images.shape[0]
    x = images.reshape(b, S // P, P, S // P, P, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (S // P) ** 2, P * P * 3)


@jax.jit
def _features(images):
    x = images.astype(jnp.float32) / 255.0
    b = x.shape[0]
    x = x.reshape(b, S // P, P, S // P, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, P * P * 3)
    return x @ jnp.asarray(W, jnp.float32)


class Counting:
    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, images):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed mid-way")
        return _features(images)


PRE = functools.partial(clip_resize_crop, size=S, crop=S)


def reference(source: Images) -> np.ndarray:
    images = np.stack([PRE(im) for im in source.images]).astype(np.float64) / 255.0
    return patches_np(images) @ W  # [N, T, Dv] float64


def key_for(source, dtype="float32", size=S, **extra):
    return cache_key(vision=vision_identity(config={"kind": "patch_dense", "seed": 1, "width": DV}),
                     preprocess={"name": "clip_resize_crop", "size": size, "crop": size,
                                 "resample": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD},
                     dataset="images", split="train", num_examples=len(source), dtype=dtype, **extra)


def test_compute_matches_direct_features_then_reuses(tmp_path):
    src = Images()
    fn = Counting()
    cache = FeatureCache(tmp_path)
    key = key_for(src)
    feats = cache.get_or_compute(key, src, fn, batch_size=4, preprocess=PRE, num_workers=2)
    assert fn.calls == 3  # ceil(11 / 4), the last batch padded to 4
    assert isinstance(feats, np.memmap) and feats.shape == (N, (S // P) ** 2, DV)
    assert feats.dtype == np.float32 and not feats.flags.writeable
    np.testing.assert_allclose(feats, reference(src), rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / f"{key}.json").read_text())
    assert meta["parts"]["preprocess"]["size"] == S and meta["shape"] == list(feats.shape)
    assert meta["parts"]["num_examples"] == N and meta["dtype"] == "float32"

    again = cache.get_or_compute(key, src, fn, batch_size=4, preprocess=PRE)
    assert fn.calls == 3  # reused: feature_fn not called
    np.testing.assert_array_equal(again, feats)
    other = FeatureCache(tmp_path).get_or_compute(key_for(src), Images(), fn, batch_size=5, preprocess=PRE)
    assert fn.calls == 3
    np.testing.assert_array_equal(other, feats)


def test_float16_storage(tmp_path):
    src = Images()
    feats = FeatureCache(tmp_path).get_or_compute(key_for(src, "float16"), src, Counting(),
                                                  batch_size=11, preprocess=PRE)
    assert feats.dtype == np.float16
    # float16 keeps 11 significant bits: relative error <= 2^-11 of each value.
    np.testing.assert_allclose(feats.astype(np.float64), reference(src), rtol=2**-11, atol=1e-3)
    with pytest.raises(ValueError, match="disagrees with the key's dtype"):
        FeatureCache(tmp_path).get_or_compute(key_for(src, "float16"), src, Counting(), batch_size=4,
                                              preprocess=PRE, dtype="float32")


def test_keys_change_with_what_changes_the_features(tmp_path):
    src = Images()
    base = key_for(src)
    assert len(base) == 64 and base == key_for(src)  # deterministic
    assert key_for(src, size=10) != base  # other preprocessing
    assert key_for(src, dtype="float16") != base
    assert key_for(Images(5)) != base  # other length
    assert key_for(src, layer=-2) != base  # extra parts count too
    assert key_for(src, dtype=np.float32) == base  # same dtype spelled differently
    reordered = cache_key(dtype="float32", num_examples=N, split="train", dataset="images",
                          preprocess=dict(reversed(list(base.parts["preprocess"].items()))),
                          vision=base.parts["vision"])
    assert reordered == base  # canonical JSON: the order of keys does not matter
    with pytest.raises(ValueError, match=r"missing parts \['dtype'\]"):
        cache_key(vision={}, preprocess={}, dataset="x", split="y", num_examples=1)
    with pytest.raises(TypeError, match=r"parts.preprocess.fn is a function"):
        cache_key(vision={}, preprocess={"fn": PRE.func}, dataset="x", split="y", num_examples=1,
                  dtype="float32")
    with pytest.raises(ValueError, match="source has 11 examples but the key says 5"):
        FeatureCache(tmp_path).get_or_compute(key_for(Images(5)), src, Counting(), batch_size=4,
                                              preprocess=PRE)


def test_interrupted_compute_leaves_no_complete_looking_file(tmp_path):
    src = Images()
    key = key_for(src)
    cache = FeatureCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(key, src, Counting(fail_at=2), batch_size=4, preprocess=PRE)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .npy, no .json, no temporary file
    assert cache.get(key) is None
    fn = Counting()
    feats = cache.get_or_compute(key, src, fn, batch_size=4, preprocess=PRE)
    assert fn.calls == 3
    np.testing.assert_allclose(feats, reference(src), rtol=1e-5, atol=1e-5)

    def nan_fn(images):
        return np.full((images.shape[0], 2), np.nan, np.float32)

    with pytest.raises(FloatingPointError, match="non-finite features for examples 0..3"):
        cache.get_or_compute(key_for(src, split_note="nan"), src, nan_fn, batch_size=4, preprocess=PRE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.json", f"{key}.npy"]


def test_corrupt_files_are_named_with_the_fix(tmp_path):
    src = Images()
    key = key_for(src)
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(key, src, Counting(), batch_size=4, preprocess=PRE)
    np.save(tmp_path / f"{key}.npy", np.zeros((N, 3, DV), np.float32))  # wrong shape
    with pytest.raises(ValueError, match=f"corrupt feature cache: .*{key}.npy holds float32 "
                                         r"\(11, 3, 6\).*Rebuild it: rm -f "):
        cache.get_or_compute(key, src, Counting(), batch_size=4, preprocess=PRE)
    (tmp_path / f"{key}.npy").write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="cannot be read as .npy.*Rebuild it: rm -f "):
        cache.get(key)
    (tmp_path / f"{key}.json").unlink()
    with pytest.raises(ValueError, match="has no metadata file.*Rebuild it: rm -f "):
        cache.get(key)
    with pytest.raises(ValueError, match="not a cache key"):
        cache.get("../etc/passwd")


def test_cached_features_source(tmp_path):
    src = Images()
    feats = FeatureCache(tmp_path).get_or_compute(key_for(src), src, Counting(), batch_size=4,
                                                  preprocess=PRE)
    cached = CachedFeatures(src, feats)
    assert len(cached) == N and cached.captions == src.captions
    ex = cached[3]
    assert set(ex) == {"caption", "index", "vision_features"} and ex["caption"] == "picture 3"
    np.testing.assert_array_equal(ex["vision_features"], feats[3])
    batch = IndexedBatches(cached, global_batch_size=4, seed=0).batch_at(1)
    assert batch["vision_features"].shape == (4, (S // P) ** 2, DV)
    np.testing.assert_array_equal(batch["vision_features"], np.asarray(feats)[batch["index"]])

    class WithFields(Images):
        def fields_without_image(self, i):
            return {"caption": f"picture {i}", "index": np.int32(i)}

    lazy = WithFields()
    assert set(CachedFeatures(lazy, feats)[5]) == {"caption", "index", "vision_features"}
    assert lazy.image_reads == 0  # no image decoded just to be dropped
    with pytest.raises(ValueError, match="11 rows"):
        CachedFeatures(Images(5), feats)


def test_cached_features_pickle_as_a_file_reference(tmp_path):
    # data/batches.py's worker processes each get a pickled copy of the source: a memory map
    # must travel as where it lies (and be mapped again), not as its contents.
    src = Images()
    feats = FeatureCache(tmp_path).get_or_compute(key_for(src), src, Counting(), batch_size=4,
                                                  preprocess=PRE)
    assert isinstance(feats, np.memmap)
    cached = CachedFeatures(src, feats, replaced={3: 4})
    blob = pickle.dumps(cached)
    assert len(blob) < len(pickle.dumps(src)) + feats.nbytes // 2
    again = pickle.loads(blob)
    assert isinstance(again.features, np.memmap) and again.features.filename == feats.filename
    assert again.features.dtype == feats.dtype and again.features.tobytes() == feats.tobytes()
    for i in (0, 3, N - 1):
        assert again[i]["caption"] == cached[i]["caption"]
        np.testing.assert_array_equal(again[i]["vision_features"], cached[i]["vision_features"])
    in_memory = CachedFeatures(src, np.array(feats))  # an ordinary array pickles as itself
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(in_memory)).features, feats)


def test_weights_fingerprint_sees_head_tail_and_size(tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8))
    path.write_bytes(bytes(data))
    base = weights_fingerprint(path)
    assert base["size"] == len(data) and base == weights_fingerprint(path)
    data[-1] ^= 1  # the last MiB is hashed
    path.write_bytes(bytes(data))
    assert weights_fingerprint(path) != base
    (tmp_path / "config.json").write_text('{"hidden_size": 768}')
    ident = vision_identity(tmp_path)
    assert [w["name"] for w in ident["weights"]] == ["model.safetensors"] and "config_sha256" in ident
    (tmp_path / "config.json").write_text('{"hidden_size": 1024}')
    assert vision_identity(tmp_path) != ident
    with pytest.raises(ValueError, match="exactly one"):
        vision_identity()


def test_cache_sources_wraps_each_source_once_and_refuses_object_stores(tmp_path):
    from lqae_vlap.data.feature_cache import cache_sources

    train, val = Images(), Images(5)
    fn = Counting()
    parts = dict(vision=vision_identity(config={"kind": "patch_dense", "seed": 1, "width": DV}),
                 preprocess={"name": "clip_resize_crop", "size": S}, dataset="images")
    out = cache_sources({"train": train, "validation": val, "images": val, "vqa": None}, tmp_path,
                        parts=parts, encode=fn, batch_size=4, preprocess=PRE)
    assert out["vqa"] is None and out["images"] is out["validation"]  # one source, stored once
    assert fn.calls == 3 + 2 and len(list(tmp_path.glob("*.npy"))) == 2
    np.testing.assert_allclose(out["train"][4]["vision_features"], reference(train)[4],
                               rtol=1e-5, atol=1e-5)
    assert out["validation"][1]["caption"] == "picture 1"
    cache_sources({"train": train}, tmp_path, parts=parts, encode=fn, batch_size=4, preprocess=PRE)
    assert fn.calls == 5  # reused
    with pytest.raises(ValueError, match="local disk"):
        cache_sources({"train": train}, "gs://bucket/fc", parts=parts, encode=fn)
    with pytest.raises(ValueError, match="feature_cache.dir"):
        cache_sources({"train": train}, "", parts=parts, encode=fn)
