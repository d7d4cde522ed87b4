"""Network calls that several feature families share, evaluated once per batch.

Several families of the CDI set query the network at the same (input,
timestep, condition):

* ``eps_theta(x0, 0, c)`` on the *clean* input: SecMI's first inversion step
  from t = 0 and PIA's proximal initialisation ``e0`` (and SimA's score at
  t = 0, REFERENCE.md section 9);
* ``eps_theta(x_t, t, c)`` with ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t])
  eps`` and ``eps`` the image's **shared noise at t** (``IMAGE_NOISE``):
  Multiple Loss at every t, the gradient pass of Gradient Masking at the
  same t, the first Denoising Loss repetition at t = 100 and Noise
  Optimisation's starting point (d = 0) at t = 100.

The CDI reference defines Multiple Loss, Gradient Masking and Noise
Optimisation each with one noise per image, Multiple Loss and Gradient
Masking with that one noise shared by all their timesteps (REFERENCE.md
section 1). Here the families share one draw per (image, t) instead: at a
given t all of them use the same noise, so one network call serves them all
and every column keeps its definition (one standard normal noise per image
at that t), but the draws of different timesteps are independent.
Departure, and why (issue 21, docs/notes/issue-21-seed.md, Session 5): with
one noise for all ten timesteps the noise moves the ten Multiple Loss and
ten Gradient Masking columns together, so it does not average out in the
verdict's prior score, and the verdict p-value moved by a factor of about
2,000 between seeds on the toy demo; with independent draws per timestep the
seed sd of the prior part's z fell from 0.63 to 0.34 (20 seeds) at no extra
call. Every draw is a function of (seed, image hash, t) only, so values stay
independent of batch mates, order, sharding and resumption.

How it works, explicitly and nothing more:

1. a family declares the calls it needs with ``FeatureFamily.shared_calls``:
   a list of ``SharedCall(kind, timestep, grad)``;
2. the extraction engine merges the declarations of the families it runs on
   a batch (``plan``: one call per (kind, timestep), with the gradient when
   any family needs it) and evaluates them together, before the families run
   (``evaluate``), into ``EncodedBatch.shared``;
3. a family reads its values with ``clean_eps`` or ``noised_residuals``,
   which take what is in ``EncodedBatch.shared`` and compute (without storing)
   whatever is not there, so a family called on its own, outside the engine,
   computes exactly what it declares.

A ``"noised"`` call yields the residual norm ``||eps_theta(x_t, t, c) - eps||_2``
and, with ``grad``, its gradient with respect to ``x_t`` (one forward and one
backward); a ``"clean"`` call yields ``eps_theta(x0, t, c)`` (one forward).
Both use the batch's own condition ``EncodedBatch.cond``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Sequence

import torch

from cdi.models.base import DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, per_sample_norm, predict_eps, residual_norm_and_grad

if TYPE_CHECKING:
    from cdi.features.base import FeatureFamily

#: The noise family of the image's shared noise at t (``EncodedBatch.noise(IMAGE_NOISE, t)``).
IMAGE_NOISE = "image"

Kind = Literal["clean", "noised"]


@dataclass(frozen=True)
class SharedCall:
    """One network evaluation per image that several families may need.

    Attributes
    ----------
    kind : {"clean", "noised"}
        ``"clean"``: ``eps_theta(x0, t, c)``. ``"noised"``: the residual norm
        at ``x_t`` noised with the image's shared noise at t (``IMAGE_NOISE``).
    timestep : int
    grad : bool
        ``"noised"`` only: also the gradient of the norm with respect to x_t.
    """

    kind: Kind
    timestep: int
    grad: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("clean", "noised"):
            raise ValueError(f"shared call kind must be 'clean' or 'noised', got {self.kind!r}")
        if self.kind == "clean" and self.grad:
            raise ValueError("a clean shared call has no gradient")
        object.__setattr__(self, "timestep", int(self.timestep))

    @property
    def cost(self) -> Cost:
        return Cost(1, 1 if self.grad else 0)


def plan(calls: Iterable[SharedCall]) -> list[SharedCall]:
    """The distinct calls: one per (kind, timestep), with the gradient if any request has it."""
    grad: dict[tuple[str, int], bool] = {}
    for call in calls:
        key = (call.kind, call.timestep)
        grad[key] = grad.get(key, False) or call.grad
    return [SharedCall(kind, t, g) for (kind, t), g in grad.items()]


def planned_calls(families: Sequence["FeatureFamily"], adapter: DiffusionAdapter) -> list[SharedCall]:
    """The merged shared calls of ``families`` on ``adapter``."""
    return plan(call for family in families for call in family.shared_calls(adapter))


def shared_savings(families: Sequence["FeatureFamily"], adapter: DiffusionAdapter) -> Cost:
    """Calls per image that the families' declared costs count more than once.

    Each family's ``cost`` counts its shared calls as if it ran alone; the
    engine makes each distinct call once. ``total - savings`` is what a batch
    costs.
    """
    declared = Cost(0, 0)
    for family in families:
        for call in family.shared_calls(adapter):
            declared = declared + call.cost
    merged = Cost(0, 0)
    for call in planned_calls(families, adapter):
        merged = merged + call.cost
    return Cost(declared.forward - merged.forward, declared.backward - merged.backward)


def image_noise(batch: EncodedBatch, steps: Sequence[int]) -> torch.Tensor:
    """The shared noise of every image at every t of ``steps``: (B, T, ...), ``batch.x0``'s shape per t.

    One draw per (image, t), a function of (seed, image hash, t) only; the
    families that query the network at t all use it.
    """
    return torch.stack([batch.noise(IMAGE_NOISE, int(t)) for t in steps], dim=1)


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------
def _clean(adapter: DiffusionAdapter, batch: EncodedBatch, steps: list[int], chunk: int | None) -> torch.Tensor:
    """``eps_theta(x0, t, c)`` for every image and t: (B, T, ...), image-major in one call."""
    b, n_t = len(batch), len(steps)
    x0 = batch.x0.repeat_interleave(n_t, dim=0)
    t = torch.tensor(steps, dtype=torch.long, device=x0.device).repeat(b)
    pred = predict_eps(adapter, x0, t, batch.cond.repeat_interleave(n_t), chunk)
    return pred.view(b, n_t, *batch.x0.shape[1:])


def _noised(
    adapter: DiffusionAdapter, batch: EncodedBatch, steps: list[int], grad: bool, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual norms (B, T) and, with ``grad``, their gradients (B, T, ...) at the shared noise."""
    b, n_t = len(batch), len(steps)
    eps = image_noise(batch, steps).flatten(0, 1)  # image-major: i * T + k
    x0 = batch.x0.repeat_interleave(n_t, dim=0)
    t = torch.tensor(steps, dtype=torch.long, device=x0.device).repeat(b)
    x_t = adapter.add_noise(x0, eps, t)
    cond = batch.cond.repeat_interleave(n_t)
    if grad:
        norms, grads = residual_norm_and_grad(adapter, x_t, t, cond, eps, chunk)
        return norms.view(b, n_t), grads.view(b, n_t, *batch.x0.shape[1:])
    with torch.no_grad():
        norms = per_sample_norm(predict_eps(adapter, x_t, t, cond, chunk) - eps)
    return norms.view(b, n_t), None


