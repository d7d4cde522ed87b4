"""An analytic diffusion "model" for exact tests of the feature families.

``GaussianOracle`` is a ``DiffusionAdapter`` whose noise prediction is the
exact posterior mean for Gaussian data ``x0 ~ N(mu_c, s^2 I)``:

    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu_c) / (abar s^2 + 1 - abar)

The mean ``mu_c`` depends on the condition, so conditional families see a
real difference between conditions:

* text: ``mu`` is the mean of one fixed random vector per word of the prompt
  (the empty prompt, the null condition, has ``mu = 0``);
* class: one fixed random vector per class, and ``mu = 0`` for the null class;
* none: ``mu = 0``.

Everything is float32 on the CPU; ``encode`` is a fixed linear map.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from cdi.models.base import Condition, DiffusionAdapter


def linear_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """The DDPM linear beta schedule's abar (1e-4 to 0.02)."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


class GaussianOracle(DiffusionAdapter):
    """Exact-posterior eps for Gaussian data with condition-dependent means."""

    family = "oracle"

    def __init__(
        self,
        conditioning: str = "text",
        resolution: int = 4,
        channels: int = 3,
        sigma: float = 0.6,
        encode_scale: float = 0.8,
        num_classes: int = 5,
    ) -> None:
        super().__init__(
            model_id=f"oracle-{conditioning}",
            revision=None,
            fingerprint="0" * 64,
            resolution=resolution,
            image_channels=channels,
            alphas_cumprod=linear_alphas_cumprod(),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        self.conditioning = conditioning
        self.sigma = float(sigma)
        self.encode_scale = float(encode_scale)
        self.num_classes = num_classes
        self.shape = (channels, resolution, resolution)
        gen = torch.Generator().manual_seed(1234)
        means = 0.7 * torch.randn((num_classes, *self.shape), generator=gen)
        self.class_means = torch.cat([means, torch.zeros((1, *self.shape))])  # last row: null class

    # ------------------------------------------------------------ helpers
    def word_vector(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") & ((1 << 63) - 1)
        return 0.7 * torch.randn(self.shape, generator=torch.Generator().manual_seed(seed))

    def prompt_mean(self, prompt: str) -> torch.Tensor:
        words = prompt.lower().split()
        if not words:
            return torch.zeros(self.shape)
        return torch.stack([self.word_vector(w) for w in words]).mean(dim=0)

    def mean_of(self, caption: str | None) -> np.ndarray:
        """mu for one caption, as float64 numpy (for hand computations)."""
        if self.conditioning == "text":
            return self.prompt_mean(caption or "").double().numpy()
        if self.conditioning == "class":
            return self.class_means[self.class_id(caption)].double().numpy()
        return np.zeros(self.shape)

    # ------------------------------------------------------ adapter protocol
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_scale * pixels

    def _text_conditions(self, prompts: list[str]) -> Condition:
        return Condition(len(prompts), {"mean": torch.stack([self.prompt_mean(p) for p in prompts])})

    def _class_conditions(self, labels: list[int]) -> Condition:
        return Condition(len(labels), {"class_labels": torch.tensor(labels, dtype=torch.long)})

    def class_id(self, caption: str | None) -> int:
        return self.num_classes if caption is None else int(caption)

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        if "mean" in cond.tensors:
            mu = cond.tensors["mean"]
        elif "class_labels" in cond.tensors:
            mu = self.class_means[cond.tensors["class_labels"]]
        else:
            mu = torch.zeros_like(x_t)
        abar = self._abar(t, x_t.dim())
        return (1.0 - abar).sqrt() * (x_t - abar.sqrt() * mu) / (abar * self.sigma**2 + 1.0 - abar)
