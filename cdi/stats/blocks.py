"""Blocks of images and each block's test statistic.

The scoring protocols (``cdi.stats.scoring``) deal the images into ``folds``
stratified blocks (``assign_blocks``), each holding at least
``MIN_PER_BLOCK`` images of each class, and test one block at a time. A
block's statistic (``block_z``) is Welch's one-sided t-test on the block's
rank-based normal scores, as a normal deviate; ``welch_t``, ``z_from_t`` and
``normal_scores`` work on many score columns (label vectors) at once.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

from cdi.utils.errors import CDIError

#: Fewest images of each class that every block must hold: a block's Welch
#: t-test needs a variance per class, and a scorer needs both classes.
MIN_PER_BLOCK = 5


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
