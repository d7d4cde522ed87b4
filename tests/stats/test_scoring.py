"""Scoring model: validation, label-free pieces, the batched logistic solver, protocols."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cdi.utils.errors import CDIError
from cdi.stats.blocks import MIN_PER_BLOCK, assign_blocks
from cdi.stats.feature_checks import check_features
from cdi.stats.logistic import fit_logistic
from cdi.stats.scoring import CrossFit, Standardization, cross_fit_scores, prior_score


def gaussian_audit(n_pub=60, n_unp=80, d=6, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    mix = np.eye(d) + 0.4 * rng.standard_normal((d, d))
    P = rng.standard_normal((n_pub, d)) @ mix + shift
    U = rng.standard_normal((n_unp, d)) @ mix
    return P, U


# -- validation -------------------------------------------------------------


def test_nan_and_inf_name_the_columns():
    P, U = gaussian_audit()
    P[3, 2] = np.nan
    P[5, 2] = np.inf
    U[0, 4] = -np.inf
    with pytest.raises(CDIError, match=r"published features contain NaN or infinite values in 1 column\(s\): "
                                       r"gamma \(2 rows\)"):
        check_features(P, U, columns=["a", "b", "gamma", "d", "e", "f"])
    P[3, 2] = P[5, 2] = 0.0
    with pytest.raises(CDIError, match=r"unpublished .* feature_4 \(1 rows\)"):
        check_features(P, U)


def test_shape_errors_are_explained():
    P, U = gaussian_audit()
    with pytest.raises(CDIError, match="6 columns but unpublished have 5"):
        check_features(P, U[:, :5])
    with pytest.raises(CDIError, match="2-D"):
        check_features(P[0], U)
    with pytest.raises(CDIError, match="no unpublished images"):
        check_features(P, U[:0])
    with pytest.raises(CDIError, match="every feature column is constant"):
        check_features(np.ones((30, 3)), np.ones((30, 3)))
    with pytest.raises(CDIError, match="4 member directions for 6"):
        CrossFit(*check_features(P, U)[:2], directions=[1, 1, -1, 1])
    with pytest.raises(CDIError, match=r"\+1 .* -1 .* 0"):
        CrossFit(*check_features(P, U)[:2], directions=[1, 2, -1, 1, 1, 1])
    with pytest.raises(CDIError, match="unknown scorer 'svm'"):
        CrossFit(*check_features(P, U)[:2], scorer="svm")


def test_too_few_images_says_how_many_are_needed():
    P, U = gaussian_audit(n_pub=24, n_unp=80)
    X, y, _ = check_features(P, U)
    with pytest.raises(CDIError, match=r"at least 25 of each; got 24 published.*minimum is 2, which needs 10"):
        assign_blocks(y, 5, seed=0)
    assign_blocks(y, 4, seed=0)  # 4 blocks x 5 = 20 <= 24: fine


# -- label-free pieces ------------------------------------------------------


def test_stratified_blocks_with_unequal_sizes():
    y = np.r_[np.ones(27, np.int8), np.zeros(57, np.int8)]
    blocks = assign_blocks(y, 5, seed=3)
    for k in range(5):
        assert (y[blocks == k] == 1).sum() in (5, 6)
        assert (y[blocks == k] == 0).sum() in (11, 12)
    assert np.array_equal(blocks, assign_blocks(y, 5, seed=3))
    assert not np.array_equal(blocks, assign_blocks(y, 5, seed=4))


def test_standardisation_handles_constant_columns():
    X = np.c_[np.arange(10.0), np.full(10, 7.0), np.arange(10.0) ** 2]
    st = Standardization.fit(X)
    Z = st.transform(X)
    assert list(st.constant) == [False, True, False]
    assert np.all(Z[:, 1] == 0)
    np.testing.assert_allclose(Z[:, [0, 2]].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, [0, 2]].std(axis=0), 1)


def test_prior_score_orients_columns_by_direction():
    Z = np.array([[1.0, -1.0, 5.0], [-1.0, 1.0, -5.0]])
    # column 0: higher = member; column 1: lower = member; column 2: unknown
    np.testing.assert_allclose(prior_score(Z, np.array([1.0, -1.0, 0.0])), [1.0, -1.0])
    assert prior_score(Z, None) is None
    assert prior_score(Z, np.zeros(3)) is None


def test_constant_columns_are_fine_in_an_audit():
    P, U = gaussian_audit(shift=0.5)
    P = np.c_[P, np.full(len(P), 3.0)]
    U = np.c_[U, np.full(len(U), 3.0)]
    X, y, cols = check_features(P, U)
    res = cross_fit_scores(X, y, directions=[1] * 7, seed=0)
    assert res.constant_columns == ["feature_6"]
    assert res.coefficients["feature_6"] == 0.0
    assert np.all(np.isfinite(res.scores[res.tested]))


# -- batched logistic regression ---------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 3.0])  # 3.0: strong signal, the exact-Newton path
def test_fit_logistic_matches_scikit_learn(shift):
    P, U = gaussian_audit(shift=shift, seed=1)
    X = np.r_[P, U]
    X = (X - X.mean(0)) / X.std(0)
    y = np.r_[np.ones(len(P)), np.zeros(len(U))]
    D = np.c_[np.ones(len(X)), X]
    beta = fit_logistic(D, y[:, None], np.r_[0.0, np.full(X.shape[1], 2.0)])[:, 0]
    ref = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(beta[1:], ref.coef_[0], atol=1e-5)
    np.testing.assert_allclose(beta[0], ref.intercept_[0], atol=1e-5)


def test_fit_logistic_batch_equals_one_at_a_time_and_reaches_the_optimum():
    rng = np.random.default_rng(2)
    m, p = 90, 8
    D = np.c_[np.ones(m), rng.standard_normal((m, p - 1))]
    Y = (rng.random((m, 12)) < 0.4).astype(float)
    Y[:, 0] = (D[:, 1] + 0.3 * rng.standard_normal(m) > 0)  # nearly separable column
    pen = np.r_[0.0, np.full(p - 1, 0.5)]
    batch = fit_logistic(D, Y, pen)
    for b in range(Y.shape[1]):
        single = fit_logistic(D, Y[:, [b]], pen)[:, 0]
        np.testing.assert_allclose(batch[:, b], single, atol=1e-8)
        mu = 1 / (1 + np.exp(-D @ batch[:, b]))
        grad = D.T @ (mu - Y[:, b]) + pen * batch[:, b]
        assert np.max(np.abs(grad)) < 1e-7  # stationary point of a strictly convex objective


def test_nonnegative_coefficient_is_the_constrained_optimum():
    rng = np.random.default_rng(5)
    m = 80
    x = rng.standard_normal(m)
    y = (x + 0.5 * rng.standard_normal(m) < 0).astype(float)  # x points the wrong way
    D = np.c_[np.ones(m), x, rng.standard_normal((m, 3))]
    pen = np.r_[0.0, 1e-3, np.ones(3)]
    free = fit_logistic(D, y[:, None], pen)[:, 0]
    assert free[1] < 0
    constrained = fit_logistic(D, y[:, None], pen, nonnegative=1)[:, 0]
    assert constrained[1] == 0.0
    without = fit_logistic(D[:, [0, 2, 3, 4]], y[:, None], pen[[0, 2, 3, 4]])[:, 0]
    np.testing.assert_allclose(constrained[[0, 2, 3, 4]], without, atol=1e-10)


def test_separable_training_set_stays_finite():
    """A tiny training set separated by the prior: the tiny ridge keeps the optimum finite."""
    rng = np.random.default_rng(0)
    prior = np.r_[rng.random(6) + 1.0, -rng.random(6) - 1.0]
    y = np.r_[np.ones(6), np.zeros(6)]
    D = np.c_[np.ones(12), prior, rng.standard_normal((12, 30))]
    beta = fit_logistic(D, y[:, None], np.r_[1e-8, 1e-3, np.full(30, 3.0)], nonnegative=1)
    assert np.all(np.isfinite(beta)) and beta[1, 0] > 0


# -- the procedure -----------------------------------------------------------


def test_cross_fit_scores_are_deterministic_and_in_input_order():
    P, U = gaussian_audit(shift=0.3)
    X, y, _ = check_features(P, U)
    d = [1, 1, 1, 1, -1, 1]
    a = cross_fit_scores(X, y, directions=d, seed=7)
    b = cross_fit_scores(X, y, directions=d, seed=7)
    assert np.array_equal(a.scores, b.scores) and a.coefficients == b.coefficients
    assert a.to_dict() == b.to_dict()
    c = cross_fit_scores(X, y, directions=d, seed=8)
    assert not np.array_equal(a.folds, c.folds)


@pytest.mark.parametrize("directions", [None, [1, 1, 1, -1, 1, 1]])
def test_sequential_score_never_sees_its_own_or_later_labels(directions):
    """The defining property: block k's scores depend on labels of blocks < k only."""
    P, U = gaussian_audit(n_pub=50, n_unp=50, shift=0.4, seed=3)
    X, y, _ = check_features(P, U)
    cf = CrossFit(X, y, directions=directions, folds=5, seed=1)
    base = cf.scores(y[:, None])[:, 0]
    rng = np.random.default_rng(0)
    for k in range(5):
        Y = y.copy()
        later = cf.blocks >= k
        Y[later] = rng.permutation(Y[later])  # scramble the labels of block k and after
        S = cf.scores(Y[:, None])[:, 0]
        upto = cf.blocks <= k
        np.testing.assert_array_equal(S[upto], base[upto])


