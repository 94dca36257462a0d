"""MiniImageNet on a tiny fake folder of PNGs and Ravi & Larochelle CSVs made in tmp_path."""

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.data.mini_imagenet import MiniImageNet, read_label_names


def make_folder(root, splits=None):
    splits = splits or {"train": ["n02", "n01", "n02"], "test": ["n09", "n07", "n09", "n07"]}
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = {}
    for split, wnids in splits.items():
        lines = ["filename,label"]
        for k, w in enumerate(wnids):
            name = f"{w}{k:08d}.png"
            # 12x16 (not square): the loader resizes the shorter side, then centre-crops.
            img = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "images" / name)
            pixels[name] = img
            lines.append(f"{name},{w}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return pixels


def test_reads_split_labels_and_images(tmp_path):
    pixels = make_folder(tmp_path)
    ds = MiniImageNet(tmp_path, split="test", image_size=12, label_names={"n07": "dog"})
    assert len(ds) == 4 and ds.num_classes == 2
    assert ds.wnids == ("n07", "n09") and ds.class_names == ("dog", "n09")
    np.testing.assert_array_equal(ds.labels, [1, 0, 1, 0])
    ex = ds[1]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (12, 12, 3)
    assert ex["label"] == 0
    # Shorter side already 12: the 12x12 centre crop of the 12x16 PNG, bit for bit.
    np.testing.assert_array_equal(ex["image"], pixels["n0700000001.png"][:, 2:14])
    assert ds[-1]["label"] == 0
    small = MiniImageNet(tmp_path, split="train", image_size=6)
    assert small[0]["image"].shape == (6, 6, 3) and small.wnids == ("n01", "n02")
    with pytest.raises(IndexError, match="out of range"):
        ds[4]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MiniImageNet(tmp_path / "nowhere")
    make_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="val.csv"):
        MiniImageNet(tmp_path, split="val")
    with pytest.raises(ValueError, match="unknown split"):
        MiniImageNet(tmp_path, split="dev")
    (tmp_path / "val.csv").write_text("path,class\nx.png,n01\n")
    with pytest.raises(ValueError, match="filename,label"):
        MiniImageNet(tmp_path, split="validation")
    (tmp_path / "val.csv").write_text("filename,label\nghost.png,n01\n")
    ds = MiniImageNet(tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        ds[0]
    (tmp_path / "images").rename(tmp_path / "imgs")
    with pytest.raises(FileNotFoundError, match="images"):
        MiniImageNet(tmp_path, split="test")


def test_read_label_names_both_formats(tmp_path):
    txt = tmp_path / "LOC_synset_mapping.txt"
    txt.write_text("n01532829 house finch, linnet, Carpodacus mexicanus\nn02110063 malamute\n\n")
    assert read_label_names(str(txt)) == {"n01532829": "house finch", "n02110063": "malamute"}
    js = tmp_path / "names.json"
    js.write_text('{"n01532829": "house finch"}')
    assert read_label_names(str(js)) == {"n01532829": "house finch"}
    bad = tmp_path / "bad.txt"
    bad.write_text("n01532829 house finch\nn02110063\n")
    with pytest.raises(ValueError, match="bad.txt:2: expected '<wnid> <name>"):
        read_label_names(str(bad))
    js.write_text('{"n01532829": ["house finch"]}')
    with pytest.raises(ValueError, match="maps WordNet ids to strings"):
        read_label_names(str(js))
