"""Gradient Masking (CDI, Dubinski et al. 2025).

For each t in {0, 100, ..., 900}, with ``eps`` the image's shared noise at t:

1. ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps`` and
   ``g = d/dx_t ||eps_theta(x_t, t, c) - eps||_2`` (one forward + backward);
2. ``M`` = the ``mask_fraction`` (20 %) of the sample's elements with the
   largest ``|g|`` (``round(mask_fraction * n)`` elements, at least one);
3. ``x~ = x0`` with the elements in ``M`` replaced by ``eps``;
4. feature_t = ``||(eps - x0)[M] - eps_theta(x~, t, c)[M]||_2`` (one forward).

Variant (version 3), the mask's edge: a hard top-k is a discontinuous
function of ``g``, and ``g`` carries the float32 rounding of the network's
batched kernels, which depends on the batch size. When the k-th and
(k+1)-th largest ``|g|`` are closer than that rounding, the mask swaps one
element for another between batch sizes and the feature jumps (7.8 % of its
spread across images at t = 600 between batch sizes 1 and 8, issue 24).
So the mask is decided in float64 with a narrow linear edge (``mask_weights``):
with ``tau`` the midpoint of the k-th and (k+1)-th largest ``|g|``, an
element's weight is ``clip(1/2 + (|g| - tau) / (2 h), 0, 1)`` with
``h = MASK_EDGE * tau``; ``x~ = x0 + w (eps - x0)`` and the error is weighted
by ``w``. When the k-th and (k+1)-th values are at least ``2 h`` apart (all
but a small share of image-timesteps) the weights are exactly the top-k mask
and the feature is the reference's, bit for bit; otherwise the elements at
the edge enter with fractional weights, which makes the feature a
continuous function of ``g``: rounding of ``g`` by ``delta`` moves a weight
by at most ``delta / (2 h)``. On the toy SD the k-th and (k+1)-th values are
closer than ``2 h`` in about half of the image-timesteps, mostly with weights
near 0 and 1.

Variant: the reference text is followed literally, so ``x~`` is *not* noised
to t before the second query. ``x~ - x0`` is ``eps - x0`` on ``M`` and zero
elsewhere, so the feature asks how well the model, told the noise level t,
recovers exactly the corruption that was inserted where its loss is most
sensitive. (Noising ``x~`` to t would make the target a mixture of ``eps`` and
``x0`` that the formula's ``eps - x0`` no longer describes.) 10 forward +
backward and 10 forward calls per image; lower = member.

The noise at t is the image's shared noise at t (``features.calls.IMAGE_NOISE``):
the first pass (forward + backward) at each t is then the call whose norm is
Multiple Loss's feature_t, and at t = 100 also Noise Optimisation's starting
point and a Denoising Loss repetition, so the engine makes it once for all of
them (``features.calls``). Variant: the reference shares one noise among all
timesteps; here each timestep has its own draw (``features.calls`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import (
    Cost,
    EncodedBatch,
    FeatureFamily,
    per_sample_norm,
    predict_eps,
    require,
)
from cdi.features.calls import SharedCall, image_noise, noised_residuals


@dataclass(frozen=True)
class GradientMaskingConfig:
    """Parameters of Gradient Masking (CDI reference defaults).

    Attributes
    ----------
    timesteps : tuple of int
        One column per timestep, in this order.
    mask_fraction : float
        Share of the elements (largest gradient magnitude) that are masked.
    """

    timesteps: tuple[int, ...] = tuple(range(0, 1000, 100))
    mask_fraction: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        require(len(self.timesteps) >= 1, "gradient_masking: give at least one timestep")
        require(
            len(set(self.timesteps)) == len(self.timesteps),
            f"gradient_masking: timesteps must be distinct, got {self.timesteps}",
        )
        require(
            0.0 < self.mask_fraction <= 1.0,
            f"gradient_masking: mask_fraction must be in (0, 1], got {self.mask_fraction}",
        )


#: Half-width of the mask's linear edge, relative to the threshold ``tau``
#: (see the module docstring). Measured on the toy SD (docs/notes/issue-24-batch.md):
#: ``|g|`` moves by up to 6.4e-5 of ``tau`` between batch sizes, and one element's
#: weight can be worth 0.6 of the feature's spread across images; 5e-3 keeps a
#: weight's move under 6.4e-3, i.e. under 0.4% of the spread.
MASK_EDGE = 5e-3


def masked_count(fraction: float, n: int) -> int:
    """Number of masked elements out of ``n``: ``round(fraction * n)``, at least 1."""
    return max(1, int(round(fraction * n)))


def mask_weights(magnitude: torch.Tensor, count: int, edge: float = MASK_EDGE) -> torch.Tensor:
    """Mask weights in [0, 1] of each row's ``count`` largest entries, with a linear edge (float64).

    ``magnitude`` is (N, n) and non-negative. With ``tau`` the midpoint of a
    row's ``count``-th and ``count + 1``-th largest values and ``h = edge *
    tau``, the weight is ``clip(1/2 + (m - tau) / (2 h), 0, 1)``: exactly the
    top-``count`` indicator when those two values are at least ``2 h`` apart,
    a continuous function of ``magnitude`` always. Equal values get equal
    weights, so ties need no order. ``count == n`` gives all ones.
    """
    m = magnitude.double()
    n = m.shape[1]
    if count >= n:
        return torch.ones_like(m)
    top = m.topk(count + 1, dim=1).values
    tau = (top[:, count - 1] + top[:, count]) / 2
    h = (edge * tau).clamp(min=torch.finfo(torch.float64).tiny)[:, None]
    return ((m - tau[:, None]) / (2 * h) + 0.5).clamp(0.0, 1.0)


class GradientMasking(FeatureFamily):
    """Error of the model on the inputs its loss gradient points at, per timestep."""

    name = "gradient_masking"
    version = 4  # 2: the image's shared noise; 3: the mask's linear edge; 4: one draw per (image, t)
    config_class = GradientMaskingConfig

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        return [f"grad_mask_t{t:03d}" for t in self.config.timesteps]

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        return [-1] * len(self.config.timesteps)

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        n = len(self.config.timesteps)
        return Cost(forward=2 * n, backward=n)

    def timesteps(self) -> list[int]:
        return list(self.config.timesteps)

    def shared_calls(self, adapter: DiffusionAdapter) -> list[SharedCall]:
        return [SharedCall("noised", t, grad=True) for t in self.config.timesteps]

    @torch.no_grad()
    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """Both passes run on all B * T samples at once (in chunks of ``chunk_for(batch)``)."""
        cfg = self.config
        b, n_t = len(batch), len(cfg.timesteps)
        eps = image_noise(batch, cfg.timesteps).flatten(0, 1)  # image-major: i * T + k
        x0 = batch.x0.repeat_interleave(n_t, dim=0)
        t = torch.tensor(cfg.timesteps, dtype=torch.long, device=x0.device).repeat(b)
        cond = batch.cond.repeat_interleave(n_t)

        _, grad = noised_residuals(adapter, batch, cfg.timesteps, grad=True, chunk=self.chunk_for(batch))
        flat = grad.flatten(2).flatten(0, 1)  # (B * T, n), image-major
        w = mask_weights(flat.abs(), masked_count(cfg.mask_fraction, flat.shape[1])).view_as(x0)
        inside, outside = w == 1, w == 0  # where the weights are the hard mask, keep its exact arithmetic
        w = w.to(x0.dtype)

        x_tilde = torch.where(inside, eps, torch.where(outside, x0, x0 + w * (eps - x0)))
        pred = predict_eps(adapter, x_tilde, t, cond, self.chunk_for(batch))
        target = (eps - x0) - pred
        err = torch.where(inside, target, torch.where(outside, torch.zeros_like(pred), w * target))
        return per_sample_norm(err).view(b, n_t)
