"""NoCaps validation from its official COCO-format file and image folder; one-line errors naming
a missing or malformed file."""

import json

import numpy as np
import pytest

from lqae_vlap.data.nocaps import DOMAINS, NoCapsValidation
from tests.helpers import tiny_captions, write_nocaps


def test_reads_the_official_layout(tmp_path):
    path, image_dir = write_nocaps(tmp_path)
    src = NoCapsValidation(path, image_dir)
    raw = json.loads(path.read_text())
    assert len(src) == 6
    assert src.domains == [im["domain"] for im in raw["images"]]
    assert {d: src.domains.count(d) for d in DOMAINS} == {d: 2 for d in DOMAINS}
    ex = src[3]
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    assert ex["references"] == [c.strip() for c in tiny_captions(3, 3)]
    assert ex["caption"] == ex["references"][0]
    assert ex["domain"] == "in-domain" and int(ex["image_id"]) == 3
    assert ex["open_images_id"] == raw["images"][3]["open_images_id"]
    assert "image" not in src.fields_without_image(3)
    assert len(src.captions) == 18
    with pytest.raises(IndexError):
        src[6]


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_missing_and_malformed_files_are_one_line(tmp_path):
    path, image_dir = write_nocaps(tmp_path)
    missing = tmp_path / "nope" / "nocaps_val_4500_captions.json"
    with pytest.raises(FileNotFoundError) as e:
        NoCapsValidation(missing, image_dir)
    assert str(missing) in _one_line(e) and "nocaps.org" in str(e.value)

    truncated = tmp_path / "truncated.json"
    truncated.write_text(path.read_text()[:200])
    with pytest.raises(ValueError) as e:
        NoCapsValidation(truncated, image_dir)
    assert str(truncated) in _one_line(e) and "not valid JSON" in str(e.value)

    raw = json.loads(path.read_text())
    for damage, words in [
            (lambda d: d.pop("annotations"), "no 'annotations'"),
            (lambda d: d["images"][2].pop("domain"), "images[2] has no 'domain'"),
            (lambda d: d["images"][1].update(domain="far-domain"), "'far-domain' is not one of"),
            (lambda d: d["annotations"][4].update(image_id=99), "image_id 99 is not in"),
            (lambda d: d["annotations"][0].update(caption=7), "'caption' must be str")]:
        bad = json.loads(json.dumps(raw))
        damage(bad)
        other = tmp_path / "bad.json"
        other.write_text(json.dumps(bad))
        with pytest.raises(ValueError) as e:
            NoCapsValidation(other, image_dir)
        assert str(other) in _one_line(e) and words in str(e.value), str(e.value)

    with pytest.raises(FileNotFoundError, match="image_dir") as e:
        NoCapsValidation(path, tmp_path / "no_images")
    _one_line(e)
    (image_dir / raw["images"][0]["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match=raw["images"][0]["file_name"]) as e:
        NoCapsValidation(path, image_dir)
    _one_line(e)
