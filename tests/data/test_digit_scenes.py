"""Digit scenes (data/digit_scenes.py): captions from the ground truth, held-out combinations,
disjoint real scans, arithmetic pairs, determinism, and the pixels against an independent
re-rendering from load_digits()."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from lqae_vlap.data import digit_scenes as ds
from lqae_vlap.data import sources


@pytest.fixture(scope="module")
def splits():
    return ds.scene_splits(32, num_train=3000, num_validation=400, num_test=600, seed=0)


def test_many_distinct_captions_and_the_banner_says_synthetic(splits):
    caps = splits["train"].captions
    assert len(set(caps)) >= 500
    assert len(set(splits["test"].captions)) >= 400
    assert "SYNTHETIC" in ds.BANNER and "REAL handwritten digits" in ds.BANNER
    assert "SYNTHETIC compositions of REAL handwritten digits" in ds.__doc__


def test_captions_parse_back_to_the_attributes(splits):
    for name, src in splits.items():
        for i in range(0, len(src), 7):
            ex, spec = src[i], src.spec(i)
            assert ds.parse_caption(ex["caption"]) == spec.attributes()
            from_arrays = tuple((s, int(ex["digits"][s]), int(ex["colours"][s]),
                                 int(ex["sizes"][s])) for s in (0, 1) if ex["digits"][s] >= 0)
            assert from_arrays == spec.attributes()
            assert ex["label"] == spec.objects[0].digit
    with pytest.raises(ValueError, match="not a digit-scene caption"):
        ds.parse_caption("a large red seven above a small blue two")


def test_captions_read_as_written():
    spec = ds.SceneSpec(objects=(ds.DigitSpec(0, 7, 0, 1, 0, 0, 0),
                                 ds.DigitSpec(1, 2, 2, 0, 0, 0, 0)), first=0)
    assert spec.caption() == "a large red seven left of a small blue two"
    flipped = ds.SceneSpec(objects=spec.objects, first=1)
    assert flipped.caption() == "a small blue two right of a large red seven"
    one = ds.SceneSpec(objects=(ds.DigitSpec(1, 0, 4, 0, 0, 0, 0),), first=0)
    assert one.caption() == "a small white zero on the right"


def test_held_out_combinations_only_outside_train(splits):
    def combos(src):
        return {(o.digit, o.colour) for i in range(len(src)) for o in src.spec(i).objects}

    train = combos(splits["train"])
    assert not train & ds.HELD_OUT
    assert len(train) == 40  # every other digit-colour combination is trained on
    for name in ("validation", "test"):
        assert ds.HELD_OUT <= combos(splits[name]), name
    test = splits["test"]
    share = np.mean([ds.held_out_count(test.spec(i)) > 0 for i in range(len(test))])
    assert 0.2 < share < 0.6  # ~1 digit in 5 held out, 1.75 digits per scene


def test_real_scans_disjoint_and_of_the_named_digit(splits):
    labels = load_digits().target
    used = {}
    for name, src in splits.items():
        used[name] = {o.scan for i in range(len(src)) for o in src.spec(i).objects}
        for i in range(0, len(src), 11):
            for o in src.spec(i).objects:
                assert labels[o.scan] == o.digit
    assert not used["train"] & used["validation"]
    assert not used["train"] & used["test"]
    assert not used["validation"] & used["test"]


def test_pixels_are_the_coloured_scans_where_the_spec_says():
    """An independent re-rendering in float64 from load_digits(): each digit's ink (scan / 16,
    bilinear to its side) times its colour, at its place, on black."""
    src = ds.DigitScenes("test", num_scenes=20, image_size=32)
    grey = load_digits().images / 16.0
    for i in range(20):
        spec, image = src.spec(i), src[i]["image"]
        want = np.zeros((32, 32, 3))
        for o in spec.objects:
            side = (10, 16)[o.size]
            ink = np.asarray(Image.fromarray(grey[o.scan].astype(np.float32)).resize(
                (side, side), Image.Resampling.BILINEAR), np.float64).clip(0, 1)
            rgb = ink[..., None] * np.asarray(ds.COLOURS[ds.COLOUR_NAMES[o.colour]])
            y, x = o.dy, 16 * o.slot + o.dx
            want[y:y + side, x:x + side] = np.maximum(want[y:y + side, x:x + side], rgb)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        np.testing.assert_allclose(image, np.rint(want), atol=1)


def test_arithmetic_pairs_change_exactly_one_digit_word(splits):
    test = splits["test"]
    pairs = ds.arithmetic_pairs(test)
    assert len(pairs) >= len(test) * 0.8  # nearly every scene has its partner
    for q, a, b, t in pairs:
        qa, ta = test.spec(q).attributes(), test.spec(t).attributes()
        qw, tw = test[q]["caption"].split(), test[t]["caption"].split()
        assert len(qw) == len(tw)
        diff = [(x, y) for x, y in zip(qw, tw) if x != y]
        assert diff == [(a, b)]
        assert sum(x != y for x, y in zip(qa, ta)) == 1
        assert qw.count(a) == 1
    # Within a gallery, only pairs whose both members are in it.
    gallery = list(range(0, 100))
    some = ds.arithmetic_pairs(test, gallery)
    assert some and all(q in gallery and t in gallery for q, _, _, t in some)
    assert set(some) == {p for p in pairs if p[0] in gallery and p[3] in gallery}


def test_deterministic_and_order_free():
    a = ds.DigitScenes("validation", num_scenes=50, seed=3)
    b = ds.DigitScenes("validation", num_scenes=50, seed=3)
    backwards = [b[i] for i in reversed(range(50))][::-1]
    for i in range(50):
        assert a[i]["caption"] == backwards[i]["caption"]
        np.testing.assert_array_equal(a[i]["image"], backwards[i]["image"])
    other = ds.DigitScenes("validation", num_scenes=50, seed=4)
    assert [other[i]["caption"] for i in range(50)] != [a[i]["caption"] for i in range(50)]


def test_bad_arguments_say_what():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        ds.DigitScenes("val")
    with pytest.raises(ValueError, match="image_size >= 16"):
        ds.DigitScenes("train", image_size=8)
    with pytest.raises(IndexError, match="out of range"):
        ds.DigitScenes("train", num_scenes=3)[3]


def test_config_data_name_opens_the_three_splits():
    d = ml_collections.ConfigDict(dict(name="digit_scenes", scenes=dict(
        num_train=30, num_validation=10, num_test=12, seed=1, two_digit_fraction=0.5)))
    got = sources.open_sources(d, 48)
    assert [len(got[k]) for k in ("train", "validation", "test", "images")] == [30, 10, 12, 10]
    assert got["train"][0]["image"].shape == (48, 48, 3)
    assert got["images"] is got["validation"]
