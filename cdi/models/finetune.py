"""What people actually share on top of a base model: LoRAs, replaced components, single-file checkpoints.

``cdi.models.load_model`` calls these after (or instead of) loading a
diffusers pipeline folder; each part is recorded in the adapter's
``provenance`` (see ``combined_fingerprint``), so a result says "base model
X + this LoRA file at this scale", not just "some weights".

* **LoRA** (``--lora FILE_OR_DIR``, ``--lora-scale``): loaded through
  diffusers' own ``load_lora_weights`` of the family's pipeline class
  (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``), which reads
  the diffusers/peft format and converts the community formats (kohya-ss
  ``lora_unet_...``/``lora_te_...`` keys with ``.alpha``, A1111/Civitai
  files) itself; peft is the backend it needs. Each LoRA is then fused into
  the weights at its scale (``fuse_lora(lora_scale=s)``: ``W <- W + s *
  (alpha / r) * B @ A``) and its layers removed (``unload_lora_weights``),
  so the network runs at the base model's speed and several LoRAs add up.
* **Replaced components** (``--unet DIR``, ``--component NAME=DIR``): a
  fine-tune that ships only its denoiser (or VAE, text encoder) is loaded
  from ``DIR`` (the component folder, or a pipeline folder holding
  ``NAME/``) in place of the base's.
* **Single-file checkpoints** (``--model file.safetensors``, ``.ckpt`` only
  with ``--allow-pickle``): the original (CompVis/SGM/A1111) key layout,
  converted by the pipeline class's ``from_single_file`` with the
  configuration read offline from a local diffusers folder (``--config``
  names it, or a hub id / alias already in the Hugging Face cache; without
  ``--config`` diffusers' guess from the checkpoint's keys, looked up in the
  cache). The pipeline-level ``from_single_file`` exists on
  ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``;
  ``DiffusionPipeline`` has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from cdi.utils.errors import CDIError
from cdi.utils.io import sha256_file

#: family -> diffusers pipeline class whose loader mixins read LoRAs and single files.
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: File names diffusers and the community give a LoRA inside a folder, in the order they are looked for.
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to fuse: its weight file and scale."""

    path: Path
    scale: float = 1.0


def parse_loras(paths: Sequence[str] | None, scales: Sequence[float] | None, *, allow_pickle: bool = False
                ) -> list[LoraSpec]:
    """``--lora`` and ``--lora-scale`` as LoRA specs, checked before any model loads.

    One scale for all LoRAs, or one per LoRA in order; default 1.0. A folder
    must hold ``pytorch_lora_weights.safetensors`` (diffusers' name) or
    exactly one ``.safetensors`` file.
    """
    paths = list(paths or [])
    scales = [float(s) for s in (scales or [])]
    if scales and not paths:
        raise CDIError("--lora-scale was given without --lora; name the LoRA file(s) with --lora")
    if len(scales) > 1 and len(scales) != len(paths):
        raise CDIError(f"{len(paths)} --lora but {len(scales)} --lora-scale; give one scale for all LoRAs "
                       "or one per LoRA, in the same order")
    if paths and importlib.util.find_spec("peft") is None:
        raise CDIError("--lora needs the peft package (diffusers loads LoRAs through it); install it with "
                       "`pip install 'cdi[lora]'` or `pip install peft`")
    if not scales:
        scales = [1.0]
    if len(scales) == 1:
        scales = scales * len(paths)
    specs = []
    for text, scale in zip(paths, scales):
        if not (scale == scale and abs(scale) < 1e6):
            raise CDIError(f"--lora-scale {scale} is not a usable number")
        path = _lora_file(Path(text).expanduser(), allow_pickle)
        if path.suffix.lower() == ".safetensors":
            refuse_dora(path, _safetensors_keys(path))
        specs.append(LoraSpec(path, scale))
    return specs


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 -- a damaged header raises several types
        raise CDIError(f"cannot read the LoRA {path} ({type(exc).__name__}: {exc}); is it a safetensors file?") from None


def _lora_file(path: Path, allow_pickle: bool) -> Path:
    if path.is_dir():
        for name in LORA_FILE_NAMES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise CDIError(f"--lora {path} is a folder without pytorch_lora_weights.safetensors and with "
                               f"{len(found)} .safetensors files; name the LoRA file itself")
            path = found[0]
    if not path.is_file():
        raise CDIError(f"--lora {path} does not exist; give a LoRA weight file (.safetensors) or its folder")
    if path.suffix.lower() != ".safetensors" and not allow_pickle:
        raise CDIError(f"--lora {path} is a pickle file, which can run arbitrary code when loaded; pass "
                       "--allow-pickle if you trust it, or convert it to safetensors")
    return path.resolve()


