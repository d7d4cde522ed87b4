"""Reading one image file safely with Pillow.

Everything here is about a single file: open it only if it is a regular file
(``open_regular_file``: a FIFO or device named like an image is never read),
make Pillow agree with cdi's pixel limit (``pillow_limits``), offer it only to
the Pillow formats that can really decode (``decodable_formats``), and turn
it into an image record's facts (``scan_file``: identify, size-check from the
header, hash, fully decode, upright size). Phone photos in HEIC/HEIF are
read when the pillow-heif plug-in is installed (``pip install "cdi[heif]"``;
``register_plugins``), and otherwise refused with a reason that says so
(``PLUGIN_FORMATS``); Pillow 11.3 and later read AVIF itself. ``upright_rgb`` and
``convert_mode`` give the pixels a viewer sees, with correct scaling of
16-bit and float images. Folders are walked in ``cdi.data.folder_walk``; the
collection that puts the files together is ``cdi.data.collection``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import os
import re
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cdi.data.duplicates import perceptual_hash, pixel_digest
from cdi.utils.errors import CDIError

# Formats Pillow registers but only identifies (stub plugins, MPEG): a file of
# one of these is not an image cdi can use, and is not "corrupt" either.
_IDENTIFY_ONLY_FORMATS = frozenset({"MPEG"})

# Modes preprocess_image converts; anything else (e.g. LAB) is unreadable.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_SUPPORTED_MODES = frozenset({
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "F",
}) | _SIXTEEN_BIT_MODES

EXIF_ORIENTATION = 0x0112

#: Extensions of photo formats that Pillow reads only with a plug-in, and the format's name.
PLUGIN_FORMATS = {".heic": "HEIC", ".heif": "HEIF", ".hif": "HEIF", ".avif": "AVIF"}
#: How to install the plug-in (the ``heif`` extra of cdi installs pillow-heif).
PLUGIN_INSTALL = 'pip install "cdi[heif]" (the pillow-heif plug-in)'


@dataclass(frozen=True)
class _Outcome:
    kind: str  # "image" | "not_image" | "not_regular" | "unreadable" | "too_large"
    # (sha256, width, height, mode, pixel sha256, phash) for images
    info: tuple[str, int, int, str, str, str] | None = None
    reason: str = ""


def open_regular_file(path: Path):
    """Open ``path`` for reading in binary mode, or raise ``NotRegular`` if it is not a regular file.

    The file is opened without blocking and checked with ``fstat`` on the
    open descriptor, so a FIFO, socket or device named like an image (or a
    link to one) is never read: reading a FIFO would wait forever for a
    writer, a device could stream without end.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(_file_kind(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class NotRegular(Exception):
    """Raised by ``open_regular_file``; the argument names the kind of file."""


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def scan_file(path: Path, max_pixels: int) -> _Outcome:
    """Identify, size-check, hash and fully decode one file (call inside ``pillow_limits``).

    A HEIC/HEIF/AVIF file that no installed plug-in reads is ``"needs_plugin"``, with a reason that
    says how to read it.
    """
    suffix = path.suffix.lower()
    image_ext = suffix in image_extensions()
    if suffix in PLUGIN_FORMATS and not image_ext:
        return _Outcome("needs_plugin", reason=f"a {PLUGIN_FORMATS[suffix]} photo, which Pillow reads only with a "
                                               f"plug-in: {PLUGIN_INSTALL}, or convert it to JPEG or PNG")
    try:
        fh = open_regular_file(path)
    except NotRegular as exc:
        reason = f"not a regular file: {exc.args[0]}"
        return _Outcome("not_regular", reason=reason) if image_ext else _Outcome("not_image", reason=reason)
    except OSError as exc:
        if not image_ext:
            return _Outcome("not_image", reason=f"not an image (cannot be read: {exc.strerror or exc})")
        return _Outcome("unreadable", reason=f"cannot be read ({exc.strerror or exc})")
    try:
        with fh:
            try:
                with Image.open(fh, formats=decodable_formats()) as probe:  # reads the header only
                    width, height = probe.size
            except UnidentifiedImageError:
                if image_ext:
                    return _Outcome("unreadable", reason="not a valid image: Pillow cannot identify its contents")
                return _Outcome("not_image")
            except Image.DecompressionBombError as exc:
                return _Outcome("too_large", reason=_bomb_reason(exc, max_pixels))
            except Exception as exc:  # a plugin failing on a malformed header
                if not image_ext:
                    return _Outcome("not_image")
                return _Outcome("unreadable", reason=f"malformed header ({type(exc).__name__}: {exc})")
            if width * height > max_pixels:
                return _Outcome("too_large", reason=f"{width}x{height} = {width * height:,} pixels, over the "
                                                    f"limit of {max_pixels:,}")
            fh.seek(0)
            data = fh.read()
    except OSError as exc:
        if not image_ext:
            return _Outcome("not_image")
        return _Outcome("unreadable", reason=f"cannot be read ({exc.strerror or exc})")
    sha = hashlib.sha256(data).hexdigest()
    try:
        image = Image.open(io.BytesIO(data), formats=decodable_formats())
        image.load()
    except Image.DecompressionBombError as exc:
        return _Outcome("too_large", reason=_bomb_reason(exc, max_pixels))
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib errors...
        if not image_ext:
            return _Outcome("not_image")
        return _Outcome("unreadable", reason=f"cannot be decoded ({type(exc).__name__}: {exc})")
    if image.mode not in _SUPPORTED_MODES:
        return _Outcome("unreadable", reason=f"Pillow mode {image.mode} cannot be converted to RGB")
    mode = image.mode
    upright = upright_rgb(image)
    width, height = upright.size
    return _Outcome("image", info=(sha, width, height, mode, pixel_digest(upright), perceptual_hash(upright)))


def upright_rgb(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: EXIF orientation applied, converted to RGB."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return convert_mode(image, "RGB")


def convert_mode(image: Image.Image, target: str) -> Image.Image:
    """Convert to ``target`` ("RGB" or "L") with correct scaling of 16-bit and float images."""
    if image.mode == target:
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
        grey = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))  # 2-D uint8: L
        return grey if target == "L" else grey.convert(target)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode not in _SUPPORTED_MODES:
        raise CDIError(f"images of Pillow mode {image.mode} are not supported; convert them to RGB")
    return image.convert(target)


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    return f"{pixels}, over the limit of {max_pixels:,}"


_limits_lock = threading.Lock()


@contextlib.contextmanager
def pillow_limits(max_pixels: int) -> Iterator[None]:
    """Make Pillow agree with cdi's pixel limit and always report truncation.

    Pillow's only decompression-bomb setting is the global
    ``Image.MAX_IMAGE_PIXELS``: within this block it is ``max_pixels`` (so
    Pillow raises ``DecompressionBombError`` above twice that, for sizes it
    checks while decoding, such as GIF frames), its warning is silenced (cdi
    checks the header size itself and reports it), and
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is off so a truncated file fails to
    load even if other code turned it on. Both globals are restored after.
    """
    with _limits_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


@functools.lru_cache(maxsize=1)
def register_plugins() -> tuple[str, ...]:
    """Register the optional Pillow plug-ins that are installed; returns their names.

    pillow-heif (the ``heif`` extra) adds HEIC and HEIF, the formats phones save photos in.
    """
    try:
        import pillow_heif
    except ImportError:
        return ()
    pillow_heif.register_heif_opener()
    return ("pillow-heif",)


@functools.lru_cache(maxsize=1)
def decodable_formats() -> tuple[str, ...]:
    """Pillow formats that can be opened *and* decoded (no stub or identify-only plugins), plug-ins included."""
    register_plugins()
    Image.init()
    return tuple(
        fmt for fmt, (factory, _) in Image.OPEN.items()
        if fmt not in _IDENTIFY_ONLY_FORMATS
        and not (inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile))
    )


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Extensions (lower case, with the dot) of the formats in ``decodable_formats``."""
    formats = set(decodable_formats())
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in formats)
