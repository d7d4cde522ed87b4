"""Multiple Loss (CDI, Dubinski et al. 2025).

feature_t = ``||eps_theta(x_t, t, c) - eps_t||_2`` with ``x_t = sqrt(abar[t])
x0 + sqrt(1 - abar[t]) eps_t`` for t in {0, 100, ..., 900}: one column per
timestep. Lower = member.

``eps_t`` is the image's shared noise at t (``features.calls.IMAGE_NOISE``),
the same that Gradient Masking (and at t = 100 Noise Optimisation and
Denoising Loss) use, so each of these calls is the forward pass Gradient
Masking makes anyway (the engine makes it once; ``features.calls``).
Variant: the reference shares *one* noise among all timesteps; here each
timestep has its own draw, so the draw's luck does not move all ten columns
together (``features.calls`` says why: the verdict's dependence on the seed).
Version 3 (2: one shared noise for all timesteps; 1: a noise of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, require
from cdi.features.calls import SharedCall, noised_residuals


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
    """Denoising error at several timesteps, with the image's shared noise at each."""

    name = "multiple_loss"
    version = 3  # 3: one draw per (image, t); 2: one shared draw for all t (features.calls)
    config_class = MultipleLossConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return [f"multiple_loss_t{t:03d}" for t in self.config.timesteps]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1] * len(self.config.timesteps)

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=len(self.config.timesteps))

    def timesteps(self) -> list[int]:
        return list(self.config.timesteps)

    def shared_calls(self, adapter: DiffusionAdapter) -> list[SharedCall]:
        return [SharedCall("noised", t) for t in self.config.timesteps]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """Every value is a shared call: all B * T samples together (in chunks) unless the engine made them."""
        norms, _ = noised_residuals(adapter, batch, self.config.timesteps, chunk=self.chunk_for(batch))
        return norms
