"""How far apart two image sets are, measured without any diffusion model (CopyMark Section 5.1).

A membership benchmark is only meaningful when members and non-members come
from the same distribution; otherwise an attack can score by recognising the
distribution rather than the training set. These measures quantify that
shift on image embeddings (CLIP ViT-L/14 in CopyMark; here whatever
``cdi.data.shift_guard.image_embeddings`` provides), each row L2-normalised
first by ``measure_shift``:

* **Frechet distance** ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``
  with sample covariances (ddof 1). The trace of the matrix square root is
  computed as ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))``, the same number as
  ``Tr(scipy.linalg.sqrtm(S_a S_b))`` but from symmetric eigenproblems, whose
  tiny negative eigenvalues (rounding noise) are clipped to zero, so the
  result is real and never negative. CopyMark calls FD around 0.05 or less
  "unshifted" (on CLIP embeddings).
* **Mahalanobis distance** of the means under the *pooled* covariance
  ``((n_a-1) S_a + (n_b-1) S_b) / (n_a + n_b - 2)``, symmetric in (a, b)
  (CopyMark's reference used set a's covariance only).
* **Normalised Wasserstein distance**: both sets whitened with the pooled
  covariance, then the exact 2-Wasserstein distance between the two
  empirical distributions, ``sqrt(min_perm mean_i ||z_a,i - z_b,perm(i)||^2)``.
  For two equal-size samples with uniform weights the optimal transport plan
  is a permutation (Birkhoff), so ``scipy.optimize.linear_sum_assignment``
  solves it exactly (CopyMark's iterative solver stopped at its iteration
  cap). For unequal sizes, or sizes above ``max_points``, seeded equal-size
  subsamples are drawn and the result says so.
* **Linear probe**: standardise + logistic regression separating a from b,
  scored only on held-out images (stratified K-fold cross-fitting: each image
  is predicted by a model that never saw it). Accuracy, balanced accuracy
  and AUC near 0.5 mean no linearly visible shift. CopyMark scored its probe
  in-sample after t-SNE, which overstates separability.

When the pooled covariance is singular (fewer images than dimensions, or
collinear embeddings), a ridge of ``1e-3`` times its mean eigenvalue is
added before inverting it; the Mahalanobis and Wasserstein figures then
depend on that choice, and the result records the ridge and a note.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cdi.utils.errors import CDIError

#: Relative ridge added to a singular pooled covariance (times its mean eigenvalue).
RIDGE = 1e-3


def _check_pair(a: np.ndarray, b: np.ndarray, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise CDIError(
            f"expected two embedding matrices (n_images, dim) of the same dim, got {a.shape} and {b.shape}"
        )
    if a.shape[0] < min_rows or b.shape[0] < min_rows:
        raise CDIError(
            f"each set needs at least {min_rows} images to measure a shift, got {a.shape[0]} and {b.shape[0]}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise CDIError("embeddings contain NaN or infinite values")
    return a, b


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two embedding sets."""
    a, b = _check_pair(a, b)
    s_a, s_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    root_a = _psd_sqrt(s_a)
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    diff = a.mean(axis=0) - b.mean(axis=0)
    value = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def pooled_covariance(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """The pooled covariance of two sets, ridge-regularised if singular; returns (matrix, ridge added)."""
    a, b = _check_pair(a, b)
    n_a, n_b = a.shape[0], b.shape[0]
    s = ((n_a - 1) * np.atleast_2d(np.cov(a, rowvar=False)) + (n_b - 1) * np.atleast_2d(np.cov(b, rowvar=False)))
    s = (s + s.T) / (2.0 * (n_a + n_b - 2))
    w = np.linalg.eigvalsh(s)
    mean_eig = float(w.mean())
    if mean_eig <= 0:
        raise CDIError("all embeddings are identical: the pooled covariance is zero, no distance can be normalised")
    ridge = 0.0
    if w[0] <= 1e-10 * w[-1]:
        ridge = RIDGE * mean_eig
        s = s + ridge * np.eye(s.shape[0])
    return s, ridge


def _inverse_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v / np.sqrt(w)) @ v.T


