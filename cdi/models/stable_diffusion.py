"""Stable Diffusion 1.x / 2.x: text-conditioned latent diffusion with one CLIP text encoder.

A ``StableDiffusionPipeline`` folder holds ``unet`` (UNet2DConditionModel),
``vae`` (AutoencoderKL), ``text_encoder`` (CLIPTextModel), ``tokenizer`` and
``scheduler``. The adapter computes what the pipeline computes:

* x0 = posterior mean of the VAE encoding times ``vae.config.scaling_factor``
  (the pipeline decodes ``latents / scaling_factor``); the mean, not a sample,
  so encoding is deterministic.
* a caption's condition is the text encoder's last hidden state of the
  caption padded to the tokenizer's ``model_max_length`` (``clip_skip`` None),
  with the attention mask only where the text encoder's config asks for it;
  the null condition is the embedding of the empty prompt, which is what the
  pipeline uses for classifier-free guidance.
* the network predicts eps, or v for SD 2.x 768 (``prediction_type`` from the
  scheduler config); the base class converts v to eps.
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from cdi.models.base import Condition, DiffusionAdapter, autoencoder_downsampling, square_resolution

logger = logging.getLogger("cdi")


def encode_autoencoder_kl(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior mean of an AutoencoderKL times its scaling factor.

    The latents the SD and DiT pipelines decode after dividing by
    ``scaling_factor``. Returns the VAE's dtype; callers cast.
    """
    return vae.encode(pixels.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded and truncated to ``model_max_length`` as the pipelines do.

    Logs a warning (logger ``"cdi"``) when captions were cut.
    """
    max_length = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    cut = sum(n > max_length for n in lengths)
    if cut:
        logger.warning(
            "%d caption(s) are longer than the text encoder's %d tokens and were truncated, as the pipeline does",
            cut, max_length,
        )
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


class StableDiffusionAdapter(DiffusionAdapter):
    """Adapter for Stable Diffusion 1.x / 2.x pipelines (see the module docstring).

    Parameters
    ----------
    unet, vae, text_encoder, tokenizer, scheduler
        The pipeline's components, already on ``device`` in eval mode with
        frozen parameters (``cdi.models.load_model`` prepares them): the UNet
        and text encoder in ``dtype``, the VAE in float32.
    model_id, revision, fingerprint, device, dtype
        Provenance and placement, as in ``DiffusionAdapter``.
    """

    family = "sd"
    conditioning = "text"
    #: Component folder -> class that loads it (``SchedulerMixin``: the class its config names).
    components = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "scheduler": SchedulerMixin,
    }
    #: Run once per image, so kept in float32 whatever the compute dtype
    #: (the SDXL VAE overflows in float16, diffusers' ``force_upcast``).
    full_precision_components = ("vae",)
    #: The network whose forward pass ``eps`` runs (channels_last on CUDA).
    denoiser_name = "unet"

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: SchedulerMixin,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.unet = self.denoiser = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._read_scheduler(scheduler, unet)
        super().__init__(
            model_id=model_id,
            revision=revision,
            fingerprint=fingerprint,
            resolution=square_resolution(unet.config.sample_size, autoencoder_downsampling(vae)),
            image_channels=vae.config.in_channels,
            alphas_cumprod=scheduler.alphas_cumprod,
            device=device,
            dtype=dtype,
        )

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_autoencoder_kl(self.vae, pixels)

    @torch.no_grad()
    def _text_conditions(self, prompts: list[str]) -> Condition:
        tokens = tokenize(self.tokenizer, prompts)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens["attention_mask"].to(self.device) if use_mask else None
        hidden = self.text_encoder(tokens["input_ids"].to(self.device), attention_mask=mask)[0]
        return Condition(len(prompts), {"encoder_hidden_states": hidden.float()})

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        hidden = cond.tensors["encoder_hidden_states"].to(device=self.device, dtype=self.dtype)
        return self.unet(x_t, t, encoder_hidden_states=hidden).sample
