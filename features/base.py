"""What every feature family shares: its declaration, its batch, its noise.

A feature family is a small class with

* ``name``: a stable identifier (part of every store key, so renaming one
  invalidates stored values on purpose);
* ``config``: a dataclass of the method's parameters with the reference
  defaults (REFERENCE.md sections 1 and 2);
* ``columns(adapter)``: the names of its output columns, in order (the
  adapter is optional; only CLiD's layout depends on it: class-conditional
  models have a single reduced condition);
* ``directions(adapter)``: the member direction of each column, +1 when a
  higher value means member, -1 when a lower value does;
* ``cost(adapter)``: model calls per image, forward and backward, when the
  family runs alone;
* ``shared_calls(adapter)``: the calls among those that other families make
  too (``features.calls``); the engine evaluates each distinct one once per
  batch;
* ``extract(adapter, batch)``: a (B, len(columns)) float32 tensor for one
  ``EncodedBatch``, on the adapter's device;
* ``draws_noise``: whether its values depend on the seed's noise draws.

``extract`` talks only to the adapter protocol of ``cdi.models.base``. It may
put timesteps, repetitions and conditions of its images in the batch
dimension, and must keep every image's value independent of the other images
in the batch: all randomness comes from ``EncodedBatch.noise``, which is a
function of (seed, image hash, family, timestep, repetition) only.

Samples per network call: a family that expands its B images into B * n
samples (timesteps, repetitions, conditions) sends them to the network in
chunks of at most ``chunk_for(batch)`` samples (``predict_eps``,
``residual_norm_and_grad``): the smaller of the family's own ``max_chunk``
and the batch's ``max_chunk``, which the extraction engine sets to its batch
size. So ``--batch-size N`` means N images per batch *and* at most N samples
per network call: memory stays bounded and every family runs the network at
the same, chosen batch size (the one the roofline of ``cdi speed`` finds
fastest, with ``--batch-size auto``). Neither limit is part of the
configuration or the store key because it never changes a value (beyond
floating-point reassociation in the network's batched kernels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from cdi.utils.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter

# ``shared_calls`` returns cdi.features.calls.SharedCall objects; that module builds on this one, so the type
# is named in the annotation without an import (no import circle).


@dataclass(frozen=True)
class Cost:
    """Model (denoiser) evaluations per image."""

    forward: int
    backward: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.forward + other.forward, self.backward + other.backward)


def derive_seed(seed: int, image_hash: str, family: str, timestep: int | str, repetition: int) -> int:
    """A 63-bit generator seed from the global seed and the draw's identity."""
    key = f"{int(seed)}|{image_hash}|{family}|{timestep}|{int(repetition)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def draw_seed(seed: int, draw: int) -> int:
    """The seed of noise draw ``draw`` of a run with ``seed``: ``seed`` itself for draw 0, a hash for the others.

    An audit with ``--noise-draws R`` extracts the noise-drawing families R
    times, at ``draw_seed(seed, 0..R-1)`` (``cdi.stats.draws``). The draws
    beyond the first come from a hash of (seed, draw), never from
    neighbouring seeds, so the draws of ``--seed 1`` and ``--seed 2`` share
    nothing and a re-run with another seed is a fresh set of draws.
    """
    if int(draw) == 0:
        return int(seed)
    key = f"{int(seed)}|noise-draw|{int(draw)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def image_noise(
    shape: Sequence[int],
    seed: int,
    image_hashes: Sequence[str],
    family: str,
    timestep: int | str,
    repetition: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise of shape (B, *shape), one generator per image.

    Drawn on the CPU so the numbers are the same on every device, then moved.
    """
    out = torch.empty((len(image_hashes), *shape), dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for i, h in enumerate(image_hashes):
        gen.manual_seed(derive_seed(seed, h, family, timestep, repetition))
        out[i] = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return out.to(device)


@dataclass
class EncodedBatch:
    """A batch of images after the one shared encode.

    Attributes
    ----------
    x0 : torch.Tensor
        (B, C, h, w) float32 on the adapter's device: the denoiser's clean input.
    hashes : list of str
        SHA-256 of each image file (the identity used for noise and caching).
    captions : list of str or None
        One caption per image (None: no caption; the adapter's null condition).
    cond : Condition
        ``adapter.conditions(captions)``, computed once and shared by families.
    seed : int
        The global seed of the run.
    pixels : torch.Tensor or None
        (B, C, H, W) preprocessed images in [-1, 1], for families that work in
        pixel space before encoding (PFAMI's cropped neighbours).
    max_chunk : int or None
        Most samples per network call for this batch (the extraction engine
        sets its batch size); None: no limit beyond the family's own.
    shared : dict
        The network calls shared by several families, evaluated once by the
        engine before the families run (``features.calls``); empty when a
        family is called on its own.
    """

    x0: torch.Tensor
    hashes: list[str]
    captions: list[str | None]
    cond: Condition
    seed: int
    pixels: torch.Tensor | None = None
    max_chunk: int | None = None
    shared: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hashes)

    def noise(self, family: str, timestep: int | str = "shared", repetition: int = 0) -> torch.Tensor:
        """Noise like ``x0``; image i's draw depends only on (seed, hash_i, family, timestep, repetition)."""
        return image_noise(
            self.x0.shape[1:], self.seed, self.hashes, family, timestep, repetition, self.x0.device
        )


class FeatureFamily:
    """Base class of the feature families (see the module docstring)."""

    name: ClassVar[str] = ""
    #: Bumped whenever the family's computation changes, so stored values from
    #: before the change are never served again (it is part of ``key()``).
    version: ClassVar[int] = 1
    config_class: ClassVar[type] = type(None)
    requires_condition: ClassVar[bool] = False
    #: Whether the values depend on ``EncodedBatch.noise``, hence on the seed (SecMI, PIA and SimA do not).
    draws_noise: ClassVar[bool] = True

    def __init__(self, config: Any = None, *, max_chunk: int | None = None, **overrides: Any) -> None:
        config = config if config is not None else self.config_class()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        if max_chunk is not None and int(max_chunk) < 1:
            raise ValueError(f"max_chunk must be a positive number of samples, got {max_chunk}")
        self.max_chunk = None if max_chunk is None else int(max_chunk)

    def columns(self, adapter: DiffusionAdapter | None = None) -> list[str]:
        raise NotImplementedError

    def chunk_for(self, batch: EncodedBatch) -> int | None:
        """Most samples per network call on ``batch``: the smaller of the family's and the batch's limit."""
        limits = [c for c in (self.max_chunk, batch.max_chunk) if c is not None]
        return min(limits) if limits else None

    def directions(self, adapter: DiffusionAdapter | None = None) -> list[int]:
        """Member direction per column: +1 higher = member, -1 lower = member."""
        raise NotImplementedError

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        """Model calls per image when the family runs alone (its shared calls included)."""
        raise NotImplementedError

    def extra_captions(self, adapter: DiffusionAdapter, captions: Sequence[str | None], hashes: Sequence[str],
                       seed: int) -> list[str]:
        """Captions besides the images' own that ``extract`` will condition on (CLiD's reduced ones).

        The engine encodes them with the images' captions before the first
        batch, so large text encoders can leave the device for good
        (``FlowMatchingAdapter.prepare_captions``). None by default.
        """
        return []

    def shared_calls(self, adapter: DiffusionAdapter) -> list["SharedCall"]:
        """The calls of ``cost`` that other families may share (``features.calls``); none by default."""
        return []

    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        raise NotImplementedError

    def check_applicable(self, adapter: DiffusionAdapter) -> None:
        """Raise ``CDIError`` if this family cannot run on ``adapter``."""
        if self.requires_condition and not adapter.is_conditional:
            raise CDIError(
                f"feature family {self.name!r} needs a conditional model (captions or class labels), "
                f"but {adapter.model_id!r} is unconditional; drop it from --features"
            )
        bad = [t for t in self.timesteps() if not 0 <= t < adapter.num_train_timesteps]
        if bad:
            raise CDIError(
                f"feature family {self.name!r} uses timesteps {bad}, but {adapter.model_id!r} has "
                f"timesteps 0..{adapter.num_train_timesteps - 1}; change the family's configuration"
            )

    def timesteps(self) -> list[int]:
        """Every timestep at which this family queries the model."""
        return []

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def key(self) -> str:
        """Stable identity of (family, config), used in store keys."""
        payload = json.dumps({"family": self.name, "version": self.version, "config": self.config_dict()},
                             sort_keys=True)
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


# --------------------------------------------------------------------------
# Helpers shared by the families
# --------------------------------------------------------------------------
def require(condition: bool, message: str) -> None:
    """Raise ``CDIError(message)`` unless ``condition`` (config validation)."""
    if not condition:
        raise CDIError(message)


def per_sample_norm(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The p-norm over all elements of each sample: shape (N, ...) -> (N,)."""
    return torch.linalg.vector_norm(x.flatten(1), ord=p, dim=1)


def _chunks(n: int, max_chunk: int | None) -> list[slice]:
    step = n if max_chunk is None else max(1, int(max_chunk))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def predict_eps(
    adapter: DiffusionAdapter,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Condition,
    max_chunk: int | None = None,
) -> torch.Tensor:
    """``adapter.eps`` on N samples, at most ``max_chunk`` per network call.

    ``t`` has shape (N,). Runs under whatever grad mode the caller set.
    """
    n = x_t.shape[0]
    if max_chunk is None or n <= max_chunk:
        return adapter.eps(x_t, t, cond)
    return torch.cat(
        [adapter.eps(x_t[sl], t[sl], cond.index(sl)) for sl in _chunks(n, max_chunk)], dim=0
    )


def _autograd_ready(cond: Condition) -> Condition:
    """A copy of ``cond`` whose tensors may be saved for backward.

    The engine may build the batch under ``torch.inference_mode``; inference
    tensors (and views of them) cannot be saved for backward, so the gradient
    helper clones them outside inference mode. Call under
    ``torch.inference_mode(False)``.
    """
    return Condition(cond.batch_size, {k: v.clone() for k, v in cond.tensors.items()})


def residual_norm_and_grad(
    adapter: DiffusionAdapter,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Condition,
    target: torch.Tensor,
    max_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r_i = ||eps_theta(x_i, t_i, c_i) - target_i||_2`` and ``d r_i / d x_i``.

    One forward and one backward per sample. The backward of ``sum_i r_i``
    gives every sample its own gradient because samples never interact in the
    network; each chunk of ``max_chunk`` samples is differentiated on its own,
    so memory holds one chunk's graph at a time. Works when the caller is in
    ``torch.no_grad`` or ``torch.inference_mode``. Returns detached tensors.
    """
    norms, grads = [], []
    with torch.inference_mode(False), torch.enable_grad():
        for sl in _chunks(x_t.shape[0], max_chunk):
            x = x_t[sl].detach().clone().requires_grad_(True)
            c = _autograd_ready(cond.index(sl))
            r = per_sample_norm(adapter.eps(x, t[sl].clone(), c) - target[sl].clone())
            (g,) = torch.autograd.grad(r.sum(), x)
            norms.append(r.detach())
            grads.append(g)
    return torch.cat(norms), torch.cat(grads)