def parse_components(overrides: Sequence[str] | None, unet: str | None = None) -> dict[str, Path]:
    """``--component NAME=DIR`` (repeatable) and ``--unet DIR`` as {component: folder}, checked early."""
    out: dict[str, Path] = {}
    items = [("unet", unet)] if unet else []
    for text in overrides or []:
        name, sep, folder = str(text).partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise CDIError(f"--component {text!r} must look like NAME=FOLDER, e.g. unet=./my-finetune/unet")
        items.append((name.strip(), folder.strip()))
    for name, folder in items:
        if name in out:
            raise CDIError(f"component {name!r} is replaced twice; give it once")
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise CDIError(f"the folder for component {name!r}, {folder}, does not exist")
        out[name] = path.resolve()
    return out


def loading_options(lora: Sequence[str] | None, lora_scale: Sequence[float] | None, unet: str | None,
                    component: Sequence[str] | None, config: str | None, *, allow_pickle: bool = False) -> dict:
    """The ``load_model`` keywords of ``--lora``, ``--lora-scale``, ``--unet``, ``--component``, ``--config``.

    Everything is checked here, before any model loads.
    """
    return {"loras": parse_loras(lora, lora_scale, allow_pickle=allow_pickle),
            "components": parse_components(component, unet), "config": config}


def is_single_file(name: str | os.PathLike) -> bool:
    """True if ``name`` is an existing file with a checkpoint suffix (``.safetensors``, ``.ckpt``, ...)."""
    path = Path(name).expanduser()
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


# ------------------------------------------------------------------- LoRA
def fuse_loras(family: str, components: Mapping[str, Any], loras: Sequence[LoraSpec]) -> list[dict]:
    """Fuse each LoRA into ``components`` (in place) at its scale; returns their provenance records.

    diffusers decides which component each key belongs to (UNet, text
    encoder(s)) and converts community key layouts; a file it cannot read
    is a ``CDIError`` naming the file. A LoRA is applied completely or not
    at all: every weight tensor of the file must reach a LoRA layer and every
    LoRA layer must be merged into a base weight (``_check_lora_complete``),
    since diffusers only logs the keys it drops (``logger.warning`` in
    ``diffusers.utils.peft_utils``, and for kohya DoRA files in
    ``diffusers.loaders.lora_pipeline``). The record counts the file's
    tensors and the base weights the LoRA changed.
    """
    if not loras:
        return []
    pipe = _pipeline(family, components, "--lora")
    records = []
    for i, lora in enumerate(loras):
        name = f"cdi_lora_{i}"
        tensors = read_lora_tensors(lora.path)
        refuse_dora(lora.path, tensors)
        try:
            with warnings.catch_warnings(record=True) as caught, _diffusers_log() as logged:
                warnings.simplefilter("always")
                pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=name,
                                       local_files_only=True)
            _check_all_layers_loaded(lora.path, caught)
            layers = _lora_layers(components, name)
            _check_lora_complete(lora.path, tensors, layers, name, logged)
            pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
            fused = sum(1 for layer in layers.values() if name in getattr(layer, "merged_adapters", ()))
            if fused != len(layers):
                raise CDIError(f"only {fused} of the {len(layers)} layers of the LoRA {lora.path} were merged "
                               "into the model's weights; the audited model would differ from the shared one")
            pipe.unload_lora_weights()
        except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
            raise CDIError(f"cannot apply the LoRA {lora.path} ({type(exc).__name__}: {exc}); check that it was "
                           f"made for this model's architecture ({family})") from None
        records.append({"file": str(lora.path), "sha256": sha256_file(lora.path), "scale": lora.scale,
                        "tensors": len(tensors), "weights_changed": fused})
    return records


#: Key fragments of weight-decomposed (DoRA) LoRAs: kohya's ``dora_scale``, peft's ``lora_magnitude_vector``.
DORA_KEYS = ("dora_scale", "lora_magnitude_vector")


