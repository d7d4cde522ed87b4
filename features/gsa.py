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

Per-sample gradients without one backward per sample: parameter gradients
add up over a batch, so a plain backward of a batch gives one sum, not one
gradient per image. Here ``torch.func`` computes them batched:
``vmap(grad(loss))`` over the samples with the parameters passed in by
``functional_call``, which runs one forward and one backward of the whole
chunk and keeps each sample's own gradient (the per-sample weight gradients
are batched outer products instead of sums). The norms are taken inside the
vmapped function, so each chunk's per-sample gradients are reduced to one
number per parameter tensor as soon as they exist.

* GSA1: one sample per *image* (its T noised copies go through the network
  together, as the batch of the vmapped function), loss ``sum_t L_t``;
* GSA2: one sample per *(image, t)*, loss ``L_t``, norms summed over t.

Chunks: ``torch.func.vmap(..., chunk_size=k)`` with ``k = chunk_for(batch) //
G`` samples (G = T for GSA1, 1 for GSA2; at least 1), so at most about
``chunk_for(batch)`` network inputs and k per-sample gradients (k times the
denoiser's parameters) are in memory at once. Departure from the other
families' rule: a call takes at least one image's T = 20 inputs, even when
the batch size is smaller (GSA1: its per-image gradient is one vmapped
sample; GSA2: vmapping fewer than T samples was slower on CPU than plain
backward passes); GSA2 then holds T per-sample gradients at once; on CUDA out-of-memory the
engine halves the batch and with it k. An image's values never depend on
which images share its batch (no whole-batch graph is differentiated per
image, CopyMark's quadratic cost, and nothing is summed across images).
Attention kernels without a vmap batching rule (PyTorch 2.x's fused
scaled-dot-product attention on CPU, for one) fall back to a loop inside the
kernel, with a warning; the rest of the network is batched.

The denoiser network comes from the adapter's ``denoiser`` attribute (a
``torch.nn.Module``); its parameters are read, never changed (not even their
``requires_grad``). Cost per image: 20 forward and 20 backward network
evaluations (samples), made in batched calls.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.func import functional_call, grad, vmap

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter
from cdi.features.base import Cost, EncodedBatch, FeatureFamily, require

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


class _Eps(torch.nn.Module):
    """``adapter.eps`` as a module whose parameters are the denoiser's (``network.<name>``).

    ``functional_call`` on it swaps the denoiser's parameters for the given
    tensors during the call, so ``torch.func.grad`` can differentiate the
    adapter's noise prediction with respect to them.
    """

    def __init__(self, adapter: DiffusionAdapter, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self._adapter = (adapter,)  # a tuple: not registered as a submodule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._adapter[0].eps(x_t, t, Condition(x_t.shape[0], cond))


def per_sample_gradient_norms(
    adapter: DiffusionAdapter,
    x_t: torch.Tensor,
    steps: torch.Tensor,
    cond: Condition,
    eps: torch.Tensor,
    chunk: int | None,
) -> torch.Tensor:
    """For each sample n: the norm of every parameter tensor's gradient of ``sum_g mean((eps_theta - eps)^2)``.

    ``x_t``, ``steps``, ``eps`` have shape (N, G, ...) and ``cond`` batch N * G
    (sample-major): sample n is the group of G network inputs ``x_t[n]``,
    whose losses are summed. Returns (N, n_parameter_tensors) float32;
    parameters that the loss does not reach get 0. At most ``chunk``
    network inputs per chunk of samples (at least one sample).
    """
    network = adapter.denoiser
    names = [name for name, _ in network.named_parameters()]
    params = {f"network.{name}": p.detach() for name, p in network.named_parameters()}
    module = _Eps(adapter, network)
    n, g = x_t.shape[:2]
    conds = {k: v.reshape(n, g, *v.shape[1:]) for k, v in cond.tensors.items()}

    def loss(p: dict, x: torch.Tensor, t: torch.Tensor, c: dict, e: torch.Tensor) -> torch.Tensor:
        return (functional_call(module, p, (x, t, c)) - e).pow(2).flatten(1).mean(dim=1).sum()

    def norms(p: dict, x: torch.Tensor, t: torch.Tensor, c: dict, e: torch.Tensor) -> torch.Tensor:
        grads = grad(loss)(p, x, t, c, e)
        return torch.stack([torch.linalg.vector_norm(grads[f"network.{name}"].float()) for name in names])

    size = None if chunk is None else max(1, int(chunk) // g)
    try:
        with warnings.catch_warnings():  # "no batching rule" for fused attention: it still runs, looped
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            return vmap(norms, in_dims=(None, 0, 0, 0, 0), chunk_size=size)(params, x_t, steps, conds, eps)
    except RuntimeError:
        # Some denoisers read tensor data inside forward (e.g. Z-Image's variable-length caption
        # handling), which torch.func cannot batch: then one ordinary backward per sample, same values.
        return _looped_gradient_norms(module, params, x_t, steps, conds, eps)


def _looped_gradient_norms(module, named: dict, x_t, steps, conds, eps) -> torch.Tensor:
    """``per_sample_gradient_norms`` with one ``torch.autograd.grad`` per sample (the fallback)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in named.items()}
    params = list(leaves.values())
    rows = []
    for i in range(x_t.shape[0]):
        out = functional_call(module, leaves, (x_t[i], steps[i], {k: v[i] for k, v in conds.items()}))
        loss = (out - eps[i]).pow(2).flatten(1).mean(dim=1).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.stack([torch.zeros((), device=x_t.device) if gr is None
                                 else torch.linalg.vector_norm(gr.float()) for gr in grads]))
    return torch.stack(rows)


class _GradientNorms(FeatureFamily):
    """What GSA1 and GSA2 share: columns, cost, the batched per-sample gradients."""

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

    #: Network inputs per vmapped sample: all T timesteps of an image (GSA1) or one (GSA2).
    per_timestep: ClassVar[bool] = False

    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        """A (B, n_parameter_tensors) float32 tensor of gradient norms (see the module docstring)."""
        denoiser_parameters(adapter)  # the white-box check
        steps = torch.tensor(self.config.timesteps, dtype=torch.long, device=adapter.device)
        b, n_t = len(batch), steps.shape[0]
        # (B, T, ...) image-major, cloned: the engine may have built the batch under inference_mode.
        eps = torch.stack([batch.noise(NOISE_KEY, int(t)) for t in self.config.timesteps], dim=1)
        x_t = adapter.add_noise(batch.x0.repeat_interleave(n_t, dim=0), eps.flatten(0, 1), steps.repeat(b))
        cond = batch.cond.repeat_interleave(n_t)
        cond = Condition(cond.batch_size, {k: v.clone() for k, v in cond.tensors.items()})
        t = steps.repeat(b)
        # At least one image's T inputs per call (see the module docstring).
        chunk = None if self.chunk_for(batch) is None else max(self.chunk_for(batch), n_t)
        with torch.inference_mode(False), torch.enable_grad():
            if self.per_timestep:  # GSA2: B * T samples of one input each, norms summed over t
                norms = per_sample_gradient_norms(
                    adapter, x_t.clone().unsqueeze(1), t.unsqueeze(1), cond, eps.flatten(0, 1).clone().unsqueeze(1),
                    chunk,
                )
                return norms.view(b, n_t, -1).sum(dim=1)
            return per_sample_gradient_norms(  # GSA1: B samples of T inputs each
                adapter, x_t.clone().view(b, n_t, *x_t.shape[1:]), t.view(b, n_t), cond, eps.clone(), chunk,
            )


class GSA1(_GradientNorms):
    """GSA1: norms of the gradient of the loss summed over the timesteps (one sample per image)."""

    name = "gsa1"


class GSA2(_GradientNorms):
    """GSA2: per-timestep gradient norms, summed over the timesteps (one sample per image and t)."""

    name = "gsa2"
    per_timestep = True
