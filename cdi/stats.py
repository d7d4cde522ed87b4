"""The audit's statistical tests, sample-size curve and null calibration.

Question: were the published images ``P`` used to train the model? Null
hypothesis H0: ``P`` and the unpublished images ``U`` are exchangeable for
the model (the model treats them alike); alternative H1: published images
score higher (more member-like).

The verdict protocol (``protocol="sequential"``, the default)
-------------------------------------------------------------
1. ``cdi.scoring`` standardises the features without labels, forms the
   direction-aware prior score (mean of direction-oriented standardised
   features) and splits the images into ``K = folds`` stratified blocks.
   Block 0 is scored by the prior; block 1 by a penalised logistic
   regression trained on block 0; block ``k >= 2`` by either the prior or the
   logistic regression trained on blocks ``0..k-1``, whichever scored the
   already-tested blocks ``1..k-1`` better (see that module's docstring).
   No image's label influences the score it is tested with.
2. In every block the scores are replaced by their normal scores
   ``Phi^-1(rank / (m_k + 1))`` over the block's ``m_k`` images (a
   label-free, order-preserving transformation), and Welch's one-sided
   t-test of "published scores are higher" gives ``t_k`` with
   Welch-Satterthwaite degrees of freedom ``df_k`` and the one-sided p-value
   ``p_k = P(T_df_k >= t_k)``, mapped to ``z_k = Phi^-1(1 - p_k)``.
3. The blocks are combined by Stouffer's method with weights fixed by the
   design, not by the data: ``w_k = sqrt(n1_k n0_k / (n1_k + n0_k))`` (the
   square root of the block's effective sample size),
   ``Z = sum_k w_k z_k / sqrt(sum_k w_k^2)``; the verdict p-value is
   ``1 - Phi(Z)``.

Why this is valid. Under H0, given everything that happened in blocks
``0..k-1``, the score function of block ``k`` is fixed and the labels inside
block ``k`` are exchangeable, so ``z_k`` is (approximately, through the
t-distribution) standard normal whatever happened before. The ``z_k`` form
a martingale-difference sequence, they are uncorrelated, and ``Z`` with fixed
weights is standard normal. ``tests/test_stats.py`` checks calibration by
simulation (rejection rates at 0.05 and 0.01 inside their 99% binomial
intervals, KS test of uniformity), and ``null_calibration`` repeats that
check on any pool of null feature rows (e.g. stored features of a real
model).

Why normal scores. A one-sided t-test on small groups of unequal size is
not calibrated when the scores are skewed, and blocks are small: on
synthetic heavy-tailed, skewed features (1,200 null audits, 25 to 300 images
per side) the Welch t-test on raw block scores rejected 1.8% at alpha 0.01
and 0.6% at alpha 0.001 (KS p = 0.006). Normal scores remove the skew
whatever the features look like, and lose nothing when the scores are
already normal (van der Waerden's test has asymptotic relative efficiency 1
against the t-test under normality and at least 1 otherwise).

Why this protocol. The CDI reference (``protocol="crossfit"``: 5-fold
cross-fitted logistic regression, one Welch t-test on all out-of-fold
scores) rejects too often under H0 (REFERENCE.md section 7: about 9% at
alpha 0.05; our simulation: 3.7% at alpha 0.01), because out-of-fold scores
of scorers trained on overlapping data are not independent. A half/half
split (fit on one half, test the other) is calibrated but tests half of the
images with a scorer learned from the other half, and at a few hundred
images a learned scorer loses much of the power that a fixed
direction-aware combination keeps. The sequential protocol tests every
image once, has the prior's power where the prior is the better score and
the learned scorer's where learning pays, and keeps every test statistic on
images that trained nothing it depends on.

Permutation p-value (reported beside the verdict). The labels are shuffled
within blocks (keeping every block's class counts) and the whole procedure
(fits, block t-tests, combination) is re-run for every shuffle:
``p = (1 + #{b: Z_b >= Z}) / (1 + B)``. This is exact under exchangeability
for any scorer and protocol, at the cost of ``B`` re-runs (batched: see
``cdi.scoring.fit_logistic``). Under ``protocol="crossfit"`` the t-test is
not calibrated, so the verdict is the permutation p-value.

Effect size: Hedges' g (bias-corrected Cohen's d) of published versus
unpublished scores, and the AUC (probability that a published image scores
higher than an unpublished one, ties counting one half). Under
``"sequential"`` both are computed within every block on the scorer's raw
output and averaged with the block weights (scores of different blocks
come from different scorers); under ``"crossfit"`` on the pooled
out-of-fold scores. They describe the separation and do not enter the
p-value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy import special, stats

from cdi.errors import CDIError
from cdi.scoring import (
    CrossFit,
    ScoringResult,
    check_directions,
    check_features,
    minimum_images,
    normal_scores,
    welch_t,
    z_from_t,
)

#: Label vectors fitted together in one batch of the permutation test.
PERMUTATION_CHUNK = 200

#: One paragraph per protocol, for reports (the module docstring has the details).
PROTOCOL_DESCRIPTIONS = {
    "sequential": (
        "Features are standardised on all images without labels. The images are split into K stratified "
        "blocks. Block 0 is scored by the direction-aware prior (mean of the standardised features, each "
        "oriented so that higher means member); block 1 by a penalised logistic regression trained on "
        "block 0; every later block by either the prior or the logistic regression trained on all earlier "
        "blocks, whichever scored the blocks already tested better. No image's label influences the score "
        "it is tested with. In each block, Welch's one-sided t-test (published higher) on the block's "
        "rank-based normal scores gives a p-value; the blocks are combined by Stouffer's method with "
        "weights fixed by the block sizes. The verdict p-value is this combination; it is calibrated under "
        "the null hypothesis (checked by simulation). The permutation p-value repeats the whole procedure "
        "with labels shuffled within blocks and is exact."
    ),
    "crossfit": (
        "The CDI reference protocol: K-fold cross-fitted logistic regression gives every image an "
        "out-of-fold score, and one Welch t-test compares published and unpublished scores. That t-test "
        "rejects too often under the null hypothesis (out-of-fold scores are not independent), so the "
        "verdict p-value is the permutation p-value, which repeats the whole cross-fitting with labels "
        "shuffled within folds and is exact."
    ),
}

LN10 = math.log(10.0)


# --------------------------------------------------------------------------
# Welch's t-test, one-sided, for many columns at once
# --------------------------------------------------------------------------


@dataclass
class WelchResult:
    """Welch's one-sided two-sample t-test, H1: mean(a) > mean(b)."""

    statistic: float
    df: float
    pvalue: float
    log_pvalue: float


