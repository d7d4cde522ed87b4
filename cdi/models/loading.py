"""Load a diffusion model (alias, hub id or local folder) into its family adapter.

The loader does the same thing whatever the user names:

1. ``name`` becomes a local diffusers pipeline folder. An existing folder is
   used as it is (``revision`` is then None). An alias of
   ``cdi.models.registry.ALIASES`` becomes its hub id. A hub id is looked up
   in the local Hugging Face cache first; unless offline (``HF_HUB_OFFLINE``
   or ``local_files_only=True``) the files the adapter needs are then
   downloaded, and nothing else: ``model_index.json``, ``labels.json``, the
   configs, the tokenizers and the safetensors weights of the components the
   family uses (those of ``variant`` when one is asked for). The resolved
   commit hash (the snapshot folder's name) becomes ``revision``.
2. ``model_index.json``'s ``_class_name`` names the family
   (``SUPPORTED_PIPELINES``).
3. Every component the adapter class declares in ``components`` (folder
   name -> class) is loaded from that folder with ``local_files_only=True``,
   from safetensors unless ``allow_pickle``: the denoiser and the text
   encoders in the requested dtype, those in ``full_precision_components``
   (the autoencoder) in float32; every module on the device, in eval mode,
   with frozen parameters (an attack that needs parameter gradients calls
   ``adapter.denoiser.requires_grad_(True)``); the denoiser
   (``denoiser_name``) in channels_last memory format on CUDA, keeping
   diffusers' default PyTorch SDPA attention. The adapter is then built from
   the components plus ``extra_inputs(folder, index)``, what the family reads
   from the folder besides them (DiT's class names, DDPM's labels.json).
4. The files that define the model are hashed into the adapter's
   ``fingerprint`` (``fingerprint_weights``).
5. With ``compile=True`` the denoiser is compiled in place with
   ``torch.compile`` (``nn.Module.compile``: same object, same parameters,
   so fingerprints, parameter gradients and store keys are unchanged). The
   first call at each new input shape compiles (about 80 s for the toy SD
   UNet on one CPU thread, which then ran 18% faster: 0.68 vs 0.82 ms per
   sample at batch 64); worth it for long runs only.

Every failure a user can fix (no such model, not cached while offline,
pickle-only weights, an unsupported pipeline, a bad device or dtype) is one
``CDIError`` that says what to do; huggingface_hub's exceptions never escape.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError

from cdi.utils.errors import CDIError
from cdi.utils.io import sha256_file
from cdi.models import finetune
from cdi.models.registry import ALIASES, distillation

if TYPE_CHECKING:  # pragma: no cover
    from cdi.models.base import DiffusionAdapter
    from cdi.models.finetune import LoraSpec

#: model_index.json ``_class_name`` -> family.
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "LDMPipeline": "ldm",
    "DiTPipeline": "dit",
    "DDPMPipeline": "ddpm",
    "DDIMPipeline": "ddpm",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "ZImagePipeline": "zimage",
}

#: family -> "module:class" of its adapter (imported on first use).
ADAPTERS: dict[str, str] = {
    "sd": "cdi.models.stable_diffusion:StableDiffusionAdapter",
    "sdxl": "cdi.models.sdxl:StableDiffusionXLAdapter",
    "ldm": "cdi.models.ldm:LDMAdapter",
    "dit": "cdi.models.dit:DiTAdapter",
    "ddpm": "cdi.models.ddpm:DDPMAdapter",
    "sd3": "cdi.models.sd3:SD3Adapter",
    "flux": "cdi.models.flux:FluxAdapter",
    "zimage": "cdi.models.zimage:ZImageAdapter",
}

#: Weight file stems written by diffusers (models) and transformers (text encoders).
_WEIGHT_STEMS = {"safetensors": ("diffusion_pytorch_model", "model"), "bin": ("diffusion_pytorch_model", "pytorch_model")}
#: Files at the pipeline root the adapters read.
_ROOT_FILES = ("model_index.json", "labels.json")
#: Configuration files read by from_pretrained of models, schedulers and CLIP tokenizers.
_CONFIG_NAMES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.json", "spiece.model",
                 "chat_template.jinja")
_TRUE = {"1", "on", "yes", "true"}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# ----------------------------------------------------------------- devices
def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``: ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda[:i]"``, ``"mps"``.

    Raises ``CDIError`` for a malformed name or a device this machine lacks.
    """
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CDIError(
            f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CDIError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CDIError(
                f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type == "mps":
        if not _mps_available():
            raise CDIError(f"device {name!r} asked for, but MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise CDIError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a CUDA device that supports it (compute capability 8.0 and up), else float32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


#: The dtype each family's checkpoints are released in (used by ``--dtype default`` on CUDA).
RELEASE_DTYPES = {"sd3": torch.bfloat16, "flux": torch.bfloat16, "zimage": torch.bfloat16}


def ray_dtype(dtype: str, device: str) -> str:
    """The dtype name a ``--ray`` run loads with: ``--dtype default`` becomes ``"release"`` unless the
    workers compute on the CPU, so that the driver's CPU copy and the GPU workers hold the same model
    (the workers check the store key, which includes the dtype)."""
    if str(dtype).strip().lower() == "default" and str(device).strip().lower() != "cpu":
        return "release"
    return dtype


def resolve_dtype_for(name: str | torch.dtype, device: torch.device | str, family: str | None) -> torch.dtype:
    """``resolve_dtype``, where ``"default"`` is the release dtype on CUDA and float32 elsewhere.

    On CUDA, SD3/3.5, FLUX.1 and Z-Image (released in bfloat16, whose 12B
    transformers do not fit a GPU in float32 next to their activations) run in
    bfloat16; the UNet families stay float32, the reference. ``--dtype
    float32`` still gives float32 everywhere.
    """
    text = name.strip().lower() if isinstance(name, str) else None
    if text == "default":
        cuda = torch.device(device).type == "cuda"
        name = RELEASE_DTYPES.get(family or "", torch.float32) if cuda else torch.float32
    elif text == "release":  # the release dtype on any device (a --ray driver's CPU copy of GPU workers' model)
        name = RELEASE_DTYPES.get(family or "", torch.float32)
    return resolve_dtype(name, device)


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The compute dtype for ``name`` on ``device``.

    Accepts ``"auto"`` (``auto_dtype``), ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
    ``"float16"``/``"fp16"`` or a ``torch.dtype``. float16 on the CPU is
    refused: many CPU kernels lack it and the rest are slow and inexact.
    """
    if isinstance(name, torch.dtype):
        dtype = name
    elif str(name).strip().lower() in ("default", "release"):  # resolved per family by resolve_dtype_for
        dtype = torch.float32
    elif str(name).strip().lower() == "auto":
        dtype = auto_dtype(device)
    else:
        dtype = _DTYPES.get(str(name).strip().lower())
        if dtype is None:
            raise CDIError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16 (fp32, bf16, fp16)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CDIError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise CDIError("float16 is not supported on the CPU; use --dtype float32 or bfloat16")
    return dtype


# ------------------------------------------------------------- fingerprint
def file_digests(folder: Path, files: list[Path]) -> dict[str, str]:
    """SHA-256 of each file's bytes, keyed by its POSIX path relative to ``folder``, sorted by path.

    The digest of a weight file is the one the Hugging Face Hub shows for it
    (and ``sha256sum`` prints), so a report's file list can be checked by hand.
    """
    folder = Path(folder)
    digests = {}
    for path in files:
        path = Path(path)
        rel = (path if not path.is_absolute() else path.relative_to(folder)).as_posix()
        digests[rel] = sha256_file(folder / rel)
    return dict(sorted(digests.items()))


def fingerprint_weights(folder: Path, files: list[Path]) -> str:
    """One SHA-256 that identifies the model: over (relative path, bytes) of ``files``.

    Computed as the SHA-256 of the lines ``"<relative path>\\0<sha256 of the
    file>\\n"`` in path order, so it changes when any byte, name, or the set
    of files changes, and it does not depend on where the folder lies or on
    the order of ``files``.
    """
    return _combine(file_digests(folder, files))


def _combine(digests: dict[str, str]) -> str:
    lines = "".join(f"{rel}\0{digest}\n" for rel, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# ----------------------------------------------------------------- loading
def load_model(
    name: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str | torch.dtype = "default",
    device: str = "auto",
    allow_pickle: bool = False,
    local_files_only: bool | None = None,
    compile: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    loras: Sequence["LoraSpec"] = (),
    components: Mapping[str, str | os.PathLike] | None = None,
    config: str | None = None,
    guidance_scale: float | None = None,
    timestep_grid: str | None = None,
) -> "DiffusionAdapter":
    """Load a diffusion model into the adapter of its family.

    Parameters
    ----------
    name : str
        An alias (``cdi models`` lists them), a Hugging Face hub id
        (``org/name``) or a local diffusers pipeline folder (one with a
        ``model_index.json``, as ``save_pretrained`` writes it).
    revision : str, optional
        Branch, tag or commit of a hub model (default: ``main``). The adapter
        records the resolved commit hash.
    variant : str, optional
        Weight variant, e.g. ``"fp16"`` (loads ``*.fp16.safetensors``).
    dtype : str or torch.dtype
        Compute dtype of the denoiser and text encoders (see ``resolve_dtype``);
        ``"default"``: the family's release dtype on CUDA, float32 elsewhere
        (``resolve_dtype_for``).
    guidance_scale : float, optional
        FLUX.1-dev's guidance input (``--guidance``; default 1.0, see
        ``cdi.models.flux``); refused for models without one.
    timestep_grid : {"model", "sd15"}, optional
        Which flow sigma each discrete timestep means (``--timestep-grid``;
        ``cdi.models.flow_matching``); flow-matching models only.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda[:i]"`` or ``"mps"``.
    allow_pickle : bool
        Also accept pickle (``.bin``) weights when a component has no
        safetensors. Off by default: unpickling can run arbitrary code.
    local_files_only : bool, optional
        Never touch the network. None (default) follows ``HF_HUB_OFFLINE``.
    compile : bool
        Compile the denoiser with ``torch.compile`` (step 5 above).
    cache_dir : path, optional
        Hugging Face cache folder for hub models (default: ``HF_HUB_CACHE``).
    token : str, optional
        Hugging Face access token for gated or private hub models (default:
        ``HF_TOKEN`` or the stored login).
    loras : sequence of LoraSpec
        LoRAs fused into the weights, in order (``cdi.models.finetune.parse_loras``).
    components : mapping, optional
        Component name -> folder: load these components from there instead
        of from the base (``--unet``, ``--component``).
    config : str, optional
        For a single-file checkpoint (``name`` is a ``.safetensors`` /
        ``.ckpt`` file): the local pipeline folder, alias or cached hub id
        whose configs describe it (``cdi.models.finetune``).

    Returns
    -------
    DiffusionAdapter
        With ``fingerprint`` set and ``files``: {relative path: SHA-256} of
        every file that defines the model (weights actually loaded, component
        configs, scheduler and tokenizer files, model_index.json, labels.json).
        Configs are included because they change the model's outputs too
        (prediction type, noise schedule, latent scaling).
    """
    name = os.fspath(name)
    torch_device = resolve_device(device)
    resolve_dtype(dtype, torch_device)  # a bad name fails before any file is read
    if compile:
        check_compile_supported(torch_device)
    offline = _offline(local_files_only)
    overrides = {k: Path(v) for k, v in (components or {}).items()}
    checkpoint = Path(name).expanduser().resolve() if finetune.is_single_file(name) else None
    if checkpoint is not None:
        if revision is not None:
            raise CDIError("--revision applies to hub models, but --model is a local checkpoint file; drop --revision")
        folder = finetune.resolve_single_file_config(checkpoint, config, offline=offline)
        model_id, resolved_revision, hub_id = str(checkpoint), None, None
    elif config is not None:
        raise CDIError("--config applies to single-file checkpoints (--model FILE.safetensors); drop it")
    else:
        folder, model_id, resolved_revision, hub_id = _resolve_folder(
            name, revision=revision, variant=variant, allow_pickle=allow_pickle, offline=offline,
            hub={"cache_dir": cache_dir, "token": token},
        )
    index = read_model_index(folder)
    family = detect_family(index, folder)
    torch_dtype = resolve_dtype_for(dtype, torch_device, family)
    adapter_cls = adapter_class(family)
    _check_components(adapter_cls, index, folder)
    unknown = sorted(set(overrides) - set(adapter_cls.components))
    if unknown:
        raise CDIError(f"a {index.get('_class_name')} has no component(s) {', '.join(unknown)} to replace; "
                       f"its components: {', '.join(adapter_cls.components)}")
    files: list[Path] = [folder / f for f in _ROOT_FILES if (folder / f).is_file()]
    provenance: dict[str, Any] = {}
    converted = None
    if checkpoint is not None:
        converted = finetune.load_single_file(checkpoint, folder, family, dtype=torch_dtype, allow_pickle=allow_pickle)
        provenance["single_file"] = {"path": str(checkpoint), "sha256": sha256_file(checkpoint), "config": str(folder)}
    loaded: dict[str, Any] = {}
    for component, kind in adapter_cls.components.items():
        if _absent_optional(adapter_cls, index, component) and component not in overrides:
            loaded[component] = None
            continue
        source = overrides.get(component, folder)
        dtype_c = torch.float32 if component in adapter_cls.full_precision_components else torch_dtype
        channels_last = component == adapter_cls.denoiser_name and torch_device.type == "cuda"
        # Large text encoders (T5-XXL, Qwen3) of flow models wait in host memory on CUDA: they visit the GPU
        # once to encode the captions (FlowMatchingAdapter.prepare_captions), never beside the denoiser at load.
        component_device = torch.device("cpu") if torch_device.type == "cuda" and \
            component in getattr(adapter_cls, "text_encoder_names", ()) else torch_device
        if converted is not None and component not in overrides:
            module = converted[component]
            if _is_module(kind) and module.dtype != dtype_c:
                module = module.to(dtype_c)
            loaded[component] = _prepare(module, component_device, channels_last) if _is_module(kind) else module
            path = _component_dir(folder, component)
            files.extend(path / n for n in _CONFIG_NAMES if (path / n).is_file())
            continue
        module, used = _load_component(
            source, component, kind, dtype=dtype_c, device=component_device, variant=variant,
            allow_pickle=allow_pickle, hub_id=hub_id if component not in overrides else None,
            channels_last=channels_last,
        )
        loaded[component] = module
        if component in overrides:
            provenance.setdefault("replaced_components", {})[component] = {
                "folder": str(source), "fingerprint": fingerprint_weights(source, used),
                "files": file_digests(source, used),
            }
        else:
            files.extend(used)
    digests = file_digests(folder, files)
    base_fingerprint = _combine(digests)
    provenance["loras"] = finetune.fuse_loras(family, loaded, loras)
    provenance = {k: v for k, v in provenance.items() if v}
    if provenance:
        provenance["base_fingerprint"] = base_fingerprint
    adapter = adapter_cls(
        **loaded,
        **adapter_cls.extra_inputs(folder, index),
        **_flow_inputs(family, loaded, guidance_scale, timestep_grid),
        model_id=model_id,
        revision=resolved_revision,
        fingerprint=finetune.combined_fingerprint(base_fingerprint, provenance),
        device=torch_device,
        dtype=torch_dtype,
    )
    adapter.files = digests
    adapter.provenance = provenance
    if checkpoints_gradients(family, torch_device):
        loaded[adapter_cls.denoiser_name].enable_gradient_checkpointing()
        adapter.gradient_checkpointing = True
    adapter.distillation = distillation(name, _configs_for_distillation(folder, index, adapter_cls))
    if compile:
        loaded[adapter_cls.denoiser_name].compile()
        adapter.compiled = True
    return adapter


def check_compile_supported(device: torch.device) -> None:
    """Raise ``CDIError`` if ``torch.compile`` cannot run here (before any model is loaded)."""
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise CDIError("--compile is not supported by this Python and PyTorch build; run without --compile")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise CDIError("--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH; install one or "
                       "run without --compile")


def adapter_class(family: str) -> type["DiffusionAdapter"]:
    """The adapter class of a family name (``"sd"``, ``"sdxl"``, ``"ldm"``, ``"dit"``, ``"ddpm"``)."""
    try:
        module_name, class_name = ADAPTERS[family].split(":")
    except KeyError:
        raise CDIError(f"unknown model family {family!r}; known: {', '.join(ADAPTERS)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def read_model_index(folder: Path) -> dict:
    """The parsed ``model_index.json`` of a pipeline folder."""
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CDIError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); save the pipeline with "
            "DiffusionPipeline.save_pretrained, or pass a single-file checkpoint (.safetensors) itself as "
            "--model, with --config naming a pipeline folder of its architecture"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CDIError(f"{path} is not valid JSON ({exc}); restore the file from the model's source") from None
    if not isinstance(index, dict):
        raise CDIError(f"{path} holds a JSON {type(index).__name__}, not an object naming the pipeline's "
                       "_class_name and components; restore the file from the model's source")
    return index


def detect_family(index: dict, folder: Path | str = "the model") -> str:
    """The family of a pipeline from its ``model_index.json`` ``_class_name``."""
    class_name = index.get("_class_name")
    if class_name is not None and not isinstance(class_name, str):
        raise CDIError(
            f"model_index.json of {folder}: _class_name must be the pipeline's class name (a string such as "
            f"\"StableDiffusionPipeline\"), got a {type(class_name).__name__} ({json.dumps(class_name)[:80]}); "
            "restore the file from the model's source"
        )
    family = SUPPORTED_PIPELINES.get(class_name)
    if family is None:
        raise CDIError(
            f"{folder} is a {class_name or 'pipeline without _class_name'}, which cdi does not support; "
            f"supported pipelines: {', '.join(SUPPORTED_PIPELINES)}"
        )
    return family


def _offline(local_files_only: bool | None) -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE only when it is imported."""
    if local_files_only is not None:
        return bool(local_files_only)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _resolve_folder(
    name: str, *, revision: str | None, variant: str | None, allow_pickle: bool, offline: bool,
    hub: dict | None = None,
) -> tuple[Path, str, str | None, str | None]:
    """(pipeline folder, model id, resolved revision, hub id or None) for what the user named."""
    path = Path(name).expanduser()
    if path.exists():
        if revision is not None:
            raise CDIError(f"--revision applies to hub models, but {name!r} is a local folder; drop --revision")
        if not path.is_dir():
            raise CDIError(
                f"{name!r} is a file but not a checkpoint (.safetensors, or .ckpt with --allow-pickle); pass a "
                "diffusers pipeline folder, an alias, a hub id or a single-file checkpoint"
            )
        folder = path.resolve()
        return folder, str(folder), None, None
    alias = ALIASES.get(name)
    hub_id = alias.checkpoint if alias is not None else name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
        raise CDIError(
            f"{name!r} is neither a local folder, a model alias nor a Hugging Face hub id (org/name); "
            "`cdi models` lists the aliases"
        )
    folder = _hub_snapshot(hub_id, revision=revision, variant=variant, allow_pickle=allow_pickle, offline=offline,
                           gated=alias is not None and alias.gated, **(hub or {}))
    return folder, hub_id, folder.name, hub_id


# ---------------------------------------------------------------- the hub
def _hub_snapshot(hub_id: str, *, revision: str | None, variant: str | None, allow_pickle: bool, offline: bool,
                  gated: bool = False, cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Path:
    """A local snapshot folder of ``hub_id`` holding every file the adapter needs.

    ``gated``: a known gated checkpoint; without a Hugging Face token, say so
    before trying to download it. ``cache_dir`` and ``token`` go to ``snapshot_download``.
    """
    from huggingface_hub import get_token, snapshot_download

    def fetch(patterns: list[str], local: bool) -> Path:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns, local_files_only=local,
                                      cache_dir=cache_dir, token=token))

    with _hub_errors(hub_id, revision, offline):
        try:
            folder = fetch(["model_index.json"], local=True)
        except LocalEntryNotFoundError:
            if offline:
                raise
            if gated and token is None and get_token() is None:
                raise CDIError(_gated_message(hub_id) + " (no Hugging Face token found)") from None
            folder = fetch(["model_index.json"], local=False)
        adapter_cls = adapter_class(detect_family(read_model_index(folder), hub_id))
        if offline or _is_complete(folder, adapter_cls, variant, allow_pickle):
            return folder
        folder = fetch(_download_patterns(adapter_cls, variant, "safetensors"), local=False)
        if allow_pickle and not _is_complete(folder, adapter_cls, variant, allow_pickle=False):
            folder = fetch(_download_patterns(adapter_cls, variant, "bin"), local=False)
        return folder


def _download_patterns(adapter_cls: type, variant: str | None, extension: str) -> list[str]:
    """allow_patterns for the files the adapter loads: root files, configs, tokenizers, weights."""
    # A single-model pipeline may keep its files at the root (google/ddpm-cifar10-32).
    patterns = [*_ROOT_FILES, "config.json", "scheduler_config.json", *_weight_globs(extension, variant)]
    for component, kind in adapter_cls.components.items():
        if _is_module(kind):
            patterns.append(f"{component}/*.json")
            patterns.extend(f"{component}/{p}" for p in _weight_globs(extension, variant))
        else:
            patterns.append(f"{component}/*")
    return patterns


def _is_complete(folder: Path, adapter_cls: type, variant: str | None, allow_pickle: bool) -> bool:
    index = read_model_index(folder)
    for component, kind in adapter_cls.components.items():
        if _absent_optional(adapter_cls, index, component):
            continue
        path = _component_dir(folder, component)
        if not (path / _config_name(kind)).is_file():
            return False
        if _is_module(kind) and not _find_weights(path, variant, allow_pickle):
            return False
    return True


@contextlib.contextmanager
def _hub_errors(hub_id: str, revision: str | None, offline: bool) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one ``CDIError`` that says what to do."""
    try:
        yield
    except CDIError:
        raise
    except (HFValidationError, OSError) as exc:
        raise CDIError(_hub_error_message(exc, hub_id, revision, offline)) from None


def _gated_message(hub_id: str) -> str:
    return (
        f"model {hub_id!r} is gated: accept its licence on https://huggingface.co/{hub_id} with your Hugging Face "
        "account, then log in with `hf auth login` (or set HF_TOKEN to a read token of that account), "
        "or pass a local pipeline folder"
    )


def _hub_error_message(exc: Exception, hub_id: str, revision: str | None, offline: bool) -> str:
    fetch = (
        f"fetch it on a connected machine with `hf download {hub_id}` (or `huggingface-cli download "
        f"{hub_id}`) and copy the Hugging Face cache (HF_HOME) here, or pass a local pipeline folder"
    )
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, GatedRepoError):
        return _gated_message(hub_id)
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"model {hub_id!r} does not exist on the Hugging Face Hub (or it is private: log in with "
            "`hf auth login`); check the id, or pass a local pipeline folder"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"model {hub_id!r} has no revision {revision!r}; check the branch, tag or commit"
    if isinstance(exc, LocalEntryNotFoundError):
        reason = (
            "downloads are off (HF_HUB_OFFLINE=1 or local_files_only)" if offline
            else "could not be downloaded (no network, or the Hub is unreachable)"
        )
        return f"model {hub_id!r}{at} is not in the local Hugging Face cache and {reason}; {fetch}"
    if isinstance(exc, EntryNotFoundError):
        return f"model {hub_id!r}{at} lacks a file cdi needs ({exc}); check that it is a diffusers pipeline"
    if isinstance(exc, HFValidationError):
        return f"{hub_id!r} is not a valid Hugging Face hub id ({exc})"
    return f"model {hub_id!r}{at} could not be downloaded ({type(exc).__name__}: {exc}); {fetch}"


# ------------------------------------------------------------- components
def _component_dir(folder: Path, component: str) -> Path:
    """The component's subfolder, or the pipeline root when it has none (as diffusers loads it)."""
    path = folder / component
    return path if path.is_dir() else folder


def _is_module(kind: type) -> bool:
    return isinstance(kind, type) and issubclass(kind, torch.nn.Module)


def _config_name(kind: type) -> str:
    """The configuration file every component of this kind has."""
    from diffusers import SchedulerMixin

    if kind is SchedulerMixin:
        return "scheduler_config.json"
    return "config.json" if _is_module(kind) else "tokenizer_config.json"


def _check_components(adapter_cls: type, index: dict, folder: Path) -> None:
    missing = [c for c in adapter_cls.components
               if not (isinstance(index.get(c), list) and index[c][0] is not None)
               and c not in getattr(adapter_cls, "optional_components", ())]
    if missing:
        raise CDIError(
            f"the pipeline in {folder} has no {', '.join(missing)} component(s), which a "
            f"{index.get('_class_name')} needs; check model_index.json"
        )


def _absent_optional(adapter_cls: type, index: dict, component: str) -> bool:
    """True for a component the family can do without (SD3's T5) that model_index.json leaves null."""
    entry = index.get(component)
    return component in getattr(adapter_cls, "optional_components", ()) and not (
        isinstance(entry, list) and entry[0] is not None)


def _weight_globs(extension: str, variant: str | None) -> list[str]:
    """File name globs of one component's weights as diffusers and transformers name them."""
    v = f".{variant}" if variant else ""
    globs = []
    for stem in _WEIGHT_STEMS[extension]:
        globs += [f"{stem}{v}.{extension}", f"{stem}{v}-*-of-*.{extension}", f"{stem}.{extension}.index{v}.json"]
    return globs


def _find_weights(component_dir: Path, variant: str | None, allow_pickle: bool) -> list[Path]:
    """The weight files ``from_pretrained`` will read: safetensors first, then (if allowed) pickle."""
    for extension in ("safetensors", "bin") if allow_pickle else ("safetensors",):
        v = f".{variant}" if variant else ""
        for stem in _WEIGHT_STEMS[extension]:
            index = component_dir / f"{stem}.{extension}.index{v}.json"
            if index.is_file():
                return [index] + [component_dir / s for s in _index_shards(index)]
            single = component_dir / f"{stem}{v}.{extension}"
            if single.is_file():
                return [single]
    return []


def _index_shards(index: Path) -> list[str]:
    """The shard files a ``*.safetensors.index.json`` (or ``.bin`` index) maps the weights to."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CDIError(
            f"the weight index {index} cannot be read ({type(exc).__name__}: {exc}); it must be a JSON object "
            "whose \"weight_map\" maps each parameter to its shard file: fetch the file again"
        ) from None
    bad = [s for s in shards if not isinstance(s, str) or "/" in s or "\\" in s or s.startswith(".")]
    if bad:
        raise CDIError(f"the weight index {index} names shard files outside its folder or not as file names "
                       f"({bad[0]!r}); fetch the file again")
    return shards


def _missing_weights_error(
    component_dir: Path, component: str, variant: str | None, hub_id: str | None, folder: Path
) -> CDIError:
    names = sorted(p.name for p in component_dir.glob("*"))
    where = f"model {hub_id!r}" if hub_id else str(folder)
    if any(n.endswith(".bin") for n in names) and not any(n.endswith(".safetensors") for n in names):
        return CDIError(
            f"{where}: component {component!r} has only pickle weights (.bin), which can run arbitrary code "
            "when loaded; pass --allow-pickle (allow_pickle=True) if you trust the source, or convert them to "
            "safetensors"
        )
    variant_file = r"\w+\.(\w+?)(?:-\d+-of-\d+)?\.(?:safetensors|bin)"
    found = sorted({m.group(1) for n in names if (m := re.fullmatch(variant_file, n))})
    if variant is None and found:
        return CDIError(
            f"{where}: component {component!r} has weights only for the variant(s) {', '.join(found)}; "
            f"pass --variant {found[0]}"
        )
    if variant is not None:
        return CDIError(
            f"{where}: component {component!r} has no weights for variant {variant!r}"
            + (f" (available: {', '.join(found)})" if found else "; drop --variant")
        )
    fetch = f"; fetch it with `hf download {hub_id}` on a connected machine" if hub_id else ""
    return CDIError(f"{where}: component {component!r} has no weight files{fetch}")


def _load_component(
    folder: Path,
    component: str,
    kind: type,
    *,
    dtype: torch.dtype,
    device: torch.device,
    variant: str | None,
    allow_pickle: bool,
    hub_id: str | None,
    channels_last: bool,
) -> tuple[Any, list[Path]]:
    """Load one component; returns it and the files it was loaded from."""
    path = _component_dir(folder, component)
    config_files = [path / n for n in _CONFIG_NAMES if (path / n).is_file()]
    from diffusers import ModelMixin, SchedulerMixin

    if kind is SchedulerMixin:
        return _load_scheduler(path), config_files
    if not _is_module(kind):  # a tokenizer
        try:
            return kind.from_pretrained(path, local_files_only=True), config_files
        except (OSError, ValueError, TypeError) as exc:
            raise CDIError(
                f"cannot load the {component!r} of {hub_id or folder} ({type(exc).__name__}: {exc}); "
                "fetch the tokenizer files again"
            ) from None
    weights = _find_weights(path, variant, allow_pickle)
    if not weights:
        raise _missing_weights_error(path, component, variant, hub_id, folder)
    kwargs = {_dtype_keyword(kind): dtype, "variant": variant, "local_files_only": True,
              "use_safetensors": weights[-1].suffix == ".safetensors"}
    if issubclass(kind, ModelMixin) and not _accelerate_available():
        kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, minus its warning
    try:
        module = kind.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CDIError(
            f"cannot load the {component!r} of {hub_id or folder} ({type(exc).__name__}: {exc}); the files may be "
            "corrupt, incomplete or from an incompatible version: fetch them again"
        ) from None
    return _prepare(module, device, channels_last), config_files + weights


#: Families whose transformers recompute their blocks' activations in the backward on CUDA.
CHECKPOINTED_FAMILIES = ("sd3", "flux", "zimage")


def checkpoints_gradients(family: str, device: torch.device | str) -> bool:
    """Whether the denoiser runs with gradient checkpointing: the flow transformers, on CUDA.

    The families that back-propagate to their input (noise optimisation,
    gradient masking, GSA) would otherwise keep every block's activations:
    35 GiB per FLUX.1-dev image in bfloat16, 2.2 GiB with checkpointing
    (``cdi speed --plan``). Calls without gradients are unaffected, and the
    recomputed forward is the same computation, so values do not change.
    """
    return family in CHECKPOINTED_FAMILIES and torch.device(device).type == "cuda"


def _configs_for_distillation(folder: Path, index: dict, adapter_cls) -> list[dict]:
    """model_index.json and the denoiser's and text encoders' config.json, read for distillation marks."""
    configs = [index]
    for name in (getattr(adapter_cls, "denoiser_name", "unet"), "text_encoder"):
        path = Path(folder) / name / "config.json"
        if path.is_file():
            try:
                configs.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                pass  # an unreadable config already failed loading; nothing more to learn here
    return configs


def flow_options(guidance: float | None, timestep_grid: str | None) -> dict[str, Any]:
    """``load_model``'s ``guidance_scale`` and ``timestep_grid`` of ``--guidance`` / ``--timestep-grid``, checked."""
    from cdi.models.flow_matching import GRIDS

    if guidance is not None and not (guidance == guidance and 0 <= float(guidance) <= 100):
        raise CDIError(f"--guidance must be a number from 0 to 100, got {guidance}")
    if timestep_grid is not None and timestep_grid not in GRIDS:
        raise CDIError(f"--timestep-grid must be one of {', '.join(GRIDS)}, got {timestep_grid!r}")
    return {"guidance_scale": None if guidance is None else float(guidance), "timestep_grid": timestep_grid}


def _flow_inputs(family: str, loaded: Mapping[str, Any], guidance_scale: float | None,
                 timestep_grid: str | None) -> dict[str, Any]:
    """The adapter keywords of ``--guidance`` and ``--timestep-grid``; ``CDIError`` where they do not apply."""
    flow = family in ("sd3", "flux", "zimage")
    if timestep_grid is not None and not flow:
        raise CDIError(f"--timestep-grid applies to flow-matching models (SD3, FLUX, Z-Image), not to {family!r}")
    inputs: dict[str, Any] = {"grid": timestep_grid} if timestep_grid is not None else {}
    if guidance_scale is not None:
        if family != "flux" or not loaded["transformer"].config.guidance_embeds:
            raise CDIError("--guidance applies to guidance-distilled models (FLUX.1-dev), whose transformer takes "
                           f"the guidance scale as an input; this {family!r} model has no such input")
        inputs["guidance_scale"] = guidance_scale
    return inputs


def _prepare(module: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """On ``device``, in eval mode, parameters frozen; channels_last for the denoiser on CUDA."""
    module = module.to(device).eval().requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _load_scheduler(path: Path):
    """The scheduler class named in scheduler_config.json, built from it."""
    import diffusers

    config_path = path / "scheduler_config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CDIError(f"{config_path} is missing; the pipeline folder is incomplete") from None
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise CDIError(f"{config_path} names an unknown scheduler {config.get('_class_name')!r}")
    scheduler = cls.from_config(config)
    if not hasattr(scheduler, "alphas_cumprod") and not isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        raise CDIError(
            f"scheduler {config['_class_name']} of {path.parent} has no alphas_cumprod; cdi needs a "
            "discrete-time (DDPM-style) noise schedule or a flow-matching one (FlowMatchEulerDiscreteScheduler)"
        )
    return scheduler


def _accelerate_available() -> bool:
    from diffusers.utils import is_accelerate_available

    return is_accelerate_available()


@functools.cache
def _dtype_keyword(cls: type) -> str:
    """``"dtype"`` if ``cls.from_pretrained`` reads it (current diffusers and transformers), else ``"torch_dtype"``."""
    try:
        source = inspect.getsource(cls.from_pretrained)
    except (OSError, TypeError):
        return "torch_dtype"
    return "dtype" if re.search(r"""kwargs\.pop\(\s*["']dtype["']""", source) else "torch_dtype"


# ------------------------------------------ what the adapters read from configs