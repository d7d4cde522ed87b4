"""The feature store: a content-addressed, crash-safe cache of feature values.

Extracting features is the expensive stage (hours of GPU time on real
models); this store makes it resumable and shareable. A value is addressed by

``(model_key, family_key, seed, image_sha256, condition)``

* ``model_key``: the weights' fingerprint, the dtype the network computes in
  and everything else that decides what the model sees (see
  ``features.extract.model_key``);
* ``family_key``: the feature family's name and a hash of its config
  (``FeatureFamily.key()``);
* ``seed``: the global seed of the noise draws;
* ``image_sha256``: the SHA-256 of the image file;
* ``condition``: what the model was conditioned on (a digest of the caption
  for text models, the class id for class models, ``""`` for unconditional
  models), so that changing a caption never returns a stale value.

Values are float64 arrays stored as little-endian bytes with their column
count; the column names of each (model key, family key) are kept once in a
side table (a family's layout may depend on the model: CLiD has one reduced
condition on class-conditional models, four on text models).

Storage is one SQLite file in WAL mode:

* crash-safe: every write is one transaction (``put_many``, or several inside
  ``transaction()``), committed with ``synchronous=FULL``; a process killed at
  any moment loses at most its transaction in flight and never leaves a
  partial or corrupt store;
* resumable: ``missing`` says which values a run still has to compute;
* several processes on one machine may read and write at once: WAL lets
  readers proceed while one writer commits; writers wait for each other
  (``busy_timeout``) and retry on "database is locked". SQLite's locking needs
  a local file system: do not put a store on NFS or another network share.

Provenance: ``record_provenance`` writes one row per extraction run and
family (model id, revision, fingerprint, dtype, family config, seed, cdi
version, time, host, process id), and every value row points to the run that
computed it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from cdi import __version__
from cdi.utils.errors import CDIError

#: File name used when the store path is a folder.
STORE_FILENAME = "features.sqlite"
SCHEMA_VERSION = 1
#: How long one SQLite call waits for another process's lock (seconds).
BUSY_TIMEOUT_S = 30.0
#: How long a write keeps retrying "database is locked" in total (seconds).
RETRY_DEADLINE_S = 300.0
_CHUNK = 500  # keys per SELECT ... IN (...), below SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS families (
    model_key TEXT NOT NULL,
    family_key TEXT NOT NULL,
    columns TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (model_key, family_key)
);
CREATE TABLE IF NOT EXISTS provenance (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_key TEXT NOT NULL,
    model TEXT NOT NULL,
    family_key TEXT NOT NULL,
    family TEXT NOT NULL,
    seed INTEGER NOT NULL,
    cdi_version TEXT NOT NULL,
    created TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS features (
    model_key TEXT NOT NULL,
    family_key TEXT NOT NULL,
    seed INTEGER NOT NULL,
    image_sha256 TEXT NOT NULL,
    condition TEXT NOT NULL,
    ncols INTEGER NOT NULL,
    value BLOB NOT NULL,
    run_id INTEGER,
    created TEXT NOT NULL,
    PRIMARY KEY (model_key, family_key, seed, image_sha256, condition)
) WITHOUT ROWID;
"""

T = TypeVar("T")


