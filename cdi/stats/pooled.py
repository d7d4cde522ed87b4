"""The pooled verdict test: every image tested once, no blocks, no seed.

The statistic (``protocol="pooled"``, the default; ``cdi.stats.verdict`` documents
why it is the verdict) is built from label-free pieces and two classical
tests whose null distributions are known exactly for Gaussian rows:

1. **Label-free transform.** Every column is replaced by its rank-based
   normal scores over the pooled images ``P + U`` (``Phi^-1(rank / (n+1))``,
   ties averaged): robust to outliers and skew, the same for every
   labelling, and as efficient as the raw column when the column is normal.
2. **Prior direction.** ``a = mean_j direction_j z_j`` over the columns with
   a known member direction (higher ``a`` = more member-like). Part 1 of the
   test is Student's one-sided two-sample t-test of "published images have
   higher ``a``" (pooled variance, ``nu = n - 2`` df): ``t1``, ``p1``.
3. **The other directions.** The columns are projected on their top ``r``
   principal components (of the pooled, label-free correlation matrix;
   ``r`` at most the matrix rank and at most ``(n - 2) / 3`` so that the
   test keeps two thirds of its error degrees of freedom), and the basis
   ``[a, PC_1..PC_r]`` is orthonormalised with ``a`` first. Part 2 is Rao's
   test of additional information (Rao 1946; Mardia, Kent & Bibby 1979,
   section 3.6.3): does the mean difference of P and U in the ``d - 1``
   directions beyond ``a`` add to what ``a`` shows? With Hotelling's
   ``T2_d`` (all ``d`` directions) and ``T2_1 = t1^2``,
   ``F = (nu - d + 1) / (d - 1) * (T2_d - T2_1) / (nu + T2_1)`` follows
   ``F(d - 1, nu - d + 1)`` under H0, independently of ``t1``; ``p2`` is its
   upper tail (two-sided in those directions: no direction is known there).
4. **Combination.** ``Z = (w1 z1 + w2 z2) / sqrt(w1^2 + w2^2)`` with
   ``z_i = Phi^-1(1 - p_i)`` and the weights fixed by design,
   ``w1 = 2, w2 = 1`` (``PRIOR_WEIGHT``): the known directions carry most of
   the evidence, the rest is a safety net for an effect the prior misses.
   ``z1`` and ``z2`` are independent standard normals under H0, so ``Z`` is
   standard normal and ``p = 1 - Phi(Z)``.

With several noise draws of the features (``cdi.stats.draws``) the prior's
column weights (``prior_weights``: direction times a label-free weight) and
part 2's directions (``rest_basis``) come from the draws' reliability
instead; everything else is as above.

Without directions there is no part 1: the test is Hotelling's ``T2`` on the
``r`` label-free principal components (``F(r, nu - r + 1)``), two-sided.

Everything uses the Hotelling algebra on centred, orthonormalised columns
``Q`` (``Q^T Q = I``): with ``k = n1 n0 / n`` and ``g = Q^T y`` (``y`` the 0/1
labels), the share of the total scatter explained by the labels is
``m = |g|^2 / k``, and ``T2 = nu m / (1 - m)``. ``g`` is linear in the
labels, so many label vectors (permutations) cost one matrix product
(``PooledStatistic.z``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

#: Weight of the prior's z in the combination (the rest's weight is 1).
PRIOR_WEIGHT = 2.0

#: The principal components of part 2 keep at least this share of the error df.
DF_SHARE = 3


@dataclass
class PooledParts:
    """The observed pieces of the pooled test (see the module docstring)."""

    prior_t: float | None
    prior_log_p: float | None
    rest_F: float | None
    rest_df: tuple[int, int] | None
    rest_log_p: float | None
    directions_tested: int
    z: float
    log_p: float
    # The decomposition of ``z`` (``z = prior_contribution + rest_contribution``, see ``decompose``).
    prior_z: float | None = None
    rest_z: float | None = None
    prior_weight: float | None = None
    rest_weight: float | None = None
    prior_contribution: float | None = None
    rest_contribution: float | None = None
    prior_share: float | None = None
    rest_share: float | None = None


def normal_scores(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-based normal scores of every column over all rows, centred, and which columns are constant (scored 0)."""
    X = np.asarray(X, dtype=np.float64)
    constant = X.max(axis=0) == X.min(axis=0)
    Z = special.ndtri(stats.rankdata(X, axis=0) / (len(X) + 1.0))
    Z[:, constant] = 0.0
    return Z - Z.mean(axis=0), constant


