"""Image collections: find, validate, hash, caption and preprocess images.

A folder, searched recursively, becomes an ``ImageCollection``: one
``ImageRecord`` per distinct image (relative POSIX path, SHA-256 of the file
bytes, upright pixel size, Pillow mode, caption), in sorted path order. The
SHA-256 is the image's identity everywhere else in cdi (noise, caches,
reports), so a collection is validated once, when it is scanned:

* every file that is not a known non-image file is offered to Pillow; a file
  Pillow identifies is an image and is fully decoded (``load``) so that
  truncated files are caught now rather than half-way through an audit;
* a file Pillow cannot identify or decode is *unreadable* when its extension
  is one Pillow decodes (``.png``, ``.jpg``, ...), otherwise it is not an
  image and is only counted in ``ignored``;
* images over ``max_pixels`` are refused from their header, before decoding
  (decompression-bomb guard; Pillow's own warning is silenced because this
  check replaces it);
* unreadable and oversized files are an error, unless ``skip_bad`` is set,
  in which case they are left out and listed in ``skipped``;
* the same bytes twice in one collection: the first path in sorted order is
  kept, the others are listed in ``duplicates`` and a warning is logged on
  the ``"cdi"`` logger;
* captions come from Hugging Face imagefolder ``metadata.jsonl`` files (in
  the root or any subfolder; ``file_name`` relative to that file's folder,
  caption under ``text`` or else ``caption``), else from a sidecar
  ``NAME.txt`` beside ``NAME.png``, else there is none. A metadata entry
  naming a file that is not an image of the folder is an error.

Hidden files and folders (name starting with ``.``) and ``__MACOSX`` folders
are not searched. Symbolic links to files are followed, links to folders are
not.

Decoding for the model happens in a torch ``DataLoader`` (``image_batches``),
whose worker processes read each file once, check that its SHA-256 still
matches the scan, and preprocess it (``preprocess_image``): EXIF transpose,
conversion to RGB or L, resize of the shorter side and centre crop (or a
squash to the square), scaling to [-1, 1].
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import posixpath
import re
import stat
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cdi import __version__
from cdi.errors import CDIError
from cdi.io import atomic_write_text

logger = logging.getLogger("cdi")

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image accepted by default (64 megapixels): larger files are refused
before decoding as possible decompression bombs; raise ``max_pixels`` for
genuine large images."""

METADATA_NAME = "metadata.jsonl"

# Files never offered to Pillow: captions, metadata, common data and archives.
_NON_IMAGE_EXTENSIONS = frozenset({
    ".txt", ".json", ".jsonl", ".csv", ".tsv", ".md", ".rst", ".yaml", ".yml", ".toml", ".html",
    ".xml", ".log", ".py", ".ipynb", ".parquet", ".arrow", ".npy", ".npz", ".pt", ".pth", ".ckpt",
    ".bin", ".safetensors", ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z",
})
_NON_IMAGE_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
_SKIPPED_FOLDERS = frozenset({"__MACOSX"})

# Formats Pillow registers but only identifies (stub plugins, MPEG): a file of
# one of these is not an image cdi can use, and is not "corrupt" either.
_IDENTIFY_ONLY_FORMATS = frozenset({"MPEG"})

# Modes preprocess_image converts; anything else (e.g. LAB) is unreadable.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_SUPPORTED_MODES = frozenset({
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "F",
}) | _SIXTEEN_BIT_MODES