def mahalanobis_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``sqrt((mu_a - mu_b)^T S^-1 (mu_a - mu_b))`` with S the pooled covariance."""
    s, _ = pooled_covariance(a, b)
    diff = np.asarray(a, dtype=np.float64).mean(axis=0) - np.asarray(b, dtype=np.float64).mean(axis=0)
    return float(np.sqrt(max(diff @ np.linalg.solve(s, diff), 0.0)))


def wasserstein_distance(
    a: np.ndarray, b: np.ndarray, *, max_points: int | None = 2500, seed: int = 0
) -> tuple[float, int, bool]:
    """Exact 2-Wasserstein distance between the whitened empirical distributions of a and b.

    Returns ``(distance, points per set, subsampled)``. Equal sizes up to
    ``max_points`` use every image; otherwise both sets are reduced to
    ``min(n_a, n_b, max_points)`` images by a seeded draw without
    replacement.
    """
    a, b = _check_pair(a, b)
    s, _ = pooled_covariance(a, b)
    whiten = _inverse_sqrt(s)
    n = min(a.shape[0], b.shape[0], max_points or a.shape[0] + b.shape[0])
    subsampled = n < a.shape[0] or n < b.shape[0]
    rng = np.random.default_rng(seed)
    if n < a.shape[0]:
        a = a[np.sort(rng.choice(a.shape[0], n, replace=False))]
    if n < b.shape[0]:
        b = b[np.sort(rng.choice(b.shape[0], n, replace=False))]
    za, zb = a @ whiten, b @ whiten
    cost = (za * za).sum(1)[:, None] + (zb * zb).sum(1)[None, :] - 2.0 * za @ zb.T
    cost = np.clip(cost, 0.0, None)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean())), int(n), bool(subsampled)


def linear_probe(a: np.ndarray, b: np.ndarray, *, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy, balanced accuracy and AUC of a linear classifier telling a (1) from b (0).

    Every image is predicted by a model fitted on the other folds (stratified,
    shuffled with ``seed``), so no figure is in-sample.
    """
    a, b = _check_pair(a, b)
    folds = min(int(folds), a.shape[0], b.shape[0])
    if folds < 2:
        raise CDIError("the linear probe needs at least 2 images in each set")
    x = np.concatenate([a, b])
    y = np.r_[np.ones(a.shape[0], int), np.zeros(b.shape[0], int)]
    prob = np.empty(y.size)
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        prob[held] = model.fit(x[train], y[train]).predict_proba(x[held])[:, 1]
    pred = (prob >= 0.5).astype(int)
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "auc": float(roc_auc_score(y, prob)),
        "majority_rate": float(max(y.mean(), 1 - y.mean())),
        "folds": folds,
    }


