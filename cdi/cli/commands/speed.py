"""``cdi speed``: time feature extraction, or plan its memory (--plan)."""

from __future__ import annotations

import typer

from cdi.cli.common import MAX_PIXELS_HELP, _user_errors, console
from cdi.cli.options import BATCH_SIZE_HELP, FEATURES_HELP, LoaderOptions, format_option, with_loader_options
from cdi.utils.errors import CDIError


@with_loader_options
def speed_command(
    model: str = typer.Option(..., "--model", help="Model alias (`cdi models`), Hugging Face hub id, or local pipeline folder."),
    features: str = typer.Option(None, "--features", help=FEATURES_HELP),
    batch_size: str = typer.Option("auto", "--batch-size", help=BATCH_SIZE_HELP),
    images: int = typer.Option(None, "--images", help="Images to time: synthetic ones (default two batches, at least 32), or the first N of --images-dir (default all)."),
    images_dir: str = typer.Option(None, "--images-dir", help="Time these images instead of synthetic ones."),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    audit_size: int = typer.Option(1000, "--audit-size", help="Images per collection of the audit whose duration is estimated."),
    plan: bool = typer.Option(False, "--plan", help="Print the memory plan (weights, activations, caption cache) without loading any weights; a local folder or an alias with published configs (flux-dev, sd35-large, sd35-medium, sdxl, sd15)."),
    gpu_memory: float = typer.Option(None, "--gpu-memory", help="With --plan: GiB of device memory to plan for (default: the GPU's own; 80 when planning --device cuda on a machine without one)."),
    fmt: str = format_option(),
    loader: LoaderOptions = None,
) -> None:
    """Time feature extraction: images/s, model calls, peak memory, and efficiency against the bare network."""
    from cdi.data.collection import DEFAULT_MAX_PIXELS, ImageCollection
    from cdi.engine.batching import parse_batch_size
    from cdi.engine.speed import measure_speed, speed_table, to_json
    from cdi.features.registry import default_feature_set, resolve_features

    with _user_errors():
        batch = parse_batch_size(batch_size)
        if plan:
            _print_plan(model, loader, features, batch, 2 * audit_size, gpu_memory, fmt)
            return
        if images is not None and images < 1:
            raise CDIError(f"--images must be at least 1, got {images}")
        if audit_size < 1:
            raise CDIError(f"--audit-size must be at least 1, got {audit_size}")
        families = resolve_features(features) if features is not None else None
        loader.check()
        collection = None
        if images_dir is not None:
            collection = ImageCollection.from_folder(
                images_dir, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
            if images is not None:
                collection = collection.subset(range(min(images, len(collection))))
        adapter = loader.load(model)
        if families is None:
            families = resolve_features(default_feature_set(adapter))
        report = measure_speed(adapter, families, collection=collection, images=images, batch_size=batch,
                               audit_size=audit_size)
        if fmt == "json":
            print(to_json(report))
        else:
            console.print(speed_table(report))


def _print_plan(model: str, loader: LoaderOptions, features: str | None, batch: int | str, images: int,
                gpu_memory: float | None, fmt: str) -> None:
    """``cdi speed --plan``: the memory plan of ``model`` (``cdi.engine.memory_plan``), built from configs only."""
    import json

    from cdi.engine.memory_plan import plan_for

    memory_plan = plan_for(model, device=loader.device, dtype=loader.dtype, features=features, batch_size=batch,
                           images=images, gpu_memory_gib=gpu_memory)
    if memory_plan is None:
        raise CDIError(f"no configs of {model!r} here to plan from; give a local pipeline folder or one of the "
                       "aliases with published configs (flux-dev, sd35-large, sd35-medium, sdxl, sd15)")
    if fmt == "json":
        print(json.dumps(memory_plan.as_dict(), indent=2))
    else:
        print("\n".join(memory_plan.lines()))


def register(app: typer.Typer) -> None:
    """Add ``cdi speed`` to ``app``."""
    app.command("speed")(speed_command)