def test_crossfit_score_never_sees_its_own_block():
    P, U = gaussian_audit(n_pub=50, n_unp=50, shift=0.4, seed=3)
    X, y, _ = check_features(P, U)
    cf = CrossFit(X, y, protocol="crossfit", folds=5, seed=1)
    base = cf.scores(y[:, None])[:, 0]
    rows = cf.blocks == 2
    Y = y.copy()
    Y[rows] = np.random.default_rng(0).permutation(Y[rows])
    np.testing.assert_array_equal(cf.scores(Y[:, None])[rows, 0], base[rows])


def test_sequential_without_directions_is_a_sample_split_with_two_folds():
    P, U = gaussian_audit(shift=0.5)
    X, y, _ = check_features(P, U)
    res = cross_fit_scores(X, y, folds=2, seed=0)
    assert res.block_scorers == ["training only", "logistic"]
    assert not res.tested[res.folds == 0].any() and res.tested[res.folds == 1].all()
    assert np.isnan(res.scores[res.folds == 0]).all()


def test_permuted_labels_keep_block_counts_and_do_shuffle():
    P, U = gaussian_audit(n_pub=40, n_unp=70)
    X, y, _ = check_features(P, U)
    cf = CrossFit(X, y, folds=5, seed=0)
    Y = cf.permuted_labels(np.random.default_rng(1), 50)
    for k in range(5):
        rows = cf.blocks == k
        assert np.all(Y[rows].sum(axis=0) == y[rows].sum())
    assert len({Y[:, b].tobytes() for b in range(50)}) == 50