def evaluate(adapter: DiffusionAdapter, batch: EncodedBatch, calls: Sequence[SharedCall]) -> None:
    """Evaluate ``calls`` (already merged by ``plan``) into ``batch.shared``.

    Calls of one kind and gradient mode go through the network together, all
    timesteps of all images in one batch of samples (chunked by
    ``batch.max_chunk``).
    """
    groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for call in calls:
        groups[(call.kind, call.grad)].append(call.timestep)
    for (kind, grad), steps in groups.items():
        if kind == "clean":
            with torch.no_grad():
                preds = _clean(adapter, batch, steps, batch.max_chunk)
            for k, t in enumerate(steps):
                batch.shared[("clean", t)] = (preds[:, k], None)
        else:
            norms, grads = _noised(adapter, batch, steps, grad, batch.max_chunk)
            for k, t in enumerate(steps):
                batch.shared[("noised", t)] = (norms[:, k], None if grads is None else grads[:, k])


def _missing(batch: EncodedBatch, kind: str, steps: Sequence[int], grad: bool) -> list[int]:
    out = []
    for t in steps:
        entry = batch.shared.get((kind, int(t)))
        if entry is None or (grad and entry[1] is None):
            out.append(int(t))
    return out


def clean_eps(
    adapter: DiffusionAdapter, batch: EncodedBatch, steps: Sequence[int], chunk: int | None = None
) -> torch.Tensor:
    """``eps_theta(x0, t, c)`` at each t of ``steps``: (B, T, ...), from ``batch.shared`` when there."""
    steps = [int(t) for t in steps]
    missing = _missing(batch, "clean", steps, False)
    computed = {}
    if missing:
        with torch.no_grad():
            preds = _clean(adapter, batch, missing, chunk)
        computed = {t: preds[:, k] for k, t in enumerate(missing)}
    return torch.stack([computed[t] if t in computed else batch.shared[("clean", t)][0] for t in steps], dim=1)


def noised_residuals(
    adapter: DiffusionAdapter,
    batch: EncodedBatch,
    steps: Sequence[int],
    grad: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``||eps_theta(x_t, t, c) - eps||_2`` at the image's shared noise at t, per image and t.

    Returns norms (B, T) and, with ``grad``, the gradients with respect to
    ``x_t`` (B, T, ...); values in ``batch.shared`` are used, the others are
    computed here (all missing timesteps in one batch of samples).
    """
    steps = [int(t) for t in steps]
    missing = _missing(batch, "noised", steps, grad)
    computed: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if missing:
        norms, grads = _noised(adapter, batch, missing, grad, chunk)
        computed = {t: (norms[:, k], None if grads is None else grads[:, k]) for k, t in enumerate(missing)}
    entries = [computed[t] if t in computed else batch.shared[("noised", t)] for t in steps]
    norms = torch.stack([e[0] for e in entries], dim=1)
    grads = torch.stack([e[1] for e in entries], dim=1) if grad else None
    return norms, grads
