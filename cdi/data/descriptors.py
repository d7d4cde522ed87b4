"""Model-free image descriptors: colour, contrast, texture and layout statistics.

The shift guard (``cdi.data.shift_guard``) asks whether the published and
unpublished images can be told apart *without* the model; if they can, a
model-based difference says nothing about training. It needs features that
describe the images' distribution and need no download. These are cheap
statistics of the image downscaled to 64 x 64 pixels (``RESOLUTION``), all
in the [0, 1] intensity scale:

* per RGB channel: mean, standard deviation and the 5/25/50/75/95% quantiles;
* luminance (ITU-R BT.601 weights): mean, SD, 5/50/95% quantiles;
* colour: HSV saturation mean and SD, and Hasler and Suesstrunk's
  colourfulness;
* a coarse joint colour histogram, 3 x 3 x 3 bins of the 8-bit levels
  (fractions of pixels);
* texture: gradient magnitude of the luminance (central differences) mean,
  SD, median, 90% quantile, the share of pixels above 0.1 (edge density), and
  the variance of the discrete Laplacian (sharpness);
* layout: a 4 x 4 luminance thumbnail (16 block means).

A contrast or colour-balance difference between the two collections, a
different camera, compression or source, shows up in several of them.
Greyscale input is treated as RGB with three equal channels.

``encoding_descriptors`` describes how each *file* is encoded instead
(``ENCODING_COLUMNS``, from ``cdi.data.harmonise.probe_collection``): lossy or
not, the estimated JPEG quality, chroma subsampling, palette, native size and
aspect ratio. The shift guard tests them as a check of their own, because
pixel statistics at 64 x 64 see JPEG artefacts only by chance.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cdi.utils.errors import CDIError

#: Side of the square the descriptors are computed on.
RESOLUTION = 64

_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_LUMA_QUANTILES = (0.05, 0.5, 0.95)
_HIST_BINS = 3
_THUMB = 4


def _column_names() -> list[str]:
    names = []
    for ch in "rgb":
        names += [f"{ch}_mean", f"{ch}_std"] + [f"{ch}_q{int(q * 100):02d}" for q in _QUANTILES]
    names += ["luma_mean", "luma_std"] + [f"luma_q{int(q * 100):02d}" for q in _LUMA_QUANTILES]
    names += ["saturation_mean", "saturation_std", "colourfulness"]
    names += [f"hist_r{r}g{g}b{b}" for r in range(_HIST_BINS) for g in range(_HIST_BINS) for b in range(_HIST_BINS)]
    names += ["grad_mean", "grad_std", "grad_q50", "grad_q90", "edge_density", "laplacian_var"]
    names += [f"thumb_{i}{j}" for i in range(_THUMB) for j in range(_THUMB)]
    return names


#: Names of the descriptor columns, in order.
DESCRIPTOR_COLUMNS: list[str] = _column_names()


#: Names of the encoding descriptor columns (``encoding_descriptors``), in order.
ENCODING_COLUMNS: list[str] = ["lossy", "jpeg_quality", "chroma_subsampling", "palette", "log2_short_side",
                               "aspect_ratio"]

_SUBSAMPLING_LEVEL = {None: 0.0, "4:4:4": 0.0, "4:2:2": 1.0, "4:2:0": 2.0}


def encoding_descriptors(probes: Sequence) -> np.ndarray:
    """How every image file is encoded, as numbers (one row per ``cdi.data.harmonise.EncodingProbe``).

    Columns (``ENCODING_COLUMNS``): 1 for a lossy file; the estimated JPEG
    quality (100 for lossless files); chroma subsampling as 0 (none or
    4:4:4), 1 (4:2:2) or 2 (4:2:0); 1 for a palette image; log2 of the
    shorter native side; longer side over shorter side.
    """
    probes = list(probes)
    if not probes:
        raise CDIError("no images to describe")
    rows = [[float(p.lossy), float(p.quality), _SUBSAMPLING_LEVEL[p.subsampling], float(p.palette),
             float(np.log2(p.short_side)), max(p.width, p.height) / p.short_side] for p in probes]
    return np.asarray(rows, dtype=np.float64)


def as_unit_tensor(images) -> torch.Tensor:
    """Images as a float32 tensor (N, 3, H, W) in [0, 1].

    Accepts a tensor or array (N, C, H, W) in [-1, 1] (the preprocessed
    pixels of ``cdi.data.image_loader``, C = 1 or 3) or a sequence of PIL images (prepared
    with ``cdi.data.preprocess.preprocess_image`` at ``RESOLUTION``, centre crop).
    """
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
        x = x.detach().to("cpu", torch.float32)
    else:
        from cdi.data.preprocess import Preprocess, preprocess_image

        images = list(images)
        if not images:
            raise CDIError("no images to describe")
        pre = Preprocess(RESOLUTION, channels=3)
        x = torch.stack([preprocess_image(im, pre) for im in images])
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise CDIError(f"images must be (N, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise CDIError("no images to describe")
    if not torch.isfinite(x).all():
        raise CDIError("image tensors contain NaN or infinite values")
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def _downscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == (RESOLUTION, RESOLUTION):
        return x
    return F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0.0, 1.0)


def _var(v: torch.Tensor) -> torch.Tensor:
    """Population variance along dim 1, as a mean of squared deviations.

    (``torch.var`` reduces in an order that depends on the batch size; this
    keeps every image's descriptors independent of its batch mates.)
    """
    return ((v - v.mean(1, keepdim=True)) ** 2).mean(1)


def _sd(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(_var(v))[:, None]


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run small torch ops on one thread (restored afterwards).

    Intra-op threads gain nothing on 64 x 64 images and, on a busy machine,
    made the descriptors 6 to 15 times slower in our measurements.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def descriptor_features(images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    """Model-free descriptors of every image (see the module docstring).

    Parameters
    ----------
    images : tensor or array (N, C, H, W) in [-1, 1], or a sequence of PIL images

    Returns
    -------
    ndarray (N, len(DESCRIPTOR_COLUMNS)), float64
    """
    with torch.no_grad(), _one_torch_thread():
        x = _downscale(as_unit_tensor(images)).double()
        n = x.shape[0]
        flat = x.reshape(n, 3, -1)
        parts = []
        q = torch.tensor(_QUANTILES, dtype=x.dtype)
        for c in range(3):
            v = flat[:, c]
            parts += [v.mean(1, keepdim=True), _sd(v), torch.quantile(v, q, dim=1).T]
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (n, H, W)
        lf = luma.reshape(n, -1)
        parts += [lf.mean(1, keepdim=True), _sd(lf),
                  torch.quantile(lf, torch.tensor(_LUMA_QUANTILES, dtype=x.dtype), dim=1).T]

        cmax, cmin = flat.max(dim=1).values, flat.min(dim=1).values
        sat = torch.where(cmax > 0, (cmax - cmin) / cmax.clamp_min(1e-12), torch.zeros_like(cmax))
        rg = flat[:, 0] - flat[:, 1]
        yb = 0.5 * (flat[:, 0] + flat[:, 1]) - flat[:, 2]
        colourfulness = torch.sqrt(_var(rg) + _var(yb)) + 0.3 * torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
        parts += [sat.mean(1, keepdim=True), _sd(sat), colourfulness[:, None]]

        # bins of the 8-bit level, so that float rounding cannot move a pixel on a bin edge
        bins = torch.round(flat * 255.0).long() * _HIST_BINS // 256  # (n, 3, P)
        index = (bins[:, 0] * _HIST_BINS + bins[:, 1]) * _HIST_BINS + bins[:, 2]
        hist = torch.zeros(n, _HIST_BINS**3, dtype=x.dtype).scatter_add_(
            1, index, torch.ones_like(index, dtype=x.dtype))
        parts.append(hist / index.shape[1])

        padded = F.pad(luma[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        gx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2.0
        gy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2.0
        grad = torch.sqrt(gx**2 + gy**2).reshape(n, -1)
        lap = (padded[:, 1:-1, 2:] + padded[:, 1:-1, :-2] + padded[:, 2:, 1:-1] + padded[:, :-2, 1:-1]
               - 4.0 * luma).reshape(n, -1)
        parts += [grad.mean(1, keepdim=True), _sd(grad),
                  torch.quantile(grad, torch.tensor((0.5, 0.9), dtype=x.dtype), dim=1).T,
                  (grad > 0.1).to(x.dtype).mean(1, keepdim=True), _var(lap)[:, None]]

        parts.append(F.adaptive_avg_pool2d(luma[:, None], _THUMB).reshape(n, -1))
        out = torch.cat(parts, dim=1).numpy()
    assert out.shape[1] == len(DESCRIPTOR_COLUMNS)
    return out
