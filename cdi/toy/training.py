"""Training the toy models: their components, seeds and training loops.

``sd_components`` and ``ddpm_components`` build the seeded, freshly
initialised parts of the toy SD and the toy pixel DDPM; ``train_toy_model``
trains one kind on the member images (``cdi.toy.flow`` adds the flow model,
``cdi.toy.lora`` the LoRA, both on top of ``fit_denoiser`` and friends).
Every random draw comes from generators derived from the world seed and a
stage name (``seeded_init``, ``_generator``), the learning rate is
constant and training runs in ``TRAIN_THREADS`` threads, so a run is
bit-for-bit reproducible on one machine and software stack, and the first k
epochs of a longer run are exactly a k-epoch run. ``cdi.toy.world`` holds the
shipped configurations (``TRAIN_CONFIGS``) and writes the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cdi.utils.errors import CDIError
from cdi.toy.data import IMAGE_SIZE, NULL_CLASS_ID, caption

KINDS = ("sd", "ddpm", "flow")
TRAIN_THREADS = 1

@dataclass(frozen=True)
class TrainConfig:
    """How one toy model is trained.

    Attributes
    ----------
    epochs : int
        Passes of the denoiser over the member images.
    lr : float
        AdamW learning rate of the denoiser (constant; weight decay 0).
    batch_size : int
        Denoiser batch size; the last, smaller batch of an epoch is kept.
    caption_dropout : float
        Probability that a training sample gets the null condition (empty
        prompt for ``sd``, class 10 for ``ddpm``), so that the null condition
        is meaningful (classifier-free guidance, CLiD).
    vae_epochs, vae_lr, vae_batch_size, vae_kl_weight
        The VAE stage of ``sd`` (unused for ``ddpm``): AdamW on mean squared
        reconstruction error plus ``vae_kl_weight`` times the KL divergence to
        the standard normal (summed over latent elements, averaged over the
        batch), decoding a seeded posterior sample.
    """

    epochs: int
    lr: float
    batch_size: int
    caption_dropout: float = 0.1
    vae_epochs: int = 0
    vae_lr: float = 1e-3
    vae_batch_size: int = 32
    vae_kl_weight: float = 1e-6

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------- models
def _derived_seed(seed: int, stage: str) -> int:
    """A generator seed for one stage of training, from the world seed."""
    key = f"cdi-toy|{int(seed)}|{stage}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, stage: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_derived_seed(seed, stage))


@contextlib.contextmanager
def seeded_init(seed: int, stage: str) -> Iterator[None]:
    """Seed torch's global generator for a module's init, restoring it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, stage))
        yield


@contextlib.contextmanager
def training_threads() -> Iterator[None]:
    """Train in ``TRAIN_THREADS`` intra-op threads (results depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sd_scheduler():
    """SD's training scheduler: 1000 steps, scaled-linear betas 0.00085..0.012, eps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def ddpm_scheduler():
    """The original DDPM scheduler: 1000 steps, linear betas 1e-4..0.02, eps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon",
    )


def sd_components(seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    """Freshly initialised (seeded) parts of the toy SD model.

    AutoencoderKL: 3 encoder blocks (16, 32, 32 channels), 4 latent channels,
    32x32 px -> 8x8x4 latents. CLIPTextModel: 2 layers, width 32, over the
    character tokenizer of ``cdi.models.tiny`` (32 tokens). UNet2DConditionModel:
    blocks (32, 64), one cross-attention level, 1 attention head (diffusers'
    ``attention_head_dim`` is the head count), cross-attention width 32.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdi.models.tiny import build_char_clip_tokenizer, save_char_clip_tokenizer

    if tokenizer_dir is None:
        tokenizer = build_char_clip_tokenizer(max_length=32)
    else:
        tokenizer = save_char_clip_tokenizer(tokenizer_dir, max_length=32)
    with seeded_init(seed, "init-vae"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
            norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0,
        )
    with seeded_init(seed, "init-text-encoder"):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    with seeded_init(seed, "init-unet"):
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=1, norm_num_groups=8,
        )
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
            "scheduler": sd_scheduler()}


