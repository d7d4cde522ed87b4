"""What carried the evidence: per-feature differences between the collections and per-family contributions.

Two descriptive summaries of a feature table, written into ``result.json``
(``AuditResult.feature_effects``) and drawn by the report's signal chart:

1. **Per feature**, the standardised difference between the published and
   the unpublished images on the same label-free transform the pooled test
   uses (rank-based normal scores over all images, ``cdi.pooled``):
   ``d = direction * (mean_P - mean_U) / s`` with ``s`` the pooled
   within-collection standard deviation (Cohen's d), oriented by the
   column's known member direction so that ``d > 0`` means the published
   images look more like training images. Columns without a known
   direction keep the sign of ``mean_P - mean_U`` and are marked
   ``direction = 0``. The 95% interval is ``d +- 1.96 se`` with the usual
   large-sample ``se = sqrt(1/n_P + 1/n_U + d^2 / (2 (n_P + n_U)))``
   (Hedges & Olkin 1985, eq. 5.14); it is per feature and not corrected
   for the number of features.
2. **Per family**, its contribution to part 1 of the pooled test (the
   Student t of the prior score ``a = sum_j w_j z_j``). Because ``a`` is
   linear in the columns, its mean difference splits exactly into
   ``sum_j w_j (mean_P z_j - mean_U z_j)``; each family's sum, divided by
   the total and multiplied by ``t1``, is its signed contribution to
   ``t1`` (contributions add up to ``t1``).

With several noise draws both are the means over the draws, with the
verdict's reliability weights (``cdi.stats.draws``): the families'
contributions add up to the draws' mean ``t1``, and each feature's
interval is the one-draw interval at the mean ``d`` (averaging draws only
removes noise, so it is at least as wide as the mean's).

Neither summary enters the verdict: the verdict's test is in ``cdi.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cdi.stats.draws import draw_statistics
from cdi.stats.pooled import PooledStatistic

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


def _mean_difference(stat: PooledStatistic, y: np.ndarray) -> np.ndarray:
    """Published minus unpublished mean of every normal-scored column."""
    return stat.normal_scored[y == 1].mean(axis=0) - stat.normal_scored[y == 0].mean(axis=0)


def _standardised_difference(stat: PooledStatistic, y: np.ndarray) -> np.ndarray:
    """Cohen's d of every normal-scored column (0 for a constant column), not yet oriented."""
    published, unpublished = stat.normal_scored[y == 1], stat.normal_scored[y == 0]
    n1, n0 = len(published), len(unpublished)
    var = ((n1 - 1) * published.var(axis=0, ddof=1) + (n0 - 1) * unpublished.var(axis=0, ddof=1)) / (n1 + n0 - 2)
    sd = np.sqrt(var)
    return np.where(sd > 0, _mean_difference(stat, y) / np.where(sd > 0, sd, 1.0), 0.0)


def feature_effects(
    X_published: np.ndarray,
    X_unpublished: np.ndarray,
    columns: Sequence[str],
    directions: Sequence[int] | None,
    family_of: Mapping[str, str],
    draws: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> dict[str, Any]:
    """Per-feature standardised differences and per-family contributions to the prior part (see the module).

    Parameters
    ----------
    X_published, X_unpublished : ndarray (n_P, d), (n_U, d)
        Feature rows as the test read them.
    columns : list of str
        Column names.
    directions : sequence of {-1, 0, +1}, optional
        Member direction of every column (as in ``cdi.stats.audit_test``).
    family_of : mapping
        Column -> feature family name.
    draws : sequence of (published, unpublished) arrays, optional
        The further noise draws the verdict averaged over (``audit_test``'s
        ``draws``): every number is then the mean over the draws, and the
        prior's weights are the verdict's (``cdi.stats.draws``).

    Returns
    -------
    dict
        ``{"transform", "interval", "features": [{column, family, direction, d, low, high}],
        "prior_families": [{family, contribution, share}] or None, "prior_t": float or None}``;
        JSON-able. ``share`` is the contribution over ``t1`` (None unless ``t1 > 0``).
    """
    y = np.r_[np.ones(len(X_published)), np.zeros(len(X_unpublished))]
    dirs = None if directions is None else np.asarray(directions, dtype=float)
    Xs = [np.concatenate([np.asarray(P, float), np.asarray(U, float)])
          for P, U in [(X_published, X_unpublished), *draws]]
    stats = draw_statistics(Xs, y, dirs)[0]  # the verdict's statistics, without its null-sd relabellings
    orient = np.ones(len(columns)) if dirs is None else np.where(dirs == 0, 1.0, dirs)
    n1, n0 = stats[0].n1, stats[0].n0
    d = np.mean([orient * _standardised_difference(stat, y) for stat in stats], axis=0)
    rows = []
    for j, column in enumerate(columns):
        se = math.sqrt(1.0 / n1 + 1.0 / n0 + d[j] * d[j] / (2.0 * (n1 + n0)))
        rows.append({
            "column": column, "family": family_of.get(column, column),
            "direction": 0 if dirs is None else int(dirs[j]),
            "d": float(d[j]), "low": float(d[j] - Z95 * se), "high": float(d[j] + Z95 * se),
        })
    families, prior_t = None, None
    if stats[0].prior_weights is not None:
        by_family: dict[str, float] = {}
        ts = []
        for stat in stats:  # each draw's t splits exactly; their mean is the mean of the splits
            t = stat.observe().prior_t
            parts = stat.prior_weights * _mean_difference(stat, y)  # the prior score's mean difference, by column
            total = float(parts.sum())
            ts.append(t)
            for column, part in zip(columns, parts):
                if part != 0.0:
                    name = family_of.get(column, column)
                    share = t * float(part) / total if total != 0 else 0.0
                    by_family[name] = by_family.get(name, 0.0) + share / len(stats)
        prior_t = float(np.mean(ts))
        families = [{"family": name, "contribution": contribution,
                     "share": contribution / prior_t if prior_t > 0 else None}
                    for name, contribution in by_family.items()]
        families.sort(key=lambda f: -f["contribution"])
    return {
        "transform": "rank-based normal scores over all images (the pooled test's label-free transform)",
        "interval": "95%, per feature, not corrected for the number of features",
        "features": rows,
        "prior_families": families,
        "prior_t": prior_t,
    }
