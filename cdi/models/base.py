"""The adapter protocol: everything the feature families need from a model.

A feature family never touches a diffusers class. It talks to a
``DiffusionAdapter``, which hides how a model family encodes images, how it is
conditioned and what its network predicts:

* ``encode(pixels)`` maps preprocessed images in [-1, 1] to the denoiser's
  clean input ``x0`` (the VAE/VQ posterior *mean* times the scaling factor for
  latent models, the pixels themselves for pixel models).
* ``alphas_cumprod`` and ``add_noise`` define the forward process
  ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps``.
* ``conditions(captions)`` turns one caption per sample into a batched
  ``Condition``; ``null_condition(n)`` is the unconditional input.
* ``eps(x_t, t, cond)`` returns the model's noise prediction, converted to eps
  whatever the network predicts (v, x0, or eps with learned variance).

Gradients flow through ``eps`` whenever the caller enables them (the adapter
never wraps the network call in ``torch.no_grad``); ``encode`` never needs
gradients and runs without them.

All tensors returned to callers are float32 on ``adapter.device``, whatever
dtype the network computes in, so reductions are done in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import torch

from cdi.utils.errors import CDIError

Conditioning = Literal["text", "class", "none"]
PredictionType = Literal["epsilon", "v_prediction", "sample", "flow_prediction"]


def prediction_type_of(scheduler) -> str:
    """The scheduler's ``prediction_type`` (what the network outputs), default ``"epsilon"``."""
    prediction_type = getattr(scheduler.config, "prediction_type", None) or "epsilon"
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise CDIError(
            f"unsupported prediction_type {prediction_type!r} in the scheduler config; "
            "cdi supports epsilon, v_prediction and sample"
        )
    return prediction_type


@dataclass
class Condition:
    """A batch of conditioning inputs; every tensor has the batch on dim 0.

    ``tensors`` holds what the network needs, keyed by name (for example
    ``encoder_hidden_states`` for SD, plus ``text_embeds`` and ``time_ids``
    for SDXL, ``class_labels`` for class-conditional models). Unconditional
    models use an empty dict, so ``batch_size`` is stored explicitly.
    """

    batch_size: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, tensor in self.tensors.items():
            if tensor.shape[0] != self.batch_size:
                raise ValueError(
                    f"condition tensor {name!r} has batch {tensor.shape[0]}, expected {self.batch_size}"
                )

    def __len__(self) -> int:
        return self.batch_size

    def repeat_interleave(self, repeats: int) -> "Condition":
        """Repeat every sample ``repeats`` times in place (a a b b, not a b a b)."""
        return Condition(
            self.batch_size * repeats,
            {k: v.repeat_interleave(repeats, dim=0) for k, v in self.tensors.items()},
        )

    def repeat(self, repeats: int) -> "Condition":
        """Tile the whole batch ``repeats`` times (a b a b)."""
        return Condition(
            self.batch_size * repeats,
            {k: v.repeat(repeats, *([1] * (v.dim() - 1))) for k, v in self.tensors.items()},
        )

    def index(self, idx: torch.Tensor | Sequence[int] | slice) -> "Condition":
        """Select samples along the batch dimension (indices, a slice, or a boolean mask)."""
        if isinstance(idx, slice):
            size = len(range(*idx.indices(self.batch_size)))
            return Condition(size, {k: v[idx] for k, v in self.tensors.items()})
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:  # a mask; casting it to long would select samples 0 and 1
            if idx.shape != (self.batch_size,):
                raise ValueError(f"boolean mask of shape {tuple(idx.shape)} for a batch of {self.batch_size}")
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.long).flatten()
        return Condition(
            int(idx.numel()), {k: v[idx.to(v.device)] for k, v in self.tensors.items()}
        )

    @staticmethod
    def cat(conditions: Sequence["Condition"]) -> "Condition":
        """Concatenate conditions along the batch dimension."""
        if not conditions:
            raise ValueError("cannot concatenate an empty list of conditions")
        keys = conditions[0].tensors.keys()
        return Condition(
            sum(c.batch_size for c in conditions),
            {k: torch.cat([c.tensors[k] for c in conditions], dim=0) for k in keys},
        )


