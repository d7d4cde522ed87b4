"""The embedded toy world: a suspect model the project trains itself.

Everything in cdi runs end to end on a small CPU machine against this world:

* **Data.** scikit-learn's 1,797 handwritten digits (8x8, values 0..16),
  upsampled bicubically to 32x32 RGB PNGs, white digit on black, captioned
  ``"a handwritten digit seven"``. A stratified, seeded half/half split
  (scikit-learn's ``train_test_split``) gives ``members/`` (898 images, the
  training set) and ``nonmembers/`` (899 images, never trained on). Each folder
  is a Hugging Face imagefolder with a ``metadata.jsonl``; file names
  (``digit_<original index>.png``) do not reveal the split.
  ``nonmembers_shifted/`` holds the same non-members under a visible
  distribution shift (see ``shift_image``), for the audit's shift guard and
  the benchmark's defective setup.
* **Models.** ``kind="sd"``: a tiny Stable-Diffusion-architecture latent
  text-to-image model (AutoencoderKL with 8x8x4 latents, frozen random
  CLIPTextModel over a character tokenizer, UNet2DConditionModel, DDPM
  scheduler with SD's scaled-linear betas), saved as a
  ``StableDiffusionPipeline`` folder. ``kind="ddpm"``: a tiny
  class-conditional pixel DDPM (UNet2DModel with 11 class embeddings: ten
  digits plus the null class 10), saved as a ``DDPMPipeline`` folder with a
  ``labels.json``. Both are RGB, 32x32, eps-prediction. ``kind="flow"``
  (``cdi.toy_flow``): a tiny SD3-architecture rectified-flow model (the toy
  SD's VAE and CLIP text encoder, a second CLIP and a tiny T5, an
  ``SD3Transformer2DModel``), saved as a ``StableDiffusion3Pipeline`` folder.
* **Strengths.** ``light``: per-image membership is weak while a test over
  hundreds of images detects it (the situation CDI is for). ``overtrained``:
  more epochs, a stronger per-image signal (see the table: on a 2-core CPU
  budget it stays far from perfect separation). ``TRAIN_CONFIGS`` holds the
  epochs, learning rates and batch sizes.

Membership signal of the shipped models (``python -m cdi.toy measure``:
cdi's Denoising Loss feature, t=100, 5 noises; AUC with members positive;
one-sided Welch p over all 898 + 899 images, and the median over 20 seeded
draws of 300 + 300)::

    model              epochs  AUC    TPR@1%FPR  Welch p (all)  median p (300+300)
    sd light              120  0.565  0.008      1.6e-06        2.3e-03
    sd overtrained        300  0.639  0.011      1.9e-25        4.9e-10
    ddpm light            160  0.549  0.014      4.1e-05        6.3e-03
    ddpm overtrained      400  0.662  0.022      7.8e-36        6.4e-14
    flow overtrained      500  0.585  0.018      7.5e-11        3.8e-05

Training times on one CPU thread (``train_seconds`` in each
``training.json``): ddpm light 12 min, ddpm overtrained 29 min, flow overtrained 37 min
(on a machine shared with other jobs; the flow model needs many epochs: its
member AUC was 0.527 after 60 epochs and about 0.55 after 125).

Training runs on the CPU in one thread, with every random draw taken from
generators seeded by ``seed`` and a constant learning rate, so it is
bit-for-bit reproducible on a given machine and software stack, and the first
k epochs of a longer run are exactly a k-epoch run. The world for seed 0 is
assembled in seconds from weights shipped under
``cdi/toy_weights/<kind>-<strength>/``, made by the project's own command (run
from the repository root; ``--out DIR`` writes elsewhere and says whether each
file is identical to the shipped one)::

    python -m cdi.toy train-shipped --kind sd --strength overtrained
    python -m cdi.toy train-shipped --kind sd --strength light
    python -m cdi.toy train-shipped --kind ddpm --strength overtrained
    python -m cdi.toy train-shipped --kind ddpm --strength light
    python -m cdi.toy train-shipped --kind flow --strength overtrained

``cdi toy build --retrain`` trains from scratch instead, and records in
``world.json`` whether the result is identical to the shipped weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from cdi import __version__
from cdi.errors import CDIError
from cdi.io import sha256_file

KINDS = ("sd", "ddpm", "flow")
STRENGTHS = ("light", "overtrained")
IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NULL_CLASS_ID = 10
TRAIN_THREADS = 1
WEIGHTS_ROOT = Path(__file__).resolve().parent / "toy_weights"
LAYOUT_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_PIPELINES = {"sd": "StableDiffusionPipeline", "ddpm": "DDPMPipeline", "flow": "StableDiffusion3Pipeline"}

# The shift applied to ``nonmembers_shifted``: a blur, then a warm tint that
# also lifts the black background to dark brown. Members are grey (R = G = B),
# so the mean of R - B is exactly 0 for them and about 20/255 for shifted
# images; the blur lowers the mean gradient magnitude.
SHIFT_BLUR_RADIUS = 1.0
SHIFT_GAIN = (1.0, 0.8, 0.55)
SHIFT_OFFSET = (28.0, 18.0, 8.0)


def caption(label: int) -> str:
    """The caption of a digit class, e.g. ``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


