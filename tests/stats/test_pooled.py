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
    assert res.protocol == "pooled" and "function of the feature table" in res.seed_dependence
    assert "draws noise" in res.seed_dependence  # the table itself depends on the features' seed (issue 21)
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


# --------------------------------------------------------------------------
# issue 21: the decomposition of Z and the direction rule
# --------------------------------------------------------------------------


def test_verdict_statistic_is_decomposed_into_its_two_parts():
    """prior_contribution + rest_contribution = Z; the shares sum to 1; each z is its part's p-value on the normal scale."""
    rng = np.random.default_rng(5)
    P, U = draw(90, rng, 0.25), draw(70, rng)
    res = audit_test(P, U, directions=DIRECTIONS, permutations=0)
    parts = res.pooled
    assert parts["prior_contribution"] + parts["rest_contribution"] == pytest.approx(parts["z"], rel=1e-12)
    assert parts["prior_share"] + parts["rest_share"] == pytest.approx(1.0, rel=1e-12)
    assert parts["prior_z"] == pytest.approx(stats.norm.isf(np.exp(parts["prior_log_p"])), rel=1e-9)
    assert parts["rest_z"] == pytest.approx(stats.norm.isf(np.exp(parts["rest_log_p"])), rel=1e-9)
    norm = np.hypot(PRIOR_WEIGHT, 1.0)
    assert parts["prior_contribution"] == pytest.approx(PRIOR_WEIGHT * parts["prior_z"] / norm, rel=1e-12)
    assert (parts["prior_weight"], parts["rest_weight"]) == (PRIOR_WEIGHT, 1.0)
    assert parts["prior_p_against"] == pytest.approx(stats.t.cdf(parts["prior_t"], 158), rel=1e-9)
    assert res.statistic == parts["z"]
    json.dumps(res.to_dict(), allow_nan=False)


def collinear(n, rng):
    """``draw`` with column 2 nearly a copy of column 3 (as losses at neighbouring timesteps are)."""
    X = draw(n, rng)
    X[:, 2] = X[:, 3] + 0.15 * rng.standard_normal(n)
    return X


def against_the_members(n, rng, strength, columns):
    """Published rows shifted AGAINST the member direction on ``columns`` only: a difference that is not training."""
    P = collinear(n, rng)
    P[:, columns] -= strength * DIRECTIONS[columns]
    return P


def test_published_images_less_member_like_are_never_used():
    """The issue's finding 1 in small: a shift against the members on a contrast gives the combined test a tiny
    p-value (part 2, two-sided), but the verdict is inconclusive, with the reason in plain words."""
    from cdi.stats.verdict import REASON_AGAINST

    rng = np.random.default_rng(6)
    P, U = against_the_members(150, rng, 0.3, [2]), collinear(150, rng)
    res = audit_test(P, U, directions=DIRECTIONS, permutations=0, alpha=0.01)
    assert res.rejected and res.verdict_p < 1e-4  # the combined test alone would say "used"
    assert 0.01 < res.pooled["prior_p_against"] < 0.5 and res.pooled["rest_share"] > 1.0  # against, not significantly
    assert res.verdict == "inconclusive" and res.verdict_reason == REASON_AGAINST
    # members shifted along their directions: used; no shift: not_detected
    assert audit_test(draw(150, rng, 0.3), draw(150, rng), directions=DIRECTIONS, permutations=0).verdict == "used"
    assert audit_test(draw(150, rng), draw(150, rng), directions=DIRECTIONS, permutations=0).verdict == "not_detected"


def test_significantly_less_member_like_is_inconclusive_even_without_rejection():
    from cdi.stats.verdict import REASON_AGAINST

    rng = np.random.default_rng(7)
    res = audit_test(draw(150, rng, -0.3), draw(150, rng), directions=DIRECTIONS, permutations=0, alpha=0.01)
    assert not res.rejected and res.pooled["prior_p_against"] < 0.01
    assert res.verdict == "inconclusive" and res.verdict_reason == REASON_AGAINST


def test_a_difference_carried_by_the_other_directions_is_not_used():
    """Prior slightly positive, but a shift orthogonal to it carries the combined Z: inconclusive (share < 1/3)."""
    from cdi.stats.verdict import MIN_PRIOR_SHARE

    rng = np.random.default_rng(8)
    P, U = draw(200, rng), draw(200, rng)
    P[:, 6] += 0.8  # the column without a known direction: no member direction moves it
    res = audit_test(P, U, directions=DIRECTIONS, permutations=0, alpha=0.01)
    assert res.rejected and res.verdict == "inconclusive"
    if res.pooled["prior_z"] > 0:
        assert res.pooled["prior_share"] < MIN_PRIOR_SHARE and "known member directions carry" in res.verdict_reason


