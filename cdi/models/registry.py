"""Model aliases: short names for the public checkpoints of REFERENCE.md section 6."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


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
    #: How the checkpoint was last trained when that was a distillation (None: the denoising loss).
    distilled: str | None = None
    #: The model to audit instead (its public undistilled base), when there is one.
    base: str | None = None


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
                   "Stable Diffusion 3.5 Large Turbo (few-step distilled), 1024 px", gated=True,
                   distilled="adversarial diffusion distillation (few-step student)", base="sd35-large"),
        ModelAlias("flux-dev", "black-forest-labs/FLUX.1-dev", "flux",
                   "FLUX.1 dev (12B, guidance-distilled), packed latents, T5-XXL, 1024 px", gated=True),
        ModelAlias("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux",
                   "FLUX.1 schnell (12B, timestep-distilled, Apache-2.0), 1024 px",
                   distilled="latent adversarial diffusion distillation (1-4 step student)", base=None),
        ModelAlias("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo", "zimage",
                   "Z-Image Turbo (6B single-stream DiT, Qwen3-4B text encoder, Apache-2.0), 1024 px",
                   distilled="few-step distillation (8 steps)", base="Tongyi-MAI/Z-Image (the base model, where "
                                                                     "published)"),
    ]
}

#: Distilled checkpoints known by hub id that have no alias (SDXL-Turbo, SDXL-Lightning): id -> (how, base).
DISTILLED_CHECKPOINTS: dict[str, tuple[str, str | None]] = {
    "stabilityai/sdxl-turbo": ("adversarial diffusion distillation (1-4 step student)", "sdxl"),
    "bytedance/sdxl-lightning": ("progressive adversarial distillation (1-8 step student)", "sdxl"),
}
#: Words in a checkpoint's name or config that mark a distilled model.
DISTILLED_WORDS = ("turbo", "lightning", "schnell", "lcm", "hyper-sd", "dmd2", "distill")
#: Config keys that mark a distilled model when true.
DISTILLED_KEYS = ("distilled", "is_distilled", "timestep_distilled", "guidance_distilled_student")


def distillation(model: str, configs: Sequence[Mapping] = ()) -> dict | None:
    """What is known of ``model`` having been distilled: ``{"how", "base", "why"}``, or None.

    From the alias table, the known hub ids, a config key marking it
    (``DISTILLED_KEYS``), or a distillation word in its name or its configs'
    ``_name_or_path`` (``DISTILLED_WORDS``). A distilled student was last
    trained to imitate a teacher's samples, not with the denoising loss the
    features measure; per-image membership attacks fail on one-step students
    (Li et al., "Distributional statistics restore training data auditability
    in one-step distilled diffusion models"), so an audit of it can miss a
    use of the images in the teacher's training.
    """
    name = str(model)
    alias = ALIASES.get(name)
    if alias is not None and alias.distilled:
        return {"how": alias.distilled, "base": alias.base, "why": "alias"}
    hub_id = (alias.checkpoint if alias else name).lower()
    for known, (how, base) in DISTILLED_CHECKPOINTS.items():
        if hub_id.startswith(known):
            return {"how": how, "base": base, "why": "checkpoint"}
    for config in configs:
        for key in DISTILLED_KEYS:
            if config.get(key) is True:
                return {"how": f"its config sets {key}", "base": None, "why": "config"}
    names = [hub_id] + [str(c.get("_name_or_path", "")).lower() for c in configs]
    for word in DISTILLED_WORDS:
        if any(word in n.replace("\\", "/").rsplit("/", 1)[-1] for n in names if n):
            return {"how": f"its name says {word!r}", "base": None, "why": "name"}
    return None


def distillation_text(info: dict | None) -> str | None:
    """One sentence for the audit, report and ``cdi models`` (None when not distilled)."""
    if info is None:
        return None
    base = f"; audit its base model ({info['base']}) instead, or as well" if info.get("base") else \
        "; audit its undistilled base model where one is public"
    return (f"this model is distilled ({info['how']}): it was last trained to imitate a teacher, not with the "
            f"denoising loss the features measure, and per-image membership signals are weak or absent in "
            f"few-step students{base}")


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
