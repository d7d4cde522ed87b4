"""The pooled verdict over several noise draws (``cdi.stats.draws``): reduction to one draw, calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cdi.stats import audit_test


def _draws(rng, n, d, draws, noise, shift=0.0):
    """P and U rows per draw: image signal plus independent noise per draw; P shifted by ``shift`` (all columns)."""
    signal = rng.standard_normal((2 * n, d))
    signal[:n] += shift
    tables = [signal + noise * rng.standard_normal((2 * n, d)) for _ in range(draws)]
    return [(t[:n], t[n:]) for t in tables]


def test_identical_draws_give_the_single_draw_test():
    rng = np.random.default_rng(3)
    (P, U), = _draws(rng, 50, 6, 1, 0.5, shift=0.3)
    directions = [1, 1, 1, -1, 0, 0]
    one = audit_test(P, U, directions=directions, permutations=0)
    two = audit_test(P, U, directions=directions, permutations=0, draws=[(P, U)])
    assert two.pooled["noise_draws"] == 2 and two.pooled["null_sd"] == pytest.approx(1.0, abs=1e-12)
    assert two.statistic == pytest.approx(one.statistic, rel=1e-12)
    assert two.pooled["prior_z"] == pytest.approx(one.pooled["prior_z"], rel=1e-9)
    assert one.pooled["noise_draws"] == 1


def test_draw_averaged_verdict_is_calibrated_under_the_null():
    """300 null data sets (P and U alike; 3 draws whose noise is as large as the signal): the draw-averaged
    p-value rejects at 0.05 inside the 99% binomial interval, and its null p-values look uniform."""
    rng = np.random.default_rng(11)
    ps = []
    for _ in range(300):
        draws = _draws(rng, 40, 5, 3, 1.0)
        (P, U), rest = draws[0], draws[1:]
        ps.append(audit_test(P, U, directions=[1, 1, 1, 0, 0], permutations=0, draws=rest).verdict_p)
    ps = np.array(ps)
    low, high = stats.binom.ppf([0.005, 0.995], 300, 0.05) / 300
    assert low <= np.mean(ps < 0.05) <= high
    assert stats.kstest(ps, "uniform").pvalue > 0.001


def test_draws_must_hold_the_same_images_and_columns():
    rng = np.random.default_rng(5)
    (P, U), = _draws(rng, 30, 4, 1, 0.5)
    with pytest.raises(Exception, match="same images and columns"):
        audit_test(P, U, directions=[1, 1, 0, 0], permutations=0, draws=[(P[:-1], U)])
