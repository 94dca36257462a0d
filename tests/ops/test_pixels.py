"""The shared uint8 <-> float pixel mapping (ops/pixels.py), against float64 arithmetic."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.ops.pixels import to_float, to_uint8


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
