"""The embedded toy world and the demos: a suspect model the project trains itself.

``data`` holds the digits and the member/non-member split; ``training`` the seeded training loops;
``flow`` the flow-matching toy; ``lora`` the fine-tune toy; ``world`` the shipped weights, pipelines
and ``build_world`` (re-exported here); ``demo`` is ``cdi demo``. ``python -m cdi.toy`` retrains.
Imports the rooms below it (utils, data, models, features, engine, audit).
"""

from cdi.toy.world import build_world

__all__ = ["build_world"]
