"""The pooled verdict over several noise draws of the features (``--noise-draws R``).

Why (issue 21; docs/notes/issue-21-seed.md, Session 5): five of the default
feature families average random noise, so the verdict's p-value depends on
the seed. Averaging the *features* over R draws shrinks the seed spread of
the pooled test's part 1 (the known member directions) as Monte Carlo error
should, but not of part 2: part 2 whitens every direction beyond the prior,
and on the toy most of those directions are mostly noise draw, so however
many draws are averaged they stay noise-dominated and part 2 behaves like a
fresh draw of its null distribution at every seed (seed sd of its z 0.55 to
0.75 with 1 to 4 averaged draws). Averaging the *statistic* over draws
averages those fresh draws too. Measured on the toy demo (150 + 150, noise
drawn per image and timestep) on 48 independent draws in session 6: seed sd
of the verdict's Z 0.36 with one draw, 0.30 with two, 0.25 with three, about
1/sqrt(R) (session 5's rougher estimate from 20 seeds, 0.15-0.20 at two, was
too optimistic).

The statistic. ``Z_r`` is the pooled statistic (``cdi.stats.pooled``) on the
table of draw r (the seed-free columns are the same in every table). Under H0
each ``Z_r`` is standard normal (exactly for Gaussian rows), and the ``Z_r``
are correlated through the shared images: ``Var(mean_r Z_r) = mean_{r,s}
rho_rs`` with ``rho_rs`` the null correlation of ``Z_r`` and ``Z_s``. ``rho``
is estimated from ``NULL_PERMUTATIONS`` relabellings of the images (the null
of exchangeable labels; the same relabellings for every draw) drawn from a
fixed generator, so the statistic depends on no seed beyond the features'.
The verdict statistic is ``Z = mean_r Z_r / sqrt(Var)``, ``p = 1 - Phi(Z)``:
the normal approximation of a mean of correlated standard normals. The
exact permutation p-value counts relabellings whose ``mean_r Z_r`` reaches
the observed one. With one draw everything reduces to the pooled test
exactly.

Reliability (session 6). Averaging the statistic still left a seed sd of
about 0.30 in Z at R = 2 on the demo (48 draws, 24 disjoint pairs), 94x
between the p-values of ``--seed 1..5``: the verdict weighs columns that are
mostly noise draw (one draw's variance is 41-95% noise for Denoising Loss,
Multiple Loss, Noise Optimisation, Gradient Masking and CLiD columns on the
toy; SecMI, PIA and SimA draw nothing) as much as the seed-free ones, and
part 2 whitens directions that are mostly noise. The R draws measure that
noise without any label (``reliability``): one draw's noise covariance ``N``
from the draws' deviations from their mean, its total covariance ``T``, and
the images' part ``T - N``. With R >= 2 the statistic therefore

* weighs each column of the prior part by its reliability ``rho_j = 1 -
  N_jj / T_jj`` squared (``RELIABILITY_POWER``) instead of equally, so a
  column that is half noise counts a quarter; and
* restricts part 2 to the directions in which at least half of one draw's
  variance is the images' (``RELIABLE_SHARE``; ``(T - N) v = lambda T v``,
  ``lambda >= 0.5``), ordered as principal components within them.

Both are computed from all images and all draws without the labels, so
they are the same for every relabelling: the permutation p-value stays
exact, and the t and F parts keep their null distributions given them (the
same argument as for part 2's principal components). Measured on the demo
(48 draws): seed sd of Z 0.30 -> 0.14 at R = 2, mean Z 5.99 -> 6.26; the
audit's ``--seed 1..5`` p-values 94x -> 6x apart. Calibration and power on
the stored light-toy tables: docs/notes/issue-21-seed.md (Session 6). A
reliability power of 4 or a share of 0.8 were steadier still on the demo
(sd 0.09-0.12); 2 and 0.5 keep more of part 2 for worlds where the member
effect is not along the prior (issue 21, item 2). With one draw (``cdi
extract`` tables) nothing measures the noise: the pooled test as it is.

The parts. The prior part's and the rest's contributions are the draws'
mean contributions divided by the same ``sqrt(Var)`` (they add up to
``Z``); each part's own z is the draws' mean z divided by that part's own
null sd (estimated the same way), so the direction rule's one-sided check of
the prior part (``prior_p_against``) is taken at the prior part's null scale.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special

from cdi.stats.pooled import PooledParts, PooledStatistic, _z_from_log_p, normal_scores

#: Relabellings that estimate the null correlation of the draws' statistics (sd of a correlation ~ (1 - rho^2)/sqrt(2000)).
NULL_PERMUTATIONS = 2000
#: The fixed generator of those relabellings: part of the statistic's definition, not of any seed.
NULL_SEED = 0x5EED_D4A3


#: Part 2 keeps the directions in which at least this share of one draw's variance is the images, not the noise draw.
RELIABLE_SHARE = 0.5
#: The prior part weighs each column by its reliability to this power.
RELIABILITY_POWER = 2


def reliability(Xs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Label-free reliability of the columns and the directions part 2 keeps, from R >= 2 draws of the same images.

    With ``z_r`` the normal scores of draw r (n, d) and ``m`` their mean over
    draws, one draw's noise covariance is ``N = sum_r (z_r - m)^T (z_r - m) /
    (n (R - 1))`` and its total covariance ``T = sum_r z_r^T z_r / (n R)``; the
    images' part is ``S = T - N``. A column's reliability is ``1 - N_jj / T_jj``
    (clipped to [0, 1]; 0 for a constant column). The reliable subspace is
    spanned by the solutions of ``S v = lambda T v`` with ``lambda >=
    RELIABLE_SHARE`` (at least that share of one draw's variance along ``v`` is
    the images'); its basis is returned as principal components within it
    (largest variance ``v^T T v / v^T v`` first), so that with identical draws
    (no noise: everything reliable) it is ``T``'s principal components, part
    2's directions without draws. Returns the column reliabilities (d,) and the
    basis (d, k). Every piece uses all images and no label.
    """
    scores = np.stack([normal_scores(X)[0] for X in Xs])
    R, n, d = scores.shape
    deviation = scores - scores.mean(axis=0)
    N = np.einsum("rni,rnj->ij", deviation, deviation) / (n * (R - 1))
    T = np.einsum("rni,rnj->ij", scores, scores) / (n * R)
    diag = np.diag(T)
    columns = np.where(diag > 1e-12, np.clip(1.0 - np.diag(N) / np.maximum(diag, 1e-300), 0.0, 1.0), 0.0)
    values, vectors = np.linalg.eigh(T)  # whiten T on its range, then diagonalise S there
    rank = values > 1e-9 * max(values.max(), 1e-300)
    W = vectors[:, rank] / np.sqrt(values[rank])
    share, rotation = np.linalg.eigh(W.T @ (T - N) @ W)
    V = W @ rotation[:, share >= RELIABLE_SHARE]  # V^T T V = I
    # v = V c has variance c^T c and squared length c^T (V^T V) c: the largest variance per length first
    lengths, c = np.linalg.eigh(V.T @ V)
    basis = V @ c[:, np.argsort(lengths)]
    basis /= np.maximum(np.linalg.norm(basis, axis=0), 1e-300)
    return columns, basis


