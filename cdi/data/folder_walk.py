"""Listing the files of a folder to scan, and the files never offered to Pillow.

``walk_folder`` searches a folder recursively and returns sorted relative
POSIX paths. Hidden files and folders (name starting with ``.``) and
``__MACOSX`` folders are not searched; symbolic links to files are followed,
links to folders are not; a file whose name is not valid UTF-8 is set aside
(``display_path`` shows it with ``\\xNN`` escapes). ``known_non_image`` names
the captions, metadata, data files and archives that are never offered to
Pillow.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from cdi.utils.errors import CDIError

# Files never offered to Pillow: captions, metadata, common data and archives.
_NON_IMAGE_EXTENSIONS = frozenset({
    ".txt", ".json", ".jsonl", ".csv", ".tsv", ".md", ".rst", ".yaml", ".yml", ".toml", ".html",
    ".xml", ".log", ".py", ".ipynb", ".parquet", ".arrow", ".npy", ".npz", ".pt", ".pth", ".ckpt",
    ".bin", ".safetensors", ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z",
})
_NON_IMAGE_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
_SKIPPED_FOLDERS = frozenset({"__MACOSX"})


BAD_NAME_REASON = ("its file name is not valid UTF-8 (undecodable bytes shown as \\xNN), so it cannot be "
                    "written into the evidence files; rename it to UTF-8 (e.g. with convmv)")


def known_non_image(rel: str) -> bool:
    """Whether ``rel`` is a file never offered to Pillow (captions, metadata, data files, archives)."""
    name = posixpath.basename(rel)
    return name in _NON_IMAGE_NAMES or posixpath.splitext(name)[1].lower() in _NON_IMAGE_EXTENSIONS


def checked_folder(folder: str | os.PathLike, name: str) -> Path:
    """``folder`` resolved, or a ``CDIError`` if it does not exist or is not a folder."""
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


def walk_folder(root: Path) -> _Walk:
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


def link_targets(root: Path, files: list[str]) -> dict[str, str]:
    """{relative path: resolved absolute target} of the symbolic links among ``files``."""
    return {rel: str((root / rel).resolve()) for rel in files if (root / rel).is_symlink()}
