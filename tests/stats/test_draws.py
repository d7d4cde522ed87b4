"""The pooled verdict over several noise draws (``cdi.stats.draws``): reduction to one draw, reliability, calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cdi.stats import audit_test
from cdi.stats.draws import DrawAveragedStatistic, reliability


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


def _mixed_world(rng, n, draws, shift=0.0):
    """Three seed-free columns, one that is a fifth noise, two that are pure noise draw; P shifted along the first four."""
    image = rng.standard_normal((2 * n, 4))
    image[:n] += shift
    tables = []
    for _ in range(draws):
        noisy = np.column_stack([image[:, 3] + 0.5 * rng.standard_normal(2 * n), rng.standard_normal((2 * n, 2))])
        tables.append(np.column_stack([image[:, :3], noisy]))
    return [(t[:n], t[n:]) for t in tables]


def test_reliability_is_measured_from_the_draws_without_labels():
    rng = np.random.default_rng(21)
    draws = _mixed_world(rng, 200, 3)
    Xs = [np.vstack(d) for d in draws]
    columns, basis = reliability(Xs)
    # seed-free columns are exactly reliable; the 0.5-sd noise column is 1 / 1.25 = 0.8 image; pure noise ~0
    assert np.all(columns[:3] == 1.0)
    assert columns[3] == pytest.approx(0.8, abs=0.06)
    assert np.all(columns[4:] < 0.06)
    # part 2 keeps the four directions that are mostly image, and they leave the pure-noise columns out
    assert basis.shape[1] == 4
    assert np.abs(basis[4:]).max() < 0.15
    # a relabelling cannot change them: they read no label
    order = rng.permutation(len(Xs[0]))  # the same reordering of the images in every draw
    same = reliability([X[order] for X in Xs])
    assert same[0] == pytest.approx(columns, abs=1e-12) and same[1].shape[1] == basis.shape[1]


def test_reliability_weighting_steadies_the_verdict_over_noise_draws():
    """The same images with 12 independent pairs of noise draws: the reliability-weighted verdict's Z moves less
    from pair to pair than the plain draw average's (here 0.12 against 0.17)."""
    rng = np.random.default_rng(4)
    image = _mixed_world(rng, 120, 24, shift=0.25)
    directions = np.array([1, 1, 1, 1, 1, 1], dtype=float)
    y = np.r_[np.ones(120), np.zeros(120)]
    Xs = [np.vstack(d) for d in image]
    z = {w: np.array([DrawAveragedStatistic(Xs[k:k + 2], y, directions, reliability_weighted=w).observe()[0].z
                      for k in range(0, 24, 2)]) for w in (False, True)}
    assert z[True].std() < 0.8 * z[False].std()


def test_reliability_weighted_verdict_is_calibrated_under_the_null():
    """300 null data sets of the mixed world (2 draws): rejection at 0.05 inside the 99% binomial interval."""
    rng = np.random.default_rng(12)
    ps = []
    for _ in range(300):
        draws = _mixed_world(rng, 40, 2)
        (P, U), rest = draws[0], draws[1:]
        ps.append(audit_test(P, U, directions=[1, 1, 1, 1, 1, 1], permutations=0, draws=rest).verdict_p)
    ps = np.array(ps)
    low, high = stats.binom.ppf([0.005, 0.995], 300, 0.05) / 300
    assert low <= np.mean(ps < 0.05) <= high
    assert stats.kstest(ps, "uniform").pvalue > 0.001