def test_batched_scores_equal_one_label_vector_at_a_time():
    P, U = gaussian_audit(n_pub=40, n_unp=45, shift=0.3, seed=4)
    X, y, _ = check_features(P, U)
    cf = CrossFit(X, y, directions=[1] * 6, folds=5, seed=0)
    Y = cf.permuted_labels(np.random.default_rng(2), 20)
    batch = cf.scores(Y)
    for b in range(0, 20, 5):
        np.testing.assert_allclose(batch[:, b], cf.scores(Y[:, [b]])[:, 0], atol=1e-8, equal_nan=True)


def test_xgboost_scorer_is_deterministic():
    P, U = gaussian_audit(n_pub=30, n_unp=30, shift=1.0, seed=6)
    X, y, _ = check_features(P, U)
    a = cross_fit_scores(X, y, scorer="xgboost", directions=[1] * 6, folds=3, seed=2)
    b = cross_fit_scores(X, y, scorer="xgboost", directions=[1] * 6, folds=3, seed=2)
    assert np.array_equal(a.scores, b.scores, equal_nan=True)
    assert a.coefficient_kind.startswith("xgboost") and sum(a.coefficients.values()) > 0


def test_minimum_per_block_is_enforced_for_every_class():
    P, U = gaussian_audit(n_pub=MIN_PER_BLOCK * 3, n_unp=MIN_PER_BLOCK * 3 - 1)
    X, y, _ = check_features(P, U)
    with pytest.raises(CDIError, match="got 14 unpublished"):
        cross_fit_scores(X, y, folds=3)
