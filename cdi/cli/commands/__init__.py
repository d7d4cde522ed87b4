"""One module per ``cdi`` command (or sub-app); each has ``register(app)``, which adds its command to
``app``. ``COMMANDS`` is the order they are registered in, the order ``cdi --help`` lists them."""

from __future__ import annotations

import typer

from cdi.cli.commands import (audit, benchmark, demo, design, env, extract, inspect, models, report, shift, speed,
                              store, toy, verify)

COMMANDS = (models, env, inspect, report, verify, extract, shift, toy, design, audit, store, demo, speed, benchmark)


def register_all(app: typer.Typer) -> None:
    """Add every command to ``app``, in ``COMMANDS`` order."""
    for module in COMMANDS:
        module.register(app)
