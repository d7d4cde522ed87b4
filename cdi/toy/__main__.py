"""``python -m cdi.toy``: train, measure or rebuild the toy world (``cdi.toy.world.main``)."""

from cdi.toy.world import _main

if __name__ == "__main__":
    raise SystemExit(_main())
