"""The shift guard: can P and U be told apart without the model?

An audit's verdict means "the model treats the published images
differently from the unpublished ones". That supports "P was used in
training" only if P and U come from the same distribution. If the two
collections differ in ways any image statistic can see (another camera,
contrast, colour balance, subject, compression), the model will treat them
differently too, trained on P or not (the failure CopyMark highlights). The
guard runs the audit's own test on *model-free* image features of P and U;
if it separates them at the audit's alpha, the verdict is ``inconclusive``.

Features (``image_embeddings``)
-------------------------------
* ``encoder="clip"``: CLIP ViT-L/14 image embeddings
  (``openai/clip-vit-large-patch14``, ``CLIPVisionModelWithProjection``,
  projected and L2-normalised, as in CopyMark's shift measurement), loaded
  from the local Hugging Face cache only (``local_files_only=True``, nothing
  is downloaded). A local model folder works as well.
* ``encoder="builtin"``: the colour, contrast, texture and layout descriptors
  of ``cdi.data.descriptors``; no weights needed.
* ``encoder="auto"`` (default): CLIP when its weights are in the local
  cache, else the built-in descriptors; the fallback is logged (logger
  ``"cdi"``) and the returned encoder name records what was used.

The test (``shift_guard``)
--------------------------
The question is two-sided: *any* difference in distribution, in any
direction. The guard therefore uses no member directions: it is a
classifier two-sample test. It runs ``cdi.stats.verdict.audit_test`` with
``directions=None``, the sequential protocol: the images are split into
stratified blocks, block 0 only trains, block ``k`` is scored by a penalised
logistic regression trained on blocks ``0..k-1`` and tested with Welch's
t-test on within-block normal scores; the blocks are combined with fixed
weights. The classifier learns which way the collections differ, so the
one-sided test of its held-out scores detects a difference in any
direction, and under "same distribution" the p-value is calibrated like the
verdict's (``tests/data/test_shift_guard.py``).

When the audit harmonises the collections' encodings (``cdi.data.harmonise``),
the guard's images go through the same working size and JPEG generation as
the model's (``image_embeddings(..., harmonisation=...)``): the guard asks
whether what the model sees differs.

Encodings (``encoding_guard``)
------------------------------
The same test on ``cdi.data.descriptors.encoding_descriptors`` of the files
(lossy, estimated JPEG quality, chroma subsampling, palette, native size,
aspect ratio) says whether the two collections were *encoded* differently.
With harmonisation on, a detected difference is reported and the
re-encoding is what answers it; with harmonisation off it stops the audit
like an image shift (``inconclusive``, unless the shift is ignored).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cdi.stats.blocks import MIN_PER_BLOCK
from cdi.data.descriptors import RESOLUTION, as_unit_tensor, descriptor_features
from cdi.utils.errors import CDIError

logger = logging.getLogger("cdi")

ENCODERS = ("auto", "builtin", "clip")

#: The image encoder of the CopyMark shift measurement.
CLIP_MODEL = "openai/clip-vit-large-patch14"
_CLIP_SIZE = 224
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Most blocks the guard uses (fewer when the collections are small).
MAX_FOLDS = 5

#: L2 penalty (1/C) of the guard's classifier. Heavier than the audit's: with
#: tens of descriptors and few images it pulls the classifier towards the
#: difference of the class means, which is more stable. Detection rates at
#: alpha 0.01 on 60 + 60 synthetic images (25 draws each; none of 25 null
#: draws fired): penalty 3: contrast x0.9 76%, colour cast +0.1 12%;
#: 30: 92%, 16%; 300: 76%, 24%.
GUARD_PENALTY = 30.0


# --------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------


def load_clip(model: str = CLIP_MODEL, device: str | torch.device = "cpu"):
    """CLIP vision tower with projection from the local cache or a local folder.

    Raises ``OSError`` (or ``ValueError``) when the weights are not there;
    never downloads.
    """
    from transformers import CLIPVisionModelWithProjection

    net = CLIPVisionModelWithProjection.from_pretrained(model, local_files_only=True)
    return net.to(device).eval()


def _clip_input(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, 3, H, W) to CLIP's input: 224 x 224 (resize shorter side, centre crop), normalised."""
    h, w = x.shape[-2:]
    if (h, w) != (_CLIP_SIZE, _CLIP_SIZE):
        scale = _CLIP_SIZE / min(h, w)
        size = (max(_CLIP_SIZE, round(h * scale)), max(_CLIP_SIZE, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - _CLIP_SIZE) // 2, (x.shape[-1] - _CLIP_SIZE) // 2
        x = x[..., top:top + _CLIP_SIZE, left:left + _CLIP_SIZE]
    mean = torch.tensor(_CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _batches(images, resolution: int, batch_size: int, num_workers: int | None, harmonisation=None):
    """Yield (N, 3, H, W) [0, 1] tensors from a collection, a tensor/array, or PIL images."""
    if hasattr(images, "records"):  # a cdi.data.collection.ImageCollection
        from cdi.data.image_loader import image_batches
        from cdi.data.preprocess import Preprocess

        pre = Preprocess(resolution, channels=3, crop="center", resample="bicubic")
        if harmonisation is not None and harmonisation.harmonised:  # the model's working size and JPEG
            pre = Preprocess(resolution, channels=3, crop=harmonisation.crop, resample="bicubic",
                             jpeg_quality=harmonisation.jpeg_quality,
                             jpeg_subsampling=harmonisation.jpeg_subsampling,
                             jpeg_tables=harmonisation.jpeg_tables,
                             working_size=harmonisation.working_size or harmonisation.resolution)
        for pixels, _ in image_batches(images, pre, batch_size=batch_size, num_workers=num_workers):
            yield as_unit_tensor(pixels)
        return
    if isinstance(images, (torch.Tensor, np.ndarray)):
        for start in range(0, len(images), batch_size):
            yield as_unit_tensor(images[start:start + batch_size])
        return
    images = list(images)
    for start in range(0, len(images), batch_size):
        yield as_unit_tensor(images[start:start + batch_size])


def image_embeddings(
    images: Any,
    encoder: str = "auto",
    *,
    clip_model: str = CLIP_MODEL,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    harmonisation=None,
) -> tuple[np.ndarray, str]:
    """Model-free features of every image, for the shift guard and shift measures.

    Parameters
    ----------
    images : ImageCollection, tensor/array (N, C, H, W) in [-1, 1], or sequence of PIL images
    encoder : {"auto", "builtin", "clip"}
        See the module docstring. ``"clip"`` raises a ``CDIError`` when the
        weights are not available locally.
    clip_model : str
        Hub id (looked up in the local cache only) or local folder of a
        ``CLIPVisionModelWithProjection``.
    batch_size, device, num_workers
        Batching, the encoder's device (default: CUDA when available), and
        decoding workers for collections.
    harmonisation : cdi.data.preprocess.Preprocess or None
        The model's preprocessing when it harmonises the collections: a
        collection's images then pass through its working size (default its
        resolution) and JPEG generation before the encoder's own resize.

    Returns
    -------
    embeddings : ndarray (N, D), float64
        CLIP: L2-normalised projected embeddings. Built-in:
        ``cdi.data.descriptors.descriptor_features``.
    encoder : str
        What was used, ``"clip"`` or ``"builtin"``; pass it back as
        ``encoder`` to embed another collection the same way.
    """
    if encoder not in ENCODERS:
        raise CDIError(f"unknown shift encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CDIError(f"batch_size must be a positive whole number, got {batch_size!r}")
    net = None
    if encoder in ("auto", "clip"):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            net = load_clip(clip_model, device)
        except (OSError, ValueError) as exc:
            if encoder == "clip":
                raise CDIError(
                    f"the CLIP image encoder {clip_model!r} is not available locally ({type(exc).__name__}); "
                    f"download it once with `hf download {clip_model}`, pass a local folder, "
                    "or use the built-in descriptors (encoder 'builtin')"
                ) from None
            logger.warning("CLIP image encoder %s not in the local cache; the shift guard uses the built-in "
                           "descriptors instead", clip_model)
    if net is None:
        chunks = [descriptor_features(x)
                  for x in _batches(images, RESOLUTION, batch_size, num_workers, harmonisation)]
        return _stack(chunks), "builtin"
    chunks = []
    with torch.no_grad():
        for x in _batches(images, _CLIP_SIZE, batch_size, num_workers, harmonisation):
            emb = net(pixel_values=_clip_input(x).to(device)).image_embeds.float()
            chunks.append(F.normalize(emb, dim=-1).cpu().double().numpy())
    return _stack(chunks), "clip"


def _stack(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        raise CDIError("no images to embed")
    return np.concatenate(chunks, axis=0)


def clip_cached(model: str = CLIP_MODEL) -> bool:
    """Whether the CLIP weights are in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # an invalid id, a local path: not in the hub cache
        return False
    return isinstance(found, str)


# --------------------------------------------------------------------------
# the guard
# --------------------------------------------------------------------------


@dataclass
class ShiftGuardResult:
    """Outcome of the shift guard; ``to_dict()`` is JSON-able.

    ``detected`` is ``p_value < alpha``: the collections differ without the
    model, and a positive audit verdict would not be evidence of training.
    ``auc`` is the held-out AUC of the model-free classifier (0.5: no
    difference).
    """

    p_value: float
    log10_p_value: float
    auc: float
    detected: bool
    alpha: float
    encoder: str
    n_features: int
    n_published: int
    n_unpublished: int
    folds: int
    seed: int
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def _guard_folds(n_published: int, n_unpublished: int, folds: int | None) -> int:
    if folds is not None:
        return int(folds)
    fitting = min(n_published, n_unpublished) // MIN_PER_BLOCK
    if fitting < 2:
        raise CDIError(
            f"the shift guard needs at least {2 * MIN_PER_BLOCK} published and {2 * MIN_PER_BLOCK} unpublished "
            f"images, got {n_published} and {n_unpublished}"
        )
    return min(MAX_FOLDS, fitting)


def shift_guard(
    feat_P: np.ndarray,
    feat_U: np.ndarray,
    *,
    alpha: float = 0.01,
    seed: int = 0,
    encoder: str = "builtin",
    folds: int | None = None,
    penalty: float | None = None,
) -> ShiftGuardResult:
    """Test whether model-free features separate the published from the unpublished images.

    Parameters
    ----------
    feat_P, feat_U : ndarray (n_p, D), (n_u, D)
        ``image_embeddings`` of the two collections (same encoder).
    alpha : float
        The guard fires when its p-value is below ``alpha`` (use the
        audit's).
    seed : int
    encoder : str
        Name of the encoder that made the features (recorded).
    folds : int, optional
        Blocks of the test; default the most, up to 5, that the sizes allow.
    penalty : float, optional
        L2 penalty of the classifier (default ``GUARD_PENALTY``).
    """
    from cdi.stats.verdict import audit_test

    feat_P = np.asarray(feat_P, dtype=np.float64)
    feat_U = np.asarray(feat_U, dtype=np.float64)
    if feat_P.ndim != 2 or feat_U.ndim != 2 or feat_P.shape[1] != feat_U.shape[1]:
        raise CDIError(f"shift-guard features must be two matrices with the same columns, got shapes "
                       f"{feat_P.shape} and {feat_U.shape}")
    k = _guard_folds(len(feat_P), len(feat_U), folds)
    note = _encoder_note(encoder)
    both = np.concatenate([feat_P, feat_U])
    if np.all(both.max(axis=0) == both.min(axis=0)):
        return ShiftGuardResult(p_value=1.0, log10_p_value=0.0, auc=0.5, detected=False, alpha=float(alpha),
                                encoder=encoder, n_features=feat_P.shape[1], n_published=len(feat_P),
                                n_unpublished=len(feat_U), folds=k, seed=int(seed),
                                note=note + "; every feature is the same for all images, nothing separates them")
    res = audit_test(feat_P, feat_U, directions=None, folds=k, permutations=0, alpha=alpha, seed=seed,
                     protocol="sequential",
                     penalty=GUARD_PENALTY if penalty is None else penalty)
    return ShiftGuardResult(
        p_value=res.verdict_p,
        log10_p_value=res.verdict_log10_p,
        auc=res.auc,
        detected=res.rejected,
        alpha=float(alpha),
        encoder=encoder,
        n_features=feat_P.shape[1],
        n_published=len(feat_P),
        n_unpublished=len(feat_U),
        folds=k,
        seed=int(seed),
        note=note,
    )


def _encoder_note(encoder: str) -> str:
    if encoder == "clip":
        return "CLIP image embeddings, classifier two-sample test (sequential blocks, no member directions)"
    if encoder == "encoding":
        return ("file encoding descriptors (lossy, JPEG quality, chroma subsampling, palette, size, aspect), "
                "classifier two-sample test (sequential blocks, no member directions)")
    if encoder == "builtin":
        why = "" if clip_cached() else " (CLIP ViT-L/14 weights are not in the local Hugging Face cache)"
        return ("built-in colour/contrast/texture/layout descriptors" + why
                + ", classifier two-sample test (sequential blocks, no member directions)")
    return f"{encoder} features, classifier two-sample test (sequential blocks, no member directions)"


# --------------------------------------------------------------------------
# encodings
# --------------------------------------------------------------------------


@dataclass
class EncodingGuardResult:
    """The guard's test on the files' encodings (``encoding_guard``); ``to_dict()`` is JSON-able.

    ``detected``: the encoding descriptors separate the collections at
    ``alpha``. ``harmonised``: the audit re-encoded both collections alike,
    so the difference was answered by preprocessing; otherwise it stops the
    audit like an image shift. ``means`` holds each descriptor's mean per
    collection.
    """

    p_value: float
    auc: float
    detected: bool
    alpha: float
    harmonised: bool
    columns: list[str]
    means: dict[str, dict[str, float]]
    note: str

    @property
    def blocks_verdict(self) -> bool:
        """A detected encoding difference that no harmonisation answered."""
        return self.detected and not self.harmonised

    def to_dict(self) -> dict:
        return {**asdict(self), "blocks_verdict": self.blocks_verdict}


def encoding_guard(probes_p, probes_u, *, alpha: float, seed: int = 0, harmonised: bool) -> EncodingGuardResult:
    """Test whether the files' encodings separate the published from the unpublished images.

    ``probes_p``, ``probes_u``: ``cdi.data.harmonise.EncodingProbe`` of each
    image. The test is ``shift_guard`` on ``encoding_descriptors``; when
    every descriptor is the same for all images it is not run (p = 1).
    """
    from cdi.data.descriptors import ENCODING_COLUMNS, encoding_descriptors

    feat_p, feat_u = encoding_descriptors(probes_p), encoding_descriptors(probes_u)
    guard = shift_guard(feat_p, feat_u, alpha=alpha, seed=seed, encoder="encoding")
    means = {c: {"published": float(feat_p[:, j].mean()), "unpublished": float(feat_u[:, j].mean())}
             for j, c in enumerate(ENCODING_COLUMNS)}
    if not guard.detected:
        note = "no difference in the files' encodings was detected"
    elif harmonised:
        note = ("the files are encoded differently; both collections were re-encoded alike before the model "
                "(harmonisation), so the model and the image guard saw one encoding")
    else:
        note = ("the files are encoded differently and harmonisation was turned off: the model saw each "
                "collection's own encoding, which alone can make it treat them differently")
    return EncodingGuardResult(p_value=guard.p_value, auc=guard.auc, detected=guard.detected, alpha=float(alpha),
                               harmonised=bool(harmonised), columns=list(ENCODING_COLUMNS), means=means, note=note)