# --------------------------------------------------------------------- config
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


TRAIN_CONFIGS: dict[tuple[str, str], TrainConfig] = {
    ("sd", "light"): TrainConfig(epochs=120, lr=1e-3, batch_size=64, vae_epochs=10),
    ("sd", "overtrained"): TrainConfig(epochs=300, lr=1e-3, batch_size=64, vae_epochs=10),
    ("ddpm", "light"): TrainConfig(epochs=160, lr=1e-3, batch_size=32),
    ("ddpm", "overtrained"): TrainConfig(epochs=400, lr=1e-3, batch_size=32),
    # cdi.toy_flow: a tiny SD3 transformer, rectified-flow objective, the toy SD's VAE stage.
    ("flow", "overtrained"): TrainConfig(epochs=500, lr=1e-3, batch_size=16, vae_epochs=10),
}


def _check_kind_strength(kind: str, strength: str) -> None:
    if kind not in KINDS:
        raise CDIError(f"unknown toy model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if strength not in STRENGTHS:
        raise CDIError(f"unknown toy strength {strength!r}; choose one of {', '.join(STRENGTHS)}")
    if (kind, strength) not in TRAIN_CONFIGS:
        offered = ", ".join(s for k, s in TRAIN_CONFIGS if k == kind)
        raise CDIError(f"the {kind} toy model comes in the strength(s) {offered} only, not {strength!r}")


# ----------------------------------------------------------------------- data
def load_digit_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as smooth RGB images.

    Returns
    -------
    images : ndarray of uint8, shape (1797, size, size, 3)
        White digit on black: the 0..16 values are scaled to 0..255 and the
        8x8 image is upsampled bicubically; the three channels are equal.
    labels : ndarray of int64, shape (1797,)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.empty((len(digits.images), size, size, 3), dtype=np.uint8)
    for i, small in enumerate(digits.images):
        grey = Image.fromarray(np.round(small * (255.0 / 16.0)).astype(np.uint8), mode="L")
        images[i] = np.asarray(grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))
    return images, digits.target.astype(np.int64)


def split_members(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified half/half split of image indices into members and non-members.

    scikit-learn's ``train_test_split(stratify=labels, test_size=0.5,
    random_state=seed)``; each class is halved (odd counts give the extra
    image to the non-members). Both index arrays are sorted.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    members, nonmembers = train_test_split(
        index, test_size=0.5, stratify=labels, random_state=int(seed), shuffle=True
    )
    return np.sort(members), np.sort(nonmembers)


def _file_name(index: int) -> str:
    return f"digit_{int(index):04d}.png"


