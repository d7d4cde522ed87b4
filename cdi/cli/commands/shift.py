"""``cdi shift``: the dataset shift between two image folders."""

from __future__ import annotations

import typer

from cdi.cli.common import MAX_PIXELS_HELP, _user_errors, console
from cdi.cli.options import choice, format_option
from cdi.utils.terminal import console_text


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


def register(app: typer.Typer) -> None:
    """Add ``cdi shift`` to ``app``."""
    app.command("shift")(shift_command)
