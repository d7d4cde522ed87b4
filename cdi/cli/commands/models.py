"""``cdi models``: the model aliases and families."""

from __future__ import annotations

import typer
from rich.table import Table

from cdi.cli.common import console
from cdi.cli.options import format_option


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


def register(app: typer.Typer) -> None:
    """Add ``cdi models`` to ``app``."""
    app.command("models")(models_command)
