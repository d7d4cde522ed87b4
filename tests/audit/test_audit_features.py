"""The audit from stored features (`cdi audit --published-features ...`) and `cdi store merge`.

An audit made from two `cdi extract` CSVs must give the verdict and every
p-value of the direct `cdi audit` on the same images, exactly; tables that do
not belong together are refused; shard stores merge, conflicts are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cdi.cli.main import app
from cdi.audit.result import AuditResult
from cdi.engine.store import FeatureStore, merge_stores
from cdi.utils.errors import CDIError

runner = CliRunner()
N = 40  # images per collection
FEATURES = "denoising_loss,multiple_loss,pia"
STATS = ["--permutations", "100", "--sample-size-resamples", "0", "--shift-encoder", "builtin", "--seed", "0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, toy_sd_world):
    """P: 40 members of the overtrained toy SD (the session's world); U: 40 non-members; and the model folder.

    (Too few images for these three families to detect use: the test is that both audits agree.)"""
    from cdi.toy.demo import DemoDraw, write_demo_folders

    root = tmp_path_factory.mktemp("stored")
    world = toy_sd_world
    names = lambda folder: sorted(p.name for p in folder.glob("*.png"))[:N]  # noqa: E731
    draw = DemoDraw(published_members=names(world.members_dir), published_nonmembers=[],
                    unpublished=names(world.nonmembers_dir))
    published, unpublished = write_demo_folders(world, draw, root / "data")
    return published, unpublished, world.model_dir


@pytest.fixture(scope="module")
def extracted(folders, tmp_path_factory):
    """`cdi extract` of each collection (no store: every value computed here)."""
    published, unpublished, model = folders
    out = tmp_path_factory.mktemp("tables")
    for folder, name in ((published, "p.csv"), (unpublished, "u.csv")):
        done = runner.invoke(app, ["extract", "--images", str(folder), "--model", str(model), "--out",
                                   str(out / name), "--features", FEATURES, "--batch-size", "8", "--workers", "0"])
        assert done.exit_code == 0, done.output
    return out / "p.csv", out / "u.csv"


def test_audit_from_extract_tables_reproduces_the_direct_audit(folders, extracted, tmp_path):
    published, unpublished, model = folders
    p_csv, u_csv = extracted
    direct = runner.invoke(app, ["audit", "--published", str(published), "--unpublished", str(unpublished),
                                 "--model", str(model), "--out", str(tmp_path / "direct"), "--features", FEATURES,
                                 "--batch-size", "8", "--workers", "0", "--noise-draws", "1", *STATS])
    assert direct.exit_code == 0, direct.output  # one noise draw: what a `cdi extract` table holds
    stored = runner.invoke(app, ["audit", "--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                                 "--published", str(published), "--unpublished", str(unpublished),
                                 "--out", str(tmp_path / "stored"), *STATS])
    assert stored.exit_code == 0, stored.output
    a, b = AuditResult.load(tmp_path / "direct"), AuditResult.load(tmp_path / "stored")
    assert a.verdict == b.verdict
    for name in ("p_value", "p_value_ttest", "p_value_permutation", "statistic", "effect_size", "auc"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.shift_guard.p_value == b.shift_guard.p_value and not b.shift_guard.detected
    assert [(s.sha256, s.score, s.in_test) for s in a.scores] == [(s.sha256, s.score, s.in_test) for s in b.scores]
    assert b.model["model_key"].startswith("sd-float32-") and b.model["fingerprint"] == a.model["fingerprint"]
    assert "--published-features" in b.command and "--model" not in b.command
    for name in ("result.json", "features.csv", "report.html"):
        assert (tmp_path / "stored" / name).is_file()
    # Without the image folders the shift guard is recorded as not run; the test is the same.
    blind = runner.invoke(app, ["audit", "--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                                "--out", str(tmp_path / "blind"), *STATS])
    assert blind.exit_code == 0, blind.output
    c = AuditResult.load(tmp_path / "blind")
    assert c.shift_guard is None and c.p_value == a.p_value and c.verdict == a.verdict


def test_tables_that_do_not_belong_together_are_refused(folders, extracted, tmp_path):
    published, unpublished, model = folders
    p_csv, u_csv = extracted

    def refused(*args: str) -> str:
        done = runner.invoke(app, ["audit", *args, "--out", str(tmp_path / "out"), *STATS])
        assert done.exit_code == 2, done.output
        assert not (tmp_path / "out" / "result.json").exists()
        return " ".join(done.output.split())

    other = tmp_path / "other.csv"  # another feature set
    done = runner.invoke(app, ["extract", "--images", str(unpublished), "--model", str(model), "--out", str(other),
                               "--features", "pia", "--batch-size", "8", "--workers", "0"])
    assert done.exit_code == 0, done.output
    assert "feature families" in refused("--published-features", str(p_csv), "--unpublished-features", str(other))
    # Another model: the sidecar records another model key (the CSV itself is unchanged, so its hash holds).
    moved = tmp_path / "moved.csv"
    moved.write_bytes(u_csv.read_bytes())
    sidecar = json.loads(Path(f"{u_csv}.json").read_text())
    sidecar["csv_file"] = moved.name
    sidecar["meta"]["model_key"] = "sd-float32-" + "0" * 32
    Path(f"{moved}.json").write_text(json.dumps(sidecar))
    assert "different model" in refused("--published-features", str(p_csv), "--unpublished-features", str(moved))
    assert "both feature tables" in refused("--published-features", str(p_csv), "--unpublished-features", str(p_csv))
    assert "drop --model" in refused("--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                                     "--model", str(model))
    assert "missing --unpublished-features" in refused("--published-features", str(p_csv))
    assert "missing --unpublished, --model" in refused("--published", str(published))
    assert "exactly the images" in refused("--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                                           "--published", str(unpublished), "--unpublished", str(published))


# --------------------------------------------------------------------------
# cdi store merge
# --------------------------------------------------------------------------
def _fill(path: Path, hashes: list[str], offset: float = 0.0) -> None:
    with FeatureStore(path) as store:
        run = store.record_provenance("m", {"model_id": "toy", "machine": path.stem}, "f-1", {"name": "f"}, 0)
        store.put_many("m", "f-1", 0, {h: np.array([float(int(h, 16)) + offset, 1.0]) for h in hashes},
                       ["a", "b"], run_id=run)


def test_store_merge_joins_shards_and_refuses_conflicts(tmp_path):
    hashes = [f"{i:064x}" for i in range(10)]
    _fill(tmp_path / "a.sqlite", hashes[:6])  # the machines overlap on images 4 and 5
    _fill(tmp_path / "b.sqlite", hashes[4:])
    counts = merge_stores(tmp_path / "all.sqlite", [tmp_path / "a.sqlite", tmp_path / "b.sqlite"])
    assert counts == {"sources": 2, "values_added": 10, "values_present": 2}
    with FeatureStore(tmp_path / "all.sqlite") as store:
        got = store.get_many("m", "f-1", 0, hashes)
        assert sorted(got) == hashes and got[hashes[7]][0] == 7.0
        runs = store.provenance()
        assert len(runs) == 2
        rows = store._conn.execute("SELECT DISTINCT run_id FROM features").fetchall()
        assert {r[0] for r in rows} == {r["run_id"] for r in runs}  # values point at their (renumbered) runs
    _fill(tmp_path / "bad.sqlite", hashes[8:], offset=0.5)  # another value for images 8 and 9
    done = runner.invoke(app, ["store", "merge", str(tmp_path / "all.sqlite"), str(tmp_path / "bad.sqlite")])
    assert done.exit_code == 2 and "another value" in done.output, done.output
    with FeatureStore(tmp_path / "all.sqlite") as store:
        assert store.count() == 10 and len(store.provenance()) == 2
    done = runner.invoke(app, ["store", "merge", str(tmp_path / "c.sqlite"), str(tmp_path / "a.sqlite")])
    assert done.exit_code == 0 and "6 values added" in done.output, done.output
    with pytest.raises(CDIError, match="does not exist"):
        merge_stores(tmp_path / "d.sqlite", [tmp_path / "missing.sqlite"])
