"""What a result records about the machine it ran on, and what `cdi env` prints."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys

import torch

from cdi import __version__


def environment_report() -> dict:
    """Versions, devices and dtypes: what a bug report needs."""
    packages = {}
    for name in ["torch", "diffusers", "transformers", "huggingface_hub", "safetensors", "numpy",
                 "scipy", "scikit-learn", "xgboost", "pillow", "typer", "rich", "jinja2", "matplotlib"]:
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = None
    devices = ["cpu"]
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                         "capability": f"{props.major}.{props.minor}"})
            devices.append(f"cuda:{i}")
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if mps:
        devices.append("mps")
    dtypes = ["float32", "bfloat16"]
    if cuda or mps:
        dtypes.append("float16")
    return {
        "cdi": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "devices": devices,
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "dtypes": dtypes,
    }
