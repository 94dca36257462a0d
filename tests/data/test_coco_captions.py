"""COCO captions (data/coco_captions.py) on a tiny TFDS array_record dataset written here.

The tiny builder has coco_captions' fields ('image', 'image/id', 'image/filename', 'captions'
{'text', 'id'}); its image is a Tensor(object) of JPEG bytes because tfds' Image feature needs
TensorFlow to encode. Expected values come from the generator's own tables, not from the reader.
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.data.batches import IndexedBatches
from lqae_vlap.data.coco_captions import CocoCaptions, open_coco_data_source
from lqae_vlap.data.imagenet import eval_crop

# image id -> its captions (different counts, one non-ASCII, so the pair index is not trivial)
TRAIN = {101: ["a cat on a mat", "a small cat"], 102: ["two dogs"],
         103: ["a red bus", "a bus on a street", "caf\u00e9 with a bus"], 104: ["a kite"],
         105: ["one boat", "a boat on water"]}
VAL = {201: ["a tree", "green tree"], 202: ["a man skiing"]}
NAME = "lqae_tiny_coco_captions"


def _jpeg(image_id: int) -> bytes:
    rng = np.random.default_rng(image_id)
    pixels = rng.integers(0, 256, (12 + image_id % 7, 16 + image_id % 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decoded(image_id: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(_jpeg(image_id))).convert("RGB"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")

    class LqaeTinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        __module__ = "lqae_tiny_coco_builder"  # one-word module: see tests/data/test_imagenet.py

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "image/filename": tfds.features.Text(),
                "image/id": np.int64,
                "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(TRAIN), "val": self._generate_examples(VAL)}

        def _generate_examples(self, table):
            for image_id, texts in table.items():
                yield image_id, {
                    "image": _jpeg(image_id), "image/filename": f"COCO_{image_id:012d}.jpg",
                    "image/id": image_id,
                    "captions": [{"text": t, "id": 10 * image_id + k} for k, t in enumerate(texts)]}

    tfds.disable_progress_bar()
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    LqaeTinyCocoCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _pairs(table):
    return sorted((i, c) for i, caps in table.items() for c in caps)


def test_pairs_mode_has_every_caption_once_with_its_image(tiny_dir):
    src = CocoCaptions("train", tiny_dir, dataset_name=NAME)
    assert len(src) == 9 and src.num_images == 5
    got = []
    for k in range(len(src)):
        ex = src[k]
        image_id = int(ex["image_id"])
        assert ex["caption"] in TRAIN[image_id]
        np.testing.assert_array_equal(ex["image"], _decoded(image_id))
        assert ex["image"].dtype == np.uint8 and ex["image"].shape[-1] == 3
        assert src.fields_without_image(k) == {k2: v for k2, v in ex.items() if k2 != "image"}
        got.append((image_id, ex["caption"]))
    assert sorted(got) == _pairs(TRAIN)
    assert sorted(src.captions) == sorted(c for caps in TRAIN.values() for c in caps)
    assert src[-1]["caption"] == src[len(src) - 1]["caption"]
    with pytest.raises(IndexError, match="out of range"):
        src[9]


def test_images_mode_gives_all_references_and_batches(tiny_dir):
    src = CocoCaptions("train", tiny_dir, mode="images", dataset_name=NAME)
    assert len(src) == 5
    seen = set()
    for k in range(5):
        ex = src[k]
        image_id = int(ex["image_id"])
        assert ex["references"] == TRAIN[image_id] and ex["caption"] == TRAIN[image_id][0]
        assert src.references[k] == TRAIN[image_id] and src.image_ids[k] == image_id
        np.testing.assert_array_equal(ex["image"], _decoded(image_id))
        seen.add(image_id)
    assert seen == set(TRAIN)

    def pre(example, rng):  # references differ in length: evaluation looks them up by index
        return {"image": eval_crop(example["image"], 8), "image_id": example["image_id"]}

    batch = IndexedBatches(src, global_batch_size=4, seed=0, preprocess=pre).batch_at(0)
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image_id"].dtype == np.int64


def test_split_arithmetic_and_slices(tiny_dir):
    both = CocoCaptions("train+val", tiny_dir, dataset_name=NAME)
    assert sorted((int(both[k]["image_id"]), both[k]["caption"]) for k in range(len(both))) == \
        _pairs({**TRAIN, **VAL})
    head = CocoCaptions("val[:1]", tiny_dir, mode="images", dataset_name=NAME)
    assert len(head) == 1 and head[0]["references"] == VAL[int(head[0]["image_id"])]


def test_index_cache_is_reused_without_reading_records(tiny_dir, tmp_path):
    class Counting:
        def __init__(self, inner):
            self.inner, self.reads = inner, 0

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            self.reads += 1
            return self.inner[i]

    first = Counting(open_coco_data_source("train", tiny_dir, dataset_name=NAME))
    a = CocoCaptions("train", data_source=first, index_cache_dir=tmp_path, dataset_name=NAME)
    assert first.reads == 5 and len(list(tmp_path.glob("*.captions.json"))) == 1
    second = Counting(open_coco_data_source("train", tiny_dir, dataset_name=NAME))
    b = CocoCaptions("train", data_source=second, index_cache_dir=tmp_path, dataset_name=NAME)
    assert second.reads == 0  # the index came from the JSON file
    assert b.references == a.references and b.image_ids == a.image_ids
    assert b[3]["caption"] == a[3]["caption"] and second.reads == 1
    assert not list(tmp_path.glob("*.tmp-*"))


def test_injected_records_with_str_text():
    records = [{"image": _jpeg(7), "image/id": 7, "captions": {"text": ["x y", "z"], "id": [1, 2]}}]
    src = CocoCaptions("val", data_source=records)
    assert [src[k]["caption"] for k in range(2)] == ["x y", "z"]
    np.testing.assert_array_equal(src[1]["image"], _decoded(7))
    with pytest.raises(ValueError, match="lacks 'image/id'"):
        CocoCaptions("val", data_source=[{"image": b""}])


def test_errors_name_the_fix(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build coco_captions.*array_record"):
        CocoCaptions("train", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown split 'validation'.*'val'"):
        CocoCaptions("validation", tmp_path)
    with pytest.raises(ValueError, match="unknown mode 'pair'"):
        CocoCaptions("train", tiny_dir, mode="pair", dataset_name=NAME)
    with pytest.raises(ValueError, match="split 'test' not found.*available"):
        CocoCaptions("test", tiny_dir, dataset_name=NAME)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        CocoCaptions("train", tiny_dir, dataset_name=NAME)


def test_real_image_feature_is_read_as_bytes_and_decoded_by_pil(tiny_dir, tmp_path):
    # The real coco_captions declares image as tfds Image(jpeg); its serialized form is the same
    # bytes string as our Tensor(object), so relabelling the feature in features.json gives the
    # real read path without TensorFlow (which writing an Image feature would need).
    data_dir = tmp_path / "tfds"
    shutil.copytree(tiny_dir, data_dir)
    (features_json,) = data_dir.glob(f"{NAME}/*/features.json")
    spec = json.loads(features_json.read_text())
    spec["featuresDict"]["features"]["image"] = {
        "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
        "image": {"shape": {"dimensions": ["-1", "-1", "3"]}, "dtype": "uint8", "encodingFormat": "jpeg"}}
    features_json.write_text(json.dumps(spec))
    src = CocoCaptions("val", data_dir, mode="images", dataset_name=NAME)
    assert isinstance(src.data_source[0]["image"], bytes)  # SkipDecoding: TFDS left it encoded
    for k in range(len(src)):
        np.testing.assert_array_equal(src[k]["image"], _decoded(int(src[k]["image_id"])))
