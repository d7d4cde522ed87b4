"""Harmonising two collections' encodings before the model sees them.

A creator's published images are usually web copies (re-encoded as JPEG,
often resized) while the unpublished ones are the original files. A
diffusion model treats JPEG artefacts, chroma subsampling and resampling
blur differently from clean pixels, so the two collections differ for the
model even when it never saw either: a false ``used`` that grows with the
collection size. This module finds how each image is encoded and, when the
two collections differ, chooses one processing that both pass through
(``cdi.data.preprocess.Preprocess``'s ``jpeg_quality``, ``jpeg_tables``,
``jpeg_subsampling`` and ``working_size``).

Probing (``probe_file``, ``probe_collection``)
----------------------------------------------
From the file's header only (nothing is decoded): the Pillow format; whether
it is lossy (JPEG; WebP unless lossless VP8L; HEIF/AVIF); for JPEG the
quantisation tables Pillow exposes (``Image.quantization``), the chroma
subsampling (``JpegImagePlugin.get_sampling``) and the *estimated quality*:
the libjpeg quality 1..100 whose standard tables (the IJG tables of the
JPEG standard's Annex K, scaled as ``jpeg_set_quality`` with
``force_baseline`` scales them) are nearest the file's tables in mean
absolute log ratio, luminance and chrominance tables together. An exact
match means the file was written by libjpeg (Pillow, most tools) at that
quality; otherwise the estimate is the nearest standard quality and
``standard_tables`` is False (Photoshop and camera tables, for example).
ImageMagick's ``identify -format %Q`` estimates differently (from the sum
of the table entries); both agree on libjpeg files.

The plan (``plan_harmonisation``)
---------------------------------
Each image's *encoding signature* is ``(lossy, estimated quality,
subsampling)``, with ``(False, 100, None)`` for lossless files. If the two
collections together hold more than one signature, both are re-encoded:

* **JPEG quality**: the lower of the two collections' median estimated
  quality (lossless images count as 100; a lossy image of unknown quality,
  such as lossy WebP, as ``UNKNOWN_LOSSY_QUALITY``), so that no collection
  is re-encoded at a quality above what the other already lost;
* **subsampling**: 4:2:0 if either collection's lossy images are mostly
  4:2:0, else 4:2:2 if either's are mostly 4:2:2, else 4:4:4;
* **the lower collection's own tables** (``jpeg_tables``): when every image
  of the collection(s) at that lower quality is a colour JPEG with one and
  the same set of quantisation tables, not libjpeg's at the estimated
  quality, and one subsampling (one export setting, the usual web case),
  the re-encoding uses exactly those tables and that subsampling instead
  of libjpeg's standard tables at the estimated quality. Those files are then left as they are (below) and the
  other collection goes through the identical generation, whoever wrote
  the tables (Photoshop, camera, another encoder); with libjpeg's
  standard tables the quality would only approximate foreign tables, and
  the copies would get a second generation the originals do not have.
  Mixed tables (or libjpeg's own): libjpeg's standard tables at the
  quality, with the subsampling above;
* an image whose file already *is* that encoding (those tables, or
  libjpeg's standard tables at that quality; that subsampling) and needs no
  resampling is not re-encoded: a second generation would add loss to it
  alone.

Sizes: if the smaller of the two collections' median native short sides is
below the model's resolution and the medians differ by more than
``SIZE_TOLERANCE``, both pass through that short side (``working_size``):
the larger images are brought down to it before both are brought up to the
model's resolution the same way. Re-encoding happens at the working size
(or the model's resolution), after the resize and crop, so both
collections' last JPEG generation has its blocks on the same grid the model
sees.

``reencode_jpeg`` is the one JPEG round trip both collections go through
(Pillow's libjpeg, ``optimize=False``, no progressive; with ``tables``,
Pillow's ``qtables=`` and no quality, which would rescale them).
"""

from __future__ import annotations

import io
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, JpegImagePlugin

from cdi.utils.errors import CDIError
from cdi.data.image_files import NotRegular, decodable_formats, open_regular_file, pillow_limits

if TYPE_CHECKING:
    from cdi.data.collection import ImageCollection

#: Quality assumed for a lossy file whose quality the header does not tell (lossy WebP, HEIF, AVIF):
#: libjpeg's and libwebp's default.
UNKNOWN_LOSSY_QUALITY = 75

#: Relative difference of the collections' median short sides above which both pass through the smaller.
SIZE_TOLERANCE = 0.05

SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")