@dataclass
class ShiftResult:
    """All shift measures between sets a and b, with what is needed to read them."""

    n_a: int
    n_b: int
    dim: int
    encoder: str | None
    frechet: float
    mahalanobis: float
    wasserstein: float
    wasserstein_points: int
    wasserstein_subsampled: bool
    probe: dict[str, float]
    ridge: float
    seed: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        """A short plain-text summary for the command line."""
        lines = [
            f"dataset shift between a ({self.n_a} images) and b ({self.n_b} images)"
            f", {self.dim}-d embeddings from {self.encoder or 'the given embeddings'}",
            f"  Frechet distance          {self.frechet:.4f}"
            + ("   (CopyMark: about 0.05 or less on CLIP embeddings reads as unshifted)"
               if "clip" in (self.encoder or "").lower() else "   (scale depends on the encoder)"),
            f"  Mahalanobis (pooled cov)  {self.mahalanobis:.4f}",
            f"  normalised Wasserstein    {self.wasserstein:.4f}   ({self.wasserstein_points} points per set"
            f"{', subsampled' if self.wasserstein_subsampled else ''})",
            f"  linear probe (held out)   accuracy {self.probe['accuracy']:.3f}, balanced accuracy "
            f"{self.probe['balanced_accuracy']:.3f}, AUC {self.probe['auc']:.3f}  (0.5 = no visible shift)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def measure_shift(
    a: np.ndarray,
    b: np.ndarray,
    *,
    encoder: str | None = None,
    seed: int = 0,
    max_points: int | None = 2500,
    folds: int = 5,
) -> ShiftResult:
    """Every shift measure between two embedding sets, after L2-normalising each row.

    ``encoder`` names where the embeddings came from (recorded only). The
    Wasserstein subsample and the probe's folds are drawn with ``seed``.
    """
    a, b = _check_pair(a, b)
    a, b = l2_normalise(a), l2_normalise(b)
    _, ridge = pooled_covariance(a, b)
    distance, points, subsampled = wasserstein_distance(a, b, max_points=max_points, seed=seed)
    notes = []
    if ridge > 0:
        notes.append(singular_covariance_note(a, b, ridge))
    if subsampled:
        notes.append(
            f"the Wasserstein distance uses seeded subsamples of {points} images per set "
            "(exact optimal transport needs equal sizes)"
        )
    return ShiftResult(
        n_a=int(a.shape[0]),
        n_b=int(b.shape[0]),
        dim=int(a.shape[1]),
        encoder=encoder,
        frechet=frechet_distance(a, b),
        mahalanobis=mahalanobis_distance(a, b),
        wasserstein=distance,
        wasserstein_points=points,
        wasserstein_subsampled=subsampled,
        probe=linear_probe(a, b, folds=folds, seed=seed),
        ridge=float(ridge),
        seed=int(seed),
        notes=notes,
    )


def singular_covariance_note(a: np.ndarray, b: np.ndarray, ridge: float) -> str:
    """Why the pooled covariance of ``a`` and ``b`` is singular, and what that means for the figures.

    Too few images (fewer than dimensions + 2) is one cause; the other is
    embeddings whose dimensions are collinear or constant (their rank is
    below their number), which more images do not cure.
    """
    n, dim = a.shape[0] + b.shape[0], a.shape[1]
    centred = np.vstack([a - a.mean(axis=0), b - b.mean(axis=0)])
    rank = int(np.linalg.matrix_rank(centred))
    consequence = (f"a ridge of {ridge:.3g} was added, so the Mahalanobis and Wasserstein figures depend on it "
                   "(the Frechet distance and the linear probe do not)")
    if n < dim + 2:
        return (f"the pooled covariance is singular: {n} images for {dim} dimensions; {consequence}. Use at "
                f"least {dim + 2} images in all, or compare these two figures only between runs of the same sizes")
    return (f"the pooled covariance is singular although there are more images ({n}) than dimensions ({dim}): "
            f"the embeddings span only {rank} of their {dim} dimensions (some are constant or combinations of "
            f"others); {consequence}. More images do not change this: compare these two figures only between "
            "runs with the same encoder and image counts")


def shift_between_folders(
    folder_a: str,
    folder_b: str,
    *,
    encoder: str = "auto",
    seed: int = 0,
    max_points: int | None = 2500,
    max_pixels: int | None = None,
) -> ShiftResult:
    """Load two image folders, embed them without any diffusion model, and measure the shift.

    ``encoder``: ``"auto"`` (CLIP ViT-L/14 when its weights are in the local
    Hugging Face cache, else the built-in colour/gradient descriptor),
    ``"builtin"`` or ``"clip"`` (see ``cdi.data.shift_guard.image_embeddings``).
    """
    from cdi.data.collection import DEFAULT_MAX_PIXELS, ImageCollection

    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    a = ImageCollection.from_folder(folder_a, name="a", max_pixels=limit)
    b = ImageCollection.from_folder(folder_b, name="b", max_pixels=limit)
    from cdi.data.shift_guard import image_embeddings

    emb_a, used = image_embeddings(a, encoder=encoder)
    emb_b, used_b = image_embeddings(b, encoder=used)  # the encoder chosen for a: one "CLIP not cached" warning
    if used != used_b:
        raise CDIError(f"the two folders were embedded with different encoders ({used} and {used_b}); rerun")
    return measure_shift(emb_a, emb_b, encoder=used, seed=seed, max_points=max_points)