def read_lora_tensors(path: Path) -> dict[str, Any]:
    """The tensors of a LoRA file (safetensors, or a pickle already allowed by ``parse_loras``), on the CPU."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return dict(torch.load(str(path), map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 -- a damaged file raises many types
        raise CDIError(f"cannot read the LoRA {path} ({type(exc).__name__}: {exc}); is the file complete?") from None


def refuse_dora(path: Path, keys: Iterable[str]) -> None:
    """Refuse a DoRA file: diffusers drops its magnitude vectors for SD/SDXL (``dora_scale`` keys).

    Fusing such a file without them gives a model that was never trained, so
    the audit stops here, before any model loads, naming the keys.
    """
    dora = sorted(k for k in keys if any(part in k for part in DORA_KEYS))
    if dora:
        raise CDIError(
            f"the LoRA {path} is a DoRA (weight-decomposed LoRA): {len(dora)} magnitude keys ({_names(dora)}) "
            "that diffusers drops when it loads a LoRA into Stable Diffusion / SDXL, so the fused model would "
            "not be the one that was trained. cdi refuses DoRA files; audit a model with the DoRA merged into "
            "its weights (--unet or a single-file checkpoint) instead")


def _names(keys: Sequence[str], shown: int = 8) -> str:
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


@contextlib.contextmanager
def _diffusers_log() -> Iterator[list[str]]:
    """Collect what diffusers logs at WARNING while loading a LoRA (it reports dropped keys there)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _lora_layers(components: Mapping[str, Any], adapter_name: str) -> dict[str, Any]:
    """The peft LoRA layers holding adapter ``adapter_name``, by ``component.module`` name."""
    layers = {}
    for component, model in components.items():
        if not hasattr(model, "named_modules"):
            continue
        for module_name, module in model.named_modules():
            a = getattr(module, "lora_A", None)
            if a is not None and hasattr(a, "keys") and adapter_name in a.keys():
                layers[f"{component}.{module_name}"] = module
    return layers


def _fingerprint(tensor, dtype) -> tuple[int, bytes]:
    """Equal for a file tensor and the LoRA parameter made from it (cast to its dtype, any shape)."""
    flat = tensor.detach().to("cpu", dtype).float().flatten()
    return int(flat.numel()), hashlib.sha256(flat.numpy().tobytes()).digest() if flat.numel() else b""


def _check_lora_complete(path: Path, tensors: Mapping[str, Any], layers: Mapping[str, Any], adapter_name: str,
                         logged: Sequence[str]) -> None:
    """Every weight tensor of the file reached a LoRA layer, or ``CDIError`` naming the ones that did not.

    Each matrix (rank > 0 tensors: down/up, A/B) of the file is matched by
    value to a parameter of the loaded LoRA layers (diffusers renames keys
    across formats but copies values; the file tensor is cast to the
    parameter's dtype first, as loading does), counting repeats, so two
    identical matrices need two parameters. Scalars (kohya's ``alpha``) are
    read into the layers' scaling and are not matched. A file tensor with no
    parameter is a key diffusers left unused (a block the model does not
    have, a misspelt layer): the audited model would not be the shared one.
    """
    import torch

    params = [p for layer in layers.values() for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
              if (holder := getattr(layer, attr, None)) is not None and adapter_name in holder.keys()
              for p in ([holder[adapter_name]] if isinstance(holder[adapter_name], torch.Tensor)
                        else holder[adapter_name].parameters())]
    available: dict[tuple, int] = {}
    dtypes = sorted({p.dtype for p in params}, key=str) or [torch.float32]
    for p in params:
        key = (p.dtype, *_fingerprint(p, p.dtype))
        available[key] = available.get(key, 0) + 1
    unused = []
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dim() == 0 or tensor.numel() == 1:
            continue
        for dtype in dtypes:
            key = (dtype, *_fingerprint(tensor, dtype))
            if available.get(key, 0) > 0:
                available[key] -= 1
                break
        else:
            unused.append(name)
    if unused:
        said = [m for m in logged if "unexpected" in m.lower() or "missing" in m.lower() or "dora" in m.lower()]
        why = f" diffusers said: {said[0][:300]}" if said else ""
        raise CDIError(
            f"{len(unused)} of the {len(tensors)} tensors of the LoRA {path} changed no weight of the model: "
            f"{_names(unused)}.{why} The audited model would differ from the shared one; check that the LoRA "
            "was made for this base model, or remove the stray keys")


def _check_all_layers_loaded(path: Path, caught: list) -> None:
    """Refuse a LoRA of which diffusers/peft left layers out: the audited model would not be the shared one.

    peft only warns when the adapter config names modules whose weights it did not find (for example a file
    mixing diffusers' ``lora.down`` and peft's ``lora_A`` spellings, which diffusers 0.42.1 half-converts).
    """
    for warning in caught:
        text = str(warning.message)
        if "additional target modules" in text or "unexpected keys" in text.lower():
            raise CDIError(f"diffusers could not apply every layer of the LoRA {path} ({text[:300]}...); the "
                           "audited model would differ from the shared one. Re-save the LoRA in one key format "
                           "(peft's lora_A/lora_B or kohya's lora_down/lora_up)")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _pipeline(family: str, components: Mapping[str, Any], option: str):
    """A pipeline object around the loaded components, for diffusers' loader mixins (no copy is made)."""
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[_supported(family, option)])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if family == "sd" else {}
    return cls(**components, **extra)


