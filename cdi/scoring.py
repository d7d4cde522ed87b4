"""The audit's scoring model: from per-image feature rows to per-image scores.

An audit has a feature row for every published image (``P``, label 1) and
every unpublished image (``U``, label 0). This module turns them into one
score per image such that a one-sided two-sample test on the scores
(``cdi.stats``) is a valid test of "P was used in training". Everything is
deterministic given ``seed``.

The pieces, in order
--------------------
1. **Validation.** Both matrices must be finite, 2-D and have the same
   columns; a NaN or inf is a ``CDIError`` that names the columns.
2. **Standardisation without labels.** Every column is centred and scaled by
   the mean and standard deviation of the pooled rows ``P + U``. The labels
   are not used, so the transformation is the same for the observed labels
   and for every permutation of them and leaks nothing about the labels of
   a held-out block. Constant columns become zero (harmless).
3. **Direction-aware prior score** (when ``directions`` is given). Every
   audit feature has a known member direction (+1: higher = member, -1:
   lower = member, 0: unknown). The prior score of an image is the mean of
   ``direction_j * z_j`` over the columns with a known direction: a fixed
   combination that needs no labels. REFERENCE.md section 7 measured that at
   a few hundred images such a combination keeps far more power than a
   learned scorer.
4. **Blocks.** The images are split into ``K = folds`` blocks, stratified:
   published and unpublished images are each shuffled with ``seed`` and dealt
   round-robin, so every block holds the same share of each class (unequal
   ``|P|`` and ``|U|`` are fine).
5. **Learned scorer.** ``scorer="logistic"``: L2-penalised logistic regression
   on ``[1, prior, z_1..z_d]``; the feature coefficients carry the penalty
   (``penalty`` is scikit-learn's ``1/C``), the intercept is free and the
   prior's coefficient is free but constrained to be >= 0, so a small noisy
   training set cannot turn the prior upside down. With little data the
   penalty keeps the feature coefficients near zero and the scorer follows
   the prior; with more data the features' own weights take over.
   ``scorer="xgboost"``: gradient-boosted trees on ``[prior, z_1..z_d]``.

Protocols (which images train the scorer of which block)
--------------------------------------------------------
``"sequential"`` (default; the verdict protocol). Blocks are visited in order
``0..K-1``, and the score of block ``k`` is fixed before any label of block
``k`` (or of a later block) is used:

* block 0 is scored by the prior score;
* block 1 by the learned scorer trained on block 0;
* block ``k >= 2`` by one of two candidates, the prior score or the learned
  scorer trained on blocks ``0..k-1``: the one with the better record on the
  blocks already tested, i.e. the larger ``sum_{j=1..k-1} w_j z_j`` where
  ``z_j`` is the candidate's block statistic on block ``j`` (``block_z``:
  Welch's t-test on the block's rank-based normal scores, as a normal
  deviate) and ``w_j`` the block's fixed weight; ties go to the prior.

So every image is tested exactly once, by a score that its own label never
influenced. Under the null hypothesis each block's statistic is, given
everything before it, a two-sample statistic on exchangeable images, and
``cdi.stats`` combines the blocks with fixed weights (Stouffer). The choice
between the candidates matters because which one is better depends on the
data: simulations (``tests/test_stats.py`` and the report of task F) show
the prior winning when the member effect is spread over many columns in
their known directions, the learned scorer winning when a large shared
nuisance (image difficulty) must be contrasted away, and the sequential
choice close to the better of the two in both cases.
Without ``directions`` there is no prior: block 0 only trains and every
later block is scored by the learned scorer (with ``folds=2``: the classical
half/half sample split).

``"crossfit"`` (the CDI reference, for comparison with published numbers).
K-fold cross-fitting, no prior: every block is scored by a scorer trained on
all other blocks, so every image gets an out-of-fold score. Out-of-fold
scores of scorers trained on overlapping data are not independent, and a
t-test on them rejects too often under the null (REFERENCE.md section 7:
about 9% at alpha 0.05); ``cdi.stats`` takes this protocol's verdict from
the permutation test instead.

Permutations
------------
``CrossFit.permuted_labels`` shuffles the labels *within* blocks, keeping
every block's counts of published and unpublished images, and
``CrossFit.scores`` re-runs everything label-dependent (fits, the candidate
choice) for many label vectors at once. For the logistic scorer all label
vectors are fitted together by ``fit_logistic``, which reuses the Gram
matrix of each training set and reaches the same penalised optimum as a
one-at-a-time fit (to 1e-10 on the coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import special, stats
from threadpoolctl import threadpool_limits

from cdi.errors import CDIError

SCORERS = ("logistic", "xgboost")
PROTOCOLS = ("sequential", "crossfit")

#: Fewest images of each class that every block must hold: a block's Welch
#: t-test needs a variance per class, and a scorer needs both classes.
MIN_PER_BLOCK = 5

#: Default L2 penalty (1/C) on the standardised feature coefficients, per
#: protocol. Sequential: 3, the best all-round value of the simulations in
#: the task F report (1 favours learning, 10+ favours the prior).
#: Crossfit: 1, scikit-learn's default as in the CDI reference code.
DEFAULT_PENALTY = {"sequential": 3.0, "crossfit": 1.0}

#: Ridge on the intercept and on the prior's coefficient: tiny, so both are
#: practically free, but it keeps the optimum finite when a small training
#: set is perfectly separated by the prior.
FREE_PENALTY = {"intercept": 1e-8, "prior": 1e-3}

#: XGBoost settings of the optional tree scorer (small, shallow, seeded).
XGBOOST_PARAMS = dict(
    n_estimators=100,
    max_depth=3,
    learning_rate=0.1,
    subsample=0.8,
    colsample_bytree=0.8,
    reg_lambda=1.0,
    tree_method="hist",
    n_jobs=1,
)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def column_names(n_columns: int, columns: Sequence[str] | None) -> list[str]:
    """The given column names, or ``feature_0..`` when there are none."""
    if columns is None:
        return [f"feature_{j}" for j in range(n_columns)]
    columns = [str(c) for c in columns]
    if len(columns) != n_columns:
        raise CDIError(f"got {len(columns)} column names for {n_columns} feature columns")
    return columns


def check_finite(X: np.ndarray, columns: Sequence[str], name: str) -> None:
    """``CDIError`` naming the columns of ``X`` that hold NaN or infinite values."""
    bad = ~np.isfinite(X)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0))
        listing = ", ".join(f"{columns[j]} ({int(bad[:, j].sum())} rows)" for j in cols[:10])
        more = f" and {len(cols) - 10} more" if len(cols) > 10 else ""
        raise CDIError(
            f"{name} features contain NaN or infinite values in {len(cols)} column(s): {listing}{more}; "
            "re-extract the features of the affected images (or drop those columns) before testing"
        )


def check_features(
    X_published: np.ndarray,
    X_unpublished: np.ndarray,
    columns: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate the two feature matrices and stack them.

    Returns
    -------
    X : ndarray of shape (n_published + n_unpublished, d), float64
        Published rows first.
    y : ndarray of shape (n,), int8
        1 for published, 0 for unpublished.
    columns : list of str
    """
    mats = []
    for name, X in (("published", X_published), ("unpublished", X_unpublished)):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise CDIError(f"{name} features must be a 2-D array (images x features), got shape {X.shape}")
        if X.shape[0] == 0:
            raise CDIError(f"no {name} images: the audit needs feature rows for both collections")
        mats.append(X)
    if mats[0].shape[1] != mats[1].shape[1]:
        raise CDIError(
            f"published features have {mats[0].shape[1]} columns but unpublished have {mats[1].shape[1]}; "
            "extract both collections with the same feature set"
        )
    if mats[0].shape[1] == 0:
        raise CDIError("the feature matrices have no columns")
    columns = column_names(mats[0].shape[1], columns)
    check_finite(mats[0], columns, "published")
    check_finite(mats[1], columns, "unpublished")
    X = np.concatenate(mats, axis=0)
    y = np.concatenate([np.ones(len(mats[0]), np.int8), np.zeros(len(mats[1]), np.int8)])
    check_not_constant(X)
    return X, y, columns


