"""The evaluation pictures: sizes, exact tiles, frames of the right colour at the right place."""

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.evals import pictures


def digits(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_fit_repeats_small_images_exactly_and_shrinks_large_ones():
    small = digits(1, size=8)[0]
    tile = pictures.fit(small)
    assert tile.shape == (64, 64, 3)
    np.testing.assert_array_equal(tile, np.repeat(np.repeat(small, 8, 0), 8, 1).repeat(3, -1))
    odd = np.zeros((10, 30, 3), np.uint8)
    assert pictures.fit(odd).shape == (70, 210, 3)  # factor ceil(64 / 10) = 7
    big = np.zeros((480, 640, 3), np.uint8)
    assert pictures.fit(big).shape == (120, 160, 3)  # longer side MAX_SIDE
    with pytest.raises(ValueError, match="uint8"):
        pictures.fit(small.astype(np.float32))


def test_reconstruction_tiles_are_the_nearest_neighbour_upsampled_inputs(tmp_path):
    originals = digits(3, size=16)
    recon = 255 - originals
    path = tmp_path / "sub" / "reconstructions.png"
    pic = pictures.reconstructions_picture(originals, {"from the words": recon},
                                           ["w1 w2", "w3", "w4"], path)
    read = np.asarray(Image.open(path))
    np.testing.assert_array_equal(read, pic.pixels)
    for i in range(3):
        for j, source in enumerate((originals, recon)):
            tile = pic.tile(1 + i, j)
            assert tile.shape == (64, 64, 3)  # 16 px x 4
            expected = np.repeat(np.repeat(source[i], 4, axis=0), 4, axis=1).repeat(3, -1)
            np.testing.assert_array_equal(tile, expected)
    # The words sit beside the images: dark ink in the last column of each image row.
    words = pic.tile(1, 2)
    assert words.min() < 100 and pic.cells[(1, 2)][1] > pic.cells[(1, 1)][1] + 64
    with pytest.raises(ValueError, match="one string per image"):
        pictures.reconstructions_picture(originals, {"r": recon}, ["only one"], path)


def test_reconstructions_of_tiny_images_reach_64_pixels(tmp_path):
    originals = digits(2, size=8)
    pic = pictures.reconstructions_picture(originals, {"a": originals, "b": originals},
                                           ["x", "y"], tmp_path / "r.png")
    assert all(pic.tile(1 + i, j).shape[:2] == (64, 64) for i in range(2) for j in range(3))


def test_retrieval_frames_the_correct_result_green_and_the_others_grey(tmp_path):
    images = digits(5, size=16)
    correct = [[False, True, False, False, False], [False] * 5]
    pic = pictures.retrieval_picture(["query one", "query two"], [list(images)] * 2, correct,
                                     tmp_path / "t2i.png")
    for i, row in enumerate(correct):
        for r, good in enumerate(row):
            cell = pic.tile(i, 1 + r)
            colour = pictures.CORRECT if good else pictures.WRONG
            b = pictures.BORDER
            frame = np.concatenate([cell[:b].reshape(-1, 3), cell[-b:].reshape(-1, 3),
                                    cell[:, :b].reshape(-1, 3), cell[:, -b:].reshape(-1, 3)])
            assert (frame == colour).all(), (i, r)
            inner = cell[b:-b, b:-b]
            np.testing.assert_array_equal(
                inner, np.repeat(np.repeat(images[r], 4, 0), 4, 1).repeat(3, -1))
    # Exactly one green-framed tile in the whole picture.
    green = np.all(pic.pixels == pictures.CORRECT, axis=-1)
    assert green.sum() == 2 * pictures.BORDER * (64 + 2 * pictures.BORDER) + 2 * pictures.BORDER * 64


def test_retrieval_with_text_results_and_image_queries(tmp_path):
    images = digits(2, size=16)
    pic = pictures.retrieval_picture(list(images), [["a cat", "a dog"], ["a dog", "a cat"]],
                                     [[True, False], [False, True]], tmp_path / "i2t.png")
    assert pic.tile(0, 0).shape == (64, 64, 3)
    assert (pic.tile(1, 2)[0] == pictures.CORRECT).all()
    assert (pic.tile(1, 1)[0] == pictures.WRONG).all()
    with pytest.raises(ValueError, match="one list of results"):
        pictures.retrieval_picture(list(images), [["a"]], [[True]], tmp_path / "x.png")


def test_captions_picture_shows_each_image_beside_its_text(tmp_path):
    images = list(digits(3, size=16))
    pic = pictures.captions_picture(images, {"greedy": ["a", "b", ""], "beam3": ["c", "d", "e"]},
                                    [["ref a"], ["ref b", "ref b2"], ["ref c"]],
                                    tmp_path / "captions.png")
    assert Image.open(tmp_path / "captions.png").size == pic.pixels.shape[1::-1]
    for i in range(3):
        np.testing.assert_array_equal(
            pic.tile(i, 0), np.repeat(np.repeat(images[i], 4, 0), 4, 1).repeat(3, -1))
        text = pic.tile(i, 1)
        assert (np.all(text == pictures.LABEL_INK, axis=-1)).any()  # the "greedy:" labels
    # Row 1 has two references, so its text block is taller than row 0's.
    assert pic.cells[(1, 1)][2] > pic.cells[(0, 1)][2]
    with pytest.raises(ValueError, match="one of each per image"):
        pictures.captions_picture(images, {"greedy": ["a"]}, [["r"]] * 3, tmp_path / "c.png")


def test_text_block_wraps_to_its_width():
    block = pictures.text_block([("label", "word " * 60)], width=200)
    assert block.shape[1] == 200 and block.shape[0] > 3 * pictures.FONT_SIZE
    one = pictures.text_block([("label", "word")], width=200)
    assert one.shape[0] < block.shape[0]
