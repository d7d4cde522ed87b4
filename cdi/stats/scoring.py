"""The audit's scoring model: from per-image feature rows to per-image scores.

An audit has a feature row for every published image (``P``, label 1) and
every unpublished image (``U``, label 0). This module turns them into one
score per image such that a one-sided two-sample test on the scores
(``cdi.stats.verdict``) is a valid test of "P was used in training". Everything is
deterministic given ``seed``.

The pieces, in order
--------------------
1. **Validation** (``cdi.stats.feature_checks``). Both matrices must be finite,
   2-D and have the same columns; a NaN or inf is a ``CDIError`` that names
   the columns.
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
4. **Blocks** (``cdi.stats.blocks.assign_blocks``). The images are split into
   ``K = folds`` blocks, stratified: published and unpublished images are
   each shuffled with ``seed`` and dealt round-robin, so every block holds
   the same share of each class (unequal ``|P|`` and ``|U|`` are fine).
5. **Learned scorer.** ``scorer="logistic"`` (``cdi.stats.logistic``):
   L2-penalised logistic regression on ``[1, prior, z_1..z_d]``; the feature coefficients carry the penalty
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
  ``z_j`` is the candidate's block statistic on block ``j`` (``cdi.stats.blocks.block_z``:
  Welch's t-test on the block's rank-based normal scores, as a normal
  deviate) and ``w_j`` the block's fixed weight; ties go to the prior.

So every image is tested exactly once, by a score that its own label never
influenced. Under the null hypothesis each block's statistic is, given
everything before it, a two-sample statistic on exchangeable images, and
``cdi.stats.verdict`` combines the blocks with fixed weights (Stouffer). The choice
between the candidates matters because which one is better depends on the
data: simulations (``tests/stats/test_stats.py`` and the report of task F) show
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
about 9% at alpha 0.05); ``cdi.stats.verdict`` takes this protocol's verdict from
the permutation test instead.

Permutations
------------
``CrossFit.permuted_labels`` shuffles the labels *within* blocks, keeping
every block's counts of published and unpublished images, and
``CrossFit.scores`` re-runs everything label-dependent (fits, the candidate
choice) for many label vectors at once. For the logistic scorer all label
vectors are fitted together by ``cdi.stats.logistic.fit_logistic``, which reuses the Gram
matrix of each training set and reaches the same penalised optimum as a
one-at-a-time fit (to 1e-10 on the coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from cdi.stats.blocks import assign_blocks, block_z, normal_scores
from cdi.utils.errors import CDIError
from cdi.stats.feature_checks import check_directions, check_finite, check_not_constant, column_names
from cdi.stats.logistic import fit_logistic

SCORERS = ("logistic", "xgboost")
PROTOCOLS = ("sequential", "crossfit")

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
# label-free pieces: standardisation, prior score (blocks: cdi.stats.blocks)
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
        from cdi.utils.optional import require_xgboost

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
        Number of blocks K; needs ``cdi.stats.blocks.MIN_PER_BLOCK * K`` images of each class.
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
