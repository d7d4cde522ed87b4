"""The evidence folder: an audit's files, written so that they always belong together.

An audit writes four files into its output folder (``EVIDENCE_FILES``):
``result.json``, ``features.csv``, its provenance sidecar
``features.csv.json``, and ``report.html``. Two mechanisms keep them one
audit, each covering what the other cannot:

**Binding by hashes (detection).** ``result.json`` records the SHA-256 of
``features.csv`` and ``features.csv.json`` (``evidence_files``), and
``report.html`` shows the SHA-256 of the ``result.json`` it was rendered
from (a ``<meta name="cdi-result-sha256">`` tag and a line in its provenance
section). The report cannot also be listed in ``result.json``: it shows that
file's hash, a cycle; the chain report -> result.json -> feature table binds
all four. Whatever happened to the folder (a crash, files copied by hand from
two audits, an edit), ``cdi verify`` can tell whether the files belong
together.

**Swap with one commit point (prevention).** Hashes detect a mixed folder
but do not prevent one. The files are therefore first written into
``OUT/.cdi-staging/`` (each fsynced, then the folder). One rename,
``.cdi-staging`` -> ``.cdi-commit``, is the commit point. Then each file is
moved from ``.cdi-commit`` into ``OUT`` (``os.replace``; ``result.json``
last), ``OUT`` is fsynced and ``.cdi-commit`` removed.

* Killed before the commit: ``OUT`` still holds the complete old audit; the
  staging folder is debris that the next write removes.
* Killed after it: the new audit is complete, each file either still in
  ``.cdi-commit`` or already in ``OUT``. ``resolve`` reads the folder this
  way (so ``AuditResult.load`` and ``cdi verify`` see the new audit, never a
  mix), and ``finish_swap``, run by the next write into the folder, completes
  the moves.

Why not one rename of a whole folder: ``OUT`` may hold other things (the
demo's ``data/``, the user's own files), a rename cannot replace a non-empty
folder, and the atomic exchange of two folders (``renameat2``) is
Linux-only. Why not symbolic links to a generation folder: they do not
survive being zipped or copied to Windows, where evidence often goes.

Two audits writing into the same folder at the same time are not supported
(the second removes the first's staging folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cdi.utils.errors import CDIError
from cdi.utils.io import atomic_write_bytes, atomic_write_text, fsync_folder, sha256_bytes, sha256_file
from cdi.audit.folder import (  # re-exported: the evidence folder's layout and commit point
    COLLECTIONS, COMMIT, EVIDENCE_FILES, FEATURES_FILE, HASHED_FILES, REPORT_FILE, RESULT_FILE, SIDECAR_FILE,
    STAGING, finish_swap, resolve, swap_pending,
)
from cdi.audit.result import AuditResult
from cdi.engine.table import FeatureTable

# --------------------------------------------------------------------- reading
def check_out_folder(out: str | Path, *, force: bool) -> None:
    """Refuse an output folder whose files an audit must not replace; ``CDIError`` says why.

    * ``out`` exists but is not a folder;
    * ``out`` already holds an audit and ``force`` is False;
    * ``out`` holds ``features.csv``, its sidecar or ``report.html`` but no
      ``result.json``: they are not an audit cdi wrote (or a broken one), so
      they are not replaced even with ``force``;
    * ``out/result.json`` is not a cdi audit result (not replaced either).

    An unwritable folder is found by the input checks before the model loads.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CDIError(f"--out {out} exists and is not a folder; choose a folder for the audit's files")
    if not out.is_dir():
        return
    files = resolve(out)
    if not files[RESULT_FILE].exists():
        present = [name for name in EVIDENCE_FILES if files[name].exists()]
        if present:
            raise CDIError(
                f"{out} holds {', '.join(present)} but no {RESULT_FILE}, so not an audit written by cdi; "
                f"cdi will not overwrite it (not even with --force): choose another --out, or move those files away"
            )
        return
    try:
        data = json.loads(files[RESULT_FILE].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict) or "schema_version" not in data or "verdict" not in data:
        raise CDIError(
            f"{out / RESULT_FILE} is not a cdi audit result; cdi will not overwrite it (not even with --force): "
            f"choose another --out, or move the file away"
        )
    if not force:
        raise CDIError(
            f"{out} already holds an audit ({RESULT_FILE}); choose another --out or pass --force to replace it"
        )


