"""Multiple Loss (CDI, Dubinski et al. 2025).

One noise ``eps`` per image, shared by every timestep; feature_t =
``||eps_theta(x_t, t, c) - eps||_2`` with ``x_t = sqrt(abar[t]) x0 +
sqrt(1 - abar[t]) eps`` for t in {0, 100, ..., 900}: one column per timestep.
Lower = member.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from features.base import Cost, EncodedBatch, FeatureFamily, per_sample_norm, predict_eps, require


@dataclass(frozen=True)
class MultipleLossConfig:
    """Parameters of the Multiple Loss features (CDI reference defaults).

    Attributes
    ----------
    timesteps : tuple of int
        The timesteps, one column each, in this order.
    """

    timesteps: tuple[int, ...] = tuple(range(0, 1000, 100))

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        require(len(self.timesteps) >= 1, "multiple_loss: give at least one timestep")
        require(
            len(set(self.timesteps)) == len(self.timesteps),
            f"multiple_loss: timesteps must be distinct, got {self.timesteps}",
        )


class MultipleLoss(FeatureFamily):
    """Denoising error at several timesteps with one shared noise per image."""

    name = "multiple_loss"
    config_class = MultipleLossConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return [f"multiple_loss_t{t:03d}" for t in self.config.timesteps]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1] * len(self.config.timesteps)

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=len(self.config.timesteps))

    def timesteps(self) -> list[int]:
        return list(self.config.timesteps)

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """All B * T noised samples go through the network together (in chunks)."""
        steps = self.config.timesteps
        b, n_t = len(batch), len(steps)
        eps = batch.noise(self.name).repeat_interleave(n_t, dim=0)  # image-major: i * T + k
        x0 = batch.x0.repeat_interleave(n_t, dim=0)
        t = torch.tensor(steps, dtype=torch.long, device=x0.device).repeat(b)
        x_t = adapter.add_noise(x0, eps, t)
        pred = predict_eps(adapter, x_t, t, batch.cond.repeat_interleave(n_t), self.chunk_for(batch))
        return per_sample_norm(pred - eps).view(b, n_t)
