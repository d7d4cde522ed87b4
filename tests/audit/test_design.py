"""The pre-registered randomised design: `cdi design`, `cdi design --check` and `cdi audit --design`.

The split must be re-derivable by anyone with SHA-256 alone (the rule in cdi.audit.design's docstring,
recomputed here with hashlib), balanced over beacons, and tamper-evident; the audit must stop,
before any model loads, when the folders or the options are not the design's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdi.cli import app
from cdi.audit.design import build_design, derive_split, design_problems, planned_analysis
from cdi.utils.errors import CDIError
from cdi.audit.ledger import list_sha256
from cdi.audit.result import AuditResult

runner = CliRunner()
BEACON = "ab" * 32
STATS = ["--permutations", "50", "--sample-size-resamples", "0"]


def fake_hashes(n: int, tag: str = "work") -> list[str]:
    return [hashlib.sha256(f"{tag}{i}".encode()).hexdigest() for i in range(n)]


def by_hand(hashes: list[str], randomness: str, fraction: float) -> tuple[set[str], set[str]]:
    """The documented rule, written out with hashlib only."""
    listed = hashlib.sha256("".join(h + "\n" for h in sorted(hashes)).encode()).hexdigest()
    seed = hashlib.sha256(f"cdi-design-v1\n{listed}\n{randomness}\n".encode()).hexdigest()
    order = sorted(hashes, key=lambda h: (hashlib.sha256((seed + h).encode()).hexdigest(), h))
    k = int(len(hashes) * fraction + 0.5)
    return set(order[:k]), set(order[k:])


def test_the_split_is_the_documented_rule_and_rederivable_by_hand():
    hashes = fake_hashes(41)
    works = [(f"w{i:02d}.png", h) for i, h in enumerate(hashes)]
    design = build_design("works", works, publish_fraction=0.5, beacon=BEACON, beacon_name="drand round 1")
    publish, withhold = by_hand(hashes, BEACON, 0.5)
    assert {w["sha256"] for w in design["publish"]} == publish and len(publish) == 21  # floor(20.5 + 0.5)
    assert {w["sha256"] for w in design["withhold"]} == withhold
    assert design["works"]["list_sha256"] == list_sha256(hashes)
    assert design["randomness"]["source"] == "beacon" and "drand round 1" in design["randomness"]["statement"]
    assert design_problems(design) == []
    # Another beacon, another split; the same beacon, the same split whatever the order of the works.
    assert set(derive_split(hashes, "cd" * 32, 0.5)[0]) != publish
    assert set(derive_split(hashes[::-1], BEACON, 0.5)[0]) == publish


def test_each_work_is_published_about_half_the_time_over_beacons():
    """200 beacons, 40 works: each work's count of 'publish' is Binomial(200, 1/2) if the rule is fair;
    outside 100 +- 40 (5.7 standard deviations) has probability below 1e-7 per work."""
    hashes = fake_hashes(40)
    counts = dict.fromkeys(hashes, 0)
    for b in range(200):
        for h in derive_split(hashes, hashlib.sha256(str(b).encode()).hexdigest(), 0.5)[0]:
            counts[h] += 1
    assert all(60 <= c <= 140 for c in counts.values()), sorted(counts.values())
    assert sum(counts.values()) == 200 * 20


def test_without_a_beacon_the_record_says_the_randomness_rests_on_the_creators_word():
    design = build_design("works", [(f"w{i}.png", h) for i, h in enumerate(fake_hashes(30))])
    assert design["randomness"]["source"] == "os" and "creator's word" in design["randomness"]["statement"]
    assert len(design["randomness"]["value"]) == 64 and design_problems(design) == []


def test_tampering_is_found():
    design = build_design("works", [(f"w{i}.png", h) for i, h in enumerate(fake_hashes(30))], beacon=BEACON,
                          beacon_name="b")
    edited = json.loads(json.dumps(design))
    edited["analysis"]["alpha"] = 0.05
    assert any("commitment" in p for p in design_problems(edited))
    moved = json.loads(json.dumps(design))
    moved["withhold"].append(moved["publish"].pop())
    moved["assignment"]["publish_count"] -= 1
    from cdi.audit.design import commitment_of

    moved["commitment"] = commitment_of(moved)  # a consistent file: only the rule can tell
    assert [p for p in design_problems(moved) if "split is not the one" in p]


@pytest.mark.parametrize("kwargs, message", [
    (dict(publish_fraction=0.0), "strictly between 0 and 1"),
    (dict(publish_fraction=1.5), "strictly between 0 and 1"),
    (dict(beacon="xyz" * 20, beacon_name="b"), "hexadecimal"),
    (dict(beacon="ab" * 8, beacon_name="b"), "16 hex digits"),
    (dict(beacon=BEACON), "--beacon-name"),
    (dict(beacon_name="drand"), "without --beacon"),
    (dict(publish_fraction=0.2), "at least 10"),
])
def test_bad_design_input_is_refused(kwargs, message):
    with pytest.raises(CDIError, match=message):
        build_design("works", [(f"w{i}.png", h) for i, h in enumerate(fake_hashes(30))], **kwargs)


def test_bad_planned_analysis_is_refused():
    for kwargs, message in [(dict(alpha=0.7), "--alpha"), (dict(protocol="magic"), "--protocol"),
                            (dict(verdict="vote"), "--verdict"), (dict(features="nope"), "unknown feature"),
                            (dict(seed=-1), "--seed")]:
        with pytest.raises(CDIError, match=message):
            planned_analysis(**kwargs)


# ------------------------------------------------------------------ command line, images
def write_works(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"w{i:02d}.png")
    return folder


def split_folders(design_file: Path, works: Path, root: Path) -> tuple[Path, Path]:
    design = json.loads(design_file.read_text())
    folders = []
    for key, name in (("publish", "published"), ("withhold", "unpublished")):
        folder = root / name
        folder.mkdir(parents=True)
        for w in design[key]:
            (folder / w["path"]).write_bytes((works / w["path"]).read_bytes())
        folders.append(folder)
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def designed(tmp_path_factory):
    root = tmp_path_factory.mktemp("designed")
    works = write_works(root / "works", 52)
    done = runner.invoke(app, ["design", "--works", str(works), "--out", str(root / "design.json"), "--beacon",
                               BEACON, "--beacon-name", "drand quicknet round 7", "--alpha", "0.05"])
    assert done.exit_code == 0, done.output
    return root, works, root / "design.json"


def test_cli_design_writes_checks_and_tells_how_to_date_it(designed, tmp_path):
    root, works, design_file = designed
    design = json.loads(design_file.read_text())
    assert design["works"]["count"] == 52 and design["assignment"]["publish_count"] == 26
    assert design["analysis"] == {"features": None, "alpha": 0.05, "protocol": "pooled", "verdict": "parametric",
                                  "seed": 0}
    listed = runner.invoke(app, ["design", "--works", str(works), "--list-only"])
    assert listed.exit_code == 0 and design["works"]["list_sha256"] in listed.output
    checked = runner.invoke(app, ["design", "--check", str(design_file), "--works", str(works)])
    assert checked.exit_code == 0 and "checks out" in checked.output, checked.output
    again = runner.invoke(app, ["design", "--works", str(works), "--out", str(design_file)])
    assert again.exit_code == 2 and "--force" in again.output
    fresh = runner.invoke(app, ["design", "--works", str(works), "--out", str(tmp_path / "d.json")])
    assert fresh.exit_code == 0 and "notary" in fresh.output and "ots stamp" in fresh.output
    assert "creator's word" in fresh.output
    # A work changed after the design: --check with --works finds it (exit 1).
    changed = tmp_path / "works"
    changed.mkdir()
    for p in works.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (8, 8)).save(changed / "w00.png")
    bad = runner.invoke(app, ["design", "--check", str(design_file), "--works", str(changed)])
    assert bad.exit_code == 1 and "not in the design" in bad.output and "not in" in bad.output


def test_cli_design_refuses_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    works = write_works(tmp_path / "works", 30)
    dup = write_works(tmp_path / "dup", 30)
    (dup / "copy.png").write_bytes((dup / "w00.png").read_bytes())
    cases = [
        (["--works", str(tmp_path / "empty"), "--out", str(tmp_path / "a.json")], "empty"),
        (["--works", str(works), "--out", str(tmp_path / "a.json"), "--publish-fraction", "1"], "between 0 and 1"),
        (["--works", str(dup), "--out", str(tmp_path / "a.json")], "duplicate"),
        (["--works", str(works), "--out", str(tmp_path)], "is a folder"),
        (["--works", str(works)], "--out"),
    ]
    for args, message in cases:
        done = runner.invoke(app, ["design", *args])
        assert done.exit_code == 2 and message in done.output, (args, done.output)
    assert not (tmp_path / "a.json").exists()


def test_audit_stops_before_the_model_when_folders_or_options_are_not_the_design(designed, tmp_path):
    """No model is needed: every case stops at the design check (--model names nothing that exists)."""
    root, works, design_file = designed
    published, unpublished = split_folders(design_file, works, tmp_path / "ok")
    base = ["audit", "--published", str(published), "--unpublished", str(unpublished), "--model",
            str(tmp_path / "no-model"), "--design", str(design_file), "--out", str(tmp_path / "out")]
    wrong_alpha = runner.invoke(app, base)  # the design fixed alpha 0.05
    assert wrong_alpha.exit_code == 2 and "--alpha 0.01: the design fixed 0.05" in wrong_alpha.output
    wrong_seed = runner.invoke(app, [*base, "--alpha", "0.05", "--seed", "3", "--protocol", "sequential"])
    assert wrong_seed.exit_code == 2 and "--seed 3" in wrong_seed.output and "--protocol" in wrong_seed.output
    # One withheld work missing, one foreign image added to the published folder.
    missing = sorted(unpublished.iterdir())[0]
    missing.unlink()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(published / "foreign.png")
    dev = runner.invoke(app, [*base, "--alpha", "0.05"])
    assert dev.exit_code == 2 and "2 deviation(s)" in dev.output
    assert f"unpublished: missing {missing.name}" in dev.output and "published: not in the design foreign.png" in dev.output
    # A work in the other collection than assigned stops the audit even with --allow-deviations.
    (published / "foreign.png").unlink()
    moved = sorted(unpublished.iterdir())[0]
    moved.rename(published / moved.name)
    swap = runner.invoke(app, [*base, "--alpha", "0.05", "--allow-deviations"])
    assert swap.exit_code == 2 and "other collection than the design assigned" in swap.output
    alone = runner.invoke(app, ["audit", "--published", str(published), "--unpublished", str(unpublished),
                                "--model", "x", "--out", str(tmp_path / "o2"), "--allow-deviations"])
    assert alone.exit_code == 2 and "--design only" in alone.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "cdi-ledger.jsonl").exists()


# ------------------------------------------------------- audit from feature tables (no model)
def extract_tables(design: dict, folder: Path, shift: float = 0.0, seed: int = 0, noise_seed: int = 0):
    """`cdi extract`-like tables of the design's two lists (synthetic values; no model)."""
    from cdi.features.registry import resolve_features
    from cdi.engine.table import FeatureTable

    families = resolve_features("denoising_loss,pia")
    model = SimpleNamespace(conditioning="none", is_conditional=False)
    columns = [c for f in families for c in f.columns(model)]
    meta = {"kind": "cdi.features", "model_key": "synthetic-key", "seed": noise_seed,
            "model": {"model_id": "synthetic", "conditioning": "none"},
            "families": [{"name": f.name, "key": f.key(), "config": f.config_dict(), "columns": f.columns(model)}
                         for f in families]}
    rng = np.random.default_rng(seed)
    paths = []
    for key, name, offset in (("publish", "p.csv", shift), ("withhold", "u.csv", 0.0)):
        works = design[key]
        values = rng.normal(size=(len(works), len(columns))) + offset
        table = FeatureTable([w["path"] for w in works], [w["sha256"] for w in works], [None] * len(works),
                             columns, values, meta)
        paths.append(table.to_csv(folder / name))
    return paths


