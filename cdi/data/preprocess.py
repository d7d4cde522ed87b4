"""How a decoded image becomes model input: ``Preprocess`` (the settings) and ``preprocess_image``.

EXIF transpose, conversion to RGB or L, resize of the shorter side and
centre crop (or a squash to the square), scaling to [-1, 1]; the loader that
runs this in worker processes is ``cdi.data.image_loader``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from cdi.utils.errors import CDIError
from cdi.data.image_files import EXIF_ORIENTATION, convert_mode

@dataclass(frozen=True)
class Preprocess:
    """How images become model input.

    Parameters
    ----------
    resolution : int
        Side of the square output, in pixels.
    channels : int
        3 for RGB, 1 for greyscale (L).
    crop : str
        ``"center"``: resize the shorter side to ``resolution`` then crop the
        centre square (the usual training transform, torchvision
        ``Resize(resolution)`` + ``CenterCrop(resolution)`` arithmetic);
        ``"resize"``: squash the whole image to the square.
    resample : str
        Pillow resampling filter, ``"bicubic"`` (default) or ``"bilinear"``
        (what the diffusers fine-tuning scripts use); pick the one the model
        was trained with when known.
    """

    resolution: int
    channels: int = 3
    crop: str = "center"
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise CDIError(f"the preprocessing resolution must be a positive whole number, got {self.resolution!r}")
        if self.channels not in (1, 3):
            raise CDIError(f"images can be prepared with 3 channels (RGB) or 1 (greyscale), not {self.channels!r}")
        if self.crop not in ("center", "resize"):
            raise CDIError(f"crop must be 'center' or 'resize', got {self.crop!r}")
        if self.resample not in _RESAMPLE:
            raise CDIError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def preprocess_image(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Turn a decoded image into a (C, H, W) float32 tensor in [-1, 1].

    Steps: apply the EXIF orientation; convert to RGB (``channels=3``) or L
    (``channels=1``), dropping any alpha channel as ``Image.convert`` does
    (palette images go through RGBA so their transparency is handled
    without a warning; 16-bit greyscale, modes ``I;16*`` and ``I``, is taken
    as 0..65535 and ``F`` as 0..1, then rounded to 8 bits); resize and crop
    as ``pre.crop`` says; scale 0..255 to [-1, 1] (``x / 127.5 - 1``, up to float rounding the
    same values as torchvision ``ToTensor`` + ``Normalize(0.5, 0.5)``).
    """
    image.load()  # the EXIF block of some formats (PNG) follows the pixel data
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    image = convert_mode(image, "RGB" if pre.channels == 3 else "L")
    res = pre.resolution
    resample = _RESAMPLE[pre.resample]
    if pre.crop == "resize":
        if image.size != (res, res):
            image = image.resize((res, res), resample)
    else:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if short != res:  # torchvision Resize(int): shorter side to res, longer side truncated
            new_long = int(res * long / short)
            size = (res, new_long) if width <= height else (new_long, res)
            image = image.resize(size, resample)
        width, height = image.size
        left = int(round((width - res) / 2.0))  # torchvision CenterCrop offsets
        top = int(round((height - res) / 2.0))
        image = image.crop((left, top, left + res, top + res))
    array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    if array.ndim == 2:
        array = array[:, :, None]
    # numpy, not torch: tiny multi-threaded torch ops are slow in a busy process
    scaled = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(scaled)