def test_without_directions_a_rejection_is_not_used():
    from cdi.stats.verdict import REASON_NO_DIRECTIONS

    rng = np.random.default_rng(9)
    res = audit_test(draw(150, rng, 0.4), draw(150, rng), permutations=0)
    assert res.rejected and res.pooled["prior_z"] is None and res.pooled["prior_share"] is None
    assert res.verdict == "inconclusive" and res.verdict_reason == REASON_NO_DIRECTIONS


def feature_table(X, tag):
    from cdi.engine.table import FeatureTable

    return FeatureTable(paths=[f"{tag}{i}.png" for i in range(len(X))], hashes=[f"{tag}{i:063d}" for i in range(len(X))],
                        captions=[None] * len(X), columns=[f"c{i}" for i in range(X.shape[1])], values=X, meta={})


def audit_result(P, U, **options):
    """``cdi audit``'s result from feature rows (analyse_tables + build_result), no model, no shift guard."""
    from cdi.audit.analysis import analyse_tables, build_result
    from cdi.audit.config import AuditConfig

    config = AuditConfig(published="p", unpublished="u", model="m", out="o", sample_size_resamples=0, **options)
    analysis = analyse_tables(feature_table(P, "p"), feature_table(U, "u"), directions=list(DIRECTIONS), config=config)
    return analysis, build_result(analysis, feature_table(P, "p"), feature_table(U, "u"), families=[], feature_spec="",
                                  directions=list(DIRECTIONS), model={}, config=config, timings={})


def test_report_headline_names_its_p_value_and_never_says_at_most_at_the_floor():
    from cdi.reports import render_report

    rng = np.random.default_rng(11)
    P, U = draw(80, rng, 0.9), draw(80, rng)
    for kind in ("permutation", "parametric"):
        _, result = audit_result(P, U, permutations=50, verdict=kind)
        assert result.p_value_kind == kind and result.protocol["permutation_at_floor"]
        html = render_report(result)
        headline = html[html.index('id="verdict-p-kind"'):]
        headline = headline[:headline.index("</span>")]
        assert ("the exact permutation p-value" if kind == "permutation" else "the parametric p-value") in headline
        assert "below 1/(50 + 1)" in headline and "at most this" not in html


def test_the_audit_takes_its_verdict_word_from_the_test():
    """`cdi audit` (analyse_tables + build_result) gives the Python API's decision, and says why."""
    from cdi.audit.result import INCONCLUSIVE_DIRECTION_TEXT

    rng = np.random.default_rng(6)
    P, U = against_the_members(150, rng, 0.3, [2]), collinear(150, rng)
    analysis, result = audit_result(P, U, permutations=0)
    api = audit_test(P, U, directions=DIRECTIONS, permutations=0)
    assert analysis.verdict == api.verdict == "inconclusive"
    assert result.inconclusive_reason == "direction" and result.verdict_text == INCONCLUSIVE_DIRECTION_TEXT
    saved = json.loads(result.to_json())
    assert saved["protocol"]["verdict"] == "inconclusive" and saved["protocol"]["pooled"]["rest_share"] > 1.0


def test_default_permutations_resolve_1e5_under_the_pooled_protocol():
    """Issue 21 item 4: by default the pooled verdict's permutation p-value can go down to 1 / (99,999 + 1) = 1e-5;
    the block protocols keep 1,000 (they refit per permutation). Time: benchmarks/pooled_permutation_speed.py."""
    from cdi.stats.verdict import DEFAULT_PERMUTATIONS, default_permutations

    assert DEFAULT_PERMUTATIONS["pooled"] == 99_999 and default_permutations(None, "sequential") == 1_000
    assert default_permutations(0, "pooled") == 0
    rng = np.random.default_rng(10)
    res = audit_test(draw(60, rng, 0.9), draw(60, rng), directions=DIRECTIONS)
    assert res.permutations == 99_999 and res.permutation_at_floor and res.permutation_p == pytest.approx(1e-5)
    assert res.ttest_p < 1e-5  # the parametric p-value beside it is smaller than the floor
