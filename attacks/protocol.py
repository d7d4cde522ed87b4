"""The benchmark protocol for single-image membership inference (CopyMark, Algorithms 1 and 2).

1. **Split.** Members and non-members are split into a *calibration* split
   (CopyMark's "validation" set) and a *test* split, seeded and stratified:
   each split holds equal numbers of members and non-members where the data
   allow (``split_calibration_test``). A user can instead give the four
   folders (calibration/test x members/non-members) directly.
2. **Calibration** (Algorithm 1). The method's oriented scores (higher =
   member) on the calibration split give the exact ROC, the AUC, and the TPR
   at FPR <= 1% and <= 0.1% with the thresholds that reach them
   (``attacks.metrics``). A method with trained parts (a classifier, a
   scaling, a weight chosen on data) is *cross-fitted*: the calibration split
   is cut into K stratified folds, and each image is scored by a copy fitted
   on the other folds, so every calibration figure is out-of-fold, never
   in-sample (CopyMark's in-sample 1.000 rows are an artefact of scoring the
   training data). The thresholds are chosen on those out-of-fold scores.
3. **Test** (Algorithm 2, the blind test). A copy fitted on the whole
   calibration split scores the test split; the calibration thresholds are
   applied unchanged, and the TPR and the FPR actually reached are reported.
   A test FPR above its bound is flagged: it is the failure CopyMark
   highlights (thresholds that do not transfer).
4. **Uncertainty.** Every figure carries a seeded 95% percentile bootstrap
   interval. Calibration figures resample the calibration scores (members and
   non-members separately) and recompute everything, thresholds included;
   test figures resample the test scores with the calibration thresholds
   held fixed, i.e. they describe the test-set sampling error of *these*
   thresholds. For trained methods the models are not refitted inside the
   bootstrap, so the intervals do not include the variability of training.

A *transductive* method (SecMI++) normalises its features over the pooled
evaluation set (calibration and test images together, labels unused) before
anything else, as the method prescribes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from cdi.attacks.metrics import (
    _auc,
    _operating_point,
    bootstrap_roc,
    check_scores,
    percentile_interval,
    rates_at_threshold,
    roc_curve,
)
from cdi.attacks.scorers import Scorer
from cdi.utils.errors import CDIError

#: The FPR bounds of the protocol, keyed by the suffix used in result names
#: (``tpr_at_1fpr`` is TPR at FPR <= 1%, ``tpr_at_01fpr`` at FPR <= 0.1%).
FPR_BOUNDS: dict[str, float] = {"1": 0.01, "01": 0.001}


# ----------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Indices into the member list and the non-member list for each split.

    ``unused_*`` are images left out to keep the splits balanced.
    """

    calibration_members: np.ndarray
    calibration_nonmembers: np.ndarray
    test_members: np.ndarray
    test_nonmembers: np.ndarray
    unused_members: np.ndarray
    unused_nonmembers: np.ndarray
    seed: int

    def apply(
        self, members: np.ndarray, nonmembers: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows of ``members`` and ``nonmembers`` arranged as (X_cal, y_cal, X_test, y_test).

        Members come first in each split, labelled 1; non-members follow, labelled 0.
        """
        members, nonmembers = np.asarray(members), np.asarray(nonmembers)
        x_cal = np.concatenate([members[self.calibration_members], nonmembers[self.calibration_nonmembers]])
        x_test = np.concatenate([members[self.test_members], nonmembers[self.test_nonmembers]])
        y_cal = np.r_[np.ones(self.calibration_members.size, np.int8), np.zeros(self.calibration_nonmembers.size, np.int8)]
        y_test = np.r_[np.ones(self.test_members.size, np.int8), np.zeros(self.test_nonmembers.size, np.int8)]
        return x_cal, y_cal, x_test, y_test

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


def split_calibration_test(
    n_members: int,
    n_nonmembers: int,
    *,
    calibration_fraction: float = 0.5,
    balance: bool = True,
    seed: int = 0,
) -> Split:
    """Seeded, stratified split of members and non-members into calibration and test.

    Parameters
    ----------
    n_members, n_nonmembers : int
        How many member and non-member images there are.
    calibration_fraction : float
        Share of each class that goes to the calibration split.
    balance : bool
        If True (CopyMark's design), both splits hold as many members as
        non-members: ``m = min(n_members, n_nonmembers)`` images of each class
        are used, ``round(calibration_fraction * m)`` of each in calibration,
        the rest of the ``m`` in test; the surplus of the larger class is left
        out (``unused_*``). If False, every image is used and each class is
        split by ``calibration_fraction`` on its own.
    seed : int
        Seed of the permutation; the same arguments give the same split.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise CDIError(f"calibration fraction must lie strictly between 0 and 1, got {calibration_fraction}")
    rng = np.random.default_rng(seed)
    perm_m = rng.permutation(int(n_members))
    perm_n = rng.permutation(int(n_nonmembers))
    if balance:
        m = min(int(n_members), int(n_nonmembers))
        sizes_m = sizes_n = (int(round(calibration_fraction * m)), m)
    else:
        sizes_m = (int(round(calibration_fraction * n_members)), int(n_members))
        sizes_n = (int(round(calibration_fraction * n_nonmembers)), int(n_nonmembers))
    for name, (cal, used) in {"members": sizes_m, "non-members": sizes_n}.items():
        if cal < 1 or used - cal < 1:
            raise CDIError(
                f"too few {name} to split into calibration and test ({used} usable, {cal} for calibration); "
                "add images or give the calibration and test folders separately"
            )
    return Split(
        calibration_members=np.sort(perm_m[: sizes_m[0]]),
        calibration_nonmembers=np.sort(perm_n[: sizes_n[0]]),
        test_members=np.sort(perm_m[sizes_m[0] : sizes_m[1]]),
        test_nonmembers=np.sort(perm_n[sizes_n[0] : sizes_n[1]]),
        unused_members=np.sort(perm_m[sizes_m[1] :]),
        unused_nonmembers=np.sort(perm_n[sizes_n[1] :]),
        seed=int(seed),
    )


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------
def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@dataclass
class MethodResult:
    """The protocol's figures for one method.

    Attributes
    ----------
    method : str
        Scorer name.
    calibration : dict
        ``auc``, ``tpr_at_1fpr``, ``tpr_at_01fpr``, the thresholds
        ``threshold_1`` and ``threshold_01`` (score >= threshold predicts
        member; ``inf`` when no threshold meets the bound), and the FPR each
        reaches on calibration, ``fpr_at_1fpr`` and ``fpr_at_01fpr``.
    test : dict
        ``tpr_1``, ``fpr_1``, ``tpr_01``, ``fpr_01`` (the calibration
        thresholds applied unchanged), the flags ``fpr_1_exceeds_bound`` and
        ``fpr_01_exceeds_bound``, and the threshold-free ``auc``.
    intervals : dict
        ``"calibration.auc"`` and so on -> [low, high], the percentile
        bootstrap interval at ``level``.
    calibration_protocol : str
        ``"fixed rule"`` or ``"out-of-fold (K-fold cross-fitting)"``.
    n_calibration, n_test : dict
        ``{"members": ..., "nonmembers": ...}``.
    scores : dict
        Oriented scores and labels of both splits (``calibration_scores``,
        ``calibration_labels``, ``test_scores``, ``test_labels``), so curves
        can be re-plotted without the model.
    cost : dict or None
        What the caller measured, e.g. ``{"forward": 12, "backward": 0,
        "seconds": 3.2}`` per image.
    seed, n_bootstrap, level
        How the folds and intervals were drawn.
    """

    method: str
    calibration: dict[str, float]
    test: dict[str, Any]
    intervals: dict[str, list[float]]
    calibration_protocol: str
    n_calibration: dict[str, int]
    n_test: dict[str, int]
    scores: dict[str, list]
    cost: dict[str, float] | None = None
    seed: int = 0
    n_bootstrap: int = 1000
    level: float = 0.95
    columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; infinite thresholds become None (strict JSON)."""
        out = asdict(self)
        out["calibration"] = {k: _finite_or_none(v) for k, v in self.calibration.items()}
        out["test"] = {k: (v if isinstance(v, bool) else _finite_or_none(v)) for k, v in self.test.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodResult":
        """Inverse of ``to_dict`` (None thresholds read back as +inf)."""
        data = dict(data)
        data["calibration"] = {k: (np.inf if v is None else v) for k, v in data["calibration"].items()}
        data["test"] = {k: (np.nan if v is None else v) for k, v in data["test"].items()}
        return cls(**data)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
def _calibration_figures(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    roc = roc_curve(scores, labels)
    out = {"auc": _auc(roc)}
    for key, bound in FPR_BOUNDS.items():
        point = _operating_point(roc, bound)
        out[f"tpr_at_{key}fpr"] = point.tpr
        out[f"fpr_at_{key}fpr"] = point.fpr
        out[f"threshold_{key}"] = point.threshold
    return out


def _test_figures(scores: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, threshold in thresholds.items():
        out[f"tpr_{key}"], out[f"fpr_{key}"] = rates_at_threshold(scores, labels, threshold)
    out["auc"] = _auc(roc_curve(scores, labels))
    return out


def evaluate_scores(
    method: str,
    calibration_scores: np.ndarray,
    calibration_labels: np.ndarray,
    test_scores: np.ndarray,
    test_labels: np.ndarray,
    *,
    calibration_protocol: str = "fixed rule",
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    cost: dict[str, float] | None = None,
    columns: Sequence[str] = (),
) -> MethodResult:
    """Algorithms 1 and 2 on oriented scores (higher = member), with bootstrap intervals.

    The calibration scores must already be out-of-fold for a trained method
    (``evaluate`` does that); this function never fits anything.
    """
    cal_s, cal_y = check_scores(calibration_scores, calibration_labels, "calibration scores")
    test_s, test_y = check_scores(test_scores, test_labels, "test scores")
    calibration = _calibration_figures(cal_s, cal_y)
    thresholds = {key: calibration[f"threshold_{key}"] for key in FPR_BOUNDS}
    test = _test_figures(test_s, test_y, thresholds)
    for key, bound in FPR_BOUNDS.items():
        test[f"fpr_{key}_exceeds_bound"] = bool(test[f"fpr_{key}"] > bound)

    bounds = list(FPR_BOUNDS.values())
    cal_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    cal_reps = bootstrap_roc(cal_s, cal_y, max_fprs=bounds, n_resamples=n_bootstrap, seed=cal_seed)
    test_reps = bootstrap_roc(test_s, test_y, thresholds=list(thresholds.values()), n_resamples=n_bootstrap,
                              seed=test_seed)
    replicates = {"calibration.auc": cal_reps.auc, "test.auc": test_reps.auc}
    for j, key in enumerate(FPR_BOUNDS):
        replicates[f"calibration.tpr_at_{key}fpr"] = cal_reps.tpr_at_fpr[:, j]
        replicates[f"test.tpr_{key}"] = test_reps.tpr_at_threshold[:, j]
        replicates[f"test.fpr_{key}"] = test_reps.fpr_at_threshold[:, j]
    names = list(replicates)
    limits = percentile_interval(np.column_stack([replicates[k] for k in names]), level)
    intervals = {k: [float(low), float(high)] for k, (low, high) in zip(names, limits)}

    return MethodResult(
        method=method,
        calibration=calibration,
        test=test,
        intervals=intervals,
        calibration_protocol=calibration_protocol,
        n_calibration={"members": int(cal_y.sum()), "nonmembers": int((cal_y == 0).sum())},
        n_test={"members": int(test_y.sum()), "nonmembers": int((test_y == 0).sum())},
        scores={
            "calibration_scores": cal_s.tolist(),
            "calibration_labels": cal_y.tolist(),
            "test_scores": test_s.tolist(),
            "test_labels": test_y.tolist(),
        },
        cost=None if cost is None else dict(cost),
        seed=int(seed),
        n_bootstrap=int(n_bootstrap),
        level=float(level),
        columns=list(columns),
    )


def cross_fit_scores(scorer: Scorer, x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold scores: each image scored by a copy of ``scorer`` fitted on the other folds.

    Folds are stratified and shuffled with ``seed``.
    """
    y = np.asarray(y)
    smallest = int(min((y == 1).sum(), (y == 0).sum()))
    if folds < 2 or smallest < folds:
        raise CDIError(
            f"method {scorer.name!r} is trained, and cross-fitting it with {folds} folds needs at least "
            f"{max(folds, 2)} members and non-members in the calibration split (have {smallest} of the "
            "smaller class); add calibration images or lower the number of folds (at least 2)"
        )
    out = np.empty(y.shape[0], dtype=np.float64)
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        out[held] = copy.deepcopy(scorer).fit(x[train], y[train]).score(x[held])
    return out


def evaluate(
    scorer: Scorer,
    calibration: np.ndarray,
    calibration_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    *,
    columns: Sequence[str],
    folds: int = 5,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    cost: dict[str, float] | None = None,
) -> MethodResult:
    """Run the whole protocol for one method on feature matrices.

    Parameters
    ----------
    scorer : Scorer
        An unfitted scorer (``attacks.scorers.make_scorer``); it is not modified.
    calibration, test : numpy.ndarray
        (n, d) feature values of the two splits, with column names ``columns``.
        The scorer reads the columns it needs (``scorer.select``).
    calibration_labels, test_labels : numpy.ndarray
        1 = member, 0 = non-member.
    folds : int
        K of the cross-fitting used for trained methods on calibration.
    n_bootstrap, level, seed
        Bootstrap resamples, interval level, and the seed of folds and
        bootstrap draws.
    cost : dict, optional
        Model calls and seconds per image, recorded as given.
    """
    columns = list(columns)
    calibration, test = np.asarray(calibration, dtype=np.float64), np.asarray(test, dtype=np.float64)
    for name, x, y in (("calibration", calibration, calibration_labels), ("test", test, test_labels)):
        if x.ndim != 2 or x.shape[1] != len(columns) or x.shape[0] != len(y):
            raise CDIError(
                f"{name} features have shape {x.shape}, expected ({len(y)}, {len(columns)}) "
                "(one row per image, one column per name)"
            )
    used = scorer.select(columns)
    idx = [columns.index(c) for c in used]
    x_cal, x_test = calibration[:, idx], test[:, idx]
    for name, x in (("calibration", x_cal), ("test", x_test)):
        bad = ~np.isfinite(x).all(axis=0)
        if bad.any():
            raise CDIError(
                f"method {scorer.name!r}: {name} features contain NaN or infinite values in "
                f"{[c for c, b in zip(used, bad) if b]}"
            )
    scorer = copy.deepcopy(scorer)
    if scorer.transductive:
        scorer.fit_pool(np.concatenate([x_cal, x_test]))
    if scorer.trained:
        cal_scores = cross_fit_scores(scorer, x_cal, np.asarray(calibration_labels), folds=folds, seed=seed)
        test_scores = copy.deepcopy(scorer).fit(x_cal, np.asarray(calibration_labels)).score(x_test)
        protocol = f"out-of-fold ({folds}-fold cross-fitting)"
    else:
        cal_scores, test_scores = scorer.score(x_cal), scorer.score(x_test)
        protocol = "fixed rule"
    return evaluate_scores(
        scorer.name,
        cal_scores,
        calibration_labels,
        test_scores,
        test_labels,
        calibration_protocol=protocol,
        n_bootstrap=n_bootstrap,
        level=level,
        seed=seed,
        cost=cost,
        columns=used,
    )
