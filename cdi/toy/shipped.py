"""The toy models' shipped weights: where they live, and writing and reading them.

One folder per kind and strength under ``cdi/toy/weights/`` holds a ``<component>.safetensors`` per
component and ``training.json`` (the training settings and each file's SHA-256), made by
``python -m cdi.toy train-shipped``. Kept apart from ``cdi.toy.world`` so that ``cdi.toy.flow`` can
read and write weights without importing the world that builds on it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

from cdi.toy.data import current_umask, write_json
from cdi.toy.training import ToyWeights
from cdi.utils.errors import CDIError
from cdi.utils.io import sha256_file

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"


def weights_dir(kind: str, strength: str) -> Path:
    """Where the shipped weights of a toy model live (``cdi/toy/weights/<kind>-<strength>``)."""
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
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        hashes[path.name] = sha256_file(path)
    write_json(folder / "training.json",
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
def no_transformers_progress_bars() -> Iterator[None]:
    """Silence the text encoder's "Writing model shards" bar while saving."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
