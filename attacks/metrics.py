"""Metrics of single-image membership decisions.

Conventions, used everywhere in ``attacks``:

* members are the positive class (label 1), non-members the negative class
  (label 0);
* scores are *oriented*: higher = member. A method whose raw value is lower
  for members (every loss-like quantity) is negated first, with ``orient``;
* an image is predicted to be a member when its score is ``>= threshold``.
  ``threshold = +inf`` predicts no member at all.

The ROC is exact: one point per distinct score value, so images with tied
scores enter the prediction together and move TPR and FPR at the same time
(a tie is never broken in the attack's favour). The AUC is the trapezoidal
area under that curve, which equals ``P(s_member > s_nonmember) +
0.5 * P(s_member == s_nonmember)``.

``tpr_at_fpr`` is CopyMark's Algorithm 1: the largest TPR among thresholds
whose FPR does not exceed the bound, with no interpolation between ROC
points. ``rates_at_threshold`` is its Algorithm 2: a fixed threshold applied
to another set, returning the TPR and the FPR actually reached.

``bootstrap_roc`` resamples members and non-members separately (stratified,
so every replicate keeps both classes and their counts) with a seeded
generator, and computes every replicate's figures at once from the draw
counts (``weighted_roc_figures``); ``percentile_interval`` turns the
replicates into percentile intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cdi.utils.errors import CDIError


def check_scores(scores: np.ndarray, labels: np.ndarray, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``scores`` (finite floats) and ``labels`` (0/1, both present).

    Returns float64 scores and int8 labels. Raises ``CDIError`` naming the problem.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1 or scores.shape != labels.shape:
        raise CDIError(
            f"{what}: expected one score and one label per image, got shapes {scores.shape} and {labels.shape}"
        )
    bad = ~np.isfinite(scores)
    if bad.any():
        raise CDIError(
            f"{what}: {int(bad.sum())} of {scores.size} scores are NaN or infinite; "
            "check the feature columns the method reads"
        )
    if not np.isin(labels, (0, 1)).all():
        raise CDIError(f"{what}: labels must be 1 (member) or 0 (non-member)")
    labels = labels.astype(np.int8)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise CDIError(
            f"{what}: need both members and non-members, got {n_pos} members and {labels.size - n_pos} non-members"
        )
    return scores, labels


def orient(values: np.ndarray, direction: int) -> np.ndarray:
    """Scores with higher = member from raw values whose member ``direction`` is +1 or -1."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (higher = member) or -1 (lower = member), got {direction}")
    return np.asarray(values, dtype=np.float64) * direction


@dataclass(frozen=True)
class RocCurve:
    """An exact ROC curve, one point per distinct score (plus the origin).

    ``thresholds[i]`` gives the point ``(fpr[i], tpr[i])`` when images with
    ``score >= thresholds[i]`` are predicted members; ``thresholds[0]`` is
    ``+inf`` (nothing predicted). ``tp`` and ``fp`` are the integer counts.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_members: int
    n_nonmembers: int


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> RocCurve:
    """The exact ROC of oriented ``scores`` (higher = member), members (label 1) positive."""
    scores, labels = check_scores(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # Last position of each group of tied scores: ties enter together.
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.r_[0, np.cumsum(y, dtype=np.int64)[ends]]
    fp = np.r_[0, np.cumsum(1 - y, dtype=np.int64)[ends]]
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    return RocCurve(
        fpr=fp / n_neg,
        tpr=tp / n_pos,
        thresholds=np.r_[np.inf, s[ends]],
        tp=tp,
        fp=fp,
        n_members=n_pos,
        n_nonmembers=n_neg,
    )


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the exact ROC (ties count one half)."""
    return _auc(roc_curve(scores, labels))


def _auc(roc: RocCurve) -> float:
    return float(np.sum(np.diff(roc.fpr) * (roc.tpr[1:] + roc.tpr[:-1]) / 2.0))


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold chosen under an FPR bound, with the rates it reaches.

    ``threshold`` is the smallest score still predicted member (``+inf``: no
    threshold meets the bound except predicting nobody).
    """

    max_fpr: float
    threshold: float
    tpr: float
    fpr: float


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, max_fpr: float) -> OperatingPoint:
    """The largest TPR whose FPR does not exceed ``max_fpr`` (no interpolation).

    Among thresholds reaching that TPR, the highest one (lowest FPR) is
    returned. With ``n`` non-members, an FPR of ``k / n`` is allowed when
    ``k / n <= max_fpr``.
    """
    return _operating_point(roc_curve(scores, labels), max_fpr)


def _operating_point(roc: RocCurve, max_fpr: float) -> OperatingPoint:
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in [0, 1], got {max_fpr}")
    allowed = roc.fp / roc.n_nonmembers <= max_fpr  # a prefix: fp never decreases
    last = int(np.flatnonzero(allowed)[-1])  # the origin is always allowed
    best = int(np.flatnonzero(roc.tp == roc.tp[last])[0])
    return OperatingPoint(
        max_fpr=float(max_fpr),
        threshold=float(roc.thresholds[best]),
        tpr=float(roc.tpr[best]),
        fpr=float(roc.fpr[best]),
    )


def rates_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) when images with ``score >= threshold`` are predicted members."""
    scores, labels = check_scores(scores, labels)
    predicted = scores >= threshold
    members = labels == 1
    return float(predicted[members].mean()), float(predicted[~members].mean())


