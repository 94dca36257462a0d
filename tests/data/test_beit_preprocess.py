"""BEiT preprocessing against transformers' BeitImageProcessor on real photographs.

Without torchvision, ``BeitImageProcessor`` resolves to ``BeitImageProcessorPil`` (PIL resize,
float32 normalisation), which is what we import directly, configured as
microsoft/beit-base-patch16-224-pt22k's preprocessor_config (224 x 224, resample 2 = bilinear,
no centre crop). Tolerance: the resize must agree pixel for pixel, so the only difference left is
float32 rounding of the affine normalisation (|x| <= 1), hence atol 1e-5.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil

from lqae_vlap.data.beit_preprocess import (PT22K_RESAMPLE, beit_normalize, beit_preprocess,
                                            beit_resize)

ATOL = 1e-5


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """china.jpg and flower.jpg, [427, 640, 3] uint8, plus crops of other aspect ratios."""
    china, flower = load_sample_images().images
    return [china, flower,
            np.ascontiguousarray(china[:, :301]),  # portrait, odd width
            np.ascontiguousarray(china[200:300, 100:250])]  # smaller than 224: upsampled


def hf(processor, image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def test_matches_the_pt22k_image_processor(photos):
    processor = BeitImageProcessorPil(resample=Image.Resampling.BILINEAR)  # 224 x 224, no crop
    assert PT22K_RESAMPLE == "bilinear"
    for image in photos:
        ours = beit_preprocess(image)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, hf(processor, image), rtol=0, atol=ATOL)


def test_bicubic_matches_the_processor_defaults(photos):
    # BeitImageProcessor's own defaults (bicubic) differ from pt22k's only in the filter.
    ours = beit_preprocess(photos[0], resample="bicubic")
    np.testing.assert_allclose(ours, hf(BeitImageProcessorPil(), photos[0]), rtol=0, atol=ATOL)
    assert np.abs(beit_preprocess(photos[0]) - ours).max() > 0.05  # the filter matters


def test_normalize_on_jax_and_numpy():
    x = np.array([[[0, 255, 51]]], np.uint8)
    want = np.array([[[-1.0, 1.0, 51 / 127.5 - 1]]], np.float32)
    np.testing.assert_allclose(beit_normalize(x), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(beit_normalize(jnp.asarray(x))), want, atol=1e-6)


def test_greyscale_rgba_and_pil_inputs(photos):
    grey = np.asarray(Image.fromarray(photos[0]).convert("L"))
    assert beit_resize(grey, 32).shape == (32, 32, 3)
    rgba = np.concatenate([photos[1], np.full(photos[1].shape[:2] + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(beit_resize(rgba, 32), beit_resize(photos[1], 32))
    np.testing.assert_array_equal(beit_resize(Image.fromarray(photos[1]), 32),
                                  beit_resize(photos[1], 32))


def test_bad_inputs_raise_clear_errors(photos):
    with pytest.raises(ValueError, match="uint8 image"):
        beit_resize(photos[0].astype(np.float32))
    with pytest.raises(ValueError, match="resample='nearest' is not known"):
        beit_resize(photos[0], resample="nearest")
    with pytest.raises(ValueError, match="beit_normalize expects uint8"):
        beit_normalize(np.zeros((2, 2, 3), np.float32))
