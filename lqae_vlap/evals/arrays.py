"""NumPy row helpers the evaluations share: fixed batch shapes and unit-norm rows."""

from __future__ import annotations

import numpy as np

EPS = 1e-12  # norms below this count as zero: such a row has no direction


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pads [n, ...] to [rows, ...] by repeating the last row; [n, ...] as it is when n >= rows.

    A jitted function then compiles once per batch size, not again for the last, shorter batch;
    the caller keeps the first n rows of the result.
    """
    return x if len(x) >= rows else np.concatenate([x, np.repeat(x[-1:], rows - len(x), 0)])


def unit_rows(x: np.ndarray) -> np.ndarray:
    """[..., D] -> float64 [..., D], each vector over the last axis divided by its L2 norm.

    A zero vector stays zero (its norm is floored at ``EPS``) rather than becoming NaN.
    """
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)
