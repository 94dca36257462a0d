"""CLIP preprocessing against transformers' CLIPImageProcessor on real photographs.

Without torchvision, ``CLIPImageProcessor`` resolves to ``CLIPImageProcessorPil`` (PIL bicubic
resize, floor-centred crop, float32 normalisation), which is what we import directly. Tolerance:
the geometry must agree pixel for pixel, so the only difference left is float32 rounding of the
affine normalisation (|x| <= 2.2, float32 eps 1.2e-7), hence atol 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lqae_vlap.data.clip_preprocess import (CLIP_MEAN, CLIP_STD, clip_normalize, clip_preprocess,
                                            clip_resize_crop, resized_shape)

ATOL = 1e-5


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """china.jpg and flower.jpg, [427, 640, 3] uint8, plus crops of other aspect ratios."""
    china, flower = load_sample_images().images
    return [china, flower,
            np.ascontiguousarray(china[:, :301]),  # portrait, odd width
            np.ascontiguousarray(flower[13:330, 40:411]),  # odd margins after the resize
            np.ascontiguousarray(china[200:300, 100:250])]  # smaller than 224: upsampled


@pytest.fixture(scope="module")
def processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil()  # the defaults are OpenAI CLIP's (224, bicubic, CLIP mean/std)


def hf(processor, image) -> np.ndarray:
    out = processor(images=image, return_tensors="np")["pixel_values"][0]  # [3, 224, 224]
    return out.transpose(1, 2, 0)


def test_matches_clip_image_processor_on_real_photos(photos, processor):
    for image in photos:
        ours = clip_preprocess(image)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, hf(processor, image), rtol=0, atol=ATOL)


def test_greyscale_and_pil_inputs_match(photos, processor):
    grey = Image.fromarray(photos[0]).convert("L")
    np.testing.assert_allclose(clip_preprocess(np.asarray(grey)), hf(processor, grey),
                               rtol=0, atol=ATOL)
    pil = Image.fromarray(photos[1])
    np.testing.assert_array_equal(clip_resize_crop(pil), clip_resize_crop(photos[1]))


def test_resized_shape_keeps_aspect_with_truncation():
    assert resized_shape(427, 640, 224) == (224, 335)  # int(224 * 640 / 427) = int(335.7)
    assert resized_shape(640, 427, 224) == (335, 224)
    assert resized_shape(100, 150, 224) == (224, 336)
    assert resized_shape(224, 224, 224) == (224, 224)


def test_normalize_is_the_textbook_formula_on_numpy_and_in_jit():
    pixels = np.random.RandomState(0).randint(0, 256, size=(2, 5, 7, 3)).astype(np.uint8)
    expected = (pixels.astype(np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    ours = clip_normalize(pixels)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
    in_jit = jax.jit(clip_normalize)(jnp.asarray(pixels))
    assert in_jit.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(in_jit), expected, rtol=0, atol=ATOL)


def test_bad_inputs_raise_clear_errors(photos):
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(photos[0].astype(np.float32))
    with pytest.raises(ValueError, match=r"\[height, width, 3\]"):
        clip_resize_crop(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="crop 256 is larger"):
        clip_resize_crop(photos[0], size=224, crop=256)
    with pytest.raises(ValueError, match="clip_normalize expects uint8"):
        clip_normalize(np.zeros((4, 4, 3), np.float32))
