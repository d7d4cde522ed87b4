"""The evidence folder's layout: its file names, and the commit point that makes a write one unit.

``cdi.audit.evidence`` writes an audit's files into a staging folder, renames it to ``.cdi-commit`` (the
commit point) and moves the files into place; ``resolve`` reads a folder whose last write stopped after
the commit point as the committed audit, and ``finish_swap`` completes such a write. Kept apart from
``evidence`` so that ``cdi.audit.result`` and ``cdi.reports`` can read a folder without importing the
writer (which imports them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cdi.utils.io import fsync_folder
from cdi.engine.table import sidecar_path

RESULT_FILE = "result.json"
FEATURES_FILE = "features.csv"
REPORT_FILE = "report.html"
SIDECAR_FILE = sidecar_path(FEATURES_FILE).name
#: The files of one audit, in the order they are moved into place (result.json last).
EVIDENCE_FILES = (SIDECAR_FILE, FEATURES_FILE, REPORT_FILE, RESULT_FILE)
#: The files whose SHA-256 ``result.json`` records.
HASHED_FILES = (FEATURES_FILE, SIDECAR_FILE)
STAGING = ".cdi-staging"
COMMIT = ".cdi-commit"
COLLECTIONS = ("published", "unpublished")


def resolve(out: str | Path) -> dict[str, Path]:
    """Where each evidence file of the folder's current audit is: ``{name: path}``.

    A file still waiting in ``.cdi-commit`` (a swap interrupted after its
    commit point) takes the place of the one in ``out``. The paths may not
    exist (no audit, or a file missing).
    """
    out = Path(out)
    commit = out / COMMIT
    return {name: commit / name if (commit / name).exists() else out / name for name in EVIDENCE_FILES}


def swap_pending(out: str | Path) -> bool:
    """True if a committed audit has not been moved completely into ``out`` yet."""
    return (Path(out) / COMMIT).is_dir()


def finish_swap(out: str | Path) -> None:
    """Complete an interrupted write: move a committed audit's files into ``out``; remove staging debris."""
    out = Path(out)
    commit = out / COMMIT
    if commit.is_dir():
        for name in EVIDENCE_FILES:
            if (commit / name).exists():
                os.replace(commit / name, out / name)
        fsync_folder(out)
        shutil.rmtree(commit)
        fsync_folder(out)
    if (out / STAGING).exists():
        shutil.rmtree(out / STAGING)
        fsync_folder(out)
