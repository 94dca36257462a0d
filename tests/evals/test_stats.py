"""mean_confidence_interval against the textbook t-interval with t-table quantiles; chance_level."""

import math

import numpy as np
import pytest

from lqae_vlap.evals.stats import chance_level, mean_confidence_interval

# Two-sided critical values t_{(1+c)/2, df} from a printed t table (3 decimals).
T_TABLE = {(0.95, 4): 2.776, (0.95, 9): 2.262, (0.95, 29): 2.045, (0.99, 9): 3.250,
           (0.90, 19): 1.729}


@pytest.mark.parametrize("confidence,df", sorted(T_TABLE))
def test_matches_textbook_t_interval(confidence, df):
    x = np.random.default_rng(df).uniform(0.2, 0.9, size=df + 1)
    mean, half = mean_confidence_interval(x, confidence)
    n = x.size
    s = math.sqrt(sum((v - x.mean()) ** 2 for v in x) / (n - 1))
    assert mean == pytest.approx(sum(x) / n, abs=1e-12)
    # The table is rounded to 3 decimals: relative error <= 0.0005 / 1.7.
    assert half == pytest.approx(T_TABLE[(confidence, df)] * s / math.sqrt(n), rel=4e-4)


def test_coverage_is_nominal():
    """Over 4000 normal samples of size 5 the 95% interval covers the true mean ~95% of the time
    (binomial sd 0.34%; a normal-quantile interval would cover only ~88%)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        mean, half = mean_confidence_interval(rng.normal(0.5, 0.1, size=5))
        hits += abs(mean - 0.5) <= half
    assert 0.935 <= hits / 4000 <= 0.965


def test_edge_cases_and_errors():
    mean, half = mean_confidence_interval([0.7])
    assert mean == 0.7 and math.isnan(half)
    assert mean_confidence_interval([0.5, 0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_confidence_interval([])
    with pytest.raises(ValueError, match="confidence"):
        mean_confidence_interval([0.1, 0.2], confidence=95)
    with pytest.raises(ValueError, match="non-finite"):
        mean_confidence_interval([0.1, float("nan")])
    assert chance_level(5) == 0.2 and chance_level(2) == 0.5
    with pytest.raises(ValueError, match="n_way"):
        chance_level(0)
