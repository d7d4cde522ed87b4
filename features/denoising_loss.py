"""Denoising Loss (Carlini et al. 2023), as used by CDI.

Feature: the mean over ``repetitions`` independent noises of
``||eps_theta(x_t, t, c) - eps||_2`` at one timestep (t = 100, R = 5 in the
CDI reference). The norm is the L2 norm over one sample's elements, not
squared. Lower = member.

Repetition 0 uses the image's shared noise at t (``features.calls.IMAGE_NOISE``)
and repetitions 1..R-1 draws of their own: all R noises are still
independent, and at t = 100 the first is the call Multiple Loss, Gradient
Masking and Noise Optimisation make there anyway, so the engine makes it once
(``features.calls``). Version 3 (2: the image's one noise shared by all
timesteps; 1: every repetition its own draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, per_sample_norm, predict_eps, require
from cdi.features.calls import SharedCall, noised_residuals


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
    version = 3  # repetition 0 takes the image's shared noise at t (features.calls); 2: the one for all t
    config_class = DenoisingLossConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return ["denoising_loss"]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1]

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=self.config.repetitions)

    def timesteps(self) -> list[int]:
        return [self.config.timestep]

    def shared_calls(self, adapter: DiffusionAdapter) -> list[SharedCall]:
        return [SharedCall("noised", self.config.timestep)]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """Repetition 0 is a shared call; the B * (R - 1) others go through the network together (in chunks)."""
        cfg = self.config
        b, r = len(batch), cfg.repetitions
        shared, _ = noised_residuals(adapter, batch, [cfg.timestep], chunk=self.chunk_for(batch))  # (B, 1)
        if r == 1:
            return shared
        # (B, R - 1, ...) -> (B * (R - 1), ...), image-major: sample i * (R - 1) + j - 1 is image i, noise j.
        eps = torch.stack([batch.noise(self.name, cfg.timestep, j) for j in range(1, r)], dim=1)
        eps = eps.flatten(0, 1)
        x0 = batch.x0.repeat_interleave(r - 1, dim=0)
        t = torch.full((b * (r - 1),), cfg.timestep, dtype=torch.long, device=x0.device)
        x_t = adapter.add_noise(x0, eps, t)
        pred = predict_eps(adapter, x_t, t, batch.cond.repeat_interleave(r - 1), self.chunk_for(batch))
        own = per_sample_norm(pred - eps).view(b, r - 1)
        return torch.cat([shared, own], dim=1).mean(dim=1, keepdim=True)