def write_image_folder(folder: Path, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
    """``images[i]`` for ``i`` in ``indices`` as ``digit_<i>.png``, plus an imagefolder ``metadata.jsonl``
    with each image's caption (``caption(labels[i])``). ``folder`` must not exist yet."""
    folder.mkdir(parents=True, exist_ok=False)
    lines = []
    for i in indices:
        name = _file_name(i)
        Image.fromarray(images[i]).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption(labels[i])}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def shift_image(image: Image.Image) -> Image.Image:
    """The toy world's distribution shift: Gaussian blur, then a warm tint.

    ``out_c = offset_c + gain_c * blur(x)_c`` with gain (1.0, 0.8, 0.55) and
    offset (28, 18, 8) on the 0..255 scale: a visible brown cast over the whole
    image (background included) and softer strokes. A colour statistic (mean
    of R - B) or a gradient statistic separates shifted from unshifted images
    perfectly.
    """
    blurred = np.asarray(
        image.convert("RGB").filter(ImageFilter.GaussianBlur(SHIFT_BLUR_RADIUS)), dtype=np.float32
    )
    out = np.asarray(SHIFT_OFFSET, np.float32) + np.asarray(SHIFT_GAIN, np.float32) * blurred
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), mode="RGB")


def write_shifted_images(src_dir: str | Path, dst_dir: str | Path, fraction: float = 1.0, seed: int = 0) -> None:
    """Copy an image folder, applying ``shift_image`` to a fraction of its images.

    Parameters
    ----------
    src_dir : path
        An image folder (optionally with a ``metadata.jsonl``/``metadata.csv``,
        which is copied unchanged so captions stay attached).
    dst_dir : path
        Created; must not exist or be empty. Written atomically (built beside
        it, then renamed).
    fraction : float in [0, 1]
        Share of the images that are shifted: ``round(fraction * n)`` images
        chosen uniformly at random (seeded); the rest are copied byte for
        byte. Shifted images keep their file name and format.
    seed : int
        Seed of the choice of shifted images.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not 0.0 <= float(fraction) <= 1.0:
        raise CDIError(f"fraction must be between 0 and 1, got {fraction}")
    if not src.is_dir():
        raise CDIError(f"image folder {src} does not exist")
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise CDIError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CDIError(f"{dst} already exists and is not empty; choose another folder or remove it")
    chosen = np.random.default_rng(int(seed)).choice(len(names), size=round(fraction * len(names)), replace=False)
    shifted = {names[i] for i in chosen}
    with _atomic_dir(dst) as tmp:
        for name in names:
            if name in shifted:
                with Image.open(src / name) as image:
                    shift_image(image).save(tmp / name)
            else:
                shutil.copy2(src / name, tmp / name)
        for meta in ("metadata.jsonl", "metadata.csv"):
            if (src / meta).is_file():
                shutil.copy2(src / meta, tmp / meta)


# --------------------------------------------------------------- file helpers
@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``target``; on success it replaces ``target``.

    An existing ``target`` is moved aside first and removed only after the
    new folder is in place; on failure the temporary folder is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it a normal folder's mode
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------- models
def _derived_seed(seed: int, stage: str) -> int:
    """A generator seed for one stage of training, from the world seed."""
    key = f"cdi-toy|{int(seed)}|{stage}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, stage: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_derived_seed(seed, stage))


@contextlib.contextmanager
def _seeded_init(seed: int, stage: str) -> Iterator[None]:
    """Seed torch's global generator for a module's init, restoring it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, stage))
        yield


@contextlib.contextmanager
def _training_threads() -> Iterator[None]:
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
    with _seeded_init(seed, "init-vae"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
            norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0,
        )
    with _seeded_init(seed, "init-text-encoder"):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    with _seeded_init(seed, "init-unet"):
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

    with _seeded_init(seed, "init-unet"):
        unet = UNet2DModel(
            sample_size=IMAGE_SIZE, in_channels=3, out_channels=3,
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 32, 64), layers_per_block=1, norm_num_groups=8,
            num_class_embeds=NULL_CLASS_ID + 1,
        )
    return {"unet": unet, "scheduler": ddpm_scheduler()}


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch: a seeded permutation cut into batches (the last one smaller)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


