"""cdi: copyrighted data identification in diffusion models.

The audit asks whether a model was trained on a collection of published
images P, by comparing the model's behaviour on P with its behaviour on
comparable unpublished images U, and returns a calibrated p-value.

From Python (``cdi.api``)::

    import cdi
    result = cdi.api.audit("published/", "unpublished/", "sd15")   # writes nothing
    result.verdict, result.p_value

(``cdi.audit`` is the module that ``cdi audit`` runs; the notebook entry
point is ``cdi.api.audit``.) The names below are imported on first use, so
``import cdi`` stays fast.
"""

__version__ = "0.1.0"

from cdi.errors import CDIError

#: name -> module of the lazily imported public API.
_LAZY = {
    "api": None,  # the module cdi.api itself
    "AuditResult": "cdi.result",
    "AuditConfig": "cdi.audit",
    "load_model": "cdi.models",
    "ImageCollection": "cdi.data",
    "FeatureTable": "cdi.table",
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