# The IJG standard quantisation tables (JPEG standard Annex K), natural (row-major) order.
_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)
_CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99], dtype=np.int64)

_LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "TIFF", "GIF", "PPM", "TGA", "ICO", "DIB", "QOI", "SGI", "IM", "PCX"})
_LOSSY_UNKNOWN_FORMATS = frozenset({"HEIF", "AVIF"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})


def standard_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """libjpeg's luminance and chrominance tables at ``quality`` (``jpeg_set_quality(q, force_baseline=TRUE)``).

    Scale ``5000 / q`` below 50, ``200 - 2 q`` from 50; each entry
    ``(base * scale + 50) // 100`` clipped to 1..255.
    """
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return tuple(np.clip((base * scale + 50) // 100, 1, 255) for base in (_LUMA, _CHROMA))


_STANDARD = {q: standard_tables(q) for q in range(1, 101)}


def estimate_quality(tables: dict[int, Sequence[int]]) -> tuple[int, bool]:
    """The libjpeg quality whose standard tables are nearest ``tables`` (Pillow's ``Image.quantization``).

    Returns ``(quality, exact)``: ``exact`` when the file's tables are
    exactly libjpeg's at that quality. Distance: the mean absolute
    difference of the log table entries over table 0 (luminance) and, when
    present, table 1 (chrominance); ties go to the higher quality.
    """
    if not tables or 0 not in tables:
        raise CDIError("a JPEG without a luminance quantisation table: cannot estimate its quality")
    own = [np.asarray(tables[k], dtype=np.int64) for k in (0, 1) if k in tables]
    if any(t.shape != (64,) for t in own):
        raise CDIError("a JPEG quantisation table does not have 64 entries")
    best, best_distance = 100, float("inf")
    for q in range(100, 0, -1):
        standard = _STANDARD[q]
        distance = float(np.mean([np.mean(np.abs(np.log(t) - np.log(s))) for t, s in zip(own, standard)]))
        if distance < best_distance:
            best, best_distance = q, distance
    exact = all(np.array_equal(t, s) for t, s in zip(own, _STANDARD[best]))
    return best, exact


def jpeg_tables(tables) -> tuple[tuple[int, ...], ...]:
    """Quantisation tables (Pillow's ``Image.quantization`` dict, or a sequence of tables) as a tuple of tuples.

    In table-id order: the order Pillow's ``qtables=`` assigns ids 0, 1, ...
    on saving. Hashable and comparable, for the plan, ``Preprocess`` and the
    store key (JSON turns it into lists).
    """
    values = [tables[k] for k in sorted(tables)] if isinstance(tables, dict) else list(tables)
    result = tuple(tuple(int(v) for v in table) for table in values)
    if not 1 <= len(result) <= 4 or any(len(t) != 64 or not all(1 <= v <= 65535 for v in t) for t in result):
        raise CDIError("JPEG quantisation tables must be 1 to 4 tables of 64 entries 1..65535")
    return result


@dataclass(frozen=True)
class EncodingProbe:
    """How one image file is encoded (from its header).

    ``quality`` is the estimated JPEG quality (``estimate_quality``), 100 for
    lossless files and ``UNKNOWN_LOSSY_QUALITY`` for lossy files whose
    quality the header does not tell (``quality_known`` False);
    ``standard_tables`` whether a JPEG's tables are exactly libjpeg's at
    that quality; ``subsampling`` ``"4:4:4"``/``"4:2:2"``/``"4:2:0"`` for
    colour JPEGs, else None; ``width``/``height`` the stored size;
    ``tables`` a JPEG's quantisation tables as stored (``Image.quantization``
    in table-id order, 64 entries each, natural order), else None: the plan
    re-encodes with them when a whole collection shares one set.
    """

    format: str
    lossy: bool
    quality: int
    quality_known: bool
    standard_tables: bool
    subsampling: str | None
    palette: bool
    width: int
    height: int
    tables: tuple[tuple[int, ...], ...] | None = None

    @property
    def signature(self) -> tuple[bool, int, str | None]:
        """``(lossy, quality, subsampling)``: two images with the same signature went through the same encoding."""
        return (self.lossy, self.quality, self.subsampling)

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)


def probe_image(image: Image.Image) -> EncodingProbe:
    """The ``EncodingProbe`` of an opened (not necessarily loaded) Pillow image."""
    fmt = (image.format or "").upper()
    width, height = image.size
    palette = image.mode in ("P", "PA")
    if fmt in _JPEG_FORMATS:
        tables = getattr(image, "quantization", None) or {}
        quality, exact = estimate_quality(tables)
        sampling = JpegImagePlugin.get_sampling(image)
        subsampling = SUBSAMPLINGS[sampling] if sampling in (0, 1, 2) else None
        return EncodingProbe("JPEG", True, quality, True, exact, subsampling, False, width, height,
                             jpeg_tables(tables))
    if fmt == "WEBP":
        lossless = _webp_lossless(image)
        return EncodingProbe("WEBP", not lossless, 100 if lossless else UNKNOWN_LOSSY_QUALITY, lossless, False,
                             None, False, width, height)
    if fmt in _LOSSY_UNKNOWN_FORMATS:
        return EncodingProbe(fmt, True, UNKNOWN_LOSSY_QUALITY, False, False, None, False, width, height)
    # PNG, BMP, TIFF (a JPEG-compressed TIFF counts as lossless here: rare, and Pillow hides its tables), GIF...
    return EncodingProbe(fmt or "unknown", False, 100, True, False, None, palette, width, height)


def _webp_lossless(image: Image.Image) -> bool:
    """Whether a WebP holds a lossless (VP8L) bitstream, read from its RIFF chunks."""
    fp = getattr(image, "fp", None)
    try:
        fp.seek(12)
        head = fp.read(64 * 1024)
    except (AttributeError, OSError, ValueError):
        return False
    return head[:4] == b"VP8L" or (head[:4] == b"VP8X" and b"VP8L" in head and b"VP8 " not in head)


def probe_bytes(data: bytes, max_pixels: int | None = None) -> EncodingProbe:
    """``EncodingProbe`` of an image file's bytes (header only)."""
    from cdi.data.collection import DEFAULT_MAX_PIXELS

    with pillow_limits(max_pixels or DEFAULT_MAX_PIXELS):
        with Image.open(io.BytesIO(data), formats=decodable_formats()) as image:
            return probe_image(image)


def probe_collection(collection: "ImageCollection") -> list[EncodingProbe]:
    """``EncodingProbe`` of every image of a collection, in record order (headers only).

    The size is the record's upright size (EXIF orientation applied).
    """
    probes = []
    with pillow_limits(collection.max_pixels):
        for record in collection.records:
            path = Path(collection.root) / record.path
            where = f"{collection.name} image {record.path} (in {collection.root})"
            try:
                with open_regular_file(path) as fh, Image.open(fh, formats=decodable_formats()) as image:
                    probe = probe_image(image)
            except NotRegular as exc:
                raise CDIError(f"the {where} is now {exc.args[0]}; restore the image file") from None
            except (OSError, SyntaxError, ValueError) as exc:
                raise CDIError(f"cannot read the header of the {where} any more ({exc}); restore it, or scan "
                               "the folder again") from None
            probes.append(_with_size(probe, record.width, record.height))
    return probes


def _with_size(probe: EncodingProbe, width: int, height: int) -> EncodingProbe:
    values = asdict(probe)
    values.update(width=int(width), height=int(height))
    return EncodingProbe(**values)


def summarise(probes: Sequence[EncodingProbe]) -> dict[str, Any]:
    """What a collection's encodings look like, for ``result.json`` and the report.

    ``formats`` counts, ``lossy`` count, ``quality`` (median, min, max of
    the estimated quality over lossy images, None if none), ``subsampling``
    counts over colour JPEGs, ``nonstandard_tables`` (JPEGs whose tables
    are not libjpeg's), ``short_side`` (median, min, max in pixels) and
    ``median_quality`` (median over all images, lossless counting 100).
    """
    if not probes:
        raise CDIError("no images to summarise")
    lossy = [p for p in probes if p.lossy]
    qualities = [p.quality for p in lossy]
    shorts = [p.short_side for p in probes]
    return {
        "n_images": len(probes),
        "formats": dict(sorted(Counter(p.format for p in probes).items())),
        "lossy": len(lossy),
        "quality": None if not lossy else {"median": _median(qualities), "min": min(qualities),
                                           "max": max(qualities)},
        "quality_unknown": sum(1 for p in lossy if not p.quality_known),
        "nonstandard_tables": sum(1 for p in probes if p.format == "JPEG" and not p.standard_tables),
        "subsampling": dict(sorted(Counter(p.subsampling for p in probes if p.subsampling).items())),
        "palette": sum(1 for p in probes if p.palette),
        "short_side": {"median": _median(shorts), "min": min(shorts), "max": max(shorts)},
        "median_quality": _median([p.quality for p in probes]),
    }


def _median(values: Sequence[float]) -> float:
    value = statistics.median(values)
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True)
class HarmonisationPlan:
    """What both collections go through before the model, and why (see the module docstring).

    ``jpeg_quality`` None: no re-encoding; ``jpeg_tables`` None: libjpeg's
    standard tables at ``jpeg_quality``, else exactly these tables (the lower
    collection's own; ``jpeg_quality`` is then their estimated quality, for
    the record); ``working_size`` None: straight to the model's resolution. ``enabled`` False when the user turned
    harmonisation off (``--no-harmonise``); the plan then records what
    *would* have been done (``wanted``) and changes nothing.
    """

    enabled: bool
    jpeg_quality: int | None
    jpeg_subsampling: str | None
    working_size: int | None
    reasons: tuple[str, ...]
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)
    jpeg_tables: tuple[tuple[int, ...], ...] | None = None

    @property
    def changes_input(self) -> bool:
        """Whether the model's input differs from a plain decode (re-encoding or a working size)."""
        return self.enabled and (self.jpeg_quality is not None or self.working_size is not None)

    @property
    def wanted(self) -> bool:
        """Whether the encodings differ so that harmonising was (or would have been) called for."""
        return self.jpeg_quality is not None or self.working_size is not None

    @property
    def jpeg_tables_of(self) -> str | None:
        """Whose tables ``jpeg_tables`` are: the collection(s) at the lower median quality, in words (None without)."""
        if self.jpeg_tables is None or not self.collections:
            return None
        return " and ".join(_lower_collections(self.collections))

    def apply(self, preprocess):
        """``preprocess`` (a ``cdi.data.preprocess.Preprocess``) with this plan's settings, or unchanged when off."""
        from dataclasses import replace

        if not self.changes_input:
            return preprocess
        return replace(preprocess, jpeg_quality=self.jpeg_quality, jpeg_subsampling=self.jpeg_subsampling,
                       jpeg_tables=self.jpeg_tables, working_size=self.working_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "applied": self.changes_input,
            "wanted": self.wanted,
            "jpeg_quality": self.jpeg_quality,
            "jpeg_subsampling": self.jpeg_subsampling,
            "jpeg_tables": None if self.jpeg_tables is None else [list(t) for t in self.jpeg_tables],
            "jpeg_tables_of": self.jpeg_tables_of,
            "working_size": self.working_size,
            "reasons": list(self.reasons),
            "collections": self.collections,
        }


