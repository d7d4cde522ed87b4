"""The flow-matching toy model: a tiny SD3-style transformer on the toy world's digits.

``cdi.toy.world`` builds this model for ``kind="flow"`` on the same data, member
split, VAE stage and frozen CLIP text encoder as the toy SD model
(``kind="sd"``); only the denoiser and its objective differ:

* **Pipeline.** A ``StableDiffusion3Pipeline`` folder, loaded by cdi like any
  SD3 checkpoint (``cdi.models.sd3``): ``vae`` (the toy SD's AutoencoderKL,
  8x8x4 latents, ``shift_factor`` 0), ``text_encoder`` (the toy SD's CLIP
  text encoder with a seeded random 32-wide projection, as SD3's
  ``CLIPTextModelWithProjection``), ``text_encoder_2`` (a second seeded
  random 2-layer CLIP with projection), ``text_encoder_3`` (a tiny seeded
  random T5 encoder, 64 wide, over a character tokenizer of 8 tokens that
  knows the caption words), ``transformer`` (``SD3Transformer2DModel``: patch 2, 2 joint blocks,
  2 heads of 32, joint attention over the text tokens and 16 image tokens)
  and SD3's scheduler configuration (``FlowMatchEulerDiscreteScheduler``,
  1000 steps, ``shift=3.0``).
* **Objective.** Rectified flow as SD3 trains it: ``x_s = (1 - s) x0 + s eps``,
  the transformer predicts ``v = eps - x0`` at timestep ``1000 s``, mean
  squared error. ``s`` is the scheduler's shifted sigma at a timestep index
  drawn uniformly from 0..999 (SD3 draws the index from a logit-normal
  density; uniform, as the toy SD draws its t, trains the low-noise steps the
  membership features use as much as the rest). Captions are the pipeline's
  own ``encode_prompt`` embeddings, computed once per class; 10% of the
  samples get the empty prompt (the null condition of CLiD).

Weights for seed 0 ship under ``cdi/toy/weights/flow-<strength>/`` and were
made with ``python -m cdi.toy train-shipped --kind flow --strength <strength>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

FLOW_SHIFT = 3.0
TEXT_WIDTH = 32
T5_TOKENS = 8
LAYERS = 2


def flow_scheduler():
    """SD3's training scheduler configuration: 1000 steps, shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def flow_components(seed: int = 0) -> dict:
    """Freshly initialised (seeded) parts of the toy flow model.

    The VAE, tokenizer and first text encoder are the toy SD's
    (``cdi.toy.world.sd_components``, same seeds), the text encoder recast as
    ``CLIPTextModelWithProjection`` with a seeded projection.
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from cdi.models.tiny import build_char_clip_tokenizer
    from cdi.models.tiny_flow import build_char_t5_tokenizer, tiny_t5_encoder
    from cdi.toy.data import DIGIT_WORDS, IMAGE_SIZE
    from cdi.toy.training import sd_components, seeded_init

    sd = sd_components(seed)
    config = sd["text_encoder"].config
    with seeded_init(seed, "init-text-projection"):
        text_encoder = CLIPTextModelWithProjection(config)
    text_encoder.text_model.load_state_dict(sd["text_encoder"].state_dict(), strict=True)
    with seeded_init(seed, "init-text-encoder-2"):
        text_encoder_2 = CLIPTextModelWithProjection(config)
    tokenizer_3 = build_char_t5_tokenizer(max_length=T5_TOKENS, words=("a", "handwritten", "digit", *DIGIT_WORDS))
    with seeded_init(seed, "init-text-encoder-3"):
        text_encoder_3 = tiny_t5_encoder(tokenizer_3, d_model=2 * TEXT_WIDTH)
    with seeded_init(seed, "init-transformer"):
        transformer = SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=LAYERS,
            attention_head_dim=32, num_attention_heads=2, joint_attention_dim=2 * TEXT_WIDTH,
            caption_projection_dim=64, pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=8,
        )
    sd["vae"].register_to_config(shift_factor=0.0)
    return {
        "vae": sd["vae"], "text_encoder": text_encoder, "tokenizer": sd["tokenizer"],
        "text_encoder_2": text_encoder_2, "tokenizer_2": build_char_clip_tokenizer(max_length=32),
        "text_encoder_3": text_encoder_3, "tokenizer_3": tokenizer_3,
        "transformer": transformer, "scheduler": flow_scheduler(),
    }


def flow_pipeline(parts: dict):
    """A ``StableDiffusion3Pipeline`` over ``parts`` (three text encoders, the third a tiny T5)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=parts["transformer"], scheduler=parts["scheduler"], vae=parts["vae"],
        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
        text_encoder_3=parts["text_encoder_3"], tokenizer_3=parts["tokenizer_3"],
    )


