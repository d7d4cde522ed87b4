"""Single-image membership decision rules built on feature columns.

Every method of the benchmark is a ``Scorer``: it names the feature columns it
reads (``select``), may be fitted on labelled calibration images (``fit``) or,
for a transductive method, on the unlabelled pooled evaluation set
(``fit_pool``), and returns one *oriented* score per image (``score``:
higher = member). The protocol (``attacks.protocol.evaluate``) handles the
rest: cross-fitting of trained scorers, thresholds, bootstrap.

Methods (``make_scorer(name)``; REFERENCE.md section 3):

============  =====================================================  =======
name          rule                                                   trained
============  =====================================================  =======
``loss``      Denoising Loss (Carlini et al.), lower = member        no
``secmi``     SecMI_stat (Duan et al.), lower = member               no
``secmi++``   per-t SecMI divided by its pooled mean, averaged       pooled
``pia``       PIA (Kong et al.), lower = member                      no
``pian``      PIAN, lower = member                                   no
``pfami``     PFAMI (Fu et al.), lower = member                      no
``sima``      SimA (Rao et al.): the sima_t column best on cal       yes
``gsa1``      XGBoost, 200 trees, on GSA1 gradient norms             yes
``gsa2``      XGBoost, 200 trees, on GSA2 gradient norms             yes
``clid_th``   robust-scaled mix of L(c) and -mean(D), weight on cal  yes
``clid_vec``  XGBoost (CLiD's parameters) on [L(c), D_1..D_k]        yes
``cdi``       standardise + logistic regression on CDI columns       yes
``blind``     classifier on model-free image embeddings              yes
============  =====================================================  =======

Column names follow ``features`` (``denoising_loss``, ``secmi``, ``pia``,
``pian``, ``pfami``, ``gsa1_<param>``, ``gsa2_<param>``, ``clid_loss``,
``clid_d1``..``clid_dk``) plus ``secmi_t<t>`` for per-timestep SecMI scores.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cdi.attacks.metrics import roc_auc
from cdi.utils.errors import CDIError


class Scorer:
    """Base class: a rule from feature columns to an oriented membership score.

    Attributes
    ----------
    name : str
        The method's name in results.
    trained : bool
        True if ``fit`` learns from labels; the protocol then reports its
        calibration figures out-of-fold.
    transductive : bool
        True if ``fit_pool`` must see the pooled evaluation set (no labels).
    """

    name: str = ""
    trained: ClassVar[bool] = False
    transductive: ClassVar[bool] = False

    def select(self, columns: Sequence[str]) -> list[str]:
        """The columns this scorer reads, in the order ``fit``/``score`` expect them."""
        raise NotImplementedError

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Scorer":
        """Fit on labelled rows (1 = member) of the selected columns; fixed rules do nothing."""
        return self

    def fit_pool(self, x: np.ndarray) -> "Scorer":
        """Fit unlabelled statistics on the pooled evaluation set (transductive methods)."""
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """One score per row, higher = member."""
        raise NotImplementedError


def _require(name: str, columns: Sequence[str], wanted: Sequence[str]) -> list[str]:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise CDIError(
            f"method {name!r} needs the feature column(s) {missing}, which the feature table lacks "
            f"(it has {len(columns)} columns: {list(columns)[:8]}{' ...' if len(columns) > 8 else ''}); "
            "extract the feature family that provides them"
        )
    return list(wanted)


def _with_prefix(name: str, columns: Sequence[str], prefix: str) -> list[str]:
    found = [c for c in columns if c.startswith(prefix)]
    if not found:
        raise CDIError(
            f"method {name!r} needs feature columns named {prefix}*, and the feature table has none; "
            "extract the feature family that provides them"
        )
    return found


class ColumnScore(Scorer):
    """One feature column used as the score, oriented by its member direction.

    ``direction`` is -1 when lower values mean member (every loss-like
    feature), +1 when higher values do.
    """

    def __init__(self, name: str, column: str, direction: int) -> None:
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {direction}")
        self.name, self.column, self.direction = name, column, direction

    def select(self, columns: Sequence[str]) -> list[str]:
        return _require(self.name, columns, [self.column])

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.direction * np.asarray(x, dtype=np.float64)[:, 0]


class BestTimestep(Scorer):
    """One of a family's per-timestep columns, the one with the best calibration AUC.

    SimA's official code scans the timestep grid and reports the best t; here
    the scan is done on the calibration images only (labels of the test
    images never choose the column), so the figures on the test split are
    honest. ``direction`` orients every column (SimA: -1, lower = member).
    """

    trained = True

    def __init__(self, name: str, prefix: str, direction: int) -> None:
        self.name, self.prefix, self.direction = name, prefix, direction
        self.column_: int | None = None

    def select(self, columns: Sequence[str]) -> list[str]:
        return _with_prefix(self.name, columns, self.prefix)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "BestTimestep":
        x = self.direction * np.asarray(x, dtype=np.float64)
        self.column_ = int(np.argmax([roc_auc(x[:, j], y) for j in range(x.shape[1])]))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        if self.column_ is None:
            raise CDIError(f"{self.name}: fit on calibration images before scoring")
        return self.direction * np.asarray(x, dtype=np.float64)[:, self.column_]


class SecMIPlusPlus(Scorer):
    """SecMI++: per-timestep SecMI scores, each divided by its mean over the pooled set, averaged.

    Transductive: the per-timestep means come from the pooled evaluation set
    (calibration and test images, labels unused), so that timesteps with
    larger raw errors do not dominate the average. Lower = member, as for
    SecMI_stat. Reads every ``secmi_t<t>`` column.
    """

    name = "secmi++"
    transductive = True
    prefix = "secmi_t"

    def __init__(self) -> None:
        self.means_: np.ndarray | None = None

    def select(self, columns: Sequence[str]) -> list[str]:
        return _with_prefix(self.name, columns, self.prefix)

    def fit_pool(self, x: np.ndarray) -> "SecMIPlusPlus":
        means = np.asarray(x, dtype=np.float64).mean(axis=0)
        if not (means > 0).all():
            raise CDIError("SecMI++: a per-timestep SecMI column has a non-positive mean; SecMI scores are norms")
        self.means_ = means
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        if self.means_ is None:
            raise RuntimeError("SecMI++ needs fit_pool on the pooled evaluation set before score")
        return -(np.asarray(x, dtype=np.float64) / self.means_).mean(axis=1)


class CLiDThreshold(Scorer):
    """CLiD_th (Zhai et al. 2024): a weighted mix of the conditional loss and the discrepancy.

    Columns ``clid_loss`` (L(c)) and ``clid_d1..clid_dk`` (D_i = L(c*_i) - L(c)).
    Fitting (on calibration only): robust-scale ``L(c)`` and ``-mean(D)``
    with their median and interquartile range, then choose the weight ``a``
    in {0, 0.1, ..., 1} maximising the AUC of ``(1-a) col1 + a col2`` on the
    fitting rows (the smallest such ``a`` on ties). Lower mix = member (a
    member has a low loss and a large discrepancy), so the score is its
    negation. The paper does not say which criterion picks ``a``; the AUC is
    threshold-free and stable on small calibration sets.
    """

    name = "clid_th"
    trained = True
    weights = np.round(np.linspace(0.0, 1.0, 11), 10)

    def __init__(self) -> None:
        self.center_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.weight_: float | None = None

    def select(self, columns: Sequence[str]) -> list[str]:
        return _require(self.name, columns, ["clid_loss"]) + _with_prefix(self.name, columns, "clid_d")

    @staticmethod
    def _pair(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.column_stack([x[:, 0], -x[:, 1:].mean(axis=1)])

    def _mix(self, x: np.ndarray, weight: float) -> np.ndarray:
        z = (self._pair(x) - self.center_) / self.scale_
        return (1.0 - weight) * z[:, 0] + weight * z[:, 1]

    def fit(self, x: np.ndarray, y: np.ndarray) -> "CLiDThreshold":
        pair = self._pair(x)
        q25, q50, q75 = np.percentile(pair, [25, 50, 75], axis=0)
        iqr = q75 - q25
        self.center_, self.scale_ = q50, np.where(iqr > 0, iqr, 1.0)
        aucs = [roc_auc(-self._mix(x, a), y) for a in self.weights]
        self.weight_ = float(self.weights[int(np.argmax(aucs))])
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        if self.weight_ is None:
            raise RuntimeError("CLiD_th must be fitted before score")
        return -self._mix(x, self.weight_)


class XGBoostScorer(Scorer):
    """An XGBoost classifier on a group of columns; the score is P(member).

    ``columns`` lists the columns to read, or ``prefix`` selects all columns
    starting with it (e.g. ``gsa1_``), or neither reads every column.
    ``n_jobs=1`` and a fixed ``random_state`` make fits reproducible.
    """

    trained = True

    def __init__(
        self,
        name: str,
        *,
        prefix: str | None = None,
        columns: Sequence[str] | None = None,
        params: dict | None = None,
        seed: int = 0,
    ) -> None:
        self.name, self.prefix = name, prefix
        self.columns = None if columns is None else list(columns)
        self.params = dict(params or {})
        self.seed = int(seed)
        self.model_ = None

    def select(self, columns: Sequence[str]) -> list[str]:
        if self.columns is not None:
            return _require(self.name, columns, self.columns)
        if self.prefix is not None:
            return _with_prefix(self.name, columns, self.prefix)
        return list(columns)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "XGBoostScorer":
        from cdi.utils.optional import require_xgboost

        require_xgboost(f"the {self.name} scorer")
        from xgboost import XGBClassifier

        self.model_ = XGBClassifier(
            **self.params, random_state=self.seed, n_jobs=1, eval_metric="logloss", verbosity=0
        )
        self.model_.fit(np.asarray(x, dtype=np.float64), np.asarray(y).astype(int))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError(f"{self.name} must be fitted before score")
        return self.model_.predict_proba(np.asarray(x, dtype=np.float64))[:, 1].astype(np.float64)


class LogisticScorer(Scorer):
    """StandardScaler + LogisticRegression (max_iter 1000); the score is the decision function.

    The CDI scoring model (REFERENCE.md section 1) used as a per-image
    classifier. ``columns`` fixes the columns to read; None reads every column
    of the table given to the protocol, so pass the CDI columns explicitly
    when the table holds other families too.
    """

    trained = True

    def __init__(self, name: str, *, columns: Sequence[str] | None = None, seed: int = 0) -> None:
        self.name = name
        self.columns = None if columns is None else list(columns)
        self.seed = int(seed)
        self.model_ = None

    def select(self, columns: Sequence[str]) -> list[str]:
        return list(columns) if self.columns is None else _require(self.name, columns, self.columns)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LogisticScorer":
        self.model_ = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000, random_state=self.seed)
        ).fit(np.asarray(x, dtype=np.float64), np.asarray(y).astype(int))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError(f"{self.name} must be fitted before score")
        return self.model_.decision_function(np.asarray(x, dtype=np.float64)).astype(np.float64)


#: GSA's classifier (Pang et al. 2023; CopyMark): XGBoost with 200 trees, other settings default.
GSA_XGBOOST = {"n_estimators": 200}
#: CLiD_vec's classifier settings (Zhai et al. 2024, reference code).
CLID_XGBOOST = {
    "n_estimators": 20,
    "max_depth": 3,
    "gamma": 0.7,
    "subsample": 0.7,
    "colsample_bytree": 0.7,
    "reg_alpha": 1.0,
    "reg_lambda": 1.0,
}


#: Trees of the gradient-boosted variant (other XGBoost settings default).
BLIND_XGBOOST = {"n_estimators": 200, "max_depth": 3}


def blind_baseline(
    classifier: Literal["logistic", "xgboost"] = "logistic",
    *,
    seed: int = 0,
    columns: Sequence[str] | None = None,
) -> Scorer:
    """The blind baseline as a scorer named ``"blind"``.

    Parameters
    ----------
    classifier : {"logistic", "xgboost"}
        ``"logistic"``: StandardScaler + LogisticRegression (max_iter 1000),
        the default: a shift visible to a linear probe is the one to worry
        about. ``"xgboost"``: 200 trees of depth 3.
    seed : int
        Seed of the classifier.
    columns : sequence of str, optional
        The embedding columns to read; None reads every column it is given
        (give the protocol the embedding matrix, named by ``embedding_columns``).
    """
    if classifier == "logistic":
        return LogisticScorer("blind", columns=columns, seed=seed)
    if classifier == "xgboost":
        return XGBoostScorer("blind", columns=columns, params=BLIND_XGBOOST, seed=seed)
    raise CDIError(f"unknown blind classifier {classifier!r}; choose 'logistic' or 'xgboost'")


def _blind(seed: int, columns: Sequence[str] | None) -> Scorer:
    return blind_baseline(seed=seed, columns=columns)


SCORERS: dict[str, Callable[[int, Sequence[str] | None], Scorer]] = {
    "loss": lambda seed, columns: ColumnScore("loss", "denoising_loss", -1),
    "secmi": lambda seed, columns: ColumnScore("secmi", "secmi", -1),
    "secmi++": lambda seed, columns: SecMIPlusPlus(),
    "pia": lambda seed, columns: ColumnScore("pia", "pia", -1),
    "pian": lambda seed, columns: ColumnScore("pian", "pian", -1),
    "pfami": lambda seed, columns: ColumnScore("pfami", "pfami", -1),
    "sima": lambda seed, columns: BestTimestep("sima", "sima_t", -1),
    "gsa1": lambda seed, columns: XGBoostScorer("gsa1", prefix="gsa1_", params=GSA_XGBOOST, seed=seed),
    "gsa2": lambda seed, columns: XGBoostScorer("gsa2", prefix="gsa2_", params=GSA_XGBOOST, seed=seed),
    "clid_th": lambda seed, columns: CLiDThreshold(),
    "clid_vec": lambda seed, columns: XGBoostScorer(
        "clid_vec", prefix="clid_", params=CLID_XGBOOST, seed=seed
    ),
    "cdi": lambda seed, columns: LogisticScorer("cdi", columns=columns, seed=seed),
    "blind": _blind,
}


def make_scorer(name: str, *, seed: int = 0, columns: Sequence[str] | None = None) -> Scorer:
    """A fresh scorer for the method ``name`` (see the module docstring).

    ``columns`` restricts the ``cdi`` and ``blind`` classifiers to the given
    columns (None: every column they are given); the other methods know
    their columns and ignore it.
    """
    try:
        factory = SCORERS[name]
    except KeyError:
        raise CDIError(f"unknown attack {name!r}; choose from {', '.join(SCORERS)}") from None
    return factory(seed, columns)
