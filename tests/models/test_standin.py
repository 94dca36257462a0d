"""The demo's stand-in vision encoder (models/standin.py) against NumPy float64."""

import jax.numpy as jnp
import numpy as np

from lqae_vlap.models import standin


def test_fixed_projection_of_row_major_patches():
    proj = standin.projection(7, 2 * 2 * 3, 5)
    np.testing.assert_array_equal(proj, standin.projection(7, 12, 5))  # fixed by its seed
    assert proj.dtype == np.float32 and proj.shape == (12, 5)
    assert not np.allclose(proj, standin.projection(8, 12, 5))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 4, 6, 3))
    got = np.asarray(standin.features(jnp.asarray(proj), jnp.float32(x), 2))
    # Patches row-major over the 2 x 3 grid, each flattened as (row, column, channel).
    patches = x.reshape(3, 2, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 6, 12)
    np.testing.assert_allclose(got, patches @ proj.astype(np.float64), rtol=1e-5, atol=1e-6)
