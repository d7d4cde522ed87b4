"""Null calibration on real model features: no false accusations.

``tests/data/toy_sd_light_features.csv`` holds the 35 default (cdi+clid+sima) features of
every image of the light toy world, produced by

    python benchmarks/toy_features.py --strength light --out tests/data/toy_sd_light_features.csv

Here P and U are both drawn from the non-members (the model never saw
either), 200 times: the verdict test and the permutation test must reject at
the nominal rate (inside the 99% binomial interval at alpha 0.05 and 0.01)
and their p-values must look uniform (KS p > 0.001).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdi.stats.calibration import null_calibration
from cdi.engine.table import FeatureTable
from cdi.features.registry import columns_of, directions_of, resolve_features

TABLE = Path(__file__).parents[1] / "data" / "toy_sd_light_features.csv"


@pytest.fixture(scope="module")
def nonmember_pool():
    table = FeatureTable.from_csv(TABLE)
    families = resolve_features("cdi+clid+sima")
    assert table.columns == columns_of(families)  # text model: k = 4 reduced captions
    rows = [i for i, p in enumerate(table.paths) if p.startswith("nonmembers/")]
    assert len(rows) == 899
    return table.values[rows], directions_of(families)


def test_verdict_test_is_calibrated_on_toy_features(nonmember_pool):
    pool, directions = nonmember_pool
    result = null_calibration(pool, sizes=((50, 50), (100, 60), (150, 150)), audits=200,
                              directions=directions, seed=1)
    assert result.calibrated, result.summary()


def test_permutation_test_is_calibrated_on_toy_features(nonmember_pool):
    pool, directions = nonmember_pool
    result = null_calibration(pool, sizes=((50, 50), (80, 60)), audits=200, permutations=100,
                              directions=directions, seed=2)
    assert "permutation" in result.ks_pvalues
    assert result.calibrated, result.summary()


def test_members_are_detected_on_toy_features(nonmember_pool):
    """The same machinery has power on the light model: P from members is detected at n = 400
    (about 90% of such draws are, see benchmarks/power_toy.py)."""
    from cdi.stats.verdict import audit_test

    table = FeatureTable.from_csv(TABLE)
    pool, directions = nonmember_pool
    members = table.values[[i for i, p in enumerate(table.paths) if p.startswith("members/")]]
    rng = np.random.default_rng(0)
    p = members[rng.choice(len(members), 400, replace=False)]
    u = pool[rng.choice(len(pool), 400, replace=False)]
    result = audit_test(p, u, directions=directions, permutations=0, alpha=0.01, seed=0)
    assert result.rejected and result.verdict_p < 0.01


@pytest.mark.parametrize("n", [100, 300])
def test_pooled_verdict_and_its_permutation_test_are_calibrated_on_toy_features(nonmember_pool, n):
    """The verdict (pooled protocol) and its permutation test: 300 null audits at n per side."""
    pool, directions = nonmember_pool
    result = null_calibration(pool, sizes=((n, n),), audits=300, permutations=199, directions=directions,
                              protocol="pooled", seed=10 + n)
    assert set(result.pvalues) == {"pooled t+F", "permutation"}
    assert result.calibrated, result.summary()


@pytest.mark.parametrize("strength, fraction", [(0.5, 0.6), (0.2, 0.1)])
def test_published_rows_shifted_against_the_members_are_not_used(nonmember_pool, strength, fraction):
    """Issue 21: null rows, the published ones shifted `strength` SD against the member direction on a `fraction`
    of the columns (0.5 SD on 60%: the issue's bar, `used` in 96 of 100 draws before the direction rule). `used` must
    stay within the 99% interval of Binomial(100, 0.01), i.e. at most 4 of 100 draws; the combined test alone rejects
    in far more of them (checked: the experiment has the power to fail). Weaker shifts on few columns are where the rule
    is weakest: docs/notes/issue-21-verdict.md has the whole grid (benchmarks/nuisance_toy.py)."""
    from cdi.stats.calibration import nuisance_rates

    pool, directions = nonmember_pool
    rates = nuisance_rates(pool, directions, n=150, strength=strength, fraction=fraction, draws=100, alpha=0.01,
                           seed=21)
    # the nuisance fools the combined test in > 3x the allowed `used` count: 20 and 32 of 100 with one noise draw per
    # (image, t) (97 and 79 with one per image: the SD-unit shift is a larger Mahalanobis step on correlated columns)
    assert rates.rejected >= 15, rates
    assert rates.ok and rates.high == 4, rates


def test_shifts_orthogonal_to_the_prior_are_rarely_used(nonmember_pool):
    """A shift the known member directions do not see: the combined test rejects in every draw, `used` stays rare
    (README: known limit, measured rates)."""
    from cdi.stats.calibration import nuisance_rates

    pool, directions = nonmember_pool
    rates = nuisance_rates(pool, directions, n=150, strength=0.2, kind="orthogonal", draws=50, alpha=0.01, seed=21)
    assert rates.rejected >= 45 and rates.ok and rates.high == 3, rates


@pytest.mark.parametrize("broken", ["halved", "tail"])
def test_calibration_check_fails_a_protocol_that_rejects_at_twice_alpha(nonmember_pool, monkeypatch, broken):
    """The checks above can fail: the same calibration as the permutation test (same sizes, audits and
    seed), run on a deliberately broken protocol whose p-values are halved -- everywhere ("halved": a
    one-sided p-value reported for a two-sided test) or only below 0.1 ("tail": the distribution looks
    uniform except where the verdict is decided) -- so that it rejects at twice the nominal rate.

    "halved" fails the KS check and the count at 0.05; "tail" leaves KS blind (D = 0.05) and fails on the
    count at 0.05 (19 and 21 rejections of 200, pooled and permutation, against the 99% interval [3, 19]: the
    doubled rate's expected count sits at the interval's top, so which count crosses it is luck). The power of one such
    calibration against tail-only doubling is about 0.53 at 200 audits and 0.81 at 300 (binomial, at
    alpha 0.05); the four calibrations above are independent draws, each a further chance to catch it.
    """
    import dataclasses

    import cdi.stats.calibration as calibration

    real = calibration.audit_test

    def twice_alpha(p):
        return p / 2 if broken == "halved" or p < 0.1 else p

    def broken_audit_test(*args, **kwargs):
        result = real(*args, **kwargs)
        return dataclasses.replace(result, ttest_p=twice_alpha(result.ttest_p),
                                   permutation_p=twice_alpha(result.permutation_p))

    monkeypatch.setattr(calibration, "audit_test", broken_audit_test)
    pool, directions = nonmember_pool
    result = null_calibration(pool, sizes=((50, 50), (80, 60)), audits=200, permutations=100,
                              directions=directions, seed=2)
    assert not result.calibrated
    # at least one count at 0.05 fails (both did on the one-noise-per-image table, 20 and 23; now 19 and 21)
    assert not all(c.ok for c in result.checks if c.alpha == 0.05), result.summary()
    if broken == "halved":
        assert max(result.ks_pvalues.values()) < 1e-10, result.summary()


def test_draw_averaged_verdict_is_calibrated_on_toy_features(nonmember_pool):
    """The audit's default verdict averages two noise draws (cdi.stats.draws): 200 null audits at 100 + 100 on the
    light table and its stored second draw (benchmarks/toy_features.py --draw 1) reject at 0.05 inside the 99%
    binomial interval, and the p-values look uniform."""
    from scipy import stats

    from cdi.stats.verdict import audit_test

    pool, directions = nonmember_pool
    table = FeatureTable.from_csv(TABLE)
    extra = FeatureTable.from_csv(TABLE.with_name("toy_sd_light_draw1_features.csv"))
    assert extra.hashes == table.hashes
    second = table.values.astype(float).copy()
    for k, column in enumerate(extra.columns):
        second[:, table.columns.index(column)] = extra.values[:, k]
    second = second[[i for i, p in enumerate(table.paths) if p.startswith("nonmembers/")]]
    rng = np.random.default_rng(31)
    ps = []
    for _ in range(200):
        rows = rng.permutation(len(pool))[:200]
        p, u = rows[:100], rows[100:]
        ps.append(audit_test(pool[p], pool[u], directions=directions, permutations=0,
                             draws=[(second[p], second[u])]).verdict_p)
    ps = np.array(ps)
    low, high = stats.binom.ppf([0.005, 0.995], 200, 0.05) / 200
    assert low <= np.mean(ps < 0.05) <= high
    assert stats.kstest(ps, "uniform").pvalue > 0.001
