"""CLiD (Zhai et al. 2024): conditional likelihood discrepancy.

Training overfits p(x | c) more than p(x), so for members removing (part of)
the condition raises the denoising loss more. Conditions per image: its
caption ``c``, then k reduced conditions ``c*_1..c*_k``:

* text models: reduced captions by one of three rules (``reduction``;
  ``features.clid_captions`` documents them and why ``"random"`` is the
  default), then the empty prompt:

  - ``"random"`` (default): 30 %, 50 % and 70 % of the words removed, a
    random subset drawn from (seed, image hash, rate) only, so the reduced
    captions are reproducible and independent of the batch (k = 4);
  - ``"impt"``: the released code's importance clipping, the top
    ``ceil(rate * n)`` words of one ranking per caption replaced by the
    end-of-text token; the ranking is unreleased, a deterministic proxy from
    the model's own text conditioning is used (k = 4);
  - ``"clip"``: the released code's first, middle and last third of the
    caption's characters (k = 4), with its timesteps 485, 495, 505 unless
    ``timesteps`` is given;
* class-conditional models: the null class only (k = 1).

Timesteps t in {440, 450, 460} (``"random"``, ``"impt"``) with one noise each, and the same (t, eps)
pairs for every condition (paired differences). With
``L(c) = mean over the pairs and all elements of (eps_theta(x_t, t, c) - eps)^2``
(mean squared error), the columns are ``clid_loss = L(c)`` (lower = member) and
``clid_d{i} = L(c*_i) - L(c)`` (higher = member). All (k + 1) * 3 samples of an
image go through the network together (15 calls with k = 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, predict_eps, require
from cdi.features.clid_captions import clip_captions, importance_captions, importance_ranking, mask_caption

REDUCTIONS = ("random", "impt", "clip")
#: The timesteps of each rule's released script when none are given.
DEFAULT_TIMESTEPS = {"random": (440, 450, 460), "impt": (440, 450, 460), "clip": (485, 495, 505)}


@dataclass(frozen=True)
class CLiDConfig:
    """Parameters of the CLiD features (reference defaults).

    Attributes
    ----------
    timesteps : tuple of int or None
        The timesteps of the (t, eps) pairs shared by all conditions; None:
        the reduction rule's own (440, 450, 460, or 485, 495, 505 for "clip").
    mask_rates : tuple of float
        Shares of a caption's words removed ("random") or replaced ("impt"),
        one reduced caption each (text models only; the null condition always
        comes last). Not used by "clip".
    reduction : {"random", "impt", "clip"}
        How the reduced captions are made (``features.clid_captions``).
    end_of_text : str
        The token "impt" puts in place of a word: CLIP's end-of-text token
        (SD 1.x/2.x and SDXL tokenizers read it as the special token).
    """

    timesteps: tuple[int, ...] | None = None
    mask_rates: tuple[float, ...] = (0.3, 0.5, 0.7)
    reduction: str = "random"
    end_of_text: str = "<|endoftext|>"

    def __post_init__(self) -> None:
        require(
            self.reduction in REDUCTIONS,
            f"clid: reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}",
        )
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
            require(len(self.timesteps) >= 1, "clid: give at least one timestep")
        object.__setattr__(self, "mask_rates", tuple(float(r) for r in self.mask_rates))
        require(
            all(0.0 < r <= 1.0 for r in self.mask_rates),
            f"clid: mask_rates must lie in (0, 1], got {self.mask_rates}",
        )

    @property
    def steps(self) -> tuple[int, ...]:
        """The timesteps used: ``timesteps``, or the reduction rule's own when None."""
        return DEFAULT_TIMESTEPS[self.reduction] if self.timesteps is None else self.timesteps


class CLiD(FeatureFamily):
    """Loss under the caption and its increase under k reduced conditions."""

    name = "clid"
    config_class = CLiDConfig
    requires_condition = True

    def reduced_count(self, adapter: DiffusionAdapter | None = None) -> int:
        """k: the masked captions plus null for text models, null only for class models."""
        if adapter is not None and adapter.conditioning == "class":
            return 1
        if self.config.reduction == "clip":
            return 3 + 1
        return len(self.config.mask_rates) + 1

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return ["clid_loss"] + [f"clid_d{i}" for i in range(1, self.reduced_count(adapter) + 1)]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1] + [1] * self.reduced_count(adapter)

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        return Cost(forward=(self.reduced_count(adapter) + 1) * len(self.config.steps))

    def timesteps(self) -> list[int]:
        return list(self.config.steps)

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
        return [adapter.conditions(captions) for captions in self.reduced_captions(adapter, batch)] + [null]

    def extra_captions(self, adapter: DiffusionAdapter, captions, hashes, seed: int) -> list[str]:
        """The reduced captions of ``captions`` for the rules that need no model ("random", "clip")."""
        if adapter.conditioning != "text" or self.config.reduction == "impt":
            return []
        texts = [str(c) for c in captions]  # as reduced_captions reads them
        if self.config.reduction == "clip":
            return [part for c in texts for part in clip_captions(c)]
        return [mask_caption(c, rate, seed, h) for c, h in zip(texts, hashes) for rate in self.config.mask_rates]

    def reduced_captions(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> list[list[str]]:
        """The reduced captions of a text model's batch: one list of B captions per reduced condition."""
        cfg, captions = self.config, [str(c) for c in batch.captions]
        if cfg.reduction == "clip":
            thirds = [clip_captions(c) for c in captions]
            return [[parts[k] for parts in thirds] for k in range(3)]
        if cfg.reduction == "impt":
            rankings = importance_ranking(adapter, captions, cfg.end_of_text)
            return [[importance_captions(c, r, rate, cfg.end_of_text) for c, r in zip(captions, rankings)]
                    for rate in cfg.mask_rates]
        return [[mask_caption(c, rate, batch.seed, h) for c, h in zip(captions, batch.hashes)]
                for rate in cfg.mask_rates]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        self.check_applicable(adapter)
        cfg = self.config
        conds = [batch.cond] + self.reduced_conditions(adapter, batch)
        b, n_t, n_c = len(batch), len(cfg.steps), len(conds)

        # One block of B * T samples (image-major: i * T + k) per condition.
        eps = torch.stack([batch.noise(self.name, t) for t in cfg.steps], dim=1).flatten(0, 1)
        t = torch.tensor(cfg.steps, dtype=torch.long, device=batch.x0.device).repeat(b)
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
