"""``cdi benchmark`` end to end on the tiny SD pipeline, and its input errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdi.benchmark import ALL_METHODS, available_setups, format_table, load_setup
from cdi.cli.main import app

MALICIOUS = "<img src=x onerror=alert(1)>"
N_PER_CLASS = 20


def _write_folder(folder, n, seed, shade):
    """``n`` random 16 px RGB images with captions in metadata.jsonl."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        pixels = np.clip(rng.normal(shade, 60, size=(16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
        lines.append(json.dumps({"file_name": f"img_{i:03d}.png", "text": f"a picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def bench_run(tiny_model_dirs, tmp_path_factory):
    """One quick CLI run with every method and a two-point mixing experiment."""
    root = tmp_path_factory.mktemp("bench")
    members = _write_folder(root / MALICIOUS, N_PER_CLASS, 1, 110)
    nonmembers = _write_folder(root / "nonmembers", N_PER_CLASS, 2, 140)
    out = root / "out"
    result = CliRunner().invoke(app, [
        "benchmark", "--members", str(members), "--nonmembers", str(nonmembers),
        "--model", str(tiny_model_dirs["sd"]), "--out", str(out), "--quick", "--methods", ",".join(ALL_METHODS),
        "--mix", "0,1", "--device", "cpu", "--permutations", "50", "--batch-size", "20", "--folds", "2",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_benchmark_json_has_every_method_and_figure(bench_run):
    out, _ = bench_run
    data = json.loads((out / "benchmark.json").read_text())
    assert list(data["methods"]) == list(ALL_METHODS)
    for name, r in data["methods"].items():
        assert set(r["calibration"]) >= {"tpr_at_1fpr", "tpr_at_01fpr", "auc"}
        assert set(r["test"]) >= {"tpr_1", "fpr_1", "tpr_01", "fpr_01", "fpr_1_exceeds_bound"}
        assert "calibration.auc" in r["intervals"] and "test.tpr_1" in r["intervals"]
        assert 0.0 <= r["calibration"]["auc"] <= 1.0
        assert r["cost"]["seconds"] >= 0
        assert r["n_calibration"] == {"members": 10, "nonmembers": 10}
        assert len(r["scores"]["test_scores"]) == 2 * (N_PER_CLASS - 10)
    # model calls come from the families' costs: the quick PFAMI uses 2 timesteps x (1 + 2 neighbours) x 2
    assert data["methods"]["loss"]["cost"]["forward"] >= 1
    assert data["methods"]["blind"]["cost"]["forward"] == 0
    assert data["methods"]["gsa1"]["cost"]["backward"] == 2
    assert data["methods"]["cdi"]["cost"]["forward"] > data["methods"]["loss"]["cost"]["forward"]
    assert {"frechet", "mahalanobis", "wasserstein", "probe"} <= set(data["shift"])
    assert data["audit"]["verdict"] in {"used", "not_detected", "inconclusive"}
    assert 0.0 < data["audit"]["p_value"] <= 1.0
    assert [row["fraction"] for row in data["mixing"]] == [0.0, 1.0]
    assert set(data["mixing"][0]["methods"]) == set(ALL_METHODS)
    # with nothing shifted the mixing run sees the same images as the main run
    assert data["mixing"][0]["methods"]["loss"]["auc"] == pytest.approx(data["methods"]["loss"]["calibration"]["auc"])
    assert data["mixing"][1]["frechet"] != data["mixing"][0]["frechet"]
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.html", "benchmark.json", "features.sqlite"]


def test_report_is_self_contained_and_escaped(bench_run):
    out, output = bench_run
    html = (out / "benchmark.html").read_text()
    assert not re.search(r"https?://(?!www\.w3\.org/)", html)
    assert MALICIOUS not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<svg") == 3  # ROC curves of both splits and the mixing plot
    assert "cannot be resolved" in html and "95% bootstrap interval" in html
    assert "TPR@0.1%FPR" in html
    for method in ALL_METHODS:
        assert f">{method}<" in html
    assert "cal TPR@1%" in output and "audit" in output


def test_console_table_flags_fpr_above_bound():
    row = {"calibration": {"tpr_at_1fpr": 0.5, "tpr_at_01fpr": 0.1, "auc": 0.8},
           "test": {"tpr_1": 0.4, "fpr_1": 0.05, "tpr_01": 0.1, "fpr_01": 0.0, "fpr_1_exceeds_bound": True,
                    "fpr_01_exceeds_bound": False},
           "cost": {"forward": 3, "backward": 0, "seconds": 0.1}, "calibration_protocol": "fixed rule"}
    result = {"methods": {"loss": row}, "mixing": [],
              "shift": {"encoder": "builtin", "frechet": 0.1, "probe": {"auc": 0.6}},
              "audit": {"verdict": "used", "p_value": 0.001}}
    line = format_table(result).splitlines()[2]
    assert "40.0/5.0!" in line and "10.0/0.0 " in line + " "


def test_unknown_setup_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "--setup", "no-such-setup", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown setup 'no-such-setup'" in result.output
    assert "toy-defective" in result.output


def test_absent_real_setup_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_DATA", str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["benchmark", "--setup", "sd15-laion-mi", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "missing" in result.output and "LAION-MI" in result.output and "metadata.jsonl" in result.output
    assert not (tmp_path / "o").exists()


def test_every_setup_file_is_valid():
    names = available_setups()
    assert {"toy-defective", "toy-realistic", "sd15-laion-mi"} <= set(names)
    assert sum(name.startswith("copymark-") for name in names) == 5
    for name in names:
        setup = load_setup(name)
        assert setup.name == name
        assert (setup.toy is not None) != (setup.model is not None)


def test_bad_options_exit_2(tmp_path):
    for args in (["--methods", "loss,nonsense"], ["--mix", "0,2"], ["--calibration-fraction", "1"]):
        result = CliRunner().invoke(app, ["benchmark", "--setup", "toy-realistic", "--out", str(tmp_path), *args])
        assert result.exit_code == 2, args
    result = CliRunner().invoke(app, ["benchmark", "--members", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "go together" in result.output