def welch_one_sided(a: np.ndarray, b: np.ndarray) -> WelchResult:
    """Welch's t-test of H1: mean(a) > mean(b) (``scipy.stats.ttest_ind(equal_var=False, alternative="greater")``)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 2 or len(b) < 2:
        raise CDIError("Welch's t-test needs at least 2 values in each group")
    S = np.concatenate([a, b])[:, None]
    Y = np.r_[np.ones(len(a)), np.zeros(len(b))][:, None]
    t, df = welch_t(S, Y)
    logp = float(stats.t.logsf(t, df)[0])
    return WelchResult(statistic=float(t[0]), df=float(df[0]), pvalue=math.exp(logp), log_pvalue=logp)


def permutation_pvalue(count: int, permutations: int) -> float:
    """``(1 + count) / (1 + permutations)``: the exact permutation p-value.

    ``count`` is the number of permuted statistics at least as large as the
    observed one. Counting the observed labelling as one of the
    permutations makes the p-value valid (never below its nominal level)
    for any number of permutations.
    """
    if permutations < 0 or not 0 <= count <= permutations:
        raise ValueError(f"need 0 <= count <= permutations, got {count} and {permutations}")
    return (1.0 + count) / (1.0 + permutations)


def hedges_g(a: np.ndarray, b: np.ndarray) -> float:
    """Hedges' g: Cohen's d with the pooled SD, times 1 - 3 / (4 (n_a + n_b) - 9)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    pooled = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    if pooled <= 0:
        return 0.0 if a.mean() == b.mean() else math.copysign(math.inf, a.mean() - b.mean())
    return float((a.mean() - b.mean()) / math.sqrt(pooled) * (1.0 - 3.0 / (4.0 * (na + nb) - 9.0)))


