"""``cdi verify``: check an audit folder."""

from __future__ import annotations

import typer

from cdi.cli.common import _user_errors, console
from cdi.cli.options import format_option
from cdi.utils.terminal import console_text


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


def register(app: typer.Typer) -> None:
    """Add ``cdi verify`` to ``app``."""
    app.command("verify")(verify_command)
