"""End-to-end audits on the embedded toy world, through the command line.

One toy world (shipped weights, built in seconds) and one feature store are
shared by the whole module, so every image's features are extracted once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdi.cli.main import app
from cdi.audit.result import AuditResult

runner = CliRunner()
N = 120  # images per collection: enough for the overtrained toy model, small enough for CI


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world(toy_sd_world):
    return toy_sd_world


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(tmp_path_factory.mktemp("store") / "features.sqlite")


@pytest.fixture(scope="module")
def demo_env(world, monkeypatch_module):
    """Point the demo at the module's world instead of the user cache."""
    import cdi.toy.world

    original = cdi.toy.world.build_world
    monkeypatch_module.setattr(cdi.toy.world, "build_world", lambda *a, **k: world)
    yield
    monkeypatch_module.setattr(cdi.toy.world, "build_world", original)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _demo(out: Path, store: str, *extra: str) -> AuditResult:
    result = runner.invoke(app, ["demo", "--out", str(out), "--n", str(N), "--store", store,
                                 "--permutations", "200", "--format", "json", *extra])
    assert result.exit_code == 0, result.output
    return AuditResult.load(out)


@pytest.fixture(scope="module")
def demo_used(tmp_path_factory, store, demo_env):
    out = tmp_path_factory.mktemp("demo") / "used"
    return out, _demo(out, store)


def test_demo_detects_use(demo_used):
    out, result = demo_used
    assert result.verdict == "used"
    assert result.p_value < 0.01
    assert result.n_published == result.n_unpublished == N
    assert result.shift_guard is not None and not result.shift_guard.detected
    for name in ("result.json", "features.csv", "features.csv.json", "report.html"):
        assert (out / name).is_file(), name
    hashes = {s.sha256 for s in result.scores}
    assert len(hashes) == 2 * N


def test_demo_null_is_not_detected(tmp_path, store, demo_env):
    result = _demo(tmp_path / "null", store, "--null")
    assert result.verdict == "not_detected"
    assert result.p_value > 0.01
    assert "not proof" in result.verdict_text


def test_audit_is_deterministic(demo_used, store, demo_env):
    """The same demo command twice (same --out): result.json byte-identical apart from its timings and ledger sections
    (the batch size is chosen by a fixed rule, not by timing); features.csv and its sidecar byte-identical."""
    out, _ = demo_used
    before = {name: (out / name).read_bytes() for name in ("result.json", "features.csv", "features.csv.json")}
    _demo(out, store)
    after = {name: (out / name).read_bytes() for name in before}
    assert after["features.csv"] == before["features.csv"]
    assert after["features.csv.json"] == before["features.csv.json"]
    first, again = json.loads(before["result.json"]), json.loads(after["result.json"])
    assert first["timings"] != again["timings"]  # the start time at least
    first["timings"] = again["timings"]
    assert len(again["ledger"]["same_collections"]) == len(first["ledger"]["same_collections"]) + 1
    first["ledger"] = again["ledger"]  # the audit ledger grows with every audit (cdi.audit.ledger)
    assert (json.dumps(first, indent=2) + "\n").encode() == after["result.json"]
    assert again["extraction"]["batch_size"] == 32


def test_features_csv_rows_carry_their_own_files(demo_used):
    """Every row of features.csv names the file whose SHA-256 it carries, and the statistics re-run from
    features.csv alone give result.json's p-values exactly."""
    import hashlib

    from cdi.audit.verify import retest, retest_differences

    out, result = demo_used
    from cdi.engine.table import FeatureTable

    table = FeatureTable.from_csv(out / "features.csv")
    assert len(table) == 2 * N
    for path, sha in zip(table.paths, table.hashes):
        assert hashlib.sha256((out / "data" / path).read_bytes()).hexdigest() == sha, path
    recorded, recomputed = retest(out, curve=False)
    assert retest_differences(recorded, recomputed, curve=False) == []
    assert (recomputed.p_value, recomputed.p_value_ttest, recomputed.p_value_permutation) == (
        result.p_value, result.p_value_ttest, result.p_value_permutation)
    assert recomputed.verdict == result.verdict == "used"