def _supported(family: str, option: str) -> str:
    if family not in PIPELINE_CLASSES:
        raise CDIError(f"{option} is supported for Stable Diffusion 1.x/2.x and SDXL models, not for the "
                       f"{family!r} family")
    return family


# ------------------------------------------------------------ fingerprint
def combined_fingerprint(base_fingerprint: str, provenance: Mapping[str, Any]) -> str:
    """The model's fingerprint when parts were added: SHA-256 over the base's and each part's hash and scale.

    Equal to ``base_fingerprint`` when nothing was added, so plain models keep their fingerprint.
    """
    parts = {k: provenance[k] for k in ("loras", "replaced_components", "single_file") if provenance.get(k)}
    if not parts:
        return base_fingerprint
    payload = {"base": base_fingerprint, **{k: _hashes_only(v) for k, v in parts.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _hashes_only(value: Any) -> Any:
    """Drop local paths (two copies of the same file give the same fingerprint) and the LoRA check's counts."""
    if isinstance(value, list):
        return [_hashes_only(v) for v in value]
    if isinstance(value, dict):
        return {k: _hashes_only(v) for k, v in value.items()
                if k not in ("file", "path", "folder", "tensors", "weights_changed")}
    return value


# ------------------------------------------------------------ single file
def resolve_single_file_config(checkpoint: Path, config: str | None, *, offline: bool) -> Path:
    """The local diffusers folder whose configs describe ``checkpoint`` (never downloads weights).

    ``config``: a local pipeline folder, or an alias / hub id whose configs
    are in the Hugging Face cache (downloaded, configs and tokenizers only,
    when not offline). None: diffusers' guess from the checkpoint's keys
    (``fetch_diffusers_config``), looked up the same way.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from cdi.models.registry import ALIASES

    if config is None:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        config = fetch_diffusers_config(_read_checkpoint(checkpoint))["pretrained_model_name_or_path"]
        guessed = True
    else:
        guessed = False
    path = Path(config).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CDIError(f"--config {config} has no model_index.json; give the folder of a diffusers pipeline "
                           "of the same architecture (its configs are used, not its weights)")
        return path.resolve()
    hub_id = ALIASES[config].checkpoint if config in ALIASES else config
    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*.json"]
    try:
        try:
            folder = Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=True))
        except LocalEntryNotFoundError:
            if offline:
                raise
            folder = Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=False))
    except Exception as exc:  # noqa: BLE001 -- any hub failure becomes one message
        how = "guessed from the checkpoint's keys" if guessed else "named by --config"
        raise CDIError(
            f"the configuration of the single-file checkpoint {checkpoint.name} ({how}: {hub_id!r}) is not "
            f"available offline ({type(exc).__name__}); pass --config FOLDER, a local diffusers pipeline folder "
            f"of the same architecture (e.g. the base model the checkpoint was fine-tuned from), or fetch the "
            f"configs on a connected machine with `hf download {hub_id} --include '*.json' '*.txt'`"
        ) from None
    if not (folder / "model_index.json").is_file():
        raise CDIError(f"{hub_id!r} has no model_index.json in the cache; pass --config with a local pipeline folder")
    return folder


def _read_checkpoint(path: Path) -> dict:
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        return load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CDIError(f"cannot read the checkpoint {path} ({type(exc).__name__}: {exc}); is the file complete?") from None


def load_single_file(checkpoint: Path, config_folder: Path, family: str, *, dtype, allow_pickle: bool
                     ) -> dict[str, Any]:
    """The pipeline components of a single-file checkpoint, converted by ``from_single_file`` offline."""
    import diffusers

    checkpoint = Path(checkpoint)
    if checkpoint.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise CDIError(f"{checkpoint.name} is a pickle checkpoint, which can run arbitrary code when loaded; pass "
                       "--allow-pickle if you trust its source, or use a .safetensors checkpoint")
    cls = getattr(diffusers, PIPELINE_CLASSES[_supported(family, "a single-file checkpoint")])
    kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if family == "sd" else {}
    try:
        pipe = cls.from_single_file(str(checkpoint), config=str(config_folder), local_files_only=True,
                                    torch_dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- diffusers raises many types here
        raise CDIError(
            f"cannot load the single-file checkpoint {checkpoint.name} with the configuration of {config_folder} "
            f"({type(exc).__name__}: {exc}); check that --config names a pipeline of the checkpoint's architecture"
        ) from None
    return dict(pipe.components)