ProgressFn = Callable[[str], None]
EpochHook = Callable[[int, torch.nn.Module], None]


def _silent(message: str) -> None:
    pass


def _train_vae(vae, pixels: torch.Tensor, config: TrainConfig, seed: int, report: ProgressFn) -> float:
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


def _fit_denoiser(
    unet, scheduler, x0: torch.Tensor, cond_of: Callable[[torch.Tensor, torch.Tensor], dict],
    config: TrainConfig, seed: int, report: ProgressFn, on_epoch: EpochHook | None = None,
    loss_of: Callable[..., torch.Tensor] | None = None,
    stage: str = "denoiser",
) -> None:
    """Denoiser training: uniform t, by default MSE between eps and the eps-prediction.

    ``cond_of(idx, drop)`` returns the network's conditioning keyword
    arguments for the samples ``idx``, with the null condition where ``drop``
    is True. ``loss_of(net, x0, t, noise, cond)`` replaces the eps objective
    (``cdi.toy_flow`` passes the rectified-flow one). All draws (order, t,
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


def _text_embeddings(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
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
    ``sd``: the VAE is trained first (``_train_vae``); the UNet then learns
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
    report = progress or _silent
    pixels = _to_pixels(images)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    with _training_threads():
        if kind == "flow":
            from cdi.toy_flow import train_flow_model

            return train_flow_model(images, labels, config, seed, report, on_epoch)
        if kind == "sd":
            parts = sd_components(seed)
            vae, text_encoder, unet = parts["vae"], parts["text_encoder"], parts["unet"]
            scaling = _train_vae(vae, pixels, config, seed, lambda m: report(f"[sd vae] {m}"))
            vae.register_to_config(scaling_factor=scaling)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.mean * scaling
            text_encoder.eval().requires_grad_(False)
            table = _text_embeddings(text_encoder, parts["tokenizer"],
                                     [caption(c) for c in range(10)] + [""])

            def cond_of(idx, drop):
                cls = torch.where(drop, torch.full_like(labels_t[idx], NULL_CLASS_ID), labels_t[idx])
                return {"encoder_hidden_states": table[cls]}

            _fit_denoiser(unet, parts["scheduler"], latents, cond_of, config, seed,
                          lambda m: report(f"[sd unet] {m}"), on_epoch)
            modules = {"vae": vae, "text_encoder": text_encoder, "unet": unet}
            return ToyWeights(kind, {k: _state_dict(m) for k, m in modules.items()}, scaling)

        parts = ddpm_components(seed)

        def cond_of(idx, drop):
            return {"class_labels": torch.where(drop, torch.full_like(labels_t[idx], NULL_CLASS_ID),
                                                labels_t[idx])}

        _fit_denoiser(parts["unet"], parts["scheduler"], pixels, cond_of, config, seed,
                      lambda m: report(f"[ddpm unet] {m}"), on_epoch)
        return ToyWeights(kind, {"unet": _state_dict(parts["unet"])})


def _state_dict(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


# ------------------------------------------------------ weights and pipelines
def weights_dir(kind: str, strength: str) -> Path:
    """Where the shipped weights of a toy model live (``cdi/toy_weights/<kind>-<strength>``)."""
    return WEIGHTS_ROOT / f"{kind}-{strength}"


def save_weights(weights: ToyWeights, folder: Path, info: dict) -> dict[str, str]:
    """Write one ``<component>.safetensors`` per component plus ``training.json``.

    Returns the SHA-256 of each weight file, which ``training.json`` also records.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, state in sorted(weights.state_dicts.items()):
        path = folder / f"{name}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(state, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        hashes[path.name] = sha256_file(path)
    _write_json(folder / "training.json",
                {**info, "kind": weights.kind, "scaling_factor": weights.scaling_factor, "sha256": hashes})
    return hashes


