"""The feature store (cdi.engine.store) and the feature table (cdi.engine.table).

The store must be exact (float64 in, the same float64 out), keyed on
everything that decides a value, all-or-nothing per transaction, safe under
kill -9 and under several writing processes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import cdi.engine.store
from cdi.utils.errors import CDIError
from cdi.engine.store import STORE_FILENAME, FeatureStore, resolve_store_path
from cdi.engine.table import FeatureTable, sidecar_path

REPO = Path(__file__).resolve().parents[2]
MK, FK, COLS = "sd-float32-abc", "fam-0123456789abcdef", ["a", "b", "c"]


def sha(i: int) -> str:
    return f"{i:064x}"


def value_of(i: int) -> np.ndarray:
    """A deterministic value per image, so any process can check any row."""
    return np.array([i, i / 7.0, -(i**0.5)], dtype=np.float64)


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def run_script(tmp_path: Path, name: str, code: str, *args: str) -> subprocess.Popen:
    script = tmp_path / name
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------- the store
def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, 1.7976931348623157e308, 1 / 3])
    values = {sha(i): rng.standard_normal(len(special)) * 10.0 ** rng.integers(-300, 300) for i in range(20)}
    values[sha(99)] = special
    cols = [f"c{k}" for k in range(len(special))]
    with FeatureStore(tmp_path / "s.sqlite") as store:
        assert store.put_many(MK, FK, 0, values, cols) == 21
        got = store.get_many(MK, FK, 0, list(values) + [sha(1000)])
        assert store.columns(MK, FK) == cols and store.columns("other-model", FK) is None
    assert set(got) == set(values)
    for h, v in values.items():
        assert got[h].dtype == np.float64
        assert got[h].tobytes() == np.asarray(v, dtype="<f8").tobytes()
    # Reopening reads the same (committed to disk, not just cached).
    with FeatureStore(tmp_path / "s.sqlite") as store:
        assert store.get_many(MK, FK, 0, [sha(99)])[sha(99)].tobytes() == special.tobytes()


def test_every_key_part_separates_values(tmp_path):
    with FeatureStore(tmp_path / "s.sqlite") as store:
        store.put_many(MK, FK, 0, {sha(1): value_of(1)}, COLS, conditions={sha(1): "text:aa"})
        hashes = [sha(1)]
        assert store.missing(MK, FK, 0, hashes, ["text:aa"]) == []
        assert store.missing(MK, FK, 1, hashes, ["text:aa"]) == hashes  # other seed
        assert store.missing(MK, "fam-other", 0, hashes, ["text:aa"]) == hashes  # other config
        assert store.missing("sd-bfloat16-abc", FK, 0, hashes, ["text:aa"]) == hashes  # dtype/fingerprint
        assert store.missing(MK, FK, 0, hashes, ["text:bb"]) == hashes  # other caption
        assert store.missing(MK, FK, 0, [sha(2)], ["text:aa"]) == [sha(2)]  # other image
        assert store.count() == 1 and store.count(model_key=MK, family_key=FK, seed=0) == 1
        assert store.count(seed=1) == 0


def test_existing_values_are_kept_and_columns_checked(tmp_path):
    with FeatureStore(tmp_path / "s.sqlite") as store:
        assert store.put_many(MK, FK, 0, {sha(1): value_of(1)}, COLS) == 1
        assert store.put_many(MK, FK, 0, {sha(1): value_of(1) + 1, sha(2): value_of(2)}, COLS) == 1
        np.testing.assert_array_equal(store.get_many(MK, FK, 0, [sha(1)])[sha(1)], value_of(1))
        with pytest.raises(CDIError, match="columns"):
            store.put_many(MK, FK, 0, {sha(3): value_of(3)}, ["x", "y", "z"])
        # The same family may have another layout on another model (CLiD: k depends on the model).
        assert store.put_many("dit-float32-abc", FK, 0, {sha(3): [1.0, 2.0]}, ["x", "y"]) == 1
        assert store.columns("dit-float32-abc", FK) == ["x", "y"] and store.columns(MK, FK) == COLS
        with pytest.raises(ValueError, match="2 values for 3 columns"):
            store.put_many(MK, FK, 0, {sha(4): value_of(4), sha(5): [1.0, 2.0]}, COLS)
        assert store.missing(MK, FK, 0, [sha(3), sha(4), sha(5)]) == [sha(3), sha(4), sha(5)]
        with pytest.raises(CDIError, match="seed"):
            store.get_many(MK, FK, -1, [sha(1)])


def test_interrupted_transaction_leaves_nothing(tmp_path, monkeypatch):
    with FeatureStore(tmp_path / "s.sqlite") as store:
        store.put_many(MK, FK, 0, {sha(0): value_of(0)}, COLS)
        real, calls = cdi.engine.store._to_blob, []

        def failing(value, ncols, h):
            calls.append(h)
            if len(calls) == 3:
                raise RuntimeError("interrupted")
            return real(value, ncols, h)

        monkeypatch.setattr(cdi.engine.store, "_to_blob", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            store.put_many(MK, FK, 0, {sha(i): value_of(i) for i in range(1, 6)}, COLS)
        assert len(calls) == 3  # two rows were inserted before the failure ...
        assert store.count() == 1  # ... and rolled back
        # Several puts in one transaction commit together or not at all.
        calls.clear()
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.put_many(MK, "fam-x", 0, {sha(7): value_of(7), sha(8): value_of(8)}, COLS)
                store.put_many(MK, "fam-y", 0, {sha(7): value_of(7)}, COLS)
        assert store.count() == 1 and store.columns(MK, "fam-x") is None
        monkeypatch.setattr(cdi.engine.store, "_to_blob", real)
        store.put_many(MK, FK, 0, {sha(9): value_of(9)}, COLS)  # still usable
        assert store.count() == 2
    assert integrity(tmp_path / "s.sqlite") == "ok"


WRITER = """
    import sys, time
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {repo!r})
    from cdi.engine.store import FeatureStore
    path, first, last, per_tx, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    while go != "-" and not Path(go).exists():
        time.sleep(0.01)
    with FeatureStore(path) as store:
        for start in range(first, last, per_tx):
            ids = range(start, min(start + per_tx, last))
            store.put_many("mk", "fam-0", 0,
                           {{f"{{i:064x}}": [i, i / 7.0, -(i ** 0.5)] for i in ids}}, ["a", "b", "c"])
            print("committed", start, flush=True)
