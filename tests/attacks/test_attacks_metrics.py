"""Exact ROC, AUC, TPR at bounded FPR, threshold application and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from cdi.attacks.metrics import (
    bootstrap_counts,
    bootstrap_roc,
    orient,
    percentile_interval,
    rates_at_threshold,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    weighted_roc_figures,
)
from cdi.utils.errors import CDIError


def test_roc_by_hand():
    # Sorted: 0.9 (m), 0.8 (n), 0.7 (m), 0.6 (n).
    roc = roc_curve([0.8, 0.9, 0.6, 0.7], [0, 1, 0, 1])
    np.testing.assert_array_equal(roc.fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(roc.tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(roc.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6])
    # Pairs (member beats non-member): 0.9>0.8, 0.9>0.6, 0.7>0.6; 0.7<0.8 -> 3/4.
    assert roc_auc([0.8, 0.9, 0.6, 0.7], [0, 1, 0, 1]) == pytest.approx(0.75)


def test_ties_move_tpr_and_fpr_together():
    # A member and a non-member share the top score: no threshold separates them.
    scores, labels = [1.0, 1.0, 0.0], [1, 0, 0]
    roc = roc_curve(scores, labels)
    np.testing.assert_array_equal(roc.fpr, [0, 0.5, 1])
    np.testing.assert_array_equal(roc.tpr, [0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(0.75)  # the tie counts one half
    point = tpr_at_fpr(scores, labels, 0.0)
    # Optimistic tie-breaking would claim TPR 1 at FPR 0; the exact answer is nothing.
    assert point.tpr == 0.0 and point.fpr == 0.0 and point.threshold == np.inf
    point = tpr_at_fpr(scores, labels, 0.5)
    assert (point.tpr, point.fpr, point.threshold) == (1.0, 0.5, 1.0)


def test_all_tied_scores_give_the_diagonal():
    labels = np.r_[np.ones(5), np.zeros(7)]
    roc = roc_curve(np.zeros(12), labels)
    np.testing.assert_array_equal(roc.fpr, [0, 1])
    np.testing.assert_array_equal(roc.tpr, [0, 1])
    assert roc_auc(np.zeros(12), labels) == 0.5


def _staircase():
    """10 members, 100 non-members.

    Descending: 10 (6 members), 9 (non-member), 8.5 (non-member), 8 (3 members),
    1 (member), then 98 non-members in [0, 0.5]. ROC points (FPR, TPR):
    (0, .6), (.01, .6), (.02, .6), (.02, .9), (.02, 1), then FPR up to 1.
    """
    members = np.r_[np.full(6, 10.0), np.full(3, 8.0), 1.0]
    nonmembers = np.r_[9.0, 8.5, np.linspace(0.0, 0.5, 98)]
    return np.r_[members, nonmembers], np.r_[np.ones(10), np.zeros(100)]


def test_tpr_at_fpr_takes_the_largest_tpr_within_the_bound():
    scores, labels = _staircase()
    for bound, tpr, fpr, threshold in [
        (0.0, 0.6, 0.0, 10.0),
        (0.01, 0.6, 0.0, 10.0),  # TPR 0.6 is reached at FPR 0 already: the highest threshold is kept
        (0.0199, 0.6, 0.0, 10.0),  # no interpolation towards the next ROC point
        (0.02, 1.0, 0.02, 1.0),  # an FPR exactly at the bound is allowed
        (0.5, 1.0, 0.02, 1.0),
    ]:
        point = tpr_at_fpr(scores, labels, bound)
        assert (point.tpr, point.fpr, point.threshold) == pytest.approx((tpr, fpr, threshold)), bound


def test_orientation_lower_is_member():
    losses = np.array([0.1, 0.2, 0.9, 0.8])  # members have the low losses
    labels = np.array([1, 1, 0, 0])
    assert roc_auc(losses, labels) == 0.0  # unoriented: perfectly wrong
    assert roc_auc(orient(losses, -1), labels) == 1.0
    np.testing.assert_array_equal(orient(losses, 1), losses)
    with pytest.raises(ValueError):
        orient(losses, 0)


def test_rates_at_threshold_on_another_set():
    scores, labels = _staircase()
    threshold = tpr_at_fpr(scores, labels, 0.01).threshold  # 10.0
    test_scores = np.r_[10.0, 10.5, 3.0, 11.0, 10.0, 0.0, 0.0, 0.0]
    test_labels = np.r_[1, 1, 1, 0, 0, 0, 0, 0]
    tpr, fpr = rates_at_threshold(test_scores, test_labels, threshold)
    assert tpr == pytest.approx(2 / 3)
    assert fpr == pytest.approx(2 / 5)  # score == threshold counts as member
    assert rates_at_threshold(test_scores, test_labels, np.inf) == (0.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=2, max_size=40),
    st.lists(st.integers(0, 6), min_size=2, max_size=40),
)
def test_auc_matches_mann_whitney_with_ties(members, nonmembers):
    scores = np.r_[members, nonmembers].astype(float)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    roc = roc_curve(scores, labels)
    assert roc.tp[-1] == len(members) and roc.fp[-1] == len(nonmembers)
    point = tpr_at_fpr(scores, labels, 0.1)
    # The point is on the curve, within the bound, and no curve point within the bound beats it.
    assert point.fpr <= 0.1
    within = roc.fpr <= 0.1
    assert point.tpr == roc.tpr[within].max()
    assert rates_at_threshold(scores, labels, point.threshold) == pytest.approx((point.tpr, point.fpr))


def test_bad_input_is_a_user_error():
    with pytest.raises(CDIError, match="NaN"):
        roc_curve([0.1, np.nan], [1, 0])
    with pytest.raises(CDIError, match="both members and non-members"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(CDIError, match="one score and one label"):
        roc_curve([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(CDIError, match="labels"):
        roc_curve([0.1, 0.2], [1, 2])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_weighted_figures_equal_the_figures_of_the_repeated_set(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = rng.integers(1, 15, 2)
    scores = rng.integers(0, 8, n_pos + n_neg).astype(float)  # many ties
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    counts = rng.integers(0, 4, (6, scores.size))
    counts[:, 0] += 1  # at least one member and
    counts[:, -1] += 1  # one non-member per row
    bounds, thresholds = [0.0, 0.1, 0.5], [3.0, 7.5, -1.0, np.inf]
    figures = weighted_roc_figures(scores, labels, counts, max_fprs=bounds, thresholds=thresholds)
    for r in range(counts.shape[0]):
        s, y = np.repeat(scores, counts[r]), np.repeat(labels, counts[r])
        assert figures.auc[r] == pytest.approx(roc_auc(s, y))
        for j, bound in enumerate(bounds):
            assert figures.tpr_at_fpr[r, j] == pytest.approx(tpr_at_fpr(s, y, bound).tpr)
        for j, threshold in enumerate(thresholds):
            rates = (figures.tpr_at_threshold[r, j], figures.fpr_at_threshold[r, j])
            assert rates == pytest.approx(rates_at_threshold(s, y, threshold))


def test_bootstrap_counts_are_stratified():
    labels = np.r_[np.ones(7, int), np.zeros(11, int)]
    counts = bootstrap_counts(labels, 50, np.random.default_rng(0))
    assert counts.shape == (50, 18)
    np.testing.assert_array_equal(counts[:, :7].sum(axis=1), 7)
    np.testing.assert_array_equal(counts[:, 7:].sum(axis=1), 11)


def test_bootstrap_is_seeded_and_covers_the_estimate():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 300)]
    labels = np.r_[np.ones(200), np.zeros(300)]
    kwargs = dict(max_fprs=[0.1], thresholds=[1.0], n_resamples=300)
    a = bootstrap_roc(scores, labels, seed=7, **kwargs)
    b = bootstrap_roc(scores, labels, seed=7, **kwargs)
    c = bootstrap_roc(scores, labels, seed=8, **kwargs)
    table = np.column_stack([a.auc, a.tpr_at_fpr, a.tpr_at_threshold, a.fpr_at_threshold])
    np.testing.assert_array_equal(table, np.column_stack([b.auc, b.tpr_at_fpr, b.tpr_at_threshold, b.fpr_at_threshold]))
    assert not np.array_equal(a.auc, c.auc)
    assert table.shape == (300, 4)
    estimates = [roc_auc(scores, labels), tpr_at_fpr(scores, labels, 0.1).tpr, *rates_at_threshold(scores, labels, 1.0)]
    for value, (low, high) in zip(estimates, percentile_interval(table, 0.95)):
        assert low <= value <= high
        assert high - low > 0