def load_weights(folder: Path) -> tuple[ToyWeights, dict]:
    """Read weights written by ``save_weights``; returns them and ``training.json``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / "training.json"
    if not meta_path.is_file():
        raise CDIError(f"no shipped toy weights in {folder}; run `cdi toy build --retrain` to train them")
    meta = json.loads(meta_path.read_text())
    states = {}
    for file_name, digest in meta["sha256"].items():
        path = folder / file_name
        if not path.is_file() or sha256_file(path) != digest:
            raise CDIError(f"shipped toy weight file {path} is missing or corrupt (SHA-256 mismatch); "
                           "reinstall cdi or run `cdi toy build --retrain`")
        states[file_name.removesuffix(".safetensors")] = load_file(str(path))
    return ToyWeights(meta["kind"], states, meta.get("scaling_factor")), meta


@contextlib.contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    """Silence the text encoder's "Writing model shards" bar while saving."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_pipeline(weights: ToyWeights, model_dir: Path) -> None:
    """Assemble a diffusers pipeline folder from trained weights.

    ``sd``: a ``StableDiffusionPipeline`` (no safety checker or feature
    extractor). ``ddpm``: a ``DDPMPipeline`` plus ``labels.json``
    (``id2label`` for the ten digits and ``null_class_id`` 10).
    """
    model_dir = Path(model_dir)
    if weights.kind == "flow":
        from cdi.toy_flow import save_flow_pipeline

        return save_flow_pipeline(weights, model_dir)
    if weights.kind == "sd":
        from diffusers import StableDiffusionPipeline

        tokenizer_dir = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=model_dir.parent))
        try:
            parts = sd_components(0, tokenizer_dir=tokenizer_dir)
        finally:
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
        for name in ("vae", "text_encoder", "unet"):
            parts[name].load_state_dict(weights.state_dicts[name], strict=True)
        parts["vae"].register_to_config(scaling_factor=weights.scaling_factor)
        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        with _no_transformers_progress_bars():
            pipe.save_pretrained(model_dir, safe_serialization=True)
        return
    from diffusers import DDPMPipeline

    parts = ddpm_components(0)
    parts["unet"].load_state_dict(weights.state_dicts["unet"], strict=True)
    DDPMPipeline(unet=parts["unet"], scheduler=parts["scheduler"]).save_pretrained(
        model_dir, safe_serialization=True)
    labels = {"id2label": {str(c): caption(c) for c in range(10)}, "null_class_id": NULL_CLASS_ID}
    _write_json(model_dir / "labels.json", labels)


def _training_info(kind: str, strength: str, seed: int, config: TrainConfig) -> dict:
    """What a trained model's provenance records besides its weights."""
    import diffusers

    return {
        "kind": kind, "strength": strength, "seed": int(seed), "config": config.to_dict(),
        "image_size": IMAGE_SIZE, "train_threads": TRAIN_THREADS,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cdi": __version__,
    }


def train_shipped(kind: str, strength: str, progress: bool = True, folder: str | Path | None = None) -> dict[str, str]:
    """Train a toy model for seed 0 and write it to ``cdi/toy_weights`` (or ``folder``).

    This is the command that produced the shipped weights (see the module
    docstring); with ``folder`` it reproduces them elsewhere, for comparing
    the SHA-256 with the shipped ``training.json``. Returns the SHA-256 of
    each weight file.
    """
    _check_kind_strength(kind, strength)
    report = _printer(progress)
    images, labels = load_digit_images()
    members, _ = split_members(labels, 0)
    config = TRAIN_CONFIGS[(kind, strength)]
    start = time.time()
    weights = train_toy_model(kind, images[members], labels[members], config, 0, report)
    info = _training_info(kind, strength, 0, config)
    info["train_seconds"] = round(time.time() - start, 1)
    return save_weights(weights, Path(folder) if folder is not None else weights_dir(kind, strength), info)


