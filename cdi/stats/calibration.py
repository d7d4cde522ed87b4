"""Null calibration: many audits in which the null hypothesis holds by construction.

``null_calibration``: P and U drawn from one pool of null rows. ``nuisance_rates``: the same, with the
published rows shifted by something other than training (issue 21): how often the verdict says ``used``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from cdi.utils.errors import CDIError
from cdi.stats.verdict import audit_test


@dataclass
class CalibrationCheck:
    """Rejection rate of one p-value at one level, against Binomial(audits, alpha)."""

    test: str
    alpha: float
    rejections: int
    audits: int
    low: int
    high: int

    @property
    def rate(self) -> float:
        return self.rejections / self.audits

    @property
    def ok(self) -> bool:
        return self.low <= self.rejections <= self.high


@dataclass
class NullCalibration:
    """Outcome of many audits in which P and U come from the same pool.

    ``checks``: for every test and level, the number of rejections and the
    central 99% interval of Binomial(audits, alpha) it must fall in.
    ``ks_pvalues``: KS test of uniformity of every test's p-values.
    ``calibrated``: all rejection counts inside their intervals and every
    KS p-value above ``ks_level``.
    """

    pvalues: dict[str, np.ndarray]
    checks: list[CalibrationCheck]
    ks_pvalues: dict[str, float]
    ks_level: float
    sizes: list[tuple[int, int]]

    @property
    def calibrated(self) -> bool:
        return all(c.ok for c in self.checks) and all(p > self.ks_level for p in self.ks_pvalues.values())

    def summary(self) -> str:
        lines = []
        for c in self.checks:
            lines.append(f"{c.test:12s} alpha={c.alpha:<5} rejected {c.rejections}/{c.audits} "
                         f"({c.rate:.3f}); 99% interval [{c.low}, {c.high}] {'ok' if c.ok else 'FAIL'}")
        for name, p in self.ks_pvalues.items():
            lines.append(f"{name:12s} KS uniformity p={p:.3g} {'ok' if p > self.ks_level else 'FAIL'}")
        return "\n".join(lines)


def null_calibration(
    pool: np.ndarray,
    *,
    sizes: Sequence[tuple[int, int]] = ((50, 50), (120, 80), (60, 300), (300, 300)),
    audits: int = 200,
    alphas: Sequence[float] = (0.05, 0.01),
    permutations: int = 0,
    directions: np.ndarray | Sequence[int] | None = None,
    scorer: str = "logistic",
    folds: int = 5,
    protocol: str = "pooled",
    penalty: float | None = None,
    seed: int = 0,
    interval: float = 0.99,
    ks_level: float = 0.001,
) -> NullCalibration:
    """Run ``audits`` audits whose P and U are disjoint random draws from ``pool``.

    Audit ``i`` draws ``sizes[i % len(sizes)] = (n_published, n_unpublished)``
    rows without replacement. Since P and U come from the same rows the null
    hypothesis holds, so every p-value should be uniform: its rejection count
    at each ``alpha`` must lie in the central ``interval`` of
    Binomial(audits, alpha), and a KS test must not reject uniformity at
    ``ks_level``. Checks the protocol's parametric p-value (the verdict's) and, with
    ``permutations > 0``, the permutation p-value.

    Use it on any pool of feature rows known to be null, for example the
    unpublished images of a real audit or held-out images of a toy model.

    The audits walk through the shuffled pool in disjoint slices and
    reshuffle when it is used up, so audits of one pass share no rows. Audits
    of different passes do, which makes their p-values slightly dependent and
    the binomial interval somewhat too narrow: use a pool many times larger
    than one audit. (On synthetic data, 1,200 audits drawn with overlap from
    a pool 10 times one audit's size sat at the edge of the interval at
    alpha 0.01, while 2,000 audits on fresh data rejected 1.05%.)
    """
    pool = np.asarray(pool, dtype=np.float64)
    if pool.ndim != 2:
        raise CDIError(f"the null pool must be a 2-D array (images x features), got shape {pool.shape}")
    biggest = max(a + b for a, b in sizes)
    if biggest > len(pool):
        raise CDIError(f"the null pool has {len(pool)} rows but an audit of sizes {sizes} needs {biggest}")
    rng = np.random.default_rng([int(seed), 0xCA1])
    first = {"pooled": "pooled t+F", "sequential": "t-test", "crossfit": "t-test (crossfit)"}.get(protocol, protocol)
    names = [first] + (["permutation"] if permutations else [])
    collected: dict[str, list[float]] = {n: [] for n in names}
    order, used = rng.permutation(len(pool)), 0
    for i in range(int(audits)):
        n1, n0 = sizes[i % len(sizes)]
        if used + n1 + n0 > len(pool):  # next pass over the pool
            order, used = rng.permutation(len(pool)), 0
        rows = order[used:used + n1 + n0]
        used += n1 + n0
        res = audit_test(pool[rows[:n1]], pool[rows[n1:]], directions=directions, scorer=scorer,
                         folds=folds, permutations=permutations, alpha=0.05, seed=int(rng.integers(2**31)),
                         protocol=protocol, penalty=penalty)
        collected[names[0]].append(res.ttest_p)
        if permutations:
            collected["permutation"].append(res.permutation_p)
    pvalues = {k: np.asarray(v) for k, v in collected.items()}
    checks = []
    tail = (1.0 - interval) / 2.0
    for name, ps in pvalues.items():
        for a in alphas:
            low = int(stats.binom.ppf(tail, audits, a))
            high = int(stats.binom.isf(tail, audits, a))
            checks.append(CalibrationCheck(test=name, alpha=float(a), rejections=int(np.sum(ps < a)),
                                           audits=int(audits), low=low, high=high))
    ks = {name: float(stats.kstest(ps, "uniform").pvalue) for name, ps in pvalues.items()}
    return NullCalibration(pvalues=pvalues, checks=checks, ks_pvalues=ks, ks_level=float(ks_level),
                           sizes=[tuple(s) for s in sizes])


@dataclass
class NuisanceRates:
    """Outcome of ``nuisance_rates``: how often a difference that is NOT training gives each answer."""

    kind: str
    strength: float
    fraction: float
    n: int
    draws: int
    alpha: float
    used: int  # verdict word "used"
    inconclusive: int
    rejected: int  # the combined (pooled) test alone rejected at alpha
    high: int  # upper end of the central 99% interval of Binomial(draws, alpha): "used" must not exceed it

    @property
    def ok(self) -> bool:
        return self.used <= self.high


def nuisance_rates(
    pool: np.ndarray,
    directions: np.ndarray | Sequence[int],
    *,
    n: int,
    strength: float,
    kind: str = "against",
    fraction: float = 1.0,
    draws: int = 100,
    alpha: float = 0.01,
    seed: int = 0,
    interval: float = 0.99,
    draw_pools: Sequence[np.ndarray] = (),
) -> NuisanceRates:
    """Null audits whose published rows are shifted in feature space by something other than training.

    Every draw takes P and U (``n`` rows each, disjoint) from ``pool``, rows
    known to be null (e.g. non-members), and shifts the rows of P:

    * ``kind="against"``: by ``strength`` column SDs *against* the member
      direction on a random ``fraction`` of the columns with a known direction
      (published images made less member-like: issue 21, finding 1);
    * ``kind="orthogonal"``: along a random direction orthogonal to the
      prior's (in units of column SDs, length ``strength * sqrt(d)``, i.e.
      as large as a shift of ``strength`` SD on every column): a difference
      the known member directions do not see.

    Counts the draws whose verdict word is ``used`` and ``inconclusive``, and
    those where the combined pooled test alone rejects at ``alpha``. Since
    no draw is a training effect, ``used`` should stay within the central
    ``interval`` of Binomial(draws, alpha) (``NuisanceRates.ok``).
    ``draw_pools``: the same rows' further noise draws (``audit_test``'s
    ``draws``), shifted like the first: the shift is a property of the images.
    """
    if kind not in ("against", "orthogonal"):
        raise CDIError(f"kind must be 'against' or 'orthogonal', got {kind!r}")
    pool = np.asarray(pool, dtype=np.float64)
    extra = [np.asarray(d, dtype=np.float64) for d in draw_pools]
    directions = np.asarray(directions, dtype=np.float64)
    if 2 * n > len(pool):
        raise CDIError(f"the pool has {len(pool)} rows; two collections of {n} need {2 * n}")
    sd = pool.std(axis=0)
    known = np.flatnonzero(directions != 0)
    rng = np.random.default_rng([int(seed), int(n), int(round(strength * 1000)), int(round(fraction * 1000)),
                                 0 if kind == "against" else 1])
    used = inconclusive = rejected = 0
    for _ in range(int(draws)):
        rows = rng.permutation(len(pool))[:2 * n]
        shift = np.zeros(len(directions))
        if kind == "against":
            cols = rng.choice(known, max(1, int(round(fraction * len(known)))), replace=False)
            shift[cols] = -strength * sd[cols] * directions[cols]
        else:
            unit = directions / np.linalg.norm(directions)
            v = rng.standard_normal(len(directions))
            v -= (v @ unit) * unit
            shift = strength * math.sqrt(len(directions)) * sd * v / np.linalg.norm(v)
        P, U = pool[rows[:n]] + shift, pool[rows[n:]]
        res = audit_test(P, U, directions=directions, permutations=0, alpha=alpha,
                         draws=[(d[rows[:n]] + shift, d[rows[n:]]) for d in extra])
        used += res.verdict == "used"
        inconclusive += res.verdict == "inconclusive"
        rejected += bool(res.rejected)
    high = int(stats.binom.isf((1.0 - interval) / 2.0, draws, alpha))
    return NuisanceRates(kind=kind, strength=float(strength), fraction=float(fraction), n=int(n), draws=int(draws),
                         alpha=float(alpha), used=used, inconclusive=inconclusive, rejected=rejected, high=high)
