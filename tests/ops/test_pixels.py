"""The shared uint8 <-> float pixel mapping (ops/pixels.py), against float64 arithmetic."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.ops.pixels import to_float, to_uint8, to_unit


def test_to_float_maps_uint8_to_unit_interval():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    y = to_float(x)
    assert y.dtype == np.float32
    want = x.astype(np.float64) / 127.5 - 1.0
    # Two float32 roundings (divide, subtract); one float32 ulp near 1 is 1.19e-7.
    np.testing.assert_allclose(y, want, rtol=0, atol=2.4e-7)
    assert y.min() == -1.0 and y.max() == 1.0
    np.testing.assert_array_equal(to_uint8(y), x)  # exact round trip
    np.testing.assert_allclose(np.asarray(to_float(jnp.asarray(x))), want, rtol=0, atol=2.4e-7)
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 3.0])), [0, 255])
    with pytest.raises(TypeError, match="uint8"):
        to_float(x.astype(np.float32))


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0), (-0.5, 2.0)])
def test_value_range_maps_ends_exactly_and_round_trips(value_range):
    lo, hi = value_range
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    y = to_float(x, value_range)
    want = lo + x.astype(np.float64) * (hi - lo) / 255.0
    np.testing.assert_allclose(y, want, rtol=0, atol=4.8e-7)
    assert y.min() == lo and y.max() == hi
    np.testing.assert_array_equal(to_uint8(y, value_range), x)
    np.testing.assert_allclose(to_unit(y, value_range), x / 255.0, rtol=0, atol=4.8e-7)
    np.testing.assert_array_equal(to_uint8(np.array([lo - 1.0, hi + 1.0]), value_range), [0, 255])


def test_unit_range_is_pixels_over_255():
    """The released LQAE loader's ToTensor: x / 255, which the old [-1, 1] default was not."""
    x = np.array([0, 1, 128, 255], np.uint8)
    np.testing.assert_array_equal(to_float(x, (0.0, 1.0)), (x / np.float32(255.0)).astype(np.float32))


@pytest.mark.parametrize("bad", [(1.0, 0.0), (0.5, 0.5), (0.0,), "unit", (0.0, float("inf"))])
def test_bad_range_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="pair"):
        to_float(np.zeros(3, np.uint8), bad)