def _printer(progress: bool) -> ProgressFn:
    if not progress:
        return _silent
    return lambda message: print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- world
@dataclass
class ToyWorld:
    """A built toy world (see the module docstring for the layout)."""

    root: Path
    model_dir: Path
    members_dir: Path
    nonmembers_dir: Path
    shifted_dir: Path
    info: dict

    @classmethod
    def at(cls, root: Path, info: dict) -> "ToyWorld":
        root = Path(root)
        return cls(root, root / "model", root / "members", root / "nonmembers",
                   root / "nonmembers_shifted", info)


def default_world_dir(kind: str, strength: str, seed: int) -> Path:
    """``$CDI_CACHE/toy/...`` if set, else ``$XDG_CACHE_HOME/cdi/toy/...`` or ``~/.cache/cdi/toy/...``."""
    if os.environ.get("CDI_CACHE"):
        base = Path(os.environ["CDI_CACHE"]).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cdi"
    return base / "toy" / f"{kind}-{strength}-seed{int(seed)}"


def _world_key(kind: str, strength: str, seed: int, retrain: bool, shipped_sha: dict | None) -> dict:
    """The fields of ``world.json`` that decide whether an existing world is reusable."""
    return {
        "layout_version": LAYOUT_VERSION, "cdi_version": __version__, "kind": kind, "strength": strength,
        "seed": int(seed), "source": "retrained" if retrain else "shipped",
        "training": TRAIN_CONFIGS[(kind, strength)].to_dict(),
        "shipped_weights_sha256": shipped_sha,
    }


