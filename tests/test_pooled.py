"""The pooled verdict test (cdi.stats.pooled), --verdict permutation and the forward sample-size estimate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special, stats

from cdi.utils.errors import CDIError
from cdi.stats.pooled import PRIOR_WEIGHT, PooledStatistic
from cdi.stats.sample_size import forward_sample_size
from cdi.stats.verdict import audit_test

D = 8
DIRECTIONS = np.array([-1, -1, -1, -1, 1, 1, 0, -1])


def draw(n, rng, shift=0.0):
    X = rng.standard_normal((n, D))
    X[:, 1] += 0.8 * X[:, 0]  # correlated columns
    return X + shift * DIRECTIONS  # members: lower where the direction is -1, higher where +1


def test_parts_are_student_t_and_raos_f():
    """Part 1 is Student's t on the prior score, part 2 Rao's F from Hotelling's T2 computed directly."""
    rng = np.random.default_rng(0)
    P, U = draw(60, rng, 0.3), draw(80, rng)
    X = np.vstack([P, U])
    y = np.r_[np.ones(60), np.zeros(80)].astype(np.int8)
    stat = PooledStatistic(X, y, DIRECTIONS.astype(float))
    parts = stat.observe()
    Z = special.ndtri(stats.rankdata(X, axis=0) / (len(X) + 1))
    a = Z @ DIRECTIONS / np.abs(DIRECTIONS).sum()
    t = stats.ttest_ind(a[y == 1], a[y == 0], equal_var=True)
    assert parts.prior_t == pytest.approx(t.statistic, rel=1e-9)
    # Hotelling T2 on [a, Z] (the basis spans the same space: D columns, no truncation here)
    def hotelling(C):
        d = C[y == 1].mean(0) - C[y == 0].mean(0)
        S = (np.cov(C[y == 1], rowvar=False) * 59 + np.cov(C[y == 0], rowvar=False) * 79) / 138
        return 60 * 80 / 140 * d @ np.linalg.solve(np.atleast_2d(S), d)
    Td = hotelling(Z)
    T1 = t.statistic**2
    nu, d = 138, stat.d
    assert d == D
    F = (nu - d + 1) / (d - 1) * (Td - T1) / (nu + T1)
    assert parts.rest_F == pytest.approx(F, rel=1e-8)
    assert parts.rest_df == (d - 1, nu - d + 1)
    z1 = stats.norm.isf(stats.t.sf(t.statistic, nu))
    z2 = stats.norm.isf(stats.f.sf(F, d - 1, nu - d + 1))
    z = (PRIOR_WEIGHT * z1 + z2) / np.hypot(PRIOR_WEIGHT, 1.0)
    assert parts.z == pytest.approx(z, rel=1e-8)


def test_batched_statistic_equals_one_label_vector_at_a_time():
    rng = np.random.default_rng(1)
    X = np.vstack([draw(40, rng, 0.2), draw(50, rng)])
    y = np.r_[np.ones(40), np.zeros(50)].astype(np.int8)
    stat = PooledStatistic(X, y, DIRECTIONS.astype(float))
    Y = stat.permuted_labels(np.random.default_rng(2), 30)
    assert np.all(Y.sum(axis=0) == 40)
    batched = stat.z(Y)
    single = [PooledStatistic(X, Y[:, b], DIRECTIONS.astype(float)).observe().z for b in range(30)]
    np.testing.assert_allclose(batched, single, rtol=1e-9)


def test_verdict_does_not_depend_on_the_seed():
    rng = np.random.default_rng(3)
    P, U = draw(150, rng, 0.15), draw(150, rng)
    ps = {audit_test(P, U, directions=DIRECTIONS, permutations=0, seed=s).verdict_p for s in range(20)}
    assert len(ps) == 1
    res = audit_test(P, U, directions=DIRECTIONS, permutations=0, seed=0)
    assert res.protocol == "pooled" and "function of the feature table alone" in res.seed_dependence
    json.dumps(res.to_dict(), allow_nan=False)


