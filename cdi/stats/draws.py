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
averages those fresh draws too. Measured on the toy demo (150 + 150, 20
seeds, noise drawn per image and timestep): seed sd of the verdict's Z 0.36
with one draw, 0.20 with two, 0.13 with three (docs/notes).

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

from cdi.stats.pooled import PooledParts, PooledStatistic, _z_from_log_p

#: Relabellings that estimate the null correlation of the draws' statistics (sd of a correlation ~ (1 - rho^2)/sqrt(2000)).
NULL_PERMUTATIONS = 2000
#: The fixed generator of those relabellings: part of the statistic's definition, not of any seed.
NULL_SEED = 0x5EED_D4A3


def _null_sd(rows: np.ndarray) -> float:
    """``sqrt(mean_{r,s} corr(rows_r, rows_s))``: the null sd of the mean of R unit-variance statistics."""
    if rows.shape[0] == 1:
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

    def __init__(self, Xs: Sequence[np.ndarray], y: np.ndarray, directions: np.ndarray | None) -> None:
        self.draws = [PooledStatistic(X, y, directions) for X in Xs]
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
            # one-sided p that the prior part points *against* membership, at the prior part's null scale
            "prior_p_against": None if prior_z is None else float(special.ndtr(prior_z)),
        }
        return parts, extras
