"""SecMI_stat (Duan et al. 2023), the variant used by CDI.

Deterministic DDIM inversion with the model's own noise prediction:
``x_{s'} = sqrt(abar[s']) f + sqrt(1 - abar[s']) e`` with
``f = (x_s - sqrt(1 - abar[s]) e) / sqrt(abar[s])`` and ``e = eps_theta(x_s, s, c)``.

Starting from ``x0`` taken as the state at s = 0 (the scheduler's abar[0],
slightly below 1, is used as is), the inversion runs 0 -> interval -> ... ->
t_sec (t_sec = 100, interval = 10: 10 calls) and gives ``x_det``. One more
inversion step t_sec -> t_sec + interval and one denoising step back
(2 calls) give ``x_step``. Feature: ``||x_det - x_step||_2`` (L2 norm over the
sample, not squared). 12 calls per image; lower = member.

The first step's ``e = eps_theta(x0, 0, c)`` is PIA's ``e0``: a shared call
(``features.calls``) that the engine makes once for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, per_sample_norm, predict_eps, require
from cdi.features.calls import SharedCall, clean_eps


@dataclass(frozen=True)
class SecMIConfig:
    """Parameters of SecMI_stat (CDI reference defaults).

    Attributes
    ----------
    timestep : int
        t_sec, where the step error is measured; a multiple of ``interval``.
    interval : int
        The DDIM step between consecutive timesteps.
    """

    timestep: int = 100
    interval: int = 10

    def __post_init__(self) -> None:
        require(self.interval >= 1, f"secmi: interval must be >= 1, got {self.interval}")
        require(
            self.timestep >= 0 and self.timestep % self.interval == 0,
            f"secmi: timestep must be a non-negative multiple of interval={self.interval}, "
            f"got {self.timestep}",
        )


def ddim_step(x: torch.Tensor, e: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM move of ``x`` from abar_from to abar_to with noise estimate ``e``."""
    f = (x - (1.0 - abar_from).sqrt() * e) / abar_from.sqrt()
    return abar_to.sqrt() * f + (1.0 - abar_to).sqrt() * e


class SecMI(FeatureFamily):
    """SecMI_stat: the error of one DDIM up-and-down step after deterministic inversion."""

    name = "secmi"
    draws_noise = False  # deterministic: no EncodedBatch.noise
    config_class = SecMIConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return ["secmi"]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1]

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=self.config.timestep // self.config.interval + 2)

    def timesteps(self) -> list[int]:
        cfg = self.config
        return list(range(0, cfg.timestep + cfg.interval + 1, cfg.interval))

    def shared_calls(self, adapter: DiffusionAdapter) -> list[SharedCall]:
        return [SharedCall("clean", 0)]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """Sequential in time; each step is one network call on the B images."""
        cfg = self.config
        abar = adapter.alphas_cumprod
        b = len(batch)

        def step(x: torch.Tensor, s_from: int, s_to: int) -> torch.Tensor:
            if s_from == 0 and x is batch.x0:  # eps_theta(x0, 0, c): PIA's e0, a shared call
                e = clean_eps(adapter, batch, [0], self.chunk_for(batch))[:, 0]
            else:
                t = torch.full((b,), s_from, dtype=torch.long, device=x.device)
                e = predict_eps(adapter, x, t, batch.cond, self.chunk_for(batch))
            return ddim_step(x, e, abar[s_from], abar[s_to])

        x = batch.x0
        for s in range(0, cfg.timestep, cfg.interval):
            x = step(x, s, s + cfg.interval)
        x_det = x
        x_up = step(x_det, cfg.timestep, cfg.timestep + cfg.interval)
        x_step = step(x_up, cfg.timestep + cfg.interval, cfg.timestep)
        return per_sample_norm(x_det - x_step).unsqueeze(1)
