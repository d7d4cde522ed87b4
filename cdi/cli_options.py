"""Options shared by several ``cdi`` commands, each defined once.

``with_loader_options`` adds the model-loading options (device, dtype, hub
revision and access, pickle, compile) to every command that loads a model
and hands the command one ``LoaderOptions``; ``choice`` and
``format_option`` make options with a fixed set of values, matched without
regard to case (``--format JSON``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import typer

#: Help of the options shared by extract, audit, speed and benchmark.
BATCH_SIZE_HELP = (
    "Images per batch and most samples per network call, or auto (CUDA: the largest that fits in memory; "
    "elsewhere 32; `cdi speed`: the fastest). Halved when the GPU runs out of memory; recorded in the result."
)
COMPILE_HELP = "Compile the denoiser with torch.compile: slow first calls (minutes), faster after; for long runs."
#: What ``--features`` says in every command's help (the sets are ``cdi.features.registry.FEATURE_SETS``).
FEATURES_HELP = ("A feature set (cdi, cdi+clid, cdi+sima, cdi+clid+sima) or a comma-separated list of families "
                 "(default: cdi+clid+sima for conditional models, cdi+sima otherwise).")


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


@dataclass
class LoaderOptions:
    """How to load the model: the arguments of ``cdi.models.load_model`` besides the name."""

    device: str = "auto"
    dtype: str = "float32"
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    compile: bool = False
    local_files_only: bool | None = None
    cache_dir: str | None = None
    token: str | None = field(default=None, repr=False)

    def as_config(self) -> dict[str, Any]:
        """The fields, for ``AuditConfig`` and ``BenchmarkConfig`` (which keep the token out of their files)."""
        return asdict(self)

    def load(self, model: str, **extra: Any):
        """``load_model(model, ..., **extra)``, with the libraries' own weight-loading bars silenced.

        ``extra``: further ``load_model`` keywords (the LoRA, component and
        single-file options of ``cdi.models.finetune.loading_options``).
        """
        from cdi.models import load_model
        from cdi.progress import quiet_library_progress

        quiet_library_progress()
        return load_model(model, **self.as_config(), **extra)

    def check(self) -> None:
        """Validate device and dtype before anything is read or loaded (raises ``CDIError``)."""
        from cdi.models.loading import resolve_device, resolve_dtype

        resolve_dtype(self.dtype, resolve_device(self.device))


#: name -> (annotation, typer option) of every loader option, in the order ``--help`` lists them.
_LOADER_OPTIONS: dict[str, tuple[Any, Callable[[], Any]]] = {
    "device": (str, lambda: typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")),
    "dtype": (str, lambda: choice(
        "float32", "--dtype", ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
        "Compute dtype of the model: float32 (default, the reference), bfloat16, float16 (GPU only), or auto "
        "(bfloat16 on a GPU that supports it, float32 elsewhere).")),
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
}


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
        return command(loader=LoaderOptions(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
    annotations = {k: v for k, v in command.__annotations__.items() if k != "loader"}
    wrapper.__annotations__ = {**annotations, **{name: kind for name, (kind, _) in _LOADER_OPTIONS.items()}}
    return wrapper
