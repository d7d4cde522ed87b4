"""Validating the feature matrices of an audit before they are scored.

Both matrices must be finite, 2-D and have the same columns; a NaN or inf is
a ``CDIError`` that names the columns. Member directions, when given, are
one of -1, 0, +1 per column. ``check_features`` also stacks the two matrices
(published rows first) with their labels, the input of ``cdi.stats.scoring``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cdi.utils.errors import CDIError


def column_names(n_columns: int, columns: Sequence[str] | None) -> list[str]:
    """The given column names, or ``feature_0..`` when there are none."""
    if columns is None:
        return [f"feature_{j}" for j in range(n_columns)]
    columns = [str(c) for c in columns]
    if len(columns) != n_columns:
        raise CDIError(f"got {len(columns)} column names for {n_columns} feature columns")
    return columns


def check_finite(X: np.ndarray, columns: Sequence[str], name: str) -> None:
    """``CDIError`` naming the columns of ``X`` that hold NaN or infinite values."""
    bad = ~np.isfinite(X)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0))
        listing = ", ".join(f"{columns[j]} ({int(bad[:, j].sum())} rows)" for j in cols[:10])
        more = f" and {len(cols) - 10} more" if len(cols) > 10 else ""
        raise CDIError(
            f"{name} features contain NaN or infinite values in {len(cols)} column(s): {listing}{more}; "
            "re-extract the features of the affected images (or drop those columns) before testing"
        )


def check_features(
    X_published: np.ndarray,
    X_unpublished: np.ndarray,
    columns: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate the two feature matrices and stack them.

    Returns
    -------
    X : ndarray of shape (n_published + n_unpublished, d), float64
        Published rows first.
    y : ndarray of shape (n,), int8
        1 for published, 0 for unpublished.
    columns : list of str
    """
    mats = []
    for name, X in (("published", X_published), ("unpublished", X_unpublished)):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise CDIError(f"{name} features must be a 2-D array (images x features), got shape {X.shape}")
        if X.shape[0] == 0:
            raise CDIError(f"no {name} images: the audit needs feature rows for both collections")
        mats.append(X)
    if mats[0].shape[1] != mats[1].shape[1]:
        raise CDIError(
            f"published features have {mats[0].shape[1]} columns but unpublished have {mats[1].shape[1]}; "
            "extract both collections with the same feature set"
        )
    if mats[0].shape[1] == 0:
        raise CDIError("the feature matrices have no columns")
    columns = column_names(mats[0].shape[1], columns)
    check_finite(mats[0], columns, "published")
    check_finite(mats[1], columns, "unpublished")
    X = np.concatenate(mats, axis=0)
    y = np.concatenate([np.ones(len(mats[0]), np.int8), np.zeros(len(mats[1]), np.int8)])
    check_not_constant(X)
    return X, y, columns


def check_not_constant(X: np.ndarray) -> None:
    """``CDIError`` when every column is constant (nothing to test)."""
    if np.all(X.max(axis=0) == X.min(axis=0)):
        raise CDIError("every feature column is constant over all images: there is nothing to test")


def check_directions(directions: np.ndarray | Sequence[int] | None, n_columns: int) -> np.ndarray | None:
    """Validate member directions: one of -1, 0, +1 per column, or None."""
    if directions is None:
        return None
    d = np.asarray(directions, dtype=np.float64).reshape(-1)
    if d.shape[0] != n_columns:
        raise CDIError(f"got {d.shape[0]} member directions for {n_columns} feature columns")
    if not np.all(np.isin(d, (-1.0, 0.0, 1.0))):
        raise CDIError("member directions must be +1 (higher = member), -1 (lower = member) or 0 (unknown)")
    return d
