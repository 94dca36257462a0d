"""Karpathy's Flickr30k / COCO split files with their image folders; one-line errors."""

import json

import numpy as np
import pytest

from lqae_vlap.data.karpathy_splits import KarpathySplit
from tests.helpers import write_karpathy


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_reads_the_test_split_of_the_official_layout(tmp_path, dataset):
    path, image_dir = write_karpathy(tmp_path, dataset)
    src = KarpathySplit(path, image_dir, "test", dataset=dataset)
    raw = json.loads(path.read_text())["images"]
    assert len(src) == 6 and src.dataset == dataset  # the 2 train images are left out
    ex = src[2]
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    assert ex["references"] == [s["raw"].strip() for s in raw[2]["sentences"]]
    assert ex["filename"] == raw[2]["filename"]
    assert int(ex["image_id"]) == (391897 if dataset == "coco" else 2)
    assert len(src.captions) == 30
    with pytest.raises(FileNotFoundError, match=raw[6]["filename"]):  # no train images here
        KarpathySplit(path, image_dir, "train", dataset=dataset)


def test_missing_and_malformed_files_are_one_line(tmp_path):
    path, image_dir = write_karpathy(tmp_path)
    missing = tmp_path / "dataset_flickr30k_missing.json"
    with pytest.raises(FileNotFoundError) as e:
        KarpathySplit(missing, image_dir)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    assert "caption_datasets.zip" in str(e.value)
    broken = tmp_path / "broken.json"
    broken.write_text(path.read_text()[:-40])
    with pytest.raises(ValueError, match="is not valid JSON") as e:
        KarpathySplit(broken, image_dir)
    assert str(broken) in str(e.value) and "\n" not in str(e.value)
    raw = json.loads(path.read_text())
    raw["images"][3]["sentences"][1].pop("raw")
    broken.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"images\[3\].sentences\[1\] has no 'raw'"):
        KarpathySplit(broken, image_dir)
    broken.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not Karpathy's"):
        KarpathySplit(broken, image_dir)
    with pytest.raises(ValueError, match=r"no image of split 'testing' \(its splits: "
                                         r"\['test', 'train'\]\)"):
        KarpathySplit(path, image_dir, "testing")
    with pytest.raises(FileNotFoundError, match="flickr30k-images/"):
        KarpathySplit(path, tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="1000092795.jpg"):
        KarpathySplit(path, tmp_path)  # the folder above flickr30k-images/
