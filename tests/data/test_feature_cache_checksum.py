"""The feature cache's checksum (data/feature_cache.py): recorded when written, verified on open;
a damaged file is named in one ValueError with the command that rebuilds it."""

import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest

from lqae_vlap.data import feature_cache as fc
from lqae_vlap.data.feature_cache import FeatureCache, cache_key

N = 7


class Images:
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"image": np.full((4, 4, 3), 10 * i, np.uint8), "caption": f"picture {i}"}


def encode(images):  # [B, 4, 4, 3] -> [B, 2, 3]: a fixed function of the pixels
    x = np.asarray(images, np.float32).reshape(len(images), 2, -1)
    return x[:, :, :3] / 255.0 + np.arange(3, dtype=np.float32)


def build(tmp_path):
    key = cache_key(vision={"config": {"kind": "test"}}, preprocess={"name": "none"},
                    dataset="images", split="train", num_examples=N, dtype="float32")
    cache = FeatureCache(tmp_path)
    feats = np.array(cache.get_or_compute(key, Images(), encode, batch_size=3, preprocess=None))
    npy, meta = cache.paths(key)
    return cache, key, feats, npy, meta


def age(path, seconds=60):
    """Moves a file's mtime into the past, as for a cache written in an earlier run."""
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


def test_checksum_is_recorded_and_checked(tmp_path):
    cache, key, feats, npy, meta = build(tmp_path)
    recorded = json.loads(meta.read_text())["sha256"]
    assert recorded == hashlib.sha256(npy.read_bytes()).hexdigest()
    np.testing.assert_array_equal(cache.get(key), feats)
    np.testing.assert_allclose(feats, encode(np.stack([Images()[i]["image"] for i in range(N)])))


def rebuild_command(npy):
    files = " ".join(str(npy.with_suffix(s)) for s in (".npy", ".json", ".verified"))
    return f"Rebuild it: rm -f {files}"


def test_same_size_garbage_is_named_with_the_rebuild_command(tmp_path):
    cache, key, feats, npy, meta = build(tmp_path)
    data = bytearray(npy.read_bytes())
    start = len(data) - feats.nbytes  # keep the .npy header: np.load alone sees nothing wrong
    data[start + 5:start + 9] = b"\x00\x00\xc0\x7f"  # one feature becomes NaN
    npy.write_bytes(bytes(data))
    assert np.load(npy).shape == feats.shape
    with pytest.raises(ValueError) as e:
        cache.get(key)
    message = str(e.value)
    assert message.startswith(f"corrupt feature cache: {npy} does not match the checksum "
                              "recorded when it was written"), message
    assert rebuild_command(npy) in message and "\n" not in message
    # The command does what it says: the features are recomputed, equal to the first ones.
    for suffix in (".npy", ".json", ".verified"):
        npy.with_suffix(suffix).unlink(missing_ok=True)
    again = cache.get_or_compute(key, Images(), encode, batch_size=3, preprocess=None)
    np.testing.assert_array_equal(again, feats)


def test_truncated_file_is_one_value_error(tmp_path):
    cache, key, _, npy, _ = build(tmp_path)
    npy.write_bytes(npy.read_bytes()[:-10])
    with pytest.raises(ValueError, match=re.escape(f"corrupt feature cache: {npy} cannot be read "
                                                   "as .npy") + ".*" + re.escape(rebuild_command(npy))):
        cache.get(key)


def test_cache_without_a_checksum_is_named(tmp_path):
    cache, key, _, npy, meta = build(tmp_path)
    fields = json.loads(meta.read_text())
    del fields["sha256"]
    meta.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=re.escape(f"{npy} has no checksum in its metadata")):
        cache.get(key)


def test_verified_file_is_not_reread_until_it_changes(tmp_path, monkeypatch):
    cache, key, feats, npy, _ = build(tmp_path)
    stamp = npy.with_suffix(".verified")
    assert not stamp.exists()  # just written: its mtime is too fresh to vouch for
    age(npy)
    cache.get(key)  # full check, then the stamp
    assert json.loads(stamp.read_text())["size"] == npy.stat().st_size
    reads = []
    real = fc.file_sha256
    monkeypatch.setattr(fc, "file_sha256", lambda p: reads.append(p) or real(p))
    np.testing.assert_array_equal(cache.get(key), feats)
    assert reads == []  # unchanged since verified: not read again
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))  # a new mtime: the stamp no longer matches
    with pytest.raises(ValueError, match="does not match the checksum"):
        cache.get(key)
    assert reads == [npy]


def test_rebuild_command_is_the_run_that_opened_the_cache(tmp_path, monkeypatch):
    cache, key, _, npy, _ = build(tmp_path)
    npy.write_bytes(npy.read_bytes()[:-1] + b"\x01")
    monkeypatch.setattr(sys, "argv", ["/x/lqae_vlap/main.py", "--config=configs/vlap_opt.py",
                                      "--workdir=/tmp/a b"])
    with pytest.raises(ValueError, match=re.escape(
            f"{rebuild_command(npy)} && python -m lqae_vlap.main --config=configs/vlap_opt.py "
            "'--workdir=/tmp/a b' (the features are recomputed and stored)")):
        cache.get(key)