def flow_matching_loss(scheduler) -> Callable[..., torch.Tensor]:
    """The rectified-flow objective for ``cdi.toy.training.fit_denoiser``: MSE between ``eps - x0`` and the velocity.

    ``t`` indexes the scheduler's shifted training sigmas
    (``cdi.models.flow_matching.training_sigmas``); the transformer gets
    the timestep ``1000 s`` as SD3's does.
    """
    from cdi.models.flow_matching import training_sigmas

    sigmas = training_sigmas(scheduler)
    num_t = scheduler.config.num_train_timesteps

    def loss_of(net, x, t, noise, cond):
        s = sigmas[t].view(-1, 1, 1, 1)
        x_s = (1.0 - s) * x + s * noise
        return F.mse_loss(net(x_s, timestep=s.flatten() * num_t, **cond).sample, noise - x)

    return loss_of


def train_flow_model(images: np.ndarray, labels: np.ndarray, config, seed: int, report, on_epoch=None):
    """Train the toy flow model on ``images`` (the members); returns ``cdi.toy.world.ToyWeights``.

    The VAE stage is the toy SD's (``cdi.toy.training.train_vae``, same seed and
    config, so the same VAE); the transformer then learns on its
    posterior-mean latents times the scaling factor.
    """
    from cdi.toy.data import NULL_CLASS_ID, caption
    from cdi.toy.training import ToyWeights, detached_state_dict, fit_denoiser, to_pixels, train_vae

    pixels = to_pixels(images)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    parts = flow_components(seed)
    vae = parts["vae"]
    scaling = _shipped_sd_vae(vae, config, seed)
    if scaling is None:
        scaling = train_vae(vae, pixels, config, seed, lambda m: report(f"[flow vae] {m}"))
    else:
        report("[flow vae] the shipped toy SD VAE (same seed and VAE config, so the same weights)")
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * scaling
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        parts[name].eval().requires_grad_(False)
    with torch.no_grad():
        embeds, _, pooled, _ = flow_pipeline(parts).encode_prompt(
            [caption(c) for c in range(10)] + [""], prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)

    def cond_of(idx, drop):
        cls = torch.where(drop, torch.full_like(labels_t[idx], NULL_CLASS_ID), labels_t[idx])
        return {"encoder_hidden_states": embeds[cls], "pooled_projections": pooled[cls]}

    fit_denoiser(parts["transformer"], parts["scheduler"], latents, cond_of, config, seed,
                  lambda m: report(f"[flow transformer] {m}"), on_epoch, loss_of=flow_matching_loss(parts["scheduler"]))
    modules = {k: parts[k] for k in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")}
    return ToyWeights("flow", {k: detached_state_dict(m) for k, m in modules.items()}, scaling)


def _shipped_sd_vae(vae, config, seed: int) -> float | None:
    """Load the shipped toy SD's VAE into ``vae`` when ``train_vae`` would reproduce it; its scaling factor.

    The VAE stage depends only on the seed, the VAE fields of the config and
    the images, so for seed 0 and the same VAE settings the toy SD's shipped
    VAE is what training would give; None otherwise (then train it).
    """
    from cdi.toy.shipped import load_weights, weights_dir

    vae_fields = ("vae_epochs", "vae_lr", "vae_batch_size", "vae_kl_weight")
    folder = weights_dir("sd", "overtrained")
    if seed != 0 or not (folder / "training.json").is_file():
        return None
    weights, meta = load_weights(folder)
    if any(meta["config"].get(k) != getattr(config, k) for k in vae_fields):
        return None
    vae.load_state_dict(weights.state_dicts["vae"], strict=True)
    return float(weights.scaling_factor)


def save_flow_pipeline(weights, model_dir) -> None:
    """Assemble the ``StableDiffusion3Pipeline`` folder of trained toy flow weights."""
    from cdi.models.tiny import save_char_clip_tokenizer
    from cdi.toy.shipped import no_transformers_progress_bars

    parts = flow_components(0)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        parts[name].load_state_dict(weights.state_dicts[name], strict=True)
    parts["vae"].register_to_config(scaling_factor=weights.scaling_factor)
    with no_transformers_progress_bars():
        flow_pipeline(parts).save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # adds the vocab.json/merges.txt pair older transformers read
        save_char_clip_tokenizer(Path(model_dir) / name, max_length=32)
