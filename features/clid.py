"""CLiD (Zhai et al. 2024): conditional likelihood discrepancy.

Training overfits p(x | c) more than p(x), so for members removing (part of)
the condition raises the denoising loss more. Conditions per image: its
caption ``c``, then k reduced conditions ``c*_1..c*_k``:

* text models: the caption with 30 %, 50 % and 70 % of its words removed,
  then the empty prompt (k = 4). The paper masks words by an importance
  ranking that was never released; here the removed words are a random subset
  drawn from (seed, image hash, rate) only, so the reduced captions are
  reproducible and independent of the batch (``mask_caption``);
* class-conditional models: the null class only (k = 1).

Timesteps t in {440, 450, 460} with one noise each, and the same (t, eps)
pairs for every condition (paired differences). With
``L(c) = mean over the pairs and all elements of (eps_theta(x_t, t, c) - eps)^2``
(mean squared error), the columns are ``clid_loss = L(c)`` (lower = member) and
``clid_d{i} = L(c*_i) - L(c)`` (higher = member). All (k + 1) * 3 samples of an
image go through the network together (15 calls with k = 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdi.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter
from features.base import Cost, EncodedBatch, FeatureFamily, derive_seed, predict_eps, require


@dataclass(frozen=True)
class CLiDConfig:
    """Parameters of the CLiD features (reference defaults).

    Attributes
    ----------
    timesteps : tuple of int
        The timesteps of the (t, eps) pairs shared by all conditions.
    mask_rates : tuple of float
        Shares of a caption's words removed, one reduced caption each (text
        models only; the null condition always comes last).
    """

    timesteps: tuple[int, ...] = (440, 450, 460)
    mask_rates: tuple[float, ...] = (0.3, 0.5, 0.7)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        object.__setattr__(self, "mask_rates", tuple(float(r) for r in self.mask_rates))
        require(len(self.timesteps) >= 1, "clid: give at least one timestep")
        require(
            all(0.0 < r <= 1.0 for r in self.mask_rates),
            f"clid: mask_rates must lie in (0, 1], got {self.mask_rates}",
        )


def mask_caption(caption: str, rate: float, seed: int, image_hash: str) -> str:
    """Remove ``floor(rate * n + 1/2)`` of the caption's n words, chosen at random.

    The words removed are those whose keys ``derive_seed(seed, image_hash,
    "clid_mask", rate, position)`` are smallest: a function of (seed, image
    hash, rate) only. The other words keep their order, joined by single
    spaces.
    """
    words = caption.split()
    n_masked = math.floor(rate * len(words) + 0.5)
    keys = [derive_seed(seed, image_hash, "clid_mask", f"rate={rate!r}", j) for j in range(len(words))]
    masked = set(sorted(range(len(words)), key=keys.__getitem__)[:n_masked])
    return " ".join(w for j, w in enumerate(words) if j not in masked)


class CLiD(FeatureFamily):
    """Loss under the caption and its increase under k reduced conditions."""

    name = "clid"
    config_class = CLiDConfig
    requires_condition = True

    def reduced_count(self, adapter: DiffusionAdapter | None = None) -> int:
        """k: the masked captions plus null for text models, null only for class models."""
        if adapter is not None and adapter.conditioning == "class":
            return 1
        return len(self.config.mask_rates) + 1

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return ["clid_loss"] + [f"clid_d{i}" for i in range(1, self.reduced_count(adapter) + 1)]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1] + [1] * self.reduced_count(adapter)

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=(self.reduced_count(adapter) + 1) * len(self.config.timesteps))

    def timesteps(self) -> list[int]:
        return list(self.config.timesteps)

    def reduced_conditions(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> list[Condition]:
        """The k reduced conditions of the batch, each of batch size B."""
        missing = [i for i, c in enumerate(batch.captions) if c is None or not str(c).strip()]
        if missing:
            what = "caption" if adapter.conditioning == "text" else "class label"
            raise CDIError(
                f"CLiD needs a {what} for every image, but {len(missing)} image(s) in this batch have "
                f"none (e.g. image {batch.hashes[missing[0]][:12]}); add captions or drop 'clid' "
                f"from --features"
            )
        null = adapter.null_condition(len(batch))
        if adapter.conditioning == "class":
            return [null]
        reduced = [
            adapter.conditions(
                [mask_caption(c, rate, batch.seed, h) for c, h in zip(batch.captions, batch.hashes)]
            )
            for rate in self.config.mask_rates
        ]
        return reduced + [null]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        self.check_applicable(adapter)
        cfg = self.config
        conds = [batch.cond] + self.reduced_conditions(adapter, batch)
        b, n_t, n_c = len(batch), len(cfg.timesteps), len(conds)

        # One block of B * T samples (image-major: i * T + k) per condition.
        eps = torch.stack([batch.noise(self.name, t) for t in cfg.timesteps], dim=1).flatten(0, 1)
        t = torch.tensor(cfg.timesteps, dtype=torch.long, device=batch.x0.device).repeat(b)
        x_t = adapter.add_noise(batch.x0.repeat_interleave(n_t, dim=0), eps, t)
        cond = Condition.cat([c.repeat_interleave(n_t) for c in conds])
        pred = predict_eps(
            adapter,
            x_t.repeat(n_c, *([1] * (x_t.dim() - 1))),
            t.repeat(n_c),
            cond,
            self.chunk_for(batch),
        )
        err = pred - eps.repeat(n_c, *([1] * (eps.dim() - 1)))
        loss = err.pow(2).flatten(1).mean(dim=1).view(n_c, b, n_t).mean(dim=2)  # (conditions, B)
        return torch.cat([loss[:1], loss[1:] - loss[:1]], dim=0).T.contiguous()
