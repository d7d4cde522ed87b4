"""Options shared by several ``cdi`` commands, each defined once.

``with_loader_options`` adds the model-loading options (device, dtype, hub
revision and access, pickle, compile, and the fine-tune options: LoRAs,
replaced components, a single file's config) to every command that loads a
model and hands the command one ``LoaderOptions``; ``reference_option`` is
``--reference-model`` of the commands that can test against a reference
model; ``choice`` and ``format_option`` make options with a fixed set of
values, matched without regard to case (``--format JSON``). ``Command`` is
the class of every ``cdi`` command: its help shows no type beside a plain
flag, and a value given to a flag (``--null true``) gets a message saying
how flags are written.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

#: Help of the options shared by extract, audit, speed and benchmark.
BATCH_SIZE_HELP = (
    "Images per batch and most samples per network call, or auto (CUDA: the largest that fits in memory; "
    "elsewhere 32; `cdi speed`: the fastest). Halved when the GPU runs out of memory; recorded in the result."
)
COMPILE_HELP = "Compile the denoiser with torch.compile: slow first calls (minutes), faster after; for long runs."
#: What ``--features`` says in every command's help (the sets are ``cdi.features.registry.FEATURE_SETS``).
FEATURES_HELP = ("A feature set (cdi, cdi+clid, cdi+sima, cdi+clid+sima) or a comma-separated list of families "
                 "(default: cdi+clid+sima for conditional models, cdi+sima otherwise).")
#: Help of the fine-tune loading options (cdi.models.finetune).
LORA_HELP = ("LoRA weight file (.safetensors, diffusers or kohya/community format) or its folder, fused into --model; "
             "repeat for several.")
LORA_SCALE_HELP = "Scale of the LoRA(s): one for all, or one per --lora in order (default 1.0)."
UNET_HELP = "Load the denoiser from this folder instead of the base's (a fine-tune that ships only its UNet)."
COMPONENT_HELP = "NAME=FOLDER: load this pipeline component (unet, vae, text_encoder, ...) from FOLDER; repeatable."
CONFIG_HELP = ("For a single-file --model (.safetensors, .ckpt with --allow-pickle): the pipeline folder, alias or "
               "cached hub id whose configs describe it (default: guessed from its keys, looked up offline).")
REFERENCE_HELP = ("Reference model (e.g. the base of a LoRA or fine-tune): test the difference of every feature "
                  "between --model and it, i.e. whether the images were used beyond the reference model.")


#: click's usage error, as typer (which vendors its own click) raises it.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
#: Words a user may put after a flag meaning "on" or "off".
_BOOLEAN_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})


class Command(TyperCommand):
    """A typer command with two corrections to typer's defaults.

    Typer shows ``<bool>`` beside a plain flag in ``--help``, which reads as
    if the flag took a value; the flags' type column is left empty here.
    ``--null true`` fails in click with "unexpected extra argument (true)";
    here the message adds that the flag takes no value and how to write it.
    """

    def get_params(self, ctx: Any) -> list:
        return _blank_flag_types(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except _UsageError as exc:
            hint = flag_value_hint(self, given)
            if hint is None or "extra argument" not in exc.format_message():
                raise
            raise _UsageError(f"{exc.format_message()}. {hint}", ctx) from None


class Group(TyperGroup):
    """A typer group (``cdi``, ``cdi toy``, ``cdi store``) whose help shows no ``<bool>`` beside its flags."""

    def get_params(self, ctx: Any) -> list:
        return _blank_flag_types(super().get_params(ctx))


def _blank_flag_types(params: list) -> list:
    """``params`` with an empty metavar on each flag: typer's help shows the metavar in the type column."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def flag_value_hint(command: TyperCommand, args: list[str]) -> str | None:
    """A sentence for a flag followed by a true/false word in ``args`` (None when there is none)."""
    flags = {opt: param for param in command.params if isinstance(param, TyperOption) and param.is_flag
             for opt in param.opts}
    for flag, word in zip(args, args[1:]):
        if flag in flags and word.lower() in _BOOLEAN_WORDS:
            return (f"{flag} is a switch and takes no value: write {flag} alone to turn it on, "
                    "or leave it out to keep it off")
    return None


def choice(default: str | None, flag: str, values: tuple[str, ...], help: str) -> Any:
    """A typer option taking one of ``values``, case-insensitively (the value passed on is the listed spelling).

    Anything else is a usage error (exit status 2) that lists the values.
    """
    spelled = {value.lower(): value for value in values}

    def parse(text: str) -> str:
        value = spelled.get(str(text).strip().lower())
        if value is None:
            raise typer.BadParameter(f"{text!r} is not one of {', '.join(values)}")
        return value

    return typer.Option(default, flag, parser=parse, metavar="[" + "|".join(values) + "]", help=help)


def format_option() -> Any:
    """``--format text|json`` of the commands that print a result."""
    return choice("text", "--format", ("text", "json"), "text (a table for people) or json (for programs).")


def reference_option() -> Any:
    """``--reference-model`` of the commands that test against a reference model (audit, benchmark).

    Not a loader option: it names a second model and changes the question
    an audit answers, so ``extract`` and ``speed`` do not take it.
    """
    return typer.Option(None, "--reference-model", help=REFERENCE_HELP)


