"""``cdi report``: re-render an audit's report.html from its result.json."""

from __future__ import annotations

import typer

from cdi.cli.common import _user_errors, console, err_console
from cdi.utils.terminal import console_text


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


def register(app: typer.Typer) -> None:
    """Add ``cdi report`` to ``app``."""
    app.command("report")(report_command)