class DiffusionAdapter:
    """Base class of the model adapters; one subclass per model family.

    Subclasses set the attributes below in ``__init__`` and implement
    ``_encode``, ``_predict`` and, for conditional models,
    ``_text_conditions`` or ``_class_conditions``.

    Attributes
    ----------
    family : str
        Registry name of the family (``"sd"``, ``"sdxl"``, ``"ldm"``, ``"dit"``,
        ``"ddpm"``, and the flow-matching ``"sd3"``, ``"flux"``, ``"zimage"``).
    model_id : str
        What the user asked for (alias resolved to a hub id, or a folder path).
    revision : str or None
        The resolved commit hash for hub models, None for local folders.
    fingerprint : str
        SHA-256 over the weight files (see ``cdi.models.loading``).
    conditioning : {"text", "class", "none"}
    prediction_type : {"epsilon", "v_prediction", "sample", "flow_prediction"}
        What the network outputs; ``"flow_prediction"`` (a rectified-flow
        velocity) is converted by ``cdi.models.flow_matching.FlowMatchingAdapter``.
    resolution : int
        Pixel size of the square input the model expects.
    image_channels : int
        3 for RGB models, 1 for greyscale models.
    device : torch.device
    dtype : torch.dtype
        The dtype the network computes in; outputs are always float32.
    alphas_cumprod : torch.Tensor
        float32, on ``device``, length ``num_train_timesteps``.
    learned_variance : bool
        True if the network outputs twice the channels (eps and variance).
    compiled : bool
        True if the denoiser was compiled with ``torch.compile`` (provenance
        only: compiling changes no value beyond float rounding).
    """

    family: ClassVar[str] = ""
    conditioning: Conditioning = "none"
    prediction_type: PredictionType = "epsilon"
    learned_variance: bool = False
    compiled: bool = False
    #: True when the denoiser recomputes activations in the backward (``loading.checkpoints_gradients``).
    gradient_checkpointing: bool = False
    #: ``cdi.models.registry.distillation`` of the checkpoint (None: not known to be distilled).
    distillation: dict | None = None
    #: What was added to the base model (``cdi.models.finetune``): ``base_fingerprint``, ``loras``
    #: (file, SHA-256, scale), ``replaced_components``, ``single_file``; None for a plain model.
    provenance: dict | None = None

    def __init__(
        self,
        *,
        model_id: str,
        revision: str | None,
        fingerprint: str,
        resolution: int,
        image_channels: int,
        alphas_cumprod: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model_id = model_id
        self.revision = revision
        self.fingerprint = fingerprint
        self.resolution = int(resolution)
        self.image_channels = int(image_channels)
        self.device = torch.device(device)
        self.dtype = dtype
        self.alphas_cumprod = alphas_cumprod.to(device=self.device, dtype=torch.float32)

    def _read_scheduler(self, scheduler, denoiser: torch.nn.Module) -> None:
        """Keep the diffusers noise scheduler of an eps/v/x0 model and what it says of the network.

        ``prediction_type`` from the scheduler's config (``prediction_type_of``);
        ``learned_variance`` when the denoiser outputs twice its input channels
        (eps and variance). The flow-matching adapters read their scheduler
        differently (``cdi.models.flow_matching``).
        """
        self.scheduler = scheduler
        self.prediction_type = prediction_type_of(scheduler)
        self.learned_variance = denoiser.config.out_channels == 2 * denoiser.config.in_channels

    # ------------------------------------------------------------------ info
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def is_conditional(self) -> bool:
        return self.conditioning != "none"

    @classmethod
    def conditioning_of(cls, folder: Path, index: dict) -> Conditioning:
        """How the pipeline in ``folder`` is conditioned, read from its files without loading weights.

        The class's ``conditioning``; families where it depends on the
        checkpoint (pixel DDPM: class labels or none) override this. Used to
        check captions before the model is loaded.
        """
        return cls.conditioning

    @classmethod
    def extra_inputs(cls, folder: Path, index: dict) -> dict:
        """Constructor arguments read from the pipeline folder besides the components; none by default.

        Families that read more override this (DiT's class names, DDPM's
        labels.json, LDM's latent scale, SDXL's empty-prompt rule).
        """
        return {}

    def describe(self) -> dict:
        """Provenance of the loaded model, for results and reports."""
        return {
            "family": self.family,
            "model_id": self.model_id,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "conditioning": self.conditioning,
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "image_channels": self.image_channels,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "compiled": self.compiled,
            **({"gradient_checkpointing": True} if self.gradient_checkpointing else {}),
            **({"distilled": self.distillation} if self.distillation else {}),
            **(self.provenance or {}),
        }

    # ------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map images in [-1, 1], shape (B, C, H, W), to the clean input x0.

        Deterministic: latent models use the posterior mean, never a sample.
        """
        if pixels.dim() != 4 or pixels.shape[1] != self.image_channels:
            raise ValueError(
                f"expected images of shape (B, {self.image_channels}, H, W), got {tuple(pixels.shape)}"
            )
        return self._encode(pixels.to(self.device)).float()

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --------------------------------------------------------- forward model
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise``, t of shape (B,)."""
        abar = self._abar(t, x0.dim())
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def _abar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device, dtype=torch.long)
        return self.alphas_cumprod[t].view(-1, *([1] * (ndim - 1)))

    # ----------------------------------------------------------- conditions
    def conditions(self, captions: Sequence[str | None]) -> Condition:
        """One condition per caption; None means the null condition.

        Text models embed the caption (None -> the empty prompt). Class models
        read the caption as a class id or class name (None -> the null class).
        Unconditional models return an empty condition of the right size.
        """
        captions = list(captions)
        if self.conditioning == "text":
            return self._text_conditions(["" if c is None else c for c in captions])
        if self.conditioning == "class":
            return self._class_conditions([self.class_id(c) for c in captions])
        return Condition(len(captions))

    def null_condition(self, batch_size: int) -> Condition:
        """The unconditional input: empty prompt, null class, or nothing."""
        return self.conditions([None] * batch_size)

    def prepare_captions(self, captions: Sequence[str | None]) -> None:
        """Called with a collection's captions before its first batch; a hook for caching adapters.

        The flow-matching adapters encode every caption here once, then move
        their large text encoders off the device; the others need nothing.
        """

    def class_id(self, caption: str | None) -> int:
        """The class index a caption names (class-conditional models only)."""
        raise CDIError(f"model {self.model_id!r} is not class-conditional")

    def _text_conditions(self, prompts: list[str]) -> Condition:
        raise NotImplementedError

    def _class_conditions(self, labels: list[int]) -> Condition:
        raise NotImplementedError

    # ------------------------------------------------------------ prediction
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The model's noise prediction at ``(x_t, t)`` under ``cond``, as float32.

        ``t`` is an integer tensor of shape (B,) (a scalar is broadcast). v- and
        x0-predictions are converted to eps with the scheduler's abar; the
        variance channels of learned-variance models are dropped. Gradients
        with respect to ``x_t`` flow when the caller has them enabled.
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device, dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(batch)
        if len(cond) != batch or t.shape[0] != batch:
            raise ValueError(
                f"batch mismatch: x_t has {batch}, t has {t.shape[0]}, condition has {len(cond)}"
            )
        x_t = x_t.to(self.device)
        out = self._predict(x_t.to(self.dtype), t, cond).float()
        if self.learned_variance:
            out = out[:, : out.shape[1] // 2]
        return self.to_eps(out, x_t.float(), t)

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a network output of ``self.prediction_type`` to eps."""
        if self.prediction_type == "epsilon":
            return output
        abar = self._abar(t, x_t.dim())
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * output + (1.0 - abar).sqrt() * x_t
        if self.prediction_type == "sample":
            return (x_t - abar.sqrt() * output) / (1.0 - abar).sqrt().clamp_min(1e-8)
        raise CDIError(f"unsupported prediction type {self.prediction_type!r}")

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The raw network output for a batch (in ``self.dtype``)."""
        raise NotImplementedError


def autoencoder_downsampling(autoencoder: torch.nn.Module) -> int:
    """Pixels per latent along each side: 2 ** (number of encoder blocks - 1), as the pipelines compute it."""
    return 2 ** (len(autoencoder.config.block_out_channels) - 1)


def square_resolution(sample_size: int | list[int] | tuple[int, ...], downsampling: int = 1) -> int:
    """Pixel size of the square input: the denoiser's ``sample_size`` times the autoencoder's downsampling."""
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise CDIError(f"non-square models are not supported (sample_size {list(sample_size)})")
        sample_size = sample_size[0]
    return int(sample_size) * downsampling