def ddpm_components(seed: int = 0) -> dict:
    """Freshly initialised (seeded) parts of the toy pixel DDPM.

    UNet2DModel on 32x32 RGB: four levels (32, 16, 8, 4 px) with 8, 16, 32
    and 64 channels, so every level costs about the same and the parameters
    sit at the coarse levels where they are cheap on a CPU; self-attention at
    4x4; 11 class embeddings (digits 0..9 and the null class 10).
    """
    from diffusers import UNet2DModel

    with seeded_init(seed, "init-unet"):
        unet = UNet2DModel(
            sample_size=IMAGE_SIZE, in_channels=3, out_channels=3,
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 32, 64), layers_per_block=1, norm_num_groups=8,
            num_class_embeds=NULL_CLASS_ID + 1,
        )
    return {"unet": unet, "scheduler": ddpm_scheduler()}


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch: a seeded permutation cut into batches (the last one smaller)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


ProgressFn = Callable[[str], None]
EpochHook = Callable[[int, torch.nn.Module], None]


def silent(message: str) -> None:
    pass


def train_vae(vae, pixels: torch.Tensor, config: TrainConfig, seed: int, report: ProgressFn) -> float:
    """Fit the VAE; return the scaling factor (1 / std of posterior-mean latents).

    SD chose its 0.18215 the same way: latents times the factor have about
    unit variance. The factor is rounded to 5 significant digits.
    """
    gen = _generator(seed, "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train()
    start = time.time()
    for epoch in range(config.vae_epochs):
        total = 0.0
        for idx in _batches(len(pixels), config.vae_batch_size, gen):
            x = pixels[idx]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
            loss = F.mse_loss(recon, x) + config.vae_kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        report(f"vae epoch {epoch + 1}/{config.vae_epochs}: loss {total / len(pixels):.5f} "
               f"({time.time() - start:.0f} s)")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    return float(f"{1.0 / float(latents.std()):.5g}")


def fit_denoiser(
    unet, scheduler, x0: torch.Tensor, cond_of: Callable[[torch.Tensor, torch.Tensor], dict],
    config: TrainConfig, seed: int, report: ProgressFn, on_epoch: EpochHook | None = None,
    loss_of: Callable[..., torch.Tensor] | None = None,
    stage: str = "denoiser",
) -> None:
    """Denoiser training: uniform t, by default MSE between eps and the eps-prediction.

    ``cond_of(idx, drop)`` returns the network's conditioning keyword
    arguments for the samples ``idx``, with the null condition where ``drop``
    is True. ``loss_of(net, x0, t, noise, cond)`` replaces the eps objective
    (``cdi.toy.flow`` passes the rectified-flow one). All draws (order, t,
    noise, dropout) come from one seeded generator in a fixed order and the
    learning rate is constant, so the first k epochs of a longer run are
    exactly a k-epoch run. ``stage`` names the generator's stream (another
    training run, e.g. a LoRA, draws its own); only parameters that require
    gradients are trained.
    """
    if loss_of is None:
        def loss_of(net, x, t, noise, cond):
            return F.mse_loss(net(scheduler.add_noise(x, noise, t), t, **cond).sample, noise)

    gen = _generator(seed, stage)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    num_t = scheduler.config.num_train_timesteps
    unet.train()
    start = time.time()
    for epoch in range(config.epochs):
        total = 0.0
        for idx in _batches(len(x0), config.batch_size, gen):
            x = x0[idx]
            t = torch.randint(0, num_t, (len(idx),), generator=gen)
            noise = torch.randn(x.shape, generator=gen)
            drop = torch.rand(len(idx), generator=gen) < config.caption_dropout
            loss = loss_of(unet, x, t, noise, cond_of(idx, drop))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % max(1, config.epochs // 20) == 0 or epoch + 1 == config.epochs:
            report(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(x0):.5f} "
                   f"({time.time() - start:.0f} s)")
        if on_epoch is not None:
            unet.eval()
            on_epoch(epoch + 1, unet)
            unet.train()
    unet.eval()


def text_embeddings(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden states of the prompts, padded to the tokenizer's max length (as SD does)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(tokens.input_ids).last_hidden_state


@dataclass
class ToyWeights:
    """Trained weights of one toy model: component name -> state dict."""

    kind: str
    state_dicts: dict[str, dict[str, torch.Tensor]]
    scaling_factor: float | None = None


def train_toy_model(
    kind: str, images: np.ndarray, labels: np.ndarray, config: TrainConfig, seed: int = 0,
    progress: ProgressFn | None = None, on_epoch: EpochHook | None = None,
) -> ToyWeights:
    """Train a toy model from scratch on ``images`` (the members).

    Parameters
    ----------
    kind : {"sd", "ddpm"}
    images : ndarray of uint8, shape (N, 32, 32, 3)
    labels : ndarray of int, shape (N,)
        Digit classes; the condition is the caption (``sd``) or the class (``ddpm``).
    config : TrainConfig
    seed : int
        Seeds initialisation and every training draw.
    progress : callable or None
        Receives one line of text per reported step.
    on_epoch : callable or None
        Called as ``on_epoch(epoch, unet)`` after every denoiser epoch (the
        UNet in eval mode; training resumes after), e.g. to evaluate or save
        checkpoints. It must not change the UNet or draw from torch's global
        generator if the run is to stay identical to one without the hook.

    Notes
    -----
    ``sd``: the VAE is trained first (``train_vae``); the UNet then learns
    on the posterior-mean latents times the scaling factor, computed once,
    the same deterministic latents the audit's adapter uses. The text encoder
    stays at its seeded random initialisation (SD fine-tuning freezes it);
    caption embeddings are computed once. ``ddpm``: pixels in [-1, 1], class
    labels with ``caption_dropout`` replaced by the null class.
    Runs in ``TRAIN_THREADS`` CPU threads, so results are bit-identical
    between runs on one machine.
    """
    if kind not in KINDS:
        raise CDIError(f"unknown toy model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "flow":  # cdi.toy.flow builds on this module, so this one does not call it
        raise CDIError("train_toy_model trains the sd and ddpm toy models; the flow model is trained by "
                       "cdi.toy.flow.train_flow_model (cdi.toy.world.train_model trains every kind)")
    report = progress or silent
    pixels = to_pixels(images)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    with training_threads():
        if kind == "sd":
            parts = sd_components(seed)
            vae, text_encoder, unet = parts["vae"], parts["text_encoder"], parts["unet"]
            scaling = train_vae(vae, pixels, config, seed, lambda m: report(f"[sd vae] {m}"))
            vae.register_to_config(scaling_factor=scaling)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.mean * scaling
            text_encoder.eval().requires_grad_(False)
            table = text_embeddings(text_encoder, parts["tokenizer"],
                                     [caption(c) for c in range(10)] + [""])

            def cond_of(idx, drop):
                cls = torch.where(drop, torch.full_like(labels_t[idx], NULL_CLASS_ID), labels_t[idx])
                return {"encoder_hidden_states": table[cls]}

            fit_denoiser(unet, parts["scheduler"], latents, cond_of, config, seed,
                          lambda m: report(f"[sd unet] {m}"), on_epoch)
            modules = {"vae": vae, "text_encoder": text_encoder, "unet": unet}
            return ToyWeights(kind, {k: detached_state_dict(m) for k, m in modules.items()}, scaling)

        parts = ddpm_components(seed)

        def cond_of(idx, drop):
            return {"class_labels": torch.where(drop, torch.full_like(labels_t[idx], NULL_CLASS_ID),
                                                labels_t[idx])}

        fit_denoiser(parts["unet"], parts["scheduler"], pixels, cond_of, config, seed,
                      lambda m: report(f"[ddpm unet] {m}"), on_epoch)
        return ToyWeights(kind, {"unet": detached_state_dict(parts["unet"])})


def detached_state_dict(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
