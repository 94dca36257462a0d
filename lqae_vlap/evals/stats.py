"""Summary statistics for episodic evaluations: mean accuracy with a Student-t interval, chance.

Few-shot results are averages over independently sampled episodes, so the interval is the usual
t-interval for a mean: ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
deviation (ddof=1). The t quantile comes from ``scipy.stats.t`` (SciPy is installed with
scikit-learn, a declared dependency); it is exact for every n, so no normal approximation is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_confidence_interval(accuracies: Sequence[float] | np.ndarray,
                             confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t confidence interval.

    Args:
      accuracies: [n] per-episode accuracies (any finite floats).
      confidence: coverage of the interval, in (0, 1).

    Returns:
      (mean, half_width). With a single value the half-width is NaN (no spread to estimate).
    """
    from scipy import stats  # deferred: only the evals need it

    x = np.asarray(accuracies, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_confidence_interval needs at least one accuracy; run >= 1 episode")
    if not np.all(np.isfinite(x)):
        raise ValueError("mean_confidence_interval got non-finite accuracies; check the scorer")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    mean = float(x.mean())
    n = x.size
    if n < 2:
        return mean, math.nan
    t = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1))
    return mean, t * float(x.std(ddof=1)) / math.sqrt(n)


def chance_level(n_way: int) -> float:
    """Accuracy of uniform guessing among n_way classes: 1 / n_way."""
    if int(n_way) != n_way or n_way < 1:
        raise ValueError(f"n_way must be a positive integer, got {n_way}")
    return 1.0 / int(n_way)