@dataclass(frozen=True)
class RocFigures:
    """ROC figures of several (re)weighted copies of one scored set, one row per copy.

    ``tpr_at_fpr[:, j]`` is the TPR at FPR <= ``max_fprs[j]``;
    ``tpr_at_threshold[:, j]`` and ``fpr_at_threshold[:, j]`` are the rates
    when ``score >= thresholds[j]`` predicts member.
    """

    auc: np.ndarray
    tpr_at_fpr: np.ndarray
    tpr_at_threshold: np.ndarray
    fpr_at_threshold: np.ndarray


def weighted_roc_figures(
    scores: np.ndarray,
    labels: np.ndarray,
    counts: np.ndarray,
    *,
    max_fprs: Sequence[float] = (),
    thresholds: Sequence[float] = (),
) -> RocFigures:
    """ROC figures of the sets in which image i appears ``counts[r, i]`` times, for every row r.

    The same numbers as ``roc_auc``, ``tpr_at_fpr`` and ``rates_at_threshold``
    on ``np.repeat(scores, counts[r])``, computed for all rows at once: the
    images are sorted by score once, and each row's exact ROC is a cumulative
    sum of its counts read at the ends of the groups of tied scores (ties
    enter together; a group drawn zero times only repeats a point).
    """
    scores, labels = check_scores(scores, labels)
    counts = np.atleast_2d(np.asarray(counts, dtype=np.int64))
    if counts.shape[1] != scores.size or (counts < 0).any():
        raise ValueError(f"counts must be non-negative with one column per image, got shape {counts.shape}")
    order = np.argsort(-scores, kind="mergesort")
    s, y, c = scores[order], labels[order].astype(bool), counts[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp_all = np.cumsum(np.where(y, c, 0), axis=1)
    fp_all = np.cumsum(np.where(y, 0, c), axis=1)
    n_pos, n_neg = tp_all[:, -1].astype(np.float64), fp_all[:, -1].astype(np.float64)
    if (n_pos == 0).any() or (n_neg == 0).any():
        raise ValueError("every row of counts must draw at least one member and one non-member")
    zero = np.zeros((c.shape[0], 1), dtype=np.int64)
    tp = np.concatenate([zero, tp_all[:, ends]], axis=1)
    fp = np.concatenate([zero, fp_all[:, ends]], axis=1)
    auc = (np.diff(fp, axis=1) * (tp[:, 1:] + tp[:, :-1])).sum(axis=1) / (2.0 * n_pos * n_neg)
    rows = np.arange(c.shape[0])
    tpr_at_fpr = np.empty((c.shape[0], len(max_fprs)))
    for j, bound in enumerate(max_fprs):
        last = (fp / n_neg[:, None] <= bound).sum(axis=1) - 1  # allowed points form a prefix
        tpr_at_fpr[:, j] = tp[rows, last] / n_pos
    tpr_thr = np.empty((c.shape[0], len(thresholds)))
    fpr_thr = np.empty((c.shape[0], len(thresholds)))
    for j, threshold in enumerate(thresholds):
        k = int(np.count_nonzero(s >= threshold))  # s is sorted descending
        tpr_thr[:, j] = tp_all[:, k - 1] / n_pos if k else 0.0
        fpr_thr[:, j] = fp_all[:, k - 1] / n_neg if k else 0.0
    return RocFigures(auc=auc, tpr_at_fpr=tpr_at_fpr, tpr_at_threshold=tpr_thr, fpr_at_threshold=fpr_thr)


def bootstrap_counts(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified bootstrap draws as counts: row r says how often each image is drawn.

    Members and non-members are resampled with replacement separately, each
    to its own count, so every replicate keeps both classes. Shape
    (n_resamples, n).
    """
    labels = np.asarray(labels)
    n = labels.size
    offsets = n * np.arange(n_resamples)[:, None]
    out = np.zeros(n_resamples * n, dtype=np.int64)
    for cls in (1, 0):
        members = np.flatnonzero(labels == cls)
        draws = members[rng.integers(0, members.size, (n_resamples, members.size))]
        out += np.bincount((draws + offsets).ravel(), minlength=n_resamples * n)
    return out.reshape(n_resamples, n)


def bootstrap_roc(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    max_fprs: Sequence[float] = (),
    thresholds: Sequence[float] = (),
    n_resamples: int = 1000,
    seed: int | np.random.SeedSequence = 0,
) -> RocFigures:
    """Stratified bootstrap replicates of the ROC figures.

    Thresholds are held fixed; the TPR at each FPR bound is re-optimised in
    every replicate, as Algorithm 1 would on that resample. Replicates are
    drawn in blocks (``bootstrap_counts``) and evaluated together
    (``weighted_roc_figures``); the draws depend only on ``seed``, the labels
    and ``n_resamples``.
    """
    scores, labels = check_scores(scores, labels)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    step = max(1, 1_000_000 // scores.size)  # bounds the memory of one block
    parts = []
    for start in range(0, n_resamples, step):
        counts = bootstrap_counts(labels, min(step, n_resamples - start), rng)
        parts.append(weighted_roc_figures(scores, labels, counts, max_fprs=max_fprs, thresholds=thresholds))
    return RocFigures(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("auc", "tpr_at_fpr", "tpr_at_threshold", "fpr_at_threshold")))


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile intervals, shape (k, 2), from bootstrap replicates of shape (n, k)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0 * 100.0
    return np.percentile(replicates, [tail, 100.0 - tail], axis=0).T
