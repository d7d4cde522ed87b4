"""``cdi store``: feature stores (``cdi store merge``)."""

from __future__ import annotations

import typer

from cdi.cli.common import _Typer, _user_errors, console
from cdi.utils.terminal import console_text

store_app = _Typer(name="store", help="Feature stores (the --store caches of extract and audit).",
                        no_args_is_help=True)


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


def register(app: typer.Typer) -> None:
    """Add ``cdi store`` to ``app``."""
    app.add_typer(store_app, name="store")