def auc(a: np.ndarray, b: np.ndarray) -> float:
    """P(score of a random ``a`` > one of a random ``b``), ties counting 1/2."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ranks = stats.rankdata(np.concatenate([a, b]))
    return float((ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2.0) / (len(a) * len(b)))


# --------------------------------------------------------------------------
# the protocol's test statistic, for many label vectors at once
# --------------------------------------------------------------------------


@dataclass
class BlockTest:
    """Welch's one-sided t-test within one block (sequential protocol)."""

    block: int
    n_published: int
    n_unpublished: int
    statistic: float
    df: float
    pvalue: float
    weight: float
    scored_by: str


def protocol_statistic(crossfit: CrossFit, S: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, list]:
    """The protocol's test statistic on the normal scale, one per column of ``S``.

    Returns ``Z`` (B,), whose one-sided p-value is ``1 - Phi(Z)``, and the
    parts ``[(block or None, t (B,), df (B,))]``. Sequential: Stouffer
    combination, with the fixed weights ``crossfit.block_weights``, of the
    blocks' Welch tests on within-block normal scores
    (``cdi.scoring.block_z``). Crossfit: one Welch test on all raw
    out-of-fold scores (the reference).
    """
    if crossfit.protocol == "crossfit":
        t, df = welch_t(S, Y)
        return z_from_t(t, df), [(None, t, df)]
    total = np.zeros(S.shape[1])
    parts = []
    for k, w in crossfit.block_weights.items():
        rows = crossfit.blocks == k
        t, df = welch_t(normal_scores(S[rows]), Y[rows])
        total += w * z_from_t(t, df)
        parts.append((k, t, df))
    return total / math.sqrt(sum(w * w for w in crossfit.block_weights.values())), parts


# --------------------------------------------------------------------------
# the audit's test
# --------------------------------------------------------------------------


