"""Caption sources and tokenisation (data/captions.py), with MiniLM's real tokenizer as reference."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.data import captions
from lqae_vlap.data.demo_images import DemoImages
from lqae_vlap.data.images import BadImage
from tests.helpers import minilm_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def test_digit_captions_follow_labels():
    src = captions.DigitCaptions("validation", image_size=16)
    ref = DemoImages("validation", image_size=16)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert len(src) == len(ref) == 297
    for i in (0, 5, 296):
        ex = src[i]
        np.testing.assert_array_equal(ex["image"], ref[i]["image"])
        assert ex["caption"] == f"a handwritten digit {names[int(ref[i]['label'])]}"
    assert src.captions[5] == src[5]["caption"]
    assert src.fields_without_image(5) == {"caption": src[5]["caption"], "label": ref[5]["label"]}
    with pytest.raises(ValueError, match="0..9"):
        captions.digit_caption(10)


def test_tokenize_pads_truncates_and_appends_eos(tokenizer):
    texts = ["a handwritten digit seven", "a much longer caption that will not fit at all", ""]
    max_len = 6
    ids, mask = captions.tokenize_captions(tokenizer, texts, max_len)
    assert ids.shape == mask.shape == (3, max_len) and ids.dtype == np.int32
    for row, text in enumerate(texts):
        want = tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [102]  # [SEP]
        want = want[:max_len]
        n = len(want)
        np.testing.assert_array_equal(ids[row, :n], want)
        np.testing.assert_array_equal(mask[row], [1] * n + [0] * (max_len - n))
        np.testing.assert_array_equal(ids[row, n:], tokenizer.pad_token_id)
    assert mask[1].all() and ids[1, -1] != 102  # truncated: EOS fell off
    ids2, mask2 = captions.tokenize_captions(tokenizer, texts[:1], 8, add_eos=False)
    assert mask2.sum() == len(tokenizer(" " + texts[0], add_special_tokens=False)["input_ids"])
    with pytest.raises(TypeError, match="list of strings"):
        captions.tokenize_captions(tokenizer, "one caption", 8)


def test_jsonl_folder_reader(tmp_path):
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(3)]
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / "imgs" / f"{i}.png")
    lines = [{"image": f"imgs/{i}.png", "caption": f"caption {i}"} for i in range(3)]
    lines[2]["image"] = str(tmp_path / "imgs" / "2.png")  # absolute paths work too
    (tmp_path / "b.jsonl").write_text(json.dumps(lines[2]) + "\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(l) for l in lines[:2]) + "\n\n")
    src = captions.JsonlCaptions(tmp_path)
    assert len(src) == 3 and src.captions == ["caption 0", "caption 1", "caption 2"]
    for i in range(3):
        np.testing.assert_array_equal(src[i]["image"], pixels[i])
        assert src[i]["caption"] == f"caption {i}"
        assert src.fields_without_image(i) == {"caption": f"caption {i}"}
    (tmp_path / "imgs" / "0.png").unlink()  # the fields never open the image
    assert src.fields_without_image(0) == {"caption": "caption 0"}
    with pytest.raises(BadImage, match=re.escape(f"bad image {tmp_path / 'imgs' / '0.png'}: "
                                                 "FileNotFoundError: No such file or directory")):
        src[0]
    with pytest.raises(IndexError, match="out of range"):
        src.fields_without_image(3)
    (tmp_path / "c.jsonl").write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        captions.JsonlCaptions(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        captions.JsonlCaptions(tmp_path / "missing")


def test_images_with_references_groups_captions_by_image(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((4, 4, 3), 7 if name == "a.png" else 9, np.uint8)).save(
            tmp_path / name)
    lines = [("a.png", "first of a"), ("b.png", "only b"), ("a.png", "second of a")]
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in lines))
    src = captions.ImagesWithReferences(captions.JsonlCaptions(tmp_path))
    assert len(src) == 2
    assert src[0]["references"] == ["first of a", "second of a"] and src[0]["caption"] == "first of a"
    assert int(src[0]["image"][0, 0, 0]) == 7 and int(src[1]["image"][0, 0, 0]) == 9
    assert src.fields_without_image(1) == {"caption": "only b", "references": ["only b"]}
    assert src.captions == ["first of a", "second of a", "only b"]
