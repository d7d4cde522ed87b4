"""``cdi extract``: feature values of a folder of images, to a CSV file."""

from __future__ import annotations

import contextlib
import dataclasses

import typer

from cdi.cli.common import (CAPTIONS_HELP, MAX_PIXELS_HELP, RAY_HELP, RAY_THREADS_HELP, RAY_WORKERS_HELP,
                            SKIP_BAD_HELP, _user_errors, console, err_console, left_out_lines)
from cdi.cli.options import BATCH_SIZE_HELP, FEATURES_HELP, LoaderOptions, format_option, with_loader_options
from cdi.utils.errors import CDIError
from cdi.utils.terminal import console_text


@with_loader_options
def extract_command(
    images: str = typer.Option(..., "--images", help="Folder of images (searched recursively; captions from metadata.jsonl or NAME.txt)."),
    model: str = typer.Option(..., "--model", help="Model alias (`cdi models`), Hugging Face hub id, or local pipeline folder."),
    out: str = typer.Option(..., "--out", help="CSV file to write (provenance goes to OUT.json beside it)."),
    features: str = typer.Option(None, "--features", help=FEATURES_HELP),
    batch_size: str = typer.Option("auto", "--batch-size", help=BATCH_SIZE_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of every noise draw."),
    store: str = typer.Option(None, "--store", help="Feature cache (a .sqlite file, or a folder for features.sqlite): makes the run resumable and reuses values across runs. Default: no cache."),
    shard: str = typer.Option(None, "--shard", help="I/N: handle only the images with int(sha256, 16) % N == I (0 <= I < N)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    workers: int = typer.Option(None, "--workers", help="Image-decoding worker processes (default: min(4, CPUs - 1))."),
    ray: str = typer.Option(None, "--ray", help=RAY_HELP),
    ray_workers: int = typer.Option(None, "--ray-workers", help=RAY_WORKERS_HELP),
    ray_threads: int = typer.Option(1, "--ray-threads", help=RAY_THREADS_HELP),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    captions: str = typer.Option(None, "--captions", help=CAPTIONS_HELP),
    loader: LoaderOptions = None,
    fmt: str = format_option(),
) -> None:
    """Compute feature values for a folder of images and write them to a CSV file.

    Every input is checked before the model is loaded; the CSV and its
    provenance sidecar are written atomically at the end.
    """
    from pathlib import Path

    from cdi.audit.config import check_seed, check_workers, check_writable

    from cdi.audit.run import prepare_captions
    from cdi.models.captions import parse_captions_option
    from cdi.data.collection import DEFAULT_MAX_PIXELS, ImageCollection
    from cdi.engine.distributed import check_ray_options, ray_runner
    from cdi.engine.store import FeatureStore
    from cdi.engine.batching import parse_batch_size
    from cdi.features.extract import extract_features, parse_shard
    from cdi.features.registry import default_feature_set, resolve_features

    with _user_errors():
        out_path = Path(out)
        if out_path.is_dir():
            raise CDIError(f"--out {out} is a folder; give the CSV file to write, e.g. {out_path / 'features.csv'}")
        batch_size = parse_batch_size(batch_size)
        check_workers(workers)
        check_seed(seed)
        parse_captions_option(captions)
        check_writable(out_path.parent, "--out")
        shard_spec = parse_shard(shard)
        check_ray_options(ray, ray_workers, ray_threads, loader.device, loader.dtype)
        families = resolve_features(features) if features is not None else None
        loader.check()
        collection = ImageCollection.from_folder(images, skip_bad=skip_bad,
                                                 max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        for line in left_out_lines("images", collection.file_log()):
            err_console.print(f"[yellow]note:[/] {console_text(line)}", highlight=False, soft_wrap=True)
        collection, caption_record = prepare_captions(
            [collection], model=model, revision=loader.revision, features=features, captions=captions, store=store,
            device=loader.device, dtype=loader.dtype,
        )
        with contextlib.ExitStack() as stack:
            cache = stack.enter_context(FeatureStore(store)) if store is not None else None
            from cdi.models.loading import ray_dtype

            dtype = ray_dtype(loader.dtype, loader.device) if ray else loader.dtype
            options = dict(name=model, revision=loader.revision, variant=loader.variant, dtype=dtype,
                           allow_pickle=loader.allow_pickle, compile=loader.compile, **loader.loading_options())
            runner = ray_runner(ray, workers=ray_workers, threads=ray_threads, device=loader.device, **options)
            if runner is not None:
                stack.enter_context(runner)
            # with --ray this process only derives the store key and the columns: a CPU copy of the model
            adapter = dataclasses.replace(loader, compile=loader.compile and runner is None, dtype=dtype,
                                          device="cpu" if runner is not None else loader.device).load(model)
            if families is None:
                families = resolve_features(default_feature_set(adapter))
            table = extract_features(adapter, collection, families, seed=seed, batch_size=batch_size,
                                     store=cache, shard=shard_spec, num_workers=workers, progress=True,
                                     runner=runner)
        table.meta["captions"] = caption_record
        table.meta["inputs"] = {"root": str(collection.root), "counts": collection.file_counts(),
                                "files": collection.file_log()}
        path = table.to_csv(out_path)
        info = table.meta["extraction"]
        computed = sum(info["computed"].values())
        reused = sum(info["from_store"].values())
        if fmt == "json":
            import json

            print(json.dumps({"csv": str(path), "provenance": f"{path}.json", "images": len(table),
                              "columns": list(table.columns), "extraction": info}, indent=2, default=str))
            return
        console.print(
            f"{len(table)} images x {len(table.columns)} features written to {console_text(str(path))} "
            f"(provenance: {console_text(path.name)}.json); {computed} family values computed, "
            f"{reused} read from the store, {info['seconds']:.1f} s",
            highlight=False, soft_wrap=True,
        )
        if store is None:
            console.print("tip: pass --store DIR to make long extractions resumable and reuse values across runs.",
                          highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cdi extract`` to ``app``."""
    app.command("extract")(extract_command)
