"""GSA1 and GSA2 (Pang et al. 2023): gradient norms of the denoiser's parameters, for the benchmark.

White-box: the feature is the L2 norm of the gradient of the denoising loss
with respect to *every parameter tensor* of the denoiser (686 numbers for the
SD v1.5 UNet), one column per tensor, in ``named_parameters`` order. A model
that fitted an image moves little when trained on it again, so members tend
to have smaller gradients; the benchmark trains an XGBoost classifier on
these vectors (``attacks.scorers``).

* Timesteps: 20 evenly spaced over [0, 1000): 0, 50, ..., 950. One noise per
  image and timestep, shared by GSA1 and GSA2 (noise family ``"gsa"``).
* Loss at t: ``L_t = mean((eps_theta(x_t, t, c) - eps)^2)``, the training
  objective.
* **GSA1**: one backward of ``sum_t L_t``; feature = norm of that gradient.
* **GSA2**: one backward per t; feature = ``sum_t`` of the per-t norms.

Per-image gradients: parameter gradients add up over a batch, so each image
gets its own backward passes. GSA1 sends an image's 20 timesteps through the
network as one batch (chunks of ``chunk_for(batch)`` add their gradients)
and runs one backward; GSA2 runs one forward and one backward per (image, t), which is
linear in the number of timesteps. Neither differentiates a whole-batch
graph once per image (CopyMark's quadratic cost), and an image's values never
depend on which images share its batch.

The denoiser network comes from the adapter's ``denoiser`` attribute (a
``torch.nn.Module``). Its parameters are switched to ``requires_grad`` for
the duration of the call and restored afterwards; nothing else is changed.
Cost per image: 20 forward and 20 backward network evaluations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from cdi.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter
from features.base import Cost, EncodedBatch, FeatureFamily, require

#: Noise family shared by GSA1 and GSA2, so both see the same (t, eps) pairs.
NOISE_KEY = "gsa"


@dataclass(frozen=True)
class GSAConfig:
    """Parameters of GSA (reference defaults, REFERENCE.md section 3).

    Attributes
    ----------
    timesteps : tuple of int
        Timesteps of the losses whose gradients are taken.
    """

    timesteps: tuple[int, ...] = tuple(range(0, 1000, 50))

    def __post_init__(self) -> None:
        require(len(self.timesteps) >= 1, "gsa: give at least one timestep")


def denoiser_parameters(adapter: DiffusionAdapter) -> list[tuple[str, torch.nn.Parameter]]:
    """The denoiser's named parameter tensors, in module order."""
    network = getattr(adapter, "denoiser", None)
    if not isinstance(network, torch.nn.Module):
        raise CDIError(
            f"GSA needs white-box access to the denoiser's parameters, and the adapter for "
            f"{adapter.model_id!r} exposes no 'denoiser' network; drop gsa1/gsa2 from the attacks"
        )
    return list(network.named_parameters())


@contextlib.contextmanager
def _gradients_enabled(params: list[torch.nn.Parameter]) -> Iterator[None]:
    before = [p.requires_grad for p in params]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


class _GradientNorms(FeatureFamily):
    """What GSA1 and GSA2 share: columns, cost, the per-image loop."""

    config_class = GSAConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        if adapter is None:
            raise ValueError(f"{self.name}'s columns are the denoiser's parameter tensors: pass the adapter")
        return [f"{self.name}_{name}" for name, _ in denoiser_parameters(adapter)]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1] * len(self.columns(adapter))

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        n = len(self.config.timesteps)
        return Cost(forward=n, backward=n)

    def timesteps(self) -> list[int]:
        return list(self.config.timesteps)

    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """A (B, n_parameter_tensors) float32 tensor of gradient norms, image by image."""
        params = [p for _, p in denoiser_parameters(adapter)]
        steps = torch.tensor(self.config.timesteps, dtype=torch.long, device=adapter.device)
        noise = torch.stack([batch.noise(NOISE_KEY, int(t)) for t in self.config.timesteps], dim=1)
        rows = []
        with _gradients_enabled(params):
            for i in range(len(batch)):
                eps = noise[i].clone()  # (T, ...)
                x_t = adapter.add_noise(batch.x0[i : i + 1].clone().expand_as(eps), eps, steps)
                # Cloned: the engine may have built the batch under inference_mode, and
                # inference tensors cannot be saved for backward.
                cond = batch.cond.index([i]).repeat(steps.shape[0])
                cond = Condition(cond.batch_size, {k: v.clone() for k, v in cond.tensors.items()})
                rows.append(self._image_norms(adapter, params, x_t, steps, cond, eps, self.chunk_for(batch)))
        return torch.stack(rows)

    def _image_norms(
        self,
        adapter: DiffusionAdapter,
        params: list[torch.nn.Parameter],
        x_t: torch.Tensor,
        steps: torch.Tensor,
        cond: Condition,
        eps: torch.Tensor,
        chunk: int | None,
    ) -> torch.Tensor:
        """The gradient norms of one image from its T noised copies, at most ``chunk`` samples per call."""
        raise NotImplementedError


def _loss_gradients(
    adapter: DiffusionAdapter,
    params: list[torch.nn.Parameter],
    x_t: torch.Tensor,
    steps: torch.Tensor,
    cond: Condition,
    eps: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradient of ``sum_samples mean((eps_theta - eps)^2)``; unused parameters get zeros."""
    loss = (adapter.eps(x_t, steps, cond) - eps).pow(2).flatten(1).mean(dim=1).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])


class GSA1(_GradientNorms):
    """GSA1: norms of the gradient of the loss summed over the timesteps (one backward)."""

    name = "gsa1"

    def _image_norms(self, adapter, params, x_t, steps, cond, eps, chunk):
        total, n = None, steps.shape[0]
        size = n if chunk is None else chunk
        for sl in (slice(k, min(k + size, n)) for k in range(0, n, size)):
            grads = _loss_gradients(adapter, params, x_t[sl], steps[sl], cond.index(sl), eps[sl])
            total = grads if total is None else [a + g for a, g in zip(total, grads)]
        return _norms(total)


class GSA2(_GradientNorms):
    """GSA2: per-timestep gradient norms, summed over the timesteps (one backward per t)."""

    name = "gsa2"

    def _image_norms(self, adapter, params, x_t, steps, cond, eps, chunk):
        total = torch.zeros(len(params), dtype=torch.float32, device=x_t.device)
        for j in range(steps.shape[0]):
            sl = slice(j, j + 1)
            total += _norms(_loss_gradients(adapter, params, x_t[sl], steps[sl], cond.index(sl), eps[sl]))
        return total
