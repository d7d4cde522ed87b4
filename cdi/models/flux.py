"""FLUX.1 dev and schnell (``FluxPipeline``): packed 2x2 latents, rotary position ids, rectified flow.

The folder holds ``transformer`` (FluxTransformer2DModel), ``vae``
(AutoencoderKL, 16 latent channels), ``text_encoder`` (CLIP ViT-L, pooled
output only), ``text_encoder_2`` (T5-XXL), their tokenizers and a
``FlowMatchEulerDiscreteScheduler`` with resolution-dependent shifting. The
adapter computes what the pipeline computes, through ``FlowMatchingAdapter``:

* x0 = ``(posterior mean - shift_factor) * scaling_factor``, as an image-shaped
  latent (B, 16, H/8, W/8); the families never see the packing. Before each
  network call the latent is packed into 2x2 patches (``FluxPipeline._pack_latents``),
  given the pipeline's position ids (``_prepare_latent_image_ids``; the text
  ids are zeros, as ``encode_prompt`` returns them), and the velocity is
  unpacked again (``_unpack_latents``).
* native resolution: the autoencoder's ``sample_size`` (1024 for FLUX.1);
  the timestep grid's ``mu`` is the pipeline's ``calculate_shift`` of that
  resolution's token count (4096 tokens: ``mu = max_shift = 1.15``;
  ``autoencoder_native_size``).
* condition: ``encode_prompt`` of the pipeline: T5's last hidden states
  (``max_sequence_length`` 512 for dev, 256 for schnell, whose T5 was
  trained on 256, capped at the T5 tokenizer's ``model_max_length``) and
  CLIP's pooled output. The null condition is the empty prompt.
* timestep: the transformer takes ``s`` (it multiplies by 1000 itself).
* guidance (dev, ``guidance_embeds``): the distilled model takes the
  guidance scale as an input. cdi feeds ``guidance_scale = 1.0`` by default
  (``--guidance`` changes it; the value is recorded in ``describe()``): the
  distilled prediction then stands for the plain conditional one (no
  classifier-free extrapolation), which is what the features' losses
  assume. A fine-tune should be audited at the value it was trained with:
  diffusers' FLUX DreamBooth-LoRA script (``train_dreambooth_lora_flux.py``)
  trains at ``--guidance_scale 3.5`` (its default); kohya sd-scripts'
  documented FLUX.1 LoRA command passes ``--guidance_scale 1.0`` (its
  argument's own default is 3.5). schnell has no guidance input.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from cdi.models.base import Condition, autoencoder_downsampling
from cdi.models.flow_matching import FlowMatchingAdapter, autoencoder_native_size, encode_flow_autoencoder

#: FluxPipeline.__call__'s default T5 length; schnell must use 256.
FLUX_MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}


class FluxAdapter(FlowMatchingAdapter):
    """Adapter for ``FluxPipeline`` folders (FLUX.1 dev and schnell; see the module docstring).

    Parameters
    ----------
    transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler
        The pipeline's components, prepared by ``cdi.models.load_model``.
    guidance_scale : float
        Fed to the guidance embedding of guidance-distilled models (dev).
    grid, offload_text_encoders
        As in ``FlowMatchingAdapter``.
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    family = "flux"
    components = {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "text_encoder_2": T5EncoderModel,
        "tokenizer_2": T5TokenizerFast,
        "scheduler": SchedulerMixin,
    }
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(
        self,
        *,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        scheduler: SchedulerMixin,
        guidance_scale: float = 1.0,
        grid: str = "model",
        offload_text_encoders: bool | None = None,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from diffusers import FluxPipeline

        self.transformer = self.denoiser = transformer
        self.vae = vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.pipeline = FluxPipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        )
        self.vae_scale_factor = autoencoder_downsampling(vae)
        self.guidance_distilled = bool(transformer.config.guidance_embeds)
        self.guidance_scale = float(guidance_scale)
        variant = "dev" if self.guidance_distilled else "schnell"
        self.max_sequence_length = min(FLUX_MAX_SEQUENCE_LENGTH[variant], int(tokenizer_2.model_max_length))
        resolution, mu = autoencoder_native_size(vae, scheduler)
        super().__init__(
            scheduler=scheduler, resolution=resolution, image_channels=vae.config.in_channels, mu=mu, grid=grid,
            offload_text_encoders=offload_text_encoders, model_id=model_id, revision=revision,
            fingerprint=fingerprint, device=device, dtype=dtype,
        )

    def describe(self) -> dict:
        guidance = self.guidance_scale if self.guidance_distilled else None
        return {**super().describe(), "guidance_scale": guidance, "max_sequence_length": self.max_sequence_length}

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flow_autoencoder(self.vae, pixels)

    def _encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Condition) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = x_s.shape
        packed = FluxPipeline._pack_latents(x_s, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        hidden = cond.tensors["encoder_hidden_states"].to(device=self.device, dtype=self.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full((batch,), self.guidance_scale, device=self.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=packed, timestep=s.to(self.dtype), guidance=guidance,
            pooled_projections=cond.tensors["pooled_projections"].to(device=self.device, dtype=self.dtype),
            encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=image_ids,
        ).sample
        return FluxPipeline._unpack_latents(
            out, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor)
