"""cdi: copyrighted data identification in diffusion models.

The audit asks whether a model was trained on a collection of published
images P, by comparing the model's behaviour on P with its behaviour on
comparable unpublished images U, and returns a calibrated p-value.
"""

__version__ = "0.1.0"

from cdi.errors import CDIError

__all__ = ["CDIError", "__version__"]
