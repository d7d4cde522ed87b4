"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): MMDiT, three text encoders, rectified flow.

The folder holds ``transformer`` (SD3Transformer2DModel), ``vae``
(AutoencoderKL, 16 latent channels), ``text_encoder`` and ``text_encoder_2``
(CLIP ViT-L and bigG, CLIPTextModelWithProjection), ``text_encoder_3``
(T5-XXL; null in "without T5" checkpoints), their tokenizers and a
``FlowMatchEulerDiscreteScheduler`` (shift 3.0). The adapter computes what the
pipeline computes, through ``FlowMatchingAdapter`` (``cdi.models.flow_matching``):

* x0 = ``(posterior mean - shift_factor) * scaling_factor`` (the pipeline
  decodes ``latents / scaling_factor + shift_factor``;
  ``encode_flow_autoencoder``).
* a caption's condition is the pipeline's own ``encode_prompt``: the
  penultimate hidden states of both CLIPs, concatenated and zero-padded to
  T5's width, followed on the sequence axis by T5's last hidden states (zeros
  without T5), and the two CLIPs' pooled projections concatenated
  (``pooled_projections``). ``max_sequence_length`` is the pipeline's
  default 256, capped at the T5 tokenizer's ``model_max_length``. The null
  condition is the empty prompt, the pipeline's negative prompt.
* the transformer sees ``x_s`` at timestep ``1000 s`` (float32, as the pipeline passes the scheduler's
  timesteps) and predicts the velocity.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SchedulerMixin, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from cdi.models.base import Condition, autoencoder_downsampling, square_resolution
from cdi.models.flow_matching import FlowMatchingAdapter, encode_flow_autoencoder

#: StableDiffusion3Pipeline.__call__'s default T5 length.
SD3_MAX_SEQUENCE_LENGTH = 256


class SD3Adapter(FlowMatchingAdapter):
    """Adapter for ``StableDiffusion3Pipeline`` folders (see the module docstring).

    Parameters
    ----------
    transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3, scheduler
        The pipeline's components, prepared by ``cdi.models.load_model``;
        ``text_encoder_3`` and ``tokenizer_3`` may be None.
    grid, offload_text_encoders
        As in ``FlowMatchingAdapter``.
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    family = "sd3"
    components = {
        "transformer": SD3Transformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer_2": CLIPTokenizer,
        "text_encoder_3": T5EncoderModel,
        "tokenizer_3": T5TokenizerFast,
        "scheduler": SchedulerMixin,
    }
    optional_components = ("text_encoder_3", "tokenizer_3")
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(
        self,
        *,
        transformer: SD3Transformer2DModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None,
        tokenizer_3: T5TokenizerFast | None,
        scheduler: SchedulerMixin,
        grid: str = "model",
        offload_text_encoders: bool | None = None,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from diffusers import StableDiffusion3Pipeline

        self.transformer = self.denoiser = transformer
        self.vae = vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.pipeline = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.max_sequence_length = SD3_MAX_SEQUENCE_LENGTH
        if tokenizer_3 is not None:
            self.max_sequence_length = min(self.max_sequence_length, int(tokenizer_3.model_max_length))
        super().__init__(
            scheduler=scheduler,
            resolution=square_resolution(transformer.config.sample_size, autoencoder_downsampling(vae)),
            image_channels=vae.config.in_channels, grid=grid, offload_text_encoders=offload_text_encoders,
            model_id=model_id, revision=revision, fingerprint=fingerprint, device=device, dtype=dtype,
        )

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flow_autoencoder(self.vae, pixels)

    def _encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Condition) -> torch.Tensor:
        def cast(name: str) -> torch.Tensor:
            return cond.tensors[name].to(device=self.device, dtype=self.dtype)

        # float32, as StableDiffusion3Pipeline passes the scheduler's timesteps (not the compute dtype)
        timestep = s.float() * self.scheduler.config.num_train_timesteps
        return self.transformer(
            hidden_states=x_s, timestep=timestep, encoder_hidden_states=cast("encoder_hidden_states"),
            pooled_projections=cast("pooled_projections"),
        ).sample
