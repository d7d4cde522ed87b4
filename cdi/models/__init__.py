"""Model adapters, one module per family, and the alias registry.

``load_model(name)`` turns an alias, a Hugging Face hub id or a local
diffusers pipeline folder into a ``DiffusionAdapter`` (see
``cdi.models.base``) of its family: ``sd`` (Stable Diffusion 1.x/2.x),
``sdxl``, ``ldm``, ``dit``, ``ddpm``, or the flow-matching ``sd3``
(SD3/3.5), ``flux`` (FLUX.1) and ``zimage`` (Z-Image), which
``cdi.models.flow_matching`` presents to the feature families as
variance-preserving eps-models.
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
