"""How a decoded image becomes model input: ``Preprocess`` (the settings) and ``preprocess_image``.

EXIF transpose, conversion to RGB or L, resize of the shorter side and
centre crop (or a squash to the square), scaling to [-1, 1]; when the audit
harmonises two collections' encodings (``cdi.data.harmonise``), a working size and
one JPEG generation before the model's resolution. The loader that runs this
in worker processes is ``cdi.data.image_loader``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from cdi.utils.errors import CDIError
from cdi.data.image_files import EXIF_ORIENTATION, convert_mode
from cdi.data.harmonise import (
    SUBSAMPLINGS,
    EncodingProbe,
    already_encoded,
    jpeg_tables,
    plan_harmonisation,
    reencode_jpeg,
)


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
    jpeg_quality : int or None
        Harmonisation (``cdi.data.harmonise``): re-encode every image as one JPEG
        generation at this libjpeg quality, at the working size, before it
        is brought to ``resolution`` (an image that already is such a JPEG
        and needs no resampling is left as decoded). None: no re-encoding.
    jpeg_subsampling : str or None
        Chroma subsampling of that JPEG, ``"4:4:4"``, ``"4:2:2"`` or
        ``"4:2:0"`` (with ``jpeg_quality`` only).
    jpeg_tables : tuple of tuples of int, or None
        That JPEG's quantisation tables (64 entries each, table-id order),
        used exactly instead of libjpeg's standard tables at
        ``jpeg_quality`` (which then only records their estimated quality):
        the published collection's own tables, so that its copies are left
        as they are and the originals get the identical generation (with
        ``jpeg_quality`` only; lists, as JSON gives them back, are accepted).
    working_size : int or None
        Harmonisation: the side (shorter side for ``crop="center"``) every
        image is brought to first; then re-encoded, then resized to
        ``resolution``. None: straight to ``resolution``.
    """

    resolution: int
    channels: int = 3
    crop: str = "center"
    resample: str = "bicubic"
    jpeg_quality: int | None = None
    jpeg_subsampling: str | None = None
    working_size: int | None = None
    jpeg_tables: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise CDIError(f"the preprocessing resolution must be a positive whole number, got {self.resolution!r}")
        if self.channels not in (1, 3):
            raise CDIError(f"images can be prepared with 3 channels (RGB) or 1 (greyscale), not {self.channels!r}")
        if self.crop not in ("center", "resize"):
            raise CDIError(f"crop must be 'center' or 'resize', got {self.crop!r}")
        if self.resample not in _RESAMPLE:
            raise CDIError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.jpeg_quality is not None and (isinstance(self.jpeg_quality, bool) or not isinstance(
                self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100):
            raise CDIError(f"the harmonising JPEG quality must be a whole number 1..100, got {self.jpeg_quality!r}")
        if (self.jpeg_subsampling is None) != (self.jpeg_quality is None) or (
                self.jpeg_subsampling is not None and self.jpeg_subsampling not in SUBSAMPLINGS):
            raise CDIError(f"the harmonising JPEG subsampling must be one of {', '.join(SUBSAMPLINGS)} and go with "
                           f"a quality, got {self.jpeg_subsampling!r} with quality {self.jpeg_quality!r}")
        if self.working_size is not None and (isinstance(self.working_size, bool) or not isinstance(
                self.working_size, int) or self.working_size < 1):
            raise CDIError(f"the working size must be a positive whole number, got {self.working_size!r}")
        if self.jpeg_tables is not None:
            if self.jpeg_quality is None:
                raise CDIError("harmonising JPEG tables go with a JPEG quality and subsampling")
            object.__setattr__(self, "jpeg_tables", jpeg_tables(self.jpeg_tables))  # hashable, as the key records it

    @property
    def harmonised(self) -> bool:
        """Whether a working size or a JPEG generation is part of this preprocessing."""
        return self.jpeg_quality is not None or self.working_size is not None

    def record(self) -> dict:
        """The settings as a dict, for store keys and provenance.

        The harmonisation fields appear only when set, so that a plain
        preprocessing keeps the key it had before harmonisation existed
        (stores and stored tables stay valid) while any harmonisation
        changes it.
        """
        values = asdict(self)
        for name in ("jpeg_quality", "jpeg_subsampling", "working_size", "jpeg_tables"):
            if values[name] is None:
                del values[name]
        return values


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

    With harmonisation (``pre.working_size``, ``pre.jpeg_quality``): resize
    and crop to the working size (default ``pre.resolution``), re-encode as
    one JPEG generation (``cdi.data.harmonise.reencode_jpeg``, with
    ``pre.jpeg_tables`` when set; skipped for a file
    that already is that JPEG and was not resampled), then resize the
    square to ``pre.resolution``.
    """
    image.load()  # the EXIF block of some formats (PNG) follows the pixel data
    encoded = pre.jpeg_quality is not None and already_encoded(image, pre.jpeg_quality, pre.jpeg_subsampling,
                                                               pre.jpeg_tables)
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    image = convert_mode(image, "RGB" if pre.channels == 3 else "L")
    res = pre.resolution
    resample = _RESAMPLE[pre.resample]
    first = pre.working_size or res
    image, resampled = _fit(image, first, pre.crop, resample)
    if pre.jpeg_quality is not None and (resampled or not encoded):
        image = reencode_jpeg(image, pre.jpeg_quality, pre.jpeg_subsampling, pre.jpeg_tables)
    if first != res:
        image = image.resize((res, res), resample)
    array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    if array.ndim == 2:
        array = array[:, :, None]
    # numpy, not torch: tiny multi-threaded torch ops are slow in a busy process
    scaled = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(scaled)


def _fit(image: Image.Image, res: int, crop: str, resample) -> tuple[Image.Image, bool]:
    """Resize and crop to a ``res`` square as ``crop`` says; also whether the image was resampled."""
    if crop == "resize":
        if image.size != (res, res):
            return image.resize((res, res), resample), True
        return image, False
    resampled = False
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short != res:  # torchvision Resize(int): shorter side to res, longer side truncated
        new_long = int(res * long / short)
        size = (res, new_long) if width <= height else (new_long, res)
        image = image.resize(size, resample)
        resampled = True
    width, height = image.size
    left = int(round((width - res) / 2.0))  # torchvision CenterCrop offsets
    top = int(round((height - res) / 2.0))
    return image.crop((left, top, left + res, top + res)), resampled


def harmonised_preprocess(probes_p: Sequence[EncodingProbe], probes_u: Sequence[EncodingProbe], resolution: int,
                          channels: int, *, enabled: bool = True):
    """``(plan, preprocess)``: ``plan_harmonisation`` and the model's ``Preprocess`` with it applied."""
    plan = plan_harmonisation(probes_p, probes_u, resolution, enabled=enabled)
    return plan, plan.apply(Preprocess(resolution, channels))