def test_shifted_unpublished_is_inconclusive(world, tmp_path, store):
    """P from members, U from a visibly shifted copy of the non-members: the guard must refuse."""
    from cdi.toy.demo import _captions, write_demo_folders, DemoDraw

    members = sorted(_captions(world.members_dir))[:60]
    captions = _captions(world.shifted_dir)
    shifted = sorted(captions)[:60]
    published, _ = write_demo_folders(world, DemoDraw(members, [], []), tmp_path / "data")
    unpublished = tmp_path / "shifted"
    unpublished.mkdir()
    lines = []
    for name in shifted:
        (unpublished / name).write_bytes((world.shifted_dir / name).read_bytes())
        lines.append(json.dumps({"file_name": name, "text": captions[name]}))
    (unpublished / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "audit"
    result = runner.invoke(app, [
        "audit", "--published", str(published), "--unpublished", str(unpublished), "--model", str(world.model_dir),
        "--out", str(out), "--store", store, "--features", "denoising_loss,pia", "--permutations", "100",
        "--sample-size-resamples", "0", "--format", "json",
    ])
    assert result.exit_code == 0, result.output
    saved = AuditResult.load(out)
    assert saved.verdict == "inconclusive"
    assert saved.shift_guard.detected and saved.shift_guard.p_value < 0.01
    assert "differ" in saved.verdict_text


def test_permutation_verdict_end_to_end(demo_used, tmp_path, store):
    """--verdict permutation: the exact permutation p-value is the verdict; at its floor the result and the
    report say so and show the parametric p-value beside it."""
    demo_out, _ = demo_used
    out = tmp_path / "perm"
    result = runner.invoke(app, [
        "audit", "--published", *_demo_folders(demo_out), "--out", str(out), "--store", store,
        "--features", "denoising_loss,pia", "--verdict", "permutation", "--permutations", "50",
        "--sample-size-resamples", "0", "--format", "json",
    ])
    assert result.exit_code == 0, result.output
    saved = AuditResult.load(out)
    assert saved.protocol["verdict_choice"] == "permutation" and saved.protocol["verdict_test"] == "permutation"
    assert saved.p_value == saved.p_value_permutation
    assert saved.protocol["permutation_at_floor"] is True and saved.p_value == pytest.approx(1 / 51)
    assert saved.p_value_ttest < saved.p_value
    assert saved.sample_size_estimate["published_needed"] is not None
    assert "--verdict permutation" in saved.command
    report = (out / "report.html").read_text()
    assert 'id="verdict-floor"' in report and 'id="sample-size-estimate"' in report
    low, high = saved.protocol["permutation_p_interval"]  # where another seed's permutation p would fall
    assert low == 0.0 and 0.0 < high < 0.15
    assert 'id="permutation-interval">another seed: at most' in report


def test_seed_check_end_to_end(demo_used, tmp_path, store):
    """--seed-check 2 re-extracts only the noise-drawing family at seeds 1 and 2 (two noise draws each, the default);
    the p recorded for seed 1 is the p of the same audit run with --seed 1 (the check re-runs the audit's own test),
    and the report quotes it. features.csv holds the second draw's column, and verify re-tests from it exactly."""
    demo_out, _ = demo_used
    common = ["audit", "--published", *_demo_folders(demo_out), "--store", store, "--features",
              "denoising_loss,pia", "--sample-size-resamples", "0", "--format", "json"]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "check"), "--seed-check", "2"])
    assert result.exit_code == 0, result.output
    saved = AuditResult.load(tmp_path / "check")
    check = saved.seed_check
    assert check["seeds"] == [0, 1, 2] and check["families_redrawn"] == ["denoising_loss"]
    assert check["p_values"][0] == saved.p_value and check["p_kind"] == "parametric"
    assert check["extra_calls_per_image"] == {"forward": 20, "backward": 0}  # 5 repetitions, 2 seeds, 2 draws
    draws = saved.features["noise_draws"]
    assert draws["draws"] == 2 and draws["families"] == ["denoising_loss"] and draws["seeds"][0] == 0
    assert draws["extra_calls_per_image"] == {"forward": 5, "backward": 0}
    pooled = saved.protocol["pooled"]
    assert len(pooled["draw_z"]) == 2 and pooled["reliability_weighted"]
    # PIA draws no noise: exactly reliable; the prior's weights are the reliabilities squared (normalised)
    assert pooled["column_reliability"]["pia"] == 1.0 and 0.0 <= pooled["column_reliability"]["denoising_loss"] <= 1.0
    weights = {w.column: w.weight for w in saved.feature_weights}
    squared = {c: pooled["column_reliability"][c] ** 2 for c in ("denoising_loss", "pia")}
    assert abs(weights["denoising_loss"] / weights["pia"]) == pytest.approx(squared["denoising_loss"] / squared["pia"])
    report = (tmp_path / "check" / "report.html").read_text()
    assert "reliability across the noise draws" in report and "mean over the 2 noise draws" in report
    assert f"keeps in part 2 the {pooled['reliable_directions']} direction" in draws["text"]
    header = (tmp_path / "check" / "features.csv").read_text().splitlines()[0]
    assert "denoising_loss@draw1" in header and "pia@draw1" not in header
    from cdi.audit.verify import retest, retest_differences

    assert retest_differences(*retest(tmp_path / "check", curve=False), curve=False) == []
    assert check["max_over_min"] == pytest.approx(max(check["p_values"]) / min(check["p_values"]))
    assert "--seed-check 2" in saved.command
    assert "Seed check" in saved.features["seed_dependence"]["text"]
    assert "not measured" not in saved.features["seed_dependence"]["text"]
    assert 'id="verdict-seed-check"' in (tmp_path / "check" / "report.html").read_text()

    result = runner.invoke(app, [*common, "--out", str(tmp_path / "seed1"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    again = AuditResult.load(tmp_path / "seed1")
    assert again.seed_check is None and "not measured" in again.features["seed_dependence"]["text"]
    assert again.p_value == check["p_values"][1]


def _demo_folders(demo_out: Path) -> list[str]:
    """``PUBLISHED --unpublished UNPUBLISHED --model MODEL`` of a demo run, from its result."""
    saved = AuditResult.load(demo_out)
    return [saved.parameters["published"], "--unpublished", saved.parameters["unpublished"],
            "--model", saved.parameters["model"]]


def test_audit_refuses_bad_options_before_writing(world, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--alpha", "0.7"], "--alpha"),
        (["--scorer", "forest"], "--scorer"),
        (["--folds", "1"], "--folds"),
        (["--features", "nonsense"], "nonsense"),
        (["--verdict", "permutation", "--permutations", "0"], "--verdict permutation"),
        (["--protocol", "pooled", "--scorer", "xgboost"], "--scorer xgboost"),
        (["--seed-check", "-1"], "--seed-check"),
    ]
    for extra, needle in cases:
        result = runner.invoke(app, ["audit", "--published", str(world.members_dir), "--unpublished",
                                     str(world.nonmembers_dir), "--model", str(world.model_dir), "--out", str(out),
                                     *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert needle in result.output
        assert not out.exists()


def test_audit_refuses_too_few_images(world, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for name in sorted(p.name for p in world.members_dir.glob("*.png"))[:3]:
        (small / name).write_bytes((world.members_dir / name).read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", "--published", str(small), "--unpublished", str(world.nonmembers_dir),
                                 "--model", str(world.model_dir), "--out", str(out)])
    assert result.exit_code == 2
    assert "at least" in result.output
    assert not out.exists()


def test_audit_refuses_to_overwrite(demo_used, world):
    out, _ = demo_used
    result = runner.invoke(app, ["audit", "--published", str(world.members_dir), "--unpublished",
                                 str(world.nonmembers_dir), "--model", str(world.model_dir), "--out", str(out)])
    assert result.exit_code == 2
    assert "--force" in result.output


def test_demo_report_in_a_browser(demo_used, tmp_path):
    """The demo's own report, opened in headless Chromium: verdict, p-value, no request, screenshot."""
    import html
    import os
    import re
    import shutil

    from test_report_browser import CHROMIUM, open_in_chromium

    from cdi.reports.html import VERDICT_LABEL, format_p

    if CHROMIUM is None:
        pytest.skip("no Chromium browser found (install Debian's `chromium` package)")
    out, result = demo_used
    screenshot = tmp_path / "demo-report.png"
    opened = open_in_chromium(out / "report.html", tmp_path, f"--screenshot={screenshot}",
                              "--window-size=1280,4000", "--hide-scrollbars")
    dom = opened["dom"]
    text = lambda fragment: html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()  # noqa: E731
    label = re.search(r'<span class="label" id="verdict-label">(.*?)</span>', dom)
    assert label and text(label.group(1)) == VERDICT_LABEL["used"]
    shown = re.search(r'<span class="pvalue" id="verdict-p">(.*?)</span>', dom)
    assert shown and text(shown.group(1)) == "p = " + text(str(format_p(result.p_value)))
    assert opened["requests"] == [] and opened["console"] == []
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("CDI_SCREENSHOT_DIR"):
        shutil.copyfile(screenshot, Path(os.environ["CDI_SCREENSHOT_DIR"]) / "demo-report.png")
    assert (out / "report.html").stat().st_size < 2 * 2**20
