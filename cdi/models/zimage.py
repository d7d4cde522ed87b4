"""Z-Image (``ZImagePipeline``, e.g. Tongyi-MAI/Z-Image-Turbo): single-stream DiT, Qwen3 text encoder.

Chosen as the current family because it is what people run now: a 6B
Apache-2.0 model that fits a 16 GB consumer GPU and generates in 8 steps
(Turbo), with a large LoRA ecosystem built on it since its release in late
2025; FLUX.2 dev (32B, non-commercial) and Qwen-Image (20B) need far larger
GPUs.

The folder holds ``transformer`` (ZImageTransformer2DModel), ``vae``
(FLUX.1's AutoencoderKL), ``text_encoder`` (Qwen3Model), ``tokenizer`` (with
its chat template) and a ``FlowMatchEulerDiscreteScheduler``. Through
``FlowMatchingAdapter``:

* x0 = ``(posterior mean - shift_factor) * scaling_factor``; native
  resolution: the autoencoder's ``sample_size`` (1024), ``mu`` at its
  token count (``autoencoder_native_size``).
* condition: the pipeline's ``encode_prompt`` (the caption in the chat
  template, Qwen3's penultimate hidden states of the non-padding tokens,
  ``max_sequence_length`` 512). Captions have different token counts; the
  condition stores them padded to 512 with ``caption_lengths``, and each
  network call passes the unpadded list, as the pipeline does. The null
  condition is the empty prompt (the pipeline's negative prompt).
* the transformer takes the timestep ``1 - s`` (float32, as the pipeline passes it) and a list of (C, 1, H, W)
  latents, and outputs the negative velocity (the pipeline negates it
  before the scheduler step); the adapter negates it too.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SchedulerMixin, ZImageTransformer2DModel
from transformers import AutoTokenizer, Qwen3Model

from cdi.models.base import Condition
from cdi.models.flow_matching import FlowMatchingAdapter, autoencoder_native_size, encode_flow_autoencoder

#: ZImagePipeline.__call__'s default text length.
ZIMAGE_MAX_SEQUENCE_LENGTH = 512


class ZImageAdapter(FlowMatchingAdapter):
    """Adapter for ``ZImagePipeline`` folders (see the module docstring).

    Parameters
    ----------
    transformer, vae, text_encoder, tokenizer, scheduler
        The pipeline's components, prepared by ``cdi.models.load_model``.
    grid, offload_text_encoders
        As in ``FlowMatchingAdapter``.
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    family = "zimage"
    components = {
        "transformer": ZImageTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": Qwen3Model,
        "tokenizer": AutoTokenizer,
        "scheduler": SchedulerMixin,
    }
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder",)

    def __init__(
        self,
        *,
        transformer: ZImageTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: Qwen3Model,
        tokenizer,
        scheduler: SchedulerMixin,
        grid: str = "model",
        offload_text_encoders: bool | None = None,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from diffusers import ZImagePipeline

        self.transformer = self.denoiser = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.pipeline = ZImagePipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        self.max_sequence_length = ZIMAGE_MAX_SEQUENCE_LENGTH
        resolution, mu = autoencoder_native_size(vae, scheduler)
        super().__init__(
            scheduler=scheduler, resolution=resolution, image_channels=vae.config.in_channels, mu=mu, grid=grid,
            offload_text_encoders=offload_text_encoders, model_id=model_id, revision=revision,
            fingerprint=fingerprint, device=device, dtype=dtype,
        )

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flow_autoencoder(self.vae, pixels)

    def _encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        padded = torch.zeros(len(embeds), self.max_sequence_length, embeds[0].shape[-1],
                             dtype=embeds[0].dtype, device=embeds[0].device)
        for i, e in enumerate(embeds):
            padded[i, : len(e)] = e
        lengths = torch.tensor([len(e) for e in embeds], dtype=torch.long)
        return {"encoder_hidden_states": padded, "caption_lengths": lengths}

    def _velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Condition) -> torch.Tensor:
        hidden = cond.tensors["encoder_hidden_states"].to(device=self.device, dtype=self.dtype)
        lengths = cond.tensors["caption_lengths"].tolist()
        captions = [hidden[i, : int(n)] for i, n in enumerate(lengths)]
        latents = list(x_s.unsqueeze(2).unbind(dim=0))
        # ZImagePipeline passes (1000 - t) / 1000 in float32; casting it to bfloat16 first would round sigma
        # to steps of 0.004 (at t = 0 the model would see 0.0040 instead of 0.0030).
        out = self.transformer(latents, (1 - s).float(), captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)
