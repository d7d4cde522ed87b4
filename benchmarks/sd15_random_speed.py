"""Speed of the CDI features on a Stable Diffusion 1.5-sized model (random weights), for a GPU session.

Builds a pipeline with SD 1.5's published architecture (the UNet, VAE and
CLIP ViT-L/14 text-encoder configurations of ``runwayml/stable-diffusion-v1-5``,
written out below) but random weights (no download; speed and memory do not
depend on the weights), with the local character-level CLIP tokenizer of
``cdi.models.tiny`` (77 tokens, as SD 1.5), saves it as a diffusers folder and
runs ``cdi speed`` on it for the CDI set and for CLiD:

    python benchmarks/sd15_random_speed.py --out /tmp/sd15-random --device cuda --dtype bfloat16

prints both reports and writes them to ``OUT/speed_cdi.json`` and
``OUT/speed_clid.json``. On CPU, check that it builds and runs with a smaller
resolution (the UNet keeps SD 1.5's widths and depth; only the latent size
shrinks):

    python benchmarks/sd15_random_speed.py --out /tmp/sd15-small --device cpu --dtype float32 \\
        --resolution 64 --images 1 --batch-size 1 --features cdi

The pipeline folder is reused when it already exists with the same resolution.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: ``unet/config.json`` of runwayml/stable-diffusion-v1-5 (sample_size set from --resolution).
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: ``vae/config.json`` of runwayml/stable-diffusion-v1-5.
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: ``text_encoder/config.json`` of runwayml/stable-diffusion-v1-5 (CLIP ViT-L/14 text tower).
SD15_TEXT_ENCODER = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

#: ``scheduler/scheduler_config.json`` of runwayml/stable-diffusion-v1-5 (PNDM; the schedule is what matters).
SD15_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "steps_offset": 1}


def build_sd15_random(folder: Path, resolution: int = 512, seed: int = 0) -> Path:
    """Save an SD 1.5-architecture pipeline with random weights to ``folder`` (atomically)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdi.models.tiny import build_char_clip_tokenizer, save_char_clip_tokenizer

    if resolution % 8:
        raise SystemExit(f"--resolution must be a multiple of 8, got {resolution}")
    torch.manual_seed(seed)
    tokenizer = build_char_clip_tokenizer(max_length=77)
    text_config = CLIPTextConfig(**SD15_TEXT_ENCODER, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**{**SD15_VAE, "sample_size": resolution}),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**{**SD15_UNET, "sample_size": resolution // 8}),
        scheduler=PNDMScheduler(**SD15_BETAS, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        save_char_clip_tokenizer(tmp / "tokenizer", max_length=77)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _built_resolution(folder: Path) -> int | None:
    config = folder / "unet" / "config.json"
    if not config.is_file():
        return None
    return 8 * int(json.loads(config.read_text())["sample_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder for the pipeline (OUT/model) and the reports.")
    parser.add_argument("--resolution", type=int, default=512, help="Pixel size (SD 1.5: 512).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--features", default="cdi,clid",
                        help="Comma-separated runs: each item is one `cdi speed --features` value.")
    args = parser.parse_args(argv)

    out = Path(args.out)
    model = out / "model"
    built = _built_resolution(model)
    if built is None:
        print(f"building SD 1.5-architecture pipeline ({args.resolution} px, random weights) in {model}", flush=True)
        build_sd15_random(model, args.resolution)
    elif built != args.resolution:
        raise SystemExit(f"{model} holds a {built} px pipeline; use another --out for {args.resolution} px")
    for features in args.features.split(","):
        command = [sys.executable, "-m", "cdi.cli", "speed", "--model", str(model), "--features", features,
                   "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
                   "--images", str(args.images), "--format", "json"]
        print("$ " + " ".join(command), flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stderr)
            return result.returncode
        path = out / f"speed_{features.replace('+', '_')}.json"
        path.write_text(result.stdout)
        report = json.loads(result.stdout)
        print(f"{features}: {report['images_per_second']:.3f} images/s, efficiency {report['efficiency']:.3f}, "
              f"batch {report['batch_size']}, peak device memory {report['peak_memory_bytes']['device']}, "
              f"peak host memory {report['peak_memory_bytes']['host']} -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