def check_not_constant(X: np.ndarray) -> None:
    """``CDIError`` when every column is constant (nothing to test)."""
    if np.all(X.max(axis=0) == X.min(axis=0)):
        raise CDIError("every feature column is constant over all images: there is nothing to test")


def check_directions(directions: np.ndarray | Sequence[int] | None, n_columns: int) -> np.ndarray | None:
    """Validate member directions: one of -1, 0, +1 per column, or None."""
    if directions is None:
        return None
    d = np.asarray(directions, dtype=np.float64).reshape(-1)
    if d.shape[0] != n_columns:
        raise CDIError(f"got {d.shape[0]} member directions for {n_columns} feature columns")
    if not np.all(np.isin(d, (-1.0, 0.0, 1.0))):
        raise CDIError("member directions must be +1 (higher = member), -1 (lower = member) or 0 (unknown)")
    return d


# --------------------------------------------------------------------------
# label-free pieces: standardisation, prior score, blocks
# --------------------------------------------------------------------------


@dataclass
class Standardization:
    """Column centring and scaling fitted on pooled rows, without labels.

    Constant columns get scale 1 and therefore transform to zero.
    """

    mean: np.ndarray
    scale: np.ndarray
    constant: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> "Standardization":
        mean = X.mean(axis=0)
        constant = X.max(axis=0) == X.min(axis=0)
        scale = np.where(constant, 1.0, X.std(axis=0))
        return cls(mean=mean, scale=scale, constant=constant)

    def transform(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean) / self.scale
        Z[:, self.constant] = 0.0
        return Z


