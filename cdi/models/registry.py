"""Model aliases: short names for the public checkpoints of REFERENCE.md section 6."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a public checkpoint.

    ``gated``: the hub serves it only to logged-in users who accepted its
    licence on the model page (``cdi.models.loading`` says so before trying).
    """

    alias: str
    checkpoint: str
    family: str
    description: str
    gated: bool = False


ALIASES: dict[str, ModelAlias] = {
    a.alias: a
    for a in [
        ModelAlias("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd",
                   "Stable Diffusion 1.5, text-to-image, eps-prediction, 512 px"),
        ModelAlias("sd14", "CompVis/stable-diffusion-v1-4", "sd",
                   "Stable Diffusion 1.4, text-to-image, eps-prediction, 512 px"),
        ModelAlias("sd2-base", "stabilityai/stable-diffusion-2-base", "sd",
                   "Stable Diffusion 2 base, text-to-image, eps-prediction, 512 px"),
        ModelAlias("sd21", "stabilityai/stable-diffusion-2-1", "sd",
                   "Stable Diffusion 2.1, text-to-image, v-prediction, 768 px"),
        ModelAlias("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl",
                   "SDXL base 1.0, two text encoders, size conditioning, 1024 px"),
        ModelAlias("commoncanvas-xl-c", "common-canvas/CommonCanvas-XL-C", "sdxl",
                   "CommonCanvas XL C (SDXL architecture, trained on CommonCatalog)"),
        ModelAlias("kohaku-xl-epsilon", "KBlueLeaf/Kohaku-XL-Epsilon", "sdxl",
                   "Kohaku XL Epsilon (SDXL architecture, trained on HakuBooru)"),
        ModelAlias("ldm-celebahq", "CompVis/ldm-celebahq-256", "ldm",
                   "Latent diffusion with a VQ autoencoder, unconditional, CelebA-HQ 256 px"),
        ModelAlias("dit-256", "facebook/DiT-XL-2-256", "dit",
                   "DiT-XL/2, ImageNet class-conditional, learned variance, 256 px"),
        ModelAlias("dit-512", "facebook/DiT-XL-2-512", "dit",
                   "DiT-XL/2, ImageNet class-conditional, learned variance, 512 px"),
        ModelAlias("ddpm-cifar10", "google/ddpm-cifar10-32", "ddpm",
                   "Pixel-space DDPM, unconditional, CIFAR-10 32 px"),
        ModelAlias("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3",
                   "Stable Diffusion 3 Medium (2B MMDiT, CLIP-L + CLIP-G + T5-XXL), rectified flow, 1024 px",
                   gated=True),
        ModelAlias("sd35-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3",
                   "Stable Diffusion 3.5 Medium (2.5B MMDiT-X), rectified flow, 1024 px", gated=True),
        ModelAlias("sd35-large", "stabilityai/stable-diffusion-3.5-large", "sd3",
                   "Stable Diffusion 3.5 Large (8B MMDiT), rectified flow, 1024 px", gated=True),
        ModelAlias("sd35-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo", "sd3",
                   "Stable Diffusion 3.5 Large Turbo (few-step distilled), 1024 px", gated=True),
        ModelAlias("flux-dev", "black-forest-labs/FLUX.1-dev", "flux",
                   "FLUX.1 dev (12B, guidance-distilled), packed latents, T5-XXL, 1024 px", gated=True),
        ModelAlias("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux",
                   "FLUX.1 schnell (12B, timestep-distilled, Apache-2.0), 1024 px"),
        ModelAlias("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo", "zimage",
                   "Z-Image Turbo (6B single-stream DiT, Qwen3-4B text encoder, Apache-2.0), 1024 px"),
    ]
}

FAMILIES: dict[str, str] = {
    "sd": "Stable Diffusion 1.x / 2.x (UNet2DConditionModel, AutoencoderKL, CLIP text encoder)",
    "sdxl": "Stable Diffusion XL (two text encoders, pooled embeddings, size/crop conditioning)",
    "ldm": "Latent diffusion with a VQ autoencoder (unconditional)",
    "dit": "Diffusion Transformer (class labels, learned variance)",
    "ddpm": "Pixel-space DDPM (UNet2DModel, optional class labels)",
    "sd3": "Stable Diffusion 3 / 3.5 (MMDiT, three text encoders, pooled embeddings, rectified flow)",
    "flux": "FLUX.1 dev / schnell (packed 2x2 latents, position ids, guidance embedding, rectified flow)",
    "zimage": "Z-Image (single-stream DiT, Qwen3 text encoder, rectified flow)",
}