_EXIF_ORIENTATION = 0x0112
_LISTED = 20  # files named in one error message before "... and N more"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ImageRecord:
    """One image of a collection.

    ``width`` and ``height`` are the upright size, after the EXIF orientation
    is applied (what a viewer shows and what preprocessing crops); ``mode`` is
    the Pillow mode of the decoded file before any conversion.
    """

    path: str
    sha256: str
    width: int
    height: int
    mode: str
    caption: str | None
    pixel_sha256: str | None = None  # SHA-256 of the upright RGB pixels (``pixel_digest``)
    phash: str | None = None  # 64-bit perceptual hash, hex (``perceptual_hash``)


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of a collection with ``skip_bad``, and why."""

    path: str
    reason: str


@dataclass
class ImageCollection:
    """The validated images of one folder, in sorted relative-path order.

    Build one with ``ImageCollection.from_folder``. ``skipped`` lists the
    unreadable or oversized files left out with ``skip_bad``;
    ``duplicates`` the ``(dropped path, kept path)`` pairs of identical files
    or images with identical pixels (``duplicate_kind``: ``"file"`` or
    ``"pixels"`` per dropped path); ``ignored`` the files that are neither
    images nor caption files in use (``ignored_reasons`` says why for each);
    ``links`` maps every symbolic link among the files to its resolved
    target; ``caption_files`` lists the ``metadata.jsonl`` and sidecar files
    whose captions were used. ``file_log`` puts all of this together: every
    file seen, with what happened to it.
    """

    root: Path
    records: list[ImageRecord]
    skipped: list[SkippedFile] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    name: str = "images"
    max_pixels: int = DEFAULT_MAX_PIXELS
    duplicate_kind: dict[str, str] = field(default_factory=dict)
    ignored_reasons: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    caption_files: list[str] = field(default_factory=list)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        *,
        name: str = "images",
        skip_bad: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> "ImageCollection":
        """Scan ``folder`` recursively and validate every image in it.

        Parameters
        ----------
        folder : path
            The folder to search (recursively).
        name : str
            What the folder is called in messages, e.g. ``"published"``.
        skip_bad : bool
            Leave unreadable and oversized files out (listed in ``skipped``)
            instead of raising.
        max_pixels : int
            Largest accepted width * height, checked from the file header
            before decoding.

        Raises
        ------
        CDIError
            The folder is missing or empty, holds no readable image, holds
            unreadable or oversized images (without ``skip_bad``), or its
            caption files are malformed or name files that are not images
            of the folder.
        """
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise CDIError(f"max_pixels must be a positive whole number of pixels, got {max_pixels!r}")
        root = _checked_folder(folder, name)
        walk = _walk(root)
        files, hidden = walk.files, walk.hidden
        if not files and not walk.bad_names:
            raise CDIError(
                f"the {name} folder {root} is empty{' (apart from hidden files)' if hidden else ''}: "
                "put the images in it (subfolders are searched too)"
            )
        present = set(files)
        metadata_captions, named_by, metadata_files = _read_metadata(root, files, present, name)

        images: dict[str, tuple[str, int, int, str, str, str]] = {}  # path -> _Outcome.info
        # (path, kind, reason), kind in {"bad_name", "not_regular", "unreadable", "too_large"}
        bad: list[tuple[str, str, str]] = [(p, "bad_name", _BAD_NAME_REASON) for p in walk.bad_names]
        ignored_reasons: dict[str, str] = {p: "hidden (name starts with '.') or __MACOSX" for p in hidden}
        ignored_reasons.update({p: "link to a folder (links to folders are not followed)"
                                for p in walk.folder_links})
        candidates = [p for p in files if p not in metadata_files]
        with _pillow_limits(max_pixels):
            for rel in candidates:
                if _known_non_image(rel):
                    ignored_reasons[rel] = f"not an image (extension {posixpath.splitext(rel)[1] or rel})"
                    continue
                outcome = _scan_file(root / rel, max_pixels)
                if outcome.kind == "image":
                    images[rel] = outcome.info
                elif outcome.kind == "not_image":
                    ignored_reasons[rel] = outcome.reason or "not an image Pillow can read"
                else:
                    bad.append((rel, outcome.kind, outcome.reason))

        if bad and not skip_bad:
            raise CDIError(_bad_files_message(root, name, bad, max_pixels))
        skipped = [SkippedFile(rel, reason) for rel, _, reason in sorted(bad)]
        if skipped:
            logger.warning("%s folder %s: left out %d unusable file(s) (skip_bad): %s",
                           name, root, len(skipped), ", ".join(s.path for s in skipped[:_LISTED]))
        if not images:
            raise CDIError(_no_image_message(root, name, len(files) + len(hidden), skipped))

        skipped_paths = {s.path for s in skipped}
        not_images = [f"{p}  ({where})" for p, where in sorted(named_by.items())
                      if p not in images and p not in skipped_paths]
        if not_images:
            raise CDIError(
                f"{METADATA_NAME} in the {name} folder {root} names {len(not_images)} file(s) that are not "
                f"images there:\n{_listing(not_images)}\n"
                f"Fix their file_name (relative to the folder that holds the {METADATA_NAME}) or remove "
                "those lines."
            )

        records: list[ImageRecord] = []
        duplicates: list[tuple[str, str]] = []
        duplicate_kind: dict[str, str] = {}
        used_sidecars: set[str] = set()
        first_path: dict[str, str] = {}
        first_pixels: dict[str, str] = {}
        for rel in sorted(images):
            sha, width, height, mode, pixel_sha, phash = images[rel]
            if sha in first_path or pixel_sha in first_pixels:
                kept = first_path.get(sha) or first_pixels[pixel_sha]
                duplicates.append((rel, kept))
                duplicate_kind[rel] = "file" if sha in first_path else "pixels"
                continue
            first_path[sha] = rel
            first_pixels[pixel_sha] = rel
            caption = metadata_captions.get(rel)
            if caption is None:
                sidecar = posixpath.splitext(rel)[0] + ".txt"
                if sidecar in present:
                    caption = _read_sidecar(root, sidecar, name)
                    used_sidecars.add(sidecar)
            records.append(ImageRecord(rel, sha, width, height, mode, caption, pixel_sha, phash))
        if duplicates:
            logger.warning(
                "%s folder %s: %d duplicate image(s) (same file or same pixels) left out, keeping the first "
                "path in sorted order: %s", name, root, len(duplicates),
                "; ".join(f"{dropped} (same {duplicate_kind[dropped]} as {kept})"
                          for dropped, kept in duplicates[:_LISTED]),
            )
        for sidecar in used_sidecars:
            ignored_reasons.pop(sidecar, None)
        ignored = sorted(ignored_reasons)
        return cls(root=root, records=records, skipped=skipped, duplicates=duplicates,
                   ignored=ignored, name=name, max_pixels=max_pixels, duplicate_kind=duplicate_kind,
                   ignored_reasons=ignored_reasons, links=_link_targets(root, files),
                   caption_files=sorted(set(metadata_files) | used_sidecars))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def hashes(self) -> list[str]:
        """SHA-256 of each image, in record order."""
        return [r.sha256 for r in self.records]

    @property
    def captions(self) -> list[str | None]:
        """Caption of each image (None where there is none), in record order."""
        return [r.caption for r in self.records]

    def subset(self, indices: Sequence[int]) -> "ImageCollection":
        """The records at ``indices`` (in that order), same root; scan notes are kept.

        Raises ``IndexError`` for an index out of range and ``ValueError`` for
        a repeated one (hashes stay unique within a collection).
        """
        indices = [int(i) for i in indices]
        n = len(self.records)
        for i in indices:
            if not 0 <= i < n:
                raise IndexError(f"index {i} out of range for a collection of {n} images")
        if len(set(indices)) != len(indices):
            raise ValueError("subset indices must not repeat")
        return dataclasses.replace(self, records=[self.records[i] for i in indices])

    def summary(self) -> dict[str, Any]:
        """Counts for display: images, captions, modes, size range, most common sizes."""
        sizes = Counter((r.width, r.height) for r in self.records)
        return {
            "images": len(self.records),
            "captioned": sum(r.caption is not None for r in self.records),
            "modes": dict(sorted(Counter(r.mode for r in self.records).items())),
            "width": [min(r.width for r in self.records), max(r.width for r in self.records)] if self.records else None,
            "height": [min(r.height for r in self.records), max(r.height for r in self.records)] if self.records else None,
            "common_sizes": [[w, h, c] for (w, h), c in sizes.most_common(5)],
            "skipped": len(self.skipped),
            "duplicates": len(self.duplicates),
            "ignored": len(self.ignored),
            "links": len(self.links),
        }

    def manifest(self) -> dict[str, Any]:
        """A JSON-able description: root, settings, every record, skipped, duplicates, ignored."""
        return {
            "name": self.name,
            "root": str(self.root),
            "max_pixels": self.max_pixels,
            "count": len(self.records),
            "records": [dataclasses.asdict(r) for r in self.records],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "duplicates": [{"dropped": d, "kept": k, "same": self.duplicate_kind.get(d, "file")}
                           for d, k in self.duplicates],
            "ignored": list(self.ignored),
            "files": self.file_log(),
        }

    def file_log(self) -> list[dict[str, Any]]:
        """Every file seen in the folder, in path order, with what happened to it.

        Each entry has ``path`` and ``status``: ``"used"`` (with its
        ``sha256``), ``"skipped"`` (``reason``: unreadable, oversized, not a
        regular file, undecodable name), ``"duplicate"`` (``of``: the kept
        path; ``same``: ``"file"`` or ``"pixels"``), ``"ignored"``
        (``reason``) or ``"caption_file"``. A symbolic link also has
        ``link_target``, the file it resolves to. Records dropped later by
        ``subset`` are still ``"used"`` here: the log describes the scan.
        """
        entries: dict[str, dict[str, Any]] = {}
        for r in self.records:
            entries[r.path] = {"path": r.path, "status": "used", "sha256": r.sha256}
        for s in self.skipped:
            entries[s.path] = {"path": s.path, "status": "skipped", "reason": s.reason}
        for dropped, kept in self.duplicates:
            entries[dropped] = {"path": dropped, "status": "duplicate", "of": kept,
                                "same": self.duplicate_kind.get(dropped, "file")}
        for path in self.ignored:
            entries[path] = {"path": path, "status": "ignored",
                             "reason": self.ignored_reasons.get(path, "not an image")}
        for path in self.caption_files:
            entries[path] = {"path": path, "status": "caption_file"}
        for path, target in self.links.items():
            entries.setdefault(path, {"path": path, "status": "ignored", "reason": "link"})["link_target"] = target
        return [entries[p] for p in sorted(entries)]

    def file_counts(self) -> dict[str, int]:
        """How many files ``file_log`` lists per status, plus ``links``."""
        counts = Counter(e["status"] for e in self.file_log())
        keys = ("used", "skipped", "duplicate", "ignored", "caption_file")
        return {**{k: counts.get(k, 0) for k in keys}, "links": len(self.links)}


def load_audit_collections(
    published: str | os.PathLike,
    unpublished: str | os.PathLike,
    *,
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[ImageCollection, ImageCollection]:
    """Scan the published (P) and unpublished (U) folders and check they share no image.

    Raises
    ------
    CDIError
        Either folder is invalid (see ``ImageCollection.from_folder``), the
        two are the same folder or one contains the other, or an image is in
        both (``check_disjoint``).
    """
    p_root = _checked_folder(published, "published")
    u_root = _checked_folder(unpublished, "unpublished")
    if p_root == u_root:
        raise CDIError(f"the published and unpublished folders are the same folder ({p_root}); "
                       "give two different folders")
    for outer, inner, outer_name, inner_name in [(p_root, u_root, "published", "unpublished"),
                                                 (u_root, p_root, "unpublished", "published")]:
        if outer in inner.parents:
            raise CDIError(
                f"the {inner_name} folder {inner} is inside the {outer_name} folder {outer}, so every "
                f"{inner_name} image would also count as {outer_name} (folders are searched "
                "recursively); move them into two separate folders"
            )
    p = ImageCollection.from_folder(p_root, name="published", skip_bad=skip_bad, max_pixels=max_pixels)
    u = ImageCollection.from_folder(u_root, name="unpublished", skip_bad=skip_bad, max_pixels=max_pixels)
    check_disjoint(p, u)
    return p, u


def check_disjoint(published: ImageCollection, unpublished: ImageCollection) -> None:
    """Raise a ``CDIError`` listing the images in both collections.

    An image is in both when the files are identical (same SHA-256) or when
    they decode to the same pixels (same ``pixel_sha256``: a lossless
    re-encoding such as PNG -> WebP, or a greyscale copy). An unpublished
    image must be one the model cannot have seen; the same image among the
    published ones would make the two sets overlap and bias the test.

    Refusing (rather than dropping the pair from both folders and going on)
    is deliberate: a shared image means the folders were not assembled as
    the user believes, and which side is wrong is theirs to decide; an audit
    that silently tested a different set than the one handed in would be
    harder to defend.
    """
    u_files = {r.sha256: r.path for r in unpublished.records}
    u_pixels = {r.pixel_sha256: r.path for r in unpublished.records if r.pixel_sha256 is not None}
    shared = []
    for r in published.records:
        if r.sha256 in u_files:
            shared.append(f"published {r.path}  =  unpublished {u_files[r.sha256]}")
        elif r.pixel_sha256 in u_pixels:
            shared.append(f"published {r.path}  =  unpublished {u_pixels[r.pixel_sha256]}  (same pixels, "
                          "different file)")
    if shared:
        raise CDIError(
            f"{len(shared)} image(s) are in both the published folder {published.root} and the unpublished "
            f"folder {unpublished.root} (identical files, or files that decode to identical pixels):\n"
            f"{_listing(shared)}\n"
            "Unpublished images must be ones the model cannot have seen, so a shared image corrupts the "
            "test. Remove each of these from one of the two folders."
        )


#: Largest pHash Hamming distance (of 64 bits) at which two images count as near-duplicates
#: (see ``perceptual_hash`` for what it catches and how often unrelated images come this close).
NEAR_DUPLICATE_BITS = 3


def near_duplicates(
    published: ImageCollection, unpublished: ImageCollection, *, max_bits: int = NEAR_DUPLICATE_BITS
) -> list[dict[str, Any]]:
    """Pairs (published, unpublished) whose perceptual hashes differ in at most ``max_bits`` bits.

    Perceptual near-duplicates (a re-compressed or resized copy, a light
    retouch) are not refused like exact ones: the hash also matches some
    genuinely different images that are merely alike (plain backgrounds,
    simple graphics), so they are reported for a person to look at. Each pair
    is ``{"published", "unpublished", "distance"}``, sorted by distance then
    paths.
    """
    def bits(collection):
        paths = [r.path for r in collection.records if r.phash is not None]
        values = np.array([int(r.phash, 16) for r in collection.records if r.phash is not None], dtype=np.uint64)
        return paths, values

    p_paths, p_hash = bits(published)
    u_paths, u_hash = bits(unpublished)
    pairs = []
    if not (p_paths and u_paths):
        return pairs
    for i in range(len(p_paths)):
        xor = (u_hash ^ p_hash[i]).view(np.uint8).reshape(-1, 8)
        distance = np.unpackbits(xor, axis=1).sum(axis=1)
        for j in np.flatnonzero(distance <= max_bits):
            pairs.append({"published": p_paths[i], "unpublished": u_paths[j], "distance": int(distance[j])})
    return sorted(pairs, key=lambda d: (d["distance"], d["published"], d["unpublished"]))


def write_manifest(path: str | os.PathLike, collections: Sequence[ImageCollection]) -> None:
    """Write the manifests of ``collections`` (keyed by name) to ``path`` as JSON, atomically."""
    document = {"cdi_version": __version__, "collections": {c.name: c.manifest() for c in collections}}
    try:
        atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        raise CDIError(f"cannot write the manifest {path}: {exc.strerror or exc}; choose another path") from None


# --------------------------------------------------------------------------- preprocessing


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
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    image = _convert_mode(image, "RGB" if pre.channels == 3 else "L")
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


def _convert_mode(image: Image.Image, target: str) -> Image.Image:
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


# --------------------------------------------------------------------------- loading for the model


class CollectionDataset(torch.utils.data.Dataset):
    """The images of a collection as preprocessed tensors, for a ``DataLoader``.

    Item ``i`` is ``(pixels, position)``: the (C, H, W) tensor of
    ``collection.records[position]``, where ``position = indices[i]`` (or
    ``i`` when ``indices`` is None). The file is read once; its SHA-256 must
    still equal the recorded one, so every number cdi computes belongs to the
    exact bytes that were scanned and hashed.
    """

    def __init__(self, collection: ImageCollection, preprocess: Preprocess,
                 indices: Sequence[int] | None = None) -> None:
        n = len(collection.records)
        positions = list(range(n)) if indices is None else [int(i) for i in indices]
        for i in positions:
            if not 0 <= i < n:
                raise IndexError(f"index {i} out of range for a collection of {n} images")
        self.collection = collection
        self.preprocess = preprocess
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        position = self.positions[i]
        data, where = self.read(position)
        record = self.collection.records[position]
        return decode_checked(data, record.sha256, self.preprocess, self.collection.max_pixels, where), position

    def read(self, position: int) -> tuple[bytes, str]:
        """The file bytes of ``collection.records[position]`` and the words naming it in errors."""
        record = self.collection.records[position]
        where = f"{self.collection.name} image {record.path} (in {self.collection.root})"
        try:
            with open_regular_file(self.collection.root / record.path) as fh:
                return fh.read(), where
        except _NotRegular as exc:
            raise CDIError(f"the {where} is now {exc.args[0]}; restore the image file") from None
        except OSError as exc:
            raise CDIError(f"cannot read the {where} any more: {exc.strerror or exc}; "
                           "restore it, or scan the folder again") from None


def decode_checked(data: bytes, sha256: str, pre: Preprocess, max_pixels: int, where: str) -> torch.Tensor:
    """Preprocess an image file's bytes, after checking they still hash to ``sha256`` (``CDIError`` if not).

    ``where`` names the image in the error message. Used by the loader here
    and by Ray workers, which receive the bytes from the driver.
    """
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CDIError(
            f"the {where} changed since the folder was scanned (SHA-256 {sha256[:12]}... then, "
            f"{digest[:12]}... now); scan the folder again so the recorded hashes match the images used"
        )
    with _pillow_limits(max_pixels):
        image = Image.open(io.BytesIO(data), formats=_decodable_formats())
        image.load()
    return preprocess_image(image, pre)


def default_num_workers() -> int:
    """Decoding worker processes by default: min(4, usable CPUs - 1), so 0 on one CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def image_batches(
    collection: ImageCollection,
    pre: Preprocess,
    *,
    batch_size: int,
    indices: Sequence[int] | None = None,
    num_workers: int | None = None,
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Yield ``(pixels, positions)`` batches in order, decoded in worker processes.

    ``pixels`` is (B, C, H, W) float32 in [-1, 1]; ``positions`` are indices
    into ``collection.records``. Decoding runs in ``num_workers`` processes
    (default ``default_num_workers()``; 0 decodes in this process) so it
    overlaps the caller's model work; the output does not depend on the
    number of workers. A file that changed or vanished since the scan raises
    a ``CDIError`` naming it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CDIError(f"batch_size must be a positive whole number, got {batch_size!r}")
    if num_workers is None:
        num_workers = default_num_workers()
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise CDIError(f"the number of decoding workers must be 0 or more, got {num_workers!r}")
    dataset = CollectionDataset(collection, pre, indices)
    n_batches = -(-len(dataset) // batch_size)
    loader = torch.utils.data.DataLoader(
        _Guarded(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, n_batches),
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    return _checked_batches(loader)  # arguments are checked now, files are read when iterated


def _checked_batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, list[int]]]:
    for pixels, positions, error in loader:
        if error is not None:
            raise CDIError(error)
        yield pixels, positions


class _Guarded(torch.utils.data.Dataset):
    """Returns a ``CDIError``'s message instead of raising it, so that an error
    in a worker process reaches the user as its plain message (the DataLoader
    would wrap it in a worker traceback)."""

    def __init__(self, dataset: CollectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | str:
        try:
            return self.dataset[i]
        except CDIError as exc:
            return str(exc)


def _collate(items: list) -> tuple[torch.Tensor | None, list[int], str | None]:
    for item in items:
        if isinstance(item, str):
            return None, [], item
    # numpy's single-threaded copy: torch.stack is slow when many threads compete for the CPU
    pixels = torch.from_numpy(np.stack([t.numpy() for t, _ in items]))
    return pixels, [p for _, p in items], None


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class _Outcome:
    kind: str  # "image" | "not_image" | "not_regular" | "unreadable" | "too_large"
    # (sha256, width, height, mode, pixel sha256, phash) for images
    info: tuple[str, int, int, str, str, str] | None = None
    reason: str = ""


_BAD_NAME_REASON = ("its file name is not valid UTF-8 (undecodable bytes shown as \\xNN), so it cannot be "
                    "written into the evidence files; rename it to UTF-8 (e.g. with convmv)")


def open_regular_file(path: Path):
    """Open ``path`` for reading in binary mode, or raise ``_NotRegular`` if it is not a regular file.

    The file is opened without blocking and checked with ``fstat`` on the
    open descriptor, so a FIFO, socket or device named like an image (or a
    link to one) is never read: reading a FIFO would wait forever for a
    writer, a device could stream without end.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegular(_file_kind(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _NotRegular(Exception):
    """Raised by ``open_regular_file``; the argument names the kind of file."""


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _scan_file(path: Path, max_pixels: int) -> _Outcome:
    """Identify, size-check, hash and fully decode one file (call inside ``_pillow_limits``)."""
    image_ext = path.suffix.lower() in _image_extensions()
    try:
        fh = open_regular_file(path)
    except _NotRegular as exc:
        reason = f"not a regular file: {exc.args[0]}"
        return _Outcome("not_regular", reason=reason) if image_ext else _Outcome("not_image", reason=reason)
    except OSError as exc:
        if not image_ext:
            return _Outcome("not_image", reason=f"not an image (cannot be read: {exc.strerror or exc})")
        return _Outcome("unreadable", reason=f"cannot be read ({exc.strerror or exc})")
    try:
        with fh:
            try:
                with Image.open(fh, formats=_decodable_formats()) as probe:  # reads the header only
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
        image = Image.open(io.BytesIO(data), formats=_decodable_formats())
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
    upright = _upright_rgb(image)
    width, height = upright.size
    return _Outcome("image", info=(sha, width, height, mode, pixel_digest(upright), perceptual_hash(upright)))


def _upright_rgb(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: EXIF orientation applied, converted to RGB."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return _convert_mode(image, "RGB")


def pixel_digest(image: Image.Image) -> str:
    """SHA-256 of an RGB image's size and pixel bytes: the same for any lossless re-encoding.

    Two files with this digest decode to the same upright RGB pixels (PNG,
    lossless WebP, TIFF, BMP copies of one image, or a greyscale file and its
    RGB copy), so every model input made from them is identical too, for any
    resolution or crop; it is the "decoded, preprocessed pixels" identity,
    computed once at scan time without knowing the model.
    """
    header = f"{image.width}x{image.height}:".encode()
    return hashlib.sha256(header + image.tobytes()).hexdigest()


def perceptual_hash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash (pHash) of an image, as 16 hex digits.

    pHash (Zauner 2010, the variant of the ``imagehash`` package): the
    greyscale image shrunk to 32x32 with a box filter (area average), its 2-D
    DCT-II, the 8x8 lowest frequencies, one bit per coefficient: 1 where it is
    above their median (the DC term left out of the median). Re-compressed or
    resized copies differ in a few of the 64 bits, unrelated images in about
    half. Measured on the toy world's 32 px digits, the hardest case (simple
    shapes on a plain background): over 807,000 member/non-member pairs, 4
    pairs within 3 bits, none within 1; a JPEG (quality 60) copy within 4
    bits (95%: 2), an 8x upscale within 2.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


# DCT-II basis (unnormalised: the scale does not change which coefficients exceed the median)
_DCT32 = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(32)[:, None] / 64)


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    return f"{pixels}, over the limit of {max_pixels:,}"


_limits_lock = threading.Lock()


@contextlib.contextmanager
def _pillow_limits(max_pixels: int) -> Iterator[None]:
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
def _decodable_formats() -> tuple[str, ...]:
    """Pillow formats that can be opened *and* decoded (no stub or identify-only plugins)."""
    Image.init()
    return tuple(
        fmt for fmt, (factory, _) in Image.OPEN.items()
        if fmt not in _IDENTIFY_ONLY_FORMATS
        and not (inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile))
    )


@functools.lru_cache(maxsize=1)
def _image_extensions() -> frozenset[str]:
    """Extensions (lower case, with the dot) of the formats in ``_decodable_formats``."""
    formats = set(_decodable_formats())
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in formats)


def _known_non_image(rel: str) -> bool:
    name = posixpath.basename(rel)
    return name in _NON_IMAGE_NAMES or posixpath.splitext(name)[1].lower() in _NON_IMAGE_EXTENSIONS


def _checked_folder(folder: str | os.PathLike, name: str) -> Path:
    path = Path(folder).expanduser()
    if not path.exists():
        raise CDIError(f"the {name} folder {path} does not exist: check the path")
    if not path.is_dir():
        raise CDIError(f"the {name} folder {path} is not a folder: give the folder that holds the images")
    return path.resolve()


@dataclass
class _Walk:
    files: list[str]  # sorted relative POSIX paths of the files searched
    hidden: list[str]  # hidden files and folders (folders end with "/"), not searched
    folder_links: list[str]  # links to folders (end with "/"), not followed
    bad_names: list[str]  # files whose path is not valid UTF-8, shown with \xNN escapes


def _walk(root: Path) -> _Walk:
    """The files under ``root``: searched, hidden, links to folders, and those with undecodable names."""
    found = _Walk([], [], [], [])

    def on_error(exc: OSError) -> None:
        raise CDIError(f"cannot list the folder {exc.filename}: {exc.strerror}; check its permissions")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for d in list(dirnames):
            if d.startswith(".") or d in _SKIPPED_FOLDERS:
                dirnames.remove(d)
                found.hidden.append(display_path(prefix + d + "/"))
            elif os.path.islink(os.path.join(dirpath, d)):
                found.folder_links.append(display_path(prefix + d + "/"))
        for f in filenames:
            rel = prefix + f
            if f.startswith("."):
                found.hidden.append(display_path(rel))
            elif display_path(rel) != rel:
                found.bad_names.append(display_path(rel))
            else:
                found.files.append(rel)
    for part in (found.files, found.hidden, found.folder_links, found.bad_names):
        part.sort()
    return found


def display_path(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 (which Python decodes to lone
    surrogates) are shown as ``\\xNN``. Unchanged for every valid name."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _link_targets(root: Path, files: list[str]) -> dict[str, str]:
    """{relative path: resolved absolute target} of the symbolic links among ``files``."""
    return {rel: str((root / rel).resolve()) for rel in files if (root / rel).is_symlink()}


def _read_metadata(
    root: Path, files: list[str], present: set[str], name: str
) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """Read every ``metadata.jsonl`` under ``root``.

    Returns {image path: caption}, {every named path: "line N of FILE"} and
    the set of metadata files read. A name that does not exist is an error.
    """
    metadata_files = [p for p in files if posixpath.basename(p) == METADATA_NAME]
    for p in files:
        if posixpath.basename(p) == "metadata.csv":
            logger.warning("%s folder %s: %s is not read; cdi reads captions from %s files only (convert it)",
                           name, root, p, METADATA_NAME)
    captions: dict[str, str] = {}
    named_by: dict[str, str] = {}
    missing: list[str] = []
    for meta in metadata_files:
        base = posixpath.dirname(meta)
        try:
            lines = _read_text_file(root / meta).split("\n")
        except (OSError, UnicodeDecodeError, _NotRegular) as exc:
            raise CDIError(f"cannot read {meta} in the {name} folder {root}: {exc}; "
                           "it must be a UTF-8 text file with one JSON object per line") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"line {number} of {meta} in the {name} folder {root}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CDIError(f"{where} is not valid JSON ({exc.msg}); each line must be one JSON object "
                               'like {"file_name": "a.png", "text": "a caption"}') from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise CDIError(f'{where} has no "file_name" string; each line must name its image, like '
                               '{"file_name": "a.png", "text": "a caption"}')
            target = posixpath.normpath(posixpath.join(base, entry["file_name"]))
            if target in named_by:
                raise CDIError(f"{where} names {target}, which {named_by[target]} already names; "
                               "give each image one caption")
            named_by[target] = f"line {number} of {meta}"
            if target.startswith("../") or target == ".." or posixpath.isabs(target) or target not in present:
                missing.append(f"{target}  (line {number} of {meta})")
                continue
            caption = entry.get("text", entry.get("caption"))
            if caption is not None and not isinstance(caption, str):
                raise CDIError(f'{where}: the caption ("text" or "caption") must be a string, '
                               f"got {type(caption).__name__}")
            if caption is not None:
                if _has_lone_surrogate(caption):
                    raise CDIError(f"{where}: the caption holds a lone surrogate escape (e.g. \\ud800), which is "
                                   "not a character; fix the \\u escapes of that caption")
                captions[target] = caption
    if missing:
        raise CDIError(
            f"{METADATA_NAME} in the {name} folder {root} names {len(missing)} file(s) that do not exist:\n"
            f"{_listing(missing)}\n"
            f"Fix their file_name (relative to the folder that holds the {METADATA_NAME}) or remove those lines."
        )
    return captions, named_by, set(metadata_files)


def _read_text_file(path: Path) -> str:
    """A regular UTF-8 text file's contents (never blocks on a FIFO)."""
    with open_regular_file(path) as fh:
        return fh.read().decode("utf-8")


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_sidecar(root: Path, rel: str, name: str) -> str:
    try:
        return _read_text_file(root / rel).strip()
    except (OSError, UnicodeDecodeError, _NotRegular) as exc:
        raise CDIError(f"cannot read the caption file {rel} in the {name} folder {root}: {exc}; "
                       "caption files must be UTF-8 text") from None


def _listing(lines: Sequence[str]) -> str:
    shown = [f"  {line}" for line in lines[:_LISTED]]
    if len(lines) > _LISTED:
        shown.append(f"  ... and {len(lines) - _LISTED} more")
    return "\n".join(shown)


def _bad_files_message(root: Path, name: str, bad: list[tuple[str, str, str]], max_pixels: int) -> str:
    kinds = {kind for _, kind, _ in bad}
    parts = [f"{len(bad)} file(s) in the {name} folder {root} cannot be used:",
             _listing([f"{rel}: {reason}" for rel, _, reason in bad])]
    if "unreadable" in kinds:
        parts.append("Corrupt or truncated files: replace them with intact copies or remove them.")
    if "not_regular" in kinds:
        parts.append("FIFOs, sockets and devices are never read: remove them or give them another extension.")
    if "bad_name" in kinds:
        parts.append("File names must be UTF-8: rename those files (e.g. `convmv -f latin1 -t utf8 -r --notest "
                     "FOLDER`).")
    if "too_large" in kinds:
        parts.append(f"Images over {max_pixels:,} pixels are refused as possible decompression bombs: "
                     "if you trust them, raise the limit with --max-pixels (audit, extract, inspect, shift, speed; "
                     "max_pixels=... in Python).")
    parts.append("Or pass --skip-bad (skip_bad=True) to leave these files out; they are then listed "
                 "as skipped in the manifest.")
    return "\n".join(parts)


def _no_image_message(root: Path, name: str, n_files: int, skipped: list[SkippedFile]) -> str:
    if skipped:
        return (f"no usable image in the {name} folder {root}: all {len(skipped)} image file(s) were "
                f"skipped as unusable:\n{_listing([f'{s.path}: {s.reason}' for s in skipped])}")
    return (f"no readable image in the {name} folder {root}: none of its {n_files} file(s) is an image "
            "Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF and the other formats it supports); "
            "check that this is the right folder")
