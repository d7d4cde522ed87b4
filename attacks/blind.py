"""The blind baseline (Das et al. 2024): membership guessed without ever querying the model.

A classifier trained on the calibration split to separate members from
non-members using only model-free image embeddings: the built-in colour and
gradient descriptor, or CLIP image embeddings when the weights are cached
locally (``cdi.shift_guard.image_embeddings``). It sees the images, never the
target model. If it separates members from non-members, the two sets differ
in distribution and a benchmark built on them measures that shift, not
membership; every attack's figures should be read against this row.

CopyMark fine-tunes an ImageNet ConvNeXt-tiny; here a linear model (or
gradient-boosted trees) on fixed embeddings plays that role, so the baseline
costs no training of a network and no model call. Like every trained method
it is cross-fitted on the calibration split by the protocol.
"""

from __future__ import annotations

from typing import Literal, Sequence

from cdi.attacks.scorers import LogisticScorer, Scorer, XGBoostScorer
from cdi.errors import CDIError

#: Trees of the gradient-boosted variant (other XGBoost settings default).
BLIND_XGBOOST = {"n_estimators": 200, "max_depth": 3}


def embedding_columns(dim: int) -> list[str]:
    """Column names for a (n, dim) embedding matrix: ``emb_0000`` ... ."""
    return [f"emb_{i:04d}" for i in range(int(dim))]


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

