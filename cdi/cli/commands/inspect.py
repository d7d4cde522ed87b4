"""``cdi inspect``: validate and summarise image folders as an audit would."""

from __future__ import annotations

import typer
from rich.table import Table

from cdi.cli.common import MAX_PIXELS_HELP, SKIP_BAD_HELP, _user_errors, console
from cdi.cli.options import format_option
from cdi.utils.errors import CDIError
from cdi.utils.terminal import console_text


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


def register(app: typer.Typer) -> None:
    """Add ``cdi inspect`` to ``app``."""
    app.command("inspect")(inspect_command)