def build_world(
    kind: str = "sd",
    strength: str = "overtrained",
    out: str | Path | None = None,
    *,
    seed: int = 0,
    retrain: bool = False,
    force: bool = False,
    progress: bool = True,
) -> ToyWorld:
    """Build (or reuse) a toy world: images, split, shifted copy and the suspect model.

    Parameters
    ----------
    kind : {"sd", "ddpm"}
    strength : {"light", "overtrained"}
    out : path or None
        The world's folder; default ``default_world_dir(kind, strength, seed)``.
        If it holds a world with the same ``world.json`` key (kind, strength,
        seed, source, training config, shipped weights, cdi version) it is
        reused as is, unless ``force``. A folder that is not a toy world is
        never overwritten.
    seed : int
        Seeds the member split and training. Shipped weights exist for seed 0
        only; other seeds need ``retrain=True``.
    retrain : bool
        Train the model from scratch (minutes on a CPU) instead of using the
        shipped weights.
    force : bool
        Rebuild even if a matching world exists.
    progress : bool
        Print progress lines to stderr.

    Returns
    -------
    ToyWorld
        Its ``info`` is the content of ``world.json``.
    """
    _check_kind_strength(kind, strength)
    seed = int(seed)
    report = _printer(progress)
    shipped = weights_dir(kind, strength)
    shipped_meta = None
    if (shipped / "training.json").is_file():
        shipped_meta = json.loads((shipped / "training.json").read_text())
    if not retrain:
        if seed != 0:
            raise CDIError(f"shipped toy weights exist for seed 0 only; pass --retrain to train a "
                           f"{kind}-{strength} model for seed {seed} (several minutes on a CPU)")
        if shipped_meta is None:
            raise CDIError(f"no shipped weights for the {kind}-{strength} toy model in {shipped}; "
                           "pass --retrain to train it")
        if shipped_meta.get("config") != TRAIN_CONFIGS[(kind, strength)].to_dict():
            raise CDIError(f"the shipped {kind}-{strength} weights were trained with another config "
                           f"than this cdi version's; run `python -m cdi.toy train-shipped --kind {kind} "
                           f"--strength {strength}` or pass --retrain")
    out = Path(out) if out is not None else default_world_dir(kind, strength, seed)
    key = _world_key(kind, strength, seed, retrain, shipped_meta["sha256"] if shipped_meta else None)
    if retrain:
        key["shipped_weights_sha256"] = None
    world_json = out / "world.json"
    if out.exists():
        if world_json.is_file():
            existing = json.loads(world_json.read_text())
            if not force and all(existing.get(k) == v for k, v in key.items()):
                report(f"toy world {out} is up to date")
                return ToyWorld.at(out, existing)
        elif not out.is_dir() or any(out.iterdir()):
            raise CDIError(f"{out} exists and is not a toy world; choose another --out or remove it")

    report(f"building the {kind}-{strength} toy world (seed {seed}) in {out}")
    images, labels = load_digit_images()
    members, nonmembers = split_members(labels, seed)
    with _atomic_dir(out) as tmp:
        write_image_folder(tmp / "members", members, images, labels)
        write_image_folder(tmp / "nonmembers", nonmembers, images, labels)
        write_shifted_images(tmp / "nonmembers", tmp / "nonmembers_shifted", fraction=1.0, seed=seed)
        config = TRAIN_CONFIGS[(kind, strength)]
        if retrain:
            start = time.time()
            weights = train_toy_model(kind, images[members], labels[members], config, seed, report)
            train_info = _training_info(kind, strength, seed, config)
            train_info["train_seconds"] = round(time.time() - start, 1)
            sha = save_weights(weights, tmp / "weights", train_info)
            shutil.rmtree(tmp / "weights")
        else:
            weights, train_info = load_weights(shipped)
            sha = train_info["sha256"]
        save_pipeline(weights, tmp / "model")
        info = {
            **key,
            "split": {
                "members": int(len(members)), "nonmembers": int(len(nonmembers)),
                "members_per_class": np.bincount(labels[members], minlength=10).tolist(),
                "nonmembers_per_class": np.bincount(labels[nonmembers], minlength=10).tolist(),
                "method": "sklearn.model_selection.train_test_split(stratify=labels, test_size=0.5, "
                          "random_state=seed)",
            },
            "data": {"source": "sklearn.datasets.load_digits", "image_size": IMAGE_SIZE,
                     "channels": "RGB", "style": "white digit on black, bicubic upsampling",
                     "caption_template": "a handwritten digit <word>"},
            "shift": {"folder": "nonmembers_shifted", "blur_radius": SHIFT_BLUR_RADIUS,
                      "gain_rgb": list(SHIFT_GAIN), "offset_rgb": list(SHIFT_OFFSET)},
            "model": {"folder": "model", "pipeline": _PIPELINES[kind],
                      "conditioning": "class" if kind == "ddpm" else "text",
                      "null_class_id": NULL_CLASS_ID if kind == "ddpm" else None,
                      "scaling_factor": weights.scaling_factor},
            "weights_sha256": sha,
            "train": {k: train_info.get(k) for k in ("torch", "diffusers", "train_threads", "train_seconds")},
            "image_size": IMAGE_SIZE,
        }
        if retrain and shipped_meta is not None and seed == 0:
            info["matches_shipped_weights"] = sha == shipped_meta["sha256"]
        _write_json(tmp / "world.json", info)
    report(f"toy world ready: {out}")
    return ToyWorld.at(out, info)


