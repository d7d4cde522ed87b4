"""The audit's tests: hand-checked statistics, calibration under the null, power, sample-size curve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import special, stats
from sklearn.metrics import roc_auc_score

from cdi.stats.blocks import normal_scores, z_from_t
from cdi.utils.errors import CDIError
from cdi.stats.feature_checks import check_features
from cdi.stats.scoring import CrossFit
from cdi.stats.calibration import null_calibration
from cdi.stats.sample_size import sample_size_curve
from cdi.stats.verdict import (
    audit_test,
    auc,
    hedges_g,
    permutation_pvalue,
    protocol_statistic,
    welch_one_sided,
)

# Feature families of an audit with CLiD (31 columns): name, columns, member direction.
FAMILIES = [
    ("denoising_loss", 1, -1),
    ("secmi", 1, -1),
    ("pia", 2, -1),
    ("multiple_loss", 10, -1),
    ("noise_optimization", 2, -1),
    ("gradient_masking", 10, -1),
    ("clid_loss", 1, -1),
    ("clid_gap", 4, +1),
]
DIRECTIONS = np.concatenate([[sign] * count for _, count, sign in FAMILIES])
LOSS_LIKE = {"denoising_loss", "multiple_loss", "gradient_masking"}


def audit_like_features(n: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """``n`` rows shaped like the 31 CDI + CLiD features.

    Every column mixes a shared image-difficulty factor, a factor of its
    family and noise; a per-image scale drawn from a chi-square with 6 df
    gives multivariate-t tails, and loss-like columns are exponentiated
    (positive, right-skewed). Members are shifted by ``shift`` latent SDs in
    the member direction, with family-dependent strength.
    """
    strength = {"denoising_loss": 0.6, "secmi": 0.3, "pia": 0.5, "multiple_loss": 1.0,
                "noise_optimization": 0.2, "gradient_masking": 0.4, "clid_loss": 0.3, "clid_gap": 0.8}
    difficulty = rng.standard_normal(n)
    scale = np.sqrt(6.0 / rng.chisquare(6.0, size=n))
    columns = []
    for name, count, sign in FAMILIES:
        family = rng.standard_normal(n)
        for j in range(count):
            loading = 0.5 + 0.4 * np.sin(j + len(name))
            z = 0.6 * difficulty + loading * family + 0.6 * rng.standard_normal(n)
            z = (z + sign * shift * strength[name] * (1.0 - 0.05 * j)) * scale
            columns.append(np.exp(0.4 * z) if name in LOSS_LIKE else z)
    return np.column_stack(columns)


@pytest.fixture(scope="module")
def null_pool() -> np.ndarray:
    return audit_like_features(3000, np.random.default_rng(2024))


# -- hand-checked statistics --------------------------------------------------


def test_welch_one_sided_by_hand_and_against_scipy():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 0.5, 1.0])
    res = welch_one_sided(a, b)
    va, vb = 5.0 / 3.0 / 4.0, 0.25 / 3.0  # var/n per group
    t = 2.0 / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3.0 + vb**2 / 2.0)
    assert res.statistic == pytest.approx(t, rel=1e-12)
    assert res.df == pytest.approx(df, rel=1e-12)
    assert res.pvalue == pytest.approx(stats.t.sf(t, df), rel=1e-10)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.standard_normal(rng.integers(5, 30)) + 0.3, rng.exponential(size=rng.integers(5, 30))
        ref = stats.ttest_ind(x, y, equal_var=False, alternative="greater")
        got = welch_one_sided(x, y)
        assert got.statistic == pytest.approx(ref.statistic, rel=1e-10)
        assert got.pvalue == pytest.approx(ref.pvalue, rel=1e-9)


def test_z_from_t_keeps_precision_in_both_tails():
    t, df = np.array([-3.0, 0.0, 2.5, 40.0, 400.0]), np.array([12.0, 5.0, 30.0, 80.0, 900.0])
    z = z_from_t(t, df)
    np.testing.assert_allclose(z[:3], -special.ndtri(stats.t.sf(t[:3], df[:3])), rtol=1e-10)
    assert z[1] == 0.0
    # p far below the smallest float: the normal score is still finite and ordered
    assert np.all(np.isfinite(z)) and z[4] > z[3] > 10
    np.testing.assert_allclose(special.log_ndtr(-z[3]), stats.t.logsf(40.0, 80.0), rtol=1e-9)


def test_permutation_pvalue_formula():
    assert permutation_pvalue(0, 999) == 1 / 1000
    assert permutation_pvalue(49, 999) == 50 / 1000
    assert permutation_pvalue(999, 999) == 1.0
    assert permutation_pvalue(0, 0) == 1.0
    with pytest.raises(ValueError):
        permutation_pvalue(5, 3)


def test_effect_size_and_auc_by_hand():
    a, b = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0, 3.0])
    pooled = (2 * 4.0 + 3 * (2.75 / 3.0)) / 5.0  # variances 4 and 2.75 / 3
    assert hedges_g(a, b) == pytest.approx((4.0 - 2.25) / math.sqrt(pooled) * (1 - 3 / (4 * 7 - 9)))
    # pairs a > b: 2>1; 4,6 > all four; 2 vs 2 ties counts 1/2 -> (1 + 0.5 + 4 + 4) / 12
    assert auc(a, b) == pytest.approx(9.5 / 12)
    assert auc(a, b) == pytest.approx(roc_auc_score(np.r_[np.ones(3), np.zeros(4)], np.r_[a, b]))


def test_normal_scores_are_rank_based_and_label_free():
    s = np.array([[3.0], [10.0], [-1.0], [10.0]])
    expected = special.ndtri(np.array([2.0, 3.5, 1.0, 3.5]) / 5.0)
    np.testing.assert_allclose(normal_scores(s)[:, 0], expected)


# -- the audit test -----------------------------------------------------------


def test_audit_test_record_is_consistent_and_json_able():
    rng = np.random.default_rng(1)
    P, U = audit_like_features(90, rng, shift=0.4), audit_like_features(130, rng)
    res = audit_test(P, U, directions=DIRECTIONS, permutations=60, alpha=0.01, seed=3, protocol="sequential")
    assert res.verdict_test == "t-test" and res.verdict_p == res.ttest_p
    assert res.rejected == (res.verdict_p < 0.01)
    assert (res.n_published, res.n_unpublished) == (90, 130)
    assert res.n_tested_published == 90 and res.n_tested_unpublished == 130  # prior scores block 0
    assert len(res.scores_published) == 90 and len(res.scores_unpublished) == 130
    # the verdict is the fixed-weight Stouffer combination of the reported blocks
    w = np.array([b.weight for b in res.blocks])
    z = z_from_t(np.array([b.statistic for b in res.blocks]), np.array([b.df for b in res.blocks]))
    assert res.statistic == pytest.approx(float(w @ z / np.sqrt(w @ w)), rel=1e-10)
    assert res.verdict_p == pytest.approx(special.ndtr(-res.statistic), rel=1e-10)
    assert res.blocks[0].scored_by == "prior"
    assert res.permutation_p == permutation_pvalue(res.permutation_count, 60)
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert json.loads(text)["protocol"] == "sequential"


def test_same_inputs_and_seed_give_identical_results():
    rng = np.random.default_rng(2)
    P, U = audit_like_features(60, rng, shift=0.3), audit_like_features(60, rng)
    a = audit_test(P, U, directions=DIRECTIONS, permutations=50, seed=11, protocol="sequential")
    b = audit_test(P, U, directions=DIRECTIONS, permutations=50, seed=11, protocol="sequential")
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    c = audit_test(P, U, directions=DIRECTIONS, permutations=50, seed=12, protocol="sequential")
    assert c.verdict_p != a.verdict_p  # another block assignment


def test_permutation_count_equals_rerunning_the_procedure_per_permutation():
    """The batched permutation test counts exactly what re-running the procedure per shuffle gives."""
    rng = np.random.default_rng(3)
    P, U = audit_like_features(40, rng, shift=0.2), audit_like_features(45, rng)
    res = audit_test(P, U, directions=DIRECTIONS, permutations=40, seed=5, protocol="sequential")
    X, y, _ = check_features(P, U)
    cf = CrossFit(X, y, directions=DIRECTIONS, seed=5)
    Y = cf.permuted_labels(np.random.default_rng([5, 0x9E57]), 40)
    count = 0
    for b in range(40):
        z, _ = protocol_statistic(cf, cf.scores(Y[:, [b]]), Y[:, [b]])
        count += int(z[0] >= res.statistic - 1e-9 * (1 + abs(res.statistic)))
    assert res.permutation_count == count


def test_strong_membership_gives_tiny_p_values_without_underflow():
    rng = np.random.default_rng(4)
    P = rng.standard_normal((1000, 31)) - 3.0 * (DIRECTIONS == -1) + 3.0 * (DIRECTIONS == 1)
    U = rng.standard_normal((1000, 31))
    res = audit_test(P, U, directions=DIRECTIONS, permutations=20, protocol="sequential")
    assert res.verdict_log10_p < -300 and math.isfinite(res.verdict_log10_p)
    assert res.permutation_p == 1 / 21
    assert res.auc > 0.99 and res.effect_size > 3


def test_crossfit_protocol_takes_its_verdict_from_the_permutation_test():
    rng = np.random.default_rng(5)
    P, U = audit_like_features(50, rng), audit_like_features(50, rng)
    with pytest.raises(CDIError, match="permutation test"):
        audit_test(P, U, protocol="crossfit", permutations=0)
    res = audit_test(P, U, protocol="crossfit", permutations=30)
    assert res.verdict_test == "permutation" and res.verdict_p == res.permutation_p
    assert res.df is not None and res.blocks == []


def test_bad_arguments_are_user_errors():
    rng = np.random.default_rng(6)
    P, U = audit_like_features(30, rng), audit_like_features(30, rng)
    with pytest.raises(CDIError, match="alpha"):
        audit_test(P, U, alpha=1.5, protocol="sequential")
    with pytest.raises(CDIError, match="permutations"):
        audit_test(P, U, permutations=-1, protocol="sequential")
    with pytest.raises(CDIError, match="at least 35 of each"):
        audit_test(P, U, folds=7, protocol="sequential")
    P[0, 3] = np.nan
    with pytest.raises(CDIError, match="feature_3"):
        audit_test(P, U, protocol="sequential")


# -- calibration under the null -----------------------------------------------


def test_verdict_is_calibrated_under_the_null(null_pool):
    """200 audits with P and U from one distribution, 50 to 300 images per side, unequal sizes too."""
    cal = null_calibration(null_pool, protocol="sequential", sizes=((50, 50), (120, 80), (60, 300), (300, 300), (80, 150)),
                           audits=200, directions=DIRECTIONS, seed=1)
    assert cal.calibrated, cal.summary()


def test_permutation_test_is_calibrated_under_the_null(null_pool):
    """200 small audits, 100 permutations each; also checks the verdict at the smallest sizes."""
    cal = null_calibration(null_pool, protocol="sequential", sizes=((30, 30), (45, 25), (25, 50), (60, 40)), audits=200,
                           permutations=100, directions=DIRECTIONS, seed=2)
    assert cal.calibrated, cal.summary()
    assert set(cal.pvalues) == {"t-test", "permutation"}


def test_null_calibration_rejects_a_pool_that_is_too_small(null_pool):
    with pytest.raises(CDIError, match="needs 600"):
        null_calibration(null_pool[:500], sizes=((300, 300),), audits=1)


# -- power ----------------------------------------------------------------------


def test_verdict_protocol_beats_the_half_split_baseline():
    """Small member shift in the member direction, 100 + 100 images, 120 audits.

    Baseline: plain logistic regression (C = 1) fitted on one half, Welch
    t-test on the other half (folds=2 without directions).
    """
    rng = np.random.default_rng(7)
    ours, baseline = [], []
    for i in range(120):
        P, U = audit_like_features(100, rng, shift=0.2), audit_like_features(100, rng)
        ours.append(audit_test(P, U, directions=DIRECTIONS, permutations=0, seed=i, protocol="sequential").verdict_p)
        baseline.append(audit_test(P, U, folds=2, penalty=1.0, permutations=0, seed=i, protocol="sequential").verdict_p)
    ours, baseline = np.array(ours), np.array(baseline)
    power = {a: (np.mean(ours < a), np.mean(baseline < a)) for a in (0.05, 0.01)}
    assert power[0.05][0] >= power[0.05][1] + 0.10, power  # measured: 0.375 vs 0.200
    assert power[0.01][0] > power[0.01][1], power  # measured: 0.200 vs 0.075


# -- sample-size curve --------------------------------------------------------


def test_sample_size_curve_finds_the_needed_size():
    rng = np.random.default_rng(8)
    P, U = audit_like_features(160, rng, shift=0.3), audit_like_features(200, rng)
    curve = sample_size_curve(P, U, directions=DIRECTIONS, alpha=0.01, resamples=12, seed=0, protocol="sequential")
    assert curve.sizes[0] == 25 and curve.sizes[-1] == 160
    assert curve.unpublished_sizes[-1] == 200 and curve.unpublished_sizes[0] == round(25 * 200 / 160)
    shares = np.array(curve.share_significant)
    assert shares[-1] >= 0.9 and shares[0] < shares[-1]
    i = curve.sizes.index(curve.n_needed)
    assert np.all(shares[i:] >= 0.9) and (i == 0 or shares[i - 1] < 0.9)
    assert curve.median_p[-1] < curve.median_p[0] / 100
    again = sample_size_curve(P, U, directions=DIRECTIONS, alpha=0.01, resamples=12, seed=0, protocol="sequential")
    assert again.to_dict() == curve.to_dict()
    json.dumps(curve.to_dict(), allow_nan=False)


def test_sample_size_curve_under_the_null_needs_no_size(null_pool):
    curve = sample_size_curve(null_pool[:100], null_pool[100:220], directions=DIRECTIONS, sizes=[30, 100],
                              resamples=10, seed=1)
    assert curve.n_needed is None and max(curve.share_significant) <= 0.3


def test_sample_size_curve_rejects_impossible_sizes(null_pool):
    with pytest.raises(CDIError, match="between 25 and 100"):
        sample_size_curve(null_pool[:100], null_pool[100:200], sizes=[10, 50], resamples=2, protocol="sequential")
    with pytest.raises(CDIError, match="too few images"):
        sample_size_curve(null_pool[:20], null_pool[100:200], resamples=2, protocol="sequential")
