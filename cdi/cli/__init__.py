"""The ``cdi`` command line: ``main`` holds ``app`` (re-exported here), ``commands/`` one module per command,
``common`` and ``options`` what several commands share. The top room: it may import every other."""

from cdi.cli.main import app

__all__ = ["app"]
