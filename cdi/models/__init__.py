"""Model adapters, one module per family, and the alias registry.

``load_model(name)`` turns an alias, a Hugging Face hub id or a local
diffusers pipeline folder into a ``DiffusionAdapter`` (see
``cdi.models.base``) of its family: ``sd`` (Stable Diffusion 1.x/2.x),
``sdxl``, ``ldm``, ``dit`` or ``ddpm``.
"""

from cdi.models.base import Condition, DiffusionAdapter
from cdi.models.loading import (
    SUPPORTED_PIPELINES,
    adapter_class,
    fingerprint_weights,
    load_model,
    resolve_device,
    resolve_dtype,
)
from cdi.models.registry import ALIASES, FAMILIES

__all__ = [
    "ALIASES",
    "FAMILIES",
    "SUPPORTED_PIPELINES",
    "Condition",
    "DiffusionAdapter",
    "adapter_class",
    "fingerprint_weights",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]