@dataclass
class TestResult:
    """Everything the audit's test computed; ``to_dict()`` is JSON-able.

    ``verdict_p`` is the p-value the verdict rests on: the protocol's t-test
    (``verdict_test="t-test"``) under ``"sequential"``, the permutation test
    under ``"crossfit"``. ``*_log10_p`` keep the precision of p-values that
    underflow a float (below about 1e-308). ``rejected`` is
    ``verdict_p < alpha``.
    """

    __test__ = False  # not a pytest class

    verdict_p: float
    verdict_log10_p: float
    verdict_test: str
    rejected: bool
    alpha: float
    ttest_p: float
    ttest_log10_p: float
    statistic: float
    df: float | None
    permutation_p: float | None
    permutations: int
    permutation_count: int | None
    effect_size: float
    effect_size_kind: str
    auc: float
    n_published: int
    n_unpublished: int
    n_tested_published: int
    n_tested_unpublished: int
    protocol: str
    scorer: str
    folds: int
    seed: int
    penalty: float
    prior_used: bool
    blocks: list[BlockTest]
    scores_published: np.ndarray
    scores_unpublished: np.ndarray
    scoring: ScoringResult = field(repr=False)

    def to_dict(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            if key == "scoring":
                out[key] = value.to_dict()
            elif key == "blocks":
                out[key] = [asdict(b) for b in value]
            elif isinstance(value, np.ndarray):
                out[key] = [None if not np.isfinite(v) else float(v) for v in value]
            elif isinstance(value, (np.floating, np.integer, np.bool_)):
                out[key] = value.item()
            else:
                out[key] = value
        return out


def _validate_common(alpha: float, permutations: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise CDIError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if int(permutations) != permutations or permutations < 0:
        raise CDIError(f"permutations must be a non-negative integer, got {permutations}")


def audit_test(
    X_published: np.ndarray,
    X_unpublished: np.ndarray,
    *,
    directions: np.ndarray | Sequence[int] | None = None,
    scorer: str = "logistic",
    folds: int = 5,
    permutations: int = 1000,
    alpha: float = 0.01,
    seed: int = 0,
    protocol: str = "sequential",
    penalty: float | None = None,
    columns: Sequence[str] | None = None,
) -> TestResult:
    """Test whether the published images score higher than the unpublished ones.

    Parameters
    ----------
    X_published, X_unpublished : ndarray (n_p, d), (n_u, d)
        Feature rows of the published and unpublished images.
    directions : ndarray (d,) of {-1, 0, +1}, optional
        Member direction of every column (``features.registry.directions_of``);
        enables the prior score, which is where most of the power at small
        sizes comes from.
    scorer : {"logistic", "xgboost"}
    folds : int
        Number of blocks K (at least ``cdi.scoring.MIN_PER_BLOCK`` images of
        each class per block).
    permutations : int
        Permutations of the reported permutation test (0: skip it; not
        allowed with ``protocol="crossfit"``, whose verdict it is). The
        logistic scorer fits all permutations together (1,000 on 10,000 +
        10,000 images: about 11 s on 2 busy cores,
        ``benchmarks/permutation_speed.py``); ``scorer="xgboost"`` refits
        the trees for every permutation and block (about 0.3 s per fit on
        16,000 images), so ask for far fewer permutations there.
    alpha : float
        Significance level of ``rejected``.
    seed : int
        Fixes the blocks and the permutations.
    protocol : {"sequential", "crossfit"}
        See the module docstring.
    penalty : float, optional
        L2 penalty of the logistic scorer (1/C); default
        ``cdi.scoring.DEFAULT_PENALTY[protocol]``.
    columns : list of str, optional
        Feature names, used in messages and coefficients.
    """
    _validate_common(alpha, permutations)
    if protocol == "crossfit" and permutations == 0:
        raise CDIError(
            "protocol 'crossfit' takes its verdict from the permutation test (its t-test is not "
            "calibrated); ask for permutations (e.g. 1000) or use protocol 'sequential'"
        )
    X, y, columns = check_features(X_published, X_unpublished, columns)
    crossfit = CrossFit(X, y, scorer=scorer, folds=folds, seed=seed, directions=directions,
                        protocol=protocol, penalty=penalty, columns=columns)
    raw, scoring = crossfit.observe()
    z_obs, parts = protocol_statistic(crossfit, raw[:, None], y[:, None])
    z_obs = float(z_obs[0])
    log_p = float(special.log_ndtr(-z_obs))

    perm_p, count = None, None
    if permutations:
        count = _permutation_count(crossfit, z_obs, int(permutations), seed)
        perm_p = permutation_pvalue(count, int(permutations))

    scores = scoring.scores
    effect_size, area = _separation(crossfit, raw, y)

    blocks = []
    if protocol == "sequential":
        for (k, t, df), scorer_name in zip(parts, [scoring.block_scorers[k] for k, _, _ in parts]):
            rows = crossfit.blocks == k
            blocks.append(BlockTest(
                block=k,
                n_published=int(y[rows].sum()),
                n_unpublished=int((1 - y[rows]).sum()),
                statistic=float(t[0]),
                df=float(df[0]),
                pvalue=float(math.exp(stats.t.logsf(t[0], df[0]))),
                weight=crossfit.block_weights[k],
                scored_by=scorer_name if scorer_name == "prior" else f"{scorer_name} fitted on blocks 0..{k - 1}",
            ))
        df_total = None
    else:
        df_total = float(parts[0][2][0])

    if protocol == "crossfit":
        verdict_p, verdict_log10, verdict_test = perm_p, math.log10(perm_p), "permutation"
    else:
        verdict_p, verdict_log10, verdict_test = math.exp(log_p), log_p / LN10, "t-test"
    return TestResult(
        verdict_p=verdict_p,
        verdict_log10_p=verdict_log10,
        verdict_test=verdict_test,
        rejected=bool(verdict_p < alpha),
        alpha=float(alpha),
        ttest_p=math.exp(log_p),
        ttest_log10_p=log_p / LN10,
        statistic=z_obs if protocol == "sequential" else float(parts[0][1][0]),
        df=df_total,
        permutation_p=perm_p,
        permutations=int(permutations),
        permutation_count=count,
        effect_size=effect_size,
        effect_size_kind="hedges_g",
        auc=area,
        n_published=int(y.sum()),
        n_unpublished=int((1 - y).sum()),
        n_tested_published=int(np.sum((y == 1) & crossfit.tested)),
        n_tested_unpublished=int(np.sum((y == 0) & crossfit.tested)),
        protocol=protocol,
        scorer=scorer,
        folds=int(folds),
        seed=int(seed),
        penalty=crossfit.penalty,
        prior_used=crossfit.prior is not None,
        blocks=blocks,
        scores_published=scores[y == 1],
        scores_unpublished=scores[y == 0],
        scoring=scoring,
    )


def _separation(crossfit: CrossFit, raw: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Hedges' g and AUC of published versus unpublished scores.

    Sequential: the mean over tested blocks, with the blocks' weights, of
    each block's g and AUC on its raw scores (a block's scores come from one
    scorer, so its g is on one scale). Crossfit: pooled out-of-fold scores.
    """
    if crossfit.protocol == "crossfit":
        return hedges_g(raw[y == 1], raw[y == 0]), auc(raw[y == 1], raw[y == 0])
    g = a = total = 0.0
    for k, w in crossfit.block_weights.items():
        rows = crossfit.blocks == k
        s, lab = raw[rows], y[rows]
        g += w * hedges_g(s[lab == 1], s[lab == 0])
        a += w * auc(s[lab == 1], s[lab == 0])
        total += w
    return g / total, a / total


def _permutation_count(crossfit: CrossFit, z_obs: float, permutations: int, seed: int) -> int:
    """How many within-block label shuffles give a statistic >= the observed one.

    Shuffles are drawn in chunks of ``PERMUTATION_CHUNK`` from one seeded
    generator, so the first ``B`` shuffles are the same whatever the total.
    A permuted statistic within 1e-9 (relative) of the observed one counts
    as at least as large (ties resolved conservatively).
    """
    rng = np.random.default_rng([int(seed), 0x9E57])
    threshold = z_obs - 1e-9 * (1.0 + abs(z_obs))
    count, done = 0, 0
    while done < permutations:
        chunk = min(PERMUTATION_CHUNK, permutations - done)
        Y = crossfit.permuted_labels(rng, chunk)
        z, _ = protocol_statistic(crossfit, crossfit.scores(Y), Y)
        count += int(np.sum(z >= threshold))
        done += chunk
    return count


# --------------------------------------------------------------------------
# how many images are needed
# --------------------------------------------------------------------------


@dataclass
class SampleSizeCurve:
    """Verdict p-values on random subsets of increasing size.

    ``sizes`` counts published images; every subset keeps the ratio of
    unpublished to published images of the full audit. ``n_needed`` is the
    smallest size from which on every larger size on the grid reaches
    ``share_significant >= power`` (None if the full size does not).
    """

    sizes: list[int]
    unpublished_sizes: list[int]
    median_p: list[float]
    share_significant: list[float]
    n_needed: int | None
    alpha: float
    power: float
    resamples: int
    seed: int
    protocol: str
    pvalues: list[list[float]] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def default_sizes(minimum: int, maximum: int, points: int = 8) -> list[int]:
    """Geometric grid of integer sizes from ``minimum`` to ``maximum``."""
    if maximum <= minimum:
        return [maximum]
    grid = np.geomspace(minimum, maximum, points)
    return sorted({int(round(v)) for v in grid} | {minimum, maximum})


def sample_size_curve(
    X_published: np.ndarray,
    X_unpublished: np.ndarray,
    *,
    directions: np.ndarray | Sequence[int] | None = None,
    alpha: float = 0.01,
    sizes: Sequence[int] | None = None,
    resamples: int = 50,
    seed: int = 0,
    scorer: str = "logistic",
    folds: int = 5,
    penalty: float | None = None,
    power: float = 0.9,
    columns: Sequence[str] | None = None,
) -> SampleSizeCurve:
    """How the verdict p-value depends on the number of images.

    For every size ``m`` (published images) draw ``resamples`` subsets of
    ``m`` published and ``round(m * n_u / n_p)`` unpublished images without
    replacement, run the verdict test (sequential protocol, no permutations)
    with a fresh block seed each time, and record the median p-value and the
    share of subsets with ``p < alpha``.

    The default grid is geometric from the smallest size the blocks allow to
    the full size (8 points).
    """
    _validate_common(alpha, 0)
    if int(resamples) != resamples or resamples < 1:
        raise CDIError(f"resamples must be a positive integer, got {resamples}")
    if not 0.0 < power <= 1.0:
        raise CDIError(f"power must lie in (0, 1], got {power}")
    X, y, columns = check_features(X_published, X_unpublished, columns)
    directions = check_directions(directions, X.shape[1])
    P, U = X[y == 1], X[y == 0]
    ratio = len(U) / len(P)
    need = minimum_images(folds)
    smallest = max(need, int(math.ceil(need / ratio)))
    if smallest > len(P) or round(len(P) * ratio) < need:
        raise CDIError(
            f"too few images for a sample-size curve with folds={folds}: need at least {need} published "
            f"and {need} unpublished images, got {len(P)} and {len(U)}"
        )
    if sizes is None:
        sizes = default_sizes(smallest, len(P))
    sizes = sorted({int(s) for s in sizes})
    if sizes[0] < smallest or sizes[-1] > len(P):
        raise CDIError(
            f"sizes must lie between {smallest} and {len(P)} published images (folds={folds} needs "
            f"{need} images of each class), got {sizes[0]}..{sizes[-1]}"
        )
    rng = np.random.default_rng([int(seed), 0x55C])
    u_sizes, medians, shares, pvalues = [], [], [], []
    for m in sizes:
        mu = max(need, min(len(U), int(round(m * ratio))))
        ps = []
        for r in range(int(resamples)):
            pi = rng.choice(len(P), size=m, replace=False)
            ui = rng.choice(len(U), size=mu, replace=False)
            res = audit_test(P[pi], U[ui], directions=directions, scorer=scorer, folds=folds,
                             permutations=0, alpha=alpha, seed=int(rng.integers(2**31)),
                             protocol="sequential", penalty=penalty, columns=columns)
            ps.append(res.verdict_p)
        ps = np.asarray(ps)
        u_sizes.append(mu)
        medians.append(float(np.median(ps)))
        shares.append(float(np.mean(ps < alpha)))
        pvalues.append([float(p) for p in ps])
    n_needed = None
    for i in range(len(sizes) - 1, -1, -1):
        if shares[i] >= power:
            n_needed = sizes[i]
        else:
            break
    return SampleSizeCurve(sizes=sizes, unpublished_sizes=u_sizes, median_p=medians,
                           share_significant=shares, n_needed=n_needed, alpha=float(alpha),
                           power=float(power), resamples=int(resamples), seed=int(seed),
                           protocol="sequential", pvalues=pvalues)


# --------------------------------------------------------------------------
# null calibration
# --------------------------------------------------------------------------


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
    protocol: str = "sequential",
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
    ``ks_level``. Checks the verdict's t-test (sequential protocol) and, with
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
    names = ["t-test"] + (["permutation"] if permutations else [])
    if protocol == "crossfit":
        names = ["t-test (crossfit)"] + (["permutation"] if permutations else [])
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
