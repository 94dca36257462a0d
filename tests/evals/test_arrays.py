"""The shared row helpers: padding to one batch shape, unit rows that keep zero rows zero."""

import numpy as np

from lqae_vlap.evals.arrays import pad_rows, unit_rows


def test_pad_rows_repeats_the_last_row_and_leaves_full_batches_alone():
    x = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(pad_rows(x, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    assert pad_rows(x, 3) is x and pad_rows(x, 2) is x


def test_unit_rows_normalises_the_last_axis_in_float64():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float32)
    u = unit_rows(x)
    assert u.dtype == np.float64
    np.testing.assert_allclose(u, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(unit_rows(np.array([0.0, 2.0])), [0.0, 1.0])  # one [D] vector
