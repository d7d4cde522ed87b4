"""An audit's noise draws: which seeds, how their columns are kept in ``features.csv``, and the test's arrays.

``--noise-draws R`` (default ``DEFAULT_NOISE_DRAWS``) extracts the families
that draw noise R times, at ``features.base.draw_seed(seed, 0..R-1)``; the
verdict averages the pooled statistic over the R tables
(``cdi.stats.draws``, where the why and the measurements are). Draw 0 is the
audit's own extraction at ``--seed``: its columns are ``features.csv``'s
columns as before. The columns of draw r >= 1 follow them in the same file,
named ``<column>@draw<r>``, so the evidence stays one table that
``cdi verify`` re-tests exactly. Seed-free families (SecMI, PIA, SimA) are
extracted once; their columns repeat in every draw's table for the test.
Cost: R - 1 more extractions of the noise-drawing families (about 0.8 of an
audit's network time each with the default features).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cdi.engine.table import FeatureTable
from cdi.utils.errors import CDIError

#: Noise draws of an audit that runs a model (issue 21: the seed spread of the verdict, docs/notes/issue-21-seed.md).
DEFAULT_NOISE_DRAWS = 2
#: Most noise draws one audit may ask for.
MAX_NOISE_DRAWS = 10
#: Separates a column's name from its draw in ``features.csv``.
DRAW_MARK = "@draw"


def check_noise_draws(draws: int | None) -> None:
    """``--noise-draws`` is a whole number from 1 to ``MAX_NOISE_DRAWS`` (None: the default)."""
    if draws is None:
        return
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= MAX_NOISE_DRAWS:
        raise CDIError(f"--noise-draws must be a whole number from 1 to {MAX_NOISE_DRAWS}, got {draws!r}; each "
                       "draw beyond the first re-extracts the noise-drawing features once")


def draw_column(column: str, draw: int) -> str:
    return f"{column}{DRAW_MARK}{int(draw)}"


def with_draw_columns(table: FeatureTable, draws: Sequence[FeatureTable]) -> FeatureTable:
    """``table`` with the columns of each draw r = 1, 2, ... appended as ``<column>@draw<r>`` (same rows)."""
    values, columns = [table.values], list(table.columns)
    for r, extra in enumerate(draws, start=1):
        if list(extra.hashes) != list(table.hashes):
            raise RuntimeError("a noise draw's table lists other images than the audit's table")
        values.append(np.asarray(extra.values, dtype=np.float64))
        columns += [draw_column(c, r) for c in extra.columns]
    return FeatureTable(list(table.paths), list(table.hashes), list(table.captions), columns,
                        np.concatenate(values, axis=1), dict(table.meta))


def split_draw_columns(table: FeatureTable) -> tuple[FeatureTable, list[FeatureTable]]:
    """The inverse of ``with_draw_columns``: the draw-0 table and one table per further draw (in draw order)."""
    main = [k for k, c in enumerate(table.columns) if DRAW_MARK not in c]
    by_draw: dict[int, list[int]] = {}
    for k, column in enumerate(table.columns):
        if DRAW_MARK in column:
            name, _, number = column.rpartition(DRAW_MARK)
            if not number.isdigit() or int(number) < 1 or name not in table.columns:
                raise CDIError(f"features.csv has a column {column!r} that names no draw of a column it holds")
            by_draw.setdefault(int(number), []).append(k)
    if sorted(by_draw) != list(range(1, len(by_draw) + 1)):
        raise CDIError(f"features.csv holds noise draws {sorted(by_draw)}; expected 1, 2, ... without gaps")

    def pick(indices: list[int], strip: bool) -> FeatureTable:
        names = [table.columns[k].rpartition(DRAW_MARK)[0] if strip else table.columns[k] for k in indices]
        return FeatureTable(list(table.paths), list(table.hashes), list(table.captions), names,
                            np.asarray(table.values)[:, indices], dict(table.meta))

    return pick(main, False), [pick(by_draw[r], True) for r in sorted(by_draw)]


def redrawn_tables(tables: Sequence[FeatureTable], redrawn: Sequence[FeatureTable]) -> list[np.ndarray]:
    """The value arrays of ``tables`` with the columns of ``redrawn`` (same images, same order) replaced."""
    out = []
    for table, new in zip(tables, redrawn):
        if list(new.hashes) != list(table.hashes):
            raise RuntimeError("seed check: the re-extracted table lists other images than the audit's table")
        values = np.array(table.values, dtype=np.float64, copy=True)
        index = {c: k for k, c in enumerate(table.columns)}
        for k, column in enumerate(new.columns):
            values[:, index[column]] = new.values[:, k]
        out.append(values)
    return out


def draw_values(tables: Sequence[FeatureTable], draws: Sequence[Sequence[FeatureTable]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The test's (published, unpublished) arrays of each further draw: the audit's tables with the draw's columns."""
    return [tuple(redrawn_tables(tables, draw)) for draw in draws]