def draw_statistics(Xs: Sequence[np.ndarray], y: np.ndarray, directions: np.ndarray | None, *,
                    reliability_weighted: bool = True
                    ) -> tuple[list[PooledStatistic], np.ndarray | None, np.ndarray | None]:
    """The pooled statistic of every draw, with the prior's weights and part 2's directions shared by all draws.

    With R >= 2 draws and ``reliability_weighted``, those come from
    ``reliability`` (see the module docstring); otherwise each draw is the
    plain pooled statistic. Returns the statistics, the columns'
    reliabilities and the reliable directions (both None when not weighted).
    """
    if len(Xs) == 1 or not reliability_weighted:
        return [PooledStatistic(X, y, directions) for X in Xs], None, None
    columns, basis = reliability(Xs)
    weights = columns ** RELIABILITY_POWER
    shared: dict = {}
    has_prior = directions is not None and bool(np.any(np.asarray(directions) != 0))
    if has_prior and np.any(weights[np.asarray(directions) != 0] > 0):
        shared["prior_weights"] = weights  # (no known column reliable at all: equal weights, as without draws)
    if has_prior or basis.shape[1]:  # (nothing reliable and no prior: part 2 on the principal components)
        shared["rest_basis"] = basis
    return [PooledStatistic(X, y, directions, **shared) for X in Xs], columns, basis


def _null_sd(rows: np.ndarray) -> float:
    """``sqrt(mean_{r,s} corr(rows_r, rows_s))``: the null sd of the mean of R unit-variance statistics."""
    if rows.shape[0] == 1 or np.any(rows.std(axis=1) == 0):  # one draw, or a statistic constant over relabellings
        return 1.0
    corr = np.corrcoef(rows)
    return float(math.sqrt(max(float(np.mean(corr)), 1e-12)))


