"""The ``cdi`` command line: parse, call the API, print. This module holds ``app`` and its ``--version``;
each command is a module of ``cdi.cli.commands``, registered on ``app`` here.

Exit status: 0 when the command did its work, whatever an audit's verdict;
2 for a usage or input error (a ``CDIError`` or a malformed option: one
message, no traceback); 1 for an internal error (one line on stderr, the
traceback written to a file whose path the line gives).
"""

from __future__ import annotations

import typer

from cdi import __version__
from cdi.cli.commands import register_all
from cdi.cli.common import EXIT_CODES_HELP, _Typer, console
from cdi.utils.terminal import sanitise_cdi_log

app = _Typer(
    name="cdi",
    help="Find out, with a statistical guarantee, whether images were used to train a diffusion model.\n\n"
         + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
sanitise_cdi_log()  # warnings name users' files: no escape sequence of theirs reaches the terminal


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


register_all(app)


if __name__ == "__main__":  # pragma: no cover
    app()
