"""Unreadable images (data/images.py ReplaceBadImages through data/sources.py): a corrupt and a
missing file in a JSONL dataset are skipped, counted, printed and replaced by a choice that
depends on the index alone, so batches from a resumed step equal an uninterrupted run's;
config.data.on_bad_image='fail' stops at the first one with one line naming it."""

import io
import json
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lqae_vlap.data import feature_cache, images, sources
from lqae_vlap.data.batches import IndexedBatches

N = 10
CORRUPT, MISSING = 3, 6  # indices of the bad examples


@pytest.fixture
def jsonl_folder(tmp_path):
    folder = tmp_path / "pairs"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(N):
        path = folder / "img" / f"{i}.png"
        if i == CORRUPT:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))  # a PNG signature, then noise
        elif i != MISSING:
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(path)
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": f"caption {i}"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def data_config(folder, **kw):
    return ml_collections.ConfigDict(dict(name="jsonl", train_path=str(folder),
                                          eval_path=str(folder), **kw))


def batches(folder, **kw):
    train = sources.open_sources(data_config(folder, **kw), 6)["train"]
    return train, IndexedBatches(train, global_batch_size=4, seed=3, shuffle=True, prefetch=0)


def test_bad_images_are_replaced_by_the_next_readable_example(jsonl_folder, capsys):
    train, b = batches(jsonl_folder)
    assert isinstance(train, images.ReplaceBadImages) and train.on_bad_image == "skip"
    # The corrupt example takes the next one's image and caption; the missing one the next's.
    for bad in (CORRUPT, MISSING):
        example, following = train[bad], train[bad + 1]
        assert example["caption"] == f"caption {bad + 1}"
        np.testing.assert_array_equal(example["image"], following["image"])
    assert train.replacements == {CORRUPT: CORRUPT + 1, MISSING: MISSING + 1}
    assert train.num_bad_images == 2 and b.num_bad_images == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out  # one line per bad image, once
    corrupt, missing = (str(jsonl_folder / "img" / f"{i}.png") for i in (CORRUPT, MISSING))
    assert f"data: train example {CORRUPT} skipped, bad image {corrupt}: UnidentifiedImageError" \
        in out[0] and "(bad images so far: 1;" in out[0]
    assert f"bad image {missing}: FileNotFoundError: No such file or directory" in out[1]
    assert "(bad images so far: 2;" in out[1]
    train[CORRUPT]  # known bad: not read or printed again
    assert capsys.readouterr().out == "" and train.num_bad_images == 2


def test_resumed_batches_equal_an_uninterrupted_run(jsonl_folder):
    _, full = batches(jsonl_folder)
    uninterrupted = [full.batch_at(s) for s in range(8)]  # 3.2 epochs, each bad image met 3 times
    assert full.num_bad_images == 2
    for k in (1, 2, 5):
        _, resumed = batches(jsonl_folder)  # a fresh process: nothing known about bad images
        for s in range(k, 8):
            batch = resumed.batch_at(s)
            for name in uninterrupted[s]:
                np.testing.assert_array_equal(batch[name], uninterrupted[s][name])
    captions = {c for b in uninterrupted for c in b["caption"]}
    assert f"caption {CORRUPT}" not in captions and f"caption {MISSING}" not in captions


def test_fail_stops_with_one_line_naming_the_file(jsonl_folder):
    train, b = batches(jsonl_folder, on_bad_image="fail")
    with pytest.raises(ValueError) as e:
        for _ in b.iterate(0, 8):
            pass
    message = str(e.value)
    bad = jsonl_folder / "img" / f"{CORRUPT}.png"
    assert "\n" not in message and message.startswith("bad image "), message
    assert re.search(r"bad image .*/img/[36]\.png: ", message)
    assert "config.data.on_bad_image='skip'" in message
    with pytest.raises(ValueError, match=re.escape(f"bad image {bad}: UnidentifiedImageError")):
        train[CORRUPT]
    with pytest.raises(ValueError, match="config.data.on_bad_image='ignore' is not known"):
        sources.open_sources(data_config(jsonl_folder, on_bad_image="ignore"), 6)


def test_no_readable_image_is_named(tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"image": "gone.png", "caption": "c"}\n')
    train = sources.open_sources(data_config(tmp_path), 6)["train"]
    with pytest.raises(ValueError, match="no image of train can be read"):
        train[0]


def test_decode_errors_are_bad_images():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 7).save(buf, format="JPEG")
    whole = buf.getvalue()
    assert images.decode_image(whole, "x").shape == (32, 32, 3)
    for data in (whole[:len(whole) // 2], b"", b"not an image"):
        with pytest.raises(images.BadImage, match="bad image record 7: "):
            images.decode_image(data, "record 7")


def test_feature_cache_keeps_the_replacements(jsonl_folder, tmp_path):
    def encode(x):
        return np.asarray(x, np.float32).reshape(len(x), 4, -1)[:, :, :5]

    def open_cached():
        splits = sources.open_sources(data_config(jsonl_folder), 6)
        parts = {"vision": {"config": {"kind": "t"}}, "preprocess": {"name": "none"},
                 "dataset": "pairs"}
        return splits["train"], feature_cache.cache_sources(
            {"train": splits["train"]}, tmp_path / "fc", parts=parts, encode=encode,
            batch_size=4)["train"]

    raw, cached = open_cached()
    assert raw.num_bad_images == 2 and cached.num_bad_images == 2
    for i in range(N):  # as without the cache: a bad example is wholly the next one
        assert cached[i]["caption"] == raw[i]["caption"]
        np.testing.assert_array_equal(cached[i]["vision_features"], encode(raw[i]["image"][None])[0])
    raw2, cached2 = open_cached()  # found on disk: no image is read, the count comes from it
    assert raw2.num_bad_images == 0 and cached2.num_bad_images == 2
    assert [cached2[i]["caption"] for i in range(N)] == [cached[i]["caption"] for i in range(N)]
    assert IndexedBatches(cached2, global_batch_size=4, seed=0).num_bad_images == 2
