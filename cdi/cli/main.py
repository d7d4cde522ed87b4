"""The ``cdi`` command line: parse, call the API, print.

Exit status: 0 when the command did its work, whatever an audit's verdict;
2 for a usage or input error (a ``CDIError`` or a malformed option: one
message, no traceback); 1 for an internal error (one line on stderr, the
traceback written to a file whose path the line gives).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
import sys
import tempfile
import traceback
from typing import Iterator

import typer
from rich.console import Console
from rich.table import Table

from cdi import __version__
from cdi.cli.options import (BATCH_SIZE_HELP, FEATURES_HELP, Command, Group, LoaderOptions, choice, format_option,
                             reference_option, with_loader_options)
from cdi.utils.errors import CDIError
from cdi.utils.progress import quiet_library_progress
from cdi.utils.terminal import console_text, sanitise_cdi_log

EXIT_CODES_HELP = (
    "Exit status: 0 success (whatever the verdict), 2 usage or input error, 1 internal error "
    "(the traceback is saved to a file named on stderr) or, for `cdi verify`, a failed check."
)


class _Typer(typer.Typer):
    """The app: an unexpected exception becomes one line on stderr and exit status 1.

    Its commands are ``cli_options.Command``s (no ``<bool>`` on flags, a hint for ``--flag true``).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls", Group)
        super().__init__(*args, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort of the command line
            sys.exit(_internal_error(exc))


def _internal_error(exc: BaseException) -> int:
    """Save the traceback to a temporary file, print where it went, return exit status 1."""
    with tempfile.NamedTemporaryFile("w", prefix="cdi-error-", suffix=".txt", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(f"cdi {__version__}: {' '.join(sys.argv)}\n")
        handle.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    Console(stderr=True).print(
        f"[bold red]internal error:[/] {console_text(type(exc).__name__)}: {console_text(str(exc))}\n"
        f"This is a bug in cdi or its environment. The traceback is in {console_text(handle.name)}; please attach it "
        "and the output of `cdi env` to a bug report.",
        highlight=False, soft_wrap=True,
    )
    return 1


app = _Typer(
    name="cdi",
    help="Find out, with a statistical guarantee, whether images were used to train a diffusion model.\n\n"
         + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)
sanitise_cdi_log()  # warnings name users' files: no escape sequence of theirs reaches the terminal

#: Help of the Ray options, shared by extract and audit.
RAY_HELP = ("Compute on Ray: local (start a Ray instance on this machine), auto (the cluster this machine is in) "
            "or HOST:PORT. One model replica per GPU (or per --ray-threads CPUs); this process writes the store. "
            "Needs the ray extra: pip install \"cdi\\[ray]\".")  # \\[: not a rich markup tag
RAY_WORKERS_HELP = "Ray workers (default: one per GPU of the cluster; without GPUs, its CPUs / --ray-threads)."
RAY_THREADS_HELP = "torch threads (and Ray CPUs) of each CPU worker."
MAX_PIXELS_HELP = "Largest accepted image in pixels (default 64,000,000); larger files are refused as possible decompression bombs."
CAPTIONS_HELP = ("files (default): captions from metadata.jsonl or NAME.txt; auto[:MODEL]: caption every image with an "
                 "image-to-text model (default florence2; blip, florence2-large, a hub id or a folder), cached by image hash.")
SKIP_BAD_HELP = ("Leave unusable files out (unreadable, oversized, FIFOs, non-UTF-8 names) instead of failing; "
                 "each is recorded with its reason.")

@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a ``CDIError`` into one red line on stderr and exit status 2."""
    try:
        yield
    except CDIError as exc:
        err_console.print(f"[bold red]error:[/] {console_text(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"cdi {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """cdi: copyrighted data identification in diffusion models."""


@app.command("models")
def models_command(fmt: str = format_option()) -> None:
    """List the model aliases, their family and the checkpoint they load."""
    import json

    from cdi.models.registry import ALIASES, FAMILIES

    if fmt == "json":
        print(json.dumps({
            "aliases": [{"alias": a.alias, "family": a.family, "checkpoint": a.checkpoint,
                         "description": a.description, "distilled": a.distilled, "audit_instead": a.base}
                        for a in ALIASES.values()],
            "families": dict(FAMILIES),
        }, indent=2))
        return

    table = Table(title="Model aliases (any hub id or local pipeline folder also works)")
    table.add_column("alias", style="bold")
    table.add_column("family")
    table.add_column("checkpoint")
    table.add_column("description")
    for alias in ALIASES.values():
        gated = "; gated: accept its licence on the Hub, then `hf auth login`" if alias.gated else ""
        distilled = "" if not alias.distilled else \
            f"; DISTILLED ({alias.distilled}): weak per-image signal, audit {alias.base or 'its undistilled base'}"
        table.add_row(alias.alias, alias.family, alias.checkpoint, alias.description + gated + distilled)
    console.print(table)
    families = Table(title="Families")
    families.add_column("family", style="bold")
    families.add_column("architecture")
    for name, text in FAMILIES.items():
        families.add_row(name, text)
    console.print(families)


@app.command("env")
def env_command(
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print package versions, devices and usable dtypes (paste it into bug reports)."""
    import json

    from cdi.utils.environment import environment_report

    report = environment_report()
    if json_output:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"cdi {report['cdi']} environment", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("python", report["python"])
    table.add_row("platform", report["platform"])
    for name, version in report["packages"].items():
        table.add_row(name, version or "[red]not installed[/]")
    table.add_row("devices", ", ".join(report["devices"]))
    for gpu in report["cuda"]:
        table.add_row(f"cuda:{gpu['index']}",
                      f"{gpu['name']}, {gpu['memory_bytes'] / 2**30:.1f} GiB, sm {gpu['capability']}")
    table.add_row("cuda runtime", str(report["cuda_version"]))
    table.add_row("cpu threads", str(report["cpu_threads"]))
    table.add_row("dtypes", ", ".join(report["dtypes"]))
    console.print(table)


@app.command("inspect")
def inspect_command(
    folder: str = typer.Argument(None, help="Folder of images to check (the same as --published)."),
    published: str = typer.Option(None, "--published", help="Folder of the published images (searched recursively)."),
    unpublished: str = typer.Option(None, "--unpublished", help="Folder of the unpublished images, if any."),
    out: str = typer.Option(None, "--out", help="Write the manifest (every image's path, SHA-256, size, mode, caption) here as JSON."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    fmt: str = format_option(),
) -> None:
    """Validate image folders exactly as an audit will, and summarise them: cdi inspect FOLDER, or --published/--unpublished."""
    from pathlib import Path

    from cdi.data.collection import DEFAULT_MAX_PIXELS, ImageCollection, load_audit_collections, write_manifest

    with _user_errors():
        if folder is not None and published is not None:
            raise CDIError(f"give the folder once: `cdi inspect {folder}` or `cdi inspect --published {published}`")
        published = published if folder is None else folder
        if published is None:
            raise CDIError("give the folder of images to check: `cdi inspect FOLDER` (or --published FOLDER, "
                           "with --unpublished FOLDER to check both collections of an audit)")
        if out is not None and Path(out).is_dir():
            raise CDIError(f"--out {out} is a folder; give the path of the JSON file to write")
        limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if unpublished is None:
            collections = [ImageCollection.from_folder(published, name="published", skip_bad=skip_bad,
                                                       max_pixels=limit)]
        else:
            collections = list(load_audit_collections(published, unpublished, skip_bad=skip_bad,
                                                      max_pixels=limit))
        summaries = [c.summary() for c in collections]
        if fmt == "json":
            import json

            if out is not None:
                write_manifest(out, collections)
            print(json.dumps({
                c.name: {"folder": str(c.root), **s,
                         "skipped_files": [{"path": k.path, "reason": k.reason} for k in c.skipped],
                         "duplicate_files": [{"path": d, "same_as": k} for d, k in c.duplicates]}
                for c, s in zip(collections, summaries)
            }, indent=2, default=list))
            return
        table = Table(title="Image collections")
        table.add_column("", style="bold")
        for c in collections:
            table.add_column(c.name)
        rows = [
            ("folder", [console_text(str(c.root)) for c in collections]),
            ("images", [str(s["images"]) for s in summaries]),
            ("with caption", [str(s["captioned"]) for s in summaries]),
            ("modes", [", ".join(f"{m} {n}" for m, n in s["modes"].items()) for s in summaries]),
            ("width", [f"{s['width'][0]}-{s['width'][1]}" for s in summaries]),
            ("height", [f"{s['height'][0]}-{s['height'][1]}" for s in summaries]),
            ("common sizes", [", ".join(f"{w}x{h} ({n})" for w, h, n in s["common_sizes"]) for s in summaries]),
            ("skipped (bad files)", [str(s["skipped"]) for s in summaries]),
            ("duplicates left out", [str(s["duplicates"]) for s in summaries]),
            ("other files ignored", [str(s["ignored"]) for s in summaries]),
        ]
        for label, values in rows:
            table.add_row(label, *values)
        console.print(table)
        for c in collections:
            for skipped in c.skipped:
                console.print(f"{c.name}: skipped {console_text(skipped.path)}: {console_text(skipped.reason)}", highlight=False)
            for dropped, kept in c.duplicates:
                console.print(f"{c.name}: duplicate {console_text(dropped)} left out (same {c.duplicate_kind.get(dropped, 'file')} as {console_text(kept)})",
                              highlight=False)
            for ignored in c.ignored:
                console.print(f"{c.name}: ignored {console_text(ignored)}: "
                              f"{console_text(c.ignored_reasons.get(ignored, 'not an image'))}", highlight=False)
        if len(collections) == 2:
            console.print("published and unpublished share no image.")
        if out is not None:
            write_manifest(out, collections)
            console.print(f"manifest written to {console_text(out)}", highlight=False)


@app.command("report")
def report_command(
    folder: str = typer.Argument(..., help="Audit folder holding result.json (the --out of an audit)."),
    thumbnails: int = typer.Option(0, "--thumbnails", min=0, help="Embed this many small thumbnails per collection (needs the image folders)."),
    published: str = typer.Option(None, "--published", help="Folder of the published images, for thumbnails."),
    unpublished: str = typer.Option(None, "--unpublished", help="Folder of the unpublished images, for thumbnails."),
) -> None:
    """Re-render FOLDER/report.html from FOLDER/result.json alone (no model, no GPU)."""
    import warnings

    from cdi.reports import write_report

    with _user_errors():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = write_report(folder, thumbnails_n=thumbnails, published_dir=published,
                                unpublished_dir=unpublished)
        for warning in caught:
            err_console.print(f"[yellow]warning:[/] {console_text(str(warning.message))}", highlight=False,
                              soft_wrap=True)
        console.print(f"report written to {console_text(str(path))}", highlight=False)


@app.command("verify")
def verify_command(
    folder: str = typer.Argument(..., help="Audit folder (the --out of an audit)."),
    published: str = typer.Option(None, "--published", help="Re-hash the published images against the manifest."),
    unpublished: str = typer.Option(None, "--unpublished", help="Re-hash the unpublished images against the manifest."),
    model: str = typer.Option(None, "--model", help="Re-fingerprint this model (alias, hub id or folder) against the record, with the audit's recorded LoRAs and replaced components."),
    reference_model: str = typer.Option(None, "--reference-model", help="Re-fingerprint the audit's reference model against the record."),
    quick: bool = typer.Option(False, "--quick", help="Do not re-run the sample-size curve (the slowest part)."),
    recompute: int = typer.Option(0, "--recompute", min=0, metavar="K", help="Re-extract the features of K images (chosen by the SHA-256 of result.json) with --model and compare them with features.csv (within 1% of each column's spread)."),
    images: bool = typer.Option(False, "--images", help="Re-hash every image and re-run the shift guard (images from the recorded folders, or --published/--unpublished)."),
    device: str = typer.Option("auto", "--device", help="Device of the --recompute re-extraction: auto, cpu, cuda, cuda:N or mps."),
    fmt: str = format_option(),
) -> None:
    """Check an audit folder: files belong together, features match the manifest, p-values re-run exactly.

    With --model and --recompute K, K images' features are re-extracted; with --images the images are
    re-hashed and the shift guard re-run. The output lists what was checked, what was recomputed and
    what was taken as recorded. Exit status 0 when every check that ran passed, 1 when one failed,
    2 for a usage error.
    """
    from cdi.audit.verify import verification_json, verify_audit

    with _user_errors():
        verification = verify_audit(folder, published=published, unpublished=unpublished, model=model,
                                    reference_model=reference_model, curve=not quick, recompute=recompute,
                                    images=images, device=device, progress=True)
    if fmt == "json":
        print(verification_json(verification))
    else:
        console.print(console_text(verification.summary()), highlight=False, soft_wrap=True)
    if not verification.ok:
        raise typer.Exit(code=1)


@app.command("extract")
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

    from cdi.audit.run import check_seed, check_workers, check_writable, prepare_captions
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


@app.command("shift")
def shift_command(
    a: str = typer.Option(..., "--a", "--published", help="First image folder (e.g. the members or the published images)."),
    b: str = typer.Option(..., "--b", "--unpublished", help="Second image folder (e.g. the non-members or the unpublished images)."),
    encoder: str = choice("auto", "--encoder", ("auto", "builtin", "clip"), "auto (CLIP if cached locally, else built-in), builtin or clip."),
    output_format: str = format_option(),
    seed: int = typer.Option(0, "--seed", help="Seed of the Wasserstein subsample and the probe's folds."),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
) -> None:
    """Measure the dataset shift between two image folders, without any diffusion model.

    Frechet distance, Mahalanobis distance (pooled covariance), normalised
    Wasserstein distance and a held-out linear probe on L2-normalised image
    embeddings (CopyMark Section 5.1). A benchmark whose members and
    non-members are shifted measures the shift, not membership.
    """
    import json

    from cdi.attacks.shift import shift_between_folders

    with _user_errors():
        result = shift_between_folders(a, b, encoder=encoder, seed=seed, max_pixels=max_pixels)
        if output_format == "json":
            print(json.dumps(result.to_dict(), indent=2))
        else:
            console.print(console_text(result.format_text()), highlight=False, soft_wrap=True)


toy_app = _Typer(
    name="toy",
    help="The embedded toy world: digit images and a small suspect model trained by cdi itself.",
    no_args_is_help=True,
)
app.add_typer(toy_app, name="toy")


@toy_app.command("build")
def toy_build_command(
    kind: str = typer.Option("sd", "--kind", help="sd (tiny text-to-image latent model), ddpm (tiny class-conditional pixel DDPM), flow (tiny SD3-style flow-matching transformer) or sd-lora (a LoRA on the light sd, trained on an artist's images)."),
    strength: str = typer.Option("overtrained", "--strength", help="light (weak per-image membership) or overtrained (clear per-image membership)."),
    out: str = typer.Option(None, "--out", help="World folder (default: $CDI_CACHE/toy/KIND-STRENGTH-seedSEED or ~/.cache/cdi/toy/...)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the member split and of training (shipped weights: seed 0 only)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the model from scratch on this machine instead of using the shipped weights (minutes)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if OUT already holds a matching world."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the result, no progress."),
) -> None:
    """Write the toy world: members/, nonmembers/, nonmembers_shifted/, model/ and world.json."""

    from cdi.toy.world import build_world

    with _user_errors():
        if kind == "sd-lora":
            from cdi.toy.lora import build_lora_world

            lora_world = build_lora_world(out, force=force, progress=not quiet)
            console.print(f"toy world sd-lora: {console_text(str(lora_world.root))}\n  base        "
                          f"{console_text(str(lora_world.base_dir))}\n" + "".join(
                              f"  lora {s:<6} {console_text(str(p))}\n" for s, p in lora_world.lora_files.items()) + "".join(
                              f"  {k:<18} {console_text(str(p))}\n" for k, p in lora_world.folders.items()),
                          highlight=False, soft_wrap=True)
            return
        world = build_world(kind, strength, out, seed=seed, retrain=retrain, force=force, progress=not quiet)
        info = world.info
        console.print(
            f"toy world {info['kind']}-{info['strength']} (seed {info['seed']}, {info['source']} weights): "
            f"{console_text(str(world.root))}\n"
            f"  model       {console_text(str(world.model_dir))}\n"
            f"  members     {console_text(str(world.members_dir))} ({info['split']['members']} images)\n"
            f"  nonmembers  {console_text(str(world.nonmembers_dir))} ({info['split']['nonmembers']} images)\n"
            f"  shifted     {console_text(str(world.shifted_dir))}",
            highlight=False, soft_wrap=True,
        )
        if "matches_shipped_weights" in info:
            console.print(f"  retrained weights identical to the shipped ones: {info['matches_shipped_weights']}",
                          highlight=False)


#: Files named per collection in the "left out" lines before "... and N more".
LEFT_OUT_NAMED = 5


def left_out_lines(name: str, entries: list[dict]) -> list[str]:
    """Console lines naming the files of a folder's file log (``ImageCollection.file_log``) not used as images.

    Skipped, duplicate and ignored files: the count, then the first ``LEFT_OUT_NAMED`` with their
    reasons. Caption files are used (as captions), so they are not listed.
    """
    def why(entry: dict) -> str:
        if entry["status"] == "duplicate":
            return f"same {entry.get('same', 'file')} as {entry.get('of')}"
        return str(entry.get("reason") or entry["status"])

    left = [e for e in entries if e.get("status") in ("skipped", "duplicate", "ignored")]
    if not left:
        return []
    named = "; ".join(f"{e['path']} ({why(e)})" for e in left[:LEFT_OUT_NAMED])
    more = f"; and {len(left) - LEFT_OUT_NAMED} more" if len(left) > LEFT_OUT_NAMED else ""
    return [f"{name}: {len(left)} file(s) left out: {named}{more}"]


def _print_left_out(result) -> None:
    """Name on stderr every file the audit left out (from ``result.inputs``), whatever the format."""
    inputs = getattr(result, "inputs", None) or {}
    for name in ("published", "unpublished"):
        record = inputs.get(name) if isinstance(inputs, dict) else None
        if not isinstance(record, dict):
            continue
        for line in left_out_lines(name, record.get("files", [])):
            err_console.print(f"[yellow]note:[/] {console_text(line)} (every file and its reason: result.json, "
                              "inputs)", highlight=False, soft_wrap=True)


def _print_result(result, fmt: str, out: str) -> None:
    """The console summary of an audit (or its JSON with --format json); the files left out go to stderr."""
    _print_left_out(result)
    if fmt == "json":
        print(result.to_json())
        return
    from rich.panel import Panel

    colour = {"used": "red", "not_detected": "green", "inconclusive": "yellow"}[result.verdict]
    lines = [
        f"[bold {colour}]verdict: {result.verdict}[/]"
        + (" (used beyond the reference model)" if result.question == "used_beyond_reference" and
           result.verdict == "used" else ""),
        console_text(result.verdict_text),
    ] + ([f"why: {console_text(result.protocol.get('verdict_reason', ''))}"]
         if result.inconclusive_reason == "direction" else []) + [
        "",
        f"p-value (verdict, {result.p_value_kind}: {result.protocol.get('verdict_test', 'test')}): "
        f"{result.p_value:.3g}   alpha: {result.alpha}",
        f"t-test p: {result.p_value_ttest:.3g}   permutation p: "
        + ("not run" if result.p_value_permutation is None else f"{result.p_value_permutation:.3g}"),
        f"published: {result.n_published}   unpublished: {result.n_unpublished}   "
        f"effect size (Hedges' g): {result.effect_size:.3f}   AUC: {result.auc:.3f}",
    ]
    if result.verdict != "inconclusive":  # no verdict: no figures about detecting one
        lines += _verdict_lines(result)
    if result.shift_guard is not None:
        guard = result.shift_guard
        lines.append(f"shift guard ({console_text(guard.encoder)}): p = {guard.p_value:.3g}, "
                     f"{'DETECTED' if guard.detected else 'no shift detected'}" + (" (ignored)" if guard.ignored else ""))
    lines += _design_ledger_lines(result)
    lines.append(f"files: {console_text(out)}/result.json, features.csv, report.html")
    console.print(Panel("\n".join(lines), title="cdi audit", expand=False), highlight=False)


def robustness_line(curve) -> str:
    """The console line of the leave-images-out curve: from which size on the target share of subsets is significant."""
    share = f"{100 * curve.target_share:.0f}%"
    if curve.n_needed is not None:
        return (f"robustness to leaving images out: {share} of subsets significant from {curve.n_needed} "
                "published images on")
    largest = max(curve.sizes) if curve.sizes else 0
    return (f"robustness to leaving images out: at no size tried (up to {largest} published images) were "
            f"{share} of subsets significant")


def _verdict_lines(result) -> list[str]:
    """Console lines on the permutation floor, the leave-images-out curve and the forward sample-size estimate."""
    lines = []
    proto = result.protocol
    if proto.get("verdict_choice") == "permutation" and proto.get("permutation_at_floor"):
        lines.append(f"the permutation p-value is at its floor: no shuffle reached the observed statistic, so it is "
                     f"below 1/({proto.get('permutations')} + 1); parametric p (strength of the evidence): "
                     f"{result.p_value_ttest:.3g}")
    if result.sample_size_curve is not None:
        lines.append(robustness_line(result.sample_size_curve))
    est = result.sample_size_estimate
    if est is not None:
        if est.get("published_needed") is None:
            lines.append("images another audit would need for 90% power: no estimate (no positive effect observed)")
        else:
            high = est.get("published_high")
            lines.append(f"images another audit would need for 90% power (estimate): about {est['published_needed']} "
                         f"published, 95% interval {est['published_low']} to {'unbounded' if high is None else high}")
    return lines


def _design_ledger_lines(result) -> list[str]:
    """Console lines on the design the audit followed and on the ledger's audits of these collections."""
    lines = []
    if result.design is not None:
        followed = "followed exactly" if result.design["followed"] else "followed WITH DEVIATIONS (see the report)"
        lines.append(f"design {result.design['commitment'][:16]}...: {followed}; "
                     f"randomness: {console_text(result.design['randomness']['name'])}")
    if result.ledger is not None:
        same = len(result.ledger["same_collections"])
        lines.append(f"ledger {console_text(result.ledger['file'])}: {same} audit(s) of these collections"
                     + (f", {result.ledger['same_published_other_unpublished']} of these published images with "
                        "other unpublished ones" if result.ledger["same_published_other_unpublished"] else ""))
    return lines


@app.command("design", epilog=EXIT_CODES_HELP)
def design_command(
    works: str = typer.Option(None, "--works", help="Folder of the works not yet public (searched recursively)."),
    out: str = typer.Option(None, "--out", help="Where to write design.json."),
    publish_fraction: float = typer.Option(0.5, "--publish-fraction", help="Share of the works to publish (strictly between 0 and 1)."),
    beacon: str = typer.Option(None, "--beacon", help="A public random value published after the list hash was dated (hex; e.g. a drand round's randomness)."),
    beacon_name: str = typer.Option(None, "--beacon-name", help="Which beacon and round --beacon is, e.g. 'drand quicknet round 12345678'."),
    features: str = typer.Option(None, "--features", help="Planned analysis: " + FEATURES_HELP),
    alpha: float = typer.Option(0.01, "--alpha", help="Planned analysis: significance level of the verdict."),
    protocol: str = choice("pooled", "--protocol", ("pooled", "sequential", "crossfit"), "Planned analysis: the audit's test protocol."),
    verdict: str = choice("parametric", "--verdict", ("parametric", "permutation"), "Planned analysis: the verdict's p-value."),
    seed: int = typer.Option(0, "--seed", help="Planned analysis: the audit's seed (noise draws, folds, permutations)."),
    list_only: bool = typer.Option(False, "--list-only", help="Only print the works' list hash (step 1 with a beacon: date it, then take the first beacon round after that date)."),
    check: str = typer.Option(None, "--check", help="Re-derive the split of this design.json from its list and randomness (with --works: re-hash the works too); exit 1 if it does not check out."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    fmt: str = format_option(),
) -> None:
    """Pre-register a randomised design: assign each work at random to publish or withhold, checkably.

    Fixes the list of works (SHA-256 of each, one hash of the list), derives the split from it and a public
    random value (--beacon) or the OS's randomness, and writes the two lists, the planned analysis and one
    commitment hash to design.json. Later `cdi audit --design design.json` checks the audit against it.
    """
    import json

    from cdi.audit import design as designs

    with _user_errors():
        if check is not None:
            if out is not None or beacon is not None or list_only:
                raise CDIError("--check re-derives an existing design: give it alone (with --works to re-hash them)")
            report = designs.check_design_file(check, works, max_pixels=max_pixels)
        elif list_only:
            if works is None:
                raise CDIError("--list-only needs --works FOLDER")
            listed = designs.list_only(works, max_pixels=max_pixels)
            if fmt == "json":
                print(json.dumps(listed, indent=2))
            else:
                console.print(
                    f"{listed['count']} works in {console_text(listed['folder'])}\nlist hash: {listed['list_sha256']}\n"
                    "Date this hash now (a public post, an email to yourself, a notary, or `ots stamp` of a file "
                    "holding it); then take the FIRST beacon round published after that date and run cdi design "
                    "with --beacon VALUE --beacon-name 'BEACON round N'. Change no work in between.",
                    highlight=False, soft_wrap=True)
            return
        else:
            if works is None or out is None:
                raise CDIError("cdi design needs --works FOLDER and --out design.json (or --check design.json)")
            designs.check_design_out(out, force=force)  # before the works are scanned
            analysis = designs.planned_analysis(features, alpha, protocol.lower(), verdict.lower(), seed)
            made = designs.make_design(works, publish_fraction=publish_fraction, beacon=beacon,
                                       beacon_name=beacon_name, analysis=analysis, max_pixels=max_pixels)
            designs.write_design(made, out, force=force)
    if check is not None:
        problems = report["problems"]
        if fmt == "json":
            print(json.dumps({"design": check, "commitment": report["design"].get("commitment"),
                              "ok": not problems, "problems": problems}, indent=2))
        elif problems:
            console.print("design does NOT check out:\n" + console_text("\n".join(f"  - {p}" for p in problems)),
                          highlight=False, soft_wrap=True)
        else:
            d = report["design"]
            console.print(f"design checks out: commitment {d['commitment']}; {d['assignment']['publish_count']} to "
                          f"publish, {d['assignment']['withhold_count']} to withhold, re-derived from list hash "
                          f"{d['works']['list_sha256']} and randomness from {console_text(d['randomness']['name'])}"
                          + (f"; the works in {console_text(works)} are exactly the listed ones" if works else ""),
                          highlight=False, soft_wrap=True)
        if problems:
            raise typer.Exit(code=1)
        return
    if fmt == "json":
        print(json.dumps(made, indent=2))
        return
    console.print(
        f"wrote {console_text(out)}: {made['assignment']['publish_count']} works to publish, "
        f"{made['assignment']['withhold_count']} to withhold (of {made['works']['count']}; list hash "
        f"{made['works']['list_sha256']})\nrandomness: {console_text(made['randomness']['statement'])}\n"
        + console_text("\n".join(designs.dating_advice(out, made["commitment"]))),
        highlight=False, soft_wrap=True)


@app.command("audit", epilog=EXIT_CODES_HELP)
@with_loader_options
def audit_command(
    published: str = typer.Option(None, "--published", help="Folder of the published images (suspected training data)."),
    unpublished: str = typer.Option(None, "--unpublished", help="Folder of comparable images that were never published."),
    model: str = typer.Option(None, "--model", help="Model alias (`cdi models`), Hugging Face hub id, or local pipeline folder."),
    published_features: str = typer.Option(None, "--published-features", help="Audit from this `cdi extract` CSV of the published images instead of a model (with --unpublished-features; --published/--unpublished then only feed the shift guard)."),
    unpublished_features: str = typer.Option(None, "--unpublished-features", help="The `cdi extract` CSV of the unpublished images (same model and features)."),
    out: str = typer.Option(None, "--out", help="Folder for result.json, features.csv and report.html (required)."),
    features: str = typer.Option(None, "--features", help=FEATURES_HELP),
    alpha: float = typer.Option(0.01, "--alpha", help="Significance level of the verdict."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (noise, folds, permutations)."),
    folds: int = typer.Option(5, "--folds", help="Blocks of the cross-fitted scoring protocol."),
    permutations: int = typer.Option(None, "--permutations", help="Permutations of the exact permutation test (0: off; default 99,999 with the pooled protocol, resolving p down to 1e-5, and 1,000 with the others)."),
    scorer: str = choice("logistic", "--scorer", ("logistic", "xgboost"), "Scoring model: logistic (default) or xgboost (needs the xgboost package; sequential and crossfit protocols)."),
    protocol: str = choice("pooled", "--protocol", ("pooled", "sequential", "crossfit"), "pooled (the verdict's default: no split, no seed), sequential or crossfit."),
    verdict: str = choice("parametric", "--verdict", ("parametric", "permutation"), "parametric (the protocol's p-value) or permutation (the exact permutation p-value is the verdict)."),
    sample_size_resamples: int = typer.Option(50, "--sample-size-resamples", help="Resamples per size for the images-needed curve (0: off)."),
    ignore_shift: bool = typer.Option(False, "--ignore-shift", help="Give a verdict even if the shift guard finds that P and U differ without the model."),
    no_harmonise: bool = typer.Option(False, "--no-harmonise", help="Do not re-encode the two collections alike when their JPEG quality, format or size differ (the report then says what this risks)."),
    shift_alpha: float = typer.Option(0.05, "--shift-alpha", help="Significance level of the shift guard (higher = more cautious)."),
    shift_encoder: str = choice("auto", "--shift-encoder", ("auto", "clip", "builtin"), "auto (CLIP if cached locally, else built-in), clip or builtin."),
    batch_size: str = typer.Option("auto", "--batch-size", help=BATCH_SIZE_HELP),
    store: str = typer.Option(None, "--store", help="Feature store (folder or .sqlite file) to reuse and resume extraction."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    workers: int = typer.Option(None, "--workers", help="Image decoding worker processes."),
    ray: str = typer.Option(None, "--ray", help=RAY_HELP),
    ray_workers: int = typer.Option(None, "--ray-workers", help=RAY_WORKERS_HELP),
    ray_threads: int = typer.Option(1, "--ray-threads", help=RAY_THREADS_HELP),
    max_pixels: int = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    captions: str = typer.Option(None, "--captions", help=CAPTIONS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an earlier audit in --out."),
    fmt: str = format_option(),
    loader: LoaderOptions = None,
    reference_model: str = reference_option(),
    design: str = typer.Option(None, "--design", help="design.json of `cdi design`: stop unless P and U are its two lists (by SHA-256) and the options its planned analysis."),
    allow_deviations: bool = typer.Option(False, "--allow-deviations", help="With --design: audit even if images are missing from or added to the design's lists, and list them in the result."),
    ledger: str = typer.Option(None, "--ledger", help="Audit ledger file this audit is appended to (default: cdi-ledger.jsonl beside --store, else in the parent folder of --out)."),
) -> None:
    """Audit: were the published images used to train the model? Writes result.json, features.csv and report.html."""
    with _user_errors():
        from cdi.audit.run import AuditConfig, run_audit

        check_audit_sources(published, unpublished, model, published_features, unpublished_features, out)

        config = AuditConfig(
            published=published, unpublished=unpublished, model=model, out=out, features=features, alpha=alpha,
            seed=seed, folds=folds, permutations=permutations, scorer=scorer, protocol=protocol.lower(),
            verdict=verdict.lower(),
            sample_size_resamples=sample_size_resamples, ignore_shift=ignore_shift, shift_alpha=shift_alpha,
            shift_encoder=shift_encoder, batch_size=batch_size, store=store, skip_bad=skip_bad, workers=workers,
            no_harmonise=no_harmonise, force=force, published_features=published_features, unpublished_features=unpublished_features,
            ray=ray, ray_workers=ray_workers, ray_threads=ray_threads, captions=captions,
            **({} if max_pixels is None else {"max_pixels": max_pixels}), **loader.as_config(),
            reference_model=reference_model, design=design, allow_deviations=allow_deviations, ledger=ledger,
        )
        quiet_library_progress()  # cdi reports its own progress; no weight-loading bars of the libraries
        result = run_audit(config, progress=True)  # progress goes to stderr: stdout holds only the JSON
        _print_result(result, fmt, out)


def check_audit_sources(published, unpublished, model, published_features, unpublished_features, out) -> None:
    """Name every option an audit lacks at once (``CDIError``), not only the first."""
    if published_features is not None or unpublished_features is not None:
        wanted = {"--published-features": published_features, "--unpublished-features": unpublished_features}
    else:
        wanted = {"--published": published, "--unpublished": unpublished, "--model": model}
    missing = [flag for flag, value in {**wanted, "--out": out}.items() if value is None]
    if missing:
        raise CDIError(
            f"missing {', '.join(missing)}. An audit needs the folder of the published images (--published), one "
            "of comparable unpublished images (--unpublished), the model (--model) and a folder for its files "
            "(--out), e.g. `cdi audit --published P --unpublished U --model MODEL --out OUT`; or, instead of "
            "images and model, the `cdi extract` tables of both (--published-features, --unpublished-features). "
            "`cdi demo` runs a complete example.")


store_app = _Typer(name="store", help="Feature stores (the --store caches of extract and audit).",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("merge")
def store_merge_command(
    out: str = typer.Argument(..., help="Store to merge into (.sqlite file or folder; created if missing)."),
    sources: list[str] = typer.Argument(..., help="Stores to merge into OUT, e.g. the shard stores of several machines."),
) -> None:
    """Join feature stores made on different machines (e.g. with --shard I/N) into OUT.

    A value stored twice must be identical (otherwise nothing of that store is
    merged and the conflict is named). Then `cdi extract --store OUT` (or
    `cdi audit --store OUT`) reads every value without computing any.
    """
    from cdi.engine.store import merge_stores

    with _user_errors():
        counts = merge_stores(out, sources)
        console.print(f"merged {counts['sources']} store(s) into {console_text(out)}: {counts['values_added']} values "
                      f"added, {counts['values_present']} already there", highlight=False, soft_wrap=True)


@app.command("demo")
def demo_command(
    out: str = typer.Option("demo-out", "--out", help="Folder for the demo's data and audit files."),
    null: bool = typer.Option(False, "--null", help="Draw the published images from non-members: the audit must not detect use."),
    web: bool = typer.Option(False, "--web", help="Publish web copies: the published images are JPEG copies (quality 85), the unpublished ones the original PNGs."),
    no_harmonise: bool = typer.Option(False, "--no-harmonise", help="Audit without harmonising the two collections' encodings (see `cdi audit --help`)."),
    member_fraction: float = typer.Option(1.0, "--member-fraction", help="Share of the published images drawn from the members (partial use)."),
    n: int = typer.Option(None, "--n", help="Images per collection (default: 150)."),
    kind: str = choice("sd", "--kind", ("sd", "ddpm", "flow"), "Toy model: sd (text-to-image latent model), ddpm (class-conditional pixel model) or flow (SD3-style flow-matching transformer)."),
    strength: str = choice("overtrained", "--strength", ("light", "overtrained"), "Toy training strength: light or overtrained."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draw and of the audit."),
    permutations: int = typer.Option(None, "--permutations", help="Permutations of the permutation test (default: 99,999 with the pooled protocol, 1,000 with the others)."),
    store: str = typer.Option(None, "--store", help="Feature store to reuse between demo runs."),
    fmt: str = format_option(),
    scenario: str = choice("pretrained", "--scenario", ("pretrained", "lora"), "pretrained (a model trained on P) or lora (a LoRA on a base model, audited without and with the base as reference)."),
    design: bool = typer.Option(False, "--design", help="The flow of a pre-registered randomised design: `cdi design` splits 2n toy non-members into publish/withhold (OUT/design.json), then `cdi audit --design` (the model saw neither half: expect not_detected)."),
) -> None:
    """Build (or load) the embedded toy world and audit it."""
    with _user_errors():
        from cdi.toy.demo import DEFAULT_DEMO_SIZE, run_demo

        quiet_library_progress()
        if scenario == "lora":
            from pathlib import Path

            results = run_demo(out, null=null, n=n or DEFAULT_DEMO_SIZE, seed=seed, permutations=permutations,
                               progress=True, scenario="lora", web=web)
            for result, folder in zip(results, ("lora", "lora-vs-base")):
                _print_result(result, fmt, str(Path(out) / folder))
            return
        result = run_demo(out, null=null, member_fraction=member_fraction, n=n or DEFAULT_DEMO_SIZE, kind=kind,
                          strength=strength, seed=seed, permutations=permutations, store=store,
                          progress=True, scenario=scenario, design=design, web=web,
                          no_harmonise=no_harmonise)  # progress on stderr
        _print_result(result, fmt, out)


@app.command("speed")
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


@app.command("benchmark")
@with_loader_options
def benchmark_command(
    out: str = typer.Option(..., "--out", help="Folder for benchmark.json, benchmark.html and the feature store."),
    setup: str = typer.Option(None, "--setup", help="A named setup from examples/setups (toy-defective, toy-realistic, copymark-*, sd15-laion-mi)."),
    members: str = typer.Option(None, "--members", help="Folder of member images (with --nonmembers and --model)."),
    nonmembers: str = typer.Option(None, "--nonmembers", help="Folder of non-member images."),
    model: str = typer.Option(None, "--model", help="Model alias, hub id or local pipeline folder."),
    methods: str = typer.Option(None, "--methods", help="Comma-separated attacks (default: all; with --quick a cheap subset)."),
    calibration_fraction: float = typer.Option(0.5, "--calibration-fraction", help="Share of each class used for calibration."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: 60 images of each class, cheap methods, fewer PFAMI/GSA calls."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subset, split, noise, folds and bootstrap."),
    batch_size: str = typer.Option("auto", "--batch-size", help=BATCH_SIZE_HELP),
    store: str = typer.Option(None, "--store", help="Feature store (default: <out>/features.sqlite)."),
    mix: str = typer.Option(None, "--mix", help="Mixing experiment: shifted shares of non-members, e.g. 0,0.25,0.5,0.75,1."),
    permutations: int = typer.Option(1000, "--permutations", help="Permutations of the audit's permutation test."),
    folds: int = typer.Option(5, "--folds", help="Folds of cross-fitting for trained methods and of the audit."),
    alpha: float = typer.Option(0.01, "--alpha", help="Significance level of the audit run beside the attacks."),
    fmt: str = format_option(),
    loader: LoaderOptions = None,
    reference_model: str = reference_option(),
) -> None:
    """Benchmark single-image membership inference attacks (CopyMark protocol) beside the CDI audit."""
    with _user_errors():
        from cdi.benchmark import BenchmarkConfig, format_table, run_benchmark

        config = BenchmarkConfig(
            out=out, setup=setup, members=members, nonmembers=nonmembers, model=model, methods=methods,
            calibration_fraction=calibration_fraction, quick=quick, seed=seed, batch_size=batch_size,
            store=store, mix=mix, permutations=permutations, folds=folds, alpha=alpha, **loader.as_config(),
            reference_model=reference_model,
        )
        quiet_library_progress()
        result = run_benchmark(config, progress=True)  # progress on stderr
        if fmt == "json":
            from cdi.benchmark import BENCHMARK_FILE

            print((Path(out) / BENCHMARK_FILE).read_text(encoding="utf-8"))
            return
        typer.echo(format_table(result))
        typer.echo(f"wrote {out}/benchmark.json and {out}/benchmark.html")


if __name__ == "__main__":  # pragma: no cover
    app()
