"""Unconditional latent diffusion with a VQ autoencoder (``LDMPipeline``, e.g. CompVis/ldm-celebahq-256).

The folder holds ``vqvae`` (VQModel), ``unet`` (UNet2DModel) and ``scheduler``.
The pipeline denoises latents and decodes them with ``vqvae.decode``, which
quantises its input first; so the denoiser's space is the *quantiser input*,
the output of ``VQModel.encode`` (encoder + quant_conv, no codebook lookup).
That is also what the original LDM code trains on (``encode_first_stage``
of a VQ model returns the pre-quantisation latents), times its
``scale_factor``.

x0 = ``vqvae.encode(pixels).latents * scale``, where ``scale`` is the
``scaling_factor`` written in ``vqvae/config.json`` and 1.0 when the file
does not set one. The distinction matters: CompVis/ldm-celebahq-256 was
trained with LDM's default scale 1.0 and the vqvae/config.json on its main
branch has no ``scaling_factor`` (a hub pull request, refs/pr/5, adds 1.0),
but diffusers fills in VQModel's class default 0.18215, and since diffusers
PR #5213 ``LDMPipeline`` divides by it before decoding, which breaks that
model (diffusers issue #6725). Reading the file keeps the scale the model
was trained with, and still honours a factor a checkpoint declares. (A
folder re-saved with ``save_pretrained`` writes the class default
explicitly; such a copy of that model needs its factor set back to 1.0.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SchedulerMixin, UNet2DModel, VQModel

from cdi.models.base import Condition, DiffusionAdapter, autoencoder_downsampling, square_resolution


class LDMAdapter(DiffusionAdapter):
    """Adapter for ``LDMPipeline`` folders (see the module docstring).

    Parameters
    ----------
    vqvae, unet, scheduler
        The pipeline's components, on ``device`` in eval mode with frozen
        parameters: the UNet in ``dtype``, the VQ autoencoder in float32.
    latent_scale : float
        Multiplies the quantiser-input latents (see the module docstring).
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    family = "ldm"
    conditioning = "none"
    components = {"vqvae": VQModel, "unet": UNet2DModel, "scheduler": SchedulerMixin}
    full_precision_components = ("vqvae",)
    denoiser_name = "unet"

    def __init__(
        self,
        *,
        vqvae: VQModel,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        latent_scale: float = 1.0,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.vqvae = vqvae
        self.unet = self.denoiser = unet
        self.latent_scale = float(latent_scale)
        self._read_scheduler(scheduler, unet)
        super().__init__(
            model_id=model_id,
            revision=revision,
            fingerprint=fingerprint,
            resolution=square_resolution(unet.config.sample_size, autoencoder_downsampling(vqvae)),
            image_channels=vqvae.config.in_channels,
            alphas_cumprod=scheduler.alphas_cumprod,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def extra_inputs(cls, folder: Path, index: dict) -> dict:
        """``latent_scale``: the ``scaling_factor`` written in vqvae/config.json, else 1.0."""
        config = json.loads((Path(folder) / "vqvae" / "config.json").read_text())
        return {"latent_scale": float(config.get("scaling_factor", 1.0))}

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vqvae.encode(pixels.to(self.vqvae.dtype)).latents * self.latent_scale

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.unet(x_t, t).sample
