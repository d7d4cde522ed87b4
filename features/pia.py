"""PIA and PIAN (Kong et al. 2024, proximal initialisation), as used by CDI.

``e0 = eps_theta(x0, 0, c)``: the model's own prediction on the *clean* input
at t = 0 (the proximal initialisation; CopyMark's version uses random noise
here, which is not PIA). Then ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) e0``
at t = 200 and

* ``pia  = ||e0 - eps_theta(x_t, t, c)||_p`` with p = 5;
* ``pian``: the same with ``e0`` rescaled per image so that its mean absolute
  value is that of a standard normal, sqrt(2 / pi) (CopyMark's PIAN is a
  no-op; this is the normalisation the PIA paper describes).

Three network calls per image (one at t = 0, then the PIA and PIAN queries
together); both columns: lower = member. The call at t = 0 is SecMI's first
inversion step too (and SimA's score at t = 0): a shared call
(``features.calls``) that the engine makes once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, per_sample_norm, predict_eps, require
from cdi.features.calls import SharedCall, clean_eps


@dataclass(frozen=True)
class PIAConfig:
    """Parameters of PIA / PIAN (CDI reference defaults).

    Attributes
    ----------
    timestep : int
        The timestep of the second query.
    p : float
        The order of the norm of the error.
    """

    timestep: int = 200
    p: float = 5.0

    def __post_init__(self) -> None:
        require(self.p >= 1, f"pia: p must be >= 1 (a norm), got {self.p}")


class PIA(FeatureFamily):
    """PIA and its normalised variant PIAN (two columns sharing e0)."""

    name = "pia"
    draws_noise = False  # deterministic: no EncodedBatch.noise
    config_class = PIAConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return ["pia", "pian"]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1, -1]

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=3)

    def timesteps(self) -> list[int]:
        return [0, self.config.timestep]

    def shared_calls(self, adapter: DiffusionAdapter) -> list[SharedCall]:
        return [SharedCall("clean", 0)]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        cfg = self.config
        b, x0 = len(batch), batch.x0
        e0 = clean_eps(adapter, batch, [0], self.chunk_for(batch))[:, 0]
        scale = math.sqrt(2.0 / math.pi) / e0.abs().flatten(1).mean(dim=1).clamp_min(1e-12)
        e0n = e0 * scale.view(-1, *([1] * (e0.dim() - 1)))
        # PIA's and PIAN's queries in one call: samples [0, B) are PIA, [B, 2B) PIAN.
        e = torch.cat([e0, e0n])
        t = torch.full((2 * b,), cfg.timestep, dtype=torch.long, device=x0.device)
        x_t = adapter.add_noise(torch.cat([x0, x0]), e, t)
        pred = predict_eps(adapter, x_t, t, batch.cond.repeat(2), self.chunk_for(batch))
        err = per_sample_norm(pred - e, p=cfg.p).view(2, b)
        return err.T.contiguous()