def plan_harmonisation(
    published: Sequence[EncodingProbe],
    unpublished: Sequence[EncodingProbe],
    resolution: int,
    *,
    enabled: bool = True,
    off_reason: str = "harmonisation was turned off (--no-harmonise): the images were used as decoded",
) -> HarmonisationPlan:
    """Decide the common processing of two collections (rules in the module docstring).

    Parameters
    ----------
    published, unpublished : sequences of EncodingProbe
    resolution : int
        The model's input side.
    enabled : bool
        False (``--no-harmonise``): record the decision but change nothing.
    off_reason : str
        What the record says when ``enabled`` is False and harmonising was called for.
    """
    summaries = {"published": summarise(published), "unpublished": summarise(unpublished)}
    reasons: list[str] = []
    quality = subsampling = tables = None
    signatures = {p.signature for p in (*published, *unpublished)}
    if len(signatures) > 1:
        medians = {name: s["median_quality"] for name, s in summaries.items()}
        quality = int(np.floor(min(medians.values())))
        owners = _lower_collections(summaries)
        probes = {"published": published, "unpublished": unpublished}
        tables, subsampling = _one_export_setting([p for name in owners for p in probes[name]])
        if tables is None or _standard_at(tables, quality):  # libjpeg's tables at the quality: the same encoding
            tables, subsampling = None, _common_subsampling([published, unpublished])
            how = f"JPEG at quality {quality}"
        else:
            how = (f"JPEG with the {' and '.join(owners)} collection's own quantisation tables (not libjpeg's), "
                   f"estimated quality {quality}")
        reasons.append(
            "the encodings differ (" + "; ".join(f"{name}: {_encoding_words(s)}" for name, s in summaries.items())
            + f"): both are re-encoded as {how}, chroma {subsampling}")
    size = None
    shorts = {name: s["short_side"]["median"] for name, s in summaries.items()}
    small, large = min(shorts.values()), max(shorts.values())
    if small < resolution and large > small * (1 + SIZE_TOLERANCE):
        size = int(round(small))
        reasons.append(
            f"the native sizes differ (median short side: published {shorts['published']} px, unpublished "
            f"{shorts['unpublished']} px) and the smaller is below the model's {resolution} px: both pass "
            f"through a short side of {size} px before being brought to {resolution} px")
    if not reasons:
        reasons.append("both collections have the same encoding and comparable sizes: nothing to harmonise")
    elif not enabled:
        reasons.append(off_reason)
    return HarmonisationPlan(enabled=enabled, jpeg_quality=quality, jpeg_subsampling=subsampling,
                             working_size=size, reasons=tuple(reasons), collections=summaries, jpeg_tables=tables)