# ---------------------------------------------------------------- measuring
def measure_membership(
    world: ToyWorld, *, seed: int = 0, subset_size: int = 300, subsets: int = 20, batch_size: int = 64,
    device: str = "cpu", progress: bool = False,
) -> dict:
    """How strongly a toy model reveals membership, with the Denoising Loss.

    The per-image loss is cdi's ``denoising_loss`` feature (t = 100, mean of
    ``||eps_theta(x_t, t, c) - eps||_2`` over 5 seeded noises, the caption or
    class as condition), computed by the extraction engine for every member
    and non-member.

    Returns
    -------
    dict
        ``auc`` (members positive, lower loss = member), ``tpr_at_1pct_fpr``
        (largest TPR with FPR <= 1%), ``welch_p`` (one-sided Welch t-test,
        H1: members' mean loss is lower, all images), and over ``subsets``
        seeded draws of ``subset_size`` members and ``subset_size``
        non-members: ``subset_welch_p_median`` and ``subset_reject_rate_0.01``.
    """
    from scipy import stats

    from cdi.attacks.metrics import roc_auc, tpr_at_fpr
    from cdi.data import ImageCollection
    from cdi.models import load_model
    from cdi.features.extract import extract_features
    from cdi.features.registry import resolve_features

    adapter = load_model(str(world.model_dir), device=device, dtype="float32")
    families = resolve_features("denoising_loss")
    losses = []
    for folder, name in ((world.members_dir, "members"), (world.nonmembers_dir, "nonmembers")):
        collection = ImageCollection.from_folder(folder, name=name)
        table = extract_features(adapter, collection, families, seed=seed, batch_size=batch_size,
                                 num_workers=0, progress=progress)
        losses.append(table.values[:, 0])
    members, nonmembers = losses
    scores = -np.concatenate([members, nonmembers])
    is_member = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(members), len(nonmembers))
    subset_p = np.array([
        stats.ttest_ind(rng.choice(members, size, replace=False), rng.choice(nonmembers, size, replace=False),
                        equal_var=False, alternative="less").pvalue
        for _ in range(subsets)
    ])
    return {
        "kind": world.info["kind"], "strength": world.info["strength"], "seed": world.info["seed"],
        "members": int(len(members)), "nonmembers": int(len(nonmembers)),
        "mean_loss_members": float(members.mean()), "mean_loss_nonmembers": float(nonmembers.mean()),
        "auc": roc_auc(scores, is_member), "tpr_at_1pct_fpr": tpr_at_fpr(scores, is_member, 0.01).tpr,
        "welch_p": float(stats.ttest_ind(members, nonmembers, equal_var=False, alternative="less").pvalue),
        "subset_size": int(size), "subsets": int(subsets),
        "subset_welch_p_median": float(np.median(subset_p)),
        "subset_reject_rate_0.01": float((subset_p < 0.01).mean()),
    }


# ------------------------------------------------------------------ command
def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdi.toy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ship = sub.add_parser("train-shipped", help="train a toy model for seed 0 into cdi/toy_weights")
    ship.add_argument("--kind", choices=KINDS, required=True)
    ship.add_argument("--strength", choices=STRENGTHS, required=True)
    ship.add_argument("--out", default=None, help="write here instead of cdi/toy_weights (to check reproducibility)")
    meas = sub.add_parser("measure", help="build a world (shipped weights) and print its membership signal as JSON")
    meas.add_argument("--kind", choices=KINDS, required=True)
    meas.add_argument("--strength", choices=STRENGTHS, required=True)
    meas.add_argument("--out", default=None, help="world folder (default: the cache)")
    args = parser.parse_args(argv)
    if args.command == "measure":
        world = build_world(args.kind, args.strength, args.out, progress=False)
        print(json.dumps(measure_membership(world), indent=2))
        return 0
    folder = Path(args.out) if args.out else weights_dir(args.kind, args.strength)
    hashes = train_shipped(args.kind, args.strength, folder=folder)
    shipped = weights_dir(args.kind, args.strength) / "training.json"
    reference = json.loads(shipped.read_text())["sha256"] if shipped.is_file() else {}
    for name, digest in hashes.items():
        if folder == weights_dir(args.kind, args.strength):
            same = ""
        elif name not in reference:
            same = "  (no shipped file to compare with)"
        else:
            same = "  (identical to the shipped file)" if reference[name] == digest else "  (DIFFERS from the shipped file)"
        print(f"{folder / name}  sha256 {digest}{same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