def resolve_store_path(path: str | os.PathLike) -> Path:
    """The SQLite file a ``--store`` argument names.

    An existing folder, or a path without a file suffix, is a folder that
    holds ``features.sqlite`` (created if needed); anything else is the file
    itself (its folder is created if needed).
    """
    path = Path(path).expanduser()
    if path.is_dir() or (not path.exists() and path.suffix == ""):
        return path / STORE_FILENAME
    return path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class FeatureStore:
    """A SQLite-backed feature cache (see the module docstring).

    Parameters
    ----------
    path : str or path-like
        A ``.sqlite`` file, or a folder that holds ``features.sqlite``
        (``resolve_store_path``). Created if missing.
    busy_timeout : float
        Seconds one SQLite call waits for another process's lock.

    Examples
    --------
    >>> with FeatureStore(tmp_path / "cache") as store:            # doctest: +SKIP
    ...     store.put_many(mk, fk, 0, {sha: np.array([1.0, 2.0])}, ["a", "b"])
    ...     store.get_many(mk, fk, 0, [sha])
    {sha: array([1., 2.])}
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = resolve_store_path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CDIError(f"cannot create the feature store folder {self.path.parent}: {exc}") from None
        if self.path.exists() and not self.path.is_file():
            raise CDIError(f"feature store {self.path} exists but is not a file")
        self._busy_timeout = float(busy_timeout)
        self._in_transaction = False
        try:
            self._conn = sqlite3.connect(
                str(self.path), timeout=self._busy_timeout, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise CDIError(f"cannot open the feature store {self.path}: {exc}") from None
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
                raise CDIError(
                    f"feature store {self.path} stayed locked by another process; try again later"
                ) from None
            raise CDIError(
                f"{self.path} is not a usable cdi feature store ({exc}); give another --store path, "
                f"or delete the file if it is a damaged cache"
            ) from None

    # ------------------------------------------------------------ plumbing
    def _setup(self) -> None:
        conn = self._conn
        mode = self._retry(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        if str(mode).lower() != "wal":
            raise CDIError(
                f"feature store {self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                f"put the store on a local file system"
            )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")

        def create(c: sqlite3.Connection) -> None:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                c.execute("INSERT INTO meta VALUES ('created', ?)", (_now(),))
                c.execute("INSERT INTO meta VALUES ('created_by', ?)", (f"cdi {__version__}",))
            elif int(row[0]) != SCHEMA_VERSION:
                raise CDIError(
                    f"feature store {self.path} has schema version {row[0]}, this cdi reads version "
                    f"{SCHEMA_VERSION}; use a new --store path"
                )

        self._write(create)

    def _retry(self, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying "database is locked" with backoff until the deadline."""
        deadline = time.monotonic() + RETRY_DEADLINE_S
        delay = 0.05
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction (or inside the open one)."""
        if self._in_transaction:
            return fn(self._conn)
        with self.transaction():
            return fn(self._conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator["FeatureStore"]:
        """One write transaction: every ``put_many`` inside commits together or not at all.

        ``BEGIN IMMEDIATE`` takes the write lock up front (waiting for other
        writers, retried on "database is locked"), so the statements inside
        never meet a lock; an exception rolls everything back.
        """
        if self._in_transaction:
            yield self
            return
        conn = self._conn
        try:
            self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        except sqlite3.OperationalError as exc:
            raise CDIError(
                f"feature store {self.path} stayed locked by another process for "
                f"{RETRY_DEADLINE_S:.0f} s ({exc}); try again later"
            ) from None
        self._in_transaction = True
        try:
            yield self
            self._retry(lambda: conn.execute("COMMIT"))
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False

    def close(self) -> None:
        """Close the connection (uncommitted work, if any, is rolled back)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    # -------------------------------------------------------------- queries
    def get_many(
        self,
        model_key: str,
        family_key: str,
        seed: int,
        hashes: Sequence[str],
        conditions: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Stored values of the given images: ``{sha256: float64 array}``; absent ones are left out.

        ``conditions`` (parallel to ``hashes``; default ``""`` for all) is the
        condition key of each image.
        """
        keys = self._keys(hashes, conditions)
        wanted = {(h, c) for h, c in keys}
        found: dict[str, np.ndarray] = {}
        seed = _check_seed(seed)
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._retry(
                lambda: self._conn.execute(
                    f"SELECT image_sha256, condition, ncols, value FROM features "
                    f"WHERE model_key=? AND family_key=? AND seed=? AND image_sha256 IN ({marks})",
                    (model_key, family_key, seed, *[h for h, _ in chunk]),
                ).fetchall()
            )
            for sha, condition, ncols, blob in rows:
                if (sha, condition) in wanted:
                    found[sha] = _from_blob(blob, ncols, self.path)
        return found

    def missing(
        self,
        model_key: str,
        family_key: str,
        seed: int,
        hashes: Sequence[str],
        conditions: Sequence[str] | None = None,
    ) -> list[str]:
        """The hashes (in the order given) that have no stored value."""
        found = self.get_many(model_key, family_key, seed, hashes, conditions)
        return [h for h in hashes if h not in found]

    def columns(self, model_key: str, family_key: str) -> list[str] | None:
        """The column names stored for (``model_key``, ``family_key``), or None if it has no values yet."""
        row = self._retry(
            lambda: self._conn.execute(
                "SELECT columns FROM families WHERE model_key=? AND family_key=?", (model_key, family_key)
            ).fetchone()
        )
        return None if row is None else json.loads(row[0])

    def count(self, model_key: str | None = None, family_key: str | None = None, seed: int | None = None) -> int:
        """Number of stored values, optionally for one model key, family key and/or seed."""
        clauses, params = [], []
        for name, value in (("model_key", model_key), ("family_key", family_key), ("seed", seed)):
            if value is not None:
                clauses.append(f"{name}=?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return int(
            self._retry(lambda: self._conn.execute(f"SELECT COUNT(*) FROM features{where}", params).fetchone()[0])
        )

    def provenance(self, model_key: str | None = None) -> list[dict]:
        """The provenance rows (optionally of one model key), oldest first, JSON fields decoded."""
        sql = "SELECT * FROM provenance" + (" WHERE model_key=?" if model_key else "") + " ORDER BY run_id"
        cursor = self._retry(lambda: self._conn.execute(sql, (model_key,) if model_key else ()))
        names = [d[0] for d in cursor.description]
        rows = []
        for values in cursor.fetchall():
            row = dict(zip(names, values))
            row["model"] = json.loads(row["model"])
            row["family"] = json.loads(row["family"])
            rows.append(row)
        return rows

    # --------------------------------------------------------------- writes
    def record_provenance(
        self, model_key: str, model: Mapping, family_key: str, family: Mapping, seed: int
    ) -> int:
        """Record who computes values for (model, family, seed) and return the run id.

        ``model`` is the adapter's ``describe()`` (model id, revision,
        fingerprint, dtype, ...), ``family`` the family's name and config.
        """
        seed = _check_seed(seed)
        model_json = json.dumps(dict(model), sort_keys=True, default=str)
        family_json = json.dumps(dict(family), sort_keys=True, default=str)

        def insert(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO provenance (model_key, model, family_key, family, seed, cdi_version, "
                "created, host, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model_key, model_json, family_key, family_json, seed, __version__, _now(),
                 socket.gethostname(), os.getpid()),
            )
            return int(cursor.lastrowid)

        return self._write(insert)

    def put_many(
        self,
        model_key: str,
        family_key: str,
        seed: int,
        values: Mapping[str, np.ndarray | Sequence[float]],
        columns: Sequence[str],
        conditions: Mapping[str, str] | None = None,
        run_id: int | None = None,
    ) -> int:
        """Store ``{sha256: values}`` for one family, in one transaction; returns the number written.

        Every array must have ``len(columns)`` entries; the columns must be the
        ones already stored for (``model_key``, ``family_key``), if any. A value already in the
        store is kept (values are deterministic, so another process that got
        there first wrote the same numbers). ``conditions`` maps a hash to its
        condition key (default ``""``). Nothing is written if anything fails.
        """
        seed = _check_seed(seed)
        columns = [str(c) for c in columns]
        if not columns:
            raise ValueError("a feature family must have at least one column")
        columns_json = json.dumps(columns)
        conditions = conditions or {}
        created = _now()

        def rows() -> Iterator[tuple]:
            for sha, value in values.items():
                yield (model_key, family_key, seed, sha, conditions.get(sha, ""), len(columns),
                       _to_blob(value, len(columns), sha), run_id, created)

        def insert(conn: sqlite3.Connection) -> int:
            known = conn.execute(
                "SELECT columns FROM families WHERE model_key=? AND family_key=?", (model_key, family_key)
            ).fetchone()
            if known is None:
                conn.execute("INSERT INTO families VALUES (?, ?, ?, ?)", (model_key, family_key, columns_json, created))
            elif json.loads(known[0]) != columns:
                raise CDIError(
                    f"feature store {self.path}: family key {family_key!r} is stored for this model with columns "
                    f"{json.loads(known[0])}, not {columns}; a family's columns must not change without "
                    f"its key changing"
                )
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO features (model_key, family_key, seed, image_sha256, condition, "
                "ncols, value, run_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows(),
            )
            return conn.total_changes - before

        return self._write(insert)

    def merge_from(self, source: str | os.PathLike) -> tuple[int, int]:
        """Copy every value of the store file ``source`` into this one (see ``merge_stores``).

        Returns ``(values added, values already present)``.
        """
        conn = self._conn
        if not Path(source).is_file():
            raise CDIError(f"feature store {source} does not exist")
        conn.execute("ATTACH DATABASE ? AS src", (str(source),))
        try:
            try:
                version = conn.execute("SELECT value FROM src.meta WHERE key='schema_version'").fetchone()
            except sqlite3.DatabaseError as exc:
                raise CDIError(f"{source} is not a cdi feature store ({exc})") from None
            if version is None or int(version[0]) != SCHEMA_VERSION:
                raise CDIError(f"{source} has feature-store schema {version and version[0]}, this cdi reads "
                               f"{SCHEMA_VERSION}; merge stores made by the same cdi version")
            with self.transaction():
                return self._merge_attached(source)
        finally:
            conn.execute("DETACH DATABASE src")

    def _merge_attached(self, source: str | os.PathLike) -> tuple[int, int]:
        conn = self._conn
        clash = conn.execute(
            "SELECT s.model_key, s.family_key, s.columns, m.columns FROM src.families s JOIN main.families m "
            "USING (model_key, family_key) WHERE s.columns != m.columns LIMIT 1"
        ).fetchone()
        if clash:
            raise CDIError(
                f"cannot merge {source}: family {clash[1]} of model {clash[0]} has columns {clash[2]} there and "
                f"{clash[3]} in {self.path}; these stores come from incompatible cdi versions"
            )
        conflict = conn.execute(
            "SELECT s.model_key, s.family_key, s.seed, s.image_sha256, s.condition FROM src.features s "
            "JOIN main.features m USING (model_key, family_key, seed, image_sha256, condition) "
            "WHERE s.value != m.value OR s.ncols != m.ncols LIMIT 1"
        ).fetchone()
        if conflict:
            model, family, seed, sha, condition = conflict
            raise CDIError(
                f"cannot merge {source}: it holds another value than {self.path} for image {sha[:16]}... "
                f"(family {family}, model {model}, seed {seed}, condition {condition or 'none'}); values of "
                f"one key must be identical (were the shards computed on different hardware or dtypes? "
                f"float32 on GPU and CPU round differently); nothing of {source} was merged"
            )
        present = conn.execute(
            "SELECT COUNT(*) FROM src.features s JOIN main.features m "
            "USING (model_key, family_key, seed, image_sha256, condition)"
        ).fetchone()[0]
        conn.execute("INSERT OR IGNORE INTO main.families SELECT * FROM src.families")
        runs = {}
        for row in conn.execute(
            "SELECT run_id, model_key, model, family_key, family, seed, cdi_version, created, host, pid "
            "FROM src.provenance ORDER BY run_id"
        ).fetchall():
            same = conn.execute(  # merged before: keep one provenance row per run
                "SELECT run_id FROM main.provenance WHERE model_key=? AND model=? AND family_key=? AND family=? "
                "AND seed=? AND cdi_version=? AND created=? AND host=? AND pid=?", row[1:],
            ).fetchone()
            if same is None:
                same = (conn.execute(
                    "INSERT INTO main.provenance (model_key, model, family_key, family, seed, cdi_version, "
                    "created, host, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row[1:],
                ).lastrowid,)
            runs[row[0]] = same[0]
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS run_map (old INTEGER PRIMARY KEY, new INTEGER)")
        conn.execute("DELETE FROM temp.run_map")
        conn.executemany("INSERT INTO temp.run_map VALUES (?, ?)", runs.items())
        before = conn.total_changes
        conn.execute(
            "INSERT OR IGNORE INTO main.features (model_key, family_key, seed, image_sha256, condition, ncols, "
            "value, run_id, created) SELECT s.model_key, s.family_key, s.seed, s.image_sha256, s.condition, "
            "s.ncols, s.value, r.new, s.created FROM src.features s LEFT JOIN temp.run_map r ON r.old = s.run_id"
        )
        return conn.total_changes - before, int(present)

    def _keys(self, hashes: Sequence[str], conditions: Sequence[str] | None) -> list[tuple[str, str]]:
        hashes = list(hashes)
        if conditions is None:
            return [(h, "") for h in hashes]
        conditions = list(conditions)
        if len(conditions) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but {len(conditions)} conditions")
        return list(zip(hashes, conditions))


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise CDIError(f"seed must be an integer between 0 and 2**63 - 1, got {seed}")
    return seed


def _to_blob(value: np.ndarray | Sequence[float], ncols: int, sha: str) -> bytes:
    """float64 little-endian bytes of one image's values (checked against the column count)."""
    array = np.asarray(value, dtype="<f8").reshape(-1)
    if array.size != ncols:
        raise ValueError(f"image {sha[:12]}: {array.size} values for {ncols} columns")
    return array.tobytes()