class DrawAveragedStatistic:
    """The pooled statistic averaged over noise draws (see the module docstring).

    Parameters
    ----------
    Xs : sequence of ndarray (n, d)
        One feature table per draw, rows in the same order (the images).
    y : ndarray (n,)
        1 published, 0 unpublished.
    directions : ndarray (d,) or None
        Member direction per column, as for ``PooledStatistic``.
    """

    def __init__(self, Xs: Sequence[np.ndarray], y: np.ndarray, directions: np.ndarray | None, *,
                 reliability_weighted: bool = True) -> None:
        self.draws, self.column_reliability, basis = draw_statistics(Xs, y, directions,
                                                                      reliability_weighted=reliability_weighted)
        self.reliable_directions = None if basis is None else basis.shape[1]
        first = self.draws[0]
        self.labels, self.nu, self.n1, self.n0 = first.labels, first.nu, first.n1, first.n0
        self.constant = np.all([d.constant for d in self.draws], axis=0)
        self.prior_weights, self.Q, self.normal_scored = first.prior_weights, first.Q, first.normal_scored
        priors = [d.prior for d in self.draws]
        self.prior = None if any(p is None for p in priors) else np.mean(priors, axis=0)
        Y = first.permuted_labels(np.random.default_rng(NULL_SEED), NULL_PERMUTATIONS)
        z1, z2, total = self._per_draw(Y)
        self.null_sd = _null_sd(total)
        self.prior_null_sd = None if z1 is None else _null_sd(z1)
        self.rest_null_sd = None if z2 is None else _null_sd(z2)

    def _per_draw(self, Y: np.ndarray):
        """Each draw's part-1 z, part-2 z (None: absent) and combined Z for labels ``Y``: arrays (R, B)."""
        z1, z2, total = [], [], []
        for d in self.draws:
            _, log_p1, _, log_p2, _ = d.parts(Y)
            z1.append(None if log_p1 is None else _z_from_log_p(log_p1))
            z2.append(None if log_p2 is None else _z_from_log_p(log_p2))
            total.append(d.z(Y))
        stack = (lambda rows: None if any(r is None for r in rows) else np.vstack(rows))
        return stack(z1), stack(z2), np.vstack(total)

    def z(self, Y: np.ndarray) -> np.ndarray:
        """The verdict statistic ``mean_r Z_r / null_sd`` (B,) for label vectors ``Y`` (n, B)."""
        return np.mean([d.z(Y) for d in self.draws], axis=0) / self.null_sd

    def permuted_labels(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return self.draws[0].permuted_labels(rng, count)

    def observe(self) -> tuple[PooledParts, dict]:
        """The pieces on the observed labels, and the draw-specific extras for ``result.json``."""
        seen = [d.observe() for d in self.draws]
        mean = (lambda name: None if getattr(seen[0], name) is None
                else float(np.mean([getattr(o, name) for o in seen])))
        z = float(np.mean([o.z for o in seen])) / self.null_sd
        c1 = None if seen[0].prior_contribution is None else mean("prior_contribution") / self.null_sd
        c2 = None if seen[0].rest_contribution is None else mean("rest_contribution") / self.null_sd
        prior_z = None if seen[0].prior_z is None else mean("prior_z") / self.prior_null_sd
        rest_z = None if seen[0].rest_z is None else mean("rest_z") / self.rest_null_sd
        share = (lambda c: None if c is None or z == 0.0 else c / z)
        parts = PooledParts(
            prior_t=mean("prior_t"),
            prior_log_p=None if prior_z is None else float(special.log_ndtr(-prior_z)),
            rest_F=mean("rest_F"),
            rest_df=seen[0].rest_df,
            rest_log_p=None if rest_z is None else float(special.log_ndtr(-rest_z)),
            directions_tested=seen[0].directions_tested,
            z=z,
            log_p=float(special.log_ndtr(-z)),
            prior_z=prior_z,
            rest_z=rest_z,
            prior_weight=seen[0].prior_weight,
            rest_weight=seen[0].rest_weight,
            prior_contribution=c1,
            rest_contribution=c2,
            prior_share=share(c1),
            rest_share=share(c2),
        )
        extras = {
            "noise_draws": len(self.draws),
            "draw_z": [float(o.z) for o in seen],
            "draw_prior_z": None if prior_z is None else [float(o.prior_z) for o in seen],
            "null_sd": self.null_sd,
            "prior_null_sd": self.prior_null_sd,
            "rest_null_sd": self.rest_null_sd,
            "null_permutations": NULL_PERMUTATIONS,
            "reliability_weighted": self.column_reliability is not None,
            "column_reliability": None if self.column_reliability is None else [float(v) for v in self.column_reliability],
            "reliable_directions": self.reliable_directions,
            "reliable_share": RELIABLE_SHARE,
            "reliability_power": RELIABILITY_POWER,
            # one-sided p that the prior part points *against* membership, at the prior part's null scale
            "prior_p_against": None if prior_z is None else float(special.ndtr(prior_z)),
        }
        return parts, extras
