"""Reading a folder's captions: Hugging Face ``metadata.jsonl`` files and ``NAME.txt`` sidecars.

Captions come from imagefolder ``metadata.jsonl`` files (in the root or any
subfolder; ``file_name`` relative to that file's folder, caption under
``text`` or else ``caption``), else from a sidecar ``NAME.txt`` beside
``NAME.png``, else there is none (``cdi.data.collection`` applies this order). A
metadata entry naming a file that does not exist is an error. Generated
captions (``--captions auto``) are ``cdi.models.captions``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path

from cdi.utils.errors import CDIError, listing
from cdi.data.image_files import NotRegular, open_regular_file

logger = logging.getLogger("cdi")

METADATA_NAME = "metadata.jsonl"


def read_metadata(
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
        except (OSError, UnicodeDecodeError, NotRegular) as exc:
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
            f"{listing(missing)}\n"
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


def read_sidecar(root: Path, rel: str, name: str) -> str:
    """The caption in the sidecar file ``rel`` (UTF-8 text, surrounding whitespace stripped)."""
    try:
        return _read_text_file(root / rel).strip()
    except (OSError, UnicodeDecodeError, NotRegular) as exc:
        raise CDIError(f"cannot read the caption file {rel} in the {name} folder {root}: {exc}; "
                       "caption files must be UTF-8 text") from None
