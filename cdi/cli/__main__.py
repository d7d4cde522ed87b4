"""``python -m cdi.cli``: the ``cdi`` command."""

from cdi.cli.main import app

if __name__ == "__main__":
    app()