def test_permutation_verdict_and_its_floor():
    rng = np.random.default_rng(4)
    P, U = draw(200, rng, 0.5), draw(200, rng)
    res = audit_test(P, U, directions=DIRECTIONS, permutations=99, seed=1, verdict="permutation")
    assert res.verdict_test == "permutation" and res.verdict_choice == "permutation"
    assert res.verdict_p == res.permutation_p == 1 / 100
    assert res.permutation_at_floor is True
    assert res.ttest_p < 1e-10  # the parametric p-value, reported beside the floor
    weak = audit_test(draw(30, rng), draw(30, rng), directions=DIRECTIONS, permutations=99, seed=1,
                      verdict="permutation")
    assert weak.permutation_at_floor is False and weak.verdict_p == weak.permutation_p
    with pytest.raises(CDIError, match="permutations"):
        audit_test(P, U, directions=DIRECTIONS, permutations=0, verdict="permutation")
    with pytest.raises(CDIError, match="verdict"):
        audit_test(P, U, directions=DIRECTIONS, verdict="bayes")
    with pytest.raises(CDIError, match="learns no scorer"):
        audit_test(P, U, directions=DIRECTIONS, scorer="xgboost")


def test_permutation_interval_holds_the_p_values_of_other_seeds():
    """The recorded 99% Monte Carlo interval is where other seeds' permutation p-values fall."""
    rng = np.random.default_rng(7)
    P, U = draw(60, rng, 0.12), draw(60, rng)
    runs = [audit_test(P, U, directions=DIRECTIONS, permutations=199, seed=s) for s in range(20)]
    low, high = runs[0].permutation_p_interval
    assert 0.0 < low < runs[0].permutation_p < high < 1.0
    # the interval is for the exceedance probability; the recorded p is (1 + count) / (B + 1)
    inside = [low - 1 / 200 <= r.permutation_p <= high + 1 / 200 for r in runs]
    assert sum(inside) >= 18, [r.permutation_p for r in runs]
    assert len({r.permutation_p for r in runs}) > 1  # the Monte Carlo does move it
    floor = audit_test(draw(200, rng, 0.5), draw(200, rng), directions=DIRECTIONS, permutations=99, seed=1)
    assert floor.permutation_p_interval[0] == 0.0 and 0.0 < floor.permutation_p_interval[1] < 0.06
    assert audit_test(P, U, directions=DIRECTIONS, permutations=0).permutation_p_interval is None


def test_without_directions_the_test_is_hotellings():
    rng = np.random.default_rng(5)
    P, U = draw(80, rng, 0.3), draw(80, rng)
    res = audit_test(P, U, permutations=0)
    assert res.prior_used is False and res.pooled["prior_t"] is None
    assert res.pooled["rest_df"] == (D, 160 - 2 - D + 1)


def test_few_images_keep_the_f_test_defined():
    """With more columns than a third of the error df, the label-free principal components are truncated."""
    rng = np.random.default_rng(6)
    P, U = rng.standard_normal((12, 40)), rng.standard_normal((12, 40))
    res = audit_test(P, U, directions=-np.ones(40), permutations=50)
    assert 0.0 < res.verdict_p <= 1.0
    assert res.pooled["directions_tested"] <= 1 + 22 // 3


def test_forward_sample_size_estimate():
    est = forward_sample_size(3.0, 100, 100, alpha=0.01, power=0.9)
    target = stats.norm.isf(0.01) + stats.norm.isf(0.1)
    # k = 50 observed; needed k' = 50 (target / 3)^2; n' = 2 k' at ratio 1
    assert est.published_needed == int(np.ceil(2 * 50 * (target / 3.0) ** 2))
    assert est.published_low < est.published_needed < est.published_high
    assert est.unpublished_needed == est.published_needed
    weak = forward_sample_size(1.0, 100, 100)
    assert weak.published_high is None and weak.published_needed > est.published_needed
    assert forward_sample_size(-0.5, 100, 100).published_needed is None
