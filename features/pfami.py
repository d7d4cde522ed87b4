"""PFAMI (Fu et al. 2023): probabilistic fluctuation around an image, for the benchmark.

A member sits at a local peak of the model's likelihood: slightly perturbed
versions of it (its *neighbours*) fit the model worse than the image itself,
more so than around a non-member. PFAMI measures that fluctuation with the
denoising loss:

* ``N`` neighbours (10) made by centre-cropping the image to ratios evenly
  spaced from 0.95 down to 0.70 of its side and resizing back to full size
  (bilinear). The crop is done on the preprocessed *pixels*, before the
  encoder: for latent models, cropping and resizing latents is not what the
  method does (the encoder is non-linear and latents do not interpolate like
  images), so each neighbour is encoded by ``adapter.encode`` like the image;
  for pixel models the two are the same.
* For every t in {50, 100, ..., 500}: one noise per image and t, shared by
  the image and all its neighbours (paired differences), and the loss
  ``L_t(y) = mean((eps_theta(y_t, t, c) - eps)^2)`` (the training objective;
  the relative change below does not depend on mean versus sum).
* Feature: ``sum_t mean_k (L_t(x) - L_t(x_k)) / L_t(x)``. Lower = member
  (the image's loss is below its neighbours').

Cost per image: ``(N + 1) * |T|`` = 110 network calls, plus ``N`` extra
encoder passes. The family needs the preprocessed pixels of its batch
(``EncodedBatch.pixels``, images in [-1, 1]), which the extraction engine
provides to families with ``requires_pixels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, predict_eps, require


@dataclass(frozen=True)
class PFAMIConfig:
    """Parameters of PFAMI (reference defaults, REFERENCE.md section 3).

    Attributes
    ----------
    neighbours : int
        Number of cropped-and-resized neighbours N.
    crop_max, crop_min : float
        Side ratios of the first and the last neighbour's crop; the N ratios
        are evenly spaced between them.
    timesteps : tuple of int
        Timesteps at which the losses are compared.
    """

    neighbours: int = 10
    crop_max: float = 0.95
    crop_min: float = 0.70
    timesteps: tuple[int, ...] = tuple(range(50, 501, 50))

    def __post_init__(self) -> None:
        require(self.neighbours >= 1, f"pfami: neighbours must be >= 1, got {self.neighbours}")
        require(
            0.0 < self.crop_min <= self.crop_max <= 1.0,
            f"pfami: need 0 < crop_min <= crop_max <= 1, got {self.crop_min} and {self.crop_max}",
        )
        require(len(self.timesteps) >= 1, "pfami: give at least one timestep")


def crop_ratios(config: PFAMIConfig) -> list[float]:
    """The neighbours' crop ratios, evenly spaced from ``crop_max`` down to ``crop_min``."""
    n = config.neighbours
    if n == 1:
        return [config.crop_max]
    step = (config.crop_max - config.crop_min) / (n - 1)
    return [config.crop_max - k * step for k in range(n)]


def center_crop_resize(pixels: torch.Tensor, ratio: float) -> torch.Tensor:
    """Centre-crop (B, C, H, W) images to ``ratio`` of each side, then resize back (bilinear)."""
    height, width = pixels.shape[-2:]
    h, w = max(1, round(ratio * height)), max(1, round(ratio * width))
    top, left = (height - h) // 2, (width - w) // 2
    crop = pixels[..., top : top + h, left : left + w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


class PFAMI(FeatureFamily):
    """PFAMI's summed relative loss change from an image to its crop neighbours (one column)."""

    name = "pfami"
    config_class = PFAMIConfig
    requires_pixels: ClassVar[bool] = True

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return ["pfami"]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1]

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=(self.config.neighbours + 1) * len(self.config.timesteps))

    def timesteps(self) -> list[int]:
        return list(self.config.timesteps)

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """One network call per timestep on the B * (N + 1) inputs (chunked by ``chunk_for(batch)``)."""
        pixels = batch.pixels
        if pixels is None:
            raise RuntimeError(
                "PFAMI needs the batch's preprocessed pixels (EncodedBatch.pixels); "
                "the extraction engine must pass them to families with requires_pixels"
            )
        cfg = self.config
        b, k = len(batch), cfg.neighbours + 1
        pixels = pixels.to(adapter.device, torch.float32)
        # (B, N + 1, ...): the image's own x0 first, then its neighbours.
        variants = [batch.x0] + [adapter.encode(center_crop_resize(pixels, r)) for r in crop_ratios(cfg)]
        x0 = torch.stack(variants, dim=1).flatten(0, 1)  # image-major: sample i * k + j
        cond = batch.cond.repeat_interleave(k)
        change = torch.zeros(b, dtype=torch.float32, device=x0.device)
        for t in cfg.timesteps:
            eps = batch.noise(self.name, t).repeat_interleave(k, dim=0)  # shared within an image
            steps = torch.full((b * k,), t, dtype=torch.long, device=x0.device)
            pred = predict_eps(adapter, adapter.add_noise(x0, eps, steps), steps, cond, self.chunk_for(batch))
            loss = (pred - eps).pow(2).flatten(1).mean(dim=1).view(b, k)
            change += ((loss[:, :1] - loss[:, 1:]) / loss[:, :1]).mean(dim=1)
        return change.unsqueeze(1)
