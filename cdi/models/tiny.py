"""Tiny, locally built model parts for the toy world and the test suite.

Nothing here touches the network: every component is built from a config
with random weights (or trained by ``cdi.toy.world``) and saved with
``save_pretrained``, so that it is loaded back through exactly the path a
user's checkpoint takes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    LDMPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Printable ASCII that the byte-level pre-tokenizer maps to itself.
_CHARS = [chr(i) for i in range(33, 127)]
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def build_char_clip_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per character (no merges).

    Captions are lower-cased by the CLIP normaliser; every printable ASCII
    character is a token, with a separate end-of-word variant as CLIP's BPE
    expects. Small enough for toy text encoders, and it saves and loads as an
    ordinary ``CLIPTokenizer`` folder.
    """
    tokens = _CHARS + [c + "</w>" for c in _CHARS] + _SPECIAL
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def save_char_clip_tokenizer(folder: str | Path, max_length: int = 32) -> CLIPTokenizer:
    """Build the character tokenizer and save it to ``folder``.

    Writes the ``tokenizer.json`` of current transformers and the
    ``vocab.json``/``merges.txt`` pair that older releases read.
    """
    folder = Path(folder)
    tokenizer = build_char_clip_tokenizer(max_length)
    tokenizer.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), sort_keys=True))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tokenizer


# ------------------------------------------------------- tiny pipelines
# One builder per model family: a randomly initialised pipeline (seeded with
# torch.manual_seed) saved with save_pretrained as safetensors, loadable by
# cdi.models.load_model and by diffusers' DiffusionPipeline.from_pretrained.
# Images are 16x16 px; latent models use 8x8 latents (a 2-level autoencoder).

_RESOLUTION = 16
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _tiny_autoencoder_kl() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=_RESOLUTION,
    )


def _tiny_clip_config(tokenizer: CLIPTokenizer, hidden_size: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_conditional_unet(cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=2, norm_num_groups=8, **extra,
    )


def _save(pipeline: DiffusionPipeline, folder: str | Path, extra_json: dict[str, dict] | None = None) -> Path:
    """Save ``pipeline`` (safetensors) plus extra JSON files at its root, atomically.

    ``extra_json`` maps a file name to its content; ``"model_index.json"``
    entries are merged into the index that save_pretrained wrote. Tokenizer
    folders are rewritten by ``save_char_clip_tokenizer`` (which adds the
    vocab.json/merges.txt pair older transformers read).
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if isinstance(getattr(pipeline, name, None), CLIPTokenizer):
                save_char_clip_tokenizer(tmp / name, pipeline.components[name].model_max_length)
        for name, content in (extra_json or {}).items():
            path = tmp / name
            if name == "model_index.json":
                content = {**json.loads(path.read_text()), **content}
            path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny Stable Diffusion pipeline (16 px, 8x8x4 latents, 2-layer CLIP text encoder).

    ``prediction_type`` ("epsilon", "v_prediction" or "sample") is written to
    the scheduler config, as SD 2.x 768 does for v.
    """
    torch.manual_seed(seed)
    tokenizer = build_char_clip_tokenizer()
    pipeline = StableDiffusionPipeline(
        vae=_tiny_autoencoder_kl(),
        text_encoder=CLIPTextModel(_tiny_clip_config(tokenizer)),
        tokenizer=tokenizer,
        unet=_tiny_conditional_unet(cross_attention_dim=32),
        scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipeline, folder)


def save_tiny_sdxl(folder: str | Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True,
                   second_width: int = 32) -> Path:
    """A tiny SDXL pipeline: two 2-layer CLIP text encoders (32 + ``second_width`` features), size conditioning.

    A ``second_width`` other than 32 makes the two encoders distinguishable by shape, as in the real SDXL
    (768 + 1280), which diffusers' single-file loader relies on to tell them apart.
    """
    torch.manual_seed(seed)
    tokenizer = build_char_clip_tokenizer()
    tokenizer_2 = build_char_clip_tokenizer()
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, hidden_size=second_width))
    time_embed_dim = 8
    pipeline = StableDiffusionXLPipeline(
        vae=_tiny_autoencoder_kl(),
        text_encoder=CLIPTextModel(_tiny_clip_config(tokenizer)),
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_tiny_conditional_unet(
            cross_attention_dim=32 + second_width, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
            use_linear_projection=True,
        ),
        scheduler=EulerDiscreteScheduler(**_SD_BETAS),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    return _save(pipeline, folder)


def save_tiny_ldm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny unconditional LDM: a 2-level VQModel (3 latent channels) and a UNet2DModel."""
    torch.manual_seed(seed)
    vqvae = VQModel(
        in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3,
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=_RESOLUTION,
    )
    unet = UNet2DModel(
        sample_size=_RESOLUTION // 2, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False)
    return _save(LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler), folder)


def save_tiny_dit(folder: str | Path, seed: int = 0, num_classes: int = 10) -> Path:
    """A tiny DiT: 2 transformer layers, patch 2, learned variance, ``num_classes`` classes.

    ``id2label`` goes into model_index.json as on the hub (DiTPipeline does
    not save it), with comma-separated synonyms like ImageNet's.
    """
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=_RESOLUTION // 2, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=8,
    )
    pipeline = DiTPipeline(transformer=transformer, vae=_tiny_autoencoder_kl(),
                           scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
    id2label = {str(i): f"{_digit(i)}, digit {_digit(i)}, class {i} thing" for i in range(num_classes)}
    return _save(pipeline, folder, {"model_index.json": {"id2label": id2label}})


def save_tiny_ddpm(folder: str | Path, num_classes: int | None = 10, seed: int = 0) -> Path:
    """A tiny pixel DDPM (16 px RGB UNet2DModel).

    With ``num_classes``, class-conditional: ``num_class_embeds = num_classes
    + 1`` (the last index is the null class) and a labels.json
    ``{"id2label": {"0": "a handwritten digit zero", ...}, "null_class_id": num_classes}``.
    """
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=_RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=None if num_classes is None else num_classes + 1,
    )
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    extra = {}
    if num_classes is not None:
        extra["labels.json"] = {
            "id2label": {str(i): f"a handwritten digit {_digit(i)}" for i in range(num_classes)},
            "null_class_id": num_classes,
        }
    return _save(pipeline, folder, extra)


def _digit(i: int) -> str:
    return _DIGITS[i] if i < len(_DIGITS) else str(i)


def save_tiny_captioner(folder: str | Path, seed: int = 0) -> Path:
    """A tiny BLIP image captioner (random weights, 32 px input, a 40-word vocabulary), saved offline.

    Loaded back by ``cdi.models.captions.Captioner`` through ``AutoProcessor`` and
    ``AutoModelForImageTextToText``, the path a downloaded captioner takes;
    its captions are a few words drawn from the vocabulary (greedy decoding
    of random weights), enough to test captioning end to end.
    """
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + (
        "a an the digit number zero one two three four five six seven eight nine of image picture drawn white "
        "black grey on background handwritten small large thin thick bright dark centred blurry sharp").split()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(words) + "\n")
        tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=words.index("[DEC]"),
                         pad_token_id=0, sep_token_id=3, eos_token_id=3),
        projection_dim=16, image_text_hidden_size=16,
    )
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