def _lower_collections(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The names of the collections (``summarise`` results by name) at the lower median quality: both on a tie."""
    lowest = min(s["median_quality"] for s in summaries.values())
    return [name for name, s in summaries.items() if s["median_quality"] == lowest]


def _one_export_setting(probes: Sequence[EncodingProbe]) -> tuple[tuple[tuple[int, ...], ...] | None, str | None]:
    """``(tables, subsampling)`` when every probe is a colour JPEG with the same tables and subsampling, else
    ``(None, None)``: those images came out of one export setting, which the other collection can be put through."""
    settings = {(p.tables, p.subsampling) for p in probes}
    if len(settings) != 1:
        return None, None
    tables, subsampling = settings.pop()
    if tables is None or subsampling is None:  # not a JPEG, or greyscale
        return None, None
    return tables, subsampling


def _standard_at(tables: tuple[tuple[int, ...], ...], quality: int) -> bool:
    """Whether ``tables`` are libjpeg's standard tables at ``quality`` (luminance, chrominance when present)."""
    standard = _STANDARD[min(max(int(quality), 1), 100)]
    return len(tables) <= 2 and all(np.array_equal(t, s) for t, s in zip(tables, standard))


def _common_subsampling(collections: Sequence[Sequence[EncodingProbe]]) -> str:
    """The coarsest majority subsampling of the collections' colour JPEGs (4:2:0 when none has any)."""
    majorities = []
    for probes in collections:
        counts = Counter(p.subsampling for p in probes if p.subsampling)
        if counts:
            majorities.append(max(counts, key=lambda s: (counts[s], SUBSAMPLINGS.index(s))))
    if not majorities:
        return "4:2:0"  # libjpeg's and Pillow's default, what web copies almost always use
    return max(majorities, key=SUBSAMPLINGS.index)


def _encoding_words(summary: dict[str, Any]) -> str:
    formats = ", ".join(f"{n} {fmt}" for fmt, n in summary["formats"].items())
    if summary["quality"] is None:
        return formats
    q = summary["quality"]
    return f"{formats}, lossy quality {q['min']}-{q['max']} (median {q['median']})"


# ------------------------------------------------------------------ encoding
def reencode_jpeg(image: Image.Image, quality: int, subsampling: str,
                  tables: Sequence[Sequence[int]] | None = None) -> Image.Image:
    """One JPEG generation: encode ``image`` (RGB or L) with Pillow's libjpeg and decode it again.

    Standard tables at ``quality``, or exactly ``tables`` when given
    (Pillow's ``qtables=``, table ids in order; no quality is passed with
    them, since Pillow would scale them by it); chroma ``subsampling``
    (ignored for greyscale), baseline, no optimisation of the Huffman tables
    (which does not change pixels anyway).
    """
    if subsampling not in SUBSAMPLINGS:
        raise CDIError(f"JPEG subsampling must be one of {', '.join(SUBSAMPLINGS)}, got {subsampling!r}")
    buffer = io.BytesIO()
    if tables is None:
        image.save(buffer, format="JPEG", quality=int(quality), subsampling=subsampling)
    else:
        image.save(buffer, format="JPEG", qtables=[list(t) for t in tables], subsampling=subsampling)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.copy()


def already_encoded(image: Image.Image, quality: int, subsampling: str,
                    tables: Sequence[Sequence[int]] | None = None) -> bool:
    """Whether a decoded file is itself a JPEG with libjpeg's tables at ``quality`` (or exactly ``tables``, when
    given) and that subsampling."""
    if (image.format or "").upper() not in _JPEG_FORMATS:
        return False
    own = getattr(image, "quantization", None) or {}
    if 0 not in own:
        return False
    own = jpeg_tables(own)
    if not (own == jpeg_tables(tables) if tables is not None else _standard_at(own, quality)):
        return False
    sampling = JpegImagePlugin.get_sampling(image)
    if sampling == -1:  # greyscale (one component): no chroma to subsample
        return image.mode == "L"
    return sampling in (0, 1, 2) and SUBSAMPLINGS[sampling] == subsampling