"""


def test_concurrent_writers_end_complete_and_intact(tmp_path):
    path, go = tmp_path / "shared.sqlite", tmp_path / "go"
    code = WRITER.format(repo=str(REPO))
    # Four processes, overlapping ranges: [0,120), [60,180), [120,240), [0,240) step 7.
    ranges = [(0, 120, 10), (60, 180, 10), (120, 240, 10), (0, 240, 7)]
    procs = [run_script(tmp_path, f"w{k}.py", code, str(path), str(a), str(b), str(s), str(go))
             for k, (a, b, s) in enumerate(ranges)]
    time.sleep(0.5)
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=600)  # generous: a loaded machine starts processes slowly
        assert proc.returncode == 0, err
    assert integrity(path) == "ok"
    with FeatureStore(path) as store:
        got = store.get_many("mk", "fam-0", 0, [sha(i) for i in range(240)])
        assert store.count() == 240
    assert len(got) == 240
    for i in range(240):
        np.testing.assert_array_equal(got[sha(i)], value_of(i))


def test_kill_during_writes_loses_only_the_transaction_in_flight(tmp_path):
    path = tmp_path / "killed.sqlite"
    per_tx = 2000
    proc = run_script(tmp_path, "writer.py", WRITER.format(repo=str(REPO)),
                      str(path), "0", str(per_tx * 1000), str(per_tx), "-")
    committed = 0
    deadline = time.monotonic() + 60
    while committed < 3 and time.monotonic() < deadline:  # let a few transactions commit
        line = proc.stdout.readline()
        committed += line.startswith("committed")
    time.sleep(0.013)  # land somewhere inside a later transaction
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert committed >= 3
    assert integrity(path) == "ok"
    with FeatureStore(path) as store:
        n = store.count()
        assert 3 * per_tx <= n < 1000 * per_tx and n % per_tx == 0  # whole transactions only
        got = store.get_many("mk", "fam-0", 0, [sha(i) for i in range(n + per_tx)])
    assert sorted(got) == [sha(i) for i in range(n)]
    for i in (0, n // 2, n - 1):
        np.testing.assert_array_equal(got[sha(i)], value_of(i))


def test_store_path_and_bad_files(tmp_path):
    assert resolve_store_path(tmp_path) == tmp_path / STORE_FILENAME
    assert resolve_store_path(tmp_path / "cache") == tmp_path / "cache" / STORE_FILENAME
    assert resolve_store_path(tmp_path / "f.db") == tmp_path / "f.db"
    with FeatureStore(tmp_path / "cache") as store:
        assert store.path == tmp_path / "cache" / STORE_FILENAME and store.path.is_file()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all, just some bytes" * 100)
    with pytest.raises(CDIError, match="not a usable cdi feature store"):
        FeatureStore(junk)


def test_provenance_rows_link_values_to_runs(tmp_path):
    with FeatureStore(tmp_path) as store:
        model = {"model_id": "tiny", "revision": None, "fingerprint": "f" * 64, "dtype": "float32"}
        run = store.record_provenance(MK, model, FK, {"name": "fam", "config": {"t": 100}}, 3)
        store.put_many(MK, FK, 3, {sha(1): value_of(1)}, COLS, run_id=run)
        (row,) = store.provenance(MK)
        assert row["run_id"] == run and row["model"] == model and row["family"]["config"] == {"t": 100}
        assert row["seed"] == 3 and row["cdi_version"] == cdi.__version__ and row["pid"] == os.getpid()
    with sqlite3.connect(tmp_path / STORE_FILENAME) as conn:
        assert conn.execute("SELECT run_id FROM features").fetchall() == [(run,)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ----------------------------------------------------------------- the table
def make_table(n: int = 6, seed: int = 0) -> FeatureTable:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, 3)) * np.array([1e-12, 1.0, 1e12])
    values[0, 0] = np.nan
    values[1, 1] = -0.0
    captions = ['a digit, "seven"', None, "line\nbreak", "ünïcödé ✓", "x", None][:n]
    return FeatureTable([f"sub/img{i}.png" for i in range(n)], [sha(i) for i in range(n)], captions,
                        ["f_a", "f_b", "f_c"], values, {"seed": 0, "model": {"model_id": "m"}, "shard": None})


def test_table_csv_round_trip_is_exact(tmp_path):
    table = make_table()
    out = table.to_csv(tmp_path / "feat.csv")
    back = FeatureTable.from_csv(out)
    assert back.paths == table.paths and back.hashes == table.hashes and back.captions == table.captions
    assert back.columns == table.columns and back.meta == table.meta
    assert back.values.tobytes() == table.values.tobytes()  # bit-exact, NaN and -0.0 included
    # Any CSV reader sees a plain header and one row per image; provenance is in the sidecar.
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "sha256", "caption", "f_a", "f_b", "f_c"] and len(rows) == 7
    side = json.loads(sidecar_path(out).read_text())
    assert side["meta"] == table.meta and side["n_rows"] == 6
    assert sorted(os.listdir(tmp_path)) == ["feat.csv", "feat.csv.json"]  # no temp files left


def test_table_refuses_a_modified_csv_and_reads_one_without_sidecar(tmp_path, caplog):
    out = make_table().to_csv(tmp_path / "feat.csv")
    out.write_text(out.read_text().replace("img3", "img9"))
    with pytest.raises(CDIError, match="modified after it was written"):
        FeatureTable.from_csv(out)
    sidecar_path(out).unlink()
    with caplog.at_level(logging.WARNING, logger="cdi"):
        back = FeatureTable.from_csv(out)
    assert back.meta == {} and back.paths[3] == "sub/img9.png" and "without provenance" in caplog.text
    bad = tmp_path / "bad.csv"
    bad.write_text("path,sha256,caption,x\na.png,00,,notanumber\n")
    with pytest.raises(CDIError, match="column 'x' is not a number"):
        FeatureTable.from_csv(bad)
    with pytest.raises(CDIError, match="header must start"):
        (tmp_path / "h.csv").write_text("file,x\n")
        FeatureTable.from_csv(tmp_path / "h.csv")


def test_table_write_failure_leaves_no_file(tmp_path):
    table = make_table()
    table.meta["not_json"] = object()
    with pytest.raises(TypeError):
        table.to_csv(tmp_path / "feat.csv")
    assert os.listdir(tmp_path) == []


def test_table_select_subset_concat():
    table = make_table()
    sel = table.select(["f_c", "f_a"])
    assert sel.columns == ["f_c", "f_a"]
    np.testing.assert_array_equal(sel.values, table.values[:, [2, 0]])
    with pytest.raises(CDIError, match="unknown feature column"):
        table.select(["nope"])
    sub = table.subset([4, 1])
    assert sub.paths == ["sub/img4.png", "sub/img1.png"] and sub.captions == ["x", None]
    mask = table.subset(np.array([True, False, True, False, False, False]))
    assert mask.hashes == [sha(0), sha(2)]
    first, second = table.subset([1, 3, 5]), table.subset([0, 2, 4])
    first.meta["shard"], second.meta["shard"] = [0, 2], [1, 2]
    joined = FeatureTable.concat([first, second])
    assert joined.paths == table.paths and "shard" not in joined.meta
    assert joined.values.tobytes() == table.values.tobytes()
    with pytest.raises(CDIError, match="in two of the tables"):
        FeatureTable.concat([first, table])
    other = table.subset([0])
    other.meta["seed"] = 1
    with pytest.raises(CDIError, match="'seed' differs"):
        FeatureTable.concat([first, other])
    with pytest.raises(ValueError, match="shape"):
        FeatureTable(["a"], ["h"], [None], ["x", "y"], np.zeros((1, 3)))