def _z_from_log_p(log_p: np.ndarray) -> np.ndarray:
    """``Phi^-1(1 - p)`` from ``log p``, precise far into the tail."""
    return -special.ndtri_exp(np.minimum(log_p, 0.0))


class PooledStatistic:
    """The pooled test for fixed features, for one or many label vectors.

    Parameters
    ----------
    X : ndarray (n, d)
        Finite feature rows (validated by the caller).
    y : ndarray (n,)
        1 published, 0 unpublished.
    directions : ndarray (d,) of {-1, 0, +1} or None
        Member direction per column; enables part 1.
    prior_weights : ndarray (d,) of non-negative floats, optional
        The prior's weight of each column (times its direction; a zero weight
        leaves the column out); default equal weights. Must not depend on ``y``.
    rest_basis : ndarray (d, k), optional
        Part 2's directions as column combinations, used in order instead of
        the principal components. Must not depend on ``y``.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, directions: np.ndarray | None, *,
                 prior_weights: np.ndarray | None = None, rest_basis: np.ndarray | None = None) -> None:
        self.labels = np.asarray(y).astype(np.int8)
        n = len(self.labels)
        self.n1 = int(self.labels.sum())
        self.n0 = n - self.n1
        self.k = self.n1 * self.n0 / n
        self.nu = n - 2
        Z, self.constant = normal_scores(X)
        self.normal_scored = Z
        self.prior_weights = None
        if directions is not None:
            use = (directions != 0) & ~self.constant
            if prior_weights is not None:
                use &= np.asarray(prior_weights) > 0
            if use.any():
                scale = np.ones(len(use)) if prior_weights is None else np.asarray(prior_weights, dtype=np.float64)
                weights = np.where(use, np.sign(directions) * scale, 0.0)
                self.prior_weights = weights / np.abs(weights).sum()
        self.prior = None if self.prior_weights is None else Z @ self.prior_weights
        if self.prior is not None and not np.any(self.prior != 0):
            self.prior, self.prior_weights = None, None
        self.Q = self._basis(Z, rest_basis)
        self.d = self.Q.shape[1]

    def _basis(self, Z: np.ndarray, rest_basis: np.ndarray | None) -> np.ndarray:
        """Orthonormal, centred columns: ``a`` first (if any), then part 2's directions.

        Part 2's directions are the top principal components of ``Z`` or, when
        ``rest_basis`` (d, k) is given, those column combinations, in order;
        either way at most ``nu // DF_SHARE`` of them.
        """
        limit = max(1, self.nu // DF_SHARE)
        if rest_basis is None:
            values, vectors = np.linalg.eigh(Z.T @ Z)
            order = np.argsort(values)[::-1]
            values, vectors = values[order], vectors[:, order]
            rank = int(np.sum(values > 1e-9 * max(values[0], 1e-300)))
            rest = Z @ vectors[:, :min(rank, limit)]
        else:
            rest = Z @ np.asarray(rest_basis, dtype=np.float64)[:, :limit]
        parts = ([self.prior[:, None]] if self.prior is not None else []) + [rest]
        if sum(p.shape[1] for p in parts) == 0:
            return np.zeros((len(Z), 0))
        Q, R = np.linalg.qr(np.concatenate(parts, axis=1))
        Q = Q * np.where(np.diag(R) < 0, -1.0, 1.0)  # Q[:, 0] points along a, not against it
        keep = np.abs(np.diag(R)) > 1e-9 * max(np.abs(R[0, 0]), 1e-300)
        keep[0] = True
        return Q[:, keep]

    def _hotelling(self, g2: np.ndarray) -> np.ndarray:
        """``T2 = nu m / (1 - m)`` with ``m = g2 / k`` (capped below 1)."""
        m = np.minimum(g2 / self.k, 1.0 - 1e-15)
        return self.nu * m / (1.0 - m)

    def parts(self, Y: np.ndarray):
        """Log p-values of part 1 and part 2 (each (B,) or None), and the statistics, for labels ``Y`` (n, B)."""
        G = self.Q.T @ np.asarray(Y, dtype=np.float64)  # (d, B)
        t1 = log_p1 = None
        first = 0
        if self.prior is not None:
            T1 = self._hotelling(G[0] ** 2)
            t1 = np.sign(G[0]) * np.sqrt(T1)
            log_p1 = stats.t.logsf(t1, self.nu)
            first = 1
        F = log_p2 = None
        d1, d2 = self.d - first, self.nu - self.d + 1
        if d1 >= 1 and d2 >= 1:
            Td = self._hotelling((G**2).sum(axis=0))
            if first:
                F = d2 / d1 * (Td - T1) / (self.nu + T1)
            else:
                F = d2 / (d1 * self.nu) * Td
            log_p2 = stats.f.logsf(np.maximum(F, 0.0), d1, d2)
        return t1, log_p1, F, log_p2, (d1, d2)

    def weights(self) -> tuple[float | None, float | None]:
        """Stouffer weights of part 1 and part 2 (None for a part the test does not have)."""
        has_rest = self.d - (self.prior is not None) >= 1 and self.nu - self.d + 1 >= 1
        w1 = None if self.prior is None else (PRIOR_WEIGHT if has_rest else 1.0)
        return w1, (1.0 if has_rest else None)

    def contributions(self, Y: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Each part's additive term of ``Z`` (B,), ``w_i z_i / sqrt(w_1^2 + w_2^2)`` (None: part absent)."""
        _, log_p1, _, log_p2, _ = self.parts(Y)
        w1, w2 = self.weights()
        norm = math.sqrt(sum(w * w for w in (w1, w2) if w is not None))
        c1 = None if log_p1 is None else w1 * _z_from_log_p(log_p1) / norm
        c2 = None if log_p2 is None else w2 * _z_from_log_p(log_p2) / norm
        return c1, c2

    def z(self, Y: np.ndarray) -> np.ndarray:
        """The combined statistic ``Z`` (B,) for label vectors ``Y`` (n, B); ``p = 1 - Phi(Z)``."""
        c1, c2 = self.contributions(Y)
        return sum(c for c in (c1, c2) if c is not None)

    def observe(self) -> PooledParts:
        """The pieces of the test on the observed labels."""
        Y = self.labels[:, None]
        t1, log_p1, F, log_p2, df = self.parts(Y)
        c1, c2 = self.contributions(Y)
        z = float(sum(c[0] for c in (c1, c2) if c is not None))
        w1, w2 = self.weights()
        share = (lambda c: None if c is None or z == 0.0 else float(c[0]) / z)
        return PooledParts(
            prior_t=None if t1 is None else float(t1[0]),
            prior_log_p=None if log_p1 is None else float(log_p1[0]),
            rest_F=None if F is None else float(F[0]),
            rest_df=None if F is None else (int(df[0]), int(df[1])),
            rest_log_p=None if log_p2 is None else float(log_p2[0]),
            directions_tested=int(self.d),
            z=z,
            log_p=float(special.log_ndtr(-z)),
            prior_z=None if log_p1 is None else float(_z_from_log_p(log_p1)[0]),
            rest_z=None if log_p2 is None else float(_z_from_log_p(log_p2)[0]),
            prior_weight=w1,
            rest_weight=w2,
            prior_contribution=None if c1 is None else float(c1[0]),
            rest_contribution=None if c2 is None else float(c2[0]),
            prior_share=share(c1),
            rest_share=share(c2),
        )

    def permuted_labels(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` uniformly random relabellings (n, count) with the observed class counts.

        Each relabelling is drawn as one row of a (count, n) array (contiguous
        shuffles, faster) and the result is transposed: the same relabellings,
        in the same order, as shuffling the columns of an (n, count) array.
        """
        return rng.permuted(np.repeat(self.labels[None, :], count, axis=0), axis=1).T
