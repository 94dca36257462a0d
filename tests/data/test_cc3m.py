"""CC3M from img2dataset folders (data/cc3m.py), on tiny 'files' and 'webdataset' layouts written here.

Each layout holds the same samples, three of them broken the ways failed downloads look (no
caption, no image, an empty caption), next to img2dataset's parquet / stats files, which must be
ignored. Expected pixels are PIL's decoding of the bytes written, expected captions the text written.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.data import cc3m
from lqae_vlap.data.batches import IndexedBatches
from lqae_vlap.data.cc3m import Cc3m
from lqae_vlap.data.imagenet import eval_crop


def _encoded(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (10 + seed % 5, 14 + seed % 3, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


# key -> {ext: bytes}; the kept samples have an image and a non-empty caption.
SAMPLES: dict[str, dict[str, bytes]] = {
    "000000000": {"jpg": _encoded(0, "JPEG"), "txt": b"a dog runs on the beach", "json": b"{}"},
    "000000001": {"jpg": _encoded(1, "JPEG"), "json": b"{}"},  # caption missing
    "000000002": {"jpg": _encoded(2, "JPEG"), "txt": "caf\u00e9 at night \n".encode(), "json": b"{}"},
    "000010000": {"png": _encoded(3, "PNG"), "txt": b"a red car"},
    "000010001": {"txt": b"image failed to download", "json": b"{}"},  # image missing
    "000010002": {"jpg": _encoded(5, "JPEG"), "txt": b"  \n"},  # empty caption
    "000010003": {"jpg": _encoded(6, "JPEG"), "txt": b"mountains under snow"},
}
KEPT = {"000000000": "a dog runs on the beach", "000000002": "caf\u00e9 at night",
        "000010000": "a red car", "000010003": "mountains under snow"}


def _image_of(key: str) -> np.ndarray:
    data = SAMPLES[key].get("jpg") or SAMPLES[key]["png"]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _extras(root) -> None:
    (root / "00000.parquet").write_bytes(b"PAR1")
    (root / "00000_stats.json").write_text("{}")


def write_files(root, samples=SAMPLES) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _extras(root)
    for key, files in samples.items():
        shard = root / key[:5]
        shard.mkdir(exist_ok=True)
        for ext, data in files.items():
            (shard / f"{key}.{ext}").write_bytes(data)


def write_tars(root, samples=SAMPLES) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _extras(root)
    shards: dict[str, list] = {}
    for key, files in samples.items():
        shards.setdefault(key[:5], []).extend((f"{key}.{ext}", data) for ext, data in files.items())
    for shard, members in shards.items():
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(params=["files", "webdataset"])
def layout_dir(request, tmp_path):
    root = tmp_path / "cc3m"
    (write_files if request.param == "files" else write_tars)(root)
    return request.param, root


def test_reads_kept_pairs_and_counts_the_skipped(layout_dir):
    layout, root = layout_dir
    with pytest.warns(UserWarning, match="skipped 3 samples") as record:
        src = Cc3m(root)
    assert len(record) == 1  # said once, not per sample
    assert src.layout == layout and len(src) == 4 and src.num_skipped == 3
    assert [src[i]["key"] for i in range(4)] == sorted(KEPT)
    for i, key in enumerate(sorted(KEPT)):
        ex = src[i]
        assert ex["caption"] == KEPT[key]
        np.testing.assert_array_equal(ex["image"], _image_of(key))
        assert src.fields_without_image(i) == {"caption": KEPT[key], "key": key}
    assert src.captions == [KEPT[k] for k in sorted(KEPT)]
    with pytest.raises(IndexError, match="out of range"):
        src[4]

    def pre(example, rng):
        return {"image": eval_crop(example["image"], 8), "caption": example["caption"]}

    with pytest.warns(UserWarning):
        again = Cc3m(root)
    batches = IndexedBatches(again, global_batch_size=4, seed=1, preprocess=pre, num_workers=2)
    batch = batches.batch_at(0)
    batches.close()
    assert batch["image"].shape == (4, 8, 8, 3)
    assert sorted(batch["caption"].tolist()) == sorted(KEPT.values())


def test_index_cache_is_reused_and_rebuilt_when_shards_change(layout_dir, tmp_path, monkeypatch):
    layout, root = layout_dir
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning):
        first = Cc3m(root, cache_dir=cache)
    assert len(list(cache.glob("cc3m_index_*.npz"))) == 1 and not list(cache.glob("*.tmp-*"))

    def no_scan(*args, **kwargs):
        raise AssertionError("the shards were scanned again")

    with monkeypatch.context() as m:
        m.setattr(cc3m, "_scan_tar", no_scan)
        m.setattr(cc3m, "_scan_folder", no_scan)
        with pytest.warns(UserWarning, match="skipped 3"):
            cached = Cc3m(root, cache_dir=cache)
    assert len(cached) == len(first) and cached.captions == first.captions
    for i in range(len(first)):
        np.testing.assert_array_equal(cached[i]["image"], first[i]["image"])

    # A new sample in shard 00001: its size (tar) or folder mtime changes, so the index is rebuilt.
    more = {**SAMPLES, "000010004": {"jpg": _encoded(9, "JPEG"), "txt": b"a new one"}}
    shard = root / ("00001" if layout == "files" else "00001.tar")
    old_mtime = shard.stat().st_mtime_ns
    shutil.rmtree(root)
    (write_files if layout == "files" else write_tars)(root, more)
    # File times tick in jiffies; a real re-download is seconds later, so say so explicitly.
    os.utime(shard, ns=(old_mtime + 10**9, old_mtime + 10**9))
    with pytest.warns(UserWarning):
        rebuilt = Cc3m(root, cache_dir=cache)
    assert len(rebuilt) == 5 and rebuilt.caption(4) == "a new one"
    np.testing.assert_array_equal(rebuilt[4]["image"],
                                  np.asarray(Image.open(io.BytesIO(more["000010004"]["jpg"]))))


def test_clean_folder_warns_nothing(tmp_path):
    root = tmp_path / "clean"
    write_tars(root, {k: SAMPLES[k] for k in KEPT})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = Cc3m(root)
    assert len(src) == 4 and src.num_skipped == 0


def test_errors_name_the_layout_and_the_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError,
                       match="no CC3M shards.*notes.txt.*00000.tar.*img2dataset --url_list"):
        Cc3m(empty)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Cc3m(tmp_path / "missing")
    both = tmp_path / "both"
    write_files(both)
    write_tars(both)
    with pytest.raises(ValueError, match="both shard tars and shard folders.*layout="):
        Cc3m(both)
    with pytest.warns(UserWarning):
        assert len(Cc3m(both, layout="files")) == 4
    with pytest.raises(ValueError, match="unknown layout"):
        Cc3m(both, layout="tar")
    gz = tmp_path / "gz"
    write_tars(gz)
    data = (gz / "00000.tar").read_bytes()
    (gz / "00000.tar").write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        Cc3m(gz)
    broken = tmp_path / "broken"
    write_files(broken, {"000000001": SAMPLES["000000001"]})
    with pytest.raises(ValueError, match="every one of the 1 samples.*lacks its image or caption"):
        Cc3m(broken)
