"""GPU figures for a Stable Diffusion 1.5-sized model (random weights): one script, one JSON, under 8 minutes.

Builds a pipeline with SD 1.5's published architecture (the UNet, VAE and
CLIP ViT-L/14 text-encoder configurations of ``runwayml/stable-diffusion-v1-5``,
written out below) but random weights (no download; speed and memory do not
depend on the weights), with the local character-level CLIP tokenizer of
``cdi.models.tiny`` (77 tokens, as SD 1.5), saves it as a diffusers folder,
and measures, each step in its own process with a time limit:

1. ``cdi speed`` for the CDI set and for CLiD at ``--batch-size auto``:
   images/s, efficiency against the bare network, calls per image, peak
   device and host memory, and the CUDA auto batch size it chose;
2. ``cdi speed --features cdi --compile`` (``torch.compile`` of the UNet);
3. the out-of-memory halving on the real device: the process's CUDA memory
   is capped (``torch.cuda.set_per_process_memory_fraction``) so that a
   Gradient Masking batch of ``--oom-batch`` images does not fit; the
   extraction must halve its batch (real ``torch.cuda.OutOfMemoryError``),
   finish, and give the values of an uncapped run at the final batch size.

Everything goes to ``OUT/sd15_random_speed.json`` (and each ``cdi speed``
report to ``OUT/speed_<features>.json``)::

    python benchmarks/sd15_random_speed.py --out /tmp/sd15-random

(defaults: cuda, bfloat16, 512 px, 64 images). On CPU, check that it builds
and runs with ``--tiny`` (64 px, 2 images, batch 2, float32; the UNet keeps
SD 1.5's widths and depth; the compile and out-of-memory steps are skipped
off CUDA)::

    python benchmarks/sd15_random_speed.py --out /tmp/sd15-tiny --tiny

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
import time
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


#: Step 3, run in its own process: cap CUDA memory, extract Gradient Masking, check the halving.
OOM_CHILD = r"""
import json, logging, sys, tempfile
from pathlib import Path
import numpy as np
import torch
from cdi.data.collection import ImageCollection
from cdi.models import load_model
from cdi.engine.speed import synthetic_images
from cdi.features.extract import extract_features
from cdi.features.registry import resolve_features

model, dtype, batch, fraction = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
adapter = load_model(model, device="cuda", dtype=dtype)
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("cdi").addHandler(handler)
with tempfile.TemporaryDirectory() as tmp:
    images = ImageCollection.from_folder(synthetic_images(Path(tmp) / "images", batch, adapter.resolution,
                                                          adapter.image_channels))
    torch.cuda.set_per_process_memory_fraction(fraction)
    capped = extract_features(adapter, images, resolve_features("gradient_masking"), batch_size=batch,
                              num_workers=0, progress=False)
    torch.cuda.set_per_process_memory_fraction(1.0)
    final = capped.meta["extraction"]["final_batch_size"]
    free = extract_features(adapter, images, resolve_features("gradient_masking"), batch_size=final,
                            num_workers=0, progress=False)
diff = np.abs(capped.values - free.values).max() / max(1e-12, np.abs(free.values).max())
print(json.dumps({"memory_fraction": fraction, "batch_size": batch, "final_batch_size": final,
                  "halvings": [w for w in warnings if "out of GPU memory" in w],
                  "max_relative_difference_to_uncapped": float(diff)}))
"""


def _run(command: list[str], timeout: float) -> tuple[int, str, str, float]:
    """Run a step; returns (exit code, stdout, stderr, seconds); a step past ``timeout`` is killed (code 124)."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        code, out, err = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = 124, exc.stdout or "", f"timed out after {timeout:.0f} s"
        out = out.decode() if isinstance(out, bytes) else out
    return code, out, err, time.perf_counter() - start


def _speed_step(model: Path, features: str, args, extra: list[str], out: Path, name: str) -> dict:
    command = [sys.executable, "-m", "cdi.cli.main", "speed", "--model", str(model), "--features", features,
               "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
               "--images", str(args.images), "--format", "json", *extra]
    code, stdout, stderr, seconds = _run(command, args.step_timeout)
    if code != 0:
        return {"ok": False, "exit_code": code, "error": stderr[-2000:], "seconds": seconds}
    (out / f"speed_{name}.json").write_text(stdout)
    report = json.loads(stdout)
    print(f"{name}: {report['images_per_second']:.3f} images/s, efficiency {report['efficiency']:.3f}, "
          f"calls {report['calls_per_image']}, batch {report['batch_size']}, "
          f"peak device memory {report['peak_memory_bytes']['device']}", flush=True)
    keep = ("images_per_second", "efficiency", "calls_per_image", "batch_size", "peak_memory_bytes",
            "roofline", "measured_seconds", "roofline_seconds", "families", "shared_calls")
    return {"ok": True, "seconds": seconds, **{k: report.get(k) for k in keep}}


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
    parser.add_argument("--oom-batch", type=int, default=32, help="Gradient Masking batch of the halving check.")
    parser.add_argument("--oom-fraction", type=float, default=0.06,
                        help="Share of the GPU's memory the halving check may use (0.06 of 139 GiB: 8 GiB).")
    parser.add_argument("--step-timeout", type=float, default=None,
                        help="Seconds allowed per step (default 150 on CUDA, 1800 with --tiny).")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: 64 px, 2 images, batch 2, float32, on the CPU.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.images, args.batch_size, args.device, args.dtype = 64, 2, "2", "cpu", "float32"
    if args.step_timeout is None:
        args.step_timeout = 1800 if args.tiny else 150

    started = time.perf_counter()
    out = Path(args.out)
    model = out / "model"
    built = _built_resolution(model)
    if built is None:
        print(f"building SD 1.5-architecture pipeline ({args.resolution} px, random weights) in {model}", flush=True)
        build_sd15_random(model, args.resolution)
    elif built != args.resolution:
        raise SystemExit(f"{model} holds a {built} px pipeline; use another --out for {args.resolution} px")
    report: dict = {"resolution": args.resolution, "device": args.device, "dtype": args.dtype,
                    "images": args.images, "batch_size": args.batch_size,
                    "build_seconds": time.perf_counter() - started, "speed": {}}
    for features in args.features.split(","):
        name = features.replace("+", "_")
        report["speed"][name] = _speed_step(model, features, args, [], out, name)
    cuda = args.device.startswith("cuda")
    if cuda:
        report["speed"]["cdi_compiled"] = _speed_step(model, "cdi", args, ["--compile"], out, "cdi_compiled")
        code, stdout, stderr, seconds = _run(
            [sys.executable, "-c", OOM_CHILD, str(model), args.dtype, str(args.oom_batch), str(args.oom_fraction)],
            args.step_timeout,
        )
        report["oom_halving"] = ({"ok": True, "seconds": seconds, **json.loads(stdout.strip().splitlines()[-1])}
                                 if code == 0 else {"ok": False, "exit_code": code, "error": stderr[-2000:]})
        print(f"out-of-memory halving: {report['oom_halving']}", flush=True)
    else:
        report["speed"]["cdi_compiled"] = {"ok": False, "skipped": "needs CUDA"}
        report["oom_halving"] = {"ok": False, "skipped": "needs CUDA"}
    report["total_seconds"] = time.perf_counter() - started
    path = out / "sd15_random_speed.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} ({report['total_seconds']:.0f} s)", flush=True)
    failed = [k for k, v in report["speed"].items() if not v.get("ok") and "skipped" not in v]
    return 1 if failed or (cuda and not report["oom_halving"].get("ok")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
