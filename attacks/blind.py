"""The blind baseline (Das et al. 2024): membership guessed without ever querying the model.

A classifier trained on the calibration split to separate members from
non-members using only model-free image embeddings: the built-in colour and
gradient descriptor, or CLIP image embeddings when the weights are cached
locally (``cdi.data.shift_guard.image_embeddings``). It sees the images, never the
target model. If it separates members from non-members, the two sets differ
in distribution and a benchmark built on them measures that shift, not
membership; every attack's figures should be read against this row.

CopyMark fine-tunes an ImageNet ConvNeXt-tiny; here a linear model (or
gradient-boosted trees) on fixed embeddings plays that role, so the baseline
costs no training of a network and no model call. Like every trained method
it is cross-fitted on the calibration split by the protocol.
"""

from __future__ import annotations

# blind_baseline is defined beside the other scorers (the scorer registry needs it) and re-exported here.
from cdi.attacks.scorers import BLIND_XGBOOST, blind_baseline

__all__ = ["BLIND_XGBOOST", "blind_baseline", "embedding_columns"]


def embedding_columns(dim: int) -> list[str]:
    """Column names for a (n, dim) embedding matrix: ``emb_0000`` ... ."""
    return [f"emb_{i:04d}" for i in range(int(dim))]