def _from_blob(blob: bytes, ncols: int, path: Path) -> np.ndarray:
    if len(blob) != 8 * ncols:
        raise CDIError(f"feature store {path} holds a damaged value ({len(blob)} bytes for {ncols} columns)")
    return np.frombuffer(blob, dtype="<f8").astype(np.float64)


def merge_stores(out: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> dict[str, int]:
    """Join feature stores (e.g. shard stores made on different machines) into ``out``.

    Every value of every source is copied into ``out`` (created if needed;
    values already there are kept), with its provenance row (renumbered: run
    ids are local to a store). The same key (model, family, seed, image,
    condition) in two stores must hold the same bytes, and a (model, family)
    the same columns: otherwise a ``CDIError`` names the first conflict and
    nothing of that source is written. Each source is merged in one
    transaction. Returns ``{"sources", "values_added", "values_present"}``.
    """
    out_path = resolve_store_path(out)
    paths = [Path(p).expanduser() for p in sources]
    if not paths:
        raise CDIError("cdi store merge needs at least one store to merge into OUT")
    for path in paths:
        source = resolve_store_path(path)
        if not source.is_file():
            raise CDIError(f"feature store {path} does not exist (expected a .sqlite file or a folder holding "
                           f"{STORE_FILENAME})")
        if source.resolve() == (out_path.resolve() if out_path.exists() else None):
            raise CDIError(f"{path} is the output store itself; name OUT first, then the stores to merge into it")
    added = present = 0
    with FeatureStore(out_path) as store:
        for path in paths:
            a, p = store.merge_from(resolve_store_path(path))
            added, present = added + a, present + p
    return {"sources": len(paths), "values_added": added, "values_present": present}
