"""SimA (Rao, Qu & Moyer, TMLR 2025): the score on the clean input.

``e = eps_theta(x0, t, c)`` evaluated on the *clean* latent (no noise added),
scored by ``sum(|e|^4)`` over the sample's elements (the l4 norm to the
fourth power): lower = member. The denoiser's output at a point points
towards a kernel-weighted mean of nearby training samples, so it is small
where the model has seen the data (REFERENCE.md section 9).

Variant: one column per timestep of a small fixed grid (``timesteps``,
default 0, 50, 100, 200) instead of the official code's scan for the best t:
picking the best t needs labels, which an audit must not use for its
features; the audit's scoring weighs the columns instead. One network call
per timestep, all timesteps of a batch in one call. At t = 0 the call is
PIA's ``e0 = eps_theta(x0, 0, c)``; sharing it between the two families is
the extraction engine's business (call planning), not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, per_sample_norm, require
from cdi.features.calls import SharedCall, clean_eps


@dataclass(frozen=True)
class SimAConfig:
    """Parameters of SimA.

    Attributes
    ----------
    timesteps : tuple of int
        Timesteps at which the score of the clean input is evaluated.
    """

    timesteps: tuple[int, ...] = (0, 50, 100, 200)

    def __post_init__(self) -> None:
        require(len(self.timesteps) > 0, "sima: give at least one timestep")
        require(len(set(self.timesteps)) == len(self.timesteps), f"sima: repeated timesteps {self.timesteps}")
        require(all(int(t) == t and t >= 0 for t in self.timesteps),
                f"sima: timesteps must be whole numbers >= 0, got {self.timesteps}")


class SimA(FeatureFamily):
    """``||eps_theta(x0, t, c)||_4^4`` on the clean input, one column per timestep (lower = member)."""

    name = "sima"
    draws_noise = False  # deterministic: no EncodedBatch.noise
    config_class = SimAConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return [f"sima_t{int(t):03d}" for t in self.config.timesteps]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1] * len(self.config.timesteps)

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=len(self.config.timesteps))

    def timesteps(self) -> list[int]:
        return [int(t) for t in self.config.timesteps]

    def shared_calls(self, adapter: DiffusionAdapter) -> list[SharedCall]:
        return [SharedCall("clean", int(t)) for t in self.config.timesteps]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """Every value is a shared call (``features.calls``): at t = 0 it is PIA's ``e0`` and SecMI's first step."""
        steps = self.timesteps()
        eps = clean_eps(adapter, batch, steps, self.chunk_for(batch))  # (B, T, ...)
        score = per_sample_norm(eps.flatten(0, 1).float(), p=4.0) ** 4
        return score.view(len(batch), len(steps))
