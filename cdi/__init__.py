"""cdi: copyrighted data identification in diffusion models.

The audit asks whether a model was trained on a collection of published
images P, by comparing the model's behaviour on P with its behaviour on
comparable unpublished images U, and returns a calibrated p-value.

From Python (``cdi.api``)::

    import cdi
    result = cdi.api.audit("published/", "unpublished/", "sd15")   # writes nothing
    result.verdict, result.p_value

(``cdi.audit.run`` is the module that ``cdi audit`` runs; the notebook entry
point is ``cdi.api.audit``.) The names below are imported on first use, so
``import cdi`` stays fast.

The package, room by room, in the order the data flows (each room imports only the rooms above it):

- ``cdi.utils``: user errors, atomic writes, optional dependencies, environment, progress, terminal text.
- ``cdi.stats``: the verdict test (``cdi.stats.audit_test``), the pooled statistic, scorers, calibration,
  sample size. Pure numpy on feature matrices.
- ``cdi.data``: image collections and their checks (folders, files, captions, duplicates, preprocessing,
  the model-free shift guard).
- ``cdi.models``: model adapters and loading (LoRAs, single files, fine-tunes), pseudo-captions.
- ``cdi.features`` (folder ``features/``): one module per feature family; ``extract`` drives the engine.
- ``cdi.engine``: the extraction engine (feature table, store, batching, Ray, speed).
- ``cdi.attacks`` (folder ``attacks/``): single-image attacks and the benchmark protocol.
- ``cdi.audit``: options, analysis, the run, the reference model, result.json, the evidence folder, verify;
  ``cdi.reports`` (folder ``reports/``) renders its result.
- ``cdi.toy``: the toy world and ``cdi demo``.
- ``cdi.api``, ``cdi.benchmark``: orchestration for Python and ``cdi benchmark``.
- ``cdi.cli``: the ``cdi`` command.
"""

__version__ = "0.1.0"

from cdi.utils.errors import CDIError

#: name -> module of the lazily imported public API.
_LAZY = {
    "api": None,  # the module cdi.api itself
    "AuditResult": "cdi.audit.result",
    "AuditConfig": "cdi.audit.run",
    "load_model": "cdi.models",
    "ImageCollection": "cdi.data.collection",
    "FeatureTable": "cdi.engine.table",
    "write_report": "cdi.reports",
}

__all__ = ["CDIError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cdi' has no attribute {name!r}")
    import importlib

    module = _LAZY[name]
    value = importlib.import_module("cdi.api") if module is None else getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