@dataclass
class LoaderOptions:
    """How to load the model: the arguments of ``cdi.models.load_model`` besides the name.

    ``lora`` to ``config`` are the fine-tune options as given on the command
    line (the fields of ``AuditConfig`` and ``BenchmarkConfig`` of the same
    names); ``loading_options`` checks them and turns them into
    ``load_model``'s ``loras``, ``components`` and ``config``.
    """

    device: str = "auto"
    dtype: str = "default"
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    compile: bool = False
    local_files_only: bool | None = None
    cache_dir: str | None = None
    token: str | None = field(default=None, repr=False)
    lora: list[str] = field(default_factory=list)
    lora_scale: list[float] = field(default_factory=list)
    unet: str | None = None
    component: list[str] = field(default_factory=list)
    config: str | None = None
    guidance: float | None = None  # FLUX.1-dev guidance input (cdi.models.flux)
    timestep_grid: str | None = None  # flow sigma of each timestep (cdi.models.flow_matching)

    def as_config(self) -> dict[str, Any]:
        """The fields, for ``AuditConfig`` and ``BenchmarkConfig`` (which keep the token out of their files)."""
        return asdict(self)

    def loading_options(self) -> dict[str, Any]:
        """``load_model``'s ``loras``, ``components`` and ``config`` of the fine-tune options (checked)."""
        from cdi.models.finetune import loading_options
        from cdi.models.loading import flow_options

        return loading_options(self.lora, self.lora_scale, self.unet, self.component, self.config,
                               allow_pickle=self.allow_pickle) | flow_options(self.guidance, self.timestep_grid)

    def load(self, model: str):
        """``load_model(model, ...)`` with these options, the libraries' own weight-loading bars silenced."""
        from cdi.models import load_model
        from cdi.utils.progress import quiet_library_progress

        quiet_library_progress()
        return load_model(model, device=self.device, dtype=self.dtype, revision=self.revision,
                          variant=self.variant, allow_pickle=self.allow_pickle, compile=self.compile,
                          local_files_only=self.local_files_only, cache_dir=self.cache_dir, token=self.token,
                          **self.loading_options())

    def check(self) -> None:
        """Validate device, dtype and the fine-tune options before any model is loaded (raises ``CDIError``)."""
        from cdi.models.loading import resolve_device, resolve_dtype

        resolve_dtype(self.dtype, resolve_device(self.device))  # "default" is resolved per family at load
        self.loading_options()


#: name -> (annotation, typer option) of every loader option, in the order ``--help`` lists them.
_LOADER_OPTIONS: dict[str, tuple[Any, Callable[[], Any]]] = {
    "device": (str, lambda: typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")),
    "dtype": (str, lambda: choice(
        "default", "--dtype", ("default", "auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
        "Compute dtype of the model: default (on CUDA the dtype the checkpoint was released in: bfloat16 for "
        "SD3/3.5, FLUX.1 and Z-Image, float32 for the others; float32 elsewhere), float32 (the reference), "
        "bfloat16, float16 (GPU only), or auto (bfloat16 on a GPU that supports it, float32 elsewhere).")),
    "revision": (Optional[str], lambda: typer.Option(None, "--revision", help="Branch, tag or commit of a hub model.")),
    "variant": (Optional[str], lambda: typer.Option(None, "--variant", help="Weight variant, e.g. fp16.")),
    "allow_pickle": (bool, lambda: typer.Option(
        False, "--allow-pickle", help="Also accept pickle (.bin) weights; only for checkpoints you trust (unpickling can run code).")),
    "compile": (bool, lambda: typer.Option(False, "--compile", help=COMPILE_HELP)),
    "local_files_only": (bool, lambda: typer.Option(
        False, "--local-files-only", help="Never download: use only the local Hugging Face cache (like HF_HUB_OFFLINE=1).")),
    "cache_dir": (Optional[str], lambda: typer.Option(
        None, "--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE, or HF_HOME/hub).")),
    "token": (Optional[str], lambda: typer.Option(
        None, "--token", help="Hugging Face access token for gated or private models (default: HF_TOKEN or your "
                             "`hf auth login`); never written to any output file.")),
    "lora": (list[str], lambda: typer.Option(None, "--lora", help=LORA_HELP)),
    "lora_scale": (list[float], lambda: typer.Option(None, "--lora-scale", help=LORA_SCALE_HELP)),
    "unet": (Optional[str], lambda: typer.Option(None, "--unet", help=UNET_HELP)),
    "component": (list[str], lambda: typer.Option(None, "--component", help=COMPONENT_HELP)),
    "config": (Optional[str], lambda: typer.Option(None, "--config", help=CONFIG_HELP)),
    "guidance": (Optional[float], lambda: typer.Option(
        None, "--guidance", help="FLUX.1-dev's guidance input (default 1.0, recorded). Audit a fine-tune at the "
                                 "value it was trained with: diffusers' FLUX DreamBooth-LoRA script uses 3.5, "
                                 "kohya sd-scripts 1.0.")),
    "timestep_grid": (Optional[str], lambda: typer.Option(
        None, "--timestep-grid", help="Flow-matching models: which noise level each timestep means; model (default: "
                                      "the model's own shifted training sigmas) or sd15 (SD 1.5's levels, to compare "
                                      "feature values across families).")),
}
#: The repeatable loader options (typer passes None when they are not given).
_LIST_OPTIONS = ("lora", "lora_scale", "component")


def with_loader_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the loader options; it receives them as one ``loader: LoaderOptions`` argument."""
    signature = inspect.signature(command)
    kept = [p for p in signature.parameters.values() if p.name != "loader"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=make(), annotation=kind)
             for name, (kind, make) in _LOADER_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _LOADER_OPTIONS}
        values["local_files_only"] = True if values["local_files_only"] else None  # None: follow HF_HUB_OFFLINE
        values.update({name: list(values[name] or []) for name in _LIST_OPTIONS})
        return command(loader=LoaderOptions(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
    annotations = {k: v for k, v in command.__annotations__.items() if k != "loader"}
    wrapper.__annotations__ = {**annotations, **{name: kind for name, (kind, _) in _LOADER_OPTIONS.items()}}
    return wrapper
