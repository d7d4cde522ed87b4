"""How many images: the leave-images-out curve and a forward-looking estimate.

Two different questions, answered separately:

* ``sample_size_curve``: how robust is this verdict to leaving images out?
  Verdict p-values on random subsets of the audit's own images. At the full
  size it only repeats the audit, so it says nothing about another audit.
* ``forward_sample_size``: how many images would *another* audit of the same
  kind need for 90% power at ``alpha``? An estimate from the observed effect:
  the verdict statistic ``Z`` is approximately ``N(mu, 1)``, and ``mu`` grows
  as the square root of the effective size ``k = n_p n_u / (n_p + n_u)``
  (exactly so for the prior's t statistic; approximately for the F part).
  So ``mu_hat = Z_obs`` with the 95% interval ``Z_obs +- 1.96``, and the
  needed ``k'`` is ``k ((z_alpha + z_power) / mu)^2``, converted to images at
  the audit's ratio of unpublished to published images. The interval is wide
  by nature: one audit measures its effect with an error of one unit of
  ``Z``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats

from cdi.stats.blocks import minimum_images
from cdi.utils.errors import CDIError
from cdi.stats.feature_checks import check_directions, check_features
from cdi.stats.verdict import _validate_common, audit_test


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
    protocol: str = "pooled",
    draws: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> SampleSizeCurve:
    """Robustness of the verdict to leaving images out.

    For every size ``m`` (published images) draw ``resamples`` subsets of
    ``m`` published and ``round(m * n_u / n_p)`` unpublished images without
    replacement, run the verdict test (``protocol``, no permutations; the
    sequential protocol with a fresh block seed each time), and record the
    median p-value and the share of subsets with ``p < alpha``.

    This is not the number of images another audit would need: the subsets
    are drawn from the same images, so at the full size every subset is the
    audit itself. ``forward_sample_size`` estimates that number. ``draws``:
    the audit's further noise draws (``audit_test``), subset like the first.

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
    extra = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in draws]
    ratio = len(U) / len(P)
    need = minimum_images(folds) if protocol == "sequential" else minimum_images(2)
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
                             protocol=protocol, penalty=penalty, columns=columns,
                             draws=[(a[pi], b[ui]) for a, b in extra])
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
                           protocol=protocol, pvalues=pvalues)


@dataclass
class ForwardSampleSize:
    """Estimated images another audit would need for ``power`` at ``alpha``.

    ``published_needed`` (and ``unpublished_needed``, at the audit's ratio)
    is the point estimate; ``published_low`` / ``published_high`` the 95%
    interval (``published_high`` None: the effect may be zero, no finite
    size is assured). None everywhere when the observed statistic is not
    positive.
    """

    published_needed: int | None
    unpublished_needed: int | None
    published_low: int | None
    published_high: int | None
    power: float
    alpha: float
    observed_z: float
    z_interval: tuple[float, float]
    method: str = ("estimate: verdict statistic Z ~ N(mu, 1), mu proportional to sqrt(n_p n_u / (n_p + n_u)); "
                   "95% interval from Z +- 1.96")

    def to_dict(self) -> dict:
        return asdict(self)


def forward_sample_size(z: float, n_published: int, n_unpublished: int, *, alpha: float = 0.01,
                        power: float = 0.9, confidence: float = 0.95) -> ForwardSampleSize:
    """Images for ``power`` at ``alpha`` from the observed verdict statistic (module docstring)."""
    _validate_common(alpha, 0)
    if not 0.0 < power < 1.0:
        raise CDIError(f"power must lie strictly between 0 and 1, got {power}")
    half = float(stats.norm.isf((1.0 - confidence) / 2.0))
    target = float(stats.norm.isf(alpha) + stats.norm.isf(1.0 - power))
    ratio = n_unpublished / n_published
    k = n_published * n_unpublished / (n_published + n_unpublished)

    def published_for(mu: float) -> int | None:
        if not mu > 0:
            return None
        k_needed = k * (target / mu) ** 2
        # k' = n' * (ratio n') / (n' + ratio n') = n' ratio / (1 + ratio)
        return max(2, int(math.ceil(k_needed * (1.0 + ratio) / ratio)))

    z = float(z)
    needed = published_for(z)
    return ForwardSampleSize(
        published_needed=needed,
        unpublished_needed=None if needed is None else int(math.ceil(needed * ratio)),
        published_low=published_for(z + half) if needed is not None else None,
        published_high=published_for(z - half) if needed is not None else None,
        power=float(power),
        alpha=float(alpha),
        observed_z=z,
        z_interval=(z - half, z + half),
    )