@pytest.fixture(scope="module")
def table_design(tmp_path_factory):
    root = tmp_path_factory.mktemp("table-design")
    design = build_design("works", [(f"w{i:02d}.png", h) for i, h in enumerate(fake_hashes(60))], beacon=BEACON,
                          beacon_name="drand round 9", analysis=planned_analysis(features="denoising_loss,pia"))
    path = root / "design.json"
    path.write_text(json.dumps(design))
    return root, design, path


def test_audit_from_tables_following_the_design_records_it(table_design, tmp_path):
    root, design, path = table_design
    p_csv, u_csv = extract_tables(design, tmp_path)
    out = tmp_path / "audits" / "a"
    done = runner.invoke(app, ["audit", "--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                               "--out", str(out), "--design", str(path), "--features", "denoising_loss,pia", *STATS])
    assert done.exit_code == 0, done.output
    result = AuditResult.load(out)
    d = result.design
    assert d["followed"] and d["commitment"] == design["commitment"] and d["options_match"]
    assert d["collections"]["published"] == {"designed": 30, "found": 30, "matched": 30, "missing": [], "extra": []}
    assert d["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "--design" in result.command
    report = (out / "report.html").read_text()
    assert "the split was randomised before publication and the analysis fixed in advance" in report
    assert "exchangeable by construction" in report and design["commitment"] in report
    assert "cdi design --check" in report and "cdi-design-v1" in report
    assert result.ledger["same_collections"][-1]["design"] == design["commitment"]


def test_audit_from_tables_with_deviations_or_other_options(table_design, tmp_path):
    root, design, path = table_design
    short = json.loads(json.dumps(design))
    dropped = short["withhold"].pop(0)
    p_csv, u_csv = extract_tables(short, tmp_path)
    args = ["audit", "--published-features", str(p_csv), "--unpublished-features", str(u_csv), "--design",
            str(path), "--features", "denoising_loss,pia", *STATS]
    stop = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert stop.exit_code == 2 and f"unpublished: missing {dropped['path']}" in stop.output
    allowed = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--allow-deviations"])
    assert allowed.exit_code == 0, allowed.output
    result = AuditResult.load(tmp_path / "b")
    assert not result.design["followed"] and result.design["collections"]["unpublished"]["missing"] == [dropped]
    report = (tmp_path / "b" / "report.html").read_text()
    assert "departed from the design" in report and dropped["sha256"] in report
    assert "randomised before publication" not in report
    no_features = runner.invoke(app, [*args[:-len(STATS) - 2], *STATS, "--out", str(tmp_path / "c")])
    assert no_features.exit_code == 2 and "--features (default): the design fixed denoising_loss,pia" in no_features.output
    altered = json.loads(path.read_text())
    altered["analysis"]["alpha"] = 0.05
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    tampered = runner.invoke(app, [*args[:6], str(tmp_path / "altered.json"), *args[7:], "--out", str(tmp_path / "e")])
    assert tampered.exit_code == 2 and "does not check out" in tampered.output and "commitment" in tampered.output
    p2, u2 = extract_tables(design, tmp_path / "seed", noise_seed=4)
    seeded = runner.invoke(app, ["audit", "--published-features", str(p2), "--unpublished-features", str(u2),
                                 "--design", str(path), "--features", "denoising_loss,pia", *STATS,
                                 "--out", str(tmp_path / "d")])
    assert seeded.exit_code == 2 and "extracted with --seed 4" in seeded.output


def test_design_demo_runs_the_whole_flow(toy_sd_world, tmp_path, monkeypatch):
    """`cdi demo --design` on the shared toy world, small and with one cheap feature family."""
    import cdi.toy.world

    monkeypatch.setattr(cdi.toy.world, "build_world", lambda *a, **k: toy_sd_world)
    from cdi.toy.demo import run_demo

    out = tmp_path / "demo"
    run_demo(out, n=25, design=True, permutations=50, progress=False, features="denoising_loss",
             sample_size_resamples=0, shift_encoder="builtin")
    result = AuditResult.load(out)
    design = json.loads((out / "design.json").read_text())
    assert result.design["followed"] and result.design["randomness"]["source"] == "stand-in"
    assert {s.sha256 for s in result.scores if s.collection == "published"} == {w["sha256"] for w in design["publish"]}
    assert design_problems(design) == []
    assert result.verdict != "used"  # the toy model never trained on either half (seeded: not_detected here)
    bad = runner.invoke(app, ["demo", "--design", "--null", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "drop --null" in bad.output


def test_the_python_api_refuses_a_design_it_would_not_check(table_design):
    import cdi.api
    from test_api import tables

    with pytest.raises(CDIError, match="design= is not taken"):
        cdi.api.audit(*tables(shift=0.0), directions=[1, 1, 1], design=str(table_design[2]))


def test_verify_checks_the_design_and_the_ledger_line(table_design, tmp_path):
    _, design, shared = table_design
    path = tmp_path / "design.json"
    path.write_bytes(shared.read_bytes())
    p_csv, u_csv = extract_tables(design, tmp_path)
    out = tmp_path / "audit"
    done = runner.invoke(app, ["audit", "--published-features", str(p_csv), "--unpublished-features", str(u_csv),
                               "--out", str(out), "--design", str(path), "--features", "denoising_loss,pia", *STATS])
    assert done.exit_code == 0, done.output
    ok = runner.invoke(app, ["verify", str(out), "--quick"])
    assert ok.exit_code == 0 and "[PASSED ] design" in ok.output and "[PASSED ] ledger" in ok.output, ok.output
    edited = json.loads(path.read_text())
    edited["withhold"].append(edited["publish"].pop())
    path.write_text(json.dumps(edited))
    bad = runner.invoke(app, ["verify", str(out), "--quick"])
    assert bad.exit_code == 1 and "[FAILED ] design" in bad.output and "another SHA-256" in bad.output
    ledger = tmp_path / "cdi-ledger.jsonl"
    ledger.write_text("")
    gone = runner.invoke(app, ["verify", str(out), "--quick"])
    assert gone.exit_code == 1 and "this audit's line is not in the ledger" in gone.output
