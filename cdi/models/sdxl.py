"""Stable Diffusion XL: two CLIP text encoders, pooled embeddings and size conditioning.

What ``StableDiffusionXLPipeline`` computes (``encode_prompt`` and
``_get_add_time_ids`` in diffusers), for one caption per sample:

* ``encoder_hidden_states``: the penultimate hidden states of
  ``text_encoder`` (CLIPTextModel) and of ``text_encoder_2``
  (CLIPTextModelWithProjection), concatenated along the features; no
  attention mask, each tokenizer padding to its own ``model_max_length``.
* ``text_embeds``: the projected pooled output of ``text_encoder_2``.
* ``time_ids``: ``original_size + crops_coords_top_left + target_size`` =
  ``(R, R, 0, 0, R, R)`` at the model's native resolution R (the UNet's
  ``sample_size`` times the VAE's downsampling: 1024 for SDXL base), i.e. an
  uncropped image at its native size.
* null condition: with ``force_zeros_for_empty_prompt`` (the pipeline's
  default, stored in model_index.json) the pipeline's unconditional input is
  all zeros for both embeddings, so an empty caption (or None) gives zeros
  here too; without it, the embeddings of the empty prompt. ``time_ids`` are
  the same for the null condition, as in the pipeline.
* x0: the VAE posterior mean, normalised as the pipeline de-normalises
  before decoding: ``(z - latents_mean) * scaling_factor / latents_std`` when
  the VAE config has ``latents_mean``/``latents_std``, else ``z * scaling_factor``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from cdi.utils.errors import CDIError
from cdi.models.base import Condition
from cdi.models.stable_diffusion import StableDiffusionAdapter, tokenize


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Adapter for ``StableDiffusionXLPipeline`` folders (see the module docstring).

    Parameters
    ----------
    unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler
        The pipeline's components, prepared as for ``StableDiffusionAdapter``.
    force_zeros_for_empty_prompt : bool
        The pipeline's setting (model_index.json; diffusers' default True).
    model_id, revision, fingerprint, device, dtype
        As in ``DiffusionAdapter``.
    """

    family = "sdxl"
    components = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "scheduler": SchedulerMixin,
    }

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        scheduler: SchedulerMixin,
        force_zeros_for_empty_prompt: bool = True,
        model_id: str,
        revision: str | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            model_id=model_id, revision=revision, fingerprint=fingerprint, device=device, dtype=dtype,
        )
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        size = self.resolution
        self.add_time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=self.device)
        expected = unet.add_embedding.linear_1.in_features
        passed = unet.config.addition_time_embed_dim * self.add_time_ids.shape[1] + text_encoder_2.config.projection_dim
        if expected != passed:
            raise CDIError(
                f"{model_id}: the UNet expects an added embedding of length {expected}, but SDXL size "
                f"conditioning gives {passed}; this is not an SDXL base model (a refiner?)"
            )

    @classmethod
    def extra_inputs(cls, folder: Path, index: dict) -> dict:
        return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            return (latents - mean) * config.scaling_factor / std
        return latents * config.scaling_factor

    @torch.no_grad()
    def _text_conditions(self, prompts: list[str]) -> Condition:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            output = encoder(tokenize(tokenizer, prompts)["input_ids"].to(self.device), output_hidden_states=True)
            if output[0].ndim == 2:  # the projected pooled output of CLIPTextModelWithProjection
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).float()
        pooled = pooled.float()
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([not p.strip() for p in prompts], device=self.device)
            embeds = embeds.masked_fill(empty.view(-1, 1, 1), 0.0)
            pooled = pooled.masked_fill(empty.view(-1, 1), 0.0)
        return Condition(len(prompts), {
            "encoder_hidden_states": embeds,
            "text_embeds": pooled,
            "time_ids": self.add_time_ids.expand(len(prompts), -1).clone(),
        })

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        def cast(name: str) -> torch.Tensor:
            return cond.tensors[name].to(device=self.device, dtype=self.dtype)

        return self.unet(
            x_t, t, encoder_hidden_states=cast("encoder_hidden_states"),
            added_cond_kwargs={"text_embeds": cast("text_embeds"), "time_ids": cast("time_ids")},
        ).sample
