"""Pseudo-captions (``--captions auto``) and the early missing-caption check, on the toy world.

The captioner is a tiny BLIP built from a config with random weights
(``cdi.models.tiny.save_tiny_captioner``), loaded through AutoProcessor and
AutoModelForImageTextToText exactly as a downloaded one; no network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdi.models.captions import CaptionOption, check_captions, model_conditioning, parse_captions_option
from cdi.cli.main import app
from cdi.utils.errors import CDIError

runner = CliRunner()
N = 10  # images per collection: the minimum for --folds 2


@pytest.fixture(scope="module")
def world(toy_sd_world):
    """The session's sd-overtrained toy world (conftest); read only."""
    return toy_sd_world


def copy_images(source: Path, target: Path, n: int, *, offset: int = 0) -> Path:
    """The first n PNGs of a toy folder, without their captions."""
    target.mkdir(parents=True)
    for name in sorted(p.name for p in source.glob("*.png"))[offset:offset + n]:
        shutil.copyfile(source / name, target / name)
    return target


def test_parse_captions_option():
    assert parse_captions_option(None) == CaptionOption("files")
    assert parse_captions_option("files") == CaptionOption("files")
    assert parse_captions_option("auto") == CaptionOption("auto", "florence2")
    assert parse_captions_option("AUTO:blip") == CaptionOption("auto", "blip")
    assert parse_captions_option("auto:/models/my captioner") == CaptionOption("auto", "/models/my captioner")
    for bad in ("auto:", "blip", "manual:x"):
        with pytest.raises(CDIError, match="--captions"):
            parse_captions_option(bad)


def test_model_conditioning_without_loading(tiny_model_dirs, tmp_path, monkeypatch):
    import cdi.models

    monkeypatch.setattr(cdi.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    expected = {"sd": "text", "sdxl": "text", "ldm": "none", "dit": "class", "ddpm": "class", "ddpm_uncond": "none"}
    assert {f: model_conditioning(str(tiny_model_dirs[f])) for f in expected} == expected
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert model_conditioning("someone/not-downloaded") is None  # unknown: checked after loading, as before


def test_captions_auto_is_refused_on_a_class_model(tiny_model_dirs, tmp_path, monkeypatch):
    import cdi.models
    from test_cli_hostile import smooth_image

    monkeypatch.setattr(cdi.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for name in ("P", "U"):
        for i in range(N):
            smooth_image(tmp_path / name / f"{i}.png", seed=i + (0 if name == "P" else 50))
    result = runner.invoke(app, ["audit", "--published", str(tmp_path / "P"), "--unpublished", str(tmp_path / "U"),
                                 "--model", str(tiny_model_dirs["dit"]), "--out", str(tmp_path / "out"),
                                 "--folds", "2", "--features", "denoising_loss", "--captions", "auto"])
    assert result.exit_code == 2 and "class-conditioned" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_class_model_with_missing_labels_does_not_offer_captions(tmp_path):
    from cdi.data.collection import ImageCollection
    from cdi.features.registry import resolve_features
    from test_cli_hostile import smooth_image

    for i in range(3):
        smooth_image(tmp_path / "P" / f"{i}.png", seed=i)
    collection = ImageCollection.from_folder(tmp_path / "P", name="published")
    with pytest.raises(CDIError, match="class label") as info:
        check_captions("class", resolve_features("cdi+clid"), [collection], CaptionOption("files"))
    assert "--captions auto" not in str(info.value)


def test_missing_captions_are_found_before_the_model_loads(world, tmp_path, monkeypatch):
    """Toy images without captions on the toy text-to-image model: the default features need them."""
    import cdi.models

    monkeypatch.setattr(cdi.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    p = copy_images(world.members_dir, tmp_path / "P", N)
    u = copy_images(world.nonmembers_dir, tmp_path / "U", N)
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", "--published", str(p), "--unpublished", str(u),
                                 "--model", str(world.model_dir), "--out", str(out), "--folds", "2"])
    assert result.exit_code == 2, result.output
    assert "clid" in result.stderr and "20 of 20 image(s) have none" in result.stderr
    assert "--captions auto" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_captions_auto_end_to_end(world, tiny_captioner_dir, tmp_path, monkeypatch):
    """--captions auto on the toy world: captioned once, cached by hash, recorded in result.json."""
    monkeypatch.setenv("CDI_CACHE", str(tmp_path / "cache"))
    p = copy_images(world.members_dir, tmp_path / "P", N)
    u = copy_images(world.nonmembers_dir, tmp_path / "U", N)
    args = ["audit", "--published", str(p), "--unpublished", str(u), "--model", str(world.model_dir),
            "--folds", "2", "--features", "denoising_loss,clid", "--permutations", "0",
            "--sample-size-resamples", "0", "--batch-size", "16", "--device", "cpu", "--shift-encoder", "builtin",
            "--captions", f"auto:{tiny_captioner_dir}"]
    first = runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    captions = saved["captions"]
    assert captions["source"] == "auto" and captions["conditioning"] == "caption"
    assert captions["captioner"]["id"] == str(tiny_captioner_dir)
    assert len(captions["captioner"]["fingerprint"]) == 64 and "model.safetensors" in captions["captioner"]["files"]
    assert (captions["generated"], captions["from_cache"]) == (2 * N, 0)
    cache_file = Path(captions["cache_file"])
    assert cache_file.parent == tmp_path / "cache" / "captions"
    cached = json.loads(cache_file.read_text())["captions"]
    assert len(cached) == 2 * N
    for row in saved["scores"]:
        assert row["caption"] and row["caption"] == cached[row["sha256"]]

    # the same images again: every caption from the cache, the same result
    second = runner.invoke(app, args + ["--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "b" / "result.json").read_text())
    assert (again["captions"]["generated"], again["captions"]["from_cache"]) == (0, 2 * N)
    assert [r["caption"] for r in again["scores"]] == [r["caption"] for r in saved["scores"]]
    assert again["p_value"] == saved["p_value"]
