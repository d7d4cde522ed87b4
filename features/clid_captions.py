"""CLiD's condition-reduced captions: the rules of the paper's released code, and this toolkit's default.

CLiD compares the loss under an image's caption with the loss under reduced
versions of it (REFERENCE.md sections 2 and 8). Three rules:

* ``"random"`` (``mask_caption``, the default): delete a random subset of
  ``round(rate * n)`` of the caption's n words, drawn from (seed, image hash,
  rate) only; the remaining words keep their order. A fresh subset per image
  and rate (the masks of different rates are not nested).
* ``"impt"`` (``importance_captions``; ``mia_CLiD_impt.py``): replace the
  most important words by the text encoder's end-of-text token, the
  ``int(rate * n - 0.01) + 1`` top words of one ranking per caption (that is
  ``ceil(rate * n)``, except that an exact product such as 0.5 x 4 gives 2;
  the masks of the rates are nested: the 30 % words are among the 50 %
  ones). The authors' ranking file was never released. The ranking used
  here is a deterministic proxy computed from the model itself
  (``importance_ranking``): a word is the more important the more the
  caption's condition (every tensor of ``adapter.conditions``, e.g. SD's
  text-encoder hidden states) moves when that word alone is replaced by the
  end-of-text token; ties go to the earlier word. Its cost is n extra
  text-encoder passes per caption (no denoiser call).
* ``"clip"`` (``clip_captions``; ``mia_CLiD_clip.py``): keep the first,
  middle or last third of the caption's *characters*
  (``c[:int(L/3)]``, ``c[int(L/3):int(2L/3)]``, ``c[int(2L/3):]``), three
  reduced captions whatever the rates; that script evaluates them at
  t = 485, 495, 505.

Why ``"random"`` stays the default: it needs nothing that was not released
(no ranking, no tokenizer-specific token), it works the same for every text
encoder, it is reproducible from the seed and the image alone, and it gives
the reduced captions the same expected share of every word, where the
importance proxy's choice of words is the proxy's own (and depends on the
model under audit). ``"impt"`` and ``"clip"`` are there to compare with
numbers published with the official code.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import derive_seed


def mask_caption(caption: str, rate: float, seed: int, image_hash: str) -> str:
    """Remove ``floor(rate * n + 1/2)`` of the caption's n words, chosen at random.

    The words removed are those whose keys ``derive_seed(seed, image_hash,
    "clid_mask", rate, position)`` are smallest: a function of (seed, image
    hash, rate) only. The other words keep their order, joined by single
    spaces.
    """
    words = caption.split()
    n_masked = math.floor(rate * len(words) + 0.5)
    keys = [derive_seed(seed, image_hash, "clid_mask", f"rate={rate!r}", j) for j in range(len(words))]
    masked = set(sorted(range(len(words)), key=keys.__getitem__)[:n_masked])
    return " ".join(w for j, w in enumerate(words) if j not in masked)


def released_count(rate: float, n: int) -> int:
    """How many of n words the released ``impt`` rule replaces: ``int(rate * n - 0.01) + 1``, within [0, n]."""
    if n == 0:
        return 0
    return min(n, max(0, int(rate * n - 0.01) + 1))


def importance_ranking(adapter: DiffusionAdapter, captions: Sequence[str], end_of_text: str) -> list[list[int]]:
    """Word positions of each caption, most important first (see the module docstring).

    One ``adapter.conditions`` call embeds every one-word-replaced variant of
    every caption together with the captions themselves.
    """
    words = [c.split() for c in captions]
    variants = [" ".join(end_of_text if k == j else w for k, w in enumerate(ws)) for ws in words
                for j in range(len(ws))]
    if not variants:
        return [[] for _ in captions]
    cond = adapter.conditions(list(captions) + variants)
    rankings, offset = [], len(captions)
    for i, ws in enumerate(words):
        moved = torch.zeros(len(ws), dtype=torch.float64)
        for tensor in cond.tensors.values():
            diff = tensor[offset : offset + len(ws)].double() - tensor[i : i + 1].double()
            moved += diff.flatten(1).pow(2).sum(dim=1)
        rankings.append(sorted(range(len(ws)), key=lambda j: (-float(moved[j]), j)))
        offset += len(ws)
    return rankings


def importance_captions(caption: str, ranking: Sequence[int], rate: float, end_of_text: str) -> str:
    """The caption with its ``released_count(rate, n)`` top-ranked words replaced by ``end_of_text``."""
    words = caption.split()
    top = set(ranking[: released_count(rate, len(words))])
    return " ".join(end_of_text if j in top else w for j, w in enumerate(words))


def clip_captions(caption: str) -> list[str]:
    """The first, middle and last third of the caption's characters (``mia_CLiD_clip.py``)."""
    n = len(caption)
    return [caption[: int(n / 3)], caption[int(n / 3) : int(2 * n / 3)], caption[int(2 * n / 3) :]]
