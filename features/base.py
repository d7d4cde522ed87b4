"""What every feature family shares: its declaration, its batch, its noise.

A feature family is a small class with

* ``name``: a stable identifier (part of every store key, so renaming one
  invalidates stored values on purpose);
* ``config``: a dataclass of the method's parameters with the reference
  defaults (REFERENCE.md sections 1 and 2);
* ``columns()``: the names of its output columns, in order;
* ``cost(adapter)``: model calls per image, forward and backward;
* ``extract(adapter, batch)``: a (B, len(columns)) float32 tensor for one
  ``EncodedBatch``.

``extract`` talks only to the adapter protocol of ``cdi.models.base``. It may
put timesteps, repetitions and conditions of its images in the batch
dimension, and must keep every image's value independent of the other images
in the batch: all randomness comes from ``EncodedBatch.noise``, which is a
function of (seed, image hash, family, timestep, repetition) only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from cdi.errors import CDIError
from cdi.models.base import Condition, DiffusionAdapter


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
    """

    x0: torch.Tensor
    hashes: list[str]
    captions: list[str | None]
    cond: Condition
    seed: int

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
    config_class: ClassVar[type] = type(None)
    requires_condition: ClassVar[bool] = False

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        config = config if config is not None else self.config_class()
        self.config = dataclasses.replace(config, **overrides) if overrides else config

    def columns(self) -> list[str]:
        raise NotImplementedError

    def cost(self, adapter: DiffusionAdapter) -> Cost:
        raise NotImplementedError

    def extract(self, adapter: DiffusionAdapter, batch: EncodedBatch) -> torch.Tensor:
        raise NotImplementedError

    def check_applicable(self, adapter: DiffusionAdapter) -> None:
        """Raise ``CDIError`` if this family cannot run on ``adapter``."""
        if self.requires_condition and not adapter.is_conditional:
            raise CDIError(
                f"feature family {self.name!r} needs a conditional model (captions or class labels), "
                f"but {adapter.model_id!r} is unconditional; drop it from --features"
            )

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def key(self) -> str:
        """Stable identity of (family, config), used in store keys."""
        payload = json.dumps({"family": self.name, "config": self.config_dict()}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"
