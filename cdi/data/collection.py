"""Image collections: a folder scanned into validated image records.

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

The pieces live in their own modules: ``cdi.data.folder_walk`` (which files are
searched), ``cdi.data.image_files`` (reading and checking one file),
``cdi.data.caption_files`` (``metadata.jsonl`` and sidecars), ``cdi.data.duplicates``
(pixel and perceptual hashes, the P/U overlap checks). Images reach the model
through ``cdi.data.image_loader`` and ``cdi.data.preprocess``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cdi import __version__
from cdi.data.caption_files import METADATA_NAME, read_metadata, read_sidecar
from cdi.data.duplicates import check_disjoint
from cdi.utils.errors import LISTED, CDIError, listing
from cdi.data.folder_walk import BAD_NAME_REASON, checked_folder, known_non_image, link_targets, walk_folder
from cdi.data.image_files import pillow_limits, scan_file
from cdi.utils.io import atomic_write_text

logger = logging.getLogger("cdi")

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image accepted by default (64 megapixels): larger files are refused
before decoding as possible decompression bombs; raise ``max_pixels`` for
genuine large images."""


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
        root = checked_folder(folder, name)
        walk = walk_folder(root)
        files, hidden = walk.files, walk.hidden
        if not files and not walk.bad_names:
            raise CDIError(
                f"the {name} folder {root} is empty{' (apart from hidden files)' if hidden else ''}: "
                "put the images in it (subfolders are searched too)"
            )
        present = set(files)
        metadata_captions, named_by, metadata_files = read_metadata(root, files, present, name)

        images: dict[str, tuple[str, int, int, str, str, str]] = {}  # path -> _Outcome.info
        # (path, kind, reason), kind in {"bad_name", "not_regular", "unreadable", "too_large", "needs_plugin"}
        bad: list[tuple[str, str, str]] = [(p, "bad_name", BAD_NAME_REASON) for p in walk.bad_names]
        ignored_reasons: dict[str, str] = {p: "hidden (name starts with '.') or __MACOSX" for p in hidden}
        ignored_reasons.update({p: "link to a folder (links to folders are not followed)"
                                for p in walk.folder_links})
        candidates = [p for p in files if p not in metadata_files]
        with pillow_limits(max_pixels):
            for rel in candidates:
                if known_non_image(rel):
                    ignored_reasons[rel] = f"not an image (extension {posixpath.splitext(rel)[1] or rel})"
                    continue
                outcome = scan_file(root / rel, max_pixels)
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
                           name, root, len(skipped), ", ".join(s.path for s in skipped[:LISTED]))
        if not images:
            raise CDIError(_no_image_message(root, name, len(files) + len(hidden), skipped))

        skipped_paths = {s.path for s in skipped}
        not_images = [f"{p}  ({where})" for p, where in sorted(named_by.items())
                      if p not in images and p not in skipped_paths]
        if not_images:
            raise CDIError(
                f"{METADATA_NAME} in the {name} folder {root} names {len(not_images)} file(s) that are not "
                f"images there:\n{listing(not_images)}\n"
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
                    caption = read_sidecar(root, sidecar, name)
                    used_sidecars.add(sidecar)
            records.append(ImageRecord(rel, sha, width, height, mode, caption, pixel_sha, phash))
        if duplicates:
            logger.warning(
                "%s folder %s: %d duplicate image(s) (same file or same pixels) left out, keeping the first "
                "path in sorted order: %s", name, root, len(duplicates),
                "; ".join(f"{dropped} (same {duplicate_kind[dropped]} as {kept})"
                          for dropped, kept in duplicates[:LISTED]),
            )
        for sidecar in used_sidecars:
            ignored_reasons.pop(sidecar, None)
        ignored = sorted(ignored_reasons)
        return cls(root=root, records=records, skipped=skipped, duplicates=duplicates,
                   ignored=ignored, name=name, max_pixels=max_pixels, duplicate_kind=duplicate_kind,
                   ignored_reasons=ignored_reasons, links=link_targets(root, files),
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
    p_root = checked_folder(published, "published")
    u_root = checked_folder(unpublished, "unpublished")
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


def write_manifest(path: str | os.PathLike, collections: Sequence[ImageCollection]) -> None:
    """Write the manifests of ``collections`` (keyed by name) to ``path`` as JSON, atomically."""
    document = {"cdi_version": __version__, "collections": {c.name: c.manifest() for c in collections}}
    try:
        atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        raise CDIError(f"cannot write the manifest {path}: {exc.strerror or exc}; choose another path") from None


def _bad_files_message(root: Path, name: str, bad: list[tuple[str, str, str]], max_pixels: int) -> str:
    kinds = {kind for _, kind, _ in bad}
    parts = [f"{len(bad)} file(s) in the {name} folder {root} cannot be used:",
             listing([f"{rel}: {reason}" for rel, _, reason in bad])]
    if "unreadable" in kinds:
        parts.append("Corrupt or truncated files: replace them with intact copies or remove them.")
    if "not_regular" in kinds:
        parts.append("FIFOs, sockets and devices are never read: remove them or give them another extension.")
    if "bad_name" in kinds:
        parts.append("File names must be UTF-8: rename those files (e.g. `convmv -f latin1 -t utf8 -r --notest "
                     "FOLDER`).")
    if "needs_plugin" in kinds:
        parts.append("HEIC and HEIF photos (the format phones save) need a Pillow plug-in: pip install "
                     "\"cdi[heif]\" installs pillow-heif, and cdi then reads them; or convert them to JPEG or PNG.")
    if "too_large" in kinds:
        parts.append(f"Images over {max_pixels:,} pixels are refused as possible decompression bombs: "
                     "if you trust them, raise the limit with --max-pixels.")
    parts.append("Or pass --skip-bad to leave these files out; they are then listed as skipped in the manifest.")
    return "\n".join(parts)


def _no_image_message(root: Path, name: str, n_files: int, skipped: list[SkippedFile]) -> str:
    if skipped:
        return (f"no usable image in the {name} folder {root}: all {len(skipped)} image file(s) were "
                f"skipped as unusable:\n{listing([f'{s.path}: {s.reason}' for s in skipped])}")
    return (f"no readable image in the {name} folder {root}: none of its {n_files} file(s) is an image "
            "Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF and the other formats it supports); "
            "check that this is the right folder")