# --------------------------------------------------------------------- writing
def write_evidence(out: str | Path, result: AuditResult, tables: Sequence[FeatureTable]) -> Path:
    """Write an audit's evidence files into ``out``, replacing an earlier audit as one (module docstring).

    ``tables`` are the feature tables of the published and the unpublished
    images, in the rows' order of the result's manifest. Sets
    ``result.evidence_files`` to the SHA-256 of the feature table files.
    Appends the audit to its ledger first and sets ``result.ledger``
    (``cdi.audit.ledger.record_audit``). Refuses (``check_out_folder``) a folder
    holding files that are not a cdi audit; replacing an audit is the caller's decision (``--force``),
    checked before the work began. Returns ``out``.
    """
    from cdi.reports.html import render_report

    published, unpublished = tables
    out = Path(out)
    check_out_folder(out, force=True)  # again: files of the user's may have appeared since the run began
    out.mkdir(parents=True, exist_ok=True)
    finish_swap(out)
    from cdi.audit.ledger import record_audit

    result.ledger = record_audit(result, out)  # before the files: an audit that ran is on record (cdi.audit.ledger)
    staging = out / STAGING
    staging.mkdir()
    combined_table(published, unpublished).to_csv(staging / FEATURES_FILE)
    result.evidence_files = {name: sha256_file(staging / name) for name in HASHED_FILES}
    data = result.to_bytes()
    atomic_write_bytes(staging / RESULT_FILE, data)
    atomic_write_text(staging / REPORT_FILE, render_report(result, result_sha256=sha256_bytes(data)))
    fsync_folder(staging)
    os.replace(staging, out / COMMIT)  # the commit point
    fsync_folder(out)
    finish_swap(out)
    return out


# -------------------------------------------------------------- feature table
def combined_table(published: FeatureTable, unpublished: FeatureTable) -> FeatureTable:
    """One table of both collections: each row keeps its own hash, caption and values.

    The path of a row is ``"<collection>/<path>"``, the image's path relative
    to its collection folder prefixed by ``published`` or ``unpublished``;
    the published rows come first, each collection in the order it was
    tested, so ``split_table`` gives back the tables the statistics ran on.
    The provenance keeps what describes the values (model, families, seed,
    preprocessing) and leaves out what describes the run (creation time,
    seconds, store hits), so the same audit gives the same bytes.
    """
    if published.columns != unpublished.columns:
        raise CDIError("the published and unpublished feature tables have different columns")
    keep = ("kind", "cdi_version", "model", "model_key", "preprocess", "families", "seed")
    meta = {key: published.meta[key] for key in keep if key in published.meta}
    meta["kind"] = "cdi.audit_features"
    meta["rows"] = "path is <collection>/<path relative to that collection's folder>; published rows first"
    meta["collections"] = {name: len(table) for name, table in zip(COLLECTIONS, (published, unpublished))}
    return FeatureTable(
        [f"published/{p}" for p in published.paths] + [f"unpublished/{p}" for p in unpublished.paths],
        published.hashes + unpublished.hashes,
        published.captions + unpublished.captions,
        list(published.columns),
        np.concatenate([published.values, unpublished.values], axis=0),
        meta,
    )


def split_table(table: FeatureTable) -> tuple[FeatureTable, FeatureTable]:
    """The published and unpublished tables of a ``combined_table`` (paths without the prefix, order kept)."""
    rows: dict[str, list[int]] = {name: [] for name in COLLECTIONS}
    for i, path in enumerate(table.paths):
        collection, _, rest = path.partition("/")
        if collection not in rows or not rest:
            raise CDIError(
                f"row {i + 2} of the feature table has path {path!r}, which does not start with "
                f"published/ or unpublished/; not an audit's {FEATURES_FILE}"
            )
        rows[collection].append(i)
    parts = []
    for name in COLLECTIONS:
        part = table.subset(rows[name])
        part.paths = [p.partition("/")[2] for p in part.paths]
        parts.append(part)
    return parts[0], parts[1]
