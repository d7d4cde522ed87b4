"""``cdi env``: package versions, devices and dtypes."""

from __future__ import annotations

import typer
from rich.table import Table

from cdi.cli.common import console


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


def register(app: typer.Typer) -> None:
    """Add ``cdi env`` to ``app``."""
    app.command("env")(env_command)
