"""Denoising Loss (Carlini et al. 2023), as used by CDI.

Feature: the mean over ``repetitions`` independent noises of
``||eps_theta(x_t, t, c) - eps||_2`` at one timestep (t = 100, R = 5 in the
CDI reference). The norm is the L2 norm over one sample's elements, not
squared. Lower = member.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from features.base import Cost, EncodedBatch, FeatureFamily, per_sample_norm, predict_eps, require


@dataclass(frozen=True)
class DenoisingLossConfig:
    """Parameters of the Denoising Loss feature (CDI reference defaults).

    Attributes
    ----------
    timestep : int
        The diffusion timestep at which the loss is measured.
    repetitions : int
        Number of independent noises averaged per image.
    """

    timestep: int = 100
    repetitions: int = 5

    def __post_init__(self) -> None:
        require(self.repetitions >= 1, f"denoising_loss: repetitions must be >= 1, got {self.repetitions}")


class DenoisingLoss(FeatureFamily):
    """Mean denoising error at one timestep over several noises (one column)."""

    name = "denoising_loss"
    config_class = DenoisingLossConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return ["denoising_loss"]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1]

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=self.config.repetitions)

    def timesteps(self) -> list[int]:
        return [self.config.timestep]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """All B * R noised samples go through the network together (in chunks)."""
        cfg = self.config
        b, r = len(batch), cfg.repetitions
        # (B, R, ...) -> (B * R, ...), image-major: sample i * R + j is image i, noise j.
        eps = torch.stack([batch.noise(self.name, cfg.timestep, j) for j in range(r)], dim=1)
        eps = eps.flatten(0, 1)
        x0 = batch.x0.repeat_interleave(r, dim=0)
        t = torch.full((b * r,), cfg.timestep, dtype=torch.long, device=x0.device)
        x_t = adapter.add_noise(x0, eps, t)
        pred = predict_eps(adapter, x_t, t, batch.cond.repeat_interleave(r), self.chunk_for(batch))
        loss = per_sample_norm(pred - eps).view(b, r).mean(dim=1)
        return loss.unsqueeze(1)
