"""The feature table: one row per image, one column per feature, plus provenance.

A ``FeatureTable`` is what extraction produces and what scoring, testing and
reporting consume, so that the expensive stage (querying the model) and the
cheap stages (fitting, testing, plotting) are separate.

On disk it is a plain CSV file that any CSV reader understands (columns
``path``, ``sha256``, ``caption``, then the feature columns; floats written
with ``repr``, the shortest text that reads back to the identical float64)
and a JSON sidecar ``<file>.json`` holding the provenance (``meta``) and the
SHA-256 of the CSV bytes. Reading checks that hash, so a CSV edited after
extraction, or a CSV paired with another run's sidecar, is refused rather
than reported with the wrong provenance.

Text cells (``path`` and ``caption``) round-trip any text: line breaks and
other separators (``\\r``, U+2028, form feed) are kept inside quoted
fields and the reader splits records on ``\\n``/``\\r\\n`` only. A text
cell that a spreadsheet would run as a formula (starting with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return) is written with a leading
apostrophe, as OWASP recommends against CSV injection; so that this stays
reversible, a cell that itself starts with an apostrophe gets one too, and
``from_csv`` removes exactly one leading apostrophe from every text cell of
a file whose sidecar records ``"text_cells": "apostrophe-escaped"`` (or
that has no sidecar). Spreadsheets show the apostrophe-prefixed cell as the
original text.

Both files are written atomically (temporary file in the same folder, then
``os.replace``); a crash leaves either the old pair or the new one, and a
crash between the two renames is caught by the hash check.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cdi.utils.errors import CDIError
from cdi.utils.io import atomic_write_bytes

logger = logging.getLogger("cdi")

#: Columns every feature CSV starts with, in this order.
ID_COLUMNS = ("path", "sha256", "caption")
SIDECAR_FORMAT = "cdi.feature_table"
SIDECAR_VERSION = 1
#: How text cells are escaped for spreadsheets (recorded in the sidecar as ``text_cells``).
TEXT_CELLS = "apostrophe-escaped"
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "'")


@dataclass
class FeatureTable:
    """Features of a set of images, with the provenance needed to defend them.

    Attributes
    ----------
    paths : list of str
        Image paths relative to the collection root (POSIX separators).
    hashes : list of str
        SHA-256 of each image file.
    captions : list of str or None
        The caption each image was conditioned on (None: no caption). An empty
        caption is written as an empty CSV field and reads back as None.
    columns : list of str
        Feature column names, unique.
    values : numpy.ndarray
        (n_images, n_columns) float64.
    meta : dict
        JSON-able provenance: the model's ``describe()``, the feature families
        with their configs and keys, the seed, the cdi version, and so on.
    """

    paths: list[str]
    hashes: list[str]
    captions: list[str | None]
    columns: list[str]
    values: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.hashes = [str(h) for h in self.hashes]
        self.captions = [None if c is None or c == "" else str(c) for c in self.captions]
        self.columns = [str(c) for c in self.columns]
        self.values = np.asarray(self.values, dtype=np.float64)
        n = len(self.paths)
        if self.values.ndim == 1 and self.values.size == 0:
            self.values = self.values.reshape(n, len(self.columns))
        if len(self.hashes) != n or len(self.captions) != n:
            raise ValueError(
                f"paths, hashes and captions must have one entry per row: got "
                f"{n}, {len(self.hashes)}, {len(self.captions)}"
            )
        if self.values.shape != (n, len(self.columns)):
            raise ValueError(
                f"values have shape {self.values.shape}, expected ({n}, {len(self.columns)})"
            )
        duplicated = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if duplicated:
            raise ValueError(f"duplicate feature columns: {duplicated}")
        clash = sorted(set(self.columns) & set(ID_COLUMNS))
        if clash:
            raise ValueError(f"feature columns may not be named {clash}")

    def __len__(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------ selection
    def select(self, columns: Sequence[str]) -> "FeatureTable":
        """A table with only ``columns``, in the order given.

        Raises ``CDIError`` naming the unknown columns and listing the
        available ones.
        """
        columns = list(columns)
        unknown = [c for c in columns if c not in self.columns]
        if unknown:
            raise CDIError(
                f"unknown feature column(s) {unknown}; the table has: {', '.join(self.columns)}"
            )
        idx = [self.columns.index(c) for c in columns]
        return FeatureTable(
            list(self.paths), list(self.hashes), list(self.captions), columns,
            self.values[:, idx].copy(), _copy_meta(self.meta),
        )

    def subset(self, rows: Sequence[int] | np.ndarray) -> "FeatureTable":
        """A table with the given rows (integer positions or a boolean mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {rows.shape}, expected ({len(self)},)")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for a table of {len(self)} rows")
        return FeatureTable(
            [self.paths[i] for i in rows], [self.hashes[i] for i in rows],
            [self.captions[i] for i in rows], list(self.columns),
            self.values[rows].copy(), _copy_meta(self.meta),
        )

    @staticmethod
    def concat(tables: Sequence["FeatureTable"]) -> "FeatureTable":
        """Join the rows of several tables of the same extraction (e.g. shards).

        The tables must have the same columns and the same ``model_key``,
        ``families`` and ``seed`` in their meta (when present). Rows are sorted
        by path, the order of a single unsharded run over the same folder; an
        image (by SHA-256) present in two tables is an error. The result's meta
        is the first table's, without its ``shard`` entry.
        """
        tables = list(tables)
        if not tables:
            raise ValueError("nothing to concatenate")
        first = tables[0]
        for other in tables[1:]:
            if other.columns != first.columns:
                raise CDIError("cannot join feature tables with different columns")
            for key in ("model_key", "families", "seed"):
                if first.meta.get(key) != other.meta.get(key):
                    raise CDIError(
                        f"cannot join feature tables from different extractions: their {key!r} differs"
                    )
        paths = [p for t in tables for p in t.paths]
        hashes = [h for t in tables for h in t.hashes]
        captions = [c for t in tables for c in t.captions]
        values = np.concatenate([t.values for t in tables], axis=0)
        seen: dict[str, str] = {}
        for p, h in zip(paths, hashes):
            if h in seen:
                raise CDIError(f"image {p!r} is in two of the tables (same SHA-256 as {seen[h]!r})")
            seen[h] = p
        order = sorted(range(len(paths)), key=lambda i: paths[i])
        meta = _copy_meta(first.meta)
        meta.pop("shard", None)
        return FeatureTable(
            [paths[i] for i in order], [hashes[i] for i in order], [captions[i] for i in order],
            list(first.columns), values[order], meta,
        )

    # -------------------------------------------------------------- writing
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the CSV and its ``<path>.json`` provenance sidecar, atomically.

        Floats are written with ``repr`` (shortest round-trip form, ``nan``,
        ``inf``), so ``from_csv`` gives back the identical float64 values.
        Returns the CSV path.
        """
        path = Path(path)
        if path.is_dir():
            raise CDIError(f"{path} is a folder; give a file name for the feature table, e.g. {path / 'features.csv'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [list(ID_COLUMNS) + list(self.columns)]
        for i in range(len(self)):
            rows.append(
                [escape_cell(self.paths[i]), self.hashes[i], escape_cell(self.captions[i] or "")]
                + [repr(float(v)) for v in self.values[i]]
            )
        text = _csv_text(rows)
        data = text.encode("utf-8")
        sidecar = {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "csv_file": path.name,
            "csv_sha256": hashlib.sha256(data).hexdigest(),
            "n_rows": len(self),
            "columns": list(self.columns),
            "text_cells": TEXT_CELLS,
            "meta": self.meta,
        }
        sidecar_bytes = (json.dumps(sidecar, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
        atomic_write_bytes(path, data)
        atomic_write_bytes(sidecar_path(path), sidecar_bytes)
        return path

    # -------------------------------------------------------------- reading
    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "FeatureTable":
        """Read a table written by ``to_csv`` (or any CSV with the same columns).

        With a sidecar, the CSV's SHA-256 must match the one recorded there
        (otherwise ``CDIError``: the file changed after extraction and its
        provenance no longer describes it). Without a sidecar the table is
        read with empty ``meta`` and a warning on the ``cdi`` logger.
        """
        path = Path(path)
        if not path.is_file():
            raise CDIError(f"feature table {path} does not exist; run `cdi extract ... --out {path}` first")
        data = path.read_bytes()
        meta: dict = {}
        escaped = True  # CSVs without a sidecar are taken as written by this version
        side = sidecar_path(path)
        if side.is_file():
            try:
                sidecar = json.loads(side.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CDIError(f"provenance sidecar {side} is not valid JSON ({exc}); re-run the extraction") from None
            if sidecar.get("format") != SIDECAR_FORMAT:
                raise CDIError(f"{side} is not a cdi feature-table sidecar (format {sidecar.get('format')!r})")
            if sidecar.get("csv_sha256") != hashlib.sha256(data).hexdigest():
                raise CDIError(
                    f"{path} was modified after it was written: its SHA-256 differs from the one its provenance "
                    f"record {side.name} holds, so the record no longer describes it. The values cannot be "
                    f"trusted as extracted; re-run the extraction to get a table that matches its record"
                )
            meta = sidecar.get("meta", {})
            escaped = sidecar.get("text_cells") == TEXT_CELLS
        else:
            logger.warning("feature table %s has no provenance sidecar %s; reading it without provenance", path, side.name)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CDIError(f"{path} is not a UTF-8 text file") from None
        # newline="": records end at \n or \r\n only; U+2028, form feeds etc. stay inside their cell
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except StopIteration:
            raise CDIError(f"{path} is empty; expected a header starting with {', '.join(ID_COLUMNS)}") from None
        except csv.Error as exc:
            raise CDIError(f"{path} is not a valid CSV file ({exc})") from None
        if tuple(header[:3]) != ID_COLUMNS:
            raise CDIError(
                f"{path}: the header must start with {', '.join(ID_COLUMNS)}, got {', '.join(header[:3])}"
            )
        columns = header[3:]
        paths, hashes, captions, values = [], [], [], []
        try:
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise CDIError(f"{path}, line {line_no}: {len(row)} fields, expected {len(header)}")
                paths.append(unescape_cell(row[0]) if escaped else row[0])
                hashes.append(row[1])
                captions.append((unescape_cell(row[2]) if escaped else row[2]) or None)
                try:
                    values.append([float(v) for v in row[3:]])
                except ValueError:
                    bad = next(c for c, v in zip(columns, row[3:]) if not _is_float(v))
                    raise CDIError(f"{path}, line {line_no}: column {bad!r} is not a number") from None
        except csv.Error as exc:
            raise CDIError(f"{path} is not a valid CSV file ({exc})") from None
        array = np.asarray(values, dtype=np.float64).reshape(len(paths), len(columns))
        try:
            return cls(paths, hashes, captions, columns, array, meta)
        except ValueError as exc:
            raise CDIError(f"{path}: {exc}") from None


def sidecar_path(path: str | os.PathLike) -> Path:
    """The provenance sidecar of a feature CSV: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def escape_cell(text: str) -> str:
    """``text`` made inert for spreadsheets: a leading apostrophe before ``= + - @``, tab, CR or ``'``."""
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def unescape_cell(text: str) -> str:
    """The inverse of ``escape_cell``: drop one leading apostrophe."""
    return text[1:] if text.startswith("'") else text


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_text(rows: Iterable[list[str]]) -> str:
    buffer = io.StringIO()
    # CRLF (RFC 4180): with "\r" among the line-terminator characters, the writer quotes every
    # cell holding a bare "\r", which a reader would otherwise take for the end of the record
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(rows)
    return buffer.getvalue()


def _json_default(obj: Any) -> Any:
    """JSON for the few non-JSON types provenance may hold (numpy scalars, paths)."""
    if isinstance(obj, np.generic):
        value = obj.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to provenance JSON")


def _copy_meta(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=_json_default))
