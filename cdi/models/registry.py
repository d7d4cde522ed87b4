"""Model aliases: short names for the public checkpoints of REFERENCE.md section 6."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a public checkpoint."""

    alias: str
    checkpoint: str
    family: str
    description: str


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
    ]
}

FAMILIES: dict[str, str] = {
    "sd": "Stable Diffusion 1.x / 2.x (UNet2DConditionModel, AutoencoderKL, CLIP text encoder)",
    "sdxl": "Stable Diffusion XL (two text encoders, pooled embeddings, size/crop conditioning)",
    "ldm": "Latent diffusion with a VQ autoencoder (unconditional)",
    "dit": "Diffusion Transformer (class labels, learned variance)",
    "ddpm": "Pixel-space DDPM (UNet2DModel, optional class labels)",
}