def prior_score(Z: np.ndarray, directions: np.ndarray | None) -> np.ndarray | None:
    """Mean of the direction-oriented standardised columns (higher = member).

    Columns with direction 0 and constant columns (all zero after
    standardisation) are left out. None when no column has a direction.
    """
    if directions is None:
        return None
    use = (directions != 0) & np.any(Z != 0, axis=0)
    if not use.any():
        return None
    return Z[:, use] @ directions[use] / use.sum()


def minimum_images(folds: int) -> int:
    """Fewest published (and fewest unpublished) images for ``folds`` blocks."""
    return MIN_PER_BLOCK * folds


def assign_blocks(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified block of every image: each class shuffled, then dealt round-robin.

    Returns an int array of shape (n,) with values in ``0..folds-1``. Every
    block holds ``floor`` or ``ceil`` of ``n_class / folds`` images of each
    class.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise CDIError(f"folds must be a whole number of at least 2, got {folds!r}")
    folds = int(folds)
    need = minimum_images(folds)
    counts = {"published": int((y == 1).sum()), "unpublished": int((y == 0).sum())}
    short = {name: c for name, c in counts.items() if c < need}
    if short:
        got = ", ".join(f"{c} {name}" for name, c in short.items())
        raise CDIError(
            f"too few images for folds={folds}: every block needs at least {MIN_PER_BLOCK} published and "
            f"{MIN_PER_BLOCK} unpublished images, so the audit needs at least {need} of each; got {got}. "
            f"Add images or lower --folds (the minimum is 2, which needs {minimum_images(2)} of each)"
        )
    rng = np.random.default_rng([int(seed), 0x5C0])
    blocks = np.empty(len(y), dtype=np.int64)
    for label in (1, 0):
        idx = np.flatnonzero(y == label)
        blocks[rng.permutation(idx)] = np.arange(len(idx)) % folds
    return blocks


# --------------------------------------------------------------------------
# logistic regression for many label vectors at once
# --------------------------------------------------------------------------


def _objectives(D: np.ndarray, Y: np.ndarray, beta: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """Penalised negative log-likelihood of every column of ``beta``."""
    eta = D @ beta
    return (np.logaddexp(0.0, eta) - Y * eta).sum(axis=0) + 0.5 * (penalty[:, None] * beta**2).sum(axis=0)


def _hessians(D: np.ndarray, W: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """``D.T @ diag(W[:, b]) @ D + diag(penalty)`` for every column b, shape (B, p, p).

    One matrix product over the row-wise outer products of ``D`` (upper
    triangle only) serves all columns.
    """
    p = D.shape[1]
    iu, ju = np.triu_indices(p)
    flat = W.T @ (D[:, iu] * D[:, ju])  # (B, p(p+1)/2)
    H = np.zeros((W.shape[1], p, p))
    H[:, iu, ju] = flat
    H[:, ju, iu] = flat
    H[:, np.arange(p), np.arange(p)] += penalty
    return H


def _newton_steps(D: np.ndarray, Y: np.ndarray, beta: np.ndarray, penalty: np.ndarray, tol: float,
                  max_iter: int) -> np.ndarray:
    """Damped Newton (Armijo backtracking per column) for the columns of ``Y``, batched."""
    beta = beta.copy()
    active = np.arange(Y.shape[1])
    for _ in range(max_iter):
        if active.size == 0:
            break
        b, Ya = beta[:, active], Y[:, active]
        mu = special.expit(D @ b)
        grad = D.T @ (mu - Ya) + penalty[:, None] * b
        step = np.linalg.solve(_hessians(D, mu * (1.0 - mu), penalty), grad.T[:, :, None])[:, :, 0].T
        decrease = np.sum(grad * step, axis=0)  # squared Newton decrement
        f0 = _objectives(D, Ya, b, penalty)
        t = np.ones(active.size)
        # Near the optimum the decrease is below round-off: take the full step.
        search = decrease > 1e-12 * (1.0 + np.abs(f0))
        for _ in range(60):
            if not search.any():
                break
            f = _objectives(D, Ya[:, search], b[:, search] - t[search] * step[:, search], penalty)
            bad = f > f0[search] - 1e-4 * t[search] * decrease[search]
            if not bad.any():
                break
            idx = np.flatnonzero(search)
            t[idx[bad]] *= 0.5
            search[idx[~bad]] = False
        b = b - t * step
        beta[:, active] = b
        moved = np.max(np.abs(t * step), axis=0)
        active = active[moved > tol * (1.0 + np.max(np.abs(b), axis=0))]
    return beta


def fit_logistic(
    D: np.ndarray,
    Y: np.ndarray,
    penalty: np.ndarray,
    *,
    gram: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 200,
    nonnegative: int | None = None,
) -> np.ndarray:
    """L2-penalised logistic regression fitted for many label vectors at once.

    Minimises, for every column ``b`` of ``Y`` separately,
    ``sum_i [log(1 + exp(eta_i)) - y_ib * eta_i] + 0.5 * sum_j penalty_j * beta_j**2``
    with ``eta = D @ beta``. The objective is strictly convex when every
    direction in the null space of ``D`` is penalised, so the optimum is
    unique and does not depend on how it is reached.

    Method. All columns start at the intercept-only point and take
    quasi-Newton steps with the fixed Hessian ``w0 * D.T @ D + diag(penalty)``,
    ``w0 = ybar (1 - ybar)`` (the exact Hessian at the start), inverted once
    and shared: two matrix products per step for all columns together. For
    label vectors that carry little signal (the permutations of a null, on
    many images) the logistic weights stay near ``w0`` and these steps
    contract fast. A column whose steps shrink by less than a factor 4 per
    iteration (strong signal, few images, unbalanced labels) is handed to
    batched damped Newton with the exact Hessian, which converges from
    anywhere. A column is done when no coefficient moves by more than
    ``tol * (1 + max |beta|)``.

    Parameters
    ----------
    D : ndarray (m, p)
        Design matrix; column 0 must be the intercept (all ones).
    Y : ndarray (m, B)
        0/1 labels, one column per fit.
    penalty : ndarray (p,)
        Ridge weight per coefficient (0 for unpenalised ones).
    gram : ndarray (p, p), optional
        ``D.T @ D`` when the caller already has it.
    nonnegative : int, optional
        Index of one coefficient constrained to be >= 0.

    Returns
    -------
    ndarray (p, B)
    """
    D = np.asarray(D, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    p, B = D.shape[1], Y.shape[1]
    ybar = Y.mean(axis=0)
    if np.any(ybar <= 0) or np.any(ybar >= 1):
        raise CDIError("a scorer's training set holds only one class; use fewer folds or more images")
    start = np.zeros((p, B))
    start[0] = np.log(ybar / (1.0 - ybar))
    beta = start.copy()
    gram = D.T @ D if gram is None else gram
    w0 = float(np.mean(ybar * (1.0 - ybar)))
    H0_inv = np.linalg.inv(w0 * gram + np.diag(penalty))
    active = np.arange(B)
    previous = np.full(B, np.inf)
    slow_cols = []
    for it in range(max_iter):
        if active.size == 0:
            break
        b = beta[:, active]
        grad = D.T @ (special.expit(D @ b) - Y[:, active]) + penalty[:, None] * b
        step = H0_inv @ grad
        b = b - step
        size = np.max(np.abs(step), axis=0)
        done = size <= tol * (1.0 + np.max(np.abs(b), axis=0))
        slow = ~np.isfinite(size) | ((it >= 2) & (size > 0.25 * previous[active]) & ~done)
        beta[:, active] = b
        previous[active] = size
        slow_cols.append(active[slow])
        active = active[~done & ~slow]
    slow_cols.append(active)  # not converged within max_iter
    slow = np.concatenate(slow_cols)
    if slow.size:
        # Newton from where the cheap steps got to (from the start if they diverged).
        origin = beta[:, slow]
        diverged = ~np.all(np.isfinite(origin), axis=0)
        origin[:, diverged] = start[:, slow[diverged]]
        beta[:, slow] = _newton_steps(D, Y[:, slow], origin, penalty, tol, max_iter)
    if nonnegative is not None:
        # One bound on a convex problem: where the free optimum violates it, the
        # constrained optimum lies on the bound, i.e. is the fit without that column.
        flipped = np.flatnonzero(beta[nonnegative] < 0)
        if flipped.size:
            keep = np.arange(p) != nonnegative
            beta[:, flipped] = 0.0
            beta[np.ix_(keep, flipped)] = fit_logistic(
                D[:, keep], Y[:, flipped], penalty[keep], gram=gram[np.ix_(keep, keep)], tol=tol,
                max_iter=max_iter)
    return beta


# --------------------------------------------------------------------------
# Welch's t-test for many columns at once (the block statistic)
# --------------------------------------------------------------------------


def welch_t(S: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t and Welch-Satterthwaite df per column; group 1 = rows with Y == 1.

    S, Y : (m, B). Returns t (B,), df (B,); t > 0 when group 1 scores higher.
    A column whose two groups both have zero variance gets t = 0 (equal
    means) or +-inf, and df = 1.
    """
    Y = np.asarray(Y, dtype=np.float64)
    n1 = Y.sum(axis=0)
    n0 = Y.shape[0] - n1
    m1 = (Y * S).sum(axis=0) / n1
    m0 = ((1.0 - Y) * S).sum(axis=0) / n0
    a = (Y * (S - m1) ** 2).sum(axis=0) / (n1 - 1.0) / n1
    b = ((1.0 - Y) * (S - m0) ** 2).sum(axis=0) / (n0 - 1.0) / n0
    se = np.sqrt(a + b)
    diff = m1 - m0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / se, np.sign(diff) * np.inf)
        t = np.where((se == 0) & (diff == 0), 0.0, t)
        df = np.where(se > 0, (a + b) ** 2 / (a**2 / (n1 - 1.0) + b**2 / (n0 - 1.0)), 1.0)
    return t, df


def z_from_t(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Normal score with the same one-sided p-value: ``Phi^-1(1 - P(T_df >= t))``.

    Computed from whichever tail is small, so p-values far below 1e-300 keep
    their precision.
    """
    t = np.asarray(t, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        a = np.abs(t)
        log_tail = stats.t.logsf(a, df)
        # Beyond what scipy resolves: the first term of the tail's asymptotic
        # expansion, P(T > a) ~ f(a) (df + a^2) / (df a).
        far = ~np.isfinite(log_tail) & np.isfinite(a)
        if far.any():
            log_tail = np.where(far, stats.t.logpdf(a, df) + np.log((df + a * a) / (df * a)), log_tail)
        z = -special.ndtri_exp(log_tail)
    return np.where(t >= 0, z, -z)


def normal_scores(S: np.ndarray) -> np.ndarray:
    """Rank-based normal scores per column: ``Phi^-1(rank / (m + 1))``, ties averaged.

    A label-free, order-preserving transformation of a block's pooled scores
    (van der Waerden's scores). The Welch t-test on normal scores is as
    efficient as on the raw scores when they are normal, and keeps its level
    when they are skewed or heavy-tailed, where a one-sided t-test on small
    unequal groups does not.
    """
    ranks = stats.rankdata(S, axis=0)
    return special.ndtri(ranks / (S.shape[0] + 1.0))


def block_z(S: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The sequential protocol's statistic of one block, per column, on the normal scale.

    Welch's one-sided t-test (published higher) on the block's normal scores
    (``normal_scores``), its p-value from the t-distribution with Welch's df,
    mapped to ``Phi^-1(1 - p)``.
    """
    return z_from_t(*welch_t(normal_scores(S), Y))


# --------------------------------------------------------------------------
# the scoring procedure
# --------------------------------------------------------------------------


@dataclass
class ScoringResult:
    """Per-image scores of one run of the scoring procedure (observed labels).

    Attributes
    ----------
    scores : ndarray (n,)
        Score of every image in input order (higher = more member-like); NaN
        for images that only trained (``tested`` False). Under
        ``"sequential"``: the block's normal scores (``normal_scores`` of
        the scorer's output over the block's images), exactly what the
        block's t-test sees; under ``"crossfit"``: the raw out-of-fold
        logits.
    labels : ndarray (n,)
        1 published, 0 unpublished.
    folds : ndarray (n,)
        Block of every image.
    tested : ndarray (n,) of bool
        Whether the image's score enters the test.
    block_scorers : list of str
        What scored each block ("prior", "logistic", "xgboost", or
        "training only").
    coefficients : dict column -> float
        Logistic: the effective weight of every standardised column (feature
        coefficient plus its share of the prior's coefficient), mean over the
        fitted scorers. XGBoost: mean gain importance.
    """

    scores: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    tested: np.ndarray
    block_scorers: list[str]
    columns: list[str]
    coefficients: dict[str, float]
    coefficient_kind: str
    protocol: str
    scorer: str
    folds_count: int
    seed: int
    penalty: float
    directions: list[int] | None
    prior_used: bool
    constant_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able form (per-image arrays as lists, NaN as None)."""
        return {
            "protocol": self.protocol,
            "scorer": self.scorer,
            "folds": self.folds_count,
            "seed": self.seed,
            "penalty": self.penalty,
            "directions": self.directions,
            "prior_used": self.prior_used,
            "block_scorers": list(self.block_scorers),
            "columns": list(self.columns),
            "constant_columns": list(self.constant_columns),
            "coefficients": {k: float(v) for k, v in self.coefficients.items()},
            "coefficient_kind": self.coefficient_kind,
            "scores": [float(s) if np.isfinite(s) else None for s in self.scores],
            "labels": [int(v) for v in self.labels],
            "blocks": [int(v) for v in self.folds],
            "tested": [bool(v) for v in self.tested],
        }


@dataclass
class _Fit:
    """One learned scorer: which block it scores and which rows train it."""

    block: int
    train: np.ndarray  # bool mask over rows
    test: np.ndarray  # bool mask over rows


class CrossFit:
    """The scoring procedure for fixed features, re-runnable for any labels.

    Everything that does not depend on the labels (standardisation, prior
    score, blocks, design matrix, Gram matrices, block weights) is computed
    once here; ``scores(Y)`` runs the label-dependent part for one or many
    label vectors. The blocks are assigned from the observed labels and then
    held fixed; ``permuted_labels`` draws label vectors that keep every
    block's class counts, the permutation group under which the procedure is
    exchangeable. See the module docstring for the protocols.

    Parameters
    ----------
    X : ndarray (n, d)
        Finite feature rows (validated by the caller: ``check_features``).
    y : ndarray (n,)
        1 published, 0 unpublished.
    scorer, folds, seed, directions, protocol, penalty, columns
        As in ``cross_fit_scores``.
    """

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        scorer: str = "logistic",
        folds: int = 5,
        seed: int = 0,
        directions: np.ndarray | Sequence[int] | None = None,
        protocol: str = "sequential",
        penalty: float | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        if scorer not in SCORERS:
            raise CDIError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        if protocol not in PROTOCOLS:
            raise CDIError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        penalty = DEFAULT_PENALTY[protocol] if penalty is None else float(penalty)
        if not (np.isfinite(penalty) and penalty > 0):
            raise CDIError(f"penalty must be a positive number, got {penalty}")
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).astype(np.int8)
        self.columns = column_names(X.shape[1], columns)
        self.directions = check_directions(directions, X.shape[1])
        self.scorer, self.protocol, self.penalty = scorer, protocol, penalty
        self.seed, self.n_folds = int(seed), int(folds)
        self.labels = y
        self.standardization = Standardization.fit(X)
        Z = self.standardization.transform(X)
        self.prior = prior_score(Z, self.directions) if protocol == "sequential" else None
        self.blocks = assign_blocks(y, folds, seed)
        parts = [np.ones((len(y), 1))]
        if self.prior is not None:
            parts.append(self.prior[:, None])
        parts.append(Z)
        self.design = np.concatenate(parts, axis=1)
        self.n_fixed = len(parts) - 1  # leading columns that carry no real penalty (intercept, prior)
        free = [FREE_PENALTY["intercept"]] + ([FREE_PENALTY["prior"]] if self.prior is not None else [])
        self.penalty_vector = np.r_[free, np.full(Z.shape[1], penalty)]
        self.fits = self._plan()
        self._grams = [self.design[f.train].T @ self.design[f.train] for f in self.fits]
        self.tested = np.zeros(len(y), dtype=bool)
        for f in self.fits:
            self.tested |= f.test
        if self.prior is not None:
            self.tested |= self.blocks == 0
        self.tested_blocks = [k for k in range(self.n_folds) if self.tested[self.blocks == k].any()]
        self.block_weights = {}
        for k in self.tested_blocks:
            n1 = float(y[self.blocks == k].sum())
            n0 = float((self.blocks == k).sum()) - n1
            self.block_weights[k] = float(np.sqrt(n1 * n0 / (n1 + n0)))

    def _plan(self) -> list[_Fit]:
        fits = []
        for k in range(self.n_folds):
            test = self.blocks == k
            if self.protocol == "sequential":
                if k == 0:
                    continue  # scored by the prior, or training only
                train = self.blocks < k
            else:
                train = ~test
            fits.append(_Fit(block=k, train=train, test=test))
        return fits

    # -- label-dependent part -------------------------------------------

    def permuted_labels(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` label vectors, shape (n, count), shuffled within every block."""
        Y = np.empty((len(self.labels), count), dtype=np.int8)
        for k in range(self.n_folds):
            rows = np.flatnonzero(self.blocks == k)
            Y[rows] = rng.permuted(np.repeat(self.labels[rows][:, None], count, axis=1), axis=0)
        return Y

    def scores(self, Y: np.ndarray, return_choices: bool = False):
        """Scores (n, B) for label vectors ``Y`` (n, B); NaN where untested.

        With ``return_choices``, also a (K, B) int array: 0 = block scored by
        the prior, 1 = by the learned scorer, -1 = training only.

        BLAS runs single-threaded here: the matrices are thin (d + 2
        columns), so threads gain little, and OpenBLAS threads that
        spin-wait on a busy machine made the permutation test 4 to 15 times
        slower in our measurements.
        """
        with threadpool_limits(limits=1, user_api="blas"):
            S, choices, _ = self._scores(Y, collect=False)
        return (S, choices) if return_choices else S

    def _scores(self, Y: np.ndarray, collect: bool):
        """Scores, choices and, with ``collect``, per-fit column weights of label column 0."""
        Y = np.asarray(Y)
        if Y.ndim == 1:
            Y = Y[:, None]
        B = Y.shape[1]
        S = np.full((len(Y), B), np.nan)
        choices = np.full((self.n_folds, B), -1, dtype=np.int8)
        weights = []
        if self.prior is not None:
            first = self.blocks == 0
            S[first] = self.prior[first][:, None]
            choices[0] = 0
        evidence = np.zeros((2, B))  # cumulative weighted z: prior, learned
        for fit, gram in zip(self.fits, self._grams):
            learned, w = self._learned_scores(fit, gram, Y, collect)
            weights.append(w)
            k = fit.block
            if self.protocol == "crossfit" or self.prior is None:
                S[fit.test] = learned
                choices[k] = 1
                continue
            prior = np.repeat(self.prior[fit.test][:, None], B, axis=1)
            use_learned = evidence[1] > evidence[0] if k >= 2 else np.ones(B, dtype=bool)
            S[fit.test] = np.where(use_learned, learned, prior)
            choices[k] = use_learned
            Yk = Y[fit.test]
            evidence[0] += self.block_weights[k] * block_z(prior, Yk)
            evidence[1] += self.block_weights[k] * block_z(learned, Yk)
        return S, choices, weights

    def _learned_scores(self, fit: _Fit, gram: np.ndarray, Y: np.ndarray, collect: bool):
        """Held-out scores of the scorer trained on ``fit.train``, and (``collect``) its column weights."""
        if self.scorer == "logistic":
            beta = fit_logistic(self.design[fit.train], Y[fit.train], self.penalty_vector, gram=gram,
                                nonnegative=1 if self.prior is not None else None)
            weights = None
            if collect:
                weights = beta[self.n_fixed:, 0].copy()
                if self.prior is not None:
                    use = (self.directions != 0) & ~self.standardization.constant
                    weights[use] += beta[1, 0] * self.directions[use] / use.sum()
            return self.design[fit.test] @ beta, weights
        X_train, X_test = self.design[fit.train][:, 1:], self.design[fit.test][:, 1:]
        out = np.empty((int(fit.test.sum()), Y.shape[1]))
        weights = None
        for b in range(Y.shape[1]):
            model = self._xgboost_model(fit.block)
            model.fit(X_train, Y[fit.train, b])
            out[:, b] = model.predict(X_test, output_margin=True)
            if collect and b == 0:
                gain = model.get_booster().get_score(importance_type="gain")
                imp = np.zeros(X_train.shape[1])
                for key, value in gain.items():
                    imp[int(key[1:])] = value
                weights = imp[self.n_fixed - 1:]
        return out, weights

    def _xgboost_model(self, block: int):
        from cdi.optional import require_xgboost

        require_xgboost("scorer='xgboost'")
        import xgboost

        return xgboost.XGBClassifier(**XGBOOST_PARAMS, random_state=self.seed * 101 + block)

    # -- observed labels ---------------------------------------------------

    def observe(self) -> tuple[np.ndarray, ScoringResult]:
        """Run the procedure on the observed labels.

        Returns the raw scores (n,) (NaN where untested) and the
        ``ScoringResult`` that describes them.
        """
        with threadpool_limits(limits=1, user_api="blas"):
            S, choices, weights = self._scores(self.labels[:, None].astype(np.float64), collect=True)
        raw = S[:, 0]
        scores = raw.copy()
        if self.protocol == "sequential":
            for k in self.tested_blocks:
                rows = self.blocks == k
                scores[rows] = normal_scores(raw[rows, None])[:, 0]
        mean_weights = np.mean(weights, axis=0) if weights else np.zeros(len(self.columns))
        names = {-1: "training only", 0: "prior", 1: self.scorer}
        result = ScoringResult(
            scores=scores,
            labels=self.labels.copy(),
            folds=self.blocks.copy(),
            tested=self.tested.copy(),
            block_scorers=[names[int(c)] for c in choices[:, 0]],
            columns=list(self.columns),
            coefficients={c: float(v) for c, v in zip(self.columns, mean_weights)},
            coefficient_kind=(
                "logistic weight per standardised column (mean over fitted scorers)"
                if self.scorer == "logistic" else "xgboost gain importance (mean over fitted scorers)"
            ),
            protocol=self.protocol,
            scorer=self.scorer,
            folds_count=self.n_folds,
            seed=self.seed,
            penalty=self.penalty,
            directions=None if self.directions is None else [int(v) for v in self.directions],
            prior_used=self.prior is not None,
            constant_columns=[c for c, k in zip(self.columns, self.standardization.constant) if k],
        )
        return raw, result

    def result(self) -> ScoringResult:
        """The ``ScoringResult`` of the observed labels."""
        return self.observe()[1]


def cross_fit_scores(
    X: np.ndarray,
    y: np.ndarray,
    *,
    scorer: str = "logistic",
    folds: int = 5,
    seed: int = 0,
    directions: np.ndarray | Sequence[int] | None = None,
    protocol: str = "sequential",
    penalty: float | None = None,
    columns: Sequence[str] | None = None,
) -> ScoringResult:
    """Per-image scores of the audit's scoring procedure (see the module docstring).

    Parameters
    ----------
    X : ndarray (n, d)
        Feature rows of all images, in any order.
    y : ndarray (n,)
        1 for published, 0 for unpublished.
    scorer : {"logistic", "xgboost"}
    folds : int
        Number of blocks K; needs ``MIN_PER_BLOCK * K`` images of each class.
    seed : int
        Fixes the blocks (and XGBoost's subsampling).
    directions : array (d,) of {-1, 0, +1}, optional
        Member direction of every column; enables the prior score.
    protocol : {"sequential", "crossfit"}
    penalty : float, optional
        L2 penalty on the standardised feature coefficients (1/C); default
        ``DEFAULT_PENALTY[protocol]``.
    columns : list of str, optional
        Column names, used in messages and in ``coefficients``.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise CDIError(f"X must be (n, d) and y (n,), got shapes {X.shape} and {y.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise CDIError("labels must be 1 (published) or 0 (unpublished)")
    columns = column_names(X.shape[1], columns)
    check_finite(X, columns, "the")
    check_not_constant(X)
    return CrossFit(X, y, scorer=scorer, folds=folds, seed=seed, directions=directions, protocol=protocol,
                    penalty=penalty, columns=columns).result()
