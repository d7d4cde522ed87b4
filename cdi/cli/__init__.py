"""The ``cdi`` command line: ``main`` defines the commands (``app``, re-exported here), ``options`` the
options several commands share. The top room: it may import every other."""

from cdi.cli.main import app

__all__ = ["app"]
