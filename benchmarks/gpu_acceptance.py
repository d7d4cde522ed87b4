"""GPU acceptance of the current model families: memory planned against measured, speed, one JSON, < 8 minutes.

Builds SD 1.5, SDXL, SD 3.5 Medium and FLUX.1-dev-shaped pipelines from their
published configurations (``cdi.engine.memory_plan.PUBLISHED``: the numbers of
each component's config.json, written out in code) with random weights (no
download; speed and memory do not depend on the weights) and the local
character-level tokenizers of ``cdi.models.tiny`` / ``tiny_flow``, saves each
as a diffusers folder, loads it with ``load_model`` at bfloat16 and runs
``cdi speed``'s measurement (``cdi.engine.speed.measure_speed``: a 16-image
extraction of the model's default feature set at ``--batch-size auto`` after a
warm-up, and the roofline). Per model it writes:

* ``measured_peak_bytes``: ``torch.cuda.max_memory_allocated`` over the timed
  extraction (weights on the device + activations; the CUDA context is not
  in it), and the host's peak RSS;
* ``planned_peak_bytes``: the planner's device peak of the same folder, dtype,
  features and the batch size the extraction chose, without the CUDA
  context allowance (``CUDA_OVERHEAD``), and ``planned_over_measured``;
* ``images_per_second``, ``efficiency`` (roofline / measured), ``batch_size``;
* for a reduced model, ``full_model_plan``: the planner's figures for the
  published (full-size) model, which the run could not hold in 8 minutes.

FLUX.1-dev is built with 2 double and 4 single blocks (of 19 and 38) and its
T5-XXL with 4 of 24 layers, everything else at the published widths; the
planner scales it back to the full model. SD 3.5 Medium's T5 likewise keeps 4
layers. ::

    python benchmarks/gpu_acceptance.py --out gpu_acceptance.json

On a machine without a GPU, ``--tiny`` runs the same steps on the tiny test
pipelines (``cdi.models.tiny``, ``tiny_flow``) on the CPU in float32, to check
the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

#: Reduced depths of the two 12B/2.5B-class models (full depth: FLUX 19 + 38 blocks, T5-XXL 24 layers).
FLUX_BLOCKS = {"num_layers": 2, "num_single_layers": 4}
T5_LAYERS = 4
MODELS = ("sd15", "sdxl", "sd35-medium", "flux-dev")


def _scheduler(family: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if family == "sd":
        return DDIMScheduler(**betas, clip_sample=False)
    if family == "sdxl":
        return EulerDiscreteScheduler(**betas)
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)


def reduced_spec(alias: str):
    """The published spec of ``alias`` with FLUX's blocks and T5's layers cut to the depths above."""
    import dataclasses

    from cdi.engine.memory_plan import PUBLISHED

    spec = PUBLISHED[alias]
    components = {}
    for name, (cls, config) in spec.components.items():
        if cls == "FluxTransformer2DModel":
            config = {**config, **FLUX_BLOCKS}
        if cls == "T5EncoderModel":
            config = {**config, "num_layers": T5_LAYERS}
        components[name] = (cls, config)
    return dataclasses.replace(spec, components=components, source=spec.source + " (reduced depth)")


def build_published(alias: str, folder: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """Save a random-weight pipeline of ``reduced_spec(alias)`` to ``folder``; returns it."""
    import diffusers
    import transformers

    from cdi.models.tiny import build_char_clip_tokenizer
    from cdi.models.tiny_flow import build_char_t5_tokenizer

    spec = reduced_spec(alias)
    torch.manual_seed(0)
    parts = {}
    for name, (cls_name, config) in spec.components.items():
        component_dtype = torch.float32 if name == "vae" else dtype
        with torch.device(device):
            if hasattr(diffusers, cls_name):
                module = getattr(diffusers, cls_name).from_config(dict(config))
            else:
                cls = getattr(transformers, cls_name)
                module = cls(cls.config_class(**dict(config)))
        parts[name] = module.to(component_dtype)
        if name.startswith("text_encoder"):
            length = spec.text_lengths[name]
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            parts[tokenizer_name] = build_char_t5_tokenizer(length) if cls_name == "T5EncoderModel" \
                else build_char_clip_tokenizer(length)
    parts["scheduler"] = _scheduler(spec.family)
    pipeline_cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[spec.family]
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if spec.family == "sd" else {}
    getattr(diffusers, pipeline_cls)(**parts, **extra).save_pretrained(folder)
    return folder


def build_tiny(alias: str, folder: Path) -> Path:
    from cdi.models import tiny, tiny_flow

    builders = {"sd15": tiny.save_tiny_sd, "sdxl": tiny.save_tiny_sdxl, "sd35-medium": tiny_flow.save_tiny_sd3,
                "flux-dev": tiny_flow.save_tiny_flux}
    return builders[alias](folder)


def measure(alias: str, folder: Path, device: str, dtype: str, images: int) -> dict:
    """``cdi speed``'s measurement of the folder, with the planner's prediction beside it."""
    from cdi.engine.memory_plan import CUDA_OVERHEAD, PUBLISHED, plan_memory, spec_from_folder
    from cdi.engine.speed import measure_speed
    from cdi.features.registry import default_feature_set, resolve_features
    from cdi.models import load_model

    adapter = load_model(str(folder), device=device, dtype=dtype)
    families = resolve_features(default_feature_set(adapter))
    names = [f.name for f in families]
    report = measure_speed(adapter, families, images=images, batch_size="auto")
    batch = int(report["batch_size"])
    captions = 1 + (3 if "clid" in names else 0)
    plan = plan_memory(spec_from_folder(folder), model=alias, dtype=adapter.dtype, device=str(adapter.device),
                       features=names, batch_size=batch, images=images, captions_per_image=captions)
    overhead = CUDA_OVERHEAD if adapter.device.type == "cuda" else 0
    planned = plan.peak - overhead  # the timed extraction encodes its captions too: both phases are in it
    measured = report["peak_memory_bytes"]["device"]
    row = {
        "model": alias, "device": report["device"], "dtype": report["dtype"], "features": names,
        "batch_size": batch, "images": report["images"], "images_per_second": report["images_per_second"],
        "efficiency": report["efficiency"], "measured_peak_bytes": measured,
        "host_peak_rss_bytes": report["peak_memory_bytes"]["host"], "planned_peak_bytes": planned,
        "planned_over_measured": None if not measured else planned / measured,
        "plan": plan.as_dict(), "gradient_checkpointing": adapter.gradient_checkpointing,
    }
    if alias in ("flux-dev", "sd35-medium") and adapter.device.type == "cuda":
        full = plan_memory(PUBLISHED[alias], model=alias, dtype=adapter.dtype, device=str(adapter.device),
                           features=names, batch_size=batch, images=images, captions_per_image=captions,
                           device_memory=torch.cuda.get_device_properties(adapter.device).total_memory)
        row["full_model_plan"] = {"peak_bytes": full.peak, "fits": full.fits, "weights": full.weights,
                                  "denoiser_backward_per_sample": full.denoiser_backward_per_sample}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="the tiny test pipelines on the CPU (checks the script)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--work", default=None, help="folder for the built pipelines (default: a temporary one)")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    dtype = "float32" if args.tiny else "bfloat16"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --tiny to check the script on the CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cdi-gpu-acceptance-", dir=args.work) as tmp:
        for alias in args.models.split(","):
            t0 = time.perf_counter()
            folder = Path(tmp) / alias
            if args.tiny:
                build_tiny(alias, folder)
            else:
                build_published(alias, folder, torch.device(device), torch.bfloat16)
                torch.cuda.empty_cache()
            built = time.perf_counter() - t0
            row = measure(alias, folder, device, dtype, args.images)
            row.update(build_seconds=built, seconds=time.perf_counter() - t0)
            rows.append(row)
            print(f"{alias}: {row['images_per_second']:.3g} img/s, efficiency {row['efficiency']:.2f}, peak "
                  f"{(row['measured_peak_bytes'] or 0) / 2**30:.2f} GiB measured, "
                  f"{row['planned_peak_bytes'] / 2**30:.2f} GiB planned, {row['seconds']:.0f} s", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    payload = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tiny": args.tiny,
               "reduced_depths": {"flux_transformer": FLUX_BLOCKS, "t5_layers": T5_LAYERS},
               "seconds": time.perf_counter() - started, "models": rows,
               "command": " ".join(["python", "benchmarks/gpu_acceptance.py", *(argv or sys.argv[1:])])}
    Path(args.out).write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
